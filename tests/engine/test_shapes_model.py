"""The shapes model: tokenizer, components, training state round trip, export, and the shipped
model's behaviour (colour fidelity, and regional attention placing objects better than plain)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

from engine.loading.defaults import pipeline_defaults, read_model_defaults
from engine.shapes import model as shapes_model
from engine.shapes.detect import colour_labels
from engine.shapes.world import COLOURS, VOCABULARY

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIPPED = os.path.join(ROOT, "engine", "models", "shapes")


def _benchmark_module():
    path = os.path.join(ROOT, "benchmarks", "layout_fidelity.py")
    spec = importlib.util.spec_from_file_location("layout_fidelity", path)
    module = importlib.util.module_from_spec(spec)
    # Dataclasses look their module up in sys.modules while the module runs.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_word_is_one_token_and_special_ids_match_the_text_config():
    tok = shapes_model.word_tokenizer()
    for word in VOCABULARY:
        assert len(tok.tokenize(word)) == 1, word
    ids = tok("a red circle, a blue square and a green triangle").input_ids
    assert len(ids) == 11 + 2 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids[1:-1]
    config = shapes_model.text_config(tok)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    # eos id 2 would switch transformers' CLIP pooling to the legacy argmax rule.
    assert config.eos_token_id != 2
    padded = tok("a red circle", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[4:] == [tok.pad_token_id] * 73


def test_components_have_the_sdxl_layout_with_cross_attention_at_every_level():
    parts = shapes_model.build_components(seed=0)
    unet = parts["unet"]
    assert unet.config.addition_embed_type == "text_time"
    assert all("CrossAttn" in t for t in unet.config.down_block_types)
    assert unet.config.cross_attention_dim == 2 * shapes_model.TEXT_WIDTH
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**parts)
    assert pipe.vae_scale_factor == 4
    assert parts["scheduler"].config.prediction_type == "v_prediction"


def _tiny_trainer(tmp_path, name, *extra):
    from training.train_shapes import Trainer, parse_args

    args = parse_args(
        [
            *extra,
            "--minutes",
            "1",
            "--batch",
            "2",
            "--vae-batch",
            "2",
            "--state",
            str(tmp_path / "state"),
            "--out",
            str(tmp_path / name),
            "--threads",
            "1",
        ]
    )
    return Trainer(args)


def test_training_state_round_trip_resumes_identically_and_exports_a_loadable_pipeline(tmp_path):
    first = _tiny_trainer(tmp_path, "model", "--full-state")
    first.vae_step_once()
    first.calibrate_vae()
    first.parts["vae"].requires_grad_(False)
    first.unet_step_once()
    first.save_state()
    first.export()

    second = _tiny_trainer(tmp_path, "model", "--full-state")
    second.load_state()
    assert (second.step, second.vae_step) == (1, 1)
    assert second.parts["vae"].config.scaling_factor == first.parts["vae"].config.scaling_factor
    for name in ("unet", "text_encoder_2"):
        a, b = first.parts[name].state_dict(), second.parts[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    # Same weights, optimizer moments and RNG states: the next step is the same step. Both
    # trainers share torch's global RNG, so the first one gets the restored state back too.
    restored = torch.get_rng_state()
    resumed_loss = second.unet_step_once()
    torch.set_rng_state(restored)
    assert resumed_loss == pytest.approx(first.unet_step_once(), rel=1e-5)
    a, b = first.parts["unet"].state_dict(), second.parts["unet"].state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    from engine.loading.assemble import load_pipeline
    from engine.loading.locate import LoadOptions, resolve_model

    options = LoadOptions(device="cpu")
    pipe = load_pipeline(resolve_model(str(tmp_path / "model"), options), options)
    assert pipe.vae_scale_factor == 4 and pipe.unet.dtype == torch.float32
    image = pipe("a red circle", height=64, width=64, num_inference_steps=2, output_type="np")
    assert image.images[0].shape == (64, 64, 3)
    sizes = sum(
        os.path.getsize(os.path.join(root, f))
        for root, _, files in os.walk(tmp_path / "model")
        for f in files
    )
    assert sizes < 20e6
    # The export carries the model's recommended Layout settings.
    assert (
        pipeline_defaults(pipe)["reference_fraction"]
        == (shapes_model.LAYOUT_DEFAULTS["reference_fraction"])
    )


def test_a_run_stops_at_the_step_it_is_given(tmp_path):
    from training.train_shapes import main

    common = ["--batch", "2", "--vae-batch", "2", "--vae-steps", "1", "--threads", "1"]
    folders = ["--state", str(tmp_path / "state"), "--out", str(tmp_path / "model")]
    main(["--minutes", "10", "--until-step", "2", "--decoder-steps", "1", *common, *folders])
    main(
        [
            "--minutes",
            "10",
            "--until-step",
            "3",
            "--resume",
            *common,
            *folders,
            "--decoder-steps",
            "2",
        ]
    )
    with open(tmp_path / "model" / "training.json", encoding="utf-8") as handle:
        assert json.load(handle) == {"unet_step": 3, "vae_step": 1, "decoder_step": 2}


def test_decoder_phase_changes_the_decoder_and_keeps_every_latent(tmp_path):
    from training.train_shapes import run_decoder_phase

    trainer = _tiny_trainer(tmp_path, "model", "--decoder-steps", "2")
    vae = trainer.parts["vae"]
    x, _ = trainer.images(2)
    with torch.no_grad():
        latents = vae.encode(x).latent_dist.mode()
        decoded = vae.decode(latents).sample
    unet = {k: v.clone() for k, v in trainer.parts["unet"].state_dict().items()}
    run_decoder_phase(trainer, deadline=math.inf)
    assert trainer.decoder_step == 2
    with torch.no_grad():
        # The UNet was trained on these latents: the phase must not move them.
        assert torch.equal(vae.encode(x).latent_dist.mode(), latents)
        assert not torch.allclose(vae.decode(latents).sample, decoded)
    assert all(torch.equal(v, unet[k]) for k, v in trainer.parts["unet"].state_dict().items())
    assert not any(p.requires_grad for p in vae.parameters())
    # The phase ends with a saved state and an export that say how far it got.
    resumed = _tiny_trainer(tmp_path, "model")
    resumed.load_state()
    assert resumed.decoder_step == 2
    with open(tmp_path / "model" / "training.json", encoding="utf-8") as handle:
        assert json.load(handle)["decoder_step"] == 2


def test_compact_state_holds_fp16_weights_and_no_optimizer_moments_and_resumes(tmp_path):
    first = _tiny_trainer(tmp_path, "model")
    first.parts["vae"].requires_grad_(False)
    first.unet_step_once()
    first.unet_step_once()
    first.save_state()
    files = set(os.listdir(tmp_path / "state"))
    assert "opt.safetensors" not in files and "vae_opt.safetensors" not in files
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "state" / "unet.safetensors"))
    assert {v.dtype for v in stored.values()} == {torch.float16}
    full = first.parts["unet"].state_dict()
    assert all(torch.equal(stored[k].float(), full[k].half().float()) for k in full)

    second = _tiny_trainer(tmp_path, "model")
    second.load_state()
    # No Adam moments: the learning rate warms up again from the resumed step.
    assert (second.step, second.warm_from) == (2, 2)
    assert second.ema["unet"]["conv_in.weight"].dtype == torch.float32
    assert math.isfinite(second.unet_step_once())


def _plain_layout(prompt, objects, **fields):
    from engine.wire.layout import Layout, Region

    regions = [Region(o.phrase, o.box) for o in objects]
    return Layout(prompt=prompt, width=64, height=64, regions=regions, **fields)


def test_regional_training_blocks_and_biases_follow_the_layout(tmp_path):
    from engine.shapes.world import ShapeObject

    trainer = _tiny_trainer(tmp_path, "model")
    red = ShapeObject("red", "circle", (0.0, 0.0, 0.5, 0.5))
    blue = ShapeObject("blue", "square", (0.5, 0.5, 1.0, 1.0))
    layouts = [
        _plain_layout("a red circle and a blue square", [red, blue], base_ratio=0.2),
        _plain_layout("a plain background", []),
    ]
    with torch.no_grad():
        embeds, pooled, biases = trainer.regional_text(layouts)
        alone, alone_pooled = trainer.encode_text(
            ["a red circle", "a red circle and a blue square"]
        )
    # Sample 0: scene, background ("" = the caption without its phrases), red, blue blocks.
    assert embeds.shape == (2, 4 * 77, 2 * shapes_model.TEXT_WIDTH)
    assert torch.allclose(embeds[0, 2 * 77 : 3 * 77], alone[0], atol=1e-6)
    assert torch.allclose(pooled[0], alone_pooled[1], atol=1e-6)
    allowed = biases[16 * 16][0, :, ::77].exp()  # (pixels, blocks) weights on the 16x16 grid
    top_left, bottom_left = 2 * 16 + 2, 13 * 16 + 2
    assert torch.allclose(
        allowed[top_left], allowed[top_left].new_tensor([0.2, 0, 0.8, 0]), atol=0.11
    )
    assert allowed[top_left, 3] == 0 and allowed[bottom_left].tolist() == [0, 1, 0, 0]
    # Sample 1 has one block; the padding blocks are never attended to.
    assert (biases[16 * 16][1, :, 77:] == float("-inf")).all()
    assert (embeds[1, 77:] == 0).all()


def test_regional_training_takes_the_pooled_embedding_of_the_scene_prompt_it_was_given(tmp_path):
    from engine.shapes.world import ShapeObject

    trainer = _tiny_trainer(tmp_path, "model")
    red = ShapeObject("red", "circle", (0.0, 0.0, 0.5, 0.5))
    layouts = [_plain_layout("", [red], base_ratio=0.0), _plain_layout("a plain background", [red])]
    with torch.no_grad():
        _, pooled, _ = trainer.regional_text(layouts)
        _, expected = trainer.encode_text(["", "a plain background"])
    assert torch.allclose(pooled, expected, atol=1e-6)


def test_training_layouts_cover_every_scene_prompt_form_and_visible_masks(tmp_path):
    from engine.shapes.world import BACKGROUND_CAPTION, caption_for, sample_objects

    trainer = _tiny_trainer(tmp_path, "model")
    trainer.rng = np.random.default_rng(3)
    objects = sample_objects(np.random.default_rng(1), 3, overlap=True)
    forms, ratios, with_masks = set(), set(), 0
    for _ in range(80):
        layout, masks = trainer.sample_layout(objects, 64)
        named = sum(o.phrase in layout.prompt for o in objects)
        if layout.prompt == caption_for(objects) or named == len(objects):
            forms.add("all")
        elif named:
            forms.add("some")
        else:
            forms.add(layout.prompt or "empty")
        ratios.add(layout.base_ratio == 0.0)
        if masks is not None:
            with_masks += 1
            assert len(masks) == 3 and masks[0].shape == (16, 16)
            # The back object's mask loses what the front ones cover; its box does not.
            assert masks[0].sum() < 16 * 16 * (objects[0].box[2] - objects[0].box[0]) ** 2
    assert forms == {"all", "some", BACKGROUND_CAPTION, "empty"}
    assert ratios == {True, False} and 20 < with_masks < 60


def test_biased_cross_attention_keeps_pixels_deaf_to_forbidden_blocks():
    from training.train_shapes import BiasedCrossAttention

    torch.manual_seed(0)
    unet = shapes_model.build_unet()
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    biases: dict[int, torch.Tensor] = {}
    attn.set_processor(BiasedCrossAttention(biases))
    hidden = torch.randn(1, 16, attn.query_dim)
    text = torch.randn(1, 2 * 77, attn.cross_attention_dim)
    bias = torch.zeros(1, 16, 2 * 77)
    bias[:, :8, 77:] = float("-inf")  # pixels 0-7 hear block 0 only
    bias[:, 8:, :77] = float("-inf")  # pixels 8-15 hear block 1 only
    biases[16] = bias
    changed = text.clone()
    changed[:, 77:] += 1.0
    with torch.no_grad():
        before, after = attn(hidden, text), attn(hidden, changed)
        biases.clear()
        plain = attn(hidden, changed)
    assert torch.equal(before[:, :8], after[:, :8])
    assert (before[:, 8:] - after[:, 8:]).abs().max() > 1e-3
    assert (plain[:, :8] - after[:, :8]).abs().max() > 1e-3


# -- The shipped model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    from engine.loading.assemble import load_pipeline
    from engine.loading.locate import LoadOptions, resolve_model

    options = LoadOptions(device="cpu")
    location = resolve_model("shapes", options)
    assert os.path.samefile(location.path, SHIPPED)
    assert (
        read_model_defaults(SHIPPED)["reference_fraction"]
        == (shapes_model.LAYOUT_DEFAULTS["reference_fraction"])
    )
    return load_pipeline(location, options)


def _dominant_colour(image: np.ndarray) -> tuple[str | None, float]:
    labels = colour_labels(image)
    counts = np.bincount(labels[labels >= 0], minlength=len(COLOURS))
    if counts.sum() == 0:
        return None, 0.0
    return list(COLOURS)[int(counts.argmax())], counts.max() / labels.size


def test_shipped_model_draws_the_requested_colour(shipped):
    hits = 0
    for seed in range(6):
        colour = list(COLOURS)[seed]
        out = shipped(
            f"a {colour} circle",
            height=64,
            width=64,
            num_inference_steps=12,
            guidance_scale=5.0,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
        ).images[0]
        dominant, fraction = _dominant_colour(np.rint(out * 255).astype(np.uint8))
        hits += dominant == colour and fraction > 0.03
    # Chance is 1 in 6 per image.
    assert hits >= 5


def test_shipped_model_places_objects_better_with_regional_attention(shipped):
    bench = _benchmark_module()
    cases = bench.shapes_layouts(6, 2, seed=1)
    settings = bench.Settings(size=64, steps=12, guidance_scale=5.0)
    results = {
        r.mode: r
        for r in bench.run_benchmark(shipped, cases, ["plain", "attention+bg"], settings=settings)
    }
    assert results["attention+bg"].placement >= results["plain"].placement + 0.25
    assert results["attention+bg"].placement >= 0.75
