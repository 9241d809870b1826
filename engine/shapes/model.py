"""The shapes model: its word-level tokenizer and the configs of its SDXL-architecture parts.

Every part is the real SDXL pipeline's (two CLIP text encoders, a ``text_time`` UNet with
cross-attention at every level, an AutoencoderKL, a v-prediction Euler scheduler), only small
enough to train on a CPU. Regional guidance masks cross-attention, so every UNet level has it.
"""

from __future__ import annotations

import json
import os
import tempfile

from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from engine.shapes.world import VOCABULARY

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
IMAGE_SIZE = 64
VAE_FACTOR = 4
"""Pixels per latent cell along each side."""
TEXT_WIDTH = 64
"""Hidden width of each text encoder; the UNet sees both concatenated (128 per token)."""
TIME_EMBED = 8

LAYOUT_DEFAULTS = {
    "reference_fraction": 0.4,
    "native_size": 640,
    "note": (
        "benchmarks/layout_fidelity.py on this model: reference pull over 0.4 of the steps "
        "places more objects than over 0.1; it composes in one pass up to 640 px (100 objects "
        "placed box by box), where a high-res fix from 64 px would mottle the background "
        "(see README, Measured)"
    ),
}
"""The shapes model's ``layout_defaults.json`` (see ``engine.loading.defaults``), written with
every export."""


def word_merges(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP BPE vocab and merge list that turn each word into exactly one token.

    Merges are added word by word, each only after simulating BPE on the merges so far: a later
    merge always ranks below every earlier one, so it never changes how earlier words split.
    """
    vocab = {BOS: 0, EOS: 1}
    merges: list[tuple[str, str]] = []
    for ch in "abcdefghijklmnopqrstuvwxyz,":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    for word in words:
        pieces = _apply_bpe(list(word[:-1]) + [word[-1] + "</w>"], merges)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = [pair[0] + pair[1]] + pieces[2:]
    return vocab, merges


def _apply_bpe(pieces: list[str], merges: list[tuple[str, str]]) -> list[str]:
    ranks = {pair: i for i, pair in enumerate(merges)}
    while len(pieces) > 1:
        pairs = [
            (ranks.get((a, b), len(ranks)), i)
            for i, (a, b) in enumerate(zip(pieces[:-1], pieces[1:], strict=True))
        ]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


def word_tokenizer() -> CLIPTokenizer:
    """A CLIPTokenizer (built offline) in which every shapes-world word is a single token."""
    vocab, merges = word_merges(list(VOCABULARY))
    with tempfile.TemporaryDirectory() as folder:
        vocab_file = os.path.join(folder, "vocab.json")
        merges_file = os.path.join(folder, "merges.txt")
        with open(vocab_file, "w", encoding="utf-8") as handle:
            json.dump(vocab, handle)
        with open(merges_file, "w", encoding="utf-8") as handle:
            handle.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return CLIPTokenizer(vocab_file, merges_file, model_max_length=77)


def text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    """Config of both text encoders; special ids match the tokenizer (eos != 2, so the pooled
    output is taken at the first end-of-text token)."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_attention_heads=4,
        num_hidden_layers=3,
        max_position_embeddings=77,
        projection_dim=TEXT_WIDTH,
        hidden_act="gelu",
    )


def build_unet() -> UNet2DConditionModel:
    """The denoiser: 16x16x4 latents, channels (32, 64, 128), cross-attention at every level."""
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=(2, 4, 8),  # SDXL's naming: this is the number of heads
        use_linear_projection=True,
        transformer_layers_per_block=1,
        cross_attention_dim=2 * TEXT_WIDTH,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=6 * TIME_EMBED + TEXT_WIDTH,
        norm_num_groups=16,
    )


def build_vae() -> AutoencoderKL:
    """A three-level VAE: 64x64 RGB <-> 16x16x4 latents (vae_scale_factor 4)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        # Narrow at full resolution: the encoder runs on every training batch, and flat-colour
        # shapes need little capacity there.
        block_out_channels=(16, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        force_upcast=False,
    )


def build_scheduler() -> EulerDiscreteScheduler:
    """v-prediction with a linear beta schedule: near-zero terminal SNR suits 16x16 latents."""
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="v_prediction",
        timestep_spacing="trailing",
    )


def build_components(seed: int = 0) -> dict:
    """Freshly initialised pipeline components (seeded), keyed like StableDiffusionXLPipeline."""
    import torch

    tokenizer = word_tokenizer()
    config = text_config(tokenizer)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(config)
    text_encoder_2 = CLIPTextModelWithProjection(config)
    unet = build_unet()
    vae = build_vae()
    return {
        "unet": unet,
        "vae": vae,
        "scheduler": build_scheduler(),
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer,
        "image_encoder": None,
        "feature_extractor": None,
    }
