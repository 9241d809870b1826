"""GLIGEN as the source of a reference image: a grounded SD 1.x pass at its native size.

Reference guidance (:mod:`engine.guidance`) pulls the first steps toward a reference image. With
no ``reference`` file, LSReGen makes one with GLIGEN, a Stable Diffusion 1.x model whose gated
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
same precision, and attached as ``pipe.gligen_pipeline`` (:func:`attach_gligen`). Its safety
checker is not loaded: the image only guides the SDXL pass and is never shown.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable
from typing import Any

from engine.errors import ModelNotFoundError, UnsupportedModelError
from engine.loading import (
    PICKLE_SUFFIXES,
    SAFE_SUFFIXES,
    ComponentLocation,
    LoadOptions,
    check_folder_weights,
    find_component,
    weights_variant,
)
from engine.wire.layout import SIZE_MULTIPLE, Layout

log = logging.getLogger("engine.gligen")

PIPELINE_CLASS = "StableDiffusionGLIGENPipeline"
"""diffusers' class name in a GLIGEN folder's ``model_index.json``."""
MAX_BOXES = 30
"""Most phrase + box pairs GLIGEN takes (its projection has 30 object slots)."""
SCHEDULED_SAMPLING_BETA = 0.3
"""Fraction of the steps GLIGEN's gated layers act in (its scheduled sampling; GLIGEN's
default): the layout forms in the first steps, the rest only refines the image."""

GLIGEN_HELP = (
    "The engine works offline; get the GLIGEN text-box generation model on a machine with "
    "network (`hf download masterful/gligen-1-4-generation-text-box`) and pass its folder, or "
    "its repo id once it is in the Hugging Face cache here"
)

StepEnd = Callable[[Any, int, Any, dict], dict]


# -- Finding and loading ------------------------------------------------------------------------


def resolve_gligen(spec: str, options: LoadOptions | None = None) -> ComponentLocation:
    """Find a GLIGEN spec (diffusers folder or cached repo id) without loading it.

    Raises ModelNotFoundError (field ``gligen``) saying how to get the model,
    UnsupportedModelError for a folder holding another pipeline, and UnsafeCheckpointError for
    pickle-only weights without ``allow_pickle``.
    """
    options = options or LoadOptions()
    path = find_component(spec, "GLIGEN", "gligen", GLIGEN_HELP)
    if not os.path.isdir(path):
        raise ModelNotFoundError(
            f"GLIGEN {path} is a single file; GLIGEN is loaded from a diffusers folder "
            "(model_index.json, unet/, text_encoder/, vae/, ...). " + GLIGEN_HELP,
            "gligen",
        )
    return _gligen_folder(spec.strip(), path, options)


def _gligen_folder(spec: str, folder: str, options: LoadOptions) -> ComponentLocation:
    index = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index):
        raise ModelNotFoundError(
            f"{folder} is not a diffusers pipeline (no model_index.json). Pass the GLIGEN "
            "folder that holds model_index.json. " + GLIGEN_HELP,
            "gligen",
        )
    try:
        with open(index, encoding="utf-8") as handle:
            name = json.load(handle).get("_class_name")
    except (OSError, ValueError, AttributeError):
        name = None
    if name != PIPELINE_CLASS:
        raise UnsupportedModelError(
            f"{folder} holds a {name or 'unknown'} pipeline, not GLIGEN ({PIPELINE_CLASS}); "
            "pass the text-box generation model, such as "
            "masterful/gligen-1-4-generation-text-box",
            "gligen",
        )
    weights = []
    for root, dirs, files in os.walk(folder):
        if root != folder:
            dirs.clear()
        weights += [f for f in files if f.endswith(SAFE_SUFFIXES + PICKLE_SUFFIXES)]
    check_folder_weights(folder, weights, "GLIGEN", "gligen", GLIGEN_HELP, options.allow_pickle)
    return ComponentLocation(spec=spec, kind="folder", path=folder)


def load_gligen(location: ComponentLocation, dtype: Any, allow_pickle: bool = False) -> Any:
    """A ``StableDiffusionGLIGENPipeline`` from a resolved folder, offline, on the CPU.

    Raises UnsupportedModelError for GLIGEN models that do not generate from text and boxes
    alone (the inpainting and text-image variants).
    """
    from diffusers import StableDiffusionGLIGENPipeline

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*torch_dtype.*", FutureWarning)
        gligen = StableDiffusionGLIGENPipeline.from_pretrained(
            location.path,
            torch_dtype=dtype,
            local_files_only=True,
            use_safetensors=None if allow_pickle else True,
            variant=weights_variant(location.path),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    config = gligen.unet.config
    if config.get("attention_type") != "gated" or config.get("in_channels") != 4:
        raise UnsupportedModelError(
            f"GLIGEN {location.spec!r} is not the text-box generation model (its UNet has "
            f"attention_type {config.get('attention_type')!r} and {config.get('in_channels')} "
            "input channels, the inpainting or text-image variant?); pass "
            "masterful/gligen-1-4-generation-text-box or a model of that kind",
            "gligen",
        )
    gligen.set_progress_bar_config(disable=True)
    return gligen


def attach_gligen(pipe: Any, location: ComponentLocation | None, options: LoadOptions) -> bool:
    """Load the GLIGEN pipeline at ``location`` as ``pipe.gligen_pipeline`` (None: drop it).

    Kept if already attached; True if anything changed. It gets the SDXL UNet's dtype and
    device; with ``cpu_offload`` its parts, too, move to the GPU only while they run.
    """
    if getattr(pipe, "gligen_location", None) == location:
        return False
    pipe.gligen_pipeline = pipe.gligen_location = None
    if location is None:
        return True
    gligen = load_gligen(location, pipe.unet.dtype, options.allow_pickle)
    if options.cpu_offload:
        gligen.enable_model_cpu_offload(device=pipe._execution_device)
    else:
        gligen.to(pipe._execution_device)
    pipe.gligen_pipeline = gligen
    pipe.gligen_location = location
    return True


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


def gligen_size(gligen_pipe: Any, width: int, height: int) -> tuple[int, int]:
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


def legacy_callback(gligen_pipe: Any, callback: StepEnd | None) -> Callable | None:
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
    gligen_pipe: Any,
    layout: Layout,
    callback: StepEnd | None = None,
    generator: Any = None,
):
    """The reference image for ``layout`` made by GLIGEN, at the Layout's size (PIL).

    One phrase and box per region (:func:`grounding`); the scene prompt, negative prompt,
    steps and guidance scale are the Layout's, the seed too (``generator`` defaults to a CPU
    generator seeded with ``layout.seed``, as the SDXL pass's). GLIGEN runs at its native size
    (:func:`gligen_size`) and the result is resized to the Layout's. ``callback`` is a
    diffusers step-end callback (progress, cancel) called after each of its steps.
    """
    import torch
    from PIL import Image

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
