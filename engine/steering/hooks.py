"""Latent edits between denoising steps, as diffusers' ``callback_on_step_end`` hooks.

Reference guidance (:mod:`engine.guidance`) and per-region strength (:mod:`engine.collage`) both
change the latents between steps toward an image's latents noised to the current level. This
module holds what they share and :func:`prepare_step_hooks`, which reads a Layout and returns
everything a pipeline call needs: the starting latents, the step-end callback and the final
pixel composite.

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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from diffusers.utils.torch_utils import randn_tensor

from engine.wire.layout import Layout, LayoutError

StepEnd = Callable[[Any, int, Any, dict], dict]
"""diffusers' ``callback_on_step_end(pipe, step, timestep, tensors) -> tensors to replace``."""


class LatentHook(Protocol):
    """A step-end hook that may also change the starting latents (level 0)."""

    def start(self, latents: torch.Tensor, scheduler: Any) -> torch.Tensor:
        """The starting latents (already scaled by ``init_noise_sigma``), edited at level 0."""

    def __call__(self, pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
        """diffusers' step-end callback: ``{"latents": ...}`` to replace them, or ``{}``."""


# -- Scheduler levels ---------------------------------------------------------------------------


def set_schedule(pipe: Any, steps: int) -> None:
    """Give the scheduler the timesteps the pipeline call will set, so levels can be computed.

    Raises ValueError for schedulers that call back between the two halves of a step (Heun,
    DPM2): editing the latents there would break their second-order correction.
    """
    scheduler = pipe.scheduler
    if getattr(scheduler, "order", 1) != 1:
        raise ValueError(
            f"{type(scheduler).__name__} takes {scheduler.order} model calls per step, which "
            "reference guidance and per-region strength cannot edit between; choose a one-call "
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


def initial_noise(pipe: Any, layout: Layout, generator: Any, batch_size: int = 1) -> torch.Tensor:
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


# -- Images -------------------------------------------------------------------------------------


def load_rgb(path: str, field_name: str):
    """An image file as an RGB PIL image; LayoutError naming ``field_name`` if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise LayoutError(
            f"'{field_name}' {path!r} does not exist; write the image first or fix the path",
            field_name,
        ) from None
    except (OSError, UnidentifiedImageError) as exc:
        raise LayoutError(
            f"'{field_name}' {path!r} is not a readable image ({exc}); save it as a PNG",
            field_name,
        ) from None


@torch.no_grad()
def encode_image(pipe: Any, image: Any, width: int, height: int) -> torch.Tensor:
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


# -- Composition --------------------------------------------------------------------------------


def chain_step_hooks(*hooks: StepEnd | None) -> StepEnd | None:
    """One step-end callback running ``hooks`` in order, each seeing the tensors the previous
    ones replaced; ``None`` entries are skipped (and no hooks give ``None``)."""
    active = [hook for hook in hooks if hook is not None]
    if not active:
        return None
    if len(active) == 1:
        return active[0]

    def step_end(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
        current = dict(tensors)
        replaced: dict = {}
        for hook in active:
            result = hook(pipe, step, timestep, current) or {}
            current.update(result)
            replaced.update(result)
        return replaced

    return step_end


@dataclass
class StepHooks:
    """What a pipeline call needs to apply a Layout's image-based settings."""

    latents: torch.Tensor | None = None
    """Pass as ``latents=`` (unscaled, as the pipeline expects); None: nothing to change."""
    hooks: list[LatentHook] = field(default_factory=list)
    """Step-end hooks in the order they run."""
    composite: Callable[[Any], Any] | None = None
    """Final pixel step for one PIL image (``keep_outside``); None: images stay as decoded."""

    @property
    def active(self) -> bool:
        """Whether the call must be changed at all."""
        return bool(self.hooks) or self.composite is not None

    def callback(self, user: StepEnd | None = None) -> StepEnd | None:
        """The ``callback_on_step_end`` to pass: these hooks, then ``user``'s callback."""
        return chain_step_hooks(*self.hooks, user)

    def finish(self, images: Sequence[Any]) -> list[Any]:
        """The decoded PIL images after the final composite."""
        if self.composite is None:
            return list(images)
        if not all(hasattr(image, "convert") for image in images):
            raise TypeError(
                "the Layout's 'keep_outside' composites decoded PIL images; call the pipeline "
                "with output_type='pil'"
            )
        return [self.composite(image) for image in images]

    def finish_output(self, output: Any) -> Any:
        """A pipeline's output (its output object or, with ``return_dict=False``, its tuple)
        with :meth:`finish` applied to the images."""
        if self.composite is None:
            return output
        if isinstance(output, tuple):
            return (self.finish(output[0]), *output[1:])
        output.images = self.finish(output.images)
        return output


def start_latents(noise: torch.Tensor, scheduler: Any, hooks: Sequence[LatentHook]) -> torch.Tensor:
    """The ``latents=`` argument: ``noise`` edited at level 0 by each hook.

    The pipeline multiplies what it is given by ``init_noise_sigma``; the edit happens at that
    scale and is divided back. Untouched noise is returned as is, so a run whose hooks change
    nothing is bit-identical to one without them.
    """
    sigma = scheduler.init_noise_sigma
    scaled = noise * sigma
    edited = scaled
    for hook in hooks:
        edited = hook.start(edited, scheduler)
    if edited is scaled:
        return noise
    # Where no hook changed anything, keep the exact noise rather than (noise * s) / s.
    return torch.where(edited == scaled, noise, edited / sigma)


def prepare_step_hooks(
    pipe: Any,
    layout: Layout,
    generator: Any,
    batch_size: int = 1,
    latents: torch.Tensor | None = None,
    first_pass_kwargs: dict[str, Any] | None = None,
) -> StepHooks:
    """Read a Layout's reference and init-image settings and build the hooks they need.

    ``generator`` is the one the pipeline call will get: the starting noise is drawn from it
    here (see :func:`initial_noise`) unless ``latents`` (the caller's own) are given. A Layout
    without reference guidance, init image or ``keep_outside`` gives an inactive StepHooks
    and draws nothing. With ``reference_scale`` above 0 and no ``reference`` file, this makes
    one first (see :func:`engine.guidance.reference_image`: the attached GLIGEN pipeline, else
    a low-resolution pass of ``pipe``), called with ``first_pass_kwargs`` (e.g. a step-end
    callback for progress and cancel).
    """
    # Imported here: both modules build on this one's helpers.
    from engine.collage import keeps_init, prepare_collage
    from engine.guidance import prepare_reference_guidance, reference_image
    from engine.model_defaults import resolve_for

    layout = resolve_for(pipe, layout)
    reference = reference_image(pipe, layout, **(first_pass_kwargs or {}))
    init = None
    if layout.init_image is not None and (keeps_init(layout) or layout.keep_outside):
        init = load_rgb(layout.init_image, "init_image")
    if reference is None and init is None:
        return StepHooks()
    set_schedule(pipe, layout.steps)
    if latents is None:
        noise = initial_noise(pipe, layout, generator, batch_size)
    else:
        noise = latents.to(pipe._execution_device)
    hooks: list[LatentHook] = []
    composite = None
    if reference is not None:
        hooks.append(prepare_reference_guidance(pipe, layout, reference, noise))
    if init is not None:
        collage, composite = prepare_collage(pipe, layout, init, noise)
        if collage is not None:
            hooks.append(collage)
    if not hooks:
        # The noise is drawn already: hand it on, so the generator and the result stay as if
        # the pipeline had drawn it.
        return StepHooks(latents=noise, composite=composite)
    return StepHooks(
        latents=start_latents(noise, pipe.scheduler, hooks), hooks=hooks, composite=composite
    )
