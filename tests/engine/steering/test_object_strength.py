"""Per-region strength and re-generating one object: schedules, feathered maps, the exact
pixel composite, and runs on the tiny SDXL model through the step-end callback."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from engine.pipeline import RegionalSDXLPipeline
from engine.regional.masks import blur
from engine.steering.hooks import prepare_step_hooks
from engine.steering.latents import encode_image
from engine.steering.object_strength import composite_outside, free_maps, keep_alpha, kept_levels
from engine.wire.edits import first_pass_layout, regenerate_layout
from engine.wire.layout import Layout, LayoutError, Region

SIDE = 64
LATENT = SIDE // 2  # the tiny VAE downsamples by 2
STEPS = 4


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    pipe = RegionalSDXLPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def layout(**overrides) -> Layout:
    settings = dict(
        prompt="a red car and a tree",
        width=SIDE,
        height=SIDE,
        steps=STEPS,
        seed=3,
        regions=[
            Region("a red car", (0.0, 0.0, 0.5, 0.5), name="car"),
            Region("a tree", (0.5, 0.5, 1.0, 1.0), name="tree"),
        ],
    )
    settings.update(overrides)
    return Layout(**settings)


@pytest.fixture(scope="module")
def previous(pipe, tmp_path_factory) -> str:
    """A previous result of ``layout()`` to start from."""
    path = tmp_path_factory.mktemp("previous") / "result.png"
    pipe(layout=layout(), output_type="pil").images[0].save(path)
    return str(path)


def run(pipe, lay: Layout, output_type="latent", record=None):
    """``lay``'s images with its step hooks passed explicitly (see also the wiring test)."""
    generator = torch.Generator("cpu").manual_seed(lay.seed)
    hooks = prepare_step_hooks(pipe, lay, generator)
    images = pipe(
        # Without its image settings, so the pipeline adds no hooks of its own.
        layout=first_pass_layout(lay, factor=1.0),
        generator=generator,
        latents=hooks.latents,
        callback_on_step_end=hooks.callback(record),
        output_type=output_type,
    ).images
    return hooks, (hooks.finish(images) if output_type == "pil" else images)


# -- Pure parts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "strength, steps, levels",
    [(0.0, 10, 11), (1.0, 10, 0), (0.3, 10, 8), (0.7, 10, 4), (0.29, 100, 72), (0.05, 10, 11)],
)
def test_kept_levels_follow_img2img_step_counts(strength, steps, levels):
    # strength s leaves floor(N * s) steps free; the levels before the first free step are kept.
    assert kept_levels(strength, steps) == levels


def test_blur_spreads_a_pixel_into_a_normalized_gaussian():
    mask = torch.zeros(9, 9)
    mask[4, 4] = 1.0
    blurred = blur(mask, sigma=1.0)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-6)
    kernel = torch.exp(-0.5 * torch.arange(-2.0, 3.0) ** 2)
    kernel = kernel / kernel.sum()
    torch.testing.assert_close(blurred[2:7, 2:7], torch.outer(kernel, kernel))
    assert torch.equal(blur(torch.ones(5, 7)), torch.ones(5, 7))


def test_free_maps_blend_layers_and_let_the_freer_region_win():
    lay = layout(
        init_image="/tmp/init.png",
        strength=0.0,
        steps=2,
        regions=[
            Region("kept", (0.0, 0.0, 1.0, 1.0), strength=0.0),
            Region("free", (0.0, 0.0, 0.5, 1.0), strength=1.0),
        ],
    )
    maps = free_maps(lay, (8, 8), sigma=0.0)
    assert len(maps) == 3
    for level_map in maps:
        expected = torch.zeros(8, 8)
        expected[:, :4] = 1.0  # the free region overlaps the kept one and wins
        assert torch.equal(level_map, expected)
    everything_free = layout(init_image="/tmp/init.png", strength=1.0)
    assert free_maps(everything_free, (8, 8)) == [None] * (STEPS + 1)


def test_free_maps_switch_at_each_layers_strength():
    lay = layout(
        init_image="/tmp/init.png",
        strength=0.5,  # background: levels 0..2 of 4 kept
        regions=[Region("a", (0.0, 0.0, 0.5, 1.0), strength=0.0)],  # kept through level 4
    )
    maps = free_maps(lay, (4, 4), sigma=0.0)
    left, right = torch.zeros(4, 4), torch.zeros(4, 4)
    left[:, 2:] = 1.0
    for level in range(3):
        assert torch.equal(maps[level], right)
    for level in (3, 4):
        assert torch.equal(maps[level], left)


def test_keep_alpha_ramps_over_twice_the_band_and_is_zero_beyond():
    lay = layout(
        init_image="/tmp/init.png",
        strength=0.0,
        keep_outside=True,
        regions=[
            Region("left", (0.0, 0.0, 10 / 64, 1.0), strength=1.0),
            Region("kept", (0.5, 0.0, 1.0, 1.0)),
        ],
    )
    alpha = keep_alpha(lay, band=2)
    assert alpha.shape == (SIDE, SIDE)
    np.testing.assert_array_equal(alpha[:, :10], 1.0)
    np.testing.assert_allclose(alpha[5, 10:15], [0.8, 0.6, 0.4, 0.2, 0.0], atol=1e-6)
    np.testing.assert_array_equal(alpha[:, 14:], 0.0)


def test_composite_is_exact_where_alpha_is_zero_or_one():
    generated = Image.fromarray(np.full((4, 3, 3), 200, np.uint8))
    init = Image.fromarray(np.arange(36, dtype=np.uint8).reshape(4, 3, 3))
    alpha = np.array([[1, 1, 1], [0.5, 0.5, 0.5], [0, 0, 0], [0, 0, 0]], np.float32)
    out = np.asarray(composite_outside(generated, init, alpha))
    np.testing.assert_array_equal(out[0], 200)
    np.testing.assert_array_equal(out[2:], np.asarray(init)[2:])
    np.testing.assert_array_equal(out[1], np.rint((np.asarray(init)[1] + 200) / 2))


def test_regenerate_layout_frees_one_region_by_name_or_index():
    lay = layout()
    again = regenerate_layout(lay, "tree", "/tmp/previous.png", seed=11)
    assert [r.strength for r in again.regions] == [None, 1.0]
    assert (again.init_image, again.strength, again.keep_outside, again.seed) == (
        "/tmp/previous.png",
        0.0,
        True,
        11,
    )
    assert regenerate_layout(lay, 0, "/tmp/p.png", 1).regions[0].strength == 1.0
    with pytest.raises(LayoutError, match="no region is named 'bus'.*'car', 'tree'"):
        regenerate_layout(lay, "bus", "/tmp/p.png", 1)
    with pytest.raises(LayoutError, match="no region 2"):
        regenerate_layout(lay, 2, "/tmp/p.png", 1)


# -- On the tiny model ----------------------------------------------------------------------------


def test_strength_one_everywhere_is_the_unguided_result(pipe, previous):
    lay = layout(regions=[dataclasses.replace(r, strength=1.0) for r in layout().regions])
    plain = pipe(layout=lay, output_type="latent").images
    hooks, out = run(pipe, dataclasses.replace(lay, init_image=previous))
    assert hooks.latents is None and not hooks.hooks
    assert torch.equal(out, plain)


def test_strength_zero_everywhere_returns_the_init_image(pipe, previous):
    lay = layout(init_image=previous, strength=0.0)
    _, latents = run(pipe, lay)
    init = encode_image(pipe, Image.open(previous), SIDE, SIDE)
    assert torch.equal(latents, init)
    _, image = run(pipe, lay, output_type="np")
    round_trip = pipe.image_processor.postprocess(
        pipe.vae.decode(init / pipe.vae.config.scaling_factor).sample.detach(), output_type="np"
    )
    # The pipeline decodes the same latents; only float rounding inside the VAE may differ.
    np.testing.assert_allclose(image, round_trip, atol=1e-5)


def test_a_kept_region_holds_the_noised_init_at_every_level(pipe, previous):
    # The car (left-top quarter) at strength 0.5 over 4 steps: kept at levels 0..2, free after;
    # the background regenerates freely.
    lay = layout(
        init_image=previous,
        strength=1.0,
        regions=[Region("a red car", (0.0, 0.0, 0.5, 0.5), strength=0.5)],
    )
    seen: dict[int, torch.Tensor] = {}

    def record(_pipe, step, _t, tensors):
        seen[step + 1] = tensors["latents"].clone()
        return {}

    hooks, final = run(pipe, lay, record=record)
    (strength,) = hooks.hooks
    kept = (strength.free[0] == 0).expand(1, 4, LATENT, LATENT)
    # Feathering leaves the quarter's inner part (1 latent pixel blur, 2 pixel reach) exact.
    assert kept[0, 0, :14, :14].all() and not kept[0, 0, 18:, :].any()
    sigmas = pipe.scheduler.sigmas
    for level in (1, 2):
        expected = strength.init + sigmas[level] * strength.noise  # Euler: x0 + sigma * noise
        torch.testing.assert_close(seen[level][kept], expected[kept])
    expected = strength.init + sigmas[3] * strength.noise
    assert not torch.allclose(seen[3][kept], expected[kept], atol=1e-3)
    assert not torch.allclose(final[kept], strength.init.expand_as(final)[kept], atol=1e-3)


def test_regenerating_one_object_keeps_every_other_pixel_exactly(pipe, previous):
    before = np.asarray(Image.open(previous).convert("RGB"))
    lay = regenerate_layout(layout(), "car", previous, seed=99)
    hooks, (image,) = run(pipe, lay, output_type="pil")
    after = np.asarray(image)
    assert after.shape == before.shape
    band = 2 * pipe.vae_scale_factor
    changed = np.abs(after.astype(int) - before.astype(int)).max(axis=-1) > 0
    outside = np.ones((SIDE, SIDE), bool)
    outside[: SIDE // 2 + band, : SIDE // 2 + band] = False
    assert not changed[outside].any()
    # Inside the car's box the object was regenerated with the new seed.
    car = np.abs(after[:32, :32].astype(int) - before[:32, :32].astype(int)).mean()
    assert car > 10
    # With another seed it comes out differently again; the rest stays the same.
    _, (other,) = run(pipe, dataclasses.replace(lay, seed=100), output_type="pil")
    other = np.asarray(other)
    assert np.abs(other[:32, :32].astype(int) - after[:32, :32].astype(int)).mean() > 5
    np.testing.assert_array_equal(other[outside], before[outside])


def test_keep_outside_without_a_readable_init_image_names_the_field(pipe, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    lay = regenerate_layout(layout(), 0, str(broken), seed=1)
    with pytest.raises(LayoutError, match="not a readable image") as info:
        prepare_step_hooks(pipe, lay, torch.Generator("cpu").manual_seed(0))
    assert info.value.field == "init_image"


@pytest.mark.parametrize(
    "scheduler",
    ["EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DDIMScheduler"],
)
def test_kept_background_is_exact_with_other_schedulers(pipe, previous, scheduler):
    import diffusers

    other = RegionalSDXLPipeline(**{**pipe.components, "scheduler": None})
    other.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    other.set_progress_bar_config(disable=True)
    lay = layout(
        init_image=previous,
        strength=0.0,
        regions=[Region("a red car", (0.0, 0.0, 0.5, 0.5), strength=1.0)],
    )
    hooks, latents = run(other, lay)
    (strength,) = hooks.hooks
    kept = (strength.free[-1] == 0).expand_as(latents)
    assert kept.float().mean() > 0.6
    assert torch.equal(latents[kept], strength.init.expand_as(latents)[kept])
    assert not torch.allclose(latents[~kept], strength.init.expand_as(latents)[~kept], atol=1e-2)


def test_the_pipeline_applies_the_layouts_strengths_itself(pipe, previous):
    lay = regenerate_layout(layout(), "tree", previous, seed=42)
    _, (explicit,) = run(pipe, lay, output_type="pil")
    (wired,) = pipe(layout=lay, output_type="pil").images
    np.testing.assert_array_equal(np.asarray(wired), np.asarray(explicit))
