"""Sparse regional attention against the dense reference, and what a call keeps between steps."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_sdxl_components
from torch.utils._python_dispatch import TorchDispatchMode

from engine.regional import attention as regional_attention
from engine.regional.attention import (
    RegionalAttnProcessor,
    RegionalContext,
    merge_blocks,
    segment_attention,
)
from engine.regional.plan import BlockPairs, RegionalState, plan_regions
from engine.wire.layout import Layout, Region


@pytest.fixture(scope="module")
def attn():
    unet = tiny_sdxl_components(seed=3)["unet"].eval()
    return unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2


def _layouts() -> dict[str, Layout]:
    overlapping = [
        Region(
            f"object {i}", (0.1 * i, 0.05 * i, 0.1 * i + 0.35, 0.05 * i + 0.5), weight=0.5 + i / 8
        )
        for i in range(6)
    ]
    return {
        "left-right": Layout(
            prompt="scene",
            base_ratio=0.0,
            regions=[Region("left", (0, 0, 0.5, 1)), Region("right", (0.5, 0, 1, 1))],
        ),
        "overlapping, shared prompt, base ratio": Layout(
            prompt="a busy street",
            base_ratio=0.3,
            regions=[*overlapping, Region("object 0", (0.6, 0.6, 0.95, 0.9))],
        ),
        "tiny boxes": Layout(
            prompt="specks",
            regions=[
                Region(f"speck {i}", (0.07 * i, 0.5, 0.07 * i + 0.01, 0.51)) for i in range(12)
            ],
        ),
    }


def _run(attn, plan, tokens, guided, hidden, text, **options):
    context = RegionalContext()
    state = RegionalState(plan, block_tokens=tokens, guided=guided, **options)
    with torch.no_grad(), context.active(state):
        return RegionalAttnProcessor(context)(attn, hidden, text)


@pytest.mark.parametrize("name", list(_layouts()))
@pytest.mark.parametrize("guided", [True, False], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("blend", ["joint", "weighted"])
def test_sparse_equals_dense(attn, name, guided, blend):
    plan = plan_regions(_layouts()[name], (16, 12))
    tokens = 5
    generator = torch.Generator().manual_seed(hash((name, guided, blend)) % 2**31)
    # Four rows: two images per prompt, each row with its own text.
    hidden = torch.randn(4, 8 * 6, attn.query_dim, generator=generator)
    text = torch.randn(4, len(plan.prompts) * tokens, attn.cross_attention_dim, generator=generator)
    dense = _run(attn, plan, tokens, guided, hidden, text, attention="dense", blend=blend)
    sparse = _run(attn, plan, tokens, guided, hidden, text, attention="sparse", blend=blend)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)


def test_weighted_blend_is_the_weight_average_of_per_block_attention(attn):
    layout = _layouts()["overlapping, shared prompt, base ratio"]
    plan = plan_regions(layout, (16, 12))
    tokens = 4
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 48, attn.query_dim, generator=generator)
    text = torch.randn(1, len(plan.prompts) * tokens, attn.cross_attention_dim, generator=generator)
    weighted = _run(attn, plan, tokens, False, hidden, text, blend="weighted")
    joint = _run(attn, plan, tokens, False, hidden, text, blend="joint")
    # By hand: each block's plain attention, averaged with the pixel's normalised weights.
    weights = plan.weights_for_query(48).flatten(1)
    share = weights / weights.sum(dim=0)
    query = attn.to_q(hidden)
    expected = 0
    for block in range(len(plan.prompts)):
        part = text[:, block * tokens : (block + 1) * tokens]
        out = regional_attention.multi_head_attention(attn, query, attn.to_k(part), attn.to_v(part))
        expected = expected + share[block][None, :, None] * out
    expected = attn.to_out[0](expected)
    torch.testing.assert_close(weighted, expected.detach(), rtol=1e-5, atol=1e-5)
    assert (weighted - joint).abs().max() > 1e-3, "the two blends differ"


def test_half_precision_sparse_stays_close_to_dense(attn):
    plan = plan_regions(_layouts()["overlapping, shared prompt, base ratio"], (16, 12))
    half = attn.to(torch.bfloat16)
    try:
        generator = torch.Generator().manual_seed(1)
        hidden = torch.randn(2, 48, attn.query_dim, generator=generator).bfloat16()
        text = torch.randn(2, len(plan.prompts) * 5, attn.cross_attention_dim, generator=generator)
        text = text.bfloat16()
        dense = _run(half, plan, 5, True, hidden, text, attention="dense")
        sparse = _run(half, plan, 5, True, hidden, text, attention="sparse")
        assert sparse.dtype == torch.bfloat16
        torch.testing.assert_close(sparse.float(), dense.float(), rtol=0.02, atol=0.02)
    finally:
        attn.to(torch.float32)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements any operation returned."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("attention", ["sparse", "dense"])
def test_sparse_builds_no_queries_by_tokens_tensor(attn, attention, monkeypatch):
    regions = [
        Region(
            f"object {i}",
            (0.1 * (i % 10), 0.1 * (i // 10), 0.1 * (i % 10) + 0.08, 0.1 * (i // 10) + 0.08),
        )
        for i in range(40)
    ]
    plan = plan_regions(Layout(prompt="a shelf", regions=regions), (64, 64))
    tokens, queries = 77, 32 * 32
    hidden = torch.randn(2, queries, attn.query_dim)
    text = torch.randn(2, len(plan.prompts) * tokens, attn.cross_attention_dim)
    if attention == "sparse":
        monkeypatch.setattr(RegionalState, "attention_bias", None)  # must not be asked
    context = RegionalContext()
    state = RegionalState(plan, block_tokens=tokens, guided=True, attention=attention)
    with torch.no_grad(), context.active(state), _LargestTensor() as seen:
        RegionalAttnProcessor(context)(attn, hidden, text)
    all_scores = queries * len(plan.prompts) * tokens
    if attention == "sparse":
        # The largest are the packed queries and one copy of the keys per small block.
        assert seen.largest < all_scores / 8
    else:
        assert seen.largest >= all_scores  # the dense bias


def test_text_keys_and_values_are_projected_once_per_call(attn):
    plan = plan_regions(_layouts()["left-right"], (16, 12), grids=[(8, 6)])
    assert len(plan.prompts) == 2
    hidden = torch.randn(2, 48, attn.query_dim)
    text = torch.randn(2, 2 * 5, attn.cross_attention_dim)
    context = RegionalContext()
    processor = RegionalAttnProcessor(context)
    calls = []
    hook = attn.to_k.register_forward_hook(lambda *_: calls.append(1))
    try:
        state = RegionalState(plan, block_tokens=5, guided=True)
        with torch.no_grad(), context.active(state):
            first = processor(attn, hidden, text)
            second = processor(attn, hidden, text)
            kept = state.kept_bytes
            assert len(calls) == 1, "negative and positive rows together, once for both steps"
            # New text (a callback replacing the prompt embeddings) is projected again.
            processor(attn, hidden, text.clone())
            assert len(calls) == 2
        assert state.kept_bytes == 0, "released with the call"
        # Key and value of 5 negative and 10 positive tokens, 64 wide, float32.
        assert kept == 2 * (5 + 10) * attn.inner_dim * 4
        assert torch.equal(first, second)
        calls.clear()
        state = RegionalState(plan, block_tokens=5, guided=True, kept_bytes=0)
        with torch.no_grad(), context.active(state):
            processor(attn, hidden, text)
            processor(attn, hidden, text)
        assert len(calls) == 2 and state.kept_bytes == 0, "no budget: projected at every use"
    finally:
        hook.remove()


def test_segments_longer_than_a_tile_and_empty_segments(monkeypatch):
    """The tiled kernel against plain attention per segment, with empty segments."""
    monkeypatch.setattr(regional_attention, "_TILE", 4)
    generator = torch.Generator().manual_seed(2)
    counts = [9, 0, 3, 4, 0, 1]
    tokens, heads, dim = 6, 2, 8
    pairs = BlockPairs(
        queries=sum(counts),
        blocks=len(counts),
        index=torch.arange(sum(counts)),
        counts=counts,
        log_weight=torch.zeros(sum(counts)),
        share=torch.ones(sum(counts)),
    )
    query = torch.randn(sum(counts), heads, dim, generator=generator)
    key = torch.randn(len(counts) * tokens, heads, dim, generator=generator)
    value = torch.randn(len(counts) * tokens, heads, dim, generator=generator)
    out, lse = segment_attention(query, key, value, pairs, tokens)
    start = 0
    for segment, count in enumerate(counts):
        q = query[start : start + count].transpose(0, 1)
        k = key[segment * tokens : (segment + 1) * tokens].transpose(0, 1)
        v = value[segment * tokens : (segment + 1) * tokens].transpose(0, 1)
        scores = q @ k.transpose(-1, -2) / dim**0.5
        expected = torch.softmax(scores, dim=-1) @ v
        torch.testing.assert_close(out[start : start + count], expected.transpose(0, 1))
        torch.testing.assert_close(lse[start : start + count], scores.logsumexp(-1).T)
        start += count


def test_joint_merge_is_the_softmax_over_all_tokens():
    """Two blocks' outputs and log-sum-exps merged equal one softmax with the log-weights."""
    generator = torch.Generator().manual_seed(3)
    heads, dim, tokens = 2, 4, 3
    query = torch.randn(1, heads, 1, dim, generator=generator)
    key = torch.randn(1, heads, 2 * tokens, dim, generator=generator)
    value = torch.randn(1, heads, 2 * tokens, dim, generator=generator)
    weights = torch.tensor([0.3, 1.7])
    bias = weights.log().repeat_interleave(tokens)[None, None, None]
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, bias)
    outs, lses = [], []
    for block in range(2):
        part = slice(block * tokens, (block + 1) * tokens)
        scores = query @ key[..., part, :].transpose(-1, -2) / dim**0.5
        outs.append((torch.softmax(scores, -1) @ value[..., part, :])[0, :, 0])
        lses.append(scores.logsumexp(-1)[0, :, 0])
    pairs = BlockPairs(1, 2, torch.tensor([0, 0]), [1, 1], weights.log(), weights / 2)
    merged = merge_blocks(torch.stack(outs), torch.stack(lses), pairs, 1, "joint")
    torch.testing.assert_close(merged[0], expected[0, :, 0])


def test_unknown_options_are_refused():
    plan = plan_regions(_layouts()["left-right"], (8, 8))
    with pytest.raises(ValueError, match="attention must be one of"):
        RegionalState(plan, 5, True, attention="flex")
    with pytest.raises(ValueError, match="blend must be one of"):
        RegionalState(plan, 5, True, blend="average")
