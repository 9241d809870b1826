"""A labeled cube crossing the frame under a top-down camera: the animation test scene.

Shared by the batch-render tests and ``benchmarks/batch_overhead.py``; run inside Blender (or
the ``bpy`` module) with the add-on registered.
"""

from __future__ import annotations

from collections.abc import Sequence


def build_moving_cube(
    keys: Sequence[tuple[int, float]],
    size: int,
    steps: int,
    model: str,
    prompt: str = "a blue square",
):
    """Reset Blender to an empty scene with a camera 10 units above the origin looking down and
    a 2-unit cube labeled ``prompt``, keyed at ``(frame, x)`` for each of ``keys``; frames
    from the first key to the last, square ``size`` renders, ``steps`` denoising steps on
    ``model``. Returns the scene."""
    import bpy

    import blender_addon

    if not hasattr(bpy.types.Scene, "layout_diffusion"):
        blender_addon.register()
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    camera = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    scene.collection.objects.link(camera)
    camera.location = (0.0, 0.0, 10.0)
    scene.camera = camera
    bpy.ops.mesh.primitive_cube_add(size=2)
    cube = bpy.context.object
    cube.name = "Cube"
    cube.layout_diffusion.enabled = True
    cube.layout_diffusion.prompt = prompt
    for frame, x in keys:
        cube.location = (x, 0.0, 0.0)
        cube.keyframe_insert("location", frame=frame)
    scene.render.resolution_x = scene.render.resolution_y = size
    scene.frame_start, scene.frame_end = keys[0][0], keys[-1][0]
    settings = scene.layout_diffusion
    settings.prompt = prompt
    settings.steps = steps
    settings.model = model
    return scene
