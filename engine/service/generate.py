"""One generation, as the command line and ``engine serve`` both run it.

:func:`check_layout_files` makes sure every image a Layout names exists, is a readable image
within the pixel limit and, for masks, has the image's aspect ratio before any work starts;
:func:`check_output_path` applies the output rules; :func:`run_generation` runs the pipeline with
per-step progress, cancellation within one block and the time limit, and writes the PNG with
provenance; :func:`conditions_used` says which optional conditions acted.

Output rules: ``out`` is a path ending in ``.png`` (any case) that is not a folder and not an
existing file other than a PNG (the engine never replaces other files); a missing folder is
created only under one of the allowed roots (``engine serve --out-root``; ``engine generate``
allows the current folder and its own ``--out-root``s).
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from engine.conditions.depth import depth_unavailable
from engine.conditions.object_images import images_unavailable
from engine.errors import (
    BadRequestError,
    CancelledError,
    LimitExceededError,
    OutOfMemoryError,
    OutputError,
    is_out_of_memory,
)
from engine.images import check_aspect, image_size
from engine.loading.defaults import resolve_for
from engine.pipeline import RegionalSDXLPipeline
from engine.service.limits import TimeBudget, check_prompt_tokens, stop_inside_steps
from engine.service.provenance import sampler_name, save_png
from engine.steering.reference_pull import reference_source
from engine.wire.layout import MAX_PATH_CHARS, Layout, LayoutError, short

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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
    """Raise LayoutError naming the field of the first image of the Layout that is missing or
    unreadable, LimitError for one over the pixel limit; masks must have the image's aspect
    ratio. Reads headers only."""
    named = [("depth", layout.depth), ("reference", layout.reference)]
    named.append(("init_image", layout.init_image))
    for i, region in enumerate(layout.regions):
        named += [(f"regions[{i}].mask", region.mask), (f"regions[{i}].image", region.image)]
    for field, path in named:
        if path is None:
            continue
        if not os.path.isfile(path):
            raise LayoutError(
                f"'{field}' {short(path)} does not exist or is not a file; write the image "
                "first or fix the path (inline Layouts need absolute paths)",
                field,
            )
        size = image_size(path, field)
        if field.endswith(".mask"):
            check_aspect(size, (layout.width, layout.height), field)


def check_output_path(out: Any, roots: Sequence[str] = (), field: str = "out") -> str:
    """``out`` checked against the output rules (module docstring), as an absolute path.

    Raises BadRequestError naming ``field`` and saying what to do.
    """
    if not isinstance(out, str) or not out:
        raise BadRequestError("generate needs 'out': the absolute path of the PNG", field)
    if len(out) > MAX_PATH_CHARS or "\x00" in out:
        raise BadRequestError(
            f"'{field}' must be a path without NUL characters, at most {MAX_PATH_CHARS} "
            "characters long",
            field,
        )
    if not os.path.isabs(out):
        raise BadRequestError(f"'{field}' {short(out)} must be an absolute path", field)
    path = os.path.normpath(out)
    if not path.lower().endswith(".png"):
        raise BadRequestError(
            f"'{field}' {short(out)} must end in .png: the engine writes PNG files only", field
        )
    if os.path.isdir(path):
        raise BadRequestError(f"'{field}' {short(out)} is a folder; name the PNG file", field)
    if os.path.lexists(path) and not _is_png_file(path):
        raise BadRequestError(
            f"'{field}' {short(out)} exists and is not a PNG; the engine replaces only PNG "
            "files: choose another name or remove it",
            field,
        )
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        if os.path.lexists(folder):
            raise BadRequestError(f"'{field}': {short(folder)} is not a folder", field)
        if not any(_inside(folder, root) for root in roots):
            raise BadRequestError(
                f"'{field}': the folder {short(folder)} does not exist; create it first, or "
                "start the engine with --out-root naming a folder above it (missing folders "
                "are created only there)",
                field,
            )
    return path


def prepare_output_folder(out: str, roots: Sequence[str] = ()) -> None:
    """Create ``out``'s folder when it is missing and lies under one of ``roots``."""
    folder = os.path.dirname(out)
    if os.path.isdir(folder):
        return
    if not any(_inside(folder, root) for root in roots):
        raise OutputError(
            f"the folder {short(folder)} of 'out' does not exist (any more); create it first",
            "out",
        )
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {short(folder)}: {exc.strerror or exc}", "out") from exc


def _inside(path: str, root: str) -> bool:
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    try:
        return os.path.commonpath([real, real_root]) == real_root
    except ValueError:
        return False


def _is_png_file(path: str) -> bool:
    try:
        with open(path, "rb") as handle:
            return os.path.isfile(path) and handle.read(8) == PNG_SIGNATURE
    except OSError:
        return False


def renamed_files(layout: Layout, names: dict[str, str]) -> Layout:
    """``layout`` with each image path found in ``names`` replaced by its name there."""
    if not names:
        return layout

    def rename(path: str | None) -> str | None:
        return names.get(path, path) if path is not None else None

    regions = [replace(r, mask=rename(r.mask), image=rename(r.image)) for r in layout.regions]
    return replace(
        layout,
        depth=rename(layout.depth),
        reference=rename(layout.reference),
        init_image=rename(layout.init_image),
        regions=regions,
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
    on_step: Callable[..., None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    max_seconds: float = 0.0,
    make_folders: bool = True,
    recorded_paths: dict[str, str] | None = None,
) -> GenerationResult:
    """Generate ``layout`` with ``pipe`` and write it to ``out`` (PNG with provenance).

    ``on_step(step, total)`` is called after each denoising step (step counts from 1 and runs
    on through a first pass, see :func:`planned_steps`); an ``on_step`` taking a third argument
    also gets the estimated seconds left. ``should_stop()`` is polled before the first step and
    before every block of the models (a cancel lands within one block); when it returns True
    the run stops with CancelledError and no file is written. Prompts longer than the model's
    token window are refused (LimitError); with ``max_seconds``, so is a run estimated to take
    longer (LimitExceededError, before the first step or once the measured steps show it).
    ``make_folders``: create ``out``'s folder if missing. ``recorded_paths`` maps image paths
    of ``layout`` to the names its provenance records instead (files sent inline: the client's
    own paths, so the PNG is the one a local engine writes).
    """
    check_layout_files(layout)
    # Provenance records the values actually used, model-chosen ones included.
    layout = resolve_for(pipe, layout)
    check_prompt_tokens(pipe, layout)
    if should_stop is not None and should_stop():
        raise CancelledError("cancelled before it started")

    total = planned_steps(pipe, layout)
    budget = TimeBudget(pipe, layout, total, max_seconds)
    budget.check_before()
    with_estimate = on_step is not None and len(inspect.signature(on_step).parameters) >= 3
    done = 0

    def step_end(pipeline: Any, step: int, timestep: Any, tensors: dict) -> dict:
        nonlocal done
        # Counted across passes: a first pass making the layout reference calls this too.
        done += 1
        if should_stop is not None and should_stop():
            raise CancelledError(f"cancelled after step {done}")
        left = budget.after_step(done)
        if on_step is not None:
            if with_estimate:
                on_step(done, max(total, done), left)
            else:
                on_step(done, max(total, done))
        return {}

    def cancelled() -> Exception:
        return CancelledError(f"cancelled during step {done + 1}")

    conditions = conditions_used(pipe, layout)
    start = time.perf_counter()
    try:
        with stop_inside_steps(pipe, should_stop or (lambda: False), cancelled):
            image = pipe(layout=layout, callback_on_step_end=step_end, output_type="pil")
        image = image.images[0]
    except (CancelledError, LimitExceededError):
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
            image,
            out,
            renamed_files(layout, recorded_paths or {}),
            model,
            sampler_name(pipe.scheduler),
            conditions=conditions,
            make_folders=make_folders,
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
