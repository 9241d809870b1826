"""What sending a generate's files inline (protocol 2, a remote engine) costs per request.

    .venv/bin/python benchmarks/inline_overhead.py [--size 1024] [--regions 4] [--repeat 5]

Part 1, no model: a Layout of ``--size`` with ``--regions`` masks, a 16-bit depth map and an RGB
init image (noisy, so PNG compresses them about as badly as real renders), and a result PNG of
the same size. Times each side's work: the client reading and encoding the files into the
request line, the engine parsing and checking the line and decoding the files into its request
folder, the engine encoding the result
and the client checking it and writing it atomically. Prints bytes on the wire and milliseconds.

Part 2, end to end on a tiny random SDXL at 64x64, 1 step: median wall time of ``--repeat``
generates from the add-on's client through a local engine reading paths, and through an engine
command (``tests/fixtures/remote_engine.py``, relaying the pipes like ssh, files hidden from the
engine) carrying the same Layout inline.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "fixtures"))


def noisy_png(path: str, size: int, mode: str, seed: int) -> None:
    """A gradient with noise: a realistic worst case for PNG size."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)[None, :] * np.linspace(0.3, 1, size)[:, None]
    if mode == "I;16":
        data = (ramp * 60000 + rng.normal(0, 300, (size, size))).clip(0, 65535)
        Image.fromarray(data.astype(np.uint16)).save(path)
    elif mode == "L":
        Image.fromarray(((ramp > 0.5) * 255).astype(np.uint8), "L").save(path)
    else:
        rgb = np.stack([ramp * 255, ramp[::-1] * 200, ramp.T * 180], -1)
        rgb = (rgb + rng.normal(0, 6, rgb.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(rgb, "RGB").save(path)


def part_one(size: int, regions: int, repeat: int) -> None:
    from blender_addon.client.engine_client import EngineClient
    from engine.service.serve import check_request_values, unpack_files
    from engine.wire.inline import decode_file, encode_file
    from engine.wire.protocol import MAX_INLINE_FILE_BYTES

    folder = tempfile.mkdtemp(prefix="ld-inline-bench-")
    try:
        layout = {
            "prompt": "a scene",
            "width": size,
            "height": size,
            "depth": os.path.join(folder, "depth.png"),
            "init_image": os.path.join(folder, "init.png"),
            "regions": [],
        }
        noisy_png(layout["depth"], size, "I;16", 1)
        noisy_png(layout["init_image"], size, "RGB", 2)
        for i in range(regions):
            mask = os.path.join(folder, f"mask{i}.png")
            noisy_png(mask, size, "L", 3 + i)
            layout["regions"].append({"prompt": f"object {i}", "box": [0, 0, 1, 1], "mask": mask})
        result_png = os.path.join(folder, "result.png")
        noisy_png(result_png, size, "RGB", 99)
        with open(result_png, "rb") as handle:
            result_bytes = handle.read()

        client = EngineClient("", command=["true"])
        pack, unpack, back = [], [], []
        for _ in range(repeat):
            started = time.perf_counter()
            files = client.pack_files(layout)
            line = json.dumps({"op": "generate", "id": "x", "layout": layout, "files": files})
            pack.append(time.perf_counter() - started)

            target = tempfile.mkdtemp(dir=folder)
            started = time.perf_counter()
            request = json.loads(line)
            check_request_values(request)
            unpack_files(request["layout"], request["files"], target)
            unpack.append(time.perf_counter() - started)
            shutil.rmtree(target)

            started = time.perf_counter()
            event = json.dumps({"id": "x", "event": "result", "png": encode_file(result_bytes)})
            landed = client._land_result(json.loads(event), os.path.join(folder, "landed.png"))
            assert landed["event"] == "result"
            back.append(time.perf_counter() - started)
        decode_file(json.loads(event)["png"], MAX_INLINE_FILE_BYTES)
        sent = sum(f["bytes"] for f in files)
        print(
            f"{size}x{size}, {regions} masks + 16-bit depth + init image: {sent / 1e6:.2f} MB of "
            f"files, request line {len(line) / 1e6:.2f} MB; result PNG {len(result_bytes) / 1e6:.2f} "
            f"MB, event line {len(event) / 1e6:.2f} MB"
        )
        print(
            f"  client read+encode+json {statistics.median(pack) * 1e3:.1f} ms, engine parse+check+"
            f"decode+write {statistics.median(unpack) * 1e3:.1f} ms, result encode+check+write "
            f"{statistics.median(back) * 1e3:.1f} ms (medians of {repeat})"
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def part_two(repeat: int) -> None:
    from PIL import Image
    from tiny import save_tiny_sdxl

    from blender_addon.client.engine_client import EngineClient

    folder = tempfile.mkdtemp(prefix="ld-inline-e2e-")
    try:
        model = save_tiny_sdxl(os.path.join(folder, "model"))
        client_dir = os.path.join(folder, "client")
        os.makedirs(client_dir)
        mask = os.path.join(client_dir, "mask.png")
        Image.new("L", (64, 64), 255).save(mask)
        layout = {
            "prompt": "a red circle",
            "width": 64,
            "height": 64,
            "steps": 1,
            "seed": 1,
            "regions": [{"prompt": "a circle", "box": [0, 0, 1, 1], "mask": mask}],
        }
        wrapper = os.path.join(ROOT, "tests", "fixtures", "remote_engine.py")
        remote = [sys.executable, wrapper, "--home", os.path.join(folder, "remote")]
        remote += ["--hide", client_dir]
        clients = {
            "local, paths": EngineClient(sys.executable, cwd=ROOT),
            "engine command, inline": EngineClient("", command=remote),
        }
        for name, client in clients.items():
            with client:
                client.hello()
                out = os.path.join(client_dir, "out.png")
                client.generate(layout, out, model).wait(600)  # loads the model
                times = []
                for _ in range(repeat):
                    started = time.perf_counter()
                    final = client.generate(layout, out, model).wait(600)
                    times.append(time.perf_counter() - started)
                    assert final["event"] == "result", final
                print(
                    f"  {name}: {statistics.median(times) * 1e3:.1f} ms per generate "
                    f"(engine's own generation {final['seconds'] * 1e3:.1f} ms)"
                )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--regions", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    part_one(args.size, args.regions, args.repeat)
    print("end to end, tiny model 64x64, 1 step:")
    part_two(args.repeat)


if __name__ == "__main__":
    main()
