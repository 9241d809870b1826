"""Frame bookkeeping for animation renders: ranges, file names, atomic writes, sidecars, resume.

No bpy, so every rule about which frame is done and how a file reaches
its final name can be tested without Blender.

A frame is *complete* when its image and its sidecar JSON both exist and agree: the sidecar names
the image, and the image's size in bytes and SHA-256 match what the sidecar recorded. The image is
always published before its sidecar, so the sidecar is the commit marker: a run killed between the
two leaves an image without a sidecar, which counts as not done and is rendered again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..wire.files import write_text_atomic
from ..wire.layout import IMAGE_FIELDS, REGION_IMAGE_FIELDS
from .errors import UserError
from .png import png_size

SIDECAR_FORMAT = "layout-diffusion-frame"
SIDECAR_VERSION = 1
DEFAULT_PATTERN = "frame_####"

_PARTIAL = ".partial-"
# Our own temporary names: ".<name>.partial-<pid><ext>" (images) and the Layout module's
# ".<name>.<pid>.tmp" (JSON). Nothing else in an output folder is ever removed.
_TEMP_NAME = re.compile(r"^\..+(\.partial-\d+(\.[A-Za-z0-9]+)?|\.\d+\.tmp)$")


class FrameSpecError(UserError, ValueError):
    """A frame list the user typed that cannot be read; the message shows the accepted forms."""


# -- Frame ranges -----------------------------------------------------------------------------


def parse_frames(spec: str, step: int = 1) -> list[int]:
    """Frames named by ``spec``: ``"7"``, ``"1-48"``, ``"1-10,20-30"``; sorted, without repeats.

    ``step`` keeps every step-th frame of each range, counted from the range's first frame
    (as Blender's Frame Step does).
    """
    if step < 1:
        raise FrameSpecError(f"frame step must be 1 or more, got {step}")
    frames: set[int] = set()
    parts = [p.strip() for p in spec.split(",")]
    if not spec.strip() or not all(parts):
        raise FrameSpecError(f"no frames in {spec!r}; write e.g. '1-48' or '1,5,10-12'")
    for part in parts:
        match = re.fullmatch(r"(-?\d+)(?:\s*(?:-|\.\.)\s*(-?\d+))?", part)
        if not match:
            raise FrameSpecError(
                f"cannot read frames {part!r} in {spec!r}; write e.g. '1-48' or '1,5,10-12'"
            )
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise FrameSpecError(f"frame range {part!r} runs backwards; write '{last}-{first}'")
        frames.update(range(first, last + 1, step))
    return sorted(frames)


# -- Names ------------------------------------------------------------------------------------


def frame_name(frame: int, pattern: str = DEFAULT_PATTERN) -> str:
    """A frame's file stem: the last run of ``#`` in ``pattern`` becomes the zero-padded number.

    Without any ``#`` four digits are appended, as Blender does for output paths.
    """
    runs = list(re.finditer(r"#+", pattern))
    if not runs:
        return f"{pattern}{frame:04d}"
    run = runs[-1]
    width = run.end() - run.start()
    number = f"-{abs(frame):0{width}d}" if frame < 0 else f"{frame:0{width}d}"
    return pattern[: run.start()] + number + pattern[run.end() :]


@dataclass(frozen=True)
class FramePaths:
    """Where one frame's files live inside an output folder."""

    frame: int
    image: str
    sidecar: str
    layout_dir: str
    """Folder for the frame's masks and depth map, which the sidecar's Layout points at."""


def frame_paths(out_dir: str, frame: int) -> FramePaths:
    """The image, sidecar and layout folder of ``frame`` in ``out_dir``."""
    stem = frame_name(frame)
    return FramePaths(
        frame=frame,
        image=os.path.join(out_dir, stem + ".png"),
        sidecar=os.path.join(out_dir, stem + ".json"),
        layout_dir=os.path.join(out_dir, "layout", stem),
    )


def temp_path(path: str) -> str:
    """A hidden temporary name next to ``path`` with the same extension, unique to this process.

    Files are produced under this name and renamed onto ``path`` with :func:`publish`, so a
    file with the final name is always whole.
    """
    folder, name = os.path.split(path)
    stem, ext = os.path.splitext(name)
    return os.path.join(folder, f".{stem}{_PARTIAL}{os.getpid()}{ext}")


def publish(tmp: str, path: str) -> None:
    """Flush ``tmp`` to disk and rename it onto ``path`` in one atomic step."""
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def is_temp_name(name: str) -> bool:
    """True for the temporary names this module and the Layout writer create."""
    return bool(_TEMP_NAME.match(name))


def sweep_temp_files(folder: str) -> list[str]:
    """Delete temporary files a killed run left in ``folder``; return the paths removed."""
    removed = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return removed
    for name in sorted(names):
        path = os.path.join(folder, name)
        if is_temp_name(name) and os.path.isfile(path):
            os.remove(path)
            removed.append(path)
    return removed


# -- Sidecars ---------------------------------------------------------------------------------


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def make_sidecar(
    paths: FramePaths,
    layout: Mapping[str, Any],
    *,
    seed: int,
    model: str,
    engine: Mapping[str, Any],
    settings: Mapping[str, Any],
    timings: Mapping[str, float],
) -> dict[str, Any]:
    """The sidecar record of a frame whose image is already at ``paths.image``.

    ``layout`` is the Layout as sent to the engine (absolute paths); paths inside the frame's
    output folder are stored relative to it, so the folder can be moved and
    ``Layout.from_dict(sidecar["layout"], base_dir=<sidecar folder>)`` still finds the masks.
    """
    folder = os.path.dirname(os.path.abspath(paths.sidecar))
    size = png_size(paths.image)
    if size is None:
        raise ValueError(f"{paths.image} is not a PNG file")
    width, height = size
    return {
        "format": SIDECAR_FORMAT,
        "format_version": SIDECAR_VERSION,
        "frame": paths.frame,
        "image": os.path.basename(paths.image),
        "image_bytes": os.path.getsize(paths.image),
        "image_sha256": file_sha256(paths.image),
        "image_size": [width, height],
        "seed": seed,
        "model": model,
        "engine": dict(engine),
        "settings": dict(settings),
        "timings": {k: round(float(v), 4) for k, v in timings.items()},
        "layout": relative_layout(layout, folder),
    }


def relative_layout(layout: Mapping[str, Any], folder: str) -> dict[str, Any]:
    """A copy of a Layout dict with its image paths (masks, depth, ...) relative to ``folder``."""
    data = json.loads(json.dumps(layout))
    holders = [(data, key) for key in IMAGE_FIELDS]
    holders += [(region, key) for region in data.get("regions", []) for key in REGION_IMAGE_FIELDS]
    for holder, key in holders:
        value = holder.get(key)
        if value and os.path.isabs(value):
            # Another drive on Windows has no relative path: keep it absolute.
            with contextlib.suppress(ValueError):
                holder[key] = os.path.relpath(value, folder).replace(os.sep, "/")
    return data


def write_sidecar(path: str, record: Mapping[str, Any]) -> None:
    """Write a sidecar atomically (temporary name, then rename)."""
    write_text_atomic(path, json.dumps(record, indent=2, allow_nan=False) + "\n")


def read_sidecar(path: str) -> dict[str, Any] | None:
    """A sidecar's record, or None when it is missing, unreadable or not a frame sidecar."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
        return None
    return data


# -- Resume -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameState:
    """Whether a frame's files are complete, and if not, why."""

    frame: int
    complete: bool
    reason: str
    record: dict[str, Any] | None = None


def frame_state(paths: FramePaths) -> FrameState:
    """Check a frame's image and sidecar against each other (see the module docstring)."""
    has_image = os.path.isfile(paths.image)
    record = read_sidecar(paths.sidecar)
    if not has_image and record is None:
        return FrameState(paths.frame, False, "not rendered yet")
    if not has_image:
        return FrameState(paths.frame, False, "sidecar without its image")
    if record is None:
        if os.path.exists(paths.sidecar):
            return FrameState(paths.frame, False, "sidecar unreadable")
        return FrameState(paths.frame, False, "image without a sidecar (interrupted run?)")
    if record.get("frame") != paths.frame or record.get("image") != os.path.basename(paths.image):
        return FrameState(paths.frame, False, "sidecar belongs to another frame", record)
    if record.get("image_bytes") != os.path.getsize(paths.image):
        return FrameState(paths.frame, False, "image size differs from its sidecar", record)
    if record.get("image_sha256") != file_sha256(paths.image):
        return FrameState(paths.frame, False, "image content differs from its sidecar", record)
    return FrameState(paths.frame, True, "complete", record)


def plan_frames(
    out_dir: str,
    frames: Iterable[int],
    *,
    overwrite: bool = False,
) -> tuple[list[FramePaths], list[FrameState]]:
    """Split ``frames`` into those to render and those already complete (kept unless overwrite).

    Returns ``(todo, done)``: the paths of frames to render, and the states of frames skipped.
    """
    todo: list[FramePaths] = []
    done: list[FrameState] = []
    for frame in frames:
        paths = frame_paths(out_dir, frame)
        if overwrite:
            todo.append(paths)
            continue
        state = frame_state(paths)
        if state.complete:
            done.append(state)
        else:
            todo.append(paths)
    return todo, done


def seed_for_frame(base_seed: int, frame: int, mode: str) -> int:
    """The seed of ``frame``: the base seed for every frame of a shot, or base + frame number.

    Seeds stay non-negative (the Layout's range), so negative frame numbers wrap around 2**63.
    """
    if mode == "shot":
        return base_seed
    if mode == "frame":
        return (base_seed + frame) % 2**63
    raise ValueError(f"unknown seed mode {mode!r}; use 'shot' or 'frame'")
