"""Prompt blocks, per-pixel block weights, attention grids and region masks."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from engine.regional.masks import box_coverage, region_mask
from engine.regional.plan import (
    RegionalState,
    attention_grids,
    downsample_mask,
    grid_for_query,
    plan_regions,
)
from engine.wire.layout import Layout, LayoutError, Region


def test_grids_round_odd_sides_up():
    grids = attention_grids((125, 93))
    assert grids[:4] == [(125, 93), (63, 47), (32, 24), (16, 12)]
    assert grids[-1] == (1, 1)
    assert grid_for_query(63 * 47, (125, 93)) == (63, 47)
    assert grid_for_query(32 * 24, (125, 93)) == (32, 24)
    assert grid_for_query(64 * 64, (128, 128)) == (64, 64)
    assert grid_for_query(32 * 32, (128, 128)) == (32, 32)


def test_unknown_query_length_says_latents_do_not_match():
    with pytest.raises(ValueError, match="do not match the Layout's width and height"):
        grid_for_query(1000, (125, 93))


def test_box_coverage_is_exact_area():
    cov = box_coverage((0.25, 0.0, 0.625, 0.5), 2, 4)
    expected = torch.tensor([[0.0, 1.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(cov, expected)


def test_tiny_region_keeps_one_full_cell_on_every_grid():
    latent = (125, 93)
    box = (0.5, 0.5, 0.51, 0.51)
    peak = box_coverage(box, *latent).max().item()
    assert 0 < peak < 1  # smaller than one latent cell
    for grid in attention_grids(latent)[1:]:
        pooled = downsample_mask(box_coverage((0.5, 0.5, 0.6, 0.52), *latent), grid)
        assert pooled.max() == 1.0
    layout = Layout(prompt="street", regions=[Region("a cat", box)])
    plan = plan_regions(layout, latent)
    assert plan.prompts == ["street", "a cat"]
    for grid, weights in zip(plan.grids, plan.weights, strict=True):
        cat = weights[1]
        assert (cat > 0).sum() >= 1, grid
        assert cat.max().item() == pytest.approx(0.8 * peak, rel=1e-5), grid


def test_downsample_area_average_and_peak():
    mask = torch.zeros(8, 8)
    mask[0:4, 0:4] = 1.0
    pooled = downsample_mask(mask, (4, 4))
    assert torch.equal(pooled[:2, :2], torch.ones(2, 2))
    assert pooled.sum() == 4
    assert torch.equal(downsample_mask(mask, (2, 2)), torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


def test_block_weights_follow_the_formula():
    # latent 4x8: left region covers columns 0-3, right region "a dog" columns 6-7 at weight 0.5
    layout = Layout(
        prompt="a cat and a dog in a park",
        base_ratio=0.25,
        regions=[
            Region("a cat", (0.0, 0.0, 0.5, 1.0)),
            Region("a dog", (0.75, 0.0, 1.0, 1.0), weight=0.5),
        ],
    )
    plan = plan_regions(layout, (4, 8))
    assert plan.prompts == ["a cat and a dog in a park", "in a park", "a cat", "a dog"]
    w = plan.weights[0]
    assert w.shape == (4, 4, 8)
    row = w[:, 0]  # every row is the same
    torch.testing.assert_close(row[0], torch.tensor([0.25] * 4 + [0, 0] + [0.25] * 2))
    torch.testing.assert_close(row[1], torch.tensor([0.0] * 4 + [1, 1] + [0.0] * 2))
    torch.testing.assert_close(row[2], torch.tensor([0.75] * 4 + [0.0] * 4))
    torch.testing.assert_close(row[3], torch.tensor([0.0] * 6 + [0.375] * 2))


def test_background_equal_to_scene_shares_its_block():
    layout = Layout(
        prompt="a beach",
        background_prompt="a beach",
        base_ratio=0.2,
        regions=[Region("a red umbrella", (0.0, 0.0, 0.5, 1.0))],
    )
    plan = plan_regions(layout, (2, 4))
    assert plan.prompts == ["a beach", "a red umbrella"]
    torch.testing.assert_close(plan.weights[0][0, 0], torch.tensor([0.2, 0.2, 1.0, 1.0]))


def test_hundred_regions_with_one_prompt_make_one_block():
    regions = [
        Region("a dog", (0.01 * i, 0.0, 0.01 * i + 0.05, 0.1 + 0.005 * i)) for i in range(100)
    ]
    layout = Layout(prompt="a dog on grass", regions=regions)
    plan = plan_regions(layout, (128, 128))
    assert plan.prompts == ["a dog on grass", "on grass", "a dog"]
    state = RegionalState(plan, block_tokens=77, guided=True)
    assert state.num_tokens == 3 * 77
    # the block's weight is the max over its regions: 0.8 inside any box
    assert plan.weights[0][2].max() == pytest.approx(0.8)


def test_zero_weight_and_zero_base_ratio_leave_no_pixel_without_a_key():
    layout = Layout(
        prompt="a room",
        base_ratio=0.0,
        regions=[Region("a lamp", (0.0, 0.0, 1.0, 1.0), weight=0.0)],
    )
    plan = plan_regions(layout, (8, 8))
    state = RegionalState(plan, block_tokens=3, guided=False)
    for grid in plan.grids:
        bias = state.attention_bias(grid[0] * grid[1], torch.float32, torch.device("cpu"))
        assert torch.isfinite(bias).any(dim=-1).all()
        probs = torch.softmax(bias + torch.randn(bias.shape[-1]), dim=-1)
        assert not probs.isnan().any()
    # the scene prompt took over: it is the only block left
    assert plan.prompts == ["a room"]


def test_fully_covered_canvas_drops_unused_blocks_and_biases_by_log_weight():
    layout = Layout(
        prompt="x",
        base_ratio=0.0,
        regions=[Region("left", (0.0, 0.0, 0.5, 1.0)), Region("right", (0.5, 0.0, 1.0, 1.0))],
    )
    plan = plan_regions(layout, (8, 16))
    assert plan.prompts == ["left", "right"]
    state = RegionalState(plan, block_tokens=2, guided=True)
    bias = state.attention_bias(4 * 8, torch.float16, torch.device("cpu"))
    assert bias.shape == (1, 1, 32, 4) and bias.dtype == torch.float16
    grid = bias[0, 0].view(4, 8, 4)
    assert (grid[:, :4, :2] == 0).all() and (grid[:, :4, 2:] == float("-inf")).all()
    assert (grid[:, 4:, :2] == float("-inf")).all() and (grid[:, 4:, 2:] == 0).all()
    assert state.attention_bias(32, torch.float16, torch.device("cpu")) is bias  # cached
    assert state.unconditional_rows(4) == 2


def _write_png(path, array: np.ndarray) -> str:
    Image.fromarray(array).save(path)
    return os.fspath(path)


def test_mask_image_is_read_resized_and_cached_by_mtime(tmp_path):
    # 32x16 image (latent 16x8 at scale 2); the mask file is half size and marks the top half
    pixels = np.zeros((8, 16), dtype=np.uint8)
    pixels[:4] = 255
    path = _write_png(tmp_path / "mask.png", pixels)
    region = Region("a hat", (0.0, 0.0, 1.0, 1.0), mask=path)
    mask = region_mask(region, 0, (16, 32), (8, 16))
    assert mask.shape == (8, 16)
    assert torch.allclose(mask[:3], torch.ones(3, 16)) and torch.allclose(
        mask[5:], torch.zeros(3, 16)
    )
    assert region_mask(region, 0, (16, 32), (8, 16)) is mask  # cached
    pixels[:] = 0
    _write_png(path, pixels)
    os.utime(path, ns=(1, 1))
    assert region_mask(region, 0, (16, 32), (8, 16)).max() == 0  # reloaded after a change


def test_sixteen_bit_mask_keeps_its_scale(tmp_path):
    pixels = np.full((4, 4), 32768, dtype=np.uint16)
    path = _write_png(tmp_path / "soft.png", pixels)
    mask = region_mask(Region("fog", (0, 0, 1, 1), mask=path), 0, (4, 4), (2, 2))
    torch.testing.assert_close(mask, torch.full((2, 2), 32768 / 65535))


def test_missing_mask_names_the_region(tmp_path):
    region = Region("a hat", (0.0, 0.0, 1.0, 1.0), mask=str(tmp_path / "gone.png"))
    with pytest.raises(LayoutError, match=r"regions\[3\]\.mask.*gone\.png") as info:
        region_mask(region, 3, (16, 16), (8, 8))
    assert info.value.field == "regions[3].mask"


def test_unreadable_mask_says_to_save_a_png(tmp_path):
    path = tmp_path / "bad.png"
    path.write_text("not an image")
    with pytest.raises(LayoutError, match="grayscale PNG"):
        region_mask(Region("a hat", (0, 0, 1, 1), mask=str(path)), 0, (16, 16), (8, 8))


def test_one_mask_file_shared_by_regions_is_read_once(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    path = _write_png(tmp_path / "shared.png", np.full((8, 8), 255, dtype=np.uint8))
    opened = []
    real_open = PILImage.open
    monkeypatch.setattr(PILImage, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    layout = Layout(
        prompt="two lamps",
        regions=[
            Region("a lamp", (0, 0, 1, 1), mask=path),
            Region("a lamp", (0, 0, 1, 1), mask=path),
        ],
        width=64,
        height=64,
    )
    plan_regions(layout, (8, 8))
    plan_regions(layout, (8, 8))
    assert opened == [path]


def _plan_by_loop(layout: Layout, latent: tuple[int, int]) -> list[torch.Tensor]:
    """Block weights as the planner computed them region by region (the reference)."""
    from engine.regional.plan import combine_block_weights, prompt_blocks

    prompts, blocks = prompt_blocks(layout)
    weights = []
    for grid in attention_grids(latent):
        coverage, regional = torch.zeros(grid), torch.zeros((len(prompts), *grid))
        for i, (region, block) in enumerate(zip(layout.regions, blocks, strict=True)):
            mask = region_mask(region, i, (layout.height, layout.width), latent)
            if not mask.any():
                continue
            pooled = downsample_mask(mask, grid)
            coverage = torch.maximum(coverage, pooled)
            regional[block] = torch.maximum(regional[block], region.weight * pooled)
        weights.append(combine_block_weights(layout, regional, coverage))
    return weights


def test_planning_all_regions_at_once_matches_region_by_region(tmp_path):
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(150, 2, 2, generator=generator).sort(dim=1).values
    regions = [
        Region(f"object {i % 70}", (x0, y0, x1, y1), weight=0.3 + (i % 5) / 5)
        for i, ((x0, y0), (x1, y1)) in enumerate(corners.tolist())
    ]
    pixels = np.zeros((42, 60), dtype=np.uint8)  # another size, the image's aspect ratio
    pixels[5:20, 10:30] = 200
    regions[3] = Region(
        "a masked object", (0, 0, 1, 1), mask=_write_png(tmp_path / "m.png", pixels)
    )
    regions[7] = Region("hidden", (0.2, 0.2, 0.2, 0.2))  # empty box: places nothing
    layout = Layout(prompt="a crowd", base_ratio=0.3, regions=regions, width=80, height=56)
    latent = (28, 40)
    plan = plan_regions(layout, latent)
    reference = _plan_by_loop(layout, latent)
    assert "hidden" not in plan.prompts
    assert len(plan.weights) == len(reference)
    from engine.regional.plan import prompt_blocks

    keep = [prompt_blocks(layout)[0].index(p) for p in plan.prompts]
    for got, expected in zip(plan.weights, reference, strict=True):
        # Boxes are pooled as rows and columns: equal up to float rounding.
        torch.testing.assert_close(got, expected[keep], rtol=1e-5, atol=1e-6)
        assert torch.equal(got > 0, expected[keep] > 0)


def test_box_coverages_equal_box_coverage():
    from engine.regional.plan import box_coverages

    boxes = [(0.1, 0.2, 0.35, 0.9), (0.0, 0.0, 1.0, 1.0), (0.333, 0.5, 0.334, 0.52)]
    stacked = box_coverages(boxes, 13, 7)
    for box, coverage in zip(boxes, stacked, strict=True):
        assert torch.equal(coverage, box_coverage(box, 13, 7))


def test_cross_attention_grids_follow_the_unet_config():
    from engine.regional.plan import cross_attention_grids

    sdxl = {
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
    }
    assert cross_attention_grids(sdxl, (128, 128)) == [(64, 64), (32, 32)]
    assert cross_attention_grids(sdxl, (125, 93)) == [(63, 47), (32, 24)]
    sd15 = {
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
    }
    assert cross_attention_grids(sd15, (64, 64)) == [(64, 64), (32, 32), (16, 16), (8, 8)]


def test_plan_on_the_unet_grids_only():
    layout = Layout(prompt="a street", regions=[Region("a cat", (0.1, 0.1, 0.4, 0.5))])
    plan = plan_regions(layout, (128, 128), grids=[(64, 64), (32, 32)])
    full = plan_regions(layout, (128, 128))
    assert plan.grids == [(64, 64), (32, 32)]
    assert torch.equal(plan.weights_for_query(32 * 32), full.weights_for_query(32 * 32))
    with pytest.raises(ValueError, match="does not weigh"):
        plan.weights_for_query(16 * 16)


def test_mask_cache_is_bounded_by_bytes_not_entries(tmp_path, monkeypatch):
    from engine.regional import masks

    masks._load_mask.cache_clear()
    paths = []
    for i in range(300):  # more masks than the old 256-entry cache held
        pixels = np.zeros((16, 16), dtype=np.uint8)
        pixels[i % 16, :] = 255
        paths.append(_write_png(tmp_path / f"mask{i}.png", pixels))
    regions = [Region(f"object {i}", (0, 0, 1, 1), mask=p) for i, p in enumerate(paths)]
    layout = Layout(prompt="shelf", regions=regions, width=16, height=16)
    plan_regions(layout, (8, 8))
    assert masks._load_mask.cache_info()["misses"] == 300
    plan_regions(layout, (8, 8))
    info = masks._load_mask.cache_info()
    assert info["hits"] == 300 and info["misses"] == 300
    assert info["bytes"] == 300 * 8 * 8 * 4
    # Beyond the budget the least recently used are dropped.
    monkeypatch.setattr(masks._load_mask, "max_bytes", 100 * 8 * 8 * 4)
    masks._load_mask.cache_clear()
    plan_regions(layout, (8, 8))
    info = masks._load_mask.cache_info()
    assert info["entries"] == 100 and info["bytes"] <= 100 * 8 * 8 * 4
    masks._load_mask.cache_clear()
