"""The regional cross-attention processor on real attn2 layers of a tiny SDXL UNet."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
from tiny import tiny_sdxl_components

from engine.regional.attention import (
    RegionalAttnProcessor,
    RegionalContext,
    install_regional_attention,
)
from engine.regional.plan import RegionalState, plan_regions
from engine.wire.layout import Layout, Region


@pytest.fixture(scope="module")
def unet():
    return tiny_sdxl_components(seed=3)["unet"].eval()


def _attn2(unet):
    return unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2


def _left_right_state(latent=(8, 16), tokens=5, guided=True) -> RegionalState:
    layout = Layout(
        prompt="scene",
        base_ratio=0.0,
        regions=[Region("left", (0.0, 0.0, 0.5, 1.0)), Region("right", (0.5, 0.0, 1.0, 1.0))],
    )
    plan = plan_regions(layout, latent)
    assert plan.prompts == ["left", "right"]
    return RegionalState(plan, block_tokens=tokens, guided=guided)


@torch.no_grad()
def test_without_state_it_is_attn_processor_2_0(unet):
    attn = _attn2(unet)
    torch.manual_seed(0)
    hidden = torch.randn(2, 48, attn.query_dim)
    text = torch.randn(2, 77, attn.cross_attention_dim)
    processor = RegionalAttnProcessor(RegionalContext())
    expected = AttnProcessor2_0()(attn, hidden, text)
    assert torch.equal(processor(attn, hidden, text), expected)
    # self-attention call shape (no encoder states) too
    assert torch.equal(processor(attn, hidden), AttnProcessor2_0()(attn, hidden))


@torch.no_grad()
def test_each_half_attends_to_its_own_block_only(unet):
    attn = _attn2(unet)
    tokens, grid = 5, (4, 8)
    state = _left_right_state(tokens=tokens)
    torch.manual_seed(1)
    hidden = torch.randn(2, grid[0] * grid[1], attn.query_dim)
    negative = torch.randn(1, tokens, attn.cross_attention_dim)
    left, right = torch.randn(2, 1, tokens, attn.cross_attention_dim)
    text = torch.cat([negative.repeat(1, 2, 1), torch.cat([left, right], dim=1)])
    context = RegionalContext()
    processor = RegionalAttnProcessor(context)
    with context.active(state):
        out = processor(attn, hidden, text)
    plain = AttnProcessor2_0()
    cells = torch.arange(grid[0] * grid[1]).view(grid)
    left_cells, right_cells = cells[:, :4].flatten(), cells[:, 4:].flatten()
    torch.testing.assert_close(out[:1], plain(attn, hidden[:1], negative))
    torch.testing.assert_close(out[1:, left_cells], plain(attn, hidden[1:], left)[:, left_cells])
    torch.testing.assert_close(out[1:, right_cells], plain(attn, hidden[1:], right)[:, right_cells])
    # and differs from attending to both blocks unmasked
    both = plain(attn, hidden[1:], text[1:])
    assert (out[1:] - both).abs().max() > 1e-3


@torch.no_grad()
def test_unguided_batch_uses_the_bias_on_every_row(unet):
    attn = _attn2(unet)
    state = _left_right_state(tokens=3, guided=False)
    torch.manual_seed(2)
    hidden = torch.randn(2, 32, attn.query_dim)
    text = torch.randn(2, 6, attn.cross_attention_dim)
    context = RegionalContext()
    with context.active(state):
        out = RegionalAttnProcessor(context)(attn, hidden, text)
    left = AttnProcessor2_0()(attn, hidden, text[:, :3])
    torch.testing.assert_close(out[:, :4], left[:, :4])


@torch.no_grad()
def test_wrong_token_count_is_reported(unet):
    attn = _attn2(unet)
    context = RegionalContext()
    with context.active(_left_right_state(tokens=5)), pytest.raises(ValueError, match="hold 10"):
        RegionalAttnProcessor(context)(
            attn, torch.randn(2, 32, attn.query_dim), torch.randn(2, 7, attn.cross_attention_dim)
        )


class _QueryTerm(RegionalAttnProcessor):
    """Adds ``extra * query`` and records what the hook was handed."""

    def __init__(self, context: RegionalContext):
        super().__init__(context)
        self.seen: list = []

    def split_encoder_states(self, encoder_hidden_states):
        if isinstance(encoder_hidden_states, tuple):
            return encoder_hidden_states
        return encoder_hidden_states, None

    def extra_attention(self, attn, query, extra, state):
        self.seen.append((query, state))
        return extra * query


@torch.no_grad()
def test_extra_term_gets_the_projected_query_and_is_added_before_the_output_projection(unet):
    attn = _attn2(unet)
    torch.manual_seed(4)
    hidden = torch.randn(2, 32, attn.query_dim)
    text = torch.randn(2, 10, attn.cross_attention_dim)
    context = RegionalContext()
    processor = _QueryTerm(context)
    query = attn.to_q(hidden)
    # Added before to_out, the term shows up in the output as to_out's weight times the term.
    expected_change = F.linear(0.5 * query, attn.to_out[0].weight)
    calls = []
    hook = attn.to_q.register_forward_hook(lambda *_: calls.append(1))
    try:
        plain = processor(attn, hidden, text)
        with_term = processor(attn, hidden, (text, 0.5))
        state = _left_right_state(tokens=5)
        with context.active(state):
            regional = processor(attn, hidden, text)
            regional_with_term = processor(attn, hidden, (text, 0.5))
    finally:
        hook.remove()
    assert len(calls) == 4, "one query projection per call, shared with the extra term"
    assert torch.equal(plain, AttnProcessor2_0()(attn, hidden, text))
    torch.testing.assert_close(with_term - plain, expected_change)
    torch.testing.assert_close(regional_with_term - regional, expected_change)
    (plain_query, plain_state), (regional_query, regional_state) = processor.seen
    assert torch.equal(plain_query, query) and torch.equal(regional_query, query)
    assert plain_state is None and regional_state is state


@torch.no_grad()
def test_extra_term_keeps_the_attention_mask_on_the_plain_path(unet):
    attn = _attn2(unet)
    torch.manual_seed(5)
    hidden = torch.randn(2, 32, attn.query_dim)
    text = torch.randn(2, 10, attn.cross_attention_dim)
    # An additive bias, as the UNet hands on encoder_attention_mask: the last tokens are padding.
    mask = torch.zeros(2, 10)
    mask[:, 6:] = -10000.0
    processor = _QueryTerm(RegionalContext())
    with_term = processor(attn, hidden, (text, 0.0), attention_mask=mask)
    expected = AttnProcessor2_0()(attn, hidden, text, attention_mask=mask)
    torch.testing.assert_close(with_term, expected, rtol=0, atol=1e-6)
    unmasked = AttnProcessor2_0()(attn, hidden, text)
    assert (with_term - unmasked).abs().max() > 1e-3, "the mask must matter"


def test_context_is_cleared_when_the_call_raises():
    context = RegionalContext()
    state = _left_right_state()
    with pytest.raises(KeyboardInterrupt), context.active(state):
        assert context.state is state
        raise KeyboardInterrupt
    assert context.state is None
    with context.active(state), pytest.raises(RuntimeError, match="already running"):  # noqa: SIM117
        with context.active(state):
            pass


def test_install_touches_cross_attention_only():
    unet = tiny_sdxl_components(seed=0)["unet"]
    before = unet.attn_processors
    context = RegionalContext()
    install_regional_attention(unet, context)
    after = unet.attn_processors
    assert after.keys() == before.keys()
    for name, processor in after.items():
        if ".attn2." in name:
            assert isinstance(processor, RegionalAttnProcessor) and processor.context is context
        else:
            assert processor is before[name]
    install_regional_attention(unet, context)  # idempotent: same objects stay
    assert all(unet.attn_processors[n] is p for n, p in after.items())


def test_install_refuses_to_replace_an_adapter_processor():
    unet = tiny_sdxl_components(seed=0)["unet"]
    processors = dict(unet.attn_processors)
    name = next(n for n in processors if n.endswith("attn2.processor"))
    attn = _attn2(unet)
    processors[name] = IPAdapterAttnProcessor2_0(attn.inner_dim, attn.cross_attention_dim)
    unet.set_attn_processor(processors)
    with pytest.raises(RuntimeError, match="IPAdapterAttnProcessor2_0.*unload"):
        install_regional_attention(unet, RegionalContext())


@torch.no_grad()
def test_every_attention_grid_of_an_odd_latent_gets_its_bias(monkeypatch):
    # Two cross-attention levels (latent/2 and latent/4), as in SDXL, on a 25x19 latent.
    from diffusers import UNet2DConditionModel

    from engine.regional.plan import RegionPlan

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4,
        cross_attention_dim=16,
        norm_num_groups=4,
    ).eval()
    context = RegionalContext()
    install_regional_attention(unet, context)
    layout = Layout(prompt="x", regions=[Region("a", (0.0, 0.0, 0.1, 0.1))])
    plan = plan_regions(layout, (25, 19))
    assert len(plan.prompts) == 2
    asked = []
    original = RegionPlan.weights_for_query
    monkeypatch.setattr(
        RegionPlan, "weights_for_query", lambda self, q: asked.append(q) or original(self, q)
    )
    sample = torch.randn(2, 4, 25, 19)
    text = torch.randn(2, 2 * 4, 16)
    with context.active(RegionalState(plan, block_tokens=4, guided=True)):
        out = unet(sample, 10, text).sample
        unet(sample, 20, text)  # a second step reuses the cached biases
    assert out.shape == sample.shape and torch.isfinite(out).all()
    assert sorted(asked) == [7 * 5, 13 * 10]
