"""Write a diffusers SDXL pipeline as one .safetensors in the original (Stability) key layout.

diffusers ships only the other direction (``from_single_file`` converts original keys to its
own), so tests use this to build a single-file checkpoint of the tiny model and load it back
through the engine's real single-file path. The renames mirror diffusers' forward converters
in ``diffusers.loaders.single_file_utils``; a round trip that changed any weight would fail
the test that uses it.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP_L, CLIP_G = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."

_RESNET = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return dict(_RESNET).get(head, head) + "." + tail


def _unet(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    per = config.layers_per_block + 1
    direct = {
        **DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"],
        **DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"],
    }
    with_attention = {
        i for i, kind in enumerate(config.up_block_types) if kind.startswith("CrossAttn")
    }
    out = {}
    for key, value in state.items():
        if key in direct:
            out[direct[key]] = value
            continue
        m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)
        if m:
            side, block, kind, layer, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
            index = per * block + layer + (1 if side == "down" else 0)
            name = "input_blocks" if side == "down" else "output_blocks"
            part = f"0.{_resnet(rest)}" if kind == "resnets" else f"1.{rest}"
            out[f"{name}.{index}.{part}"] = value
            continue
        m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key)
        if m:
            out[f"input_blocks.{per * (int(m[1]) + 1)}.0.op.{m[2]}"] = value
            continue
        m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key)
        if m:
            block = int(m[1])
            slot = 2 if block in with_attention else 1
            out[f"output_blocks.{per * block + per - 1}.{slot}.conv.{m[2]}"] = value
            continue
        m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
        if m:
            if m[1] == "attentions":
                out[f"middle_block.1.{m[3]}"] = value
            else:
                out[f"middle_block.{2 * int(m[2])}.{_resnet(m[3])}"] = value
            continue
        raise KeyError(f"no original SDXL name for UNet key {key!r}")
    return {UNET + k: v for k, v in out.items()}


def _vae(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    direct = DIFFUSERS_TO_LDM_MAPPING["vae"]
    blocks = len(config.up_block_types)
    attention = {
        "group_norm": "norm",
        "to_q": "q",
        "to_k": "k",
        "to_v": "v",
        "to_out.0": "proj_out",
    }
    out = {}
    for key, value in state.items():
        if key in direct:
            out[direct[key]] = value
            continue
        key = key.replace("conv_shortcut", "nin_shortcut")
        m = re.match(r"encoder\.down_blocks\.(\d+)\.(resnets|downsamplers)\.(\d+)\.(.*)", key)
        if m:
            inner = f"block.{m[3]}" if m[2] == "resnets" else "downsample"
            out[f"encoder.down.{m[1]}.{inner}.{m[4]}"] = value
            continue
        m = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)", key)
        if m:
            inner = f"block.{m[3]}" if m[2] == "resnets" else "upsample"
            out[f"decoder.up.{blocks - 1 - int(m[1])}.{inner}.{m[4]}"] = value
            continue
        m = re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key)
        if m:
            out[f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"] = value
            continue
        m = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", key)
        if m:
            if value.ndim == 2:  # the original stores these projections as 1x1 convolutions
                value = value[:, :, None, None]
            out[f"{m[1]}.mid.attn_1.{attention[m[2]]}.{m[3]}"] = value
            continue
        raise KeyError(f"no original SDXL name for VAE key {key!r}")
    return {VAE + k: v for k, v in out.items()}


def _clip_l(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # The original keeps transformers' CLIPTextModel names under a text_model. prefix.
    return {
        CLIP_L + (k if k.startswith("text_model.") else "text_model." + k): v
        for k, v in state.items()
    }


def _clip_g(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    direct = DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"]
    renames = [
        ("text_model.encoder.layers.", "transformer.resblocks."),
        ("layer_norm1", "ln_1"),
        ("layer_norm2", "ln_2"),
        (".fc1.", ".c_fc."),
        (".fc2.", ".c_proj."),
        (".self_attn.", ".attn."),
    ]
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in direct:
            out[direct[key]] = value.T.contiguous() if key == "text_projection.weight" else value
            continue
        m = re.match(r"(.*)\.self_attn\.(q|k|v)_proj\.(weight|bias)", key)
        if m:
            fused.setdefault(f"{m[1]}.self_attn.in_proj_{m[3]}", {})[m[2]] = value
            continue
        for new, old in renames:
            key = key.replace(new, old)
        out[key] = value
    for key, parts in fused.items():
        for new, old in renames:
            key = key.replace(new, old)
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return {CLIP_G + k: v for k, v in out.items()}


def save_original_sdxl_checkpoint(pipe: Any, path: str) -> str:
    """Save an SDXL pipeline's weights as one .safetensors in the original key layout."""
    from safetensors.torch import save_file

    state = {
        **_unet(pipe.unet.state_dict(), pipe.unet.config),
        **_vae(pipe.vae.state_dict(), pipe.vae.config),
        **_clip_l(pipe.text_encoder.state_dict()),
        **_clip_g(pipe.text_encoder_2.state_dict()),
    }
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def tiny_pipeline_for_single_file(seed: int = 0) -> Any:
    """The tiny SDXL pipeline with text encoders of different widths (16 and 48).

    ``from_single_file`` tells SDXL's two text encoders apart by their width; the stock tiny
    model gives both the same width, so its second encoder would silently be read from the
    first one's weights. Widths 16 + 48 keep the UNet's 64-wide text input.
    """
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from engine.tiny import tiny_sdxl_components

    components = tiny_sdxl_components(seed)
    base = components["text_encoder"].config
    settings = {
        name: getattr(base, name)
        for name in (
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
            "intermediate_size",
            "layer_norm_eps",
            "num_attention_heads",
            "num_hidden_layers",
            "vocab_size",
            "hidden_act",
            "projection_dim",
        )
    }
    torch.manual_seed(seed)
    components["text_encoder"] = CLIPTextModel(CLIPTextConfig(hidden_size=16, **settings))
    components["text_encoder_2"] = CLIPTextModelWithProjection(
        CLIPTextConfig(hidden_size=48, **settings)
    )
    return StableDiffusionXLPipeline(**components)
