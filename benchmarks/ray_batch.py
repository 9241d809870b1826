"""Frames per minute of the Ray batch with 1 and 2 actors on this machine, and on paper for 8 GPUs.

    .venv/bin/python benchmarks/ray_batch.py [--frames 16] [--size 64] [--steps 20]
        [--step-ms 87] [--build-seconds 0.75]

Starts a local Ray cluster with one CPU per core of this machine, builds a labeled cube crossing
the view on the bundled shapes model, and renders the same frames with
:class:`blender_addon.render.ray_batch.RayBatchRenderer` on a pool of 1, then 2 CPU actors (one
torch thread each: Ray gives a one-CPU actor ``OMP_NUM_THREADS=1`` and its engine inherits it).
Engine start and model load are left out: each pool renders one warm-up frame per actor first.
Blender's side (frame change, projection, mask render, writing) runs in this process, as in a
real batch. Prints frames per minute, each worker's rate and the ratio of the two pools.

Then, on paper, a 240-frame 1024x1024 shot at 30 steps on 8 GPUs: ``--step-ms`` is one CFG step
of SDXL at 1024² on one GPU (default 87 ms: the median plain step ``benchmarks/gpu_check.py``
measured on an H200 in fp16, wall time, 42 ms of it in kernels; run it on your GPU for yours);
``--build-seconds`` is Blender's side per frame at 1024² (the README measures
0.65-0.88 s for scene to Layout on this machine).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DECODE_SECONDS = 0.15
"""Assumed: SDXL's VAE decode of one 1024² image on an H100-class GPU, with the PNG write."""
LOAD_SECONDS = 20.0
"""Assumed: loading SDXL onto each GPU once per batch (fp16 safetensors from local disk)."""


def build_scene(frame_count: int, size: int, steps: int):
    """A blue square crossing the view over ``frame_count`` frames, on the shapes model."""
    from samples.moving_cube import build_moving_cube

    scene = build_moving_cube(((1, -2.0), (frame_count, 2.0)), size, steps, "shapes")
    scene.layout_diffusion.seed = 7
    return scene


def measure(ray, scene, actors: int, frame_count: int, folder: str) -> dict:
    """Frames per minute of a warm pool of ``actors`` CPU actors over ``frame_count`` frames."""
    from blender_addon.render.ray_batch import RayBatchRenderer
    from blender_addon.render.ray_pool import RayPool

    pool = RayPool(ray, actors, gpus=False, engine_python=sys.executable)
    try:
        # One frame per actor: engines started and the model loaded before the clock starts.
        warm = RayBatchRenderer(scene, os.path.join(folder, f"warm-{actors}"), pool)
        summary = warm.run(list(range(1, actors + 1)))
        assert summary.ok, (summary.stopped, [o.message for o in summary.outcomes])
        renderer = RayBatchRenderer(
            scene, os.path.join(folder, f"frames-{actors}"), pool, seed_mode="frame"
        )
        before = {name: done for name, done, _ in pool.rates()}
        load = os.getloadavg()[0]
        started = time.perf_counter()
        summary = renderer.run(list(range(1, frame_count + 1)))
        seconds = time.perf_counter() - started
        counts = [(name, done - before.get(name, 0)) for name, done, _ in pool.rates()]
        rates = ", ".join(f"{name} {n} at {60 * n / seconds:.1f}/min" for name, n in counts)
        assert summary.ok and summary.count("written") == frame_count, summary.stopped
        written = [o for o in summary.outcomes if o.status == "written"]
        return {
            "actors": actors,
            "seconds": seconds,
            "per_minute": 60.0 * frame_count / seconds,
            "generate": sum(o.generate_seconds for o in written) / len(written),
            "build": sum(o.layout_seconds for o in written) / len(written),
            "rates": rates,
            "load": load,
        }
    finally:
        pool.close()


def on_paper(step_ms: float, build_seconds: float, gpus: int = 8, frames: int = 240) -> None:
    steps = 30
    frame = steps * step_ms / 1000.0 + DECODE_SECONDS
    gpu_rate = gpus * 60.0 / frame
    blender_rate = 60.0 / build_seconds
    rate = min(gpu_rate, blender_rate)
    print(f"\nOn paper: {frames} frames at 1024x1024, {steps} steps, on {gpus} GPUs")
    print(
        f"  one frame on one GPU: {steps} x {step_ms:g} ms (CFG step, fp16, H200 "
        f"as measured by gpu_check.py; see --step-ms) + {DECODE_SECONDS:g} s decode and PNG = {frame:.2f} s"
    )
    print(
        f"  {gpus} GPUs: {gpu_rate:.0f} frames/min; {frames} frames in "
        f"{frames / gpu_rate:.1f} min + {LOAD_SECONDS:g} s model load (once per GPU, in parallel)"
    )
    print(
        f"  one Blender process builds a 1024² frame in {build_seconds:g} s (README: 0.65-0.88 s): "
        f"{blender_rate:.0f} frames/min"
    )
    bound = "Blender" if blender_rate < gpu_rate else "the GPUs"
    print(
        f"  => {rate:.0f} frames/min, {frames / rate + LOAD_SECONDS / 60:.1f} min for the shot, "
        f"bound by {bound}"
    )
    if blender_rate < gpu_rate:
        renderers = int(-(-gpu_rate // blender_rate))
        split = [gpus // renderers + (1 if i < gpus % renderers else 0) for i in range(renderers)]
        print(
            f"  {renderers} renderer processes on the same --out (frame claims split the frames), "
            f"with --ray-workers {', '.join(map(str, split))}, keep all {gpus} GPUs busy: "
            f"{frames / gpu_rate + LOAD_SECONDS / 60:.1f} min"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--step-ms", type=float, default=87.0)
    parser.add_argument("--build-seconds", type=float, default=0.75)
    args = parser.parse_args(argv)

    os.environ["OMP_NUM_THREADS"] = "1"
    import ray

    cores = os.cpu_count() or 2
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        scene = build_scene(args.frames, args.size, args.steps)
        with tempfile.TemporaryDirectory(prefix="ray-batch-") as folder:
            for actors in (1, 2):
                rows.append(measure(ray, scene, actors, args.frames, folder))
                shutil.rmtree(folder, ignore_errors=True)
                os.makedirs(folder, exist_ok=True)
    finally:
        ray.shutdown()

    print(
        f"Ray batch on this machine ({cores} cores): {args.frames} frames, shapes model, "
        f"{args.size}x{args.size}, {args.steps} steps, one torch thread per actor"
    )
    header = f"{'actors':>6} {'seconds':>8} {'frames/min':>10} {'gen s/frame':>11} {'build s':>8}"
    print(f"{header} {'load':>5}  workers")
    for row in rows:
        print(
            f"{row['actors']:>6} {row['seconds']:>8.1f} {row['per_minute']:>10.1f} "
            f"{row['generate']:>11.2f} {row['build']:>8.3f} {row['load']:>5.2f}  {row['rates']}"
        )
    print(
        "gen s/frame: the engine's own time per frame; build s: Blender's side per frame; load: "
        "the 1-minute load average when the timed run started (other processes on these cores)"
    )
    print(f"2 actors / 1 actor: {rows[1]['per_minute'] / rows[0]['per_minute']:.2f}x")
    on_paper(args.step_ms, args.build_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
