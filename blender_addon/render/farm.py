"""Animation renders on farms that run Blender itself (``blender -b scene.blend -E
LAYOUT_DIFFUSION -a`` on several machines over one range, Overwrite off, Placeholders on).

Blender shares the frames out by its placeholders; what this module adds (the rules are in
:mod:`..core.placeholders`):

- each frame the engine renders is claimed beside its output file from the moment Blender
  hands it over until Blender has written the file (``render_write``); a thread beats the
  claim's heartbeat meanwhile, so other machines can tell a frame being rendered from one a
  crashed machine left;
- when a render starts (``render_init``), and after each frame for the frames still ahead, the
  files crashed renderers left in the range are removed, so Blender renders those frames again;
- a frame another live renderer already holds when Blender hands it over (two machines passed
  Blender's check at the same instant, or Placeholders are off) is waited for, and its image
  is used when that renderer has written it, instead of generating the frame a second time.

With Overwrite on every machine renders every frame, as Blender does: nothing here acts.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import bpy

from ..core import frames, placeholders

ENGINE_ID = "LAYOUT_DIFFUSION"
POLL_SECONDS = 0.5
"""How often a frame another renderer holds is looked at again."""
HEARTBEAT_SECONDS = frames.HEARTBEAT_SECONDS
STALE_SECONDS = frames.STALE_SECONDS

_owner: frames.Owner | None = None
_claims = frames.HeldClaims(HEARTBEAT_SECONDS)


class WaitCancelled(Exception):
    """Esc was pressed while waiting for a frame another renderer holds."""


def farm_mode(scene) -> bool:
    """Whether Blender's Output settings share frames out: this engine, Overwrite off, images
    (Blender never skips frames of a movie)."""
    render = scene.render
    return render.engine == ENGINE_ID and not render.use_overwrite and not render.is_movie_format


def output_frames(scene, after: int | None = None) -> list[tuple[int, str]]:
    """``(frame, output path)`` of the scene's range (frames after ``after`` only)."""
    first = scene.frame_start
    step = max(1, scene.frame_step)
    return [
        (frame, bpy.path.abspath(scene.render.frame_path(frame=frame)))
        for frame in range(first, scene.frame_end + 1, step)
        if after is None or frame > after
    ]


def owner() -> frames.Owner:
    """This process's identity in claims."""
    global _owner
    if _owner is None:
        _owner = frames.Owner.current()
    return _owner


def claim_output(
    scene, frame: int, animation: bool, test_break, engine_paths: frames.FramePaths | None = None
) -> float | None:
    """Claim ``frame``'s output file before it is rendered, in farm mode animations, and then
    remove the temporary files a renderer that stopped left among the frame's engine files
    (``engine_paths``): only the holder of a frame's claim writes them.

    Returns None when the frame was claimed at once (or nothing is claimed: a still, Overwrite
    on); else the ``time.time()`` at which it began waiting for another renderer that held it.
    Raises :class:`WaitCancelled` when ``test_break()`` turns true while waiting.
    """
    if not animation or not farm_mode(scene):
        return None
    path = bpy.path.abspath(scene.render.frame_path(frame=frame))
    paths = placeholders.output_paths(path, frame)
    # Without a placeholder Blender makes the folder only when it writes the frame.
    os.makedirs(os.path.dirname(path), exist_ok=True)
    since = None
    while True:
        claim = frames.try_claim(paths, owner(), STALE_SECONDS)
        if claim is not None:
            _claims.hold(claim)
            if engine_paths is not None:
                for leftover in frames.frame_temp_files(engine_paths):
                    with contextlib.suppress(OSError):
                        os.remove(leftover)
            return since
        if since is None:
            since = time.time()
            print(
                f"Layout Diffusion: frame {frame} is being rendered by another renderer; "
                "waiting for it",
                flush=True,
            )
        if test_break():
            raise WaitCancelled
        time.sleep(POLL_SECONDS)


def made_elsewhere(paths: frames.FramePaths, since: float) -> dict[str, Any] | None:
    """The sidecar of the engine's image of a frame, when another renderer completed it after
    ``since`` (while this one waited for it); None otherwise."""
    state = frames.frame_state(paths)
    if not state.complete:
        return None
    try:
        written = os.stat(paths.sidecar).st_mtime
    except OSError:
        return None
    return state.record if written >= since - 1.0 else None


def release_all() -> None:
    """Let go of every frame this process holds."""
    _claims.let_go_all()


def free_leftovers(scene, after: int | None = None) -> list[tuple[int, str]]:
    """Remove the files crashed renderers left in the scene's range (frames after ``after``
    only), in farm mode; the frames freed, each with why (also printed)."""
    if not farm_mode(scene):
        return []
    freed = placeholders.free_leftovers(output_frames(scene, after), owner(), STALE_SECONDS)
    for frame, reason in freed:
        print(
            f"Layout Diffusion: frame {frame}'s output file was {reason}; it is rendered again",
            flush=True,
        )
    return freed


# -- Handlers -------------------------------------------------------------------------------------


# Every handler first checks the scene's engine: the engine's own mask render is a nested
# Cycles render of a scene copy, and its handlers run in the middle of a frame.


@bpy.app.handlers.persistent
def _on_render_init(scene, *_args) -> None:
    free_leftovers(scene)


@bpy.app.handlers.persistent
def _on_render_write(scene, *_args) -> None:
    if scene.render.engine != ENGINE_ID:
        return
    # The frame's file is written: the frame is finished for every other renderer.
    release_all()
    free_leftovers(scene, after=scene.frame_current)


@bpy.app.handlers.persistent
def _on_render_end(scene, *_args) -> None:
    if scene.render.engine == ENGINE_ID:
        release_all()


_HANDLERS = (
    ("render_init", _on_render_init),
    ("render_write", _on_render_write),
    ("render_cancel", _on_render_end),
    ("render_complete", _on_render_end),
)


def register() -> None:
    for name, handler in _HANDLERS:
        handlers = getattr(bpy.app.handlers, name)
        if handler not in handlers:
            handlers.append(handler)


def unregister() -> None:
    for name, handler in _HANDLERS:
        handlers = getattr(bpy.app.handlers, name)
        if handler in handlers:
            handlers.remove(handler)
    release_all()
    _claims.stop()
