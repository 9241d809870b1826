"""PNG provenance chunks and atomic writes."""

from __future__ import annotations

import os

import pytest
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler
from PIL import Image

from engine.service.provenance import (
    a1111_parameters,
    layout_from_png,
    read_provenance,
    sampler_name,
    save_png,
)
from engine.wire.layout import Layout, Region


def scene(**overrides) -> Layout:
    values = {
        "prompt": "a street at dusk",
        "negative_prompt": "blurry",
        "width": 128,
        "height": 64,
        "seed": 7,
        "steps": 30,
        "guidance_scale": 6.0,
        "regions": [Region(prompt="a red car", box=(0.1, 0.5, 0.4, 0.9), name="Car")],
    }
    values.update(overrides)
    return Layout(**values)


def test_a1111_parameters_text():
    assert a1111_parameters(scene(), "/models/sdxl-base.safetensors", "Euler") == (
        "a street at dusk\n"
        "Negative prompt: blurry\n"
        "Steps: 30, Sampler: Euler, CFG scale: 6, Seed: 7, Size: 128x64, Model: sdxl-base, "
        "Regions: 1, Regional mode: attention, Version: layout-diffusion 0.1.0"
    )
    # No negative prompt: no line for it; values with commas are quoted like A1111 does.
    text = a1111_parameters(scene(negative_prompt="", guidance_scale=7.5), "a, b", "DPM++ 2M")
    assert text.splitlines()[1].startswith("Steps: 30, Sampler: DPM++ 2M, CFG scale: 7.5")
    assert 'Model: "a, b"' in text


def test_sampler_names_follow_a1111():
    assert sampler_name(EulerDiscreteScheduler()) == "Euler"
    assert sampler_name(DPMSolverMultistepScheduler(use_karras_sigmas=True)) == "DPM++ 2M Karras"
    assert sampler_name("MyScheduler") == "MyScheduler"


def test_save_png_round_trips_layout_and_leaves_no_temp(tmp_path):
    layout = scene(prompt="ein Straßenbild", regions=[])
    out = tmp_path / "new" / "image.png"
    path = save_png(Image.new("RGB", (128, 64), "red"), str(out), layout, "shapes", "Euler")
    assert path == str(out)
    assert os.listdir(out.parent) == ["image.png"]
    record = read_provenance(path)
    assert record["model"] == "shapes" and record["seed"] == 7
    assert record["parameters"].startswith("ein Straßenbild\n")  # non-Latin-1 kept intact
    assert layout_from_png(path) == layout


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    out = tmp_path / "image.png"
    save_png(Image.new("RGB", (8, 8), "blue"), str(out), scene(), "shapes", "Euler")
    before = out.read_bytes()

    class Broken:
        def save(self, handle, **kwargs):
            handle.write(b"\x89PNG half an image")
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        save_png(Broken(), str(out), scene(seed=8), "shapes", "Euler")
    assert out.read_bytes() == before
    assert os.listdir(tmp_path) == ["image.png"]


def test_png_without_record_is_reported(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    with pytest.raises(ValueError, match="no 'layout-diffusion' chunk"):
        read_provenance(str(plain))
