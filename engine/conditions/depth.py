"""Depth ControlNet from the scene's depth map, with a strength per region.

The add-on sends the camera's depth (``Layout.depth``: 16-bit grayscale PNG, near = white, the
convention SDXL depth ControlNets are trained on). When the engine has a depth ControlNet, every
UNet call of a Layout generation gets the ControlNet's residuals, added by diffusers' own
``down_block_additional_residuals`` / ``mid_block_additional_residual`` inputs. The ControlNet
runs from a forward pre-hook on the UNet (:class:`DepthControl`), so the regional pipeline's call
is unchanged: no copy of diffusers' ControlNet pipeline is needed.

Strength: ``Layout.depth_scale`` everywhere, between the ``depth_start`` and ``depth_end``
fractions of the steps (diffusers' ``control_guidance_start`` / ``_end``). A region with its
own ``depth_scale`` changes it inside its mask, as Collage Diffusion scales ControlNet residuals
per layer: 1 keeps the object's shape close to its proxy, 0 leaves it free. The per-pixel scale
(:func:`depth_scale_map`) is area-averaged to every residual's resolution
(:func:`residual_multipliers`) and multiplies the residuals there.

The ControlNet's cross-attention sees the regional prompt blocks through the same regional
processors as the UNet (installed for the call only), so each region's prompt conditions the
ControlNet inside its mask too. The ControlNet is the pipeline's registered component
``depth_controlnet``: ``pipe.to()``, CPU offload and ``save_pretrained`` include it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from engine.images import grayscale, open_image
from engine.regional.masks import region_mask
from engine.regional.processors import regional_processors
from engine.wire.layout import Layout

if TYPE_CHECKING:
    from engine.pipeline import RegionalSDXLPipeline


def load_depth(path: str, size: tuple[int, int]) -> torch.Tensor:
    """The depth image as a ControlNet condition ``(1, 3, height, width)`` in 0..1.

    16-bit files keep their precision; the image is resized (bilinear) to ``size``
    ``(height, width)``, the generated image's size.
    """
    from PIL import Image

    with open_image(path, "depth", "save it as a grayscale PNG (near = white)") as image:
        gray = grayscale(image)
    height, width = size
    if gray.shape != (height, width):
        resized = Image.fromarray(gray, mode="F").resize((width, height), Image.Resampling.BILINEAR)
        gray = np.asarray(resized, dtype=np.float32)
    depth = torch.from_numpy(np.clip(gray, 0.0, 1.0))
    return depth[None, None].expand(1, 3, height, width).contiguous()


def depth_scale_map(layout: Layout, latent_size: tuple[int, int]) -> torch.Tensor | None:
    """The ControlNet scale of every latent pixel ``(height, width)``; None if it is uniform.

    With region masks ``m_r``, coverage ``c = max_r m_r`` and each region's scale ``s_r`` (its
    own ``depth_scale``, else the Layout's ``g``), a pixel's scale is
    ``(1 - c) * g + c * sum_r(m_r * s_r) / sum_r(m_r)``: the Layout's scale outside the
    regions, the region's inside it, blended along soft mask edges and averaged where regions
    overlap. None (use ``g`` everywhere) when no region sets its own scale.
    """
    overall = layout.depth_scale
    if all(r.depth_scale is None for r in layout.regions):
        return None
    image_size = (layout.height, layout.width)
    coverage = torch.zeros(latent_size)
    weighted = torch.zeros(latent_size)
    total = torch.zeros(latent_size)
    for index, region in enumerate(layout.regions):
        mask = region_mask(region, index, image_size, latent_size)
        scale = overall if region.depth_scale is None else region.depth_scale
        torch.maximum(coverage, mask, out=coverage)
        weighted += mask * scale
        total += mask
    inside = torch.where(total > 0, weighted / total.clamp_min(1e-12), overall)
    scale_map = (1.0 - coverage) * overall + coverage * inside
    # Exactly 0 where a region of scale 0 covers the whole cell, whatever the rounding.
    return torch.where(coverage >= 1.0, inside, scale_map)


def residual_multipliers(
    scale_map: torch.Tensor, shapes: list[tuple[int, int]]
) -> list[torch.Tensor]:
    """``scale_map`` area-averaged to each residual resolution ``(h, w)``, as ``(1, 1, h, w)``.

    A cell's multiplier is the mean scale over the latent pixels it stands for, so a cell lying
    wholly inside a region of scale 0 gets exactly 0.
    """
    multipliers = []
    for shape in shapes:
        if tuple(shape) == tuple(scale_map.shape):
            pooled = scale_map
        else:
            pooled = F.adaptive_avg_pool2d(scale_map[None, None], tuple(shape))[0, 0]
        multipliers.append(pooled[None, None])
    return multipliers


def active_at(index: int, total: int, start: float, end: float) -> bool:
    """Whether the ControlNet acts at timestep ``index`` of ``total`` (diffusers' rule)."""
    return not (index / total < start or (index + 1) / total > end)


class DepthControl:
    """A UNet forward pre-hook adding depth ControlNet residuals to every denoising call.

    ``scale`` is the uniform conditioning scale; ``scale_map`` (latent size, or None) replaces
    it with per-pixel scales. UNet calls on latents of another size than ``latent_size`` (a
    low-resolution first pass) pass through unchanged.
    """

    def __init__(
        self,
        controlnet: torch.nn.Module,
        condition: torch.Tensor,
        scale: float,
        scale_map: torch.Tensor | None,
        start: float,
        end: float,
        scheduler: Any,
        latent_size: tuple[int, int],
    ):
        self.controlnet = controlnet
        self.condition = condition
        self.scale = scale
        self.scale_map = scale_map
        self.start, self.end = start, end
        self.scheduler = scheduler
        self.latent_size = latent_size
        self._multipliers: list[torch.Tensor] | None = None

    def step_index(self, timestep: Any) -> tuple[int, int]:
        """``(index, total)`` of ``timestep`` in the scheduler's current schedule."""
        timesteps = self.scheduler.timesteps
        index = getattr(self.scheduler, "step_index", None)
        if index is None:
            t = torch.as_tensor(timestep, device=timesteps.device).flatten()[0]
            matches = (timesteps == t).nonzero()
            index = int(matches[0]) if len(matches) else 0
        return int(index), len(timesteps)

    @torch.no_grad()
    def residuals(
        self,
        sample: torch.Tensor,
        timestep: Any,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict[str, Any],
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The ControlNet's down and mid residuals for one UNet call, scaled (per pixel)."""
        param = next(self.controlnet.parameters())
        condition = self.condition.to(device=sample.device, dtype=param.dtype)
        condition = condition.expand(sample.shape[0], *condition.shape[1:])
        added = {k: added_cond_kwargs[k] for k in ("text_embeds", "time_ids")}
        down, mid = self.controlnet(
            sample.to(param.dtype),
            timestep,
            encoder_hidden_states=encoder_hidden_states.to(param.dtype),
            controlnet_cond=condition,
            conditioning_scale=self.scale if self.scale_map is None else 1.0,
            added_cond_kwargs=added,
            return_dict=False,
        )
        if self.scale_map is None:
            return list(down), mid
        if self._multipliers is None:
            shapes = [tuple(r.shape[-2:]) for r in (*down, mid)]
            self._multipliers = residual_multipliers(self.scale_map, shapes)
        scaled = [r * m.to(r) for r, m in zip((*down, mid), self._multipliers, strict=True)]
        return scaled[:-1], scaled[-1]

    def __call__(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        if tuple(sample.shape[-2:]) != self.latent_size:
            return None
        index, total = self.step_index(timestep)
        if not active_at(index, total, self.start, self.end):
            return None
        down, mid = self.residuals(
            sample, timestep, kwargs["encoder_hidden_states"], kwargs["added_cond_kwargs"]
        )
        kwargs = dict(kwargs)
        kwargs["down_block_additional_residuals"] = down
        kwargs["mid_block_additional_residual"] = mid
        return args, kwargs


def depth_unavailable(layout: Layout, controlnet: Any) -> str | None:
    """Why depth conditioning will not act for this Layout (None: it will)."""
    if controlnet is None:
        return "no depth ControlNet is configured (engine option 'controlnet')"
    if layout.depth is None:
        return "the Layout has no 'depth' map"
    scales = [layout.depth_scale] + [r.depth_scale or 0.0 for r in layout.regions]
    if max(scales) <= 0.0:
        return "every depth_scale is 0"
    return None


@contextlib.contextmanager
def depth_control(pipe: RegionalSDXLPipeline, layout: Layout) -> Iterator[DepthControl | None]:
    """Apply the pipeline's depth ControlNet (``pipe.depth_controlnet``) for one Layout call.

    Yields the installed hook, or None when the Layout does not use depth (no ControlNet, no
    depth map, every scale 0): then nothing runs and the call is exactly the plain one.
    """
    controlnet = pipe.depth_controlnet
    if depth_unavailable(layout, controlnet) is not None:
        yield None
        return
    scale = pipe.vae_scale_factor
    latent_size = (layout.height // scale, layout.width // scale)
    hook = DepthControl(
        controlnet,
        load_depth(layout.depth, (layout.height, layout.width)),
        scale=layout.depth_scale,
        scale_map=depth_scale_map(layout, latent_size),
        start=layout.depth_start,
        end=layout.depth_end,
        scheduler=pipe.scheduler,
        latent_size=latent_size,
    )
    # The ControlNet reads the regional prompt blocks like the UNet does, during this call only.
    with regional_processors(controlnet, pipe.regional_context()):
        handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield hook
        finally:
            handle.remove()
