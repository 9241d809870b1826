"""Where the add-on writes a scene's files: next to the blend file, else a temp folder."""

from __future__ import annotations

import os
import tempfile

import bpy

from ..core.names import safe_name


def output_dir(scene, create: bool = True) -> str:
    """Where a scene's Layout, masks and result go: next to the blend file, else a temp folder."""
    if bpy.data.filepath:
        base = os.path.join(os.path.dirname(bpy.data.filepath), "layout_diffusion")
    else:
        base = os.path.join(tempfile.gettempdir(), "layout_diffusion")
    folder = os.path.join(base, safe_name(scene.name, "scene"))
    if create:
        os.makedirs(folder, exist_ok=True)
    return folder


def render_dir(scene) -> str:
    """Where F12 and Ctrl-F12 keep each frame's engine PNG, sidecar and masks."""
    return os.path.join(output_dir(scene), "render")
