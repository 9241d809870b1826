"""Blender's own frame files on a farm: ``blender -b scene.blend -E LAYOUT_DIFFUSION -a`` on
several machines over one frame range, Output > Overwrite off and Placeholders on.

Blender itself (4.2 and 5.0, for every render engine) skips a frame whose output file exists
and, with Placeholders, creates that file empty before it renders the frame; a frame whose
render fails or is cancelled has its empty file removed again. So two machines on one range
share the frames out. What Blender does not do: a machine that crashes or is killed leaves its
empty placeholder (or a half-written image, since Blender writes in place), and every rerun
skips that frame for ever.

The render engine therefore claims each frame it renders (:mod:`.frames` claims: host, process,
heartbeat) beside the frame's output file, from the moment Blender hands it the frame until
Blender has written the file; and before a range is rendered the files crashed renderers left
are removed (:func:`free_leftovers`), so Blender renders those frames again:

- a file whose claim belongs to a dead or silent renderer (it stopped before the file was
  written), unless it is a PNG that decodes;
- without a claim, an empty file or a PNG that does not decode, once it is ``stale_seconds``
  old: a live renderer claims its frame right after Blender made its placeholder, so a young
  unclaimed file may still be one being rendered.

No bpy: every rule can be tested without Blender.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

from . import frames


def output_paths(path: str, frame: int) -> frames.FramePaths:
    """The frame whose image is Blender's output file ``path`` (its claim lies beside it)."""
    return frames.FramePaths(frame=frame, image=path, sidecar="", layout_dir="")


def leftover_reason(
    paths: frames.FramePaths, stale_seconds: float = frames.STALE_SECONDS
) -> str | None:
    """Why the file at Blender's output path is what a crashed renderer left, or None: no file,
    a finished one, or one a live renderer may still be writing."""
    try:
        stat = os.stat(paths.image)
    except FileNotFoundError:
        return None
    found = frames.read_claim(frames.claim_path(paths))
    if found is not None:
        record, heartbeat = found
        if frames.claim_is_live(record, heartbeat, stale_seconds):
            return None
        if _decodes(paths.image):
            return None
        who = f"{record.get('host')}, process {record.get('pid')}" if record else "unknown"
        return f"left by a renderer that stopped while rendering it ({who})"
    if time.time() - stat.st_mtime < stale_seconds:
        return None
    if stat.st_size == 0:
        return "an empty placeholder nobody is rendering"
    problem = frames.png_problem(paths.image) if _is_png(paths.image) else None
    if problem is not None:
        return f"an image that does not decode ({problem}) and nobody is rendering"
    return None


def free_leftovers(
    outputs: Iterable[tuple[int, str]],
    owner: frames.Owner,
    stale_seconds: float = frames.STALE_SECONDS,
) -> list[tuple[int, str]]:
    """Remove the files crashed renderers left among ``outputs`` (frame, output path), each
    under the frame's claim, and every dead renderer's claim there, so Blender renders those
    frames again; the frames freed, each with why."""
    freed = []
    finished = []
    for frame, path in outputs:
        paths = output_paths(path, frame)
        reason = leftover_reason(paths, stale_seconds)
        if reason is None:
            finished.append(paths)
            continue
        abandoned = os.path.exists(frames.claim_path(paths))
        claim = frames.try_claim(paths, owner, stale_seconds)
        if claim is None:
            continue  # a live renderer took the frame meanwhile
        try:
            # Judged again under the claim, in case a renderer finished the file meanwhile.
            if _unfinished(path, abandoned):
                os.remove(path)
                freed.append((frame, reason))
        finally:
            frames.release(claim)
    # A renderer that stopped after its file was written but before it let the frame go.
    frames.clear_dead_claims(finished, owner, stale_seconds)
    return freed


def _unfinished(path: str, abandoned: bool) -> bool:
    """Whether ``path`` is still not a finished frame: an abandoned one unless it decodes, an
    unclaimed one when empty or a PNG that does not decode."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return False
    if abandoned:
        return not _decodes(path)
    return size == 0 or (_is_png(path) and not _decodes(path))


def _is_png(path: str) -> bool:
    return path.lower().endswith(".png")


def _decodes(path: str) -> bool:
    """Whether the file is a PNG that decodes whole (other formats cannot be checked here)."""
    return _is_png(path) and frames.png_problem(path) is None
