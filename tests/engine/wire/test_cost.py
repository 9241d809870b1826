"""The shared cost arithmetic and the high-res fix's two Layouts."""

from __future__ import annotations

import pytest

from engine.wire.cost import (
    HIGH_RES_STRENGTH,
    duration,
    estimate_seconds,
    far_above_native,
    first_pass,
    high_res_seconds,
    native_area_size,
    second_pass,
    second_pass_steps,
)
from engine.wire.layout import Layout, Region

COST = {
    "native_size": 1024,
    "latent_factor": 8,
    "unet_flops": [1e11, 7e8, 5600.0],
    "vae_flops": [0.0, 6e8, 2048.0],
    "seconds_per_flop": 1e-13,
}


def test_estimate_grows_with_steps_and_faster_than_the_pixels():
    one = estimate_seconds(COST, 1024, 1024, 1, decode=False)
    assert one == pytest.approx((1e11 + 7e8 * 16384 + 5600 * 16384**2) * 1e-13)
    assert estimate_seconds(COST, 1024, 1024, 30) > 30 * one
    # Four times the pixels: more than four times the time (attention is quadratic).
    assert estimate_seconds(COST, 2048, 2048, 30) > 4 * estimate_seconds(COST, 1024, 1024, 30)


def test_far_above_native_is_more_than_one_and_a_half_times_its_area():
    assert not far_above_native(1024, 1024, 1024)
    assert not far_above_native(1216, 1216, 1024)
    assert far_above_native(1920, 1080, 1024)
    assert far_above_native(1920, 1080, 64)
    assert not far_above_native(64, 72, 64)


def test_native_area_size_keeps_the_aspect():
    assert native_area_size(1920, 1080, 1024) == (1368, 768)
    assert native_area_size(3840, 2160, 1024) == (1368, 768)
    assert native_area_size(1920, 1080, 64) == (128, 72)  # 85 x 48: under the minimum side
    assert native_area_size(160, 96, 64) == (120, 72)  # 104 x 64 would be 2.5% off
    assert native_area_size(512, 512, 1024) == (512, 512)  # never above the given size
    width, height = native_area_size(4096, 1024, 1024)
    assert width % 8 == 0 and height % 8 == 0 and width / height == pytest.approx(4, rel=0.05)


def layout(**overrides) -> Layout:
    data = dict(
        prompt="a street",
        width=3840,
        height=2160,
        steps=30,
        seed=7,
        reference_scale=0.5,
        regions=[Region(prompt="a car", box=(0.1, 0.5, 0.5, 0.9), mask="/m/car.png", strength=0.8)],
    )
    data.update(overrides)
    return Layout(**data)


def test_first_pass_is_the_same_layout_at_native_area():
    full = layout()
    small = first_pass(full, 1024)
    assert (small.width, small.height) == (1368, 768)
    assert small.regions == full.regions and small.seed == full.seed
    assert small.reference_scale == full.reference_scale and small.steps == full.steps


def test_second_pass_starts_from_the_upscaled_image_with_the_same_regions():
    full = layout()
    second = second_pass(full, "/tmp/up.png", 0.45)
    assert (second.width, second.height) == (3840, 2160)
    assert (second.init_image, second.strength, second.keep_outside) == ("/tmp/up.png", 0.45, False)
    assert second.steps == 14 == second_pass_steps(30, 0.45)
    assert [(r.prompt, r.box, r.mask) for r in second.regions] == [
        (r.prompt, r.box, r.mask) for r in full.regions
    ]
    assert all(r.strength is None for r in second.regions)  # one strength everywhere
    assert second.reference_scale == 0.0
    Layout.from_dict(second.to_dict())  # a valid Layout


def test_high_res_fix_costs_less_than_generating_far_above_native():
    direct = estimate_seconds(COST, 3840, 2160, 30)
    fixed = high_res_seconds(COST, 3840, 2160, 30, HIGH_RES_STRENGTH)
    assert fixed < 0.6 * direct
    assert fixed > estimate_seconds(COST, 3840, 2160, 12)


def test_duration_reads_naturally():
    assert duration(0.2) == "1 s"
    assert duration(42) == "42 s"
    assert duration(700) == "12 min"
    assert duration(13800) == "3.8 h"
