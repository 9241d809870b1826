"""What regional guidance costs over a plain SDXL step, in attention mode and latent mode.

1. FLOPs of one denoising step with classifier-free guidance (batch 2) at 1024x1024 on the real
   SDXL base UNet topology, built on the meta device (no weights, nothing downloaded), counted
   with torch's FlopCounterMode around exactly what the processors execute. Latent mode: the
   UNet calls its plan makes (negative prompt and blocks, two per call; cropped blocks alone),
   with the default crops and with none. With a masked IP-Adapter (one region image, the
   published ``ip-adapter_sdxl`` shape: a 1280-wide image embedding projected to 4 tokens) the
   same step is counted again, on the plain path (one prompt block) and the regional one.
2. Wall time per denoising step on the tiny SDXL model on CPU (median over steps and runs).

Run: ``python benchmarks/regional_cost.py`` (prints three tables; takes a few minutes on 2 cores);
``--ip-adapter`` prints the IP-Adapter FLOP table alone (seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time

import torch
from diffusers import UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dataclasses  # noqa: E402

from engine.conditions.object_images import (
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
from engine.regional.plan import RegionalState, plan_regions  # noqa: E402
from engine.wire.layout import Layout, Region  # noqa: E402

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
SDXL_BASE_UNET = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# The default crops' proportions (margin 8, min side 64 of a 128 latent) on the tiny model's
# 64 latent pixels at 128x128.
TINY_CROPS = CropPolicy(margin=4, min_side=32)

CASES = [("plain", 0, False), ("1 region", 1, False), ("8 distinct", 8, False)]
CASES += [("16 distinct", 16, False), ("100 shared", 100, True)]

# h94/IP-Adapter, sdxl_models/ip-adapter_sdxl: ViT-bigG image embeddings, 4 image tokens.
IP_ADAPTER_EMBED = 1280
IP_ADAPTER_TOKENS = 4
# The image's box when the Layout has no region of its own (one prompt block everywhere).
IMAGE_BOX = (0.1, 0.1, 0.6, 0.6)
IP_CASES = [("plain", 0), ("1 region", 1)]


def layout_for(count: int, shared: bool, size: int) -> Layout:
    """A scene naming its regions (so the background block differs), boxes on a grid."""
    prompts = ["a dog" if shared else f"object number {i}" for i in range(count)]
    side = max(1, round(count**0.5 + 0.499))
    regions = []
    for i, prompt in enumerate(prompts):
        x, y = (i % side) / side, (i // side) / side
        regions.append(Region(prompt, (x, y, x + 0.8 / side, y + 0.8 / side)))
    scene = ", ".join(dict.fromkeys(prompts)) + " on a table" if prompts else "a table"
    return Layout(prompt=scene, width=size, height=size, steps=5, regions=regions)


def meta_step_flops(
    unet: UNet2DConditionModel,
    context: RegionalContext,
    layout: Layout,
    references: ObjectImageContext | None = None,
):
    """FLOPs of one guided UNet call for ``layout`` and the number of text tokens it used.

    With ``references`` (a UNet from :func:`meta_ip_adapter_unet`) the call also carries one
    reference image, masked to the first region's box (``IMAGE_BOX`` without regions).
    """
    latent = (layout.height // 8, layout.width // 8)
    plan = plan_regions(layout, latent)
    blocks = len(plan.prompts)
    meta = torch.device("meta")
    sample = torch.empty(2, 4, *latent, device=meta)
    text = torch.empty(2, blocks * 77, 2048, device=meta)
    added = {
        "text_embeds": torch.empty(2, 1280, device=meta),
        "time_ids": torch.empty(2, 6, device=meta),
    }
    counter = FlopCounterMode(display=False)
    with contextlib.ExitStack() as stack:
        # One prompt everywhere: the pipeline runs no regional state.
        if blocks > 1:
            stack.enter_context(context.active(RegionalState(plan, block_tokens=77, guided=True)))
        if references is not None:
            added["image_embeds"] = [torch.empty(2, 1, IP_ADAPTER_EMBED, device=meta)]
            box = layout.regions[0].box if layout.regions else IMAGE_BOX
            state = ObjectImageState([box_coverage(box, *latent)], [1.0], latent)
            stack.enter_context(references.active(state))
        with counter:
            unet(sample, torch.tensor(500, device=meta), text, added_cond_kwargs=added)
    return counter.get_total_flops(), blocks * 77


def meta_sdxl_unet() -> tuple[UNet2DConditionModel, RegionalContext]:
    """The SDXL base UNet on the meta device with the regional processors installed."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SDXL_BASE_UNET).eval()
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


def tiny_step_seconds(pipe, layout: Layout, runs: int = 5) -> tuple[float, ...]:
    """Median seconds per step: plain, attention mode, latent mode uncropped and cropped
    (``TINY_CROPS``), from interleaved calls.

    Plain calls (the scene prompt alone) alternate with regional ones so that load from other
    processes hits all alike.
    """
    plain = Layout(
        prompt=layout.prompt, width=layout.width, height=layout.height, steps=layout.steps
    )
    latent = dataclasses.replace(layout, mode="latent")
    cases = [(plain, None), (layout, None), (latent, None), (latent, TINY_CROPS)]
    gaps: list[list[float]] = [[] for _ in cases]
    for _ in range(runs):
        for times, (case, crops) in zip(gaps, cases, strict=True):
            pipe.latent_crops = crops
            times += step_gaps(pipe, case)
    return tuple(statistics.median(times) for times in gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ip-adapter", action="store_true", help="print only the IP-Adapter FLOP table"
    )
    args = parser.parse_args()
    # One thread: on a shared machine, thread oversubscription swamps the differences measured.
    torch.set_num_threads(1)
    diffusers_logging.set_verbosity_error()  # the tiny tokenizer truncates long scene prompts
    ip_rows = ip_adapter_rows()
    if args.ip_adapter:
        print_ip_adapter_rows(ip_rows)
        return
    unet, context = meta_sdxl_unet()

    from tiny import save_tiny_sdxl

    from engine.pipeline import RegionalSDXLPipeline

    folder = save_tiny_sdxl(os.path.join(tempfile.mkdtemp(), "tiny-sdxl"))
    pipe = RegionalSDXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    tiny_size = 128

    rows = []
    with torch.no_grad():
        for name, count, shared in CASES:
            layout = layout_for(count, shared, 1024)
            flops, tokens = meta_step_flops(unet, context, layout)
            latent_flops = (
                meta_latent_flops(unet, layout, cropped=True),
                meta_latent_flops(unet, layout, cropped=False),
            )
            blocks = len(plan_latent_regions(layout, (128, 128), 4).blocks)
            started = time.perf_counter()
            plan_regions(layout, (128, 128))
            plan_ms = (time.perf_counter() - started) * 1000
            seconds = tiny_step_seconds(pipe, layout_for(count, shared, tiny_size))
            rows.append((name, tokens, flops, plan_ms, seconds, blocks, latent_flops))

    base_flops = rows[0][2]
    print(f"SDXL base UNet, one CFG step at 1024x1024: {base_flops / 1e12:.2f} TFLOP plain")
    print(f"wall time: tiny SDXL on CPU, {tiny_size}x{tiny_size}, 1 thread, median per step")
    print()
    print("attention mode")
    header = (
        f"{'case':<12} {'tokens':>6} {'TFLOP':>7} {'FLOPs':>7} {'plan ms':>8} "
        f"{'plain s':>8} {'region s':>8} {'time':>6}"
    )
    print(header)
    print("-" * len(header))
    for name, tokens, flops, plan_ms, (plain_s, regional_s, *_), _, _ in rows:
        print(
            f"{name:<12} {tokens:>6} {flops / 1e12:>7.2f} {flops / base_flops:>6.3f}x "
            f"{plan_ms:>8.1f} {plain_s:>8.4f} {regional_s:>8.4f} {regional_s / plain_s:>5.2f}x"
        )
    print()
    print("tokens: text tokens per positive prompt (scene, background, one block per distinct")
    print("region prompt); plan ms: masks and block weights on every grid at 1024x1024.")
    print()
    print_ip_adapter_rows(ip_rows)
    print()
    print("latent mode")
    header = (
        f"{'case':<12} {'blocks':>6} {'FLOPs':>7} {'uncropped':>9} {'plain s':>8} "
        f"{'latent s':>8} {'time':>6} {'cropped s':>9} {'time':>6}"
    )
    print(header)
    print("-" * len(header))
    for name, _, _, _, seconds, blocks, (cropped, full) in rows:
        plain_s, _, latent_s, cropped_s = seconds
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


if __name__ == "__main__":
    main()
