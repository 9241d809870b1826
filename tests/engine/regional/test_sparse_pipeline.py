"""Attention mode end to end on the tiny SDXL model: sparse against the dense reference, the
blends, what a call keeps, and encoded prompts kept across calls."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from engine.pipeline import RegionalSDXLPipeline
from engine.wire.layout import Layout, Region

LAYER = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    pipe = RegionalSDXLPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def soft_mask(tmp_path_factory) -> str:
    pixels = np.zeros((64, 96), dtype=np.uint8)
    pixels[10:40, 20:70] = 255
    pixels[40:50, 20:70] = 90
    path = tmp_path_factory.mktemp("masks") / "soft.png"
    Image.fromarray(pixels).save(path)
    return str(path)


def _layouts(mask: str) -> dict[str, Layout]:
    size = dict(width=96, height=64, steps=2, seed=5, negative_prompt="blurry")
    return {
        "two regions": Layout(
            prompt="a red car and a tree on a road",
            regions=[Region("a red car", (0, 0.25, 0.5, 0.75)), Region("a tree", (0.75, 0, 1, 1))],
            **size,
        ),
        "overlaps, weights and a mask": Layout(
            prompt="a market",
            base_ratio=0.35,
            regions=[
                Region(
                    f"stall {i % 4}",
                    (0.1 * i, 0.08 * i, 0.1 * i + 0.4, 0.08 * i + 0.45),
                    weight=0.4 + i / 10,
                )
                for i in range(7)
            ]
            + [Region("an awning", (0, 0, 1, 1), mask=mask)],
            **size,
        ),
        "30 boxes, one prompt": Layout(
            prompt="apples on a table",
            regions=[
                Region(
                    "an apple", ((i % 6) / 6, (i // 6) / 5, (i % 6) / 6 + 0.12, (i // 6) / 5 + 0.15)
                )
                for i in range(30)
            ],
            **size,
        ),
    }


def _latents(pipe, layout: Layout, **settings) -> torch.Tensor:
    defaults = {"regional_attention": "sparse", "regional_blend": "joint"}
    try:
        for name, value in {**defaults, **settings}.items():
            setattr(pipe, name, value)
        return pipe(layout=layout, output_type="latent").images
    finally:
        for name in defaults:
            pipe.__dict__.pop(name, None)


@pytest.mark.parametrize(
    "name", ["two regions", "overlaps, weights and a mask", "30 boxes, one prompt"]
)
@pytest.mark.parametrize("guidance", [5.0, 1.0], ids=["cfg", "no-cfg"])
def test_sparse_generation_equals_dense(pipe, soft_mask, name, guidance):
    layout = dataclasses.replace(_layouts(soft_mask)[name], guidance_scale=guidance)
    dense = _latents(pipe, layout, regional_attention="dense")
    sparse = _latents(pipe, layout)
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(sparse).all()


@pytest.mark.parametrize("guidance", [5.0, 1.0], ids=["cfg", "no-cfg"])
def test_weighted_blend_sparse_equals_dense_and_differs_from_joint(pipe, soft_mask, guidance):
    layout = dataclasses.replace(
        _layouts(soft_mask)["overlaps, weights and a mask"], guidance_scale=guidance
    )
    dense = _latents(pipe, layout, regional_attention="dense", regional_blend="weighted")
    sparse = _latents(pipe, layout, regional_blend="weighted")
    joint = _latents(pipe, layout)
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-4)
    assert (sparse - joint).abs().max() > 1e-3


def test_unknown_blend_is_refused(pipe, soft_mask):
    with pytest.raises(ValueError, match="blend must be one of"):
        _latents(pipe, _layouts(soft_mask)["two regions"], regional_blend="average")


def test_text_keys_and_values_are_projected_once_per_call(pipe, soft_mask):
    layout = dataclasses.replace(_layouts(soft_mask)["two regions"], steps=3)
    to_k = pipe.unet.get_submodule(LAYER).to_k
    calls = []
    hook = to_k.register_forward_hook(lambda *_: calls.append(1))
    try:
        _latents(pipe, layout)
        assert len(calls) == 1, "negative and positive text together, once for three steps"
        calls.clear()
        pipe.regional_kept_bytes = 0
        _latents(pipe, layout)
        assert len(calls) == 3, "nothing kept: projected at every step"
    finally:
        hook.remove()
        pipe.__dict__.pop("regional_kept_bytes", None)
    assert pipe.regional_context().state is None


def test_identical_requests_encode_their_prompts_once(pipe, soft_mask):
    pipe.prompt_cache.clear()
    layout = _layouts(soft_mask)["overlaps, weights and a mask"]
    encoded = []
    hook = pipe.text_encoder.register_forward_hook(
        lambda _module, args, _out: encoded.append(args[0].shape[0])
    )
    try:
        first = _latents(pipe, layout)
        assert sum(encoded) > 0
        encoded.clear()
        second = _latents(pipe, dataclasses.replace(layout))
        assert encoded == [], "every prompt came from the cache"
        assert torch.equal(first, second)
        # One new region prompt: only it (and the new scene prompt) are encoded.
        changed = dataclasses.replace(
            layout,
            prompt="a market at night",
            regions=[*layout.regions[:-1], Region("a neon sign", (0.2, 0.2, 0.6, 0.5))],
        )
        _latents(pipe, changed)
        assert sum(encoded) == 2
        # Other text-encoder settings are other entries.
        encoded.clear()
        pipe(layout=layout, output_type="latent", clip_skip=1)
        assert sum(encoded) > 0
    finally:
        hook.remove()
    assert pipe.prompt_cache.bytes <= pipe.prompt_cache.max_bytes


def test_prompt_cache_drops_everything_when_the_encoders_change(pipe, soft_mask):
    layout = _layouts(soft_mask)["two regions"]
    _latents(pipe, layout)
    assert len(pipe.prompt_cache) > 0
    weight = pipe.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight.mul_(1.0)  # an in-place change, as loading weights into the encoder makes
    encoded = []
    hook = pipe.text_encoder.register_forward_hook(lambda *_: encoded.append(1))
    try:
        _latents(pipe, layout)
    finally:
        hook.remove()
    assert encoded, "stale embeddings were not reused"
