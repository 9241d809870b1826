"""What the Blender side and the protocol add on top of generation in an animation batch.

    .venv/bin/python benchmarks/batch_overhead.py [--frames 48] [--size 64] [--steps 2]

Builds a scene with a labeled cube crossing the frame, saves a tiny random SDXL (real
architecture) to a temporary folder, starts the engine once, then times
:class:`blender_addon.render.batch.BatchRenderer` over the frames: frame change, projection, mask
render, request, response, atomic publish and sidecar per frame. Prints the batch time (engine
start and model load excluded) divided by the sum of the engine's own generation times (the
``seconds`` of each result event). 1.00 means the batch costs nothing beyond generating.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def build_scene(frame_count: int, size: int, steps: int, model: str):
    """A cube moving left to right over ``frame_count`` frames, labeled, camera looking down."""
    from samples.moving_cube import build_moving_cube

    return build_moving_cube(((1, -2.0), (frame_count, 2.0)), size, steps, model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)

    from blender_addon.client.engine_client import EngineClient
    from blender_addon.render.batch import BatchRenderer

    with tempfile.TemporaryDirectory(prefix="batch-overhead-") as folder:
        model = os.path.join(folder, "tiny-sdxl")
        # Built in a child so torch never loads next to bpy in this process.
        subprocess.run(
            [
                sys.executable,
                "-c",
                f"from tiny import save_tiny_sdxl; save_tiny_sdxl({model!r})",
            ],
            check=True,
            cwd=ROOT,
        )
        scene = build_scene(args.frames, args.size, args.steps, model)
        client = EngineClient(sys.executable, cwd=ROOT)
        try:
            client.hello()  # engine start is a once-per-batch cost: keep it out of the timing
            renderer = BatchRenderer(scene, os.path.join(folder, "out"), client)
            started = time.perf_counter()
            summary = renderer.run(list(range(1, args.frames + 1)))
            wall = time.perf_counter() - started
        finally:
            client.close()
    written = [o for o in summary.outcomes if o.status == "written"]
    if len(written) != args.frames:
        print(f"only {len(written)} of {args.frames} frames written: {summary.stopped}")
        return 1
    batch = wall - summary.load_seconds
    generation = sum(o.generate_seconds for o in written)
    layout = statistics.median(o.layout_seconds for o in written)
    print(
        f"{args.frames} frames at {args.size}x{args.size}, {args.steps} steps, tiny SDXL, "
        f"engine pids {summary.engine_pids}"
    )
    print(f"model load (excluded)          {summary.load_seconds:8.2f} s")
    print(f"batch time                     {batch:8.2f} s")
    print(f"sum of engine generation times {generation:8.2f} s")
    print(f"ratio                          {batch / generation:8.3f}  (goal < 1.10)")
    print(
        f"Blender side per frame (frame change, projection, mask render): median {layout * 1000:.0f} ms"
    )
    print(
        f"time not hidden behind generation, per frame: {(batch - generation) / len(written) * 1000:.0f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
