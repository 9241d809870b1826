"""The reference pull (as in LSReGen): the first steps' latents move toward a layout reference.

A layout reference already has the right low-frequency layout: the add-on's flat-colour render of
the proxies from the camera, a GLIGEN image of the regions' phrases in their boxes (when the
engine has a GLIGEN model, :mod:`engine.conditions.gligen`), or an upsampled low-resolution first pass
(:func:`reference_source` says which). During the first
``reference_fraction`` of the steps, each step's latents move down the gradient of
``||M * (z_t - z_ref_t)||^2``, where ``z_ref_t`` is the reference's latents noised to the same
level with the run's own noise (see :mod:`engine.steering.latents`)::

    z_t <- z_t - gamma * 2 * M^2 * (z_t - z_ref_t)

The gradient is closed-form: no backward pass through the UNet, so a guided step costs what a
plain one does. ``M^2`` is 0 outside the regions (the background is left to the prompt) and,
inside region ``r``, ``scale_r * mask_r^2`` where small regions get a larger scale (LSReGen:
they need a stronger pull to hold their place)::

    scale_r = clip((AREA_REF / area_r) ** AREA_POWER, 1, AREA_CAP)

The per-pixel step ``2 * gamma * M^2`` is capped at 1, which lands exactly on ``z_ref_t``: a
larger step would overshoot the reference.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from engine.conditions.gligen import gligen_reference
from engine.images import load_rgb
from engine.regional.masks import region_mask
from engine.steering.latents import encode_image, noised
from engine.wire.edits import FIRST_PASS_FACTOR, first_pass_layout
from engine.wire.layout import Layout

if TYPE_CHECKING:
    from engine.pipeline import RegionalSDXLPipeline

AREA_REF = 0.25
"""Regions covering at least this fraction of the image are pulled with scale 1."""
AREA_POWER = 0.5
"""How fast the scale grows as a region shrinks below AREA_REF."""
AREA_CAP = 4.0
"""Largest per-region scale (reached at AREA_REF / 16 with AREA_POWER 0.5)."""


def region_scale(
    area: float, area_ref: float = AREA_REF, power: float = AREA_POWER, cap: float = AREA_CAP
) -> float:
    """A region's pull scale from its area (fraction of the image): larger for small regions."""
    if area <= 0:
        return 0.0
    return min(max((area_ref / area) ** power, 1.0), cap)


def pull_map(layout: Layout, latent_size: tuple[int, int], gamma: float) -> torch.Tensor:
    """Per-latent-pixel step ``min(1, 2 * gamma * M^2)``, shape ``latent_size``.

    ``M^2`` is the largest ``scale_r * mask_r^2`` over the regions covering the pixel; regions
    with weight 0 (turned off) and fully hidden ones do not pull.
    """
    weight = torch.zeros(latent_size)
    image_size = (layout.height, layout.width)
    for index, region in enumerate(layout.regions):
        if region.weight <= 0:
            continue
        mask = region_mask(region, index, image_size, latent_size)
        area = float(mask.mean())
        if area <= 0:
            continue
        torch.maximum(weight, region_scale(area) * mask.square(), out=weight)
    return (2.0 * gamma * weight).clamp(0.0, 1.0)


def pulled_levels(fraction: float, steps: int) -> int:
    """How many levels, from level 0, are pulled: the nearest whole number of steps, at least
    one when ``fraction`` is above 0."""
    if fraction <= 0:
        return 0
    return min(steps, max(1, round(fraction * steps)))


@dataclasses.dataclass
class ReferencePull:
    """Step-end hook pulling levels ``0 .. levels - 1`` toward the noised reference."""

    reference: torch.Tensor
    """Clean reference latents ``(1, C, h, w)``."""
    noise: torch.Tensor
    """The run's starting noise ``(B, C, h, w)``."""
    pull: torch.Tensor
    """Per-pixel step in 0..1, ``(1, 1, h, w)``."""
    levels: int

    def apply(self, latents: torch.Tensor, scheduler: Any, level: int) -> torch.Tensor:
        """Latents at ``level`` after the pull (the same tensor when the level is not pulled)."""
        if level >= self.levels:
            return latents
        target = noised(scheduler, self.reference, self.noise, level).to(latents.dtype)
        return latents - self.pull.to(latents.dtype) * (latents - target)

    def start(self, latents: torch.Tensor, scheduler: Any) -> torch.Tensor:
        """The starting latents, pulled at level 0."""
        return self.apply(latents, scheduler, 0)

    def __call__(self, pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
        """diffusers' step-end callback: pulls the latents of the next level while pulled."""
        level = step + 1
        if level >= self.levels:
            return {}
        return {"latents": self.apply(tensors["latents"], pipe.scheduler, level)}


def prepare_reference_pull(
    pipe: RegionalSDXLPipeline, layout: Layout, image: Any, noise: torch.Tensor
) -> ReferencePull:
    """Encode the reference ``image`` and weigh the regions for ``layout``'s settings.

    ``noise`` is the run's starting noise (:func:`engine.steering.latents.initial_noise`).
    """
    reference = encode_image(pipe, image, layout.width, layout.height).to(noise.dtype)
    pull = pull_map(layout, tuple(reference.shape[-2:]), layout.reference_scale)
    levels = pulled_levels(layout.reference_fraction, layout.steps)
    return ReferencePull(
        reference=reference,
        noise=noise,
        pull=pull[None, None].to(device=noise.device),
        levels=levels if layout.reference_scale > 0 else 0,
    )


def first_pass_reference(
    pipe: RegionalSDXLPipeline,
    layout: Layout,
    factor: float = FIRST_PASS_FACTOR,
    **call_kwargs: Any,
) -> Any:
    """Two-pass mode: generate ``layout`` small with regional attention and upsample it to
    the Layout's size, as the reference for the full-size pass (a PIL image).

    ``pipe`` is a :class:`engine.pipeline.RegionalSDXLPipeline`; ``call_kwargs`` go to its call
    (a generator, a step-end callback for progress).
    """
    from PIL import Image

    small = first_pass_layout(layout, factor)
    image = pipe(layout=small, output_type="pil", **call_kwargs).images[0]
    if image.size == (layout.width, layout.height):
        return image
    return image.resize((layout.width, layout.height), Image.Resampling.BICUBIC)


def reference_source(pipe: RegionalSDXLPipeline, layout: Layout) -> str | None:
    """Where ``layout``'s layout reference comes from with ``pipe``; None when the pull is off.

    ``file``: the Layout's ``reference``; ``gligen``: the GLIGEN model attached to ``pipe``
    (``pipe.gligen_pipeline``), for a Layout with a region of weight above 0;
    ``first_pass``: a low-resolution first pass of ``pipe`` itself.
    """
    if layout.reference_scale <= 0 or pulled_levels(layout.reference_fraction, layout.steps) == 0:
        return None
    if layout.reference is not None:
        return "file"
    if pipe.gligen_pipeline is not None and any(region.weight > 0 for region in layout.regions):
        return "gligen"
    return "first_pass"


def layout_reference(pipe: RegionalSDXLPipeline, layout: Layout, **first_pass_kwargs: Any) -> Any:
    """The layout reference to pull ``layout`` toward (PIL), or None when the pull is off.

    Made as :func:`reference_source` says. ``first_pass_kwargs`` go to the first pass's call;
    their ``callback_on_step_end`` (progress, cancel) also sees each step of a GLIGEN pass.
    """
    source = reference_source(pipe, layout)
    if source is None:
        return None
    if source == "file":
        return load_rgb(layout.reference, "reference")
    if source == "gligen":
        callback = first_pass_kwargs.get("callback_on_step_end")
        return gligen_reference(pipe.gligen_pipeline, layout, callback=callback)
    return first_pass_reference(pipe, layout, **first_pass_kwargs)
