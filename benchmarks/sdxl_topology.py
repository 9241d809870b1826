"""The SDXL base UNet's topology and the synthetic Layouts the cost benchmarks measure.

Shared by ``regional_cost.py`` (FLOPs and memory on the meta device, set-up time, tiny-model
wall time) and ``gpu_check.py`` (timing on a GPU with random weights): nothing is downloaded.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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
