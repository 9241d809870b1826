"""Build ``samples/demo.blend``: eight labeled proxies for the bundled shapes model.

    .venv/bin/python samples/make_demo_scene.py [--out samples/demo.blend] [--size 256]

A front orthographic camera sees spheres ("a red circle"), cubes ("a blue square") and cones
("a yellow triangle") in three rows; in the middle row a green sphere stands in front of a
purple cube and hides part of it, so the occlusion-aware masks matter. The scene prompt names
no object, as an artist's would not ("a plain background"). The red sphere slides right over
frames 1-12 so the scene doubles as an animation example. Everything is set from code, so the
file is the same on every run. Render it with the batch command
(``python -m blender_addon.render samples/demo.blend --out DIR``) or open it in Blender with the
add-on enabled and press F12.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 256
"""Render size: four times the shapes model's training size, a canvas of eight objects."""

PROMPT = "a plain background"
RED, BLUE, YELLOW = (0.86, 0.16, 0.16, 1.0), (0.16, 0.31, 0.86, 1.0), (0.92, 0.82, 0.16, 1.0)
GREEN, PURPLE = (0.16, 0.67, 0.24, 1.0), (0.55, 0.24, 0.71, 1.0)
PROXIES = (
    # name, primitive, prompt, location (x, y, z), size, viewport colour; smaller y is nearer
    ("Circle", "sphere", "a red circle", (-2.0, 0.0, 1.7), 0.45, RED),
    ("Square", "cube", "a blue square", (0.0, 0.0, 1.7), 0.85, BLUE),
    ("Triangle", "cone", "a yellow triangle", (2.0, 0.0, 1.7), 0.45, YELLOW),
    ("Purple Triangle", "cone", "a purple triangle", (-2.0, 0.0, 0.0), 0.45, PURPLE),
    ("Back Square", "cube", "a purple square", (0.25, 1.0, 0.1), 0.95, PURPLE),
    ("Front Circle", "sphere", "a green circle", (-0.3, -1.0, -0.25), 0.45, GREEN),
    ("Blue Triangle", "cone", "a blue triangle", (-1.2, 0.0, -1.8), 0.45, BLUE),
    ("Red Square", "cube", "a red square", (1.6, 0.0, -1.7), 0.85, RED),
)
CIRCLE_PATH = ((1, -2.0), (12, -1.3))
"""The sphere's x position keyed at the first and last frame (linear)."""


def _add_proxy(bpy, name: str, primitive: str, size: float, location: tuple[float, ...]):
    if primitive == "sphere":
        bpy.ops.mesh.primitive_uv_sphere_add(radius=size, location=location, segments=48)
    elif primitive == "cube":
        bpy.ops.mesh.primitive_cube_add(size=size, location=location)
    else:
        # Upright cone: seen from the front it is a triangle with its tip up.
        bpy.ops.mesh.primitive_cone_add(
            radius1=size, depth=2 * size, location=location, vertices=48
        )
    obj = bpy.context.object
    obj.name = obj.data.name = name
    return obj


def _linear_keys(obj) -> None:
    """Linear interpolation on every key (Blender 5 keeps F-curves in action channelbags)."""
    action = obj.animation_data.action
    for layer in action.layers:
        for strip in layer.strips:
            for bag in strip.channelbags:
                for curve in bag.fcurves:
                    for key in curve.keyframe_points:
                        key.interpolation = "LINEAR"


def build(size: int) -> None:
    """Replace the open file with the demo scene."""
    import bpy

    import blender_addon

    if not hasattr(bpy.types.Scene, "layout_diffusion"):
        blender_addon.register()
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.name = "Demo"

    camera = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    scene.collection.objects.link(camera)
    camera.data.type = "ORTHO"
    camera.data.ortho_scale = 6.0
    camera.location = (0.0, -10.0, 0.0)
    camera.rotation_euler = (math.pi / 2, 0.0, 0.0)  # looking along +Y, Z up
    scene.camera = camera

    for name, primitive, prompt, location, extent, colour in PROXIES:
        obj = _add_proxy(bpy, name, primitive, extent, location)
        material = bpy.data.materials.new(name)
        material.diffuse_color = colour
        obj.data.materials.append(material)
        obj.color = colour
        obj.layout_diffusion.enabled = True
        obj.layout_diffusion.prompt = prompt

    circle = bpy.data.objects["Circle"]
    for frame, x in CIRCLE_PATH:
        circle.location.x = x
        circle.keyframe_insert("location", index=0, frame=frame)
    _linear_keys(circle)

    render = scene.render
    render.engine = "LAYOUT_DIFFUSION"
    render.resolution_x = render.resolution_y = size
    render.resolution_percentage = 100
    render.image_settings.file_format = "PNG"
    render.filepath = "//render/demo_####"
    scene.view_settings.view_transform = "Standard"  # the generated image comes back unchanged
    scene.frame_start, scene.frame_end = CIRCLE_PATH[0][0], CIRCLE_PATH[-1][0]
    scene.frame_set(scene.frame_start)

    settings = scene.layout_diffusion
    settings.prompt = PROMPT
    settings.model = "shapes"
    settings.seed = 3
    settings.steps = 20
    settings.seed_mode = "SHOT"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "samples", "demo.blend"))
    parser.add_argument("--size", type=int, default=SIZE, help="render size in pixels")
    args = parser.parse_args(argv)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import bpy

    build(args.size)
    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    bpy.context.preferences.filepaths.save_version = 0  # no demo.blend1 backup next to it
    bpy.ops.wm.save_as_mainfile(filepath=out, compress=True, relative_remap=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
