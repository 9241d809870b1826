"""Limits a generation is checked against with the model at hand: prompt tokens and time.

- :func:`~engine.prompt_length.check_prompt_tokens` (re-exported here): a prompt longer than
  the model's token window would be cut by the text encoders; it is refused instead.
- :class:`TimeBudget`: before the first step, the generation's operations (counted once per
  model on the meta device, so no memory is touched) are set against the device's measured
  matrix-multiply speed. That estimate is a lower bound, so a request is refused only when even
  it exceeds the limit; after each step the measured step time gives the real estimate, and
  the run stops as soon as that shows it would exceed the limit.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from engine.errors import LimitExceededError
from engine.prompt_length import check_prompt_tokens, prompt_fields
from engine.wire.layout import MAX_PROMPT_TOKENS, Layout

__all__ = [
    "MEASURED_RATES",
    "TimeBudget",
    "check_prompt_tokens",
    "measured_rate",
    "prompt_fields",
    "rate_key",
    "stop_inside_steps",
]

log = logging.getLogger(__name__)

WARN_SECONDS = 600.0
"""Estimated generation time above which the engine log warns."""
OPTIMISM = 2.0
"""The estimate before the first step assumes the device runs this many times faster than its
measured matrix-multiply speed (convolution kernels and a noisy measurement can beat it), so
it stays a lower bound and never refuses a request that could finish in time."""


# -- Time ---------------------------------------------------------------------------------------


# (c, a, b) of ``flops(p) = c + a * p + b * p**2`` by the sha256 of the model's config key
# (:func:`config_key`): SDXL base's UNet (one guided step, batch 2, 77 tokens) and VAE decoder,
# counted with :func:`_count_flops` at latent sides 32, 64 and 128. Every SDXL fine-tune shares
# them, so the engine counts only other architectures itself (a few seconds, once).
KNOWN_FLOPS: dict[str, tuple[float, float, float]] = {
    "d94f21d5124208edfedb87b570e97503edbeba9f74961d57e2734aa3ecf7ff69": (
        105062072320.0,
        727183360.0,
        5600.0,
    ),
    "6f9916413c8a68da5c1d52a0c11ad3b5a620e2a01413164a1529dd51b050b359": (0.0, 605507616.0, 2048.0),
}


# Config entries that change no operation count.
_NOT_COUNTED = frozenset(
    {"sample_size", "scaling_factor", "shift_factor", "force_upcast", "latents_mean", "latents_std"}
)


def config_key(config: Any) -> str:
    """A model config as canonical JSON of the entries that decide its operation count."""
    kept = {
        k: v for k, v in dict(config).items() if not k.startswith("_") and k not in _NOT_COUNTED
    }
    return json.dumps(kept, sort_keys=True, default=str)


@functools.lru_cache(maxsize=16)
def fitted_flops(kind: str, key: str) -> tuple[float, float, float]:
    """``(c, a, b)`` with ``flops(p) = c + a * p + b * p**2`` for ``p`` latent pixels:
    convolutions grow with the pixels, self-attention with their square, embeddings not at all.
    Exact for diffusers' UNets and VAEs, fitted to three meta-device counts."""
    known = KNOWN_FLOPS.get(hashlib.sha256(f"{kind}:{key}".encode()).hexdigest())
    if known is not None:
        return known
    import numpy as np

    counts = _count_flops(kind, json.loads(key), (32, 64, 128))
    rows = [[1.0, p, p * p] for p in (float(side * side) for side, _ in counts)]
    c, a, b = np.linalg.solve(np.array(rows), np.array([flops for _, flops in counts]))
    return float(c), float(a), float(b)


def _count_flops(
    kind: str, config: dict[str, Any], sides: tuple[int, ...]
) -> list[tuple[int, float]]:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    counts = []
    with torch.device("meta"):
        model = (UNet2DConditionModel if kind == "unet" else AutoencoderKL).from_config(config)
        for side in sides:
            with FlopCounterMode(display=False) as counter:
                if kind == "unet":
                    _unet_call(model, config, side)
                else:
                    model.decode(torch.zeros(1, config["latent_channels"], side, side))
            counts.append((side, float(counter.get_total_flops())))
    return counts


def _unet_call(unet: Any, config: dict[str, Any], side: int) -> None:
    import torch

    added = None
    if config.get("addition_embed_type") == "text_time":
        time_dim = config.get("addition_time_embed_dim") or 256
        pooled = config["projection_class_embeddings_input_dim"] - 6 * time_dim
        added = {"text_embeds": torch.zeros(2, pooled), "time_ids": torch.zeros(2, 6)}
    cross = config["cross_attention_dim"]
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    unet(
        torch.zeros(2, config["in_channels"], side, side),
        torch.zeros(2),
        torch.zeros(2, MAX_PROMPT_TOKENS, cross),
        added_cond_kwargs=added,
    )


@functools.lru_cache(maxsize=8)
def device_flops_per_second(device: str, dtype_name: str) -> float:
    """The device's matrix-multiply speed in FLOP/s, measured once (best of a few runs)."""
    import torch

    dtype = getattr(torch, dtype_name)
    size = 2048 if device == "cpu" else 8192
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for _ in range(3):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / max(best, 1e-9)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def step_flops(pipe: Any, layout: Layout) -> tuple[float, float]:
    """FLOPs of one guided UNet step and of the VAE decode at the Layout's size."""
    scale = pipe.vae_scale_factor
    p = float((layout.height // scale) * (layout.width // scale))
    c, a, b = fitted_flops("unet", config_key(pipe.unet.config))
    unet = c + a * p + b * p * p
    c, a, b = fitted_flops("vae", config_key(pipe.vae.config))
    return unet, c + a * p + b * p * p


MEASURED_RATES: dict[tuple[str, str, str], float] = {}
"""Seconds per UNet FLOP of the last generation's steps, by (UNet config key, device, dtype):
what :mod:`engine.service.estimate` scales to other sizes."""


def rate_key(unet_config: Any, device: str, dtype: str) -> tuple[str, str, str]:
    """The key of :data:`MEASURED_RATES`: ``cuda:0`` counts as ``cuda``, ``torch.float16`` as
    ``float16``."""
    return config_key(unet_config), device.split(":")[0], dtype.removeprefix("torch.")


def measured_rate(unet_config: Any, device: str, dtype: str) -> float | None:
    """The measured seconds per UNet FLOP for a UNet config on a device; None before a run."""
    return MEASURED_RATES.get(rate_key(unet_config, device, dtype))


class TimeBudget:
    """Keeps one generation within ``max_seconds`` (0: no limit), as the module says."""

    def __init__(self, pipe: Any, layout: Layout, steps: int, max_seconds: float):
        self.max_seconds = max_seconds
        self.steps = steps
        self.started = time.perf_counter()
        self._last = self.started
        self._step_seconds: list[float] = []
        self.layout = layout
        self.pipe = pipe
        self.estimate: float | None = None
        self._decode_share = 0.0
        self._unet_flops = 0.0
        self._rate_key: tuple[str, str, str] | None = None

    def check_before(self) -> float | None:
        """The lower-bound estimate of the whole run in seconds; raises LimitExceededError
        when even that exceeds the limit. None when the device's speed cannot be measured."""
        try:
            unet, vae = step_flops(self.pipe, self.layout)
            device = str(self.pipe._execution_device)
            speed = device_flops_per_second(device, str(self.pipe.unet.dtype).split(".")[-1])
        except Exception:  # an unusual model or device: no estimate, the steps still count
            log.warning("no time estimate for this model", exc_info=True)
            return None
        seconds = (self.steps * unet + vae) / (speed * OPTIMISM)
        self._decode_share = vae / max(unet, 1.0)
        self._unet_flops = unet
        self._rate_key = rate_key(self.pipe.unet.config, device, str(self.pipe.unet.dtype))
        self.estimate = seconds
        what = f"{self.layout.width}x{self.layout.height}, {self.steps} steps"
        if self.max_seconds and seconds > self.max_seconds:
            raise self._refusal(seconds, what, "at least ")
        if seconds > WARN_SECONDS:
            log.warning("generating %s will take at least %.0f s on %s", what, seconds, device)
        self.started = self._last = time.perf_counter()
        return seconds

    def after_step(self, done: int) -> float:
        """Record a step; the estimated seconds left. Raises LimitExceededError once the
        measured steps show the run would exceed the limit."""
        now = time.perf_counter()
        self._step_seconds.append(now - self._last)
        self._last = now
        # The first step carries one-off warm-up; later ones are what the rest will cost.
        recent = self._step_seconds[1:] or self._step_seconds
        per_step = min(recent[-3:])
        if self._rate_key is not None and len(self._step_seconds) >= 2:
            # Overwritten every step: the last steps run at the Layout's size (a first pass
            # making the reference runs smaller, before them).
            MEASURED_RATES[self._rate_key] = per_step / max(self._unet_flops, 1.0)
        left = max(self.steps - done, 0) * per_step + self._decode_share * per_step
        total = now - self.started + left
        if self.max_seconds and done >= 2 and total > self.max_seconds:
            what = f"{self.layout.width}x{self.layout.height}, {self.steps} steps"
            raise self._refusal(total, what, "")
        return left

    def _refusal(self, seconds: float, what: str, bound: str) -> LimitExceededError:
        return LimitExceededError(
            f"generating {what} would take {bound}{_duration(seconds)} on this device; the "
            f"limit is {_duration(self.max_seconds)}. Use a smaller size or fewer steps, a "
            "faster device, or start the engine with a higher --max-seconds",
            "generate_seconds",
            self.max_seconds,
        )


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"


def stop_inside_steps(pipe: Any, should_stop: Callable[[], bool], error: Callable[[], Exception]):
    """Context manager: ``should_stop()`` is polled before every block of the UNet, the VAE and
    an attached ControlNet (resnets, transformer blocks, attention, up/downsamplers), and
    ``error()`` raised there, so a cancel lands within one block rather than one step."""
    import contextlib

    @contextlib.contextmanager
    def installed():
        def check(module: Any, args: Any) -> None:
            if should_stop():
                raise error()

        handles = []
        models = [getattr(pipe, name, None) for name in ("unet", "vae", "depth_controlnet")]
        for model in models:
            if model is None:
                continue
            for module in model.modules():
                if type(module).__name__ in _BLOCK_TYPES:
                    handles.append(module.register_forward_pre_hook(check))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    return installed()


_BLOCK_TYPES = frozenset(
    {
        "ResnetBlock2D",
        "BasicTransformerBlock",
        "Attention",
        "Downsample2D",
        "Upsample2D",
        "UNetMidBlock2D",
    }
)
"""diffusers' building blocks: a cancel is noticed when the next of these starts."""
