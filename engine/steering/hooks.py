"""The step-end hook chain of a Layout call: reference pull, then per-object strength.

:func:`prepare_step_hooks` reads a Layout and returns everything a pipeline call needs: the
starting latents, the step-end callback and the final pixel composite (``keep_outside``).
Noise levels are as in :mod:`engine.steering.latents`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from engine.images import load_rgb
from engine.loading.defaults import resolve_for
from engine.steering.latents import LatentHook, StepEnd, initial_noise, set_schedule
from engine.steering.object_strength import keeps_init, prepare_object_strength
from engine.steering.reference_pull import layout_reference, prepare_reference_pull
from engine.wire.layout import Layout

if TYPE_CHECKING:
    from engine.pipeline import RegionalSDXLPipeline

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
    pipe: RegionalSDXLPipeline,
    layout: Layout,
    generator: Any,
    batch_size: int = 1,
    latents: torch.Tensor | None = None,
    first_pass_kwargs: dict[str, Any] | None = None,
) -> StepHooks:
    """Read a Layout's reference-pull and init-image settings and build the hooks they need.

    ``generator`` is the one the pipeline call will get: the starting noise is drawn from it
    here (see :func:`initial_noise`) unless ``latents`` (the caller's own) are given. A Layout
    without a reference pull, init image or ``keep_outside`` gives an empty StepHooks
    and draws nothing. With ``reference_scale`` above 0 and no ``reference`` file, this makes
    one first (see :func:`engine.steering.reference_pull.layout_reference`: the attached GLIGEN
    pipeline, else a low-resolution pass of ``pipe``), called with ``first_pass_kwargs`` (e.g. a step-end
    callback for progress and cancel).
    """
    layout = resolve_for(pipe, layout)
    reference = layout_reference(pipe, layout, **(first_pass_kwargs or {}))
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
        hooks.append(prepare_reference_pull(pipe, layout, reference, noise))
    if init is not None:
        strength, composite = prepare_object_strength(pipe, layout, init, noise)
        if strength is not None:
            hooks.append(strength)
    if not hooks:
        # The noise is drawn already: hand it on, so the generator and the result stay as if
        # the pipeline had drawn it.
        return StepHooks(latents=noise, composite=composite)
    return StepHooks(
        latents=start_latents(noise, pipe.scheduler, hooks), hooks=hooks, composite=composite
    )
