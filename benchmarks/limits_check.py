"""The engine's time limit and cancel on the device in use: estimate against measured time.

1. SDXL base UNet and VAE topology with random weights (nothing downloaded), in the device's
   precision: one guided denoising step (batch 2, 77 tokens) and one VAE decode, timed, next to
   the engine's estimate (``engine.service.limits``: counted operations over the measured
   matrix-multiply speed), which must stay a lower bound so it never refuses wrongly.
2. Cancel inside a step: a stop raised when the UNet enters its second down block; the time
   from the stop to the CancelledError (device synchronised), next to a whole step.
3. ``engine serve`` in-process on the device with the tiny test model: the ``hello`` limits, a
   generate whose progress carries ``seconds_left``, and a 4096x4096 request refused before its
   first step under a one-second limit (the estimate assumes ``OPTIMISM`` times the measured
   speed).

Run: ``python benchmarks/limits_check.py [--device cuda] [--sides 1024 2048] [--json FILE]``.
On a CPU use ``--sides 256`` (SDXL at 1024 takes minutes per step there).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "benchmarks"), os.path.join(ROOT, "tests", "fixtures"), ROOT]

from sdxl_topology import SDXL_BASE_UNET  # noqa: E402

from engine.errors import CancelledError  # noqa: E402
from engine.service import limits  # noqa: E402

SDXL_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "force_upcast": True,
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, run, repeats: int = 3) -> float:
    run()  # warm-up
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def unet_inputs(side: int, device: str, dtype):
    h = w = side // 8
    return (
        torch.randn(2, 4, h, w, device=device, dtype=dtype),
        torch.tensor([500.0, 500.0], device=device),
        torch.randn(2, 77, 2048, device=device, dtype=dtype),
        {
            "text_embeds": torch.randn(2, 1280, device=device, dtype=dtype),
            "time_ids": torch.randn(2, 6, device=device, dtype=dtype),
        },
    )


def check_estimates(device: str, dtype, sides: list[int]) -> list[dict]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel.from_config(SDXL_BASE_UNET).to(dtype).eval()
        vae = AutoencoderKL.from_config(SDXL_VAE).to(dtype).eval()
    speed = limits.device_flops_per_second(device, str(dtype).split(".")[-1])
    fast = speed * limits.OPTIMISM  # what the engine's estimate assumes
    unet_fit = limits.fitted_flops("unet", limits.config_key(unet.config))
    vae_fit = limits.fitted_flops("vae", limits.config_key(vae.config))
    rows = []
    for side in sides:
        p = float((side // 8) ** 2)
        inputs = unet_inputs(side, device, dtype)
        z = torch.randn(1, 4, side // 8, side // 8, device=device, dtype=dtype)
        with torch.no_grad():
            step = timed(device, lambda x=inputs: unet(*x[:3], added_cond_kwargs=x[3]))
            decode = timed(device, lambda z=z: vae.decode(z), repeats=1)
        unet_flops = unet_fit[0] + unet_fit[1] * p + unet_fit[2] * p * p
        vae_flops = vae_fit[0] + vae_fit[1] * p + vae_fit[2] * p * p
        rows.append(
            {
                "side": side,
                "matmul_tflops": round(speed / 1e12, 1),
                "step_seconds": round(step, 4),
                "step_estimate": round(unet_flops / fast, 4),
                "step_efficiency": round(unet_flops / speed / step, 3),
                "decode_seconds": round(decode, 4),
                "decode_estimate": round(vae_flops / fast, 4),
                "bound_holds": unet_flops / fast <= step and vae_flops / fast <= decode,
            }
        )
        print(rows[-1], flush=True)
    # Cancel inside a step, at the largest side.
    side = sides[-1]
    sample, t, text, added = unet_inputs(side, device, dtype)
    flagged = {}

    def flag(module, args):
        flagged.setdefault("at", time.perf_counter())

    class Holder:
        pass

    holder = Holder()
    holder.unet = unet
    handle = unet.down_blocks[1].register_forward_pre_hook(flag)
    try:
        stop = lambda: CancelledError("cancelled inside the step")  # noqa: E731
        with limits.stop_inside_steps(holder, lambda: "at" in flagged, stop):
            try:
                with torch.no_grad():
                    unet(sample, t, text, added_cond_kwargs=added)
            except CancelledError:
                pass
        sync(device)
        latency = time.perf_counter() - flagged["at"]
    finally:
        handle.remove()
    rows.append({"side": side, "cancel_latency_seconds": round(latency, 4)})
    print(rows[-1], flush=True)
    return rows


def check_serve(device: str) -> dict:
    from tiny import save_tiny_sdxl

    from engine.loading.locate import LoadOptions
    from engine.service.serve import Server

    folder = tempfile.mkdtemp()
    model = save_tiny_sdxl(os.path.join(folder, "tiny"))

    def generate(request_id: str, side: int, steps: int) -> str:
        layout = {"prompt": "a red circle", "width": side, "height": side, "steps": steps}
        out = os.path.join(folder, f"{request_id}.png")
        return json.dumps(
            {"op": "generate", "id": request_id, "model": model, "layout": layout, "out": out}
        )

    started = time.perf_counter()
    replies = []
    for lines, max_seconds in (
        (['{"op": "hello", "id": "h"}', generate("ok", 512, 4)], 600.0),
        ([generate("huge", 4096, 30)], 1.0),
    ):
        raw = io.StringIO()
        server = Server(raw, LoadOptions(device=device), max_seconds=max_seconds)
        server.run(io.StringIO("".join(line + "\n" for line in lines)))
        replies += [json.loads(line) for line in raw.getvalue().splitlines()]
    hello = replies[0]
    progress = [r for r in replies if r["event"] == "progress" and r["id"] == "ok"]
    finals = {r["id"]: r for r in replies if r["event"] in ("result", "error")}
    report = {
        "device": hello["device"],
        "dtype": hello["dtype"],
        "limits": hello["limits"],
        "ok": finals["ok"]["event"],
        "ok_seconds": finals["ok"].get("seconds"),
        "seconds_left": [p.get("seconds_left") for p in progress],
        "huge": {k: finals["huge"].get(k) for k in ("code", "limit", "max", "message")},
        "seconds": round(time.perf_counter() - started, 2),
    }
    print(report, flush=True)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sides", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    results = {"estimates": check_estimates(args.device, dtype, args.sides)}
    results["serve"] = check_serve(args.device)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
