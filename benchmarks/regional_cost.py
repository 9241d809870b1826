"""What regional guidance costs over a plain SDXL step, in attention mode and latent mode.

1. Attention mode on the real SDXL base UNet topology, built on the meta device in half
   precision (no weights, nothing downloaded), at 1024x1024 and 2048x2048, for 1, 8, 32 and 100
   distinct region prompts and 100 boxes sharing one prompt, dense (the additive-bias
   reference) and sparse (the default) side by side:
   - FLOPs of one denoising step with classifier-free guidance (batch 2), counted with torch's
     FlopCounterMode around exactly what the processors execute. Sparse attention keeps the
     text keys and values of a call, so its first step projects them and the others do not:
     both are shown, and the call's mean over the Layout's default 30 steps.
   - Memory: the peak of live tensor bytes during a steady step over plain's (tracked on the
     meta device op by op), with nothing kept between steps, and apart from it the text keys
     and values a call keeps and the per-grid data it keeps (dense bias or sparse pairs).
2. Set-up time per call on CPU: planning the block weights and building what attention reads
   (before: every grid, dense fp32 bias; now: the UNet's grids, sparse pairs), and a scene of
   1000 objects (720 visible) with mask images, first and second request.
3. Wall time per denoising step on the tiny SDXL model on CPU (median over steps and runs):
   plain, dense and sparse attention mode in one run, and latent mode.
4. FLOPs with a masked IP-Adapter (one region image, the published ``ip-adapter_sdxl`` shape:
   a 1280-wide image embedding projected to 4 tokens), on the plain path (one prompt block) and
   the regional one; and latent mode's UNet calls (negative prompt and blocks, two per call;
   cropped blocks alone), with the default crops and with none.

Run: ``python benchmarks/regional_cost.py`` (all tables; about ten minutes on 2 busy cores);
``--quick`` skips the tiny-model and latent-mode tables; ``--ip-adapter`` prints the IP-Adapter
FLOP table alone (seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import tempfile
import time
import weakref

import torch
from diffusers import UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests", "fixtures")]  # the engine, the tiny model

from sdxl_topology import SDXL_BASE_UNET, layout_for  # noqa: E402

from engine.conditions.object_images import (  # noqa: E402
    ObjectImageContext,
    ObjectImageState,
    masked_ip_adapter,
)
from engine.regional.attention import (  # noqa: E402
    CROSS_ATTENTION_SUFFIX,
    RegionalContext,
    install_regional_attention,
)
from engine.regional.latent import CropPolicy, plan_latent_regions  # noqa: E402
from engine.regional.masks import box_coverage  # noqa: E402
from engine.regional.plan import (  # noqa: E402
    DEFAULT_KEPT_BYTES,
    RegionalState,
    cross_attention_grids,
    plan_regions,
)
from engine.wire.layout import Layout, Region  # noqa: E402

# The default crops' proportions (margin 8, min side 64 of a 128 latent) on the tiny model's
# 64 latent pixels at 128x128.
TINY_CROPS = CropPolicy(margin=4, min_side=32)

# Latent mode (one UNet call per block): its own, smaller cases.
CASES = [("plain", 0, False), ("1 region", 1, False), ("8 distinct", 8, False)]
CASES += [("16 distinct", 16, False), ("100 shared", 100, True)]

ATTENTION_CASES = [("1 distinct", 1, False), ("8 distinct", 8, False)]
ATTENTION_CASES += [("32 distinct", 32, False), ("100 distinct", 100, False)]
ATTENTION_CASES += [("100 shared", 100, True)]
SIZES = (1024, 2048)
CALL_STEPS = 30
"""Steps of a call (the Layout default) over which the first step's projections spread."""
MIB = 2**20

# h94/IP-Adapter, sdxl_models/ip-adapter_sdxl: ViT-bigG image embeddings, 4 image tokens.
IP_ADAPTER_EMBED = 1280
IP_ADAPTER_TOKENS = 4
# The image's box when the Layout has no region of its own (one prompt block everywhere).
IMAGE_BOX = (0.1, 0.1, 0.6, 0.6)
IP_CASES = [("plain", 0), ("1 region", 1)]


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensors allocated under this mode and still alive, and their peak.

    Works on the meta device (shapes only): an operation's output counts when it owns new
    storage (not a view or an in-place result) and stops counting when the last tensor on
    that storage is gone. Weights and inputs made outside the mode do not count.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[int, list[int]] = {}  # storage -> [tensors alive, bytes]

    def reset_peak(self) -> None:
        """Start a new peak from what is alive now."""
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        for i, tensor in enumerate(out if isinstance(out, (tuple, list)) else (out,)):
            if not isinstance(tensor, torch.Tensor):
                continue
            key = tensor.untyped_storage()._cdata
            entry = self._storages.get(key)
            if entry is None:
                if i < len(returns) and returns[i].alias_info is not None:
                    continue  # a view of memory made outside (weights, inputs)
                entry = self._storages[key] = [0, tensor.untyped_storage().nbytes()]
                self.live += entry[1]
                self.peak = max(self.peak, self.live)
            entry[0] += 1
            weakref.finalize(tensor, self._release, key)
        return out

    def _release(self, key: int) -> None:
        entry = self._storages.get(key)
        if entry is not None:
            entry[0] -= 1
            if entry[0] == 0:
                del self._storages[key]
                self.live -= entry[1]


@dataclasses.dataclass
class CallCost:
    """One Layout call's first steps on the meta device."""

    flops: list[float]
    """FLOPs of each step."""
    peak: int = 0
    """Peak live bytes during the last step."""
    kept: int = 0
    """Text keys and values the call keeps."""
    per_grid: int = 0
    """Bytes of the per-grid data attention reads (dense bias or sparse pairs)."""
    blocks: int = 1


def meta_call(
    unet: UNet2DConditionModel,
    context: RegionalContext,
    layout: Layout,
    attention: str = "sparse",
    kept_bytes: int = DEFAULT_KEPT_BYTES,
    steps: int = 1,
    memory: bool = False,
    references: ObjectImageContext | None = None,
) -> CallCost:
    """FLOPs (and with ``memory`` the peak live bytes of the last step) of ``steps`` guided
    UNet calls of one Layout call on the meta UNet.

    With ``references`` (a UNet from :func:`meta_ip_adapter_unet`) the call also carries one
    reference image, masked to the first region's box (``IMAGE_BOX`` without regions).
    """
    latent = (layout.height // 8, layout.width // 8)
    plan = plan_regions(layout, latent, grids=cross_attention_grids(unet.config, latent))
    blocks = len(plan.prompts)
    meta = torch.device("meta")
    dtype = unet.dtype
    sample = torch.empty(2, 4, *latent, device=meta, dtype=dtype)
    text = torch.empty(2, blocks * 77, 2048, device=meta, dtype=dtype)
    added = {
        "text_embeds": torch.empty(2, 1280, device=meta, dtype=dtype),
        "time_ids": torch.empty(2, 6, device=meta, dtype=dtype),
    }
    cost = CallCost(flops=[], blocks=blocks)
    with contextlib.ExitStack() as stack:
        state = None
        # One prompt everywhere: the pipeline runs no regional state.
        if blocks > 1:
            state = RegionalState(
                plan, block_tokens=77, guided=True, attention=attention, kept_bytes=kept_bytes
            )
            stack.enter_context(context.active(state))
        if references is not None:
            added["image_embeds"] = [torch.empty(2, 1, IP_ADAPTER_EMBED, device=meta, dtype=dtype)]
            box = layout.regions[0].box if layout.regions else IMAGE_BOX
            images = ObjectImageState([box_coverage(box, *latent)], [1.0], latent)
            stack.enter_context(references.active(images))
        tracker = stack.enter_context(LiveBytes()) if memory else None
        for _ in range(steps):
            if tracker is not None:
                tracker.reset_peak()
            counter = FlopCounterMode(display=False)
            with counter:
                unet(sample, torch.tensor(500, device=meta), text, added_cond_kwargs=added)
            cost.flops.append(counter.get_total_flops())
        if tracker is not None:
            cost.peak = tracker.peak
        if state is not None:
            cost.kept = state.kept_bytes
            cost.per_grid = state.per_grid_bytes()
    return cost


def meta_step_flops(
    unet: UNet2DConditionModel,
    context: RegionalContext,
    layout: Layout,
    references: ObjectImageContext | None = None,
):
    """FLOPs of one guided UNet call for ``layout`` and the number of text tokens it used."""
    cost = meta_call(unet, context, layout, references=references)
    return cost.flops[0], cost.blocks * 77


def meta_sdxl_unet(
    dtype: torch.dtype = torch.float32,
) -> tuple[UNet2DConditionModel, RegionalContext]:
    """The SDXL base UNet on the meta device with the regional processors installed."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SDXL_BASE_UNET).eval().to(dtype)
    context = RegionalContext()
    install_regional_attention(unet, context)
    return unet, context


def meta_ip_adapter_unet() -> tuple[UNet2DConditionModel, RegionalContext, ObjectImageContext]:
    """:func:`meta_sdxl_unet` with an SDXL IP-Adapter loaded as the engine loads one.

    diffusers' IP-Adapter processors and image projection are put where ``load_ip_adapter``
    puts them, then made regional and masked as a Layout call makes them (``masked_ip_adapter``).
    """
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

    unet, context = meta_sdxl_unet()
    processors = dict(unet.attn_processors)
    with torch.device("meta"):
        for name in processors:
            if name.endswith(CROSS_ATTENTION_SUFFIX):
                attn = unet.get_submodule(name.removesuffix(".processor"))
                processors[name] = IPAdapterAttnProcessor2_0(
                    attn.inner_dim, 2048, num_tokens=(IP_ADAPTER_TOKENS,)
                )
        projection = ImageProjection(IP_ADAPTER_EMBED, 2048, IP_ADAPTER_TOKENS)
        unet.encoder_hid_proj = MultiIPAdapterImageProjection([projection])
    unet.register_to_config(encoder_hid_dim_type="ip_image_proj")
    images = ObjectImageContext()
    convert = masked_ip_adapter(context, images)
    unet.set_attn_processor({name: convert(p) or p for name, p in processors.items()})
    return unet, context, images


def ip_adapter_rows() -> list[tuple[str, float, float]]:
    """Per case of ``IP_CASES``: SDXL FLOPs of one CFG step at 1024x1024 without and with a
    masked reference image."""
    unet, context = meta_sdxl_unet()
    ip_unet, ip_context, references = meta_ip_adapter_unet()
    rows = []
    with torch.no_grad():
        for name, count in IP_CASES:
            layout = layout_for(count, False, 1024)
            without, _ = meta_step_flops(unet, context, layout)
            with_image, _ = meta_step_flops(ip_unet, ip_context, layout, references)
            rows.append((name, without, with_image))
    return rows


def print_ip_adapter_rows(rows: list[tuple[str, float, float]]) -> None:
    """The IP-Adapter FLOP table."""
    print(f"IP-Adapter, one masked region image ({IP_ADAPTER_TOKENS} image tokens)")
    header = f"{'case':<12} {'TFLOP':>7} {'+ image':>8} {'FLOPs':>7}"
    print(header)
    print("-" * len(header))
    for name, without, with_image in rows:
        print(
            f"{name:<12} {without / 1e12:>7.3f} {with_image / 1e12:>8.3f} "
            f"{with_image / without:>6.4f}x"
        )
    print()
    print("plain: one prompt block (no regional state), the image masked to a box; 1 region:")
    print("regional prompts with the image masked to the region. FLOPs: with image / without.")


def meta_latent_flops(unet: UNet2DConditionModel, layout: Layout, cropped: bool) -> float:
    """FLOPs of one guided latent-mode step: every UNet call of the plan, on the meta device."""
    latent = (layout.height // 8, layout.width // 8)
    multiple = 2 ** (len(unet.config.block_out_channels) - 1)
    kwargs = {} if cropped else {"crops": None}
    plan = plan_latent_regions(layout, latent, multiple, **kwargs)
    meta = torch.device("meta")
    total = 0
    for call in plan.calls(guided=True):
        crop = None if call[0] is None else plan.blocks[call[0]].crop
        size = latent if crop is None else (crop[2] - crop[0], crop[3] - crop[1])
        rows = len(call)
        added = {
            "text_embeds": torch.empty(rows, 1280, device=meta),
            "time_ids": torch.empty(rows, 6, device=meta),
        }
        sample = torch.empty(rows, 4, *size, device=meta)
        text = torch.empty(rows, 77, 2048, device=meta)
        counter = FlopCounterMode(display=False)  # entering a counter resets it
        with counter:
            unet(sample, torch.tensor(500, device=meta), text, added_cond_kwargs=added)
        total += counter.get_total_flops()
    return total


def step_gaps(pipe, layout: Layout) -> list[float]:
    """Seconds between consecutive denoising steps of one call (steady state, no set-up)."""
    stamps: list[float] = []

    def stamp(_pipe, _step, _t, kwargs):
        stamps.append(time.perf_counter())
        return kwargs

    pipe(layout=layout, callback_on_step_end=stamp, output_type="latent")
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


# -- Attention mode: FLOPs and memory on the SDXL topology --------------------------------------


@dataclasses.dataclass
class AttentionRow:
    size: int
    name: str
    blocks: int
    plain: CallCost
    dense: CallCost
    sparse: CallCost
    sparse_memory: CallCost


def attention_rows(sizes=SIZES, cases=ATTENTION_CASES) -> list[AttentionRow]:
    """Per size and case: plain, dense and sparse calls on the meta SDXL UNet (fp16)."""
    unet, context = meta_sdxl_unet(torch.float16)
    rows = []
    with torch.no_grad():
        for size in sizes:
            plain = meta_call(unet, context, layout_for(0, False, size), memory=True)
            for name, count, shared in cases:
                layout = layout_for(count, shared, size)
                # Dense as before: nothing kept between steps, the bias built once per call.
                dense = meta_call(unet, context, layout, "dense", 0, steps=2, memory=True)
                sparse = meta_call(unet, context, layout, "sparse", steps=2)
                sparse_memory = meta_call(unet, context, layout, "sparse", 0, steps=2, memory=True)
                rows.append(
                    AttentionRow(size, name, sparse.blocks, plain, dense, sparse, sparse_memory)
                )
    return rows


def print_attention_rows(rows: list[AttentionRow]) -> None:
    """The attention-mode FLOP and memory tables."""
    print("attention mode, SDXL base UNet (meta device, fp16), one CFG step over plain")
    header = (
        f"{'size':>5} {'case':<13} {'blocks':>6} {'plain TF':>8} {'dense':>7} {'sparse':>7} "
        f"{'1st step':>8} {f'{CALL_STEPS}-step call':>13}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        base = row.plain.flops[0]
        first, steady = row.sparse.flops
        call = (first + (CALL_STEPS - 1) * steady) / CALL_STEPS
        print(
            f"{row.size:>5} {row.name:<13} {row.blocks:>6} {base / 1e12:>8.2f} "
            f"{row.dense.flops[1] / base:>6.3f}x {steady / base:>6.3f}x {first / base:>7.3f}x "
            f"{call / base:>12.3f}x"
        )
    print()
    print("dense: the additive-bias reference, text keys and values projected at every step")
    print("(as before); sparse: a steady step (keys and values kept from the first step);")
    print(f"1st step: the step that projects them; {CALL_STEPS}-step call: the mean over a call.")
    print()
    print("memory over plain (MiB)")
    header = (
        f"{'size':>5} {'case':<13} {'dense peak':>10} {'sparse peak':>11} {'bias':>7} "
        f"{'pairs':>7} {'K/V kept':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        base = row.plain.peak
        print(
            f"{row.size:>5} {row.name:<13} {(row.dense.peak - base) / MIB:>10.1f} "
            f"{(row.sparse_memory.peak - base) / MIB:>11.1f} {row.dense.per_grid / MIB:>7.2f} "
            f"{row.sparse.per_grid / MIB:>7.2f} {row.sparse.kept / MIB:>9.1f}"
        )
    print()
    print("peak: live tensor bytes at the peak of a steady step minus plain's, with no keys")
    print("and values kept (what attention itself adds, per-grid data included); bias / pairs:")
    print("the per-grid data a call keeps; K/V kept: the text keys and values sparse keeps for")
    print("the call by default (budget pipe.regional_kept_bytes). Not counted: the prompt")
    print("embeddings themselves (2 x blocks x 77 x 2048 fp16; 62 MiB at 100 prompts).")


# -- Set-up on CPU ------------------------------------------------------------------------------


def _median_ms(function, runs: int = 7) -> float:
    function()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def setup_rows(sizes=SIZES, cases=ATTENTION_CASES) -> list[tuple]:
    """Per size and case, milliseconds on CPU: planning on every grid, on the UNet's grids,
    building the sparse pairs and the dense fp16 bias for the UNet's grids."""
    rows = []
    for size in sizes:
        latent = (size // 8, size // 8)
        grids = cross_attention_grids(SDXL_BASE_UNET, latent)
        for name, count, shared in cases:
            layout = layout_for(count, shared, size)
            plan = plan_regions(layout, latent, grids=grids)

            def pairs(plan=plan, grids=grids):
                state = RegionalState(plan, 77, True)
                for height, width in grids:
                    state.block_pairs(height * width, "cpu")

            def bias(plan=plan, grids=grids):
                state = RegionalState(plan, 77, True, attention="dense")
                for height, width in grids:
                    state.attention_bias(height * width, torch.float16, "cpu")

            every = _median_ms(lambda layout=layout, latent=latent: plan_regions(layout, latent))
            own = _median_ms(
                lambda layout=layout, latent=latent, grids=grids: plan_regions(
                    layout, latent, grids=grids
                )
            )
            rows.append((size, name, every, own, _median_ms(pairs), _median_ms(bias, runs=3)))
    return rows


def print_setup_rows(rows: list[tuple]) -> None:
    """The set-up table."""
    print("set-up per call on CPU (1 thread, median ms)")
    header = (
        f"{'size':>5} {'case':<13} {'plan, all':>9} {'plan, UNet':>10} {'pairs':>6} "
        f"{'set-up':>7} {'dense bias':>10}"
    )
    print(header)
    print("-" * len(header))
    for size, name, every, own, pairs, bias in rows:
        print(
            f"{size:>5} {name:<13} {every:>9.1f} {own:>10.1f} {pairs:>6.1f} {own + pairs:>7.1f} "
            f"{bias:>10.1f}"
        )
    print()
    print("plan, all: block weights on every grid of the latent (8-9); plan, UNet: on the grids")
    print("the UNet attends on (2 for SDXL); pairs: the sparse (pixel, block) pairs of those")
    print("grids; set-up = plan, UNet + pairs; dense bias: the reference's fp16 bias instead.")


def scene_rows(objects: int = 1000, visible: int = 720, size: int = 1024) -> dict[str, float]:
    """A scene of ``objects`` objects with mask images, ``visible`` of them in view: seconds
    of the first and the second request's planning (masks read, then from the cache), and of
    the prompt encoding on the tiny model (encoded, then from the prompt cache)."""
    from PIL import Image
    from tiny import save_tiny_sdxl

    from engine.pipeline import RegionalSDXLPipeline
    from engine.regional import masks

    folder = tempfile.mkdtemp()
    generator = torch.Generator().manual_seed(0)
    regions = []
    blank = Image.new("L", (size, size))
    for i in range(objects):
        path = os.path.join(folder, f"object{i}.png")
        image = blank.copy()
        if i < visible:
            x, y = torch.randint(0, size - 64, (2,), generator=generator).tolist()
            w, h = torch.randint(8, 64, (2,), generator=generator).tolist()
            image.paste(255, (x, y, x + w, y + h))
        image.save(path)
        regions.append(Region(f"object number {i}", (0, 0, 1, 1), mask=path))
    layout = Layout(prompt="a warehouse", width=size, height=size, regions=regions)
    latent = (size // 8, size // 8)
    grids = cross_attention_grids(SDXL_BASE_UNET, latent)
    masks._load_mask.cache_clear()
    timings = {}
    for request in ("first", "second"):
        started = time.perf_counter()
        plan = plan_regions(layout, latent, grids=grids)
        state = RegionalState(plan, 77, True)
        for height, width in grids:
            state.block_pairs(height * width, "cpu")
        timings[f"{request} plan"] = time.perf_counter() - started
    pipe = RegionalSDXLPipeline.from_pretrained(save_tiny_sdxl(os.path.join(folder, "tiny")))
    for request in ("first", "second"):
        started = time.perf_counter()
        pipe._encode_texts(plan.prompts, {})
        timings[f"{request} encode"] = time.perf_counter() - started
    timings["blocks"] = len(plan.prompts)
    return timings


def print_scene_rows(timings: dict[str, float], objects: int = 1000, visible: int = 720) -> None:
    """The large-scene set-up lines."""
    print(
        f"scene of {objects} objects with 1024x1024 mask images, {visible} visible "
        f"({timings['blocks']:.0f} prompt blocks), set-up seconds on CPU"
    )
    header = f"{'request':<8} {'plan + pairs':>12} {'prompts (tiny)':>14} {'total':>7}"
    print(header)
    print("-" * len(header))
    for request in ("first", "second"):
        plan, encode = timings[f"{request} plan"], timings[f"{request} encode"]
        print(f"{request:<8} {plan:>12.3f} {encode:>14.3f} {plan + encode:>7.3f}")
    print()
    print("first: every mask file read and every prompt encoded; second: the same request")
    print("again (mask cache by bytes, prompt cache). The tiny model's text encoders stand in")
    print("for SDXL's, whose encoding the second request skips as well.")


def tiny_step_seconds(pipe, layout: Layout, runs: int = 3, latent: bool = False) -> dict:
    """Median seconds per step on the tiny model, from interleaved calls: plain, dense and
    sparse attention mode, and with ``latent`` latent mode uncropped and cropped
    (``TINY_CROPS``).

    Plain calls (the scene prompt alone) alternate with regional ones so that load from other
    processes hits all alike.
    """
    plain = Layout(
        prompt=layout.prompt, width=layout.width, height=layout.height, steps=layout.steps
    )
    cases = {"plain": (plain, None, "sparse"), "dense": (layout, None, "dense")}
    cases["sparse"] = (layout, None, "sparse")
    if latent:
        latent_layout = dataclasses.replace(layout, mode="latent")
        cases["latent"] = (latent_layout, None, "sparse")
        cases["cropped"] = (latent_layout, TINY_CROPS, "sparse")
    gaps: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(runs):
        for name, (case, crops, attention) in cases.items():
            pipe.latent_crops = crops
            pipe.regional_attention = attention
            gaps[name] += step_gaps(pipe, case)
    pipe.latent_crops = TINY_CROPS
    pipe.regional_attention = "sparse"
    return {name: statistics.median(times) for name, times in gaps.items()}


def tiny_pipeline():
    """The tiny SDXL model, saved and loaded through the engine's pipeline."""
    from tiny import save_tiny_sdxl

    from engine.pipeline import RegionalSDXLPipeline

    folder = save_tiny_sdxl(os.path.join(tempfile.mkdtemp(), "tiny-sdxl"))
    pipe = RegionalSDXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def print_tiny_rows(rows: list[tuple[str, dict]], size: int) -> None:
    """The tiny-model wall-time table."""
    print(f"attention mode wall time: tiny SDXL on CPU, {size}x{size}, 1 thread, median per step")
    header = (
        f"{'case':<13} {'plain s':>8} {'dense s':>8} {'sparse s':>8} {'dense':>6} {'sparse':>6}"
    )
    print(header)
    print("-" * len(header))
    for name, seconds in rows:
        plain, dense, sparse = seconds["plain"], seconds["dense"], seconds["sparse"]
        print(
            f"{name:<13} {plain:>8.4f} {dense:>8.4f} {sparse:>8.4f} {dense / plain:>5.2f}x "
            f"{sparse / plain:>5.2f}x"
        )
    print()
    print("dense / sparse: attention mode by each path, as a multiple of plain in the same run.")


def latent_rows() -> list[tuple]:
    """Per case of ``CASES``: latent-mode SDXL FLOPs (cropped, uncropped) and tiny timings."""
    unet, _ = meta_sdxl_unet()
    pipe = tiny_pipeline()
    rows = []
    with torch.no_grad():
        for name, count, shared in CASES:
            layout = layout_for(count, shared, 1024)
            flops = (
                meta_latent_flops(unet, layout, cropped=True),
                meta_latent_flops(unet, layout, cropped=False),
            )
            blocks = len(plan_latent_regions(layout, (128, 128), 4).blocks)
            seconds = tiny_step_seconds(pipe, layout_for(count, shared, 128), latent=True)
            rows.append((name, blocks, flops, seconds))
    return rows


def print_latent_rows(rows: list[tuple], base_flops: float) -> None:
    """The latent-mode table."""
    print("latent mode")
    header = (
        f"{'case':<12} {'blocks':>6} {'FLOPs':>7} {'uncropped':>9} {'plain s':>8} "
        f"{'latent s':>8} {'time':>6} {'cropped s':>9} {'time':>6}"
    )
    print(header)
    print("-" * len(header))
    for name, blocks, (cropped, full), seconds in rows:
        plain_s, latent_s, cropped_s = seconds["plain"], seconds["latent"], seconds["cropped"]
        print(
            f"{name:<12} {blocks:>6} {cropped / base_flops:>6.2f}x {full / base_flops:>8.2f}x "
            f"{plain_s:>8.4f} {latent_s:>8.4f} {latent_s / plain_s:>5.2f}x "
            f"{cropped_s:>9.4f} {cropped_s / plain_s:>5.2f}x"
        )
    print()
    print("blocks: UNet predictions per step besides the negative prompt (scene, background,")
    print("distinct region prompts); FLOPs / uncropped: SDXL FLOPs per step relative to plain,")
    print("with the default crops and without; latent s: tiny model uncropped; cropped s: tiny")
    print("model with crops in the default's proportions (margin 4, min side 32 latent pixels).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ip-adapter", action="store_true", help="print only the IP-Adapter FLOP table"
    )
    parser.add_argument(
        "--quick", action="store_true", help="skip the tiny-model and latent-mode tables"
    )
    args = parser.parse_args()
    # One thread: on a shared machine, thread oversubscription swamps the differences measured.
    torch.set_num_threads(1)
    diffusers_logging.set_verbosity_error()  # the tiny tokenizer truncates long scene prompts
    ip_rows = ip_adapter_rows()
    if args.ip_adapter:
        print_ip_adapter_rows(ip_rows)
        return
    rows = attention_rows()
    print_attention_rows(rows)
    print()
    print_setup_rows(setup_rows())
    print()
    print_scene_rows(scene_rows())
    print()
    if not args.quick:
        pipe = tiny_pipeline()
        tiny = [
            (name, tiny_step_seconds(pipe, layout_for(count, shared, 128)))
            for name, count, shared in ATTENTION_CASES
        ]
        print_tiny_rows(tiny, 128)
        print()
    print_ip_adapter_rows(ip_rows)
    if not args.quick:
        print()
        base = next(r.plain.flops[0] for r in rows if r.size == 1024)
        print_latent_rows(latent_rows(), base)


if __name__ == "__main__":
    main()
