"""Camera-view overlay: the last generation's boxes and labels drawn over the camera frame.

The boxes come from the Layout that was sent (normalized, origin top-left) and are mapped through
the camera frame's corners as the viewport shows them, so they line up with the render border at
any zoom or pan.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import blf
import bpy
import gpu
from bpy_extras.view3d_utils import location_3d_to_region_2d
from gpu_extras.batch import batch_for_shader

from ..blender.outputs import output_dir

Point = tuple[float, float]

_layouts: dict[str, list[tuple[tuple[float, float, float, float], str]]] = {}
_handle = None

BOX_COLOR = (1.0, 0.6, 0.1, 0.9)
TEXT_COLOR = (1.0, 1.0, 1.0, 0.95)


def set_layout(scene_name: str, layout: dict) -> None:
    """Remember ``layout`` (a Layout dict) as the one to draw for scene ``scene_name``."""
    _layouts[scene_name] = [
        (tuple(region["box"]), region.get("name") or region["prompt"])
        for region in layout.get("regions", [])
    ]
    _redraw()


def get_layout(scene_name: str) -> list[tuple[tuple[float, float, float, float], str]]:
    """The boxes and labels remembered for a scene (empty if none)."""
    return _layouts.get(scene_name, [])


def _saved_layout(scene) -> list[tuple[tuple[float, float, float, float], str]]:
    """The boxes of the scene's last saved Layout (after reopening a file), read once."""
    path = os.path.join(output_dir(scene, create=False), "layout.json")
    try:
        with open(path, encoding="utf-8") as handle:
            set_layout(scene.name, json.load(handle))
    except (OSError, ValueError, KeyError, TypeError):
        _layouts[scene.name] = []  # nothing usable: do not look again on every redraw
    return get_layout(scene.name)


def frame_point(corners: Sequence[Point], u: float, v: float) -> Point:
    """Map normalized image coordinates (origin top-left, v down) onto the camera frame.

    ``corners`` are the frame's corners in region pixels in ``Camera.view_frame`` order: top-right,
    bottom-right, bottom-left, top-left.
    """
    tr, _br, bl, tl = corners
    return (
        tl[0] + u * (tr[0] - tl[0]) + v * (bl[0] - tl[0]),
        tl[1] + u * (tr[1] - tl[1]) + v * (bl[1] - tl[1]),
    )


def box_outline(corners: Sequence[Point], box: Sequence[float]) -> list[Point]:
    """A normalized box's four corners in region pixels: top-left, top-right, bottom-right,
    bottom-left."""
    x0, y0, x1, y1 = box
    return [frame_point(corners, u, v) for u, v in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))]


def camera_frame_in_region(scene, region, rv3d) -> list[Point] | None:
    """The active camera's frame corners in region pixels, or None if one is off screen."""
    camera = scene.camera
    if camera is None or camera.type != "CAMERA":
        return None
    corners = []
    for local in camera.data.view_frame(scene=scene):
        point = location_3d_to_region_2d(region, rv3d, camera.matrix_world @ local)
        if point is None:
            return None
        corners.append((point.x, point.y))
    return corners


def _draw() -> None:
    context = bpy.context
    scene = context.scene
    settings = getattr(scene, "layout_diffusion", None)
    rv3d = context.region_data
    if settings is None or not settings.show_overlay or rv3d is None:
        return
    if rv3d.view_perspective != "CAMERA":
        return
    boxes = _layouts[scene.name] if scene.name in _layouts else _saved_layout(scene)
    if not boxes:
        return
    corners = camera_frame_in_region(scene, context.region, rv3d)
    if corners is None:
        return

    lines: list[Point] = []
    for box, _label in boxes:
        outline = box_outline(corners, box)
        for i in range(4):
            lines += [outline[i], outline[(i + 1) % 4]]
    shader = gpu.shader.from_builtin("UNIFORM_COLOR")
    batch = batch_for_shader(shader, "LINES", {"pos": lines})
    gpu.state.blend_set("ALPHA")
    gpu.state.line_width_set(2.0)
    shader.uniform_float("color", BOX_COLOR)
    batch.draw(shader)
    gpu.state.line_width_set(1.0)
    gpu.state.blend_set("NONE")

    font = 0
    blf.size(font, 12 * context.preferences.view.ui_scale)
    blf.color(font, *TEXT_COLOR)
    blf.enable(font, blf.SHADOW)
    blf.shadow(font, 3, 0.0, 0.0, 0.0, 0.8)
    for box, label in boxes:
        x, y = box_outline(corners, box)[0]
        blf.position(font, x + 4, y - 14, 0)
        blf.draw(font, label)
    blf.disable(font, blf.SHADOW)


def _redraw() -> None:
    wm = getattr(bpy.context, "window_manager", None)
    if wm is None:
        return
    for window in wm.windows:
        for area in window.screen.areas:
            if area.type == "VIEW_3D":
                area.tag_redraw()


@bpy.app.handlers.persistent
def _forget_layouts(*_args) -> None:
    # Another file's scenes may share names with this one's: start from its saved Layouts.
    _layouts.clear()


def register() -> None:
    global _handle
    _handle = bpy.types.SpaceView3D.draw_handler_add(_draw, (), "WINDOW", "POST_PIXEL")
    bpy.app.handlers.load_post.append(_forget_layouts)


def unregister() -> None:
    global _handle
    if _handle is not None:
        bpy.types.SpaceView3D.draw_handler_remove(_handle, "WINDOW")
        _handle = None
    if _forget_layouts in bpy.app.handlers.load_post:
        bpy.app.handlers.load_post.remove(_forget_layouts)
    _layouts.clear()
