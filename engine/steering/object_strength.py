"""Per-object strength (as in Collage Diffusion) and re-generating one object of a result.

Start from ``init_image`` and give every region its own noise strength, and the background the
Layout's ``strength``. Like img2img, strength ``s`` over ``N`` steps leaves the last
``floor(N * s)`` steps free; before that, at every level ``k <= N - floor(N * s)``, the region's
latents are replaced by the init image's latents noised to level ``k`` (levels as in
:mod:`engine.steering.latents`). Strength 0 keeps the init latents through level ``N``, the clean
result; strength 1 never re-imposes anything.

The run starts from pure noise (the pipeline's own) with the init image re-imposed, rather than
skipping the first steps as img2img does. That keeps both ends exact: strength 1 everywhere is
the unguided text-to-image result bit for bit, and strength 0 everywhere returns the init
image's latents exactly (so the image up to the VAE round trip). The price: steps before the
highest strength's start run in full and are then overwritten.

Region masks are feathered (Gaussian blur in latent space) so kept and regenerated areas blend
without seams. With ``keep_outside`` the decoded image is composited with the init image: pixels
farther than a narrow band from every region of strength above 0 are the init image's, exactly.

Re-generating one object (:func:`engine.wire.edits.regenerate_layout`) is this with the object
at strength 1, everything else at 0, ``keep_outside`` and a new seed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from engine.regional.masks import blur, region_mask
from engine.steering.latents import blend, encode_image, noised
from engine.wire.layout import Layout

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline

FEATHER = 1.0
"""Standard deviation, in latent pixels, of the blur that feathers region masks."""


def region_strength(layout: Layout, index: int) -> float:
    """The strength that applies to region ``index``: its own, else the Layout's."""
    own = layout.regions[index].strength
    return layout.strength if own is None else own


def keeps_init(layout: Layout) -> bool:
    """Whether any part of ``layout`` keeps some of its init image (a strength below 1)."""
    strengths = [region_strength(layout, i) for i in range(len(layout.regions))]
    return min([layout.strength, *strengths]) < 1.0


def kept_levels(strength: float, steps: int) -> int:
    """How many levels, from level 0, keep the init image at this strength (0 = none)."""
    if strength >= 1.0:
        return 0
    # The small epsilon keeps 0.3 * 10 = 3.0000000000000004 and 0.29 * 100 = 28.999... whole.
    free_steps = math.floor(steps * strength + 1e-6)
    return steps - free_steps + 1


def free_maps(
    layout: Layout, latent_size: tuple[int, int], sigma: float = FEATHER
) -> list[torch.Tensor | None]:
    """For levels ``0 .. steps``: how much of each latent pixel the model decides (1) versus
    the init image (0), ``(H, W)``; None at levels where every pixel is free.

    With feathered masks ``m_r`` and coverage ``c = max_r m_r``, a pixel's free weight is
    ``(1 - c) * background_free + max_r(m_r * region_free_r)``: single layers blend linearly,
    and where regions overlap the freer one wins (a regenerated object stays whole).
    """
    steps = layout.steps
    image_size = (layout.height, layout.width)
    masks, kept = [], []
    for index, region in enumerate(layout.regions):
        mask = region_mask(region, index, image_size, latent_size)
        if mask.any():
            masks.append(blur(mask, sigma))
            kept.append(kept_levels(region_strength(layout, index), steps))
    coverage = torch.stack(masks).amax(dim=0) if masks else torch.zeros(latent_size)
    background_kept = kept_levels(layout.strength, steps)
    maps: list[torch.Tensor | None] = []
    for level in range(steps + 1):
        if level >= background_kept and all(level >= k for k in kept):
            maps.append(None)
            continue
        regions_free = torch.zeros(latent_size)
        for mask, region_kept in zip(masks, kept, strict=True):
            if level >= region_kept:
                torch.maximum(regions_free, mask, out=regions_free)
        free = regions_free + ((1.0 - coverage) if level >= background_kept else 0.0)
        # (1 - c) + c may round to just below 1 or 0 to just above: snap so blend() is exact.
        free = torch.where(free > 1 - 1e-6, 1.0, torch.where(free < 1e-6, 0.0, free))
        maps.append(free)
    return maps


@dataclasses.dataclass
class ObjectStrength:
    """Step-end hook re-imposing the noised init latents where regions are kept."""

    init: torch.Tensor
    """Clean init latents ``(1, C, h, w)``."""
    noise: torch.Tensor
    """The run's starting noise ``(B, C, h, w)``."""
    free: list[torch.Tensor | None]
    """Per level ``0 .. steps``: free weight ``(1, 1, h, w)``, None where all is free."""

    def apply(self, latents: torch.Tensor, scheduler: Any, level: int) -> torch.Tensor:
        """Latents at ``level`` with the kept parts re-imposed (the same tensor if none)."""
        free = self.free[level] if level < len(self.free) else None
        if free is None:
            return latents
        kept = noised(scheduler, self.init, self.noise, level).to(latents.dtype)
        return blend(kept, latents, free.to(latents.dtype))

    def start(self, latents: torch.Tensor, scheduler: Any) -> torch.Tensor:
        """The starting latents with level 0's kept parts re-imposed."""
        return self.apply(latents, scheduler, 0)

    def __call__(self, pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
        """diffusers' step-end callback: re-imposes at the next level where needed."""
        level = step + 1
        updated = self.apply(tensors["latents"], pipe.scheduler, level)
        return {} if updated is tensors["latents"] else {"latents": updated}


def keep_alpha(layout: Layout, band: int) -> np.ndarray:
    """Per-pixel weight of the generated image in the ``keep_outside`` composite, ``(H, W)``.

    1 inside every region of strength above 0, falling to 0 over ``2 * band`` pixels around
    it, exactly 0 beyond.
    """
    size = (layout.height, layout.width)
    changed = torch.zeros(size)
    for index, region in enumerate(layout.regions):
        if region_strength(layout, index) > 0:
            torch.maximum(changed, region_mask(region, index, size, size), out=changed)
    if band > 0:
        width = 2 * band + 1
        # Grow by the band, then average over the same window: 1 on the region, a ramp, 0.
        grown = F.max_pool2d(changed[None, None], width, stride=1, padding=band)
        changed = F.avg_pool2d(grown, width, stride=1, padding=band, count_include_pad=False)[0, 0]
    return changed.numpy()


def composite_outside(image: Any, init: Any, alpha: np.ndarray):
    """``image`` where ``alpha`` is 1, ``init`` where it is 0 (exactly), mixed between.

    Both are PIL images; ``init`` is resized to ``image`` if their sizes differ.
    """
    from PIL import Image

    if init.size != image.size:
        init = init.resize(image.size, Image.Resampling.LANCZOS)
    generated = np.asarray(image.convert("RGB"), dtype=np.float32)
    kept = np.asarray(init.convert("RGB"), dtype=np.float32)
    weight = alpha[..., None]
    mixed = np.rint(kept + weight * (generated - kept))
    out = np.where(weight >= 1, generated, np.where(weight <= 0, kept, mixed))
    return Image.fromarray(out.astype(np.uint8), "RGB")


def prepare_object_strength(
    pipe: StableDiffusionXLPipeline, layout: Layout, init_image: Any, noise: torch.Tensor
) -> tuple[ObjectStrength | None, Callable[[Any], Any] | None]:
    """The strength hook (None when nothing is kept) and the ``keep_outside`` composite
    (None when off) for ``layout`` starting from the PIL ``init_image``."""
    init = encode_image(pipe, init_image, layout.width, layout.height).to(noise.dtype)
    maps = free_maps(layout, tuple(init.shape[-2:]))
    hook = None
    if any(m is not None for m in maps):
        free = [None if m is None else m[None, None].to(noise.device) for m in maps]
        hook = ObjectStrength(init=init, noise=noise, free=free)
    composite = None
    if layout.keep_outside:
        # The latent feather reaches about two latent pixels; the band covers it.
        alpha = keep_alpha(layout, band=pipe.vae_scale_factor)

        def composite(image: Any) -> Any:
            return composite_outside(image, init_image, alpha)

    return hook, composite
