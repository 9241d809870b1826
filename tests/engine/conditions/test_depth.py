"""Depth ControlNet: per-region scale maps, residual masking, and its effect on generation."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel

from engine.conditions.apply import layout_conditions
from engine.conditions.depth import (
    active_at,
    depth_control,
    depth_scale_map,
    load_depth,
    residual_multipliers,
)
from engine.errors import ModelNotFoundError, UnsupportedModelError
from engine.loading.assemble import PipelineCache, attach_controlnet
from engine.loading.locate import LoadOptions, resolve_controlnet
from engine.regional.attention import RegionalAttnProcessor
from engine.wire.layout import Layout

LEFT, TOP_RIGHT = [0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 0.5]


def make_layout(depth: str | None = None, **overrides) -> Layout:
    data = {
        "prompt": "a red car and a tree on grey",
        "width": 64,
        "height": 64,
        "steps": 2,
        "seed": 3,
        "depth": depth,
        "regions": [
            {"prompt": "a red car", "box": LEFT},
            {"prompt": "a tree", "box": TOP_RIGHT},
        ],
    }
    data.update(overrides)
    return Layout.from_dict(data)


def with_region_scales(layout: Layout, *scales: float | None) -> Layout:
    regions = [
        dataclasses.replace(r, depth_scale=s) for r, s in zip(layout.regions, scales, strict=True)
    ]
    return dataclasses.replace(layout, regions=regions)


# -- Pure functions -----------------------------------------------------------------------------


def test_scale_map_is_uniform_when_no_region_sets_a_scale():
    assert depth_scale_map(make_layout(), (32, 32)) is None


def test_scale_map_takes_each_regions_scale_inside_its_mask():
    layout = with_region_scales(make_layout(depth_scale=0.5), 0.0, 2.0)
    scale = depth_scale_map(layout, (32, 32))
    assert torch.equal(scale[:, :16], torch.zeros(32, 16))
    assert torch.equal(scale[:16, 16:], torch.full((16, 16), 2.0))
    assert torch.equal(scale[16:, 16:], torch.full((16, 16), 0.5))


def test_residual_multipliers_are_zero_wherever_a_scale_zero_region_covers_the_cell():
    layout = with_region_scales(make_layout(), 0.0, None)
    shapes = [(32, 32), (16, 16), (8, 8), (3, 5)]
    multipliers = residual_multipliers(depth_scale_map(layout, (32, 32)), shapes)
    assert [tuple(m.shape) for m in multipliers] == [(1, 1, *s) for s in shapes]
    for m in multipliers[:3]:
        half = m.shape[-1] // 2
        assert torch.equal(m[..., :half], torch.zeros_like(m[..., :half]))
        assert torch.equal(m[..., half:], torch.ones_like(m[..., half:]))
    # 5 columns over 32 pixels: column 2 straddles the region's edge and blends 0 and 1.
    odd = multipliers[3][0, 0]
    assert odd[:, :2].eq(0).all() and odd[:, 3:].eq(1).all()
    assert 0 < odd[0, 2] < 1


def test_active_steps_follow_start_and_end_fractions():
    assert [active_at(i, 4, 0.25, 0.75) for i in range(4)] == [False, True, True, False]
    assert [active_at(i, 4, 0.0, 1.0) for i in range(4)] == [True] * 4


def test_depth_keeps_16_bit_precision_and_near_is_white(condition_images):
    depth = load_depth(condition_images["depth"], (64, 64))
    assert depth.shape == (1, 3, 64, 64) and depth.dtype == torch.float32
    row = depth[0, 0, 0]
    assert row[0] == 0.0 and row[-1] == 1.0
    # Steps of 1/63 survive; 8 bits would round them to multiples of 1/255.
    assert torch.allclose(row[1], torch.tensor(1040 / 65535), atol=1e-6)


# -- With the tiny models, loaded through the engine's loader ------------------------------------


@pytest.fixture(scope="module")
def cache():
    return PipelineCache()


def generate(pipe, layout: Layout) -> np.ndarray:
    return pipe(layout=layout, output_type="np").images[0]


def test_depth_changes_the_image_and_zero_scale_reproduces_no_controlnet(
    cache, tiny_model_dir, tiny_controlnet_dir, condition_images
):
    layout = make_layout(condition_images["depth"])
    pipe, _ = cache.get(tiny_model_dir, LoadOptions(device="cpu"))
    assert getattr(pipe, "depth_controlnet", None) is None
    plain = generate(pipe, layout)

    same, load_seconds = cache.get(
        tiny_model_dir, LoadOptions(device="cpu", controlnet=tiny_controlnet_dir)
    )
    assert same is pipe and load_seconds > 0, "attaching a ControlNet keeps the base model"
    assert pipe.depth_controlnet is not None
    controlled = generate(pipe, layout)
    off = generate(pipe, dataclasses.replace(layout, depth_scale=0.0))

    assert np.array_equal(off, plain)
    assert np.abs(controlled - plain).max() > 1e-3


def residuals_seen_by_unet(
    pipe, layout: Layout, monkeypatch, processors: list | None = None
) -> list[list | None]:
    """Per UNet call, the ControlNet residuals it received (down ..., mid), or None.

    ``processors``, if given, receives the ControlNet's cross-attention processors as they
    were during each UNet call."""
    seen: list = []
    forward = pipe.unet.forward

    def spy(*args, **kwargs):
        # The UNet's forward runs after every pre-hook: it sees what the ControlNet passed on.
        down = kwargs.get("down_block_additional_residuals")
        mid = kwargs.get("mid_block_additional_residual")
        seen.append(None if down is None else [*down, mid])
        if processors is not None:
            controlnet = pipe.depth_controlnet.attn_processors
            processors.extend(p for n, p in controlnet.items() if "attn2" in n)
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", spy)
    pipe(layout=layout, output_type="latent")
    monkeypatch.undo()
    return seen


def test_region_with_scale_zero_gets_zero_residuals_at_every_resolution(
    cache, tiny_model_dir, tiny_controlnet_dir, condition_images, monkeypatch
):
    pipe, _ = cache.get(tiny_model_dir, LoadOptions(device="cpu", controlnet=tiny_controlnet_dir))
    layout = with_region_scales(make_layout(condition_images["depth"]), 0.0, None)
    during: list = []
    seen = residuals_seen_by_unet(pipe, layout, monkeypatch, during)
    assert len(seen) == 2 and all(s is not None for s in seen)
    sizes = set()
    for residual in seen[0]:
        half = residual.shape[-1] // 2
        sizes.add(residual.shape[-1])
        assert residual[..., :half].abs().max() == 0, "the car region must get no depth control"
        assert residual[..., half:].abs().max() > 0
    assert sizes == {32, 16}, "latent and latent/2 residuals of the tiny UNet"
    # The ControlNet reads each region's prompt inside its mask, like the UNet, during the
    # call; after it, its processors are diffusers' again.
    assert during and all(isinstance(p, RegionalAttnProcessor) for p in during)
    after = [p for n, p in pipe.depth_controlnet.attn_processors.items() if "attn2" in n]
    assert after and not any(isinstance(p, RegionalAttnProcessor) for p in after)


def test_depth_acts_only_between_start_and_end(
    cache, tiny_model_dir, tiny_controlnet_dir, condition_images, monkeypatch
):
    pipe, _ = cache.get(tiny_model_dir, LoadOptions(device="cpu", controlnet=tiny_controlnet_dir))
    layout = make_layout(condition_images["depth"], steps=4, depth_start=0.5)
    seen = residuals_seen_by_unet(pipe, layout, monkeypatch)
    assert [s is not None for s in seen] == [False, False, True, True]


def test_without_depth_map_the_controlnet_does_not_run(cache, tiny_model_dir, tiny_controlnet_dir):
    pipe, _ = cache.get(tiny_model_dir, LoadOptions(device="cpu", controlnet=tiny_controlnet_dir))
    with depth_control(pipe, make_layout()) as hook:
        assert hook is None


# -- Finding ControlNets ------------------------------------------------------------------------


def test_missing_controlnet_says_how_to_get_one(tmp_path):
    with pytest.raises(ModelNotFoundError, match="hf download") as info:
        resolve_controlnet(str(tmp_path / "no-such-controlnet"))
    assert info.value.field == "controlnet"


def test_folder_without_config_is_not_a_controlnet(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_controlnet(str(tmp_path))


def test_controlnet_of_another_base_model_is_refused(cache, tiny_model_dir, tmp_path):
    from diffusers import ControlNetModel, UNet2DConditionModel
    from tiny import tiny_unet

    config = {**tiny_unet().config, "cross_attention_dim": 32}
    other = ControlNetModel.from_unet(
        UNet2DConditionModel.from_config(config), conditioning_embedding_out_channels=(16, 32)
    )
    other.save_pretrained(tmp_path / "sd15-like")
    pipe, _ = cache.get(tiny_model_dir, LoadOptions(device="cpu"))
    with pytest.raises(UnsupportedModelError, match="cross_attention_dim is 32") as info:
        attach_controlnet(pipe, resolve_controlnet(str(tmp_path / "sd15-like")))
    assert info.value.field == "controlnet"
    assert pipe.depth_controlnet is None


def test_unet_calls_on_other_latent_sizes_pass_through(
    cache, tiny_model_dir, tiny_controlnet_dir, condition_images
):
    """A low-resolution first pass inside a Layout call gets no full-size depth residuals."""
    pipe, _ = cache.get(tiny_model_dir, LoadOptions(device="cpu", controlnet=tiny_controlnet_dir))
    with depth_control(pipe, make_layout(condition_images["depth"])) as hook:
        assert hook is not None and hook.latent_size == (32, 32)
        small = torch.zeros(2, 4, 16, 16)
        assert hook(pipe.unet, (small, torch.tensor(999)), {}) is None


def test_single_file_controlnet_loads_with_the_config_beside_it(
    cache, tiny_model_dir, tiny_controlnet_dir, tmp_path, monkeypatch
):
    import shutil

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    weights = tmp_path / "depth-xl.safetensors"
    shutil.copy(os.path.join(tiny_controlnet_dir, "diffusion_pytorch_model.safetensors"), weights)
    alone = resolve_controlnet(str(weights))
    assert (alone.kind, alone.path) == ("single_file", str(weights))
    pipe, _ = cache.get(tiny_model_dir, LoadOptions(device="cpu"))
    with pytest.raises(ModelNotFoundError, match="config.json next to the file"):
        attach_controlnet(pipe, alone)

    shutil.copy(os.path.join(tiny_controlnet_dir, "config.json"), tmp_path / "config.json")
    assert attach_controlnet(pipe, alone) is True
    folder = ControlNetModel.from_pretrained(tiny_controlnet_dir)
    single = pipe.depth_controlnet.state_dict()
    assert all(torch.equal(single[k], v) for k, v in folder.state_dict().items())
    attach_controlnet(pipe, None)


def test_a_call_wrapped_in_layout_conditions_again_gets_depth_once(
    cache, tiny_model_dir, tiny_controlnet_dir, condition_images
):
    pipe, _ = cache.get(tiny_model_dir, LoadOptions(device="cpu", controlnet=tiny_controlnet_dir))
    layout = make_layout(condition_images["depth"])
    direct = generate(pipe, layout)
    runs = []
    counter = pipe.depth_controlnet.register_forward_hook(lambda *_: runs.append(1))
    try:
        with layout_conditions(pipe, layout) as extra:
            wrapped = pipe(layout=layout, output_type="np", **extra).images[0]
    finally:
        counter.remove()
    assert np.array_equal(wrapped, direct)
    assert len(runs) == layout.steps, "one ControlNet run per step, not one per wrapper"
    assert not pipe.unet._forward_pre_hooks
