"""What every generated frame leaves, for the batch and the render engine alike: its image
under its final name, then its sidecar (Layout, seed, settings, model, engine, timings); see
:mod:`..core.frames` for what counts as complete."""

from __future__ import annotations

import os
import time
from typing import Any

import bpy

from ..core import frames


def render_settings(scene, seed_mode: str) -> dict[str, Any]:
    """What the sidecar records about where a frame came from (beyond the Layout itself)."""
    render = scene.render
    return {
        "blend_file": bpy.data.filepath,
        "scene": scene.name,
        "camera": scene.camera.name if scene.camera else None,
        "resolution": [render.resolution_x, render.resolution_y],
        "resolution_percentage": render.resolution_percentage,
        "seed_mode": seed_mode,
        "base_seed": int(scene.layout_diffusion.seed),
    }


FIRST_PASS_NAME = "first_pass.png"
"""The high-res fix's first pass, in the frame's own layout folder while the frame renders."""


def first_pass_path(paths: frames.FramePaths) -> str:
    """Where the high-res fix's first pass of a frame goes. The frame's PNG records it (the
    second pass's init image), so it is the same on every run and renderer: inside the frame's
    layout folder, which only the frame's claim holder writes and a rerun replaces."""
    return os.path.join(paths.layout_dir, FIRST_PASS_NAME)


def high_res_settings(scene) -> dict[str, Any]:
    """What the sidecar (and so the fingerprint) records of the scene's High-res Fix: its
    strength when it is on, nothing when it is off."""
    settings = scene.layout_diffusion
    if not settings.use_high_res_fix:
        return {}
    # Rounded: a float property read back must give the same fingerprint on every run.
    return {"high_res_strength": round(float(settings.high_res_strength), 6)}


def publish_frame(
    paths: frames.FramePaths,
    tmp: str,
    event: dict[str, Any],
    layout: dict[str, Any],
    *,
    engine: dict[str, Any],
    settings: dict[str, Any],
    layout_seconds: float,
    started: float,
    fingerprint: str | None = None,
) -> dict[str, float]:
    """Give a generated image (at ``tmp``) its final name, then write its sidecar.

    ``event`` is the engine's ``result`` event; ``started`` the ``time.perf_counter()`` at which
    work on the frame began; ``fingerprint`` what resume compares (``frames.fingerprint``).
    Returns the timings recorded in the sidecar.
    """
    frames.publish(tmp, paths.image)
    timings = {
        "layout_seconds": layout_seconds,
        "generate_seconds": float(event.get("seconds") or 0.0),
        "load_seconds": float(event.get("load_seconds") or 0.0),
        "frame_seconds": time.perf_counter() - started,
    }
    record = frames.make_sidecar(
        paths,
        layout,
        seed=int(layout["seed"]),
        model=str(event.get("model") or ""),
        engine=engine,
        settings=settings,
        timings=timings,
        fingerprint=fingerprint,
    )
    frames.write_sidecar(paths.sidecar, record)
    return timings


def engine_details(hello: dict[str, Any]) -> dict[str, Any]:
    """The parts of a ``hello`` reply a sidecar records."""
    return {key: hello.get(src) for key, src in _ENGINE_KEYS}


_ENGINE_KEYS = (
    ("version", "engine_version"),
    ("protocol", "protocol"),
    ("device", "device"),
    ("dtype", "dtype"),
)
