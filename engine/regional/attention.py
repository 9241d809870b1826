"""The regional cross-attention processor and its installation on a UNet.

``RegionalAttnProcessor`` replaces diffusers' ``AttnProcessor2_0`` on the cross-attention
(``attn2``) layers only. While a ``RegionalState`` is active on its ``RegionalContext`` each
pixel listens to the prompt blocks the state weighs it with; otherwise it *is*
``AttnProcessor2_0``, so one installation serves plain and regional calls alike. Subclasses may
add a term computed from the same query before the output projection
(``engine.conditions.object_images`` does, for IP-Adapter image tokens).

How a regional call attends (``RegionalState.attention``):

- ``sparse`` (the default): every block attends only with the queries it weighs, all blocks
  (and the negative rows) in one variable-length flash-attention call on a GPU, and each
  query's results are merged with their log-sum-exp plus log-weight, which equals one softmax
  over all its blocks' tokens with the log-weight added (``joint`` blend), or averaged by the
  normalised weights (``weighted`` blend, Regional Prompter style). The merge is one Triton
  kernel on a GPU (``engine.regional.fused_merge``). No queries x tokens tensor exists.
- ``dense``: every pixel over every block's tokens with an additive ``log(weight)`` bias: the
  reference the tests compare against.

The text keys and values of every cross-attention layer are projected once per call and kept
while it runs (``RegionalState.kept``, within a byte budget).
"""

from __future__ import annotations

import contextlib
import warnings
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

from engine.regional.plan import BlockPairs, RegionalState

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
            state.release()  # what the call kept (text keys and values) goes with it


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
        if state is not None:
            hidden_states = regional_attention(attn, query, encoder_hidden_states, state)
        else:
            if encoder_hidden_states is None:
                encoder_hidden_states = hidden_states
            elif attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            if attention_mask is not None:
                attention_mask = attn.prepare_attention_mask(
                    attention_mask, encoder_hidden_states.shape[1], batch_size
                )
                attention_mask = attention_mask.view(
                    batch_size, attn.heads, -1, attention_mask.shape[-1]
                )
            hidden_states = _attend(attn, query, encoder_hidden_states, attention_mask)
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


# -- Regional attention: the positive rows listen to several prompt blocks ---------------------


def regional_attention(
    attn: Attention, query: torch.Tensor, text: torch.Tensor, state: RegionalState
) -> torch.Tensor:
    """Cross-attention of projected ``query`` ``(batch, q, inner)`` over the call's prompt
    blocks ``text``, as ``state`` weighs them; ``(batch, q, inner)``.

    The text keys and values are projected once per call and layer (``state.kept``), the
    negative rows' first block followed by every other row's blocks. The negative rows attend
    to that block alone, the others by ``state.attention`` and ``state.blend``.
    """
    batch = query.shape[0]
    uncond = state.unconditional_rows(batch)
    tokens = state.block_tokens

    def project() -> tuple[torch.Tensor, ...]:
        states = attn.norm_encoder_hidden_states(text) if attn.norm_cross else text
        # The negative prompt is tiled once per block: its first block alone gives the same
        # attention at a fraction of the cost.
        flat = torch.cat([states[:uncond, :tokens].flatten(0, 1), states[uncond:].flatten(0, 1)])
        return attn.to_k(flat), attn.to_v(flat)

    keys, values = state.kept(("text", attn), text, project)
    if state.attention == "sparse":
        return sparse_block_attention(attn, query, keys, values, state, uncond)
    inner = keys.shape[-1]
    split = uncond * tokens
    key, value = (
        keys[split:].view(batch - uncond, -1, inner),
        values[split:].view(batch - uncond, -1, inner),
    )
    outputs = []
    if uncond:
        neg_key = keys[:split].view(uncond, tokens, inner)
        neg_value = values[:split].view(uncond, tokens, inner)
        outputs.append(
            multi_head_attention(
                attn, query[:uncond], neg_key, neg_value, None, attn.norm_q, attn.norm_k
            )
        )
    positive = query[uncond:]
    if state.blend == "joint":
        bias = state.attention_bias(positive.shape[1], positive.dtype, positive.device)
        outputs.append(
            multi_head_attention(attn, positive, key, value, bias, attn.norm_q, attn.norm_k)
        )
    else:
        outputs.append(_dense_weighted_attention(attn, positive, key, value, state))
    return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


def _dense_weighted_attention(
    attn: Attention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    state: RegionalState,
) -> torch.Tensor:
    """The weighted blend computed for every pixel and every block: the reference the sparse
    path is tested against."""
    weights = state.plan.weights_for_query(query.shape[1]).to(query.device, torch.float32)
    share = (weights / weights.sum(dim=0)).flatten(1)  # (blocks, queries)
    tokens = state.block_tokens
    total = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    for block in range(len(share)):
        part = slice(block * tokens, (block + 1) * tokens)
        out = multi_head_attention(
            attn, query, key[:, part], value[:, part], None, attn.norm_q, attn.norm_k
        )
        total += share[block][None, :, None] * out.float()
    return total.to(query.dtype)


def sparse_block_attention(
    attn: Attention,
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    state: RegionalState,
    unconditional: int = 0,
) -> torch.Tensor:
    """Regional attention of ``query`` ``(batch, q, inner)`` with each prompt block computed
    only for the queries it weighs; ``(batch, q, inner)``.

    ``keys`` / ``values`` ``(tokens, inner)`` hold the first ``unconditional`` rows' negative
    block, then every other row's blocks. Every block's attention comes with its log-sum-exp
    ``lse``. With the joint blend a query's output is the blocks' outputs weighted by
    ``softmax(lse + log(weight))`` over its blocks, which is exactly the softmax over all
    their tokens with ``log(weight)`` added to the scores; with the weighted blend, by its
    normalised weights. The negative rows are one segment each in the same kernel call. No
    queries x tokens tensor is built.
    """
    batch, queries, inner = query.shape
    heads = attn.heads
    head_dim = inner // heads
    pairs = state.block_pairs(queries, query.device, batch, unconditional)
    flat_query = query.reshape(batch * queries, heads, head_dim)
    flat_key = keys.view(-1, heads, head_dim)
    flat_value = values.view(-1, heads, head_dim)
    if attn.norm_q is not None:
        flat_query = attn.norm_q(flat_query)
    if attn.norm_k is not None:
        flat_key = attn.norm_k(flat_key)
    packed = flat_query.index_select(0, pairs.index)
    out, lse = segment_attention(packed, flat_key, flat_value, pairs, state.block_tokens)
    merged = merge_blocks(out, lse, pairs, batch * queries, state.blend)
    return merged.view(batch, queries, inner).to(query.dtype)


def merge_blocks(
    out: torch.Tensor, lse: torch.Tensor, pairs: BlockPairs, queries: int, blend: str
) -> torch.Tensor:
    """Per query, the blend of its blocks' outputs ``out`` ``(pairs, heads, dim)`` (see
    :func:`sparse_block_attention`; ``out`` is reused); ``(queries, heads, dim)``.

    On a GPU with Triton one fused kernel does it (``engine.regional.fused_merge``);
    elsewhere PyTorch operations, accumulating in float32.
    """
    fused = fused_merge(out.device)
    if fused is not None:
        order, offsets = pairs.by_query()
        weight = pairs.log_weight if blend == "joint" else pairs.share
        try:
            return fused(out, lse, weight, offsets, order, blend == "joint")
        except Exception as exc:  # a Triton that cannot build for this GPU: the portable path
            _FUSED["merge"] = None
            warnings.warn(f"fused merge unavailable ({exc}); using PyTorch", stacklevel=2)
    return merge_with_torch(out, lse, pairs, queries, blend)


def merge_with_torch(
    out: torch.Tensor, lse: torch.Tensor, pairs: BlockPairs, queries: int, blend: str
) -> torch.Tensor:
    """:func:`merge_blocks` by PyTorch operations (any device)."""
    heads = out.shape[1]
    index = pairs.index
    if blend == "joint":
        logits = lse.float() + pairs.log_weight[:, None]
        peak = torch.full((queries, heads), float("-inf"), device=out.device)
        peak.scatter_reduce_(0, index[:, None].expand(-1, heads), logits, "amax")
        share = (logits - peak[index]).exp_()
        total = torch.zeros((queries, heads), device=out.device).index_add_(0, index, share)
        share /= total[index]
    else:
        share = pairs.share[:, None].expand(-1, heads)
    # Float32 sums: exact enough, and native atomic adds on a GPU (half precision's are slow).
    weighted = out.float().mul_(share[..., None])
    total = torch.zeros((queries, *out.shape[1:]), device=out.device)
    return total.index_add_(0, index, weighted).to(out.dtype)


_FUSED: dict[str, Any] = {}


def fused_merge(device: torch.device) -> Any:
    """The fused merge kernel for ``device``, or None where it cannot run."""
    if device.type != "cuda":
        return None
    if "merge" not in _FUSED:
        try:
            from engine.regional.fused_merge import merge_by_query  # lazy: needs Triton

            _FUSED["merge"] = merge_by_query
        except ImportError:
            _FUSED["merge"] = None
    return _FUSED["merge"]


# Pairs per tile on the portable path, the pairs from which a segment attends alone, and the
# key/value bytes one pass of tiles may gather.
_TILE = 32
_ALONE = 128
_TILE_PASS_BYTES = 64 * 2**20
_VARLEN: dict[str, bool] = {"ok": True, "chunked": True, "checked": False}
# Queries per sequence of the chunked variable-length call: one flash tile.
_CHUNK = 128


def segment_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pairs: BlockPairs,
    tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the packed ``query`` ``(pairs, heads, dim)``, segment by segment, over the
    segment's ``tokens`` keys and values of ``key`` / ``value`` ``(segments * tokens, heads,
    dim)``; the output ``(pairs, heads, dim)`` and its log-sum-exp ``(pairs, heads)`` float32.

    On CUDA in half precision one variable-length flash-attention call does every segment;
    elsewhere segments are cut into tiles of ``_TILE`` queries and attended in batches
    (on the CPU by the fused kernel that returns the log-sum-exp, in bounded memory).
    """
    if query.device.type == "meta":
        return _shape_only_attention(query, key, value, tokens)
    if (
        query.device.type == "cuda"
        and query.dtype in (torch.float16, torch.bfloat16)
        and _VARLEN["ok"]
    ):
        if _VARLEN["chunked"]:
            try:
                out, lse = _chunked_varlen_attention(query, key, value, pairs, tokens)
            except (RuntimeError, NotImplementedError, TypeError):  # no seqused_k here
                _VARLEN["chunked"] = False
            else:
                if _VARLEN["checked"]:
                    return out, lse
                # Once per process: a kernel ignoring seqused_k would read empty key ranges.
                plain = _varlen_attention(query, key, value, pairs, tokens)
                _VARLEN["checked"] = True
                if torch.allclose(out, plain[0], atol=1e-2) and torch.allclose(
                    lse, plain[1], atol=1e-2
                ):
                    return out, lse
                _VARLEN["chunked"] = False
                return plain
        try:
            return _varlen_attention(query, key, value, pairs, tokens)
        except (RuntimeError, NotImplementedError) as exc:  # no flash kernel for this GPU
            _VARLEN["ok"] = False
            warnings.warn(
                f"variable-length flash attention unavailable ({exc}); using tiles", stacklevel=2
            )
    return _tiled_attention(query, key, value, pairs, tokens)


def segment_backend(device: torch.device | str, dtype: torch.dtype) -> str:
    """Which kernel :func:`segment_attention` uses on ``device`` for ``dtype``."""
    device = torch.device(device)
    if device.type == "meta":
        return "shape-only"
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and _VARLEN["ok"]:
        return "varlen-flash, chunked" if _VARLEN["chunked"] else "varlen-flash"
    return "tiles-flash-cpu" if device.type == "cpu" else "tiles-math"


def _shape_only_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    # On the meta device (FLOP counting) values do not exist: every query attending to one
    # segment's keys has the shapes, and so the FLOPs, of the variable-length call.
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1)[None],
        key[:tokens].transpose(0, 1)[None],
        value[:tokens].transpose(0, 1)[None],
    )
    return out[0].transpose(0, 1), query.new_empty(query.shape[:2], dtype=torch.float32)


def _chunked_varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pairs: BlockPairs,
    tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    # Segments cut into sequences of at most one tile of queries, each reading its block's
    # keys in place (start cu_k, length seqused_k): the kernel's grid is sized by the tile,
    # not by the longest segment, so a hundred small blocks launch no idle tiles.
    layout = pairs._derived.get(("chunked", tokens))
    if layout is None:
        starts, key_starts = [], []
        start = 0
        for segment, count in enumerate(pairs.counts):
            for offset in range(0, count, _CHUNK):
                starts.append(start + offset)
                key_starts.append(segment * tokens)
            start += count
        device = query.device
        cu_q = torch.tensor([*starts, start], dtype=torch.int32, device=device)
        cu_k = torch.tensor([*key_starts, len(pairs.counts) * tokens], dtype=torch.int32)
        used = torch.full((len(starts),), tokens, dtype=torch.int32, device=device)
        longest = min(_CHUNK, max(pairs.counts))
        layout = (cu_q, cu_k.to(device), used, longest)
        pairs._derived[("chunked", tokens)] = layout
    cu_q, cu_k, used, longest = layout
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        query.contiguous(),
        key.contiguous(),
        value.contiguous(),
        cu_q,
        cu_k,
        longest,
        tokens,
        0.0,
        False,
        False,
        seqused_k=used,
    )
    heads = query.shape[1]
    if not (lse.dim() == 2 and lse.shape == (heads, pairs.pairs)):
        raise RuntimeError(f"unexpected log-sum-exp layout {tuple(lse.shape)}")
    return out, lse.transpose(0, 1)


def _varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pairs: BlockPairs,
    tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    segments = len(pairs.counts)
    layout = pairs._derived.get(("varlen", tokens))
    if layout is None:
        # Keys of empty segments are left out so each kept segment's keys follow the last's.
        nonempty = [s for s, count in enumerate(pairs.counts) if count]
        keep = None
        cu_q = pairs.cumulative()
        if len(nonempty) < segments:
            keep = torch.tensor(nonempty, device=key.device)
            cu_q = torch.cat([cu_q[:1], cu_q[1:][keep]])
        cu_k = torch.arange(len(nonempty) + 1, device=key.device, dtype=torch.int32) * tokens
        layout = pairs._derived[("varlen", tokens)] = (keep, cu_q, cu_k, max(pairs.counts))
    keep, cu_q, cu_k, longest = layout
    if keep is not None:
        key = key.view(segments, tokens, *key.shape[1:])[keep].flatten(0, 1)
        value = value.view(segments, tokens, *value.shape[1:])[keep].flatten(0, 1)
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        query.contiguous(),
        key.contiguous(),
        value.contiguous(),
        cu_q,
        cu_k,
        longest,
        tokens,
        0.0,
        False,
        False,
    )
    heads = query.shape[1]
    if lse.dim() == 2 and lse.shape == (heads, pairs.pairs):
        return out, lse.transpose(0, 1)  # the variable-length layout: (heads, total queries)
    # Padded per segment, (segments, heads, longest): each pair's row of its segment.
    counts = torch.tensor([c for c in pairs.counts if c], device=lse.device)
    segment = torch.repeat_interleave(torch.arange(len(counts), device=lse.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(pairs.pairs, device=lse.device) - starts[segment]
    return out, lse[segment, :, position].float()


def _tiled_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pairs: BlockPairs,
    tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    heads, dim = query.shape[1:]
    out = torch.empty_like(query)
    lse = torch.empty(query.shape[:2], dtype=torch.float32, device=query.device)
    keys = key.view(-1, tokens, heads, dim)
    values = value.view(-1, tokens, heads, dim)
    # Large segments (the scene and background blocks, big regions) attend alone, with no
    # copies of their keys; the many small ones are batched in tiles.
    start = 0
    for segment, count in enumerate(pairs.counts):
        if count >= _ALONE:
            part = slice(start, start + count)
            part_out, part_lse = _attention_with_lse(
                query[part].transpose(0, 1)[None],
                keys[segment].transpose(0, 1)[None],
                values[segment].transpose(0, 1)[None],
            )
            out[part] = part_out[0].transpose(0, 1)
            lse[part] = part_lse[0].transpose(0, 1)
        start += count
    segment, slots, valid = pairs.tiles(_TILE, below=_ALONE)
    if not len(segment):
        return out, lse
    padded = torch.cat([query, query.new_zeros(1, heads, dim)])
    per_tile = 2 * tokens * heads * dim * key.element_size()
    step = max(1, _TILE_PASS_BYTES // per_tile)
    for first in range(0, len(segment), step):
        part = slice(first, first + step)
        q = padded[slots[part]].transpose(1, 2)  # (tiles, heads, tile, dim)
        k = keys[segment[part]].transpose(1, 2)
        v = values[segment[part]].transpose(1, 2)
        part_out, part_lse = _attention_with_lse(q, k, v)
        filled = valid.view(-1, _TILE)[part].flatten()
        where = slots[part].flatten()[filled]
        out[where] = part_out.transpose(1, 2).flatten(0, 1)[filled]
        lse[where] = part_lse.transpose(1, 2).flatten(0, 1)[filled]
    return out, lse


def _attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention ``(batch, heads, q, dim)`` and its log-sum-exp float32."""
    if query.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value)
        return out, lse.float()
    scale = query.shape[-1] ** -0.5
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    lse = scores.logsumexp(dim=-1)
    out = torch.matmul((scores - lse[..., None]).exp_(), value.float())
    return out.to(query.dtype), lse


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
