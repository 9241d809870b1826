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
attention processors read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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
    if tuple(mask.shape) == grid:
        pooled = mask.clone()
    else:
        pooled = F.adaptive_avg_pool2d(mask[None, None], grid)[0, 0]
    peak = mask.max()
    strongest = pooled.argmax()
    flat = pooled.view(-1)
    flat[strongest] = torch.maximum(flat[strongest], peak)
    return pooled


@dataclass
class RegionPlan:
    """Prompt blocks and their per-pixel weights on every attention grid.

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
        return self.weights[self.grids.index(grid)]


def prompt_blocks(layout: Layout) -> tuple[list[str], list[int]]:
    """The Layout's distinct prompts (scene first, background second unless they coincide)
    and, for each region, the index of its prompt's block."""
    index: dict[str, int] = {}
    for text in [layout.prompt, layout.effective_background_prompt()]:
        index.setdefault(_prompt_key(text), len(index))
    region_blocks = [index.setdefault(_prompt_key(r.prompt), len(index)) for r in layout.regions]
    return list(index), region_blocks


def combine_block_weights(
    layout: Layout, regional: torch.Tensor, coverage: torch.Tensor
) -> torch.Tensor:
    """Per-block weights ``(blocks, h, w)`` from the regions' ``regional`` weights (largest
    ``weight_r * mask_r`` per block) and their ``coverage`` (largest mask), as the module
    docstring describes."""
    # Block order as prompt_blocks gives it: scene first, then the background unless equal.
    background = _prompt_key(layout.effective_background_prompt())
    scene_block, background_block = 0, (0 if background == _prompt_key(layout.prompt) else 1)
    weights = regional * (1.0 - layout.base_ratio)
    weights[scene_block] += layout.base_ratio * coverage
    weights[background_block] += 1.0 - coverage
    silent = ~(weights > 0).any(dim=0)
    weights[scene_block][silent] = 1.0
    return weights


def plan_regions(
    layout: Layout,
    latent_size: tuple[int, int],
    masks: Sequence[torch.Tensor] | None = None,
) -> RegionPlan:
    """Group the Layout's prompts into blocks and weigh them on every attention grid.

    ``masks`` (one latent-size tensor per region, 0..1) replaces the regions' own masks and
    boxes, for callers that hold masks in memory.
    """
    prompts, region_blocks = prompt_blocks(layout)
    grids = attention_grids(latent_size)
    coverage = [torch.zeros(grid) for grid in grids]
    regional = [torch.zeros((len(prompts), *grid)) for grid in grids]
    image_size = (layout.height, layout.width)
    for i, (region, block) in enumerate(zip(layout.regions, region_blocks, strict=True)):
        mask = masks[i] if masks is not None else region_mask(region, i, image_size, latent_size)
        if not mask.any():
            continue  # fully hidden object: nothing to place
        for level, grid in enumerate(grids):
            pooled = downsample_mask(mask, grid)
            torch.maximum(coverage[level], pooled, out=coverage[level])
            torch.maximum(
                regional[level][block], region.weight * pooled, out=regional[level][block]
            )
    weights = [
        combine_block_weights(layout, regions_w, cover)
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


def _prompt_key(text: str) -> str:
    # The tokenizer ignores surrounding whitespace, so such prompts share a block.
    return text.strip()


class RegionalState:
    """What the regional attention processors read during one pipeline call.

    ``block_tokens`` is the token length of one encoded prompt block (77 for SDXL). With
    classifier-free guidance the first half of the batch is the negative prompt tiled once per
    block; since identical blocks blend to plain attention whatever the weights, that half
    attends to its first block only, with no bias. Biases are built once per query length and
    kept for the whole call.
    """

    def __init__(self, plan: RegionPlan, block_tokens: int, guided: bool):
        self.plan = plan
        self.block_tokens = block_tokens
        self.guided = guided
        self._bias: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    @property
    def num_tokens(self) -> int:
        """Token length of the concatenated positive prompt blocks."""
        return len(self.plan.prompts) * self.block_tokens

    def unconditional_rows(self, batch_size: int) -> int:
        """How many leading rows of a batch are the negative (unconditional) prompt."""
        return batch_size // 2 if self.guided else 0

    def attention_bias(self, query_len: int, dtype: torch.dtype, device: torch.device):
        """Additive attention bias ``(1, 1, query_len, num_tokens)``: log of each block's weight."""
        key = (query_len, dtype, device)
        bias = self._bias.get(key)
        if bias is None:
            weights = self.plan.weights_for_query(query_len)
            per_block = weights.flatten(1).T.log()  # (query_len, blocks)
            bias = per_block.repeat_interleave(self.block_tokens, dim=1)
            bias = bias.to(device=device, dtype=dtype)[None, None]
            self._bias[key] = bias
        return bias
