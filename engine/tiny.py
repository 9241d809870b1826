"""Tiny random SDXL components with the real architecture, for tests and benchmarks.

The layout follows diffusers' own SDXL test components: every part of the real pipeline is
there (two CLIP text encoders, a text_time-conditioned UNet with cross-attention, a VAE, a
scheduler), only narrow. The tokenizer is built offline from a character vocabulary, so nothing
is ever fetched. ``save_tiny_sdxl`` writes a diffusers folder that the engine loads through the
same code path as a real SDXL checkpoint.
"""

from __future__ import annotations

import os
import string

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer over single characters: every prompt tokenizes, none needs a download."""
    vocab = {BOS: 0, EOS: 1}
    for ch in string.ascii_lowercase + string.digits + string.punctuation:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        vocab_file = os.path.join(folder, "vocab.json")
        merges_file = os.path.join(folder, "merges.txt")
        with open(vocab_file, "w") as handle:
            json.dump(vocab, handle)
        with open(merges_file, "w") as handle:
            handle.write("#version: 0.2\n")
        return CLIPTokenizer(vocab_file, merges_file, model_max_length=77)


def tiny_sdxl_components(seed: int = 0) -> dict:
    """The components of a StableDiffusionXLPipeline, randomly initialised from ``seed``."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
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
        projection_class_embeddings_input_dim=80,  # 6 time ids * 8 + 32 pooled
        cross_attention_dim=64,
        norm_num_groups=8,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=128,
    )
    tokenizer = tiny_tokenizer()
    text_config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=len(tokenizer),
        hidden_act="gelu",
        projection_dim=32,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config)
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    return {
        "unet": unet,
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer,
        "image_encoder": None,
        "feature_extractor": None,
    }


def save_tiny_sdxl(path: str | os.PathLike[str], seed: int = 0) -> str:
    """Write a tiny SDXL diffusers folder (safetensors) to ``path`` and return it."""
    from diffusers import StableDiffusionXLPipeline

    path = os.fspath(path)
    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(seed))
    pipe.save_pretrained(path, safe_serialization=True)
    return path
