"""Scene -> Layout wall time for 10, 100 and 1000 labeled objects at 1024x1024 (headless, CPU).

Run: ``nice -n 19 .venv/bin/python benchmarks/scene_to_layout.py [--counts 10 100 1000]``.
Prints the total per call and its breakdown: boxes (evaluated geometry + projection), render
(the Cycles object-index/depth render and reading it back), masks (id image to masks and depth)
and png (writing the files). Each count is measured after one warm-up call.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bpy  # noqa: E402
import numpy as np  # noqa: E402

from blender_addon.blender.scene_layout import LabeledObject, layout_from_camera  # noqa: E402


def build_scene(count: int, seed: int = 0):
    """A camera over a field of ``count`` cubes and spheres, all of them in the frame."""
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    camera = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    scene.collection.objects.link(camera)
    camera.location = (0.0, 0.0, 40.0)
    scene.camera = camera
    scene.render.resolution_x = scene.render.resolution_y = 1024
    rng = np.random.default_rng(seed)
    bpy.ops.mesh.primitive_cube_add(size=1.0)
    cube_mesh = bpy.context.object.data
    bpy.data.objects.remove(bpy.context.object)
    bpy.ops.mesh.primitive_uv_sphere_add(radius=0.5, segments=16, ring_count=8)
    sphere_mesh = bpy.context.object.data
    bpy.data.objects.remove(bpy.context.object)
    labeled = []
    for i in range(count):
        mesh = cube_mesh if i % 2 else sphere_mesh
        obj = bpy.data.objects.new(f"Prop{i:04d}", mesh)
        obj.location = (*rng.uniform(-12, 12, 2), rng.uniform(-10, 5))
        obj.scale = [rng.uniform(0.5, 2.0)] * 3
        scene.collection.objects.link(obj)
        labeled.append(LabeledObject(obj, f"prop number {i}"))
    bpy.context.view_layer.update()
    return scene, labeled


def measure(count: int, repeats: int) -> dict[str, float]:
    scene, labeled = build_scene(count)
    with tempfile.TemporaryDirectory() as out_dir:
        layout_from_camera(scene, labeled, out_dir, settings={"prompt": "props"})  # warm-up
        runs = []
        for _ in range(repeats):
            started = time.perf_counter()
            result = layout_from_camera(scene, labeled, out_dir, settings={"prompt": "props"})
            total = time.perf_counter() - started
            runs.append({"total": total, **result.timings})
    best = min(runs, key=lambda r: r["total"])
    best["regions"] = len(result.layout.regions)
    best["skipped"] = len(result.skipped)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{'objects':>8} {'total s':>8} {'boxes':>7} {'render':>7} {'masks':>7} {'png':>7}  kept")
    for count in args.counts:
        r = measure(count, args.repeats)
        print(
            f"{count:>8} {r['total']:>8.3f} {r['boxes']:>7.3f} {r['render']:>7.3f} "
            f"{r['masks']:>7.3f} {r['png']:>7.3f}  {r['regions']} ({r['skipped']} hidden)",
            flush=True,
        )


if __name__ == "__main__":
    main()
