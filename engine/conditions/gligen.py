"""GLIGEN as the source of a layout reference: a grounded SD 1.x pass at its native size.

The reference pull (:mod:`engine.steering.reference_pull`) moves the first steps toward a
layout reference. With no ``reference`` file, LSReGen makes one with GLIGEN, a Stable Diffusion 1.x model whose gated
self-attention layers read phrase + box tokens, so each region's prompt lands in its box from
the first steps on. When the engine is given a GLIGEN checkpoint (``--gligen``, request option
``gligen``), :func:`gligen_reference` runs diffusers' ``StableDiffusionGLIGENPipeline`` with
the Layout's scene prompt, negative prompt, seed, steps and guidance scale, one phrase and box
per region, at GLIGEN's native resolution (512 px on the long side for the published
checkpoints, the aspect ratio kept), and resizes the result to the Layout's size. Without one,
the engine's own half-size first pass is the reference.

The checkpoint is a diffusers folder of the text-box *generation* model (such as
``masterful/gligen-1-4-generation-text-box``) or its repo id in the local Hugging Face cache;
nothing is downloaded. It is loaded next to the SDXL pipeline, on the same device and in the
same precision, and attached as ``pipe.gligen_pipeline``
(:func:`engine.loading.assemble.attach_gligen`). Its safety checker is not loaded: the image only guides the SDXL pass and is never shown.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from engine.steering.latents import StepEnd
from engine.wire.layout import SIZE_MULTIPLE, Layout

if TYPE_CHECKING:
    from diffusers import StableDiffusionGLIGENPipeline

log = logging.getLogger(__name__)

MAX_BOXES = 30
"""Most phrase + box pairs GLIGEN takes (its projection has 30 object slots)."""
SCHEDULED_SAMPLING_BETA = 0.3
"""Fraction of the steps GLIGEN's gated layers act in (its scheduled sampling; GLIGEN's
default): the layout forms in the first steps, the rest only refines the image."""

# -- The reference pass -------------------------------------------------------------------------


def grounding(layout: Layout, limit: int = MAX_BOXES) -> tuple[list[str], list[list[float]]]:
    """GLIGEN's phrases and boxes (normalized ``[x0, y0, x1, y1]``) for ``layout``'s regions.

    Regions with weight 0 are left out. Beyond ``limit`` regions, the ``limit`` largest boxes
    are kept (in Layout order) and a warning is logged.
    """
    regions = [r for r in layout.regions if r.weight > 0]
    if len(regions) > limit:

        def area(region: Any) -> float:
            x0, y0, x1, y1 = region.box
            return (x1 - x0) * (y1 - y0)

        largest = sorted(range(len(regions)), key=lambda i: -area(regions[i]))[:limit]
        log.warning(
            "GLIGEN takes at most %d boxes; the reference is made from the %d largest of %d "
            "regions, the others are left to the SDXL pass",
            limit,
            limit,
            len(regions),
        )
        regions = [regions[i] for i in sorted(largest)]
    return [r.prompt for r in regions], [[float(v) for v in r.box] for r in regions]


def gligen_size(
    gligen_pipe: StableDiffusionGLIGENPipeline, width: int, height: int
) -> tuple[int, int]:
    """The ``(width, height)`` GLIGEN runs at for an image of ``width`` x ``height``: its native
    size (``unet.config.sample_size * vae_scale_factor``) on the long side, the aspect ratio
    kept, sides multiples of 8."""
    native = int(gligen_pipe.unet.config.sample_size) * int(gligen_pipe.vae_scale_factor)
    native = max(SIZE_MULTIPLE, native // SIZE_MULTIPLE * SIZE_MULTIPLE)
    long_side = max(width, height)

    def side(value: int) -> int:
        scaled = round(native * value / long_side / SIZE_MULTIPLE) * SIZE_MULTIPLE
        return min(native, max(SIZE_MULTIPLE, scaled))

    return side(width), side(height)


def grounded_beta(steps: int, beta: float = SCHEDULED_SAMPLING_BETA) -> float:
    """The scheduled-sampling fraction to pass for ``steps`` steps: ``beta``, raised so that at
    least the first step is grounded (GLIGEN grounds ``int(beta * timesteps)`` of them)."""
    return min(1.0, max(beta, 1.5 / max(steps, 1)))


def legacy_callback(
    gligen_pipe: StableDiffusionGLIGENPipeline, callback: StepEnd | None
) -> Callable | None:
    """diffusers' old ``callback(step, timestep, latents)``, calling a step-end ``callback``.

    ``callback(gligen_pipe, step, timestep, {"latents": latents})`` is called once per step,
    with steps counted from 0 here (the GLIGEN pipeline's own index starts at 1 with PNDM);
    an exception it raises (a cancel) stops the pass. What it returns is not used: the
    reference pass only reports progress.
    """
    if callback is None:
        return None
    done = 0

    def on_step(index: int, timestep: Any, latents: Any) -> None:
        nonlocal done
        step, done = done, done + 1
        callback(gligen_pipe, step, timestep, {"latents": latents})

    return on_step


def gligen_reference(
    gligen_pipe: StableDiffusionGLIGENPipeline,
    layout: Layout,
    callback: StepEnd | None = None,
    generator: Any = None,
):
    """The layout reference for ``layout`` made by GLIGEN, at the Layout's size (PIL).

    One phrase and box per region (:func:`grounding`); the scene prompt, negative prompt,
    steps and guidance scale are the Layout's, the seed too (``generator`` defaults to a CPU
    generator seeded with ``layout.seed``, as the SDXL pass's). GLIGEN runs at its native size
    (:func:`gligen_size`) and the result is resized to the Layout's. ``callback`` is a
    diffusers step-end callback (progress, cancel) called after each of its steps.
    """
    phrases, boxes = grounding(layout)
    if not phrases:
        raise ValueError("GLIGEN needs at least one region with weight above 0")
    width, height = gligen_size(gligen_pipe, layout.width, layout.height)
    if generator is None:
        generator = torch.Generator("cpu").manual_seed(layout.seed)
    image = gligen_pipe(
        prompt=layout.prompt,
        negative_prompt=layout.negative_prompt or None,
        width=width,
        height=height,
        num_inference_steps=layout.steps,
        guidance_scale=layout.guidance_scale,
        gligen_phrases=phrases,
        gligen_boxes=boxes,
        gligen_scheduled_sampling_beta=grounded_beta(layout.steps),
        generator=generator,
        output_type="pil",
        callback=legacy_callback(gligen_pipe, callback),
        callback_steps=1,
    ).images[0]
    if image.size == (layout.width, layout.height):
        return image
    return image.resize((layout.width, layout.height), Image.Resampling.BICUBIC)
