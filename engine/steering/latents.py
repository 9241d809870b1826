"""Latent helpers the step-end hooks share: noise levels, the run's noise, VAE encoding.

The reference pull (:mod:`engine.steering.reference_pull`) and per-object strength
(:mod:`engine.steering.object_strength`) both change the latents between steps toward an
image's latents noised to the current level; :mod:`engine.steering.hooks` chains them.
Noise levels. With ``N`` steps, *level* ``k`` is the latent that enters step ``k`` (level 0 is
the starting latent), and level ``N`` is the clean result. A step-end hook called with
``step = i`` sees the latents after the scheduler step, i.e. level ``i + 1``. A clean image's
latents ``x0`` are brought to level ``k < N`` with the scheduler's own ``add_noise`` and the
run's starting noise (as diffusers' inpainting pipelines do): ``x0 + sigma_k * noise`` for
Euler-type schedulers (whose starting latents are ``noise * init_noise_sigma``),
``sqrt(abar) * x0 + sqrt(1 - abar) * noise`` for DDIM-type ones. Using the run's own noise makes
the difference between the latents and a noised image measure content, not two noise samples.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import torch
from diffusers.utils.torch_utils import randn_tensor

from engine.wire.layout import Layout

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline

StepEnd = Callable[[Any, int, Any, dict], dict]
"""diffusers' ``callback_on_step_end(pipe, step, timestep, tensors) -> tensors to replace``."""


class LatentHook(Protocol):
    """A step-end hook that may also change the starting latents (level 0)."""

    def start(self, latents: torch.Tensor, scheduler: Any) -> torch.Tensor:
        """The starting latents (already scaled by ``init_noise_sigma``), edited at level 0."""

    def __call__(self, pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
        """diffusers' step-end callback: ``{"latents": ...}`` to replace them, or ``{}``."""


# -- Scheduler levels ---------------------------------------------------------------------------


def set_schedule(pipe: StableDiffusionXLPipeline, steps: int) -> None:
    """Give the scheduler the timesteps the pipeline call will set, so levels can be computed.

    Raises ValueError for schedulers that call back between the two halves of a step (Heun,
    DPM2): editing the latents there would break their second-order correction.
    """
    scheduler = pipe.scheduler
    if getattr(scheduler, "order", 1) != 1:
        raise ValueError(
            f"{type(scheduler).__name__} takes {scheduler.order} model calls per step, which "
            "the reference pull and per-object strength cannot edit between; choose a one-call "
            "sampler (Euler, Euler a, DPM++ 2M, UniPC, DDIM)"
        )
    scheduler.set_timesteps(steps, device=pipe._execution_device)


def noised(scheduler: Any, clean: torch.Tensor, noise: torch.Tensor, level: int) -> torch.Tensor:
    """``clean`` latents at noise level ``level`` of the current schedule (see module docs).

    Inside a pipeline call, Euler-type schedulers take the level from their step index, which
    at step-end is exactly ``level``; before the call (level 0) from the timestep.
    """
    timesteps = scheduler.timesteps
    if level >= len(timesteps):
        return clean.expand_as(noise)
    return scheduler.add_noise(clean, noise, timesteps[level : level + 1])


def initial_noise(
    pipe: StableDiffusionXLPipeline, layout: Layout, generator: Any, batch_size: int = 1
) -> torch.Tensor:
    """The noise the pipeline would draw for this call, drawn the same way from ``generator``.

    Passing it back as ``latents=`` gives the pipeline exactly the starting point it would have
    drawn itself, and leaves ``generator`` in the same state for ancestral samplers.
    """
    scale = pipe.vae_scale_factor
    shape = (
        batch_size,
        pipe.unet.config.in_channels,
        layout.height // scale,
        layout.width // scale,
    )
    # The pipeline draws in the dtype of the prompt embeddings, which is text_encoder_2's.
    encoder = getattr(pipe, "text_encoder_2", None)
    dtype = encoder.dtype if encoder is not None else pipe.unet.dtype
    return randn_tensor(shape, generator=generator, device=pipe._execution_device, dtype=dtype)


# -- Encoding -------------------------------------------------------------------------------------


@torch.no_grad()
def encode_image(
    pipe: StableDiffusionXLPipeline, image: Any, width: int, height: int
) -> torch.Tensor:
    """Scaled VAE latents ``(1, C, height / f, width / f)`` of an image, resized to the size.

    The posterior's mode is used, not a sample, so the same image always gives the same
    latents and decoding them is the VAE's plain round trip.
    """
    vae = pipe.vae
    pixels = pipe.image_processor.preprocess(image, height=height, width=width)
    dtype = vae.dtype
    # fp16 SDXL VAEs overflow; encode in float32 as diffusers' img2img does.
    upcast = dtype == torch.float16 and vae.config.force_upcast
    if upcast:
        vae.to(dtype=torch.float32)
    try:
        device = pipe._execution_device
        pixels = pixels.to(device=device, dtype=vae.dtype)
        latents = vae.encode(pixels).latent_dist.mode()
    finally:
        if upcast:
            vae.to(dtype=dtype)
    mean = getattr(vae.config, "latents_mean", None)
    std = getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        channels = latents.shape[1]
        mean = torch.tensor(mean, device=latents.device).view(1, channels, 1, 1)
        std = torch.tensor(std, device=latents.device).view(1, channels, 1, 1)
        return (latents - mean) * vae.config.scaling_factor / std
    return latents * vae.config.scaling_factor


def blend(kept: torch.Tensor, free: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``kept + weight * (free - kept)``, exactly ``kept`` where weight is 0, ``free`` where 1."""
    mixed = kept + weight * (free - kept)
    return torch.where(weight >= 1, free, torch.where(weight <= 0, kept, mixed))
