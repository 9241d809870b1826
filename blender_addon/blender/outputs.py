"""Where the add-on writes a scene's files.

Generate writes next to the blend file; an unsaved blend file writes into this user's own
folder under the system's temporary folder (readable by that user alone). F12 and Ctrl-F12
write each frame's engine PNG, sidecar and masks under the scene's Output path, beside the
frames Blender itself writes.
"""

from __future__ import annotations

import getpass
import os
import stat
import tempfile

import bpy

from ..core.names import safe_name

RENDER_FOLDER = "layout_diffusion"
"""The folder inside the Output path's folder that holds the render engine's per-frame files."""

_fallback: str | None = None


def private_temp_dir() -> str:
    """This user's folder for files of unsaved blend files, created private (mode 0700).

    Named after the user id (the user name where there is none); a folder of that name that
    another user owns, or a link, is never written into: a fresh private folder is made
    instead, once per session.
    """
    global _fallback
    uid = os.getuid() if hasattr(os, "getuid") else None
    owner = str(uid) if uid is not None else safe_name(getpass.getuser(), "user")
    path = os.path.join(tempfile.gettempdir(), f"layout_diffusion-{owner}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.lstat(path)
    if (
        stat.S_ISLNK(info.st_mode)
        or not stat.S_ISDIR(info.st_mode)
        or (uid is not None and info.st_uid != uid)
    ):
        if _fallback is None or not os.path.isdir(_fallback):
            _fallback = tempfile.mkdtemp(prefix=f"layout_diffusion-{owner}-")
        return _fallback
    if uid is not None and info.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def output_dir(scene, create: bool = True) -> str:
    """Where a scene's Layout, masks, result and history go: next to the blend file, else in
    :func:`private_temp_dir`."""
    if bpy.data.filepath:
        base = os.path.join(os.path.dirname(bpy.data.filepath), "layout_diffusion")
    else:
        base = private_temp_dir()
    folder = os.path.join(base, safe_name(scene.name, "scene"))
    if create:
        os.makedirs(folder, exist_ok=True)
    return folder


def render_dir(scene) -> str:
    """Where F12 and Ctrl-F12 keep each frame's engine PNG, sidecar and masks: the folder
    ``layout_diffusion`` in the folder of the scene's Output path (``//renders/shot_####``
    gives ``//renders/layout_diffusion``)."""
    path = scene.render.filepath or "//"
    if path.startswith("//") and not bpy.data.filepath:
        # Blender has no folder to resolve "//" against until the file is saved.
        path = os.path.join(private_temp_dir(), path[2:])
    path = bpy.path.abspath(path)
    folder = path if path.endswith(("/", os.sep)) else os.path.dirname(path)
    return os.path.join(os.path.abspath(folder or os.curdir), RENDER_FOLDER)
