"""The reference render: the scene from the camera, every object in one flat colour.

The engine pulls the first denoising steps toward this image inside the regions (reference
guidance), so it needs the right colours in the right places, not shading. Each labeled object
takes the colour its label names ("a red vintage car" -> red), else its material's base colour,
else its viewport colour, else a light grey; unlabeled objects take their material or viewport
colour, else the same grey; the background is neutral grey.

The pixels come from the object-id render that also gives the masks (:mod:`.id_render`): each
id is painted in its object's colour. So the reference costs no render of its own inside
:func:`~.scene_layout.layout_from_camera`, matches the masks pixel for pixel, and its colours
are exact sRGB values, untouched by the scene's view transform.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import bpy
import numpy as np

from ..core.colors import UNCOLORED, Rgb, linear_to_srgb8, paint_ids, prompt_color
from ..core.masks import resample_nearest
from ..core.png import write_rgb_png
from ..core.projection import layout_size, square_pixel_size
from .camera import camera_model, render_resolution
from .id_render import render_ids

REFERENCE_NAME = "reference.png"
"""File name of the reference render in a Layout's folder."""


def material_color(obj) -> Rgb | None:
    """The sRGB base colour of the object's first material, or None without one.

    A Principled BSDF's unlinked Base Color wins; a textured or node-less material gives its
    viewport display colour.
    """
    for slot in obj.material_slots:
        material = slot.material
        if material is None:
            continue
        tree = material.node_tree
        for node in tree.nodes if tree is not None else ():
            if node.type == "BSDF_PRINCIPLED":
                socket = node.inputs.get("Base Color")
                if socket is not None and not socket.is_linked:
                    return linear_to_srgb8(socket.default_value)
                break
        return linear_to_srgb8(material.diffuse_color)
    return None


def object_color(obj, prompt: str | None = None) -> Rgb:
    """The flat colour of ``obj`` in the reference render (see the module notes)."""
    if prompt:
        named = prompt_color(prompt)
        if named is not None:
            return named
    color = material_color(obj)
    if color is not None:
        return color
    if tuple(obj.color[:3]) != (1.0, 1.0, 1.0):  # white is the default: not a choice
        return linear_to_srgb8(obj.color)
    return UNCOLORED


def id_colors(tracked: Sequence[tuple[object, str]], others: Mapping[int, str]) -> dict[int, Rgb]:
    """Colours by render id: ``tracked`` (object, label) pairs are ids 1..N in order;
    ``others`` names the further ids' objects (see :class:`.id_render.IdRender`)."""
    colors = {index: object_color(obj, prompt) for index, (obj, prompt) in enumerate(tracked, 1)}
    for index, name in others.items():
        obj = bpy.data.objects.get(name)
        colors[index] = object_color(obj) if obj is not None else UNCOLORED
    return colors


def write_reference(path: str, ids: np.ndarray, colors: Mapping[int, Rgb]) -> str:
    """Paint an id image (already at the Layout's size) and write it as an 8-bit RGB PNG."""
    write_rgb_png(path, paint_ids(ids, colors))
    return path


def render_reference(scene, labeled: Sequence[tuple[object, str]], path: str, camera=None) -> str:
    """Render the flat-colour reference of ``scene`` alone, at the Layout's size, to ``path``.

    ``labeled`` holds (object, label) pairs. :func:`~.scene_layout.layout_from_camera` with
    ``reference=True`` makes the same image from the render it already does for the masks;
    this is for a reference on its own. The user's scene is left as it was.
    """
    camera = camera or scene.camera
    if camera is None:
        raise ValueError(
            "Set an active camera: the scene has none (Scene properties > Camera, or select a "
            "camera and press Ctrl+Numpad 0)"
        )
    width, height = layout_size(*render_resolution(scene))
    cam = camera_model(scene, camera)
    tracked = [(obj, prompt) for obj, prompt in labeled if not obj.hide_render]
    rendered = render_ids(
        scene, camera, [obj for obj, _ in tracked], *square_pixel_size(cam, width, height)
    )
    ids = resample_nearest(rendered.ids, height, width)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return write_reference(path, ids, id_colors(tracked, rendered.others))
