"""Latent mode: per-block UNet calls blended by feathered masks (tiny SDXL model, CPU)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from serve_client import EngineClient

from engine.pipeline import RegionalSDXLPipeline
from engine.regional.latent import (
    CropPolicy,
    LatentBlock,
    LatentPlan,
    LatentRegionalUNet,
    choose_crop,
    feather,
    latent_block_weights,
    plan_latent_regions,
)
from engine.wire.layout import Layout, Region

SIDE = 64
LATENT = (SIDE // 2, SIDE // 2)  # the tiny VAE downsamples by 2
SMALL_CROPS = CropPolicy(margin=4, min_side=8)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    pipe = RegionalSDXLPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def two_regions(car: str = "a red car", **overrides) -> Layout:
    settings = dict(
        prompt="a red car and a tree on a road",
        # fixed, so that renaming a region does not change what the background sees
        background_prompt="a road",
        negative_prompt="blurry",
        mode="latent",
        width=SIDE,
        height=SIDE,
        steps=2,
        seed=7,
        regions=[
            Region(car, (0.125, 0.125, 0.375, 0.375)),
            Region("a tree", (0.5, 0.5, 1.0, 1.0)),
        ],
    )
    settings.update(overrides)
    return Layout(**settings)


def first_prediction(pipe, layout: Layout, crops: CropPolicy | None) -> torch.Tensor:
    """The blended UNet output of the first step, ``(2, 4, h, w)``: negative, positive."""
    pipe.latent_crops = crops
    outputs = []
    handle = pipe.unet.register_forward_hook(
        lambda _m, _a, _k, out: outputs.append(out[0].clone()), with_kwargs=True
    )
    try:
        pipe(layout=dataclasses.replace(layout, steps=1), output_type="latent")
    finally:
        handle.remove()
        pipe.latent_crops = RegionalSDXLPipeline.latent_crops
    return outputs[0]


# -- Weights and crops --------------------------------------------------------------------------


def test_feathered_weights_sum_to_one_and_stop_where_the_blur_stops():
    layout = two_regions(base_ratio=0.2)
    prompts, weights = latent_block_weights(layout, LATENT, sigma=1.0)
    assert prompts == ["a red car and a tree on a road", "a road", "a red car", "a tree"]
    torch.testing.assert_close(weights.sum(dim=0), torch.ones(LATENT), atol=1e-6, rtol=0)
    car = weights[2]
    # The car's box is latent rows/cols 4..11; grown by 2, blurred over 2 more: 0..15.
    support = car > 0
    rows = support.any(dim=1).nonzero().flatten()
    assert (int(rows[0]), int(rows[-1])) == (0, 15)
    # Inside the box, up to its edge: 1 - base_ratio, the scene prompt has the rest.
    assert car[4:12, 4:12].eq(0.8).all()
    assert weights[0][4:12, 4:12].eq(0.2).all()
    assert weights[1][4:12, 4:12].eq(0).all()
    assert 0 < car[3, 8] < 0.8 and 0 < car[14, 8] < car[13, 8] < car[12, 8] < 0.8
    assert weights[1][20, 2] == 1.0 and car[20, 2] == 0.0  # far outside: background only


def test_identical_region_prompts_share_one_block_with_the_union_of_their_masks():
    layout = two_regions(
        regions=[Region("a dog", (0, 0, 0.25, 0.25)), Region(" a dog ", (0.75, 0.75, 1, 1))],
        base_ratio=0.0,
    )
    prompts, weights = latent_block_weights(layout, LATENT)
    assert prompts == ["a road", "a dog"]  # the scene block has no weight left: dropped
    assert weights[1][0, 0] == 1.0 and weights[1][31, 31] == 1.0 and weights[1][16, 16] == 0.0


def test_feather_of_a_full_canvas_mask_is_exactly_one():
    assert torch.equal(feather(torch.ones(9, 13)), torch.ones(9, 13))


def test_crop_is_the_support_plus_margin_grown_and_aligned():
    weight = torch.zeros(32, 48)
    weight[10:14, 40:44] = 1.0
    policy = CropPolicy(margin=3, min_side=12, max_fraction=0.5)
    # rows: 10..14 -> margin 7..17 -> min side 12: 6..18 -> multiple 4: 4..20
    # cols: 40..44 -> margin 37..47 -> min side: 36..48 (slid back from the border) -> 36..48
    assert choose_crop(weight, 4, policy) == (4, 36, 20, 48)
    weight[0:30, 0:30] = 1.0
    assert choose_crop(weight, 4, policy) is None  # more than half the canvas: no crop
    whole = CropPolicy(margin=0, min_side=0, max_fraction=1.0)
    assert choose_crop(torch.ones(32, 48), 4, whole) is None  # the canvas is no crop


def test_calls_and_cost_follow_the_blocks():
    def block(crop):
        return LatentBlock("x", torch.zeros(LATENT), crop)

    plan = LatentPlan([block(None), block(None), block((0, 0, 16, 16)), block(None)], LATENT)
    assert plan.calls(guided=True) == [[None, 0], [1, 3], [2]]
    assert plan.calls(guided=False) == [[0, 1], [3], [2]]
    assert plan.relative_cost(guided=True) == pytest.approx((1 + 3 + 0.25) / 2)
    assert plan.relative_cost(guided=False) == pytest.approx(3.25)


def test_crop_time_ids_say_where_the_crop_is_in_pixels():
    plan = LatentPlan([], (128, 96))  # a 1024x768 SDXL image
    stand_in = LatentRegionalUNet(lambda *a, **k: None, plan, torch.zeros(0), torch.zeros(0), True)
    ids = torch.tensor([[1024.0, 768.0, 0.0, 0.0, 1024.0, 768.0]] * 2)
    cropped = stand_in._crop_time_ids(ids, (16, 32, 80, 96))
    assert cropped.tolist() == [[1024.0, 768.0, 128.0, 256.0, 512.0, 512.0]] * 2


def test_only_a_cropped_block_gets_its_own_pooled_embedding():
    plan = LatentPlan(
        [
            LatentBlock("whole", torch.ones(LATENT), None),
            LatentBlock("small", torch.ones(LATENT), (0, 0, 16, 16)),
        ],
        LATENT,
    )
    embeds, pooled = torch.randn(2, 77, 8), torch.randn(2, 4)
    stand_in = LatentRegionalUNet(lambda *a, **k: None, plan, embeds, pooled, guided=False)
    scene = torch.randn(1, 4)
    context = {
        "encoder_hidden_states": torch.zeros(1, 77, 8),
        "added_cond_kwargs": {"text_embeds": scene, "time_ids": torch.ones(1, 6) * 64},
    }
    sample, rows = torch.zeros(1, 4, *LATENT), torch.arange(1)
    for block, crop, expected in ((0, None, scene), (1, (0, 0, 16, 16), pooled[1:2])):
        _, _, kwargs = stand_in._inputs(sample, torch.tensor(1), context, rows, block, crop)
        assert torch.equal(kwargs["encoder_hidden_states"], embeds[block : block + 1])
        assert torch.equal(kwargs["added_cond_kwargs"]["text_embeds"], expected)


def test_residuals_crop_at_every_level_of_an_odd_latent():
    plan = LatentPlan([], (125, 93))
    stand_in = LatentRegionalUNet(lambda *a, **k: None, plan, torch.zeros(0), torch.zeros(0), True)
    crop = (64, 0, 125, 48)  # offsets multiples of 4, bottom on the canvas edge
    shapes = []
    for factor, size in [(1, (125, 93)), (2, (63, 47)), (4, (32, 24))]:
        residual = torch.arange(size[0] * size[1]).view(1, 1, *size)
        piece = stand_in._crop_residual(residual, crop)
        shapes.append(tuple(piece.shape[-2:]))
        assert piece[0, 0, 0, 0] == residual[0, 0, 64 // factor, 0]
    assert shapes == [(61, 48), (31, 24), (16, 12)]


# -- Through the pipeline -------------------------------------------------------------------------


def test_full_canvas_region_with_the_scene_prompt_is_the_plain_image(pipe, tiny_model_dir):
    stock = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir)
    stock.set_progress_bar_config(disable=True)
    expected = stock(
        prompt="a red car on a road",
        negative_prompt="blurry",
        num_inference_steps=3,
        guidance_scale=6.0,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="np",
        width=SIDE,
        height=SIDE,
    ).images[0]
    layout = Layout(
        prompt="a red car on a road",
        negative_prompt="blurry",
        mode="latent",
        steps=3,
        seed=7,
        width=SIDE,
        height=SIDE,
        regions=[Region("a red car on a road", (0.0, 0.0, 1.0, 1.0))],
    )
    image = pipe(layout=layout, output_type="np").images[0]
    np.testing.assert_allclose(image, expected, atol=1e-6)


def test_a_full_canvas_region_uses_its_prompt_with_the_scenes_pooled_embedding(
    pipe, tiny_model_dir
):
    stock = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir)
    stock.set_progress_bar_config(disable=True)
    truck, _, _, _ = stock.encode_prompt("a blue truck", do_classifier_free_guidance=False)
    _, _, road_pooled, _ = stock.encode_prompt("a road", do_classifier_free_guidance=False)
    # The global conditioning of a whole-canvas call describes the canvas: the scene.
    expected = stock(
        prompt_embeds=truck,
        pooled_prompt_embeds=road_pooled,
        num_inference_steps=2,
        guidance_scale=6.0,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="np",
        width=SIDE,
        height=SIDE,
    ).images[0]
    layout = Layout(
        prompt="a road",
        base_ratio=0.0,
        mode="latent",
        steps=2,
        seed=7,
        width=SIDE,
        height=SIDE,
        regions=[Region("a blue truck", (0.0, 0.0, 1.0, 1.0))],
    )
    image = pipe(layout=layout, output_type="np").images[0]
    # the Layout encodes its prompts as one batch: not bit-identical to one-by-one encoding
    np.testing.assert_allclose(image, expected, atol=1e-5)


def test_each_image_of_a_batch_is_its_own_single_image_run(pipe):
    layout = two_regions()
    noise = torch.randn(2, 4, *LATENT, generator=torch.Generator().manual_seed(1))
    pipe.latent_crops = SMALL_CROPS
    try:
        both = pipe(layout=layout, latents=noise, num_images_per_prompt=2, output_type="latent")
        first = pipe(layout=layout, latents=noise[:1], output_type="latent")
        second = pipe(layout=layout, latents=noise[1:], output_type="latent")
    finally:
        pipe.latent_crops = RegionalSDXLPipeline.latent_crops
    torch.testing.assert_close(both.images[:1], first.images, atol=1e-4, rtol=0)
    torch.testing.assert_close(both.images[1:], second.images, atol=1e-4, rtol=0)
    assert (first.images - second.images).abs().max() > 0.1


def test_a_region_prompt_changes_the_prediction_only_inside_its_feathered_mask(pipe):
    for crops in (None, SMALL_CROPS):
        car = first_prediction(pipe, two_regions(), crops)
        bus = first_prediction(pipe, two_regions(car="a blue bus"), crops)
        _, weights = latent_block_weights(two_regions(), LATENT)
        support = weights[2] > 0
        changed = (car != bus).any(dim=1)[1]  # positive row, any channel
        assert changed.any()
        assert not changed[~support].any(), "the prediction changed outside the car's mask"
        assert torch.equal(car[0], bus[0])  # the negative prompt's row never sees regions


def test_crops_match_uncropped_calls_inside_the_support(pipe):
    layout = two_regions()
    full = first_prediction(pipe, layout, None)[1]
    errors = {}
    for margin in (2, 8, 12):
        policy = CropPolicy(margin=margin, min_side=8, max_fraction=0.9)
        plan = plan_latent_regions(layout, LATENT, multiple=2, crops=policy)
        car = plan.blocks[plan.prompts.index("a red car")]
        # support rows/cols 0..15 (the canvas corner), plus the margin, rounded up to even
        assert car.crop == (0, 0, 16 + margin, 16 + margin)
        support = car.weight > 0
        cropped = first_prediction(pipe, layout, policy)[1]
        errors[margin] = float((cropped - full)[:, support].norm() / full[:, support].norm())
    # A crop sees less context (group norms, self-attention): close, closer with more margin.
    assert 0 < errors[12] < errors[8] < errors[2]
    assert errors[8] < 0.1
    other_seed = first_prediction(pipe, dataclasses.replace(layout, seed=8), None)[1]
    assert float((other_seed - full)[:, support].norm() / full[:, support].norm()) > 0.5


def test_unet_runs_the_planned_calls_and_gets_its_forward_back(pipe):
    layout = two_regions(base_ratio=0.2, steps=2)
    plan = plan_latent_regions(layout, LATENT, multiple=2, crops=SMALL_CROPS)
    assert plan.calls(guided=True) == [[None, 0], [1, 3], [2]]
    seen = []
    forward = pipe.unet.forward

    def counting(sample, *args, **kwargs):
        seen.append((sample.shape[0], *sample.shape[-2:]))
        return forward(sample, *args, **kwargs)

    pipe.unet.forward = counting  # stands for a device-offloading wrapper
    pipe.latent_crops = SMALL_CROPS
    try:
        pipe(layout=layout, output_type="latent")
        assert pipe.unet.forward is counting

        def stop(*_):
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            pipe(layout=layout, output_type="latent", callback_on_step_end=stop)
        assert pipe.unet.forward is counting
    finally:
        del pipe.unet.forward
        pipe.latent_crops = RegionalSDXLPipeline.latent_crops
    top, left, bottom, right = plan.blocks[2].crop
    per_step = [(2, *LATENT), (2, *LATENT), (1, bottom - top, right - left)]
    assert seen[:6] == per_step * 2
    assert "forward" not in pipe.unet.__dict__


def test_mismatched_latents_are_refused_with_the_sizes(pipe):
    wrong = torch.zeros(1, 4, 16, 16)
    with pytest.raises(ValueError, match="16x16 do not match the Layout's 32x32"):
        pipe(layout=two_regions(), latents=wrong, output_type="latent")
    assert "forward" not in pipe.unet.__dict__


def test_latent_layout_generates_through_serve(tiny_model_dir, tmp_path):
    client = EngineClient("--device", "cpu", stderr_path=tmp_path / "stderr.log")
    try:
        hello = client.request({"op": "hello", "id": "h"}, timeout=120)
        assert "latent" in hello["capabilities"]
        out = str(tmp_path / "latent.png")
        data = two_regions().to_dict()
        reply = client.request(
            {"op": "generate", "id": "g", "model": tiny_model_dir, "layout": data, "out": out},
            timeout=300,
        )
        assert reply["event"] == "result", reply
        from engine.service.provenance import layout_from_png

        assert layout_from_png(out).mode == "latent"
    finally:
        client.close()
    assert client.stray_lines == []


# -- With a depth ControlNet and an IP-Adapter, loaded through the engine's loader -----------------


def test_controlnet_residuals_reach_each_block_cut_to_its_crop(
    tiny_model_dir, tiny_controlnet_dir, condition_images
):
    from engine.conditions.apply import layout_conditions
    from engine.loading.assemble import PipelineCache
    from engine.loading.locate import LoadOptions

    options = LoadOptions(device="cpu", controlnet=tiny_controlnet_dir)
    pipe, _ = PipelineCache().get(tiny_model_dir, options)
    layout = dataclasses.replace(two_regions(), depth=condition_images["depth"], steps=1)
    outer, inner = [], []

    def spy(_module, _args, kwargs):  # after the ControlNet's hook: the whole canvas
        outer.append([*kwargs["down_block_additional_residuals"]])

    forward = pipe.unet.forward

    def record(sample, *args, **kwargs):
        inner.append((sample.shape, kwargs.get("down_block_additional_residuals")))
        return forward(sample, *args, **kwargs)

    pipe.latent_crops = SMALL_CROPS
    pipe.unet.forward = record
    try:
        with layout_conditions(pipe, layout) as extra:
            handle = pipe.unet.register_forward_pre_hook(spy, with_kwargs=True)
            try:
                controlled = pipe(layout=layout, output_type="latent", **extra).images
            finally:
                handle.remove()
        plain = pipe(layout=dataclasses.replace(layout, depth=None), output_type="latent").images
    finally:
        del pipe.unet.forward
        pipe.latent_crops = RegionalSDXLPipeline.latent_crops
    (full,) = outer  # one step: the ControlNet ran once, on the whole canvas
    top, left, bottom, right = (0, 0, 20, 20)  # the car's crop, as above
    cropped = [cut for shape, cut in inner if cut is not None and tuple(shape[-2:]) == (20, 20)]
    assert len(cropped) == 1
    for whole, cut in zip(full, cropped[0], strict=True):
        factor = LATENT[0] // whole.shape[-2]
        window = whole[1:, :, top // factor : bottom // factor, left // factor : right // factor]
        assert torch.equal(cut, window)  # the positive row, cut to the crop
    assert not torch.equal(controlled, plain)


def test_region_images_run_uncropped_in_latent_mode(
    tiny_model_dir, tiny_ip_adapter_dir, condition_images
):
    from engine.conditions.apply import layout_conditions
    from engine.loading.assemble import PipelineCache
    from engine.loading.locate import LoadOptions

    options = LoadOptions(device="cpu", ip_adapter=tiny_ip_adapter_dir)
    pipe, _ = PipelineCache().get(tiny_model_dir, options)
    layout = two_regions(steps=1)
    car = dataclasses.replace(layout.regions[0], image=condition_images["reference"])
    layout = dataclasses.replace(layout, regions=[car, layout.regions[1]])
    sizes = []
    forward = pipe.unet.forward

    def record(sample, *args, **kwargs):
        sizes.append(tuple(sample.shape[-2:]))
        return forward(sample, *args, **kwargs)

    pipe.latent_crops = SMALL_CROPS
    pipe.unet.forward = record
    try:
        with layout_conditions(pipe, layout) as extra:
            with_image = pipe(layout=layout, output_type="latent", **extra).images
        # The pipeline applies the conditions itself when the caller does not.
        assert torch.equal(pipe(layout=layout, output_type="latent").images, with_image)
        without = dataclasses.replace(layout, regions=two_regions().regions)
        with layout_conditions(pipe, without) as extra:
            plain = pipe(layout=without, output_type="latent", **extra).images
    finally:
        del pipe.unet.forward
        pipe.latent_crops = RegionalSDXLPipeline.latent_crops
    assert set(sizes) == {LATENT}
    assert not torch.equal(with_image, plain)
