"""RegionalSDXLPipeline end to end on the tiny SDXL model (CPU, 96x64, a few steps)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from engine.pipeline import RegionalSDXLPipeline
from engine.regional.attention import RegionalAttnProcessor
from engine.wire.layout import Layout, Region

SIZE = dict(width=96, height=64)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    pipe = RegionalSDXLPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def stock(tiny_model_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _plain(pipe, prompt="a red car on a road", steps=3, seed=7, **kwargs):
    return pipe(
        prompt=prompt,
        num_inference_steps=steps,
        guidance_scale=6.0,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
        **SIZE,
        **kwargs,
    ).images[0]


def _two_regions(car="a red car", seed=7, car_mask=None) -> Layout:
    return Layout(
        prompt="a red car and a tree on a road",
        # fixed, so that renaming a region does not change what the background sees
        background_prompt="a road",
        negative_prompt="blurry",
        steps=2,
        seed=seed,
        regions=[
            Region(car, (0.0, 0.25, 0.5, 0.75), mask=car_mask),
            Region("a tree", (0.75, 0.0, 1.0, 1.0)),
        ],
        **SIZE,
    )


def test_plain_call_is_stock_sdxl_bit_for_bit(pipe, stock):
    expected = _plain(stock)
    assert np.array_equal(_plain(pipe), expected)
    seen = []

    def record(_pipe, _step, _t, _tensors):
        seen.extend(type(p) for p in pipe.unet.attn_processors.values())
        return {}

    pipe(layout=_two_regions(), output_type="latent", callback_on_step_end=record)
    assert RegionalAttnProcessor in seen, "regional processors run the Layout call"
    assert not any(isinstance(p, RegionalAttnProcessor) for p in pipe.unet.attn_processors.values())
    assert np.array_equal(_plain(pipe), expected)


def test_full_canvas_region_with_the_scene_prompt_is_the_plain_image(pipe, stock):
    layout = Layout(
        prompt="a red car on a road",
        steps=3,
        seed=7,
        regions=[Region("a red car on a road", (0.0, 0.0, 1.0, 1.0))],
        **SIZE,
    )
    image = pipe(layout=layout, output_type="np").images[0]
    np.testing.assert_allclose(image, _plain(stock), atol=1e-6)


def test_blocks_with_identical_text_embeddings_blend_to_the_plain_image(pipe, stock):
    # Different texts (two blocks, the full regional path) that tokenize the same: however
    # the pixels weigh the two blocks, attention must come out as with one block.
    layout = Layout(
        prompt="a red car on a road",
        background_prompt="a red car on a road",
        base_ratio=0.3,
        steps=3,
        seed=7,
        regions=[Region("A RED CAR ON A ROAD", (0.1, 0.2, 0.6, 0.9), weight=2.0)],
        **SIZE,
    )
    lengths = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda _m, _a, kwargs: lengths.append(kwargs["encoder_hidden_states"].shape[1]),
        with_kwargs=True,
    )
    try:
        image = pipe(layout=layout, output_type="np").images[0]
    finally:
        handle.remove()
    assert lengths == [2 * 77] * 3
    np.testing.assert_allclose(image, _plain(stock), atol=1e-5)


def test_full_canvas_region_alone_uses_its_prompt_with_scene_pooling(pipe, stock):
    layout = Layout(
        prompt="a road",
        base_ratio=0.0,
        steps=3,
        seed=7,
        regions=[Region("a blue truck", (0.0, 0.0, 1.0, 1.0))],
        **SIZE,
    )
    truck, *_ = stock.encode_prompt("a blue truck", do_classifier_free_guidance=False)
    _, _, road_pooled, _ = stock.encode_prompt("a road", do_classifier_free_guidance=False)
    expected = _plain(stock, prompt=None, prompt_embeds=truck, pooled_prompt_embeds=road_pooled)
    image = pipe(layout=layout, output_type="np").images[0]
    # the Layout encodes its prompts as one batch: not bit-identical to one-by-one encoding
    np.testing.assert_allclose(image, expected, atol=1e-5)
    assert np.abs(image - _plain(stock, prompt="a road")).max() > 1e-3


def _capture_first_cross_attention(pipe, layout) -> torch.Tensor:
    """Output of the first attn2 layer on the first denoising step."""
    attn = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2
    captured = []
    handle = attn.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    try:
        pipe(layout=layout, output_type="latent")
    finally:
        handle.remove()
    return captured[0]


# attn2 of the tiny UNet runs at latent/2 = image/4: a 16x24 grid for 64x96 images
GRID = (16, 24)


def _assert_changes_only(before, after, inside):
    assert before.shape == (2, GRID[0] * GRID[1], before.shape[-1])
    changed = (before - after).abs().amax(dim=-1).view(2, *GRID)
    assert not changed[0].any()  # negative half: untouched
    assert (changed[1][inside] > 0).all()
    assert not changed[1][~inside].any()


def test_changing_one_region_prompt_changes_attention_only_inside_its_box(pipe):
    before = _capture_first_cross_attention(pipe, _two_regions())
    after = _capture_first_cross_attention(pipe, _two_regions(car="a green bus"))
    inside = torch.zeros(GRID, dtype=torch.bool)
    inside[4:12, 0:12] = True  # box (0, .25, .5, .75)
    _assert_changes_only(before, after, inside)


def test_a_mask_image_replaces_the_box(pipe, tmp_path):
    # an L shape in 4-pixel steps, so it covers whole attention cells
    pixels = np.zeros((64, 96), dtype=np.uint8)
    pixels[8:40, 0:16] = 255
    pixels[32:40, 16:48] = 255
    mask = tmp_path / "car.png"
    Image.fromarray(pixels).save(mask)
    before = _capture_first_cross_attention(pipe, _two_regions(car_mask=str(mask)))
    after = _capture_first_cross_attention(pipe, _two_regions("a green bus", car_mask=str(mask)))
    inside = torch.zeros(GRID, dtype=torch.bool)
    inside[2:10, 0:4] = True
    inside[8:10, 4:12] = True
    _assert_changes_only(before, after, inside)


def test_zero_weights_and_base_ratio_give_a_finite_image(pipe):
    layout = Layout(
        prompt="a lamp and a chair in a room",
        base_ratio=0.0,
        steps=2,
        regions=[
            Region("a lamp", (0.0, 0.0, 1.0, 1.0), weight=0.0),
            Region("a chair", (0.2, 0.2, 0.4, 0.6)),
        ],
        **SIZE,
    )
    seen = []
    handle = pipe.unet.register_forward_hook(lambda _m, _i, out: seen.append(out[0]))
    try:
        image = pipe(layout=layout, output_type="np").images[0]
    finally:
        handle.remove()
    assert all(torch.isfinite(out).all() for out in seen) and len(seen) == 2
    assert np.isfinite(image).all()


def test_hundred_boxes_with_one_prompt_cost_one_block(pipe):
    regions = [Region("a dog", (0.009 * i, 0.1, 0.009 * i + 0.1, 0.4)) for i in range(100)]
    layout = Layout(prompt="a dog on grass", steps=1, regions=regions, **SIZE)
    lengths = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda _m, args, kwargs: lengths.append(kwargs["encoder_hidden_states"].shape),
        with_kwargs=True,
    )
    try:
        pipe(layout=layout, output_type="latent")
    finally:
        handle.remove()
    # blocks: scene, background "on grass", "a dog"; negative tiled to match
    assert lengths == [torch.Size([2, 3 * 77, 2 * 32])]


def test_deterministic_from_seed_and_sized_from_layout(pipe):
    first = pipe(layout=_two_regions(), output_type="pil").images[0]
    again = pipe(layout=_two_regions(), output_type="pil").images[0]
    other = pipe(layout=_two_regions(seed=8), output_type="pil").images[0]
    assert first.size == (96, 64)
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(other))


def test_cancel_from_callback_clears_the_regional_state(pipe, stock):
    def cancel(_pipe, step, _t, _kwargs):
        raise InterruptedError("cancelled")

    with pytest.raises(InterruptedError):
        pipe(layout=_two_regions(), callback_on_step_end=cancel)
    assert pipe._layout_context.state is None
    assert np.array_equal(_plain(pipe), _plain(stock))


def test_callback_and_latent_overrides_still_work(pipe):
    seen = []

    def record(_pipe, step, _t, kwargs):
        seen.append((step, tuple(kwargs["latents"].shape)))
        return kwargs

    latents = torch.randn(1, 4, 32, 48, generator=torch.Generator().manual_seed(1))
    out = pipe(
        layout=_two_regions(),
        latents=latents,
        callback_on_step_end=record,
        output_type="latent",
    )
    assert seen == [(0, (1, 4, 32, 48)), (1, (1, 4, 32, 48))]
    again = pipe(layout=_two_regions(), latents=latents, output_type="latent")
    assert torch.equal(out.images, again.images)


def test_layout_settings_cannot_be_passed_twice(pipe):
    with pytest.raises(TypeError, match="'prompt'.*come from the Layout"):
        pipe(layout=_two_regions(), prompt="something else")


def test_several_images_per_layout(pipe):
    out = pipe(layout=_two_regions(), num_images_per_prompt=2, output_type="np")
    assert out.images.shape == (2, 64, 96, 3)
    assert np.abs(out.images[0] - out.images[1]).max() > 1e-3


# -- Step hooks (reference pull, per-object strength) run inside the Layout call ---------------


def _flat_png(path, colour, size=(96, 64)) -> str:
    Image.new("RGB", size, colour).save(path)
    return str(path)


def test_reference_guidance_runs_once_inside_the_call_before_the_callback(pipe, tmp_path):
    from engine.steering.hooks import prepare_step_hooks

    reference = _flat_png(tmp_path / "reference.png", (230, 20, 20))
    guided = dataclasses.replace(
        _two_regions(), reference=reference, reference_scale=0.25, reference_fraction=0.5
    )
    seen = []

    def record(_pipe, step, _t, tensors):
        seen.append((step, tensors["latents"].clone()))
        return {}

    out = pipe(layout=guided, callback_on_step_end=record, output_type="latent").images
    # The same hooks applied by hand to a call whose Layout has none gives the same latents.
    generator = torch.Generator("cpu").manual_seed(guided.seed)
    hooks = prepare_step_hooks(pipe, guided, generator)
    by_hand = pipe(
        layout=dataclasses.replace(guided, reference_scale=0.0),
        generator=generator,
        latents=hooks.latents,
        callback_on_step_end=hooks.callback(),
        output_type="latent",
    ).images
    assert torch.equal(out, by_hand)
    assert not torch.equal(out, pipe(layout=_two_regions(), output_type="latent").images)
    # The caller's callback saw the latents after the pull, one call per step.
    assert [step for step, _ in seen] == [0, 1]
    assert torch.equal(seen[-1][1], out)


def test_keep_outside_returns_the_init_image_outside_the_regenerated_region(pipe, tmp_path):
    init = _flat_png(tmp_path / "init.png", (40, 90, 200))
    car, tree = _two_regions().regions
    layout = dataclasses.replace(
        _two_regions(),
        init_image=init,
        strength=0.0,
        keep_outside=True,
        regions=[dataclasses.replace(car, strength=1.0), tree],
    )
    image = np.asarray(pipe(layout=layout, output_type="pil").images[0])
    # The car's box is x 0..48, y 16..48; beyond a band of 2 * 2 px the init image is exact.
    outside = np.ones((64, 96), dtype=bool)
    outside[16 - 4 : 48 + 4, : 48 + 4] = False
    assert (image[outside] == (40, 90, 200)).all()
    assert (image[20:44, 4:44] != (40, 90, 200)).any()
    with pytest.raises(TypeError, match="output_type='pil'"):
        pipe(layout=layout, output_type="latent")
