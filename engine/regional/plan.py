"""Regional prompting: which prompt each pixel of each attention grid listens to, and how much.

A Layout becomes a list of prompt *blocks* (scene prompt, background prompt, one block per
distinct region prompt; identical texts share a block) and, for every attention grid the UNet
may use, a per-pixel weight for each block:

- region block ``k``: ``(1 - base_ratio) * max(weight_r * mask_r)`` over the regions with that prompt;
- scene block: ``base_ratio * c`` where ``c = max_r mask_r`` is the pixel's region coverage;
- background block: ``1 - c``;
- a pixel where every weight is 0 listens to the scene block alone.

Cross-attention adds ``log(weight)`` to the scores of the block's tokens (``-inf`` where the
weight is 0), so a pixel attends to each block in proportion to its weight (Paint-with-words /
DenseDiffusion style). ``RegionalState`` holds this for one pipeline call and is what the
attention processors read: per grid the (pixel, block) pairs of non-zero weight
(:class:`BlockPairs`, sparse attention) or the dense bias (the reference), and the text keys and
values each cross-attention layer projects once per call.

Planning works on the grids the UNet attends on (:func:`cross_attention_grids`: 2 for SDXL),
all regions at once: boxes as row and column coverage, mask images stacked in chunks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from engine.regional.masks import region_mask
from engine.wire.layout import Layout


def attention_grids(latent_size: tuple[int, int]) -> list[tuple[int, int]]:
    """Every grid reached by halving the latent with rounding up, the latent itself first.

    UNet downsampling rounds odd sides up, so a 125x93 latent gives 63x47, 32x24, 16x12 ...
    The list ends at 1x1.
    """
    height, width = latent_size
    grids = [(height, width)]
    while grids[-1] != (1, 1):
        h, w = grids[-1]
        grids.append((math.ceil(h / 2), math.ceil(w / 2)))
    return grids


def cross_attention_grids(
    unet_config: Mapping[str, Any], latent_size: tuple[int, int]
) -> list[tuple[int, int]]:
    """The grids on which a UNet of ``unet_config`` runs cross-attention, finest first.

    Down block ``i`` works on the latent halved ``i`` times, up block ``j`` mirrors down block
    ``len - 1 - j`` and the mid block sits at the deepest level; a level counts when one of
    them has cross-attention. For SDXL: latent/2 and latent/4 (2 of the latent's 8-9 grids).
    """
    down = list(unet_config.get("down_block_types") or ())
    up = list(unet_config.get("up_block_types") or ())
    levels = {i for i, kind in enumerate(down) if "CrossAttn" in kind}
    levels |= {len(up) - 1 - j for j, kind in enumerate(up) if "CrossAttn" in kind}
    mid = unet_config.get("mid_block_type") or ""
    if "CrossAttn" in mid and down:
        levels.add(len(down) - 1)
    grids = attention_grids(latent_size)
    return [grids[min(level, len(grids) - 1)] for level in sorted(levels)]


def grid_for_query(query_len: int, latent_size: tuple[int, int]) -> tuple[int, int]:
    """The attention grid ``(height, width)`` whose cell count is ``query_len``."""
    for grid in attention_grids(latent_size):
        if grid[0] * grid[1] == query_len:
            return grid
    raise ValueError(
        f"attention over {query_len} positions matches no grid of the "
        f"{latent_size[0]}x{latent_size[1]} latent; the latents passed to the pipeline do not "
        "match the Layout's width and height"
    )


def downsample_mask(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Area-average a mask to ``grid``, keeping a small region visible.

    A region smaller than a cell would average down to a faint value (or nearly nothing) on
    coarse grids; its strongest cell is raised to the mask's peak so it keeps one full cell.
    """
    return downsample_masks(mask[None], grid)[0]


def downsample_masks(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """:func:`downsample_mask` of each of ``masks`` ``(count, H, W)``, in one pass."""
    if tuple(masks.shape[-2:]) == tuple(grid):
        pooled = masks.clone()
    else:
        pooled = F.adaptive_avg_pool2d(masks[:, None], grid)[:, 0]
    if not len(masks):
        return pooled
    return _raise_peaks(pooled, masks.flatten(1).amax(dim=1))


@dataclass
class RegionPlan:
    """Prompt blocks and their per-pixel weights on the attention grids.

    ``weights[i]`` has shape ``(len(prompts), *grids[i])``. Block 0 is the scene prompt's when
    it has any weight left; blocks with zero weight everywhere are dropped.
    """

    prompts: list[str]
    grids: list[tuple[int, int]]
    weights: list[torch.Tensor]
    latent_size: tuple[int, int]

    def weights_for_query(self, query_len: int) -> torch.Tensor:
        """The ``(blocks, height, width)`` weights on the grid of ``query_len`` positions."""
        grid = grid_for_query(query_len, self.latent_size)
        if grid not in self.grids:
            raise ValueError(
                f"attention runs on the {grid[0]}x{grid[1]} grid, which this plan does not "
                f"weigh ({self.grids}); plan with the UNet's cross_attention_grids"
            )
        return self.weights[self.grids.index(grid)]


def prompt_blocks(layout: Layout, background: str | None = None) -> tuple[list[str], list[int]]:
    """The Layout's distinct prompts (scene first, background second unless they coincide)
    and, for each region, the index of its prompt's block. ``background`` is the Layout's
    effective background prompt, when the caller has it already."""
    if background is None:
        background = layout.effective_background_prompt()
    index: dict[str, int] = {}
    for text in [layout.prompt, background]:
        index.setdefault(_prompt_key(text), len(index))
    region_blocks = [index.setdefault(_prompt_key(r.prompt), len(index)) for r in layout.regions]
    return list(index), region_blocks


def combine_block_weights(
    layout: Layout,
    regional: torch.Tensor,
    coverage: torch.Tensor,
    background: str | None = None,
) -> torch.Tensor:
    """Per-block weights ``(blocks, h, w)`` from the regions' ``regional`` weights (largest
    ``weight_r * mask_r`` per block) and their ``coverage`` (largest mask), as the module
    docstring describes. ``background`` is the Layout's effective background prompt, when the
    caller has it already."""
    if background is None:
        background = layout.effective_background_prompt()
    # Block order as prompt_blocks gives it: scene first, then the background unless equal.
    background = _prompt_key(background)
    scene_block, background_block = 0, (0 if background == _prompt_key(layout.prompt) else 1)
    weights = regional * (1.0 - layout.base_ratio)
    weights[scene_block] += layout.base_ratio * coverage
    weights[background_block] += 1.0 - coverage
    silent = ~(weights > 0).any(dim=0)
    weights[scene_block][silent] = 1.0
    return weights


# Mask images pooled per pass: bounds the stacked masks (64 of 256x256 floats: 16 MiB).
_REGION_CHUNK = 64


def plan_regions(
    layout: Layout,
    latent_size: tuple[int, int],
    masks: Sequence[torch.Tensor] | None = None,
    grids: Sequence[tuple[int, int]] | None = None,
) -> RegionPlan:
    """Group the Layout's prompts into blocks and weigh them on the attention grids.

    ``masks`` (one latent-size tensor per region, 0..1) replaces the regions' own masks and
    boxes, for callers that hold masks in memory. ``grids`` are the grids to weigh (default:
    every grid of the latent); a pipeline passes its UNet's :func:`cross_attention_grids`, so
    no work goes to grids without cross-attention.
    """
    # Cutting every region's phrase out of the scene prompt is the slow part at 100 regions.
    background = layout.effective_background_prompt()
    prompts, region_blocks = prompt_blocks(layout, background)
    grids = attention_grids(latent_size) if grids is None else [tuple(g) for g in grids]
    coverage = [torch.zeros(grid) for grid in grids]
    regional = [torch.zeros((len(prompts), *grid)) for grid in grids]
    blocks = torch.tensor(region_blocks, dtype=torch.int64)
    scale = torch.tensor([r.weight for r in layout.regions], dtype=torch.float32)
    for chunk, pooled in _pooled_regions(layout, latent_size, grids, masks):
        for level, grid in enumerate(grids):
            flat = pooled[level].flatten(1)
            torch.maximum(coverage[level], flat.amax(dim=0).view(grid), out=coverage[level])
            regional[level].view(len(prompts), -1).scatter_reduce_(
                0,
                blocks[chunk][:, None].expand_as(flat),
                flat * scale[chunk][:, None],
                "amax",
                include_self=True,
            )
    weights = [
        combine_block_weights(layout, regions_w, cover, background)
        for cover, regions_w in zip(coverage, regional, strict=True)
    ]
    used = torch.stack([(w > 0).flatten(1).any(dim=1) for w in weights]).any(dim=0)
    keep = [k for k in range(len(prompts)) if used[k]]
    return RegionPlan(
        prompts=[prompts[k] for k in keep],
        grids=grids,
        weights=[w[keep] for w in weights],
        latent_size=latent_size,
    )


def _pooled_regions(
    layout: Layout,
    latent_size: tuple[int, int],
    grids: list[tuple[int, int]],
    masks: Sequence[torch.Tensor] | None,
) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Groups of visible regions: their indices and their masks pooled to each grid
    (:func:`downsample_mask`), ``(regions, h, w)`` per grid. Fully hidden regions are left out.

    A box's coverage is the outer product of its row and column coverage, and area pooling
    acts on rows and columns apart, so boxes are pooled as two short vectors each (equal to
    pooling the full mask up to float rounding) and never drawn at the latent size.
    """
    count = len(layout.regions)
    boxed = [i for i in range(count) if masks is None and layout.regions[i].mask is None]
    if boxed:
        corners = torch.tensor([layout.regions[i].box for i in boxed], dtype=torch.float64)
        rows = _interval_coverages(corners[:, 1], corners[:, 3], latent_size[0])
        cols = _interval_coverages(corners[:, 0], corners[:, 2], latent_size[1])
        peak = rows.amax(dim=1) * cols.amax(dim=1)
        visible = peak > 0
        if visible.any():
            rows, cols, peak = rows[visible], cols[visible], peak[visible]
            pooled = []
            for height, width in grids:
                pooled_rows = F.adaptive_avg_pool1d(rows[:, None], height)[:, 0]
                pooled_cols = F.adaptive_avg_pool1d(cols[:, None], width)[:, 0]
                grid = pooled_rows[:, :, None] * pooled_cols[:, None, :]
                pooled.append(_raise_peaks(grid, peak))
            yield torch.tensor(boxed)[visible], pooled
    drawn = [i for i in range(count) if i not in set(boxed)]
    image_size = (layout.height, layout.width)
    for start in range(0, len(drawn), _REGION_CHUNK):
        chunk = drawn[start : start + _REGION_CHUNK]
        if masks is not None:
            stack = torch.stack([masks[i].to(torch.float32) for i in chunk])
        else:
            stack = torch.stack(
                [region_mask(layout.regions[i], i, image_size, latent_size) for i in chunk]
            )
        visible = stack.flatten(1).amax(dim=1) > 0
        if visible.any():
            stack = stack[visible]
            yield torch.tensor(chunk)[visible], [downsample_masks(stack, grid) for grid in grids]


def _raise_peaks(pooled: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
    """Raise each mask's strongest pooled cell to its full-resolution ``peak`` (in place)."""
    flat = pooled.view(len(pooled), -1)
    strongest = flat.argmax(dim=1, keepdim=True)
    flat.scatter_(1, strongest, torch.maximum(flat.gather(1, strongest), peak[:, None]))
    return pooled


def box_coverages(
    boxes: Sequence[tuple[float, float, float, float]], height: int, width: int
) -> torch.Tensor:
    """:func:`engine.regional.masks.box_coverage` of each box, ``(len(boxes), height, width)``."""
    corners = torch.tensor(boxes, dtype=torch.float64).view(-1, 4)
    rows = _interval_coverages(corners[:, 1], corners[:, 3], height)
    cols = _interval_coverages(corners[:, 0], corners[:, 2], width)
    return rows[:, :, None] * cols[:, None, :]


def _interval_coverages(lo: torch.Tensor, hi: torch.Tensor, cells: int) -> torch.Tensor:
    # Same arithmetic as box_coverage: ends scaled in float64, rounded to float32 on the way.
    edges = torch.arange(cells, dtype=torch.float64)
    top = (hi * cells).float().double()[:, None]
    bottom = (lo * cells).float().double()[:, None]
    covered = torch.minimum(edges + 1, top) - torch.maximum(edges, bottom)
    return covered.clamp(0.0, 1.0).to(torch.float32)


def _prompt_key(text: str) -> str:
    # The tokenizer ignores surrounding whitespace, so such prompts share a block.
    return text.strip()


ATTENTION_KINDS = ("sparse", "dense")
"""How regional cross-attention is computed: per prompt block over the pixels it weighs
(``sparse``) or over every block with an additive bias (``dense``, the reference)."""

BLENDS = ("joint", "weighted")
"""How a pixel combines the blocks it listens to: one softmax over all their tokens with the
log-weight added (``joint``) or per-block attention outputs averaged by the pixel's normalised
weights (``weighted``, Regional Prompter's way of sharing the scene prompt)."""

DEFAULT_KEPT_BYTES = 3 * 2**30
"""Device memory a call may spend keeping text keys and values (fp16 SDXL needs 2.5 GiB for
100 prompts, 0.26 GiB for 8); layers past the budget project their text at every step."""


def kept_bytes_budget(device: torch.device | str, limit: int = DEFAULT_KEPT_BYTES) -> int:
    """What a call on ``device`` may keep: ``limit``, and on a GPU no more than a quarter of
    the memory free when the call starts, so keeping never crowds out the step itself."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return min(limit, free // 4)
    return limit


@dataclass
class BlockPairs:
    """The (query, block) pairs with non-zero weight on one grid, grouped into segments.

    Sparse attention computes exactly these: the queries of segment ``s`` (``counts[s]`` of
    them, after those of the segments before) attend to segment ``s``'s tokens. For a batch
    (:meth:`for_batch`) the first segments are the negative rows, each one whole row over the
    negative prompt, then each other row's blocks in order.
    """

    queries: int
    """Positions per row on the grid."""
    blocks: int
    index: torch.Tensor
    """``(pairs,)`` int64: the query (``row * queries + position``) of each pair."""
    counts: list[int]
    log_weight: torch.Tensor
    """``(pairs,)`` float32: log of the block's weight at the pair's position."""
    share: torch.Tensor
    """``(pairs,)`` float32: the block's weight over the position's weight sum."""
    rows: int = 1
    """Batch rows the pairs cover."""

    @classmethod
    def from_weights(cls, weights: torch.Tensor) -> BlockPairs:
        """Pairs of the non-zero entries of ``(blocks, h, w)`` weights, on their device."""
        flat = weights.flatten(1)
        block, position = (flat > 0).nonzero(as_tuple=True)  # ordered by block, then position
        weight = flat[block, position].to(torch.float32)
        total = flat.to(torch.float32).sum(dim=0)
        counts = torch.bincount(block, minlength=flat.shape[0]).tolist()
        return cls(
            queries=flat.shape[1],
            blocks=flat.shape[0],
            index=position,
            counts=counts,
            log_weight=weight.log(),
            share=weight / total[position],
        )

    def for_batch(self, rows: int, unconditional: int = 0) -> BlockPairs:
        """These pairs for a batch of ``rows`` rows whose first ``unconditional`` rows attend
        to the negative prompt alone (one segment each, weight 1) and the others to the
        blocks (segments row by row)."""
        if rows == 1 and not unconditional:
            return self
        device = self.index.device
        positive = rows - unconditional
        negative = unconditional * self.queries
        offsets = (unconditional + torch.arange(positive, device=device)) * self.queries
        return BlockPairs(
            queries=self.queries,
            blocks=self.blocks,
            index=torch.cat(
                [
                    torch.arange(negative, device=device),
                    (self.index[None] + offsets[:, None]).flatten(),
                ]
            ),
            counts=[self.queries] * unconditional + self.counts * positive,
            log_weight=torch.cat(
                [torch.zeros(negative, device=device), self.log_weight.repeat(positive)]
            ),
            share=torch.cat([torch.ones(negative, device=device), self.share.repeat(positive)]),
            rows=rows,
        )

    _derived: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def pairs(self) -> int:
        """How many (query, block) pairs there are."""
        return len(self.index)

    def cumulative(self) -> torch.Tensor:
        """``(segments + 1,)`` int32 offsets of each segment's first pair, on the device."""
        if "cumulative" not in self._derived:
            counts = torch.tensor([0, *self.counts], dtype=torch.int64)
            self._derived["cumulative"] = counts.cumsum(0).to(self.index.device, torch.int32)
        return self._derived["cumulative"]

    def by_query(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The pairs grouped by query, on the device: their order ``(pairs,)`` int32 and the
        ``(rows * queries + 1,)`` int32 offsets where each query's group starts."""
        if "by_query" not in self._derived:
            queries = self.rows * self.queries
            order = torch.argsort(self.index, stable=True).to(torch.int32)
            counts = torch.bincount(self.index, minlength=queries)
            offsets = torch.zeros(queries + 1, dtype=torch.int64, device=self.index.device)
            offsets[1:] = counts.cumsum(0)
            self._derived["by_query"] = (order, offsets.to(torch.int32))
        return self._derived["by_query"]

    def tiles(
        self, size: int, below: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pairs cut into tiles of ``size`` pairs of one segment each, on the device.

        Returns each tile's segment ``(tiles,)``, its pairs ``(tiles, size)`` (``pairs`` pads a
        segment's last tile) and which of the ``tiles * size`` slots hold a pair. With
        ``below``, only segments of fewer pairs are tiled.
        """
        key = ("tiles", size, below)
        if key not in self._derived:
            counts = torch.tensor(self.counts, dtype=torch.int64)
            ends = counts.cumsum(0)
            tiled = counts if below is None else torch.where(counts < below, counts, 0)
            per_segment = (tiled + size - 1) // size
            segment = torch.repeat_interleave(torch.arange(len(counts)), per_segment)
            first_tile = per_segment.cumsum(0) - per_segment
            local = torch.arange(len(segment)) - first_tile[segment]
            slots = ((ends - counts)[segment] + local * size)[:, None] + torch.arange(size)
            valid = slots < ends[segment][:, None]
            slots = torch.where(valid, slots, self.pairs)
            device = self.index.device
            self._derived[key] = (segment.to(device), slots.to(device), valid.flatten().to(device))
        return self._derived[key]


class RegionalState:
    """What the regional attention processors read during one pipeline call.

    ``block_tokens`` is the token length of one encoded prompt block (77 for SDXL). With
    classifier-free guidance the first half of the batch is the negative prompt tiled once per
    block; since identical blocks blend to plain attention whatever the weights, that half
    attends to its first block only, with no bias.

    ``attention`` (one of ``ATTENTION_KINDS``) and ``blend`` (one of ``BLENDS``) choose how the
    other half attends. What a call derives once is kept until :meth:`release`: per grid the
    block pairs (sparse) or the bias (dense), on the device; per cross-attention layer the
    projected text keys and values, within ``kept_bytes`` bytes.
    """

    def __init__(
        self,
        plan: RegionPlan,
        block_tokens: int,
        guided: bool,
        *,
        attention: str = "sparse",
        blend: str = "joint",
        kept_bytes: int = DEFAULT_KEPT_BYTES,
    ):
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        if blend not in BLENDS:
            raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
        self.plan = plan
        self.block_tokens = block_tokens
        self.guided = guided
        self.attention = attention
        self.blend = blend
        self.kept_budget = kept_bytes
        self._bias: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}
        self._pairs: dict[tuple[int, torch.device, int], BlockPairs] = {}
        self._kept: dict[Hashable, tuple[Any, Any, tuple[torch.Tensor, ...], int]] = {}
        self.kept_bytes = 0
        """Bytes of keys and values kept now."""
        self.peak_kept_bytes = 0
        """The most bytes of keys and values this call kept at once (survives :meth:`release`)."""

    @property
    def num_tokens(self) -> int:
        """Token length of the concatenated positive prompt blocks."""
        return len(self.plan.prompts) * self.block_tokens

    def unconditional_rows(self, batch_size: int) -> int:
        """How many leading rows of a batch are the negative (unconditional) prompt."""
        return batch_size // 2 if self.guided else 0

    def attention_bias(self, query_len: int, dtype: torch.dtype, device: torch.device):
        """Additive attention bias ``(1, 1, query_len, num_tokens)``: log of each block's weight.

        Built on ``device`` in ``dtype`` (dense attention only; sparse attention never builds
        a queries x tokens tensor).
        """
        key = (query_len, dtype, torch.device(device))
        bias = self._bias.get(key)
        if bias is None:
            weights = self.plan.weights_for_query(query_len).to(device=device, dtype=dtype)
            per_block = weights.flatten(1).T.log()  # (query_len, blocks)
            bias = per_block.repeat_interleave(self.block_tokens, dim=1)[None, None]
            self._bias[key] = bias
        return bias

    def block_pairs(
        self, query_len: int, device: torch.device | str, rows: int = 1, unconditional: int = 0
    ) -> BlockPairs:
        """The weighted (query, block) pairs on the grid of ``query_len`` positions, for a
        batch of ``rows`` rows, the first ``unconditional`` of them the negative prompt's
        (:meth:`BlockPairs.for_batch`), built on ``device`` once per call."""
        device = torch.device(device)
        key = (query_len, device, rows, unconditional)
        pairs = self._pairs.get(key)
        if pairs is None:
            if rows == 1 and not unconditional:
                weights = self.plan.weights_for_query(query_len)
                if device.type == "meta":
                    # Shapes only (FLOP counting): the pairs are found where the values are.
                    pairs = _to_device(BlockPairs.from_weights(weights), device)
                else:
                    pairs = BlockPairs.from_weights(weights.to(device))
            else:
                pairs = self.block_pairs(query_len, device).for_batch(rows, unconditional)
            self._pairs[key] = pairs
        return pairs

    def kept(
        self, key: Hashable, source: Any, make: Callable[[], tuple[torch.Tensor, ...]]
    ) -> tuple[torch.Tensor, ...]:
        """``make()``, computed once per call for ``key`` while ``source`` stays the same.

        ``source`` is what the values derive from: a tensor (the same object, unmodified) or
        any comparable description. Values are kept while they fit the call's byte budget;
        past it they are made again at every use.
        """
        entry = self._kept.get(key)
        version = getattr(source, "_version", None)
        if entry is not None and _same(entry[0], source) and entry[1] == version:
            return entry[2]
        values = make()
        if entry is not None:
            self.kept_bytes -= entry[3]
            del self._kept[key]
        size = sum(t.numel() * t.element_size() for t in values)
        if self.kept_bytes + size <= self.kept_budget:
            self._kept[key] = (source, version, values, size)
            self.kept_bytes += size
            self.peak_kept_bytes = max(self.peak_kept_bytes, self.kept_bytes)
        return values

    def per_grid_bytes(self) -> int:
        """Bytes of the per-grid data built so far: the dense biases and the sparse pairs."""
        total = sum(bias.numel() * bias.element_size() for bias in self._bias.values())
        for pairs in self._pairs.values():
            tensors = [pairs.index, pairs.log_weight, pairs.share]
            for derived in pairs._derived.values():
                tensors += list(derived) if isinstance(derived, tuple) else [derived]
            total += sum(
                t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)
            )
        return total

    def release(self) -> None:
        """Drop what the call kept (keys and values, pairs, biases)."""
        self._kept.clear()
        self._pairs.clear()
        self._bias.clear()
        self.kept_bytes = 0


def _same(kept: Any, source: Any) -> bool:
    if isinstance(kept, torch.Tensor) or isinstance(source, torch.Tensor):
        return kept is source
    return kept == source


def _to_device(pairs: BlockPairs, device: torch.device) -> BlockPairs:
    return BlockPairs(
        queries=pairs.queries,
        blocks=pairs.blocks,
        index=pairs.index.to(device),
        counts=pairs.counts,
        log_weight=pairs.log_weight.to(device),
        share=pairs.share.to(device),
    )
