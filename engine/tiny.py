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


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    """The UNet of ``tiny_sdxl_components(seed)``, built alone (same weights)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
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


def tiny_vae(seed: int = 0, sample_size: int = 128) -> AutoencoderKL:
    """A two-level VAE (downsampling by 2) with SD's four latent channels."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=sample_size,
    )


def tiny_text_config(tokenizer: CLIPTokenizer, **overrides) -> CLIPTextConfig:
    """A 32-wide, 5-layer CLIP text encoder config over ``tokenizer``'s vocabulary."""
    settings = dict(
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
    )
    return CLIPTextConfig(**{**settings, **overrides})


def tiny_sdxl_components(seed: int = 0) -> dict:
    """The components of a StableDiffusionXLPipeline, randomly initialised from ``seed``."""
    unet = tiny_unet(seed)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
    )
    vae = tiny_vae(seed, sample_size=128)
    tokenizer = tiny_tokenizer()
    text_config = tiny_text_config(tokenizer, projection_dim=32)
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


# -- Conditioning models: depth ControlNet, IP-Adapter ------------------------------------------

IP_ADAPTER_WEIGHTS = "ip-adapter_tiny.safetensors"
"""File name of the tiny IP-Adapter written by :func:`save_tiny_ip_adapter`."""


def tiny_controlnet(seed: int = 0) -> torch.nn.Module:
    """A ControlNetModel mirroring the tiny UNet of ``tiny_sdxl_components(seed)``.

    Its conditioning embedding downsamples by 2, the tiny VAE's factor (SDXL's is 8). The
    zero-initialised output convolutions of a fresh ControlNet would make every residual zero,
    which no test could tell from "no ControlNet"; they get small random weights instead.
    """
    from diffusers import ControlNetModel

    unet = tiny_unet(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    torch.manual_seed(seed + 2)
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    for conv in [*zero_convs, controlnet.controlnet_cond_embedding.conv_out]:
        torch.nn.init.normal_(conv.weight, std=0.05)
        torch.nn.init.normal_(conv.bias, std=0.05)
    return controlnet


def save_tiny_controlnet(path: str | os.PathLike[str], seed: int = 0) -> str:
    """Write a tiny ControlNet diffusers folder (config.json + safetensors) and return it."""
    path = os.fspath(path)
    tiny_controlnet(seed).save_pretrained(path, safe_serialization=True)
    return path


def tiny_image_encoder(seed: int = 0) -> torch.nn.Module:
    """A tiny CLIPVisionModelWithProjection (32 px images, 32-wide image embeddings)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        num_channels=3,
    )
    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(config)


def tiny_ip_adapter_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """IP-Adapter weights for the tiny UNet, with the key names of the published SDXL files.

    ``image_proj.*`` maps one image embedding to 4 tokens of the UNet's cross-attention width;
    ``ip_adapter.{k}.to_k_ip/to_v_ip`` project them at the cross-attention layer numbered ``k``
    (1, 3, 5 ... in the UNet's processor order, as diffusers' loader counts them).
    """
    unet = tiny_unet(seed)
    generator = torch.Generator().manual_seed(seed + 3)
    width = unet.config.cross_attention_dim
    embed_dim = tiny_image_encoder(seed).config.projection_dim

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.2

    state = {
        "image_proj.proj.weight": rand(4 * width, embed_dim),
        "image_proj.proj.bias": rand(4 * width),
        "image_proj.norm.weight": torch.ones(width),
        "image_proj.norm.bias": torch.zeros(width),
    }
    key_id = 1
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            hidden = module.to_q.out_features
            state[f"ip_adapter.{key_id}.to_k_ip.weight"] = rand(hidden, width)
            state[f"ip_adapter.{key_id}.to_v_ip.weight"] = rand(hidden, width)
            key_id += 2
    return state


def save_tiny_ip_adapter(path: str | os.PathLike[str], seed: int = 0) -> str:
    """Write a tiny IP-Adapter folder: ``ip-adapter_tiny.safetensors`` and ``image_encoder/``.

    The layout is that of the published SDXL IP-Adapter folders (``h94/IP-Adapter``'s
    ``sdxl_models``), so it loads through the same code as real weights.
    """
    from safetensors.torch import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    save_file(tiny_ip_adapter_state(seed), os.path.join(path, IP_ADAPTER_WEIGHTS))
    tiny_image_encoder(seed).save_pretrained(os.path.join(path, "image_encoder"))
    return path


# -- GLIGEN: a grounded SD 1.x pipeline for the low-resolution reference pass -------------------


def tiny_gligen_components(seed: int = 0) -> dict:
    """The components of a StableDiffusionGLIGENPipeline (text-box grounding), from ``seed``.

    The layout follows diffusers' GLIGEN test components: an SD 1.x-shaped UNet whose
    transformer blocks carry gated self-attention over the box tokens, one CLIP text encoder
    as wide as the cross-attention (its pooled phrase embeddings are the box tokens' text), a
    VAE and the PNDM scheduler the published GLIGEN checkpoints ship with. Its native size is
    32 px (16 latents, VAE factor 2), half the tests' 64 px Layouts, as 512 px GLIGEN is half
    of 1024 px SDXL. A fresh gated layer starts with its gates at 0 and attends almost evenly
    over its ~100 tokens, so the boxes would change next to nothing; the gates get random
    non-zero values and the attention is sharpened, so moving a box visibly changes the image.
    """
    from diffusers import PNDMScheduler

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        cross_attention_dim=32,
        norm_num_groups=8,
        attention_type="gated",
    )
    generator = torch.Generator().manual_seed(seed + 4)
    with torch.no_grad():
        for name, module in unet.named_modules():
            if not name.endswith("fuser"):
                continue
            module.alpha_attn.copy_(0.5 + torch.rand((), generator=generator))
            module.alpha_dense.copy_(0.5 + torch.rand((), generator=generator))
            # Sharper attention, so the few box tokens are not drowned among the visual ones.
            module.attn.to_q.weight.mul_(8.0)
            module.attn.to_k.weight.mul_(8.0)
            module.attn.to_out[0].weight.mul_(4.0)
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    vae = tiny_vae(seed, sample_size=32)
    tokenizer = tiny_tokenizer()
    text_config = tiny_text_config(tokenizer)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config)
    return {
        "unet": unet,
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def save_tiny_gligen(path: str | os.PathLike[str], seed: int = 0) -> str:
    """Write a tiny GLIGEN diffusers folder (safetensors) to ``path`` and return it."""
    from diffusers import StableDiffusionGLIGENPipeline

    path = os.fspath(path)
    pipe = StableDiffusionGLIGENPipeline(**tiny_gligen_components(seed))
    pipe.save_pretrained(path, safe_serialization=True)
    return path
