"""Train the shapes model on synthetic scenes and export it as a diffusers folder.

    python -m training.train_shapes --minutes 90 [--resume] [--until-step N]

Training lives outside the engine package: it is never installed, and its resumable state
(``training/shapes-state``) never ships. ``--until-step N`` stops at a step count rather than at
the machine's speed, so a run is defined by its seed and step (the shipped model's
``training.json`` says its step). Resuming restores every RNG and the EMA; with
``--full-state`` also fp32 weights and the optimizer, so a chain of resumed runs sees the same
data and noise as one uninterrupted run. The default, compact state keeps fp16 weights and no
Adam moments (about a quarter of the size): a resumed run re-estimates them during a fresh
learning-rate warm-up.

Three phases: the VAE alone (short); its decoder alone on overlapping and crowded scenes
(``--decoder-steps``; the encoder is frozen, so a resumed run can sharpen the decoder under a
trained UNet); then the VAE frozen and the UNet trained jointly with both text encoders
(v-prediction, min-SNR weighting, EMA, caption dropout to zero embeddings, which is what the
SDXL pipeline feeds for an empty negative prompt). Scenes hold up to four objects,
some overlapping in a depth order, and a share of the batches (``--crowd-fraction``) are
crowded scenes of 5 to 16 small objects on a larger canvas. A share of the UNet batches
(``--regional-fraction``) is trained the way regional guidance runs at inference: each scene
becomes a Layout written the way users write one (a scene prompt naming all, some or none of
the objects, "a plain background" or nothing; boxes or occlusion-aware visible masks; base
ratio 0 or 0.1-0.3), the engine's own region plan (``engine.regional.plan.plan_regions``)
biases each pixel's cross-attention toward its blocks, and the pooled embedding is the scene
prompt's, as at inference. So the model learns to draw a phrase where it is allowed to be heard
and nothing where only the background prompt is, whatever the scene prompt says. Every
``--checkpoint-minutes`` the run writes the state (safetensors plus a JSON file; no pickle) and
exports the EMA weights as an fp16 pipeline folder, written aside and swapped in so a reader
never sees half a model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors.torch import load_file, save_file

from engine.loading.defaults import DEFAULTS_FILE
from engine.regional.plan import plan_regions
from engine.shapes import model as shapes_model
from engine.shapes.detect import colour_labels
from engine.shapes.world import (
    BACKGROUND_CAPTION,
    ShapeObject,
    caption_for,
    scene_batch,
    visible_masks,
)
from engine.wire.layout import Layout, Region

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "engine", "models", "shapes")
DEFAULT_STATE = os.path.join(REPO, "training", "shapes-state")
TRAINED = ("unet", "text_encoder", "text_encoder_2")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, required=True, help="wall-clock budget of this run")
    p.add_argument(
        "--until-step", type=int, default=None, help="stop once the UNet reaches this step"
    )
    p.add_argument("--out", default=DEFAULT_OUT, help="exported diffusers folder")
    p.add_argument("--state", default=DEFAULT_STATE, help="resumable training state folder")
    p.add_argument("--resume", action="store_true", help="continue from --state")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--vae-steps", type=int, default=1000, help="most VAE steps")
    p.add_argument(
        "--vae-agreement",
        type=float,
        default=0.97,
        help="end the VAE phase early once this share of coloured pixels keeps its colour",
    )
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument(
        "--decoder-steps",
        type=int,
        default=2000,
        help="steps fine-tuning the VAE decoder alone on overlapping and crowded scenes, after "
        "the VAE phase or on resume; the encoder stays frozen, so the UNet's latents keep "
        "their meaning",
    )
    p.add_argument("--decoder-lr", type=float, default=3e-4)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--min-snr", type=float, default=5.0)
    p.add_argument(
        "--regional-fraction",
        type=float,
        default=0.5,
        help="share of UNet batches trained with regional cross-attention blocks",
    )
    p.add_argument(
        "--overlap-fraction",
        type=float,
        default=0.3,
        help="share of scenes whose objects overlap in a depth order",
    )
    p.add_argument(
        "--crowd-fraction",
        type=float,
        default=0.25,
        help="share of UNet batches of crowded scenes (5 to 16 small objects) at --crowd-size",
    )
    p.add_argument("--crowd-size", type=int, default=128, help="image side of crowded batches")
    p.add_argument(
        "--full-state",
        action="store_true",
        help="keep fp32 weights and optimizer moments in the state (resumes bit for bit); by "
        "default the state holds fp16 weights and a resumed run re-warms the optimizer",
    )
    p.add_argument("--checkpoint-minutes", type=float, default=10.0)
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch threads; on a busy machine 1 wastes far less CPU time than several",
    )
    return p.parse_args(argv)


class BiasedCrossAttention:
    """Cross-attention with a per-sample, per-pixel additive bias over the tokens.

    ``biases`` maps a query length (one attention grid) to an ``(N, queries, tokens)`` bias;
    with no entry, the layer is diffusers' plain attention.
    """

    def __init__(self, biases: dict[int, torch.Tensor]):
        self.biases = biases
        self.inner = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        bias = self.biases.get(hidden_states.shape[1])
        if bias is not None:
            attention_mask = bias.to(hidden_states.dtype)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kw)


class Trainer:
    """Holds the models, optimizers, EMA copies and RNGs of one training run."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        torch.set_num_threads(args.threads)
        self.parts = shapes_model.build_components(args.seed)
        self.tokenizer = self.parts["tokenizer"]
        self.alphas_cumprod = self.parts["scheduler"].alphas_cumprod.float()
        self.rng = np.random.default_rng(args.seed)
        torch.manual_seed(args.seed)
        self.step = 0
        self.vae_step = 0
        self.decoder_step = 0
        self.warm_from = 0  # the step the learning-rate warm-up counts from
        self.vae_opt = torch.optim.AdamW(self.parts["vae"].parameters(), lr=args.vae_lr)
        params = [p for name in TRAINED for p in self.parts[name].parameters()]
        self.opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
        self.ema = {
            name: {k: v.detach().clone() for k, v in self.parts[name].state_dict().items()}
            for name in TRAINED
        }
        self.log_path = os.path.join(args.state, "train.log")
        os.makedirs(args.state, exist_ok=True)
        self.attention_biases: dict[int, torch.Tensor] = {}
        self.parts["unet"].set_attn_processor(
            {
                name: BiasedCrossAttention(self.attention_biases)
                if "attn2" in name
                else AttnProcessor2_0()
                for name in self.parts["unet"].attn_processors
            }
        )

    # -- logging ---------------------------------------------------------------------------

    def log(self, message: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {message}"
        print(line, flush=True)
        with open(self.log_path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")

    # -- data ------------------------------------------------------------------------------

    def images(self, batch: int | None = None) -> tuple[torch.Tensor, list[str]]:
        x, captions, _ = self.scenes(batch)
        return x, captions

    def scenes(self, batch: int | None = None, crowded: bool = False, overlap: float | None = None):
        """A batch of scenes: pixels in [-1, 1] (NCHW), captions and objects.

        A crowded batch is ``--crowd-size`` pixels square with as many pixels in all as a
        normal batch; other batches are the model's native size, a share ``overlap`` of the
        scenes (default ``--overlap-fraction``) overlapping.
        """
        batch = batch or self.args.batch
        overlap = self.args.overlap_fraction if overlap is None else overlap
        if crowded:
            size = self.args.crowd_size
            batch = max(1, batch * shapes_model.IMAGE_SIZE**2 // size**2)
            pixels, captions, objects = scene_batch(self.rng, batch, size, crowd=(5, 16))
        else:
            pixels, captions, objects = scene_batch(
                self.rng, batch, shapes_model.IMAGE_SIZE, overlap=overlap
            )
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return x, captions, objects

    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings and pooled vector exactly as StableDiffusionXLPipeline builds them."""
        ids = self.tokenizer(
            captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        out1 = self.parts["text_encoder"](ids, output_hidden_states=True)
        out2 = self.parts["text_encoder_2"](ids, output_hidden_states=True)
        embeds = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
        return embeds, out2.text_embeds

    # -- phases ----------------------------------------------------------------------------

    def vae_step_once(self) -> float:
        vae = self.parts["vae"]
        x, _ = self.images(self.args.vae_batch)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / x[0].numel()
        loss = _reconstruction_loss(recon, x) + 1e-4 * kl
        self.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        self.vae_opt.step()
        self.vae_step += 1
        return loss.item()

    def decoder_step_once(self, opt: torch.optim.Optimizer) -> float:
        """One step of the decoder alone, on the edges the first VAE phase blurs.

        Trained on lone shapes, the decoder mixed two touching colours into a third hue and
        rounded small corners: a round trip of the ground truth kept only 85% of a partly
        hidden object's visible pixels and 91% of four-object shapes. Scenes here overlap
        (70%) or are crowded (30%); latents are sampled, as the UNet's are never exact.
        """
        vae = self.parts["vae"]
        x, _, _ = self.scenes(self.args.vae_batch, crowded=self.rng.random() < 0.3, overlap=0.7)
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.sample()
        loss = _reconstruction_loss(vae.decode(latents).sample, x)
        progress = self.decoder_step / max(1, self.args.decoder_steps)
        for group in opt.param_groups:
            group["lr"] = self.args.decoder_lr * 0.5 * (1 + math.cos(math.pi * progress))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        self.decoder_step += 1
        return loss.item()

    @torch.no_grad()
    def vae_colour_agreement(self, batch: int = 32) -> float:
        """Fraction of coloured pixels whose reconstruction has the same palette colour."""
        vae = self.parts["vae"]
        pixels, _, _ = scene_batch(np.random.default_rng(12345), batch, shapes_model.IMAGE_SIZE)
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
        recon = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        truth, got = colour_labels(pixels), colour_labels(recon)
        coloured = truth >= 0
        return float((got[coloured] == truth[coloured]).mean())

    @torch.no_grad()
    def calibrate_vae(self) -> None:
        """Set the VAE's scaling_factor so latents have unit variance, as SD does."""
        vae = self.parts["vae"]
        latents = torch.cat([vae.encode(self.images()[0]).latent_dist.mode() for _ in range(4)])
        vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
        self.log(f"vae scaling_factor {vae.config.scaling_factor:.4f}")

    def scene_prompt(self, objects: list[ShapeObject]) -> str:
        """A scene prompt in one of the forms users write: naming every object, some of them,
        none ("a plain background"), or empty."""
        form = self.rng.integers(4)
        if form == 0 or not objects:
            return caption_for(list(objects)) if objects else BACKGROUND_CAPTION
        if form == 1:
            keep = self.rng.permutation(len(objects))[: int(self.rng.integers(1, len(objects) + 1))]
            return caption_for([objects[i] for i in sorted(keep)])
        return BACKGROUND_CAPTION if form == 2 else ""

    def sample_layout(
        self, objects: list[ShapeObject], size: int
    ) -> tuple[Layout, list[torch.Tensor] | None]:
        """A Layout for one training scene, written the way a user would write it.

        Its objects become regions (boxes, or for half the scenes the occlusion-aware visible
        masks the add-on sends, returned at the latent size); the scene prompt takes one of the
        forms of ``scene_prompt``; the background prompt is the default or explicit; the base
        ratio is 0 or 0.1-0.3.
        """
        layout = Layout(
            prompt=self.scene_prompt(objects),
            width=size,
            height=size,
            regions=[Region(o.phrase, o.box) for o in objects],
            background_prompt=BACKGROUND_CAPTION if self.rng.random() < 0.5 else None,
            base_ratio=0.0 if self.rng.random() < 0.5 else float(self.rng.uniform(0.1, 0.3)),
        )
        masks = None
        if objects and self.rng.random() < 0.5:
            latent = size // shapes_model.VAE_FACTOR
            visible = torch.from_numpy(visible_masks(objects, size))
            masks = list(F.adaptive_avg_pool2d(visible[:, None], (latent, latent))[:, 0])
        return layout, masks

    def regional_text(
        self, layouts: list[Layout], masks: list[list[torch.Tensor] | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
        """Token blocks, pooled embeddings and per-grid attention biases as the regional
        pipeline builds them for ``layouts`` (one per sample, all of one size).

        The engine's region plan gives each pixel's block weights, whose logs bias
        cross-attention; the pooled embedding is the scene prompt's, as at inference.
        ``masks`` (per sample: latent-size region masks, or None for boxes) replace the boxes.
        Samples with fewer blocks are padded with zero blocks that no pixel may attend to.
        """
        masks = masks or [None] * len(layouts)
        plans = []
        for layout, region_masks in zip(layouts, masks, strict=True):
            latent = layout.height // shapes_model.VAE_FACTOR
            plans.append(plan_regions(layout, (latent, latent), region_masks))
        scene_prompts = [layout.prompt for layout in layouts]
        texts = sorted({t for plan in plans for t in plan.prompts} | set(scene_prompts))
        encoded, pooled_all = self.encode_text(texts)
        row = {t: i for i, t in enumerate(texts)}
        blocks = max(len(plan.prompts) for plan in plans)
        tokens = encoded.shape[1]
        width = encoded.shape[2]
        index = torch.tensor(
            [[row[t] for t in plan.prompts] + [-1] * (blocks - len(plan.prompts)) for plan in plans]
        )
        padded = torch.cat([encoded, encoded.new_zeros((1, tokens, width))])
        embeds = padded[index].reshape(len(plans), blocks * tokens, width)
        pooled = pooled_all[torch.tensor([row[c] for c in scene_prompts])]
        biases = {}
        for level, grid in enumerate(plans[0].grids):
            weights = torch.zeros((len(plans), blocks, grid[0] * grid[1]))
            for i, plan in enumerate(plans):
                weights[i, : len(plan.prompts)] = plan.weights[level].flatten(1)
            bias = weights.log().transpose(1, 2).repeat_interleave(tokens, dim=2)
            biases[grid[0] * grid[1]] = bias
        return embeds, pooled, biases

    def unet_step_once(self) -> float:
        args, unet, vae = self.args, self.parts["unet"], self.parts["vae"]
        x, captions, objects = self.scenes(crowded=self.rng.random() < args.crowd_fraction)
        size = x.shape[-1]
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor
        if self.rng.random() < args.regional_fraction:
            drawn = [self.sample_layout(objs, size) for objs in objects]
            embeds, pooled, biases = self.regional_text(*map(list, zip(*drawn, strict=True)))
        else:
            embeds, pooled = self.encode_text(captions)
            keep = (torch.rand(len(captions)) >= args.caption_dropout).float()
            embeds = embeds * keep[:, None, None]
            pooled = pooled * keep[:, None]
            biases = {}
        self.attention_biases.clear()
        self.attention_biases.update(biases)
        n = latents.shape[0]
        t = torch.randint(0, len(self.alphas_cumprod), (n,))
        ab = self.alphas_cumprod[t].view(n, 1, 1, 1)
        noise = torch.randn_like(latents)
        noisy = ab.sqrt() * latents + (1 - ab).sqrt() * noise
        target = ab.sqrt() * noise - (1 - ab).sqrt() * latents
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32).repeat(n, 1)
        pred = unet(
            noisy,
            t,
            encoder_hidden_states=embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample
        snr = (ab / (1 - ab)).view(n)
        weight = torch.clamp(snr, max=args.min_snr) / (snr + 1)
        loss = (weight * ((pred - target) ** 2).mean(dim=(1, 2, 3))).mean()
        warmup = min(1.0, (self.step + 1 - self.warm_from) / 200)
        for group in self.opt.param_groups:
            group["lr"] = args.lr * warmup
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(
            [p for group in self.opt.param_groups for p in group["params"]], 1.0
        )
        self.opt.step()
        self.step += 1
        self.update_ema()
        return loss.item()

    @torch.no_grad()
    def update_ema(self) -> None:
        decay = min(self.args.ema, (1 + self.step) / (10 + self.step))
        for name in TRAINED:
            for k, v in self.parts[name].state_dict().items():
                e = self.ema[name][k]
                if v.dtype.is_floating_point:
                    e.mul_(decay).add_(v, alpha=1 - decay)
                else:
                    e.copy_(v)

    # -- state and export ------------------------------------------------------------------

    def save_state(self) -> None:
        """Write the resumable state into a fresh folder and swap it in."""
        tmp = self.args.state.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        full = self.args.full_state

        def stored(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {
                k: (v if full or not v.dtype.is_floating_point else v.half()).contiguous()
                for k, v in weights.items()
            }

        for name in (*TRAINED, "vae"):
            save_file(
                stored(self.parts[name].state_dict()), os.path.join(tmp, f"{name}.safetensors")
            )
        for name in TRAINED:
            save_file(stored(self.ema[name]), os.path.join(tmp, f"ema_{name}.safetensors"))
        meta: dict = {
            "step": self.step,
            "vae_step": self.vae_step,
            "decoder_step": self.decoder_step,
            "vae_scaling_factor": self.parts["vae"].config.scaling_factor,
            "numpy_rng": self.rng.bit_generator.state,
            "args": {k: v for k, v in vars(self.args).items() if k != "resume"},
        }
        for label, opt in (("opt", self.opt), ("vae_opt", self.vae_opt)):
            tensors, groups = _flatten_optimizer(opt.state_dict())
            if full:
                save_file(tensors, os.path.join(tmp, f"{label}.safetensors"))
            meta[f"{label}_groups"] = groups
        save_file({"torch_rng": torch.get_rng_state()}, os.path.join(tmp, "rng.safetensors"))
        with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as handle:
            json.dump(meta, handle, indent=1, default=_json_default)
        _swap_in(tmp, self.args.state)
        self.log_path = os.path.join(self.args.state, "train.log")

    def load_state(self) -> None:
        folder = self.args.state
        path = os.path.join(folder, "state.json")
        if not os.path.exists(path):
            raise SystemExit(f"no training state at {folder!r}; start without --resume")
        with open(path, encoding="utf-8") as handle:
            meta = json.load(handle)
        for name in (*TRAINED, "vae"):
            self.parts[name].load_state_dict(load_file(os.path.join(folder, f"{name}.safetensors")))
        for name in TRAINED:
            ema = load_file(os.path.join(folder, f"ema_{name}.safetensors"))
            self.ema[name] = {k: v.to(self.ema[name][k].dtype) for k, v in ema.items()}
        self.parts["vae"].register_to_config(scaling_factor=meta["vae_scaling_factor"])
        self.step, self.vae_step = meta["step"], meta["vae_step"]
        self.decoder_step = meta.get("decoder_step", 0)
        rewarmed = []
        for label, opt in (("opt", self.opt), ("vae_opt", self.vae_opt)):
            path = os.path.join(folder, f"{label}.safetensors")
            if os.path.exists(path):
                opt.load_state_dict(_unflatten_optimizer(load_file(path), meta[f"{label}_groups"]))
            else:
                rewarmed.append(label)
        if "opt" in rewarmed:
            # A compact state has no Adam moments: they re-estimate during a fresh warm-up.
            self.warm_from = self.step
        self.rng.bit_generator.state = meta["numpy_rng"]
        torch.set_rng_state(load_file(os.path.join(folder, "rng.safetensors"))["torch_rng"])
        note = f" (optimizer re-warmed: {', '.join(rewarmed)})" if rewarmed else ""
        self.log(
            f"resumed at unet step {self.step}, vae step {self.vae_step}, "
            f"decoder step {self.decoder_step}{note}"
        )

    def export(self) -> None:
        """Save the EMA weights as an fp16 StableDiffusionXLPipeline folder, swapped in whole."""
        from diffusers import StableDiffusionXLPipeline

        fresh = shapes_model.build_components(self.args.seed)
        for name in TRAINED:
            fresh[name].load_state_dict(self.ema[name])
        fresh["vae"].load_state_dict(self.parts["vae"].state_dict())
        fresh["vae"].register_to_config(scaling_factor=self.parts["vae"].config.scaling_factor)
        pipe = StableDiffusionXLPipeline(**fresh).to(torch.float16)
        tmp = self.args.out.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        pipe.save_pretrained(tmp, safe_serialization=True)
        with open(os.path.join(tmp, "training.json"), "w", encoding="utf-8") as handle:
            steps = {"unet_step": self.step, "vae_step": self.vae_step}
            json.dump({**steps, "decoder_step": self.decoder_step}, handle)
        with open(os.path.join(tmp, DEFAULTS_FILE), "w", encoding="utf-8") as handle:
            json.dump(shapes_model.LAYOUT_DEFAULTS, handle, indent=1)
        _swap_in(tmp, self.args.out)
        self.log(f"exported EMA model at unet step {self.step} to {self.args.out}")


def _reconstruction_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 + L2 with coloured pixels weighted 9x.

    Shapes cover a small part of each image: without the extra weight the VAE first learns the
    grey backgrounds and merges the six hues into two.
    """
    saturation = (x.amax(dim=1, keepdim=True) - x.amin(dim=1, keepdim=True)) / 2
    weight = 1.0 + 8.0 * (saturation > 0.15).float()
    error = (recon - x).abs() + (recon - x) ** 2
    return (weight * error).mean() / weight.mean()


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], list]:
    tensors = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            tensors[f"{index}.{key}"] = torch.as_tensor(value).contiguous()
    return tensors, state["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": groups}


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    raise TypeError(f"cannot store {type(value).__name__} in the training state")


def _swap_in(tmp: str, final: str) -> None:
    """Replace folder ``final`` by ``tmp`` with two renames (the old copy is removed after)."""
    old = final.rstrip("/") + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        # Keep the running log: it lives in the state folder and must survive the swap.
        log = os.path.join(final, "train.log")
        if os.path.exists(log):
            shutil.copy2(log, os.path.join(tmp, "train.log"))
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def run_decoder_phase(trainer: Trainer, deadline: float) -> None:
    """Fine-tune the VAE decoder alone up to ``--decoder-steps``, then save and export."""
    args, vae = trainer.args, trainer.parts["vae"]
    decoder = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in decoder:
        p.requires_grad_(True)
    # A fresh optimizer each time: the phase is short and its moments are never stored.
    opt = torch.optim.AdamW(decoder, lr=args.decoder_lr, weight_decay=0.0)
    trainer.log(f"phase 1b: VAE decoder ({trainer.vae_colour_agreement():.3f} colour agreement)")
    window, window_start, losses = 0, time.monotonic(), []
    while trainer.decoder_step < args.decoder_steps and time.monotonic() < deadline:
        losses.append(trainer.decoder_step_once(opt))
        window += 1
        if trainer.decoder_step % 50 == 0:
            rate = window * args.vae_batch / (time.monotonic() - window_start)
            trainer.log(
                f"decoder step {trainer.decoder_step} loss {np.mean(losses):.4f} {rate:.1f} img/s"
            )
            window, window_start, losses = 0, time.monotonic(), []
    vae.requires_grad_(False)
    trainer.log(f"decoder step {trainer.decoder_step}: {trainer.vae_colour_agreement():.3f}")
    trainer.save_state()
    trainer.export()


def main(argv: list[str] | None = None) -> None:
    """Run (or resume) training within the time budget, checkpointing and exporting as it goes."""
    args = parse_args(argv)
    start = time.monotonic()
    deadline = start + args.minutes * 60
    trainer = Trainer(args)
    if args.resume:
        trainer.load_state()
    trainer.log(f"training: {json.dumps({k: v for k, v in vars(args).items()})}")
    next_checkpoint = time.monotonic() + args.checkpoint_minutes * 60
    window, window_start, losses = 0, time.monotonic(), []

    # The VAE phase ends for good once the UNet has taken a step (a resumed run skips it).
    vae_phase = trainer.step == 0
    if vae_phase:
        trainer.log("phase 1: VAE")
    while vae_phase and trainer.vae_step < args.vae_steps and time.monotonic() < deadline:
        losses.append(trainer.vae_step_once())
        window += 1
        if trainer.vae_step % 25 == 0:
            rate = window * args.vae_batch / (time.monotonic() - window_start)
            trainer.log(f"vae step {trainer.vae_step} loss {np.mean(losses):.4f} {rate:.1f} img/s")
            window, window_start, losses = 0, time.monotonic(), []
        if trainer.vae_step % 100 == 0:
            agreement = trainer.vae_colour_agreement()
            trainer.log(f"vae step {trainer.vae_step} colour agreement {agreement:.3f}")
            if agreement >= args.vae_agreement:
                break
    if trainer.step == 0:
        trainer.calibrate_vae()
    trainer.parts["vae"].requires_grad_(False)

    if trainer.decoder_step < args.decoder_steps and time.monotonic() < deadline:
        run_decoder_phase(trainer, deadline)

    trainer.log("phase 2: UNet + text encoders")
    window, window_start, losses = 0, time.monotonic(), []

    def more_steps() -> bool:
        return args.until_step is None or trainer.step < args.until_step

    while time.monotonic() < deadline and more_steps():
        loss = trainer.unet_step_once()
        if math.isfinite(loss):
            losses.append(loss)
        window += 1
        if trainer.step % 50 == 0:
            rate = window * args.batch / (time.monotonic() - window_start)
            trainer.log(f"unet step {trainer.step} loss {np.mean(losses):.4f} {rate:.1f} img/s")
            window, window_start, losses = 0, time.monotonic(), []
        if time.monotonic() >= next_checkpoint:
            trainer.save_state()
            trainer.export()
            next_checkpoint = time.monotonic() + args.checkpoint_minutes * 60
    trainer.save_state()
    trainer.export()
    trainer.log(f"done after {(time.monotonic() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
