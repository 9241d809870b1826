"""The regional cross-attention processor and its installation on a UNet.

``RegionalAttnProcessor`` replaces diffusers' ``AttnProcessor2_0`` on the cross-attention
(``attn2``) layers only. While a ``RegionalState`` is active on its ``RegionalContext`` it adds
the state's per-pixel block bias to the attention scores; otherwise it *is* ``AttnProcessor2_0``,
so one installation serves plain and regional calls alike. Subclasses may add a term computed
from the same query before the output projection (``engine.conditions.object_images`` does, for IP-Adapter
image tokens).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    XFormersAttnProcessor,
)

from engine.regional.plan import RegionalState

CROSS_ATTENTION_SUFFIX = "attn2.processor"

# Processors that compute plain attention and nothing else: safe to replace.
_PLAIN_PROCESSORS = (AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor)


class RegionalContext:
    """The regional state shared by every processor of one UNet; ``None`` between calls."""

    def __init__(self) -> None:
        self.state: RegionalState | None = None

    @contextlib.contextmanager
    def active(self, state: RegionalState) -> Iterator[RegionalState]:
        """Make ``state`` visible to the processors for the duration of a ``with`` block.

        The state is cleared on the way out, also when the block raises (a cancelled call must
        not leave regions on the next plain call).
        """
        if self.state is not None:
            raise RuntimeError(
                "a regional generation is already running on this pipeline; "
                "wait for it to finish or use a second pipeline"
            )
        self.state = state
        try:
            yield state
        finally:
            self.state = None


class RegionalAttnProcessor(AttnProcessor2_0):
    """Cross-attention with a per-pixel, per-prompt-block additive bias.

    Extension point for conditions that attend with the same queries (an IP-Adapter): a
    subclass overrides :meth:`split_encoder_states`, to take its own inputs out of what the
    UNet passes as ``encoder_hidden_states``, and :meth:`extra_attention`, which receives the
    layer's projected query and returns a term added to the attention output before the output
    projection. The query is computed once and the output projected once for both.
    """

    def __init__(self, context: RegionalContext):
        super().__init__()
        self.context = context

    def split_encoder_states(self, encoder_hidden_states: Any) -> tuple[torch.Tensor | None, Any]:
        """The text states for the attention and the input for :meth:`extra_attention`.

        The input is None when there is no extra term for this call; the layer then computes
        plain (or regional) attention only, at no extra cost.
        """
        return encoder_hidden_states, None

    def extra_attention(
        self,
        attn: Attention,
        query: torch.Tensor,
        extra: Any,
        state: RegionalState | None,
    ) -> torch.Tensor | None:
        """A term ``(batch, queries, inner)`` added to the attention output before ``to_out``.

        ``query`` is ``attn.to_q`` of the layer's normalised hidden states, ``(batch, queries,
        inner)``, rows in the UNet's batch order; ``extra`` what :meth:`split_encoder_states`
        returned; ``state`` the call's regional state (None on the plain path), which says
        which rows hold the negative prompt. None adds nothing.
        """
        return None

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Any = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        encoder_hidden_states, extra = self.split_encoder_states(encoder_hidden_states)
        state = self.context.state
        if state is None or encoder_hidden_states is None:
            if extra is None:
                return super().__call__(
                    attn,
                    hidden_states,
                    encoder_hidden_states,
                    attention_mask,
                    temb,
                    *args,
                    **kwargs,
                )
            return self._attention(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, None, extra
            )
        if attention_mask is not None:
            raise ValueError(
                "regional attention does not combine with encoder_attention_mask; "
                "call the pipeline without it"
            )
        if encoder_hidden_states.shape[1] != state.num_tokens:
            raise ValueError(
                f"cross-attention got {encoder_hidden_states.shape[1]} text tokens but the "
                f"regional prompt blocks hold {state.num_tokens}; prompt embeddings must not be "
                "replaced during a regional call"
            )
        return self._attention(attn, hidden_states, encoder_hidden_states, None, temb, state, extra)

    def _attention(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        temb: torch.Tensor | None,
        state: RegionalState | None,
        extra: Any,
    ) -> torch.Tensor:
        # Mirrors AttnProcessor2_0 step by step; the key side, the bias and the extra term differ.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        if state is None:
            if attention_mask is not None:
                attention_mask = attn.prepare_attention_mask(
                    attention_mask, encoder_hidden_states.shape[1], batch_size
                )
                attention_mask = attention_mask.view(
                    batch_size, attn.heads, -1, attention_mask.shape[-1]
                )
            hidden_states = _attend(attn, query, encoder_hidden_states, attention_mask)
        else:
            uncond = state.unconditional_rows(batch_size)
            outputs = []
            if uncond:
                # The negative prompt is tiled once per block: its first block alone gives the
                # same attention at a fraction of the cost.
                negative = encoder_hidden_states[:uncond, : state.block_tokens]
                outputs.append(_attend(attn, query[:uncond], negative, None))
            bias = state.attention_bias(query.shape[1], query.dtype, query.device)
            outputs.append(_attend(attn, query[uncond:], encoder_hidden_states[uncond:], bias))
            hidden_states = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
        if extra is not None:
            term = self.extra_attention(attn, query, extra, state)
            if term is not None:
                hidden_states = hidden_states + term.to(hidden_states.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(
                batch_size, channel, height, width
            )
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _attend(
    attn: Attention, query: torch.Tensor, context: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Multi-head attention of projected queries over a text context; ``(batch, q, inner)``."""
    return multi_head_attention(
        attn, query, attn.to_k(context), attn.to_v(context), bias, attn.norm_q, attn.norm_k
    )


def multi_head_attention(
    attn: Attention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: torch.Tensor | None = None,
    norm_q: Any = None,
    norm_k: Any = None,
) -> torch.Tensor:
    """Scaled dot-product attention over ``attn.heads`` heads of projected ``(batch, n, inner)``
    queries, keys and values (per-head norms applied when given); ``(batch, q, inner)``."""
    batch_size = query.shape[0]
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if norm_q is not None:
        query = norm_q(query)
    if norm_k is not None:
        key = norm_k(key)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=bias, dropout_p=0.0, is_causal=False
    )
    out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
    return out.to(query.dtype)


def install_regional_attention(unet: torch.nn.Module, context: RegionalContext) -> None:
    """Put a ``RegionalAttnProcessor`` reading ``context`` on every cross-attention layer.

    Self-attention layers keep their processors. A cross-attention processor that does more
    than plain attention (an IP-Adapter's, say) makes this raise, naming the layers: replacing
    it would silently drop what it does.
    """
    processors = dict(unet.attn_processors)
    foreign = []
    changed = False
    for name, processor in processors.items():
        if not name.endswith(CROSS_ATTENTION_SUFFIX):
            continue
        if isinstance(processor, RegionalAttnProcessor) and processor.context is context:
            continue
        if type(processor) in _PLAIN_PROCESSORS or type(processor) is RegionalAttnProcessor:
            processors[name] = RegionalAttnProcessor(context)
            changed = True
        else:
            foreign.append(f"{name} ({type(processor).__name__})")
    if foreign:
        raise RuntimeError(
            "regional attention needs the standard cross-attention processors, but these layers "
            f"use others: {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}; "
            "unload the adapter that installed them (e.g. pipe.unload_ip_adapter()) "
            "before generating from a Layout"
        )
    if changed:
        unet.set_attn_processor(processors)
