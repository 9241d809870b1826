"""One generation, as the command line and ``engine serve`` both run it.

:func:`check_layout_files` makes sure every image a Layout names exists before any work starts;
:func:`run_generation` runs the pipeline with per-step progress and cancellation, and writes the
PNG with provenance; :func:`conditions_used` says which optional conditions acted.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.conditions.depth import depth_unavailable
from engine.conditions.object_images import images_unavailable
from engine.errors import CancelledError, OutOfMemoryError, OutputError, is_out_of_memory
from engine.loading.defaults import resolve_for
from engine.pipeline import RegionalSDXLPipeline
from engine.service.provenance import sampler_name, save_png
from engine.steering.reference_pull import reference_source
from engine.wire.layout import Layout, LayoutError


@dataclass
class GenerationResult:
    """What a finished generation produced."""

    path: str
    seed: int
    width: int
    height: int
    seconds: float
    """Time spent generating and writing the image, model loading excluded."""
    conditions: dict[str, Any] | None = None
    """The optional conditions that acted (see :func:`conditions_used`)."""


def check_layout_files(layout: Layout) -> None:
    """Raise LayoutError naming the field of the first image of the Layout that is missing."""
    named = [("depth", layout.depth), ("reference", layout.reference)]
    named.append(("init_image", layout.init_image))
    for i, region in enumerate(layout.regions):
        named += [(f"regions[{i}].mask", region.mask), (f"regions[{i}].image", region.image)]
    for field, path in named:
        if path is not None and not os.path.isfile(path):
            raise LayoutError(
                f"'{field}' {path!r} does not exist; write the image first or fix the path "
                "(inline Layouts need absolute paths)",
                field,
            )


def conditions_used(pipe: RegionalSDXLPipeline, layout: Layout) -> dict[str, Any]:
    """Which optional conditions act on ``layout`` with ``pipe``, for results and provenance.

    ``controlnet``: the depth ControlNet's spec and settings, or None; ``ip_adapter``: the
    IP-Adapter's spec and how many object images it applies, or None; ``reference``: where
    the reference pull's layout reference comes from (``source``: ``file``, ``gligen`` with the
    GLIGEN ``model``, or ``first_pass``) and its settings, or None.
    """
    used: dict[str, Any] = {"controlnet": None, "ip_adapter": None, "reference": None}
    if depth_unavailable(layout, pipe.depth_controlnet) is None:
        used["controlnet"] = {
            "model": pipe.depth_controlnet_location.spec,
            "scale": layout.depth_scale,
            "start": layout.depth_start,
            "end": layout.depth_end,
            "region_scales": [r.depth_scale for r in layout.regions],
        }
    adapter = pipe.object_image_adapter
    images = [r for r in layout.regions if r.image is not None and r.image_scale > 0]
    if adapter is not None and images and images_unavailable(layout, pipe) is None:
        used["ip_adapter"] = {"model": adapter.location.spec, "images": len(images)}
    source = reference_source(pipe, layout)
    if source is not None:
        used["reference"] = {
            "source": source,
            "scale": layout.reference_scale,
            "fraction": layout.reference_fraction,
        }
        if source == "gligen":
            used["reference"]["model"] = pipe.gligen_location.spec
    return used


def planned_steps(pipe: RegionalSDXLPipeline, layout: Layout) -> int:
    """Denoising steps generating ``layout`` with ``pipe`` runs: the Layout's own, plus those of
    a pass making the layout reference (a first pass or GLIGEN, both with the Layout's steps)."""
    layout = resolve_for(pipe, layout)
    made = reference_source(pipe, layout) in ("first_pass", "gligen")
    return layout.steps * (2 if made else 1)


def run_generation(
    pipe: RegionalSDXLPipeline,
    layout: Layout,
    out: str,
    model: str,
    on_step: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GenerationResult:
    """Generate ``layout`` with ``pipe`` and write it to ``out`` (PNG with provenance).

    ``on_step(step, total)`` is called after each denoising step (step counts from 1 and runs
    on through a first pass, see :func:`planned_steps`).
    ``should_stop()`` is polled before the first step and after each one; when it returns True
    the run stops there with CancelledError and no file is written.
    """
    check_layout_files(layout)
    # Provenance records the values actually used, model-chosen ones included.
    layout = resolve_for(pipe, layout)
    if should_stop is not None and should_stop():
        raise CancelledError("cancelled before it started")

    total = planned_steps(pipe, layout)
    done = 0

    def step_end(pipeline: Any, step: int, timestep: Any, tensors: dict) -> dict:
        nonlocal done
        # Counted across passes: a first pass making the layout reference calls this too.
        done += 1
        if should_stop is not None and should_stop():
            raise CancelledError(f"cancelled after step {done}")
        if on_step is not None:
            on_step(done, max(total, done))
        return {}

    conditions = conditions_used(pipe, layout)
    start = time.perf_counter()
    try:
        image = pipe(layout=layout, callback_on_step_end=step_end, output_type="pil").images[0]
    except CancelledError:
        raise
    except Exception as exc:
        if is_out_of_memory(exc):
            raise OutOfMemoryError(
                f"the device ran out of memory generating {layout.width}x{layout.height}: "
                "try a smaller size, --cpu-offload, --vae-tiling, or close other programs "
                "using the GPU"
            ) from exc
        raise
    try:
        path = save_png(
            image, out, layout, model, sampler_name(pipe.scheduler), conditions=conditions
        )
    except OSError as exc:
        raise OutputError(
            f"cannot write {out}: {exc.strerror or exc}; choose a folder you can write to",
            "out",
        ) from exc
    return GenerationResult(
        path=path,
        seed=layout.seed,
        width=image.width,
        height=image.height,
        seconds=time.perf_counter() - start,
        conditions=conditions,
    )
