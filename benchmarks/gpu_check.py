"""Regional attention on a GPU: one SDXL UNet step, plain against regional, dense against sparse.

Builds the SDXL base UNet topology with random weights (nothing downloaded) on the GPU in
half precision and times one denoising step with classifier-free guidance (batch 2) with CUDA
events, at 1024x1024 and 2048x2048: plain (one prompt), and 8 and 100 distinct region prompts
computed dense (the additive-bias reference, text keys and values projected at every step, as
before) and sparse (the default: per-block attention, keys and values kept for the call). For
each it prints the median step time, the first step of a call (which builds the per-grid data
and projects what sparse keeps), the peak device memory over plain's, and how far sparse's
output is from dense's on the same inputs. Needs the project and diffusers only; runs in a few
minutes on one GPU.

Run: ``python benchmarks/gpu_check.py`` (``--json FILE`` also writes the rows). ``--tiny`` runs a
tiny UNet on the CPU at 64 and 128 pixels: the same code path, for tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from contextlib import nullcontext
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sdxl_topology import SDXL_BASE_UNET, layout_for  # noqa: E402

from engine.regional.attention import (  # noqa: E402
    RegionalContext,
    fused_merge,
    install_regional_attention,
    segment_backend,
)
from engine.regional.plan import RegionalState, cross_attention_grids, plan_regions  # noqa: E402

# The tiny test UNet (tests/fixtures/tiny.py), for --tiny.
TINY_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    transformer_layers_per_block=(1, 2),
    projection_class_embeddings_input_dim=80,
    cross_attention_dim=64,
    norm_num_groups=8,
)

CASES = [("plain", 0, None), ("1 distinct", 1, "dense"), ("1 distinct", 1, "sparse")]
CASES += [("8 distinct", 8, "dense"), ("8 distinct", 8, "sparse")]
CASES += [("100 distinct", 100, "dense"), ("100 distinct", 100, "sparse")]
CASES += [("100 distinct", 100, "sparse-0")]
CASES += [("100 shared", 100, "dense"), ("100 shared", 100, "sparse")]
"""(name, regions, attention); ``sparse-0``: sparse keeping no keys and values; ``shared``:
every region has the same prompt."""
TOKENS = 77


def build_unet(config: dict, device: torch.device, dtype: torch.dtype):
    """The UNet of ``config`` with random weights, made on ``device`` and cast to ``dtype``."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(config)
    return unet.to(dtype).eval()


class Timer:
    """Wall time of GPU work by CUDA events (CPU: perf_counter)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, function) -> float:
        """Seconds ``function()`` takes."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000
        started = time.perf_counter()
        function()
        return time.perf_counter() - started


def inputs(unet, size: int, blocks: int, device, dtype, seed: int = 0) -> tuple:
    """A guided step's inputs: latents, text of ``blocks`` prompt blocks, added conditioning."""
    config = unet.config
    latent = size // 8
    generator = torch.Generator(device).manual_seed(seed)
    text_width = config.cross_attention_dim
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim

    def normal(*shape):
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    sample = normal(2, config.in_channels, latent, latent)
    text = normal(2, blocks * TOKENS, text_width)
    added = {"text_embeds": normal(2, pooled), "time_ids": normal(2, 6)}
    return sample, text, added


def run_case(unet, context, size, name, count, attention, device, dtype, repeat) -> dict[str, Any]:
    """Time one case: a first step, then ``repeat`` steady steps of the same call."""
    layout = layout_for(count, name.endswith("shared"), size)
    latent = (size // 8, size // 8)
    plan = plan_regions(layout, latent, grids=cross_attention_grids(unet.config, latent))
    blocks = len(plan.prompts)
    sample, text, added = inputs(unet, size, blocks, device, dtype)
    timestep = torch.tensor(500, device=device)
    timer = Timer(device)
    state = None
    if blocks > 1:
        # Dense as before: nothing kept between steps.
        kept = {"kept_bytes": 0} if attention in ("dense", "sparse-0") else {}
        kind = attention.removesuffix("-0")
        state = RegionalState(plan, TOKENS, guided=True, attention=kind, **kept)
    outputs = []

    def step():
        outputs[:] = [unet(sample, timestep, text, added_cond_kwargs=added).sample]

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    with torch.no_grad(), context.active(state) if state is not None else nullcontext():
        first = timer(step)
        times = [timer(step) for _ in range(repeat)]
        kept_bytes = state.kept_bytes if state is not None else 0
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
        busy = device_busy(step) if device.type == "cuda" else None
    row = {
        "size": size,
        "case": name,
        "attention": attention or "plain",
        "blocks": blocks,
        "first_ms": first * 1000,
        "step_ms": statistics.median(times) * 1000,
        "kept_mib": kept_bytes / 2**20,
        "output": outputs[0].float(),
    }
    if device.type == "cuda":
        row["peak_mib"] = (peak - before) / 2**20
        row["busy_ms"] = busy
    return row


def device_busy(step) -> float:
    """Milliseconds the GPU spends in kernels during ``step()`` (the profiler's sum): the step's
    cost without the launch overhead a CPU-bound step hides it under."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        step()
        torch.cuda.synchronize()
    total = 0.0
    for event in trace.key_averages():
        total += getattr(event, "self_device_time_total", None) or getattr(
            event, "self_cuda_time_total", 0.0
        )
    return total / 1000


def kernel_check(device: torch.device, dtype: torch.dtype) -> float:
    """Largest error of the segment kernel (output and log-sum-exp) against attention computed
    segment by segment in float32, on segments of 0 to 300 queries."""
    from engine.regional.attention import merge_with_torch, segment_attention
    from engine.regional.plan import BlockPairs

    generator = torch.Generator(device).manual_seed(1)
    counts = [300, 0, 5, 77, 0, 1, 129]
    heads, dim, total = 10, 64, sum(counts)
    pairs = BlockPairs(
        queries=total,
        blocks=len(counts),
        index=torch.arange(total, device=device),
        counts=counts,
        log_weight=torch.zeros(total, device=device),
        share=torch.ones(total, device=device),
    )

    def normal(*shape):
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    query, key, value = (
        normal(total, heads, dim),
        normal(7 * TOKENS, heads, dim),
        normal(7 * TOKENS, heads, dim),
    )
    out, lse = segment_attention(query, key, value, pairs, TOKENS)
    # The merge on two blocks sharing every query: the fused kernel (GPU) against PyTorch's.
    half = total // 2
    shared = BlockPairs(
        queries=half,
        blocks=2,
        index=torch.cat([torch.arange(half), torch.arange(half)]).to(device),
        counts=[half, half],
        log_weight=torch.rand(2 * half, device=device).log(),
        share=torch.full((2 * half,), 0.5, device=device),
    )
    plain = merge_with_torch(out[: 2 * half].clone(), lse[: 2 * half], shared, half, "joint")
    fused = fused_merge(device)
    if fused is None:
        merge_error = 0.0
    else:
        order, offsets = shared.by_query()
        merged = fused(out[: 2 * half], lse[: 2 * half], shared.log_weight, offsets, order, True)
        merge_error = (merged.float() - plain.float()).abs().max().item()
    error, start = 0.0, 0
    for segment, count in enumerate(counts):
        q = query[start : start + count].float().transpose(0, 1)
        k = key[segment * TOKENS : (segment + 1) * TOKENS].float().transpose(0, 1)
        v = value[segment * TOKENS : (segment + 1) * TOKENS].float().transpose(0, 1)
        scores = q @ k.transpose(-1, -2) / dim**0.5
        expected = (torch.softmax(scores, -1) @ v).transpose(0, 1)
        got = out[start : start + count].float()
        error = max(error, (got - expected).abs().max().item() if count else 0.0)
        if count:
            error = max(
                error, (lse[start : start + count].T - scores.logsumexp(-1)).abs().max().item()
            )
        start += count
    print(f"merge: fused against PyTorch {merge_error:.2e}")
    return error


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny UNet on the CPU (tests)")
    parser.add_argument("--sizes", type=int, nargs="+", help="image sides in pixels")
    parser.add_argument("--repeat", type=int, default=5, help="timed steps per case")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument(
        "--profile", action="store_true", help="also profile a dense and a sparse step (kernels)"
    )
    args = parser.parse_args(argv)
    if args.tiny:
        device, dtype, config = torch.device("cpu"), torch.float32, TINY_UNET
        sizes = args.sizes or [64, 128]
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device; use --tiny to run the check on the CPU")
        device, dtype, config = torch.device("cuda"), torch.float16, SDXL_BASE_UNET
        sizes = args.sizes or [1024, 2048]
        torch.backends.cuda.matmul.allow_tf32 = True
    started = time.perf_counter()
    unet = build_unet(config, device, dtype)
    context = RegionalContext()
    install_regional_attention(unet, context)
    with torch.no_grad():  # kernels chosen and libraries loaded before anything is timed
        sample, text, added = inputs(unet, sizes[0], 1, device, dtype)
        unet(sample, torch.tensor(500, device=device), text, added_cond_kwargs=added)
    print(f"segment kernel error vs float32 reference: {kernel_check(device, dtype):.2e}")
    print(
        f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch "
        f"{torch.__version__}, {dtype}, UNet built in {time.perf_counter() - started:.1f} s; "
        f"sparse kernel: {segment_backend(device, dtype)}",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    for size in sizes:
        dense_out: dict[str, torch.Tensor] = {}
        for name, count, attention in CASES:
            try:
                row = run_case(
                    unet, context, size, name, count, attention, device, dtype, args.repeat
                )
            except Exception as exc:  # one failing case must not hide the others
                traceback.print_exc()
                rows.append({"size": size, "case": name, "attention": attention, "error": str(exc)})
                continue
            output = row.pop("output")
            if attention == "dense":
                dense_out[name] = output
            elif attention and attention.startswith("sparse") and name in dense_out:
                reference = dense_out[name]
                row["vs_dense"] = ((output - reference).abs().max() / reference.abs().max()).item()
            rows.append(row)
            print(
                json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}),
                flush=True,
            )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(rows, device)
    print(f"segment kernel after the run: {segment_backend(device, dtype)}")
    print(f"merge: {'fused (Triton)' if fused_merge(device) else 'PyTorch operations'}")
    if args.profile:
        profile(unet, context, sizes[0], device, dtype)
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    return rows


def profile(unet, context, size: int, device: torch.device, dtype: torch.dtype) -> None:
    """The kernels of one steady step with 100 prompts, dense and sparse, by device time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]

    def synchronize() -> None:
        if cuda:
            torch.cuda.synchronize()

    for attention in ("dense", "sparse"):
        layout = layout_for(100, False, size)
        latent = (size // 8, size // 8)
        plan = plan_regions(layout, latent, grids=cross_attention_grids(unet.config, latent))
        sample, text, added = inputs(unet, size, len(plan.prompts), device, dtype)
        state = RegionalState(plan, TOKENS, guided=True, attention=attention)
        timestep = torch.tensor(500, device=device)
        with torch.no_grad(), context.active(state):
            unet(sample, timestep, text, added_cond_kwargs=added)
            synchronize()
            with profiler(activities=activities) as trace:
                unet(sample, timestep, text, added_cond_kwargs=added)
                synchronize()
        print(f"\n{attention}, 100 distinct, {size}px: one steady step")
        order = "cuda_time_total" if cuda else "cpu_time_total"
        table = trace.key_averages().table(sort_by=order, row_limit=14)
        print(table[-6000:])


def print_table(rows: list[dict[str, Any]], device: torch.device) -> None:
    """One table: per size and case, step times and memory over plain's."""
    print()
    header = (
        f"{'size':>5} {'case':<13} {'attention':<9} {'step ms':>8} {'x plain':>7} "
        f"{'GPU ms':>7} {'x plain':>7} {'1st ms':>8} {'peak MiB':>9} {'K/V MiB':>8} "
        f"{'vs dense':>9}"
    )
    print(header)
    print("-" * len(header))
    plain = {r["size"]: r for r in rows if r.get("attention") == "plain" and "error" not in r}
    for row in rows:
        if "error" in row:
            print(
                f"{row['size']:>5} {row['case']:<13} {row['attention']!s:<9} failed: {row['error'][:60]}"
            )
            continue
        base = plain.get(row["size"])
        ratio = row["step_ms"] / base["step_ms"] if base else float("nan")
        peak = row.get("peak_mib")
        extra = "" if peak is None or base is None else f"{peak - base['peak_mib']:+.0f}"
        vs_dense = f"{row['vs_dense']:.1e}" if "vs_dense" in row else ""
        busy = row.get("busy_ms")
        busy_text = f"{busy:>7.2f}" if busy is not None else f"{'':>7}"
        busy_ratio = f"{busy / base['busy_ms']:>6.3f}x" if busy is not None and base else f"{'':>7}"
        print(
            f"{row['size']:>5} {row['case']:<13} {row['attention']:<9} {row['step_ms']:>8.2f} "
            f"{ratio:>6.3f}x {busy_text} {busy_ratio} {row['first_ms']:>8.2f} {extra:>9} "
            f"{row['kept_mib']:>8.0f} {vs_dense:>9}"
        )
    print()
    print("step ms: median steady step (CUDA events); GPU ms: time the GPU spends in kernels")
    print("in one steady step (profiler), which a step bound by launch overhead hides; 1st ms:")
    print("the call's first step; peak MiB:")
    print("peak device memory over plain's, kept keys and values included; K/V MiB: what")
    print("sparse keeps for the call; vs dense: max |sparse - dense| / max |dense| of the step's")
    print("output on the same inputs.")
    if device.type != "cuda":
        print("(CPU: no device memory figures)")


if __name__ == "__main__":
    main()
