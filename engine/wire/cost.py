"""What a generation costs and the high-resolution fix: the arithmetic both sides share.

``hello``'s ``cost`` (see ``engine.service.estimate``) gives a model's native size, the FLOPs of
one guided step and of the decode as quadratics in latent pixels, and the seconds per FLOP
measured on this device; :func:`estimate_seconds` multiplies them out for any size.

The high-resolution fix: a Layout far above the model's native size (more than
:data:`HIGH_RES_AREA_RATIO` times its area) is generated in two passes instead of one. The first
pass is the same Layout at about the native area (aspect kept); its image, upscaled to the full
size, is the init image of the second pass, the same Layout again (same prompts, boxes and
masks: they are normalised, so the regions stay where they were) at a moderate ``strength``.
The engine's img2img runs every step of a Layout (the init image is re-imposed until the
strength's start, see ``engine.steering.object_strength``), so the second pass runs
``ceil(steps * strength)`` steps: about what skipping to the strength's start would cost.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .layout import MIN_SIZE, SIZE_MULTIPLE, Layout

HIGH_RES_AREA_RATIO = 1.5
"""A size with more than this many times the native area is far above native: SDXL (1024²)
from about 1254² on, where its compositions start to repeat objects and steps cost much more."""
HIGH_RES_STRENGTH = 0.4
"""The second pass's default strength: enough to add detail at the full size, little enough to
keep the first pass's composition."""


def estimate_seconds(
    cost: dict[str, Any], width: int, height: int, steps: int, decode: bool = True
) -> float:
    """Seconds ``steps`` guided steps (and the decode) take at ``width`` x ``height`` by a
    ``hello`` ``cost`` (available)."""
    factor = int(cost["latent_factor"])
    p = float((width // factor) * (height // factor))

    def flops(coefficients: list[float]) -> float:
        c, a, b = coefficients
        return c + a * p + b * p * p

    total = steps * flops(cost["unet_flops"]) + (flops(cost["vae_flops"]) if decode else 0.0)
    return total * float(cost["seconds_per_flop"])


def far_above_native(width: int, height: int, native: int) -> bool:
    """Whether ``width`` x ``height`` is far enough above ``native``² for the high-res fix."""
    return width * height > HIGH_RES_AREA_RATIO * native * native


ASPECT_TOLERANCE = 0.01
"""How far the first pass's aspect may differ from the Layout's: its masks, made for the full
size, must fit it (the engine refuses masks more than 2% off)."""


def native_area_size(width: int, height: int, native: int) -> tuple[int, int]:
    """A size of about ``native``² pixels with the aspect of ``width`` x ``height``: sides
    multiples of 8, at least the Layout's minimum, never above the given size, the aspect
    within :data:`ASPECT_TOLERANCE` (the closest area to ``native``² among such sizes; the
    given size itself when none is smaller)."""
    aspect = width / height
    target = float(native * native)
    best = (width, height)
    best_miss = abs(math.log(width * height / target))
    for short in range(MIN_SIZE, min(width, height) + 1, SIZE_MULTIPLE):
        scaled = short * (aspect if width >= height else 1.0 / aspect)
        long = int((scaled + SIZE_MULTIPLE / 2) // SIZE_MULTIPLE) * SIZE_MULTIPLE
        w, h = (long, short) if width >= height else (short, long)
        if w > width or h > height or w < MIN_SIZE or h < MIN_SIZE:
            continue
        if abs((w / h) / aspect - 1.0) > ASPECT_TOLERANCE:
            continue
        miss = abs(math.log(w * h / target))
        if miss < best_miss:
            best, best_miss = (w, h), miss
    return best


def second_pass_steps(steps: int, strength: float) -> int:
    """Steps of the second pass (see the module): ``ceil(steps * strength)``, at least 1."""
    return max(1, math.ceil(steps * strength - 1e-9))


def first_pass(layout: Layout, native: int) -> Layout:
    """The high-res fix's first pass: ``layout`` at about the native area, all else kept."""
    width, height = native_area_size(layout.width, layout.height, native)
    return dataclasses.replace(layout, width=width, height=height)


def second_pass(layout: Layout, init_image: str, strength: float = HIGH_RES_STRENGTH) -> Layout:
    """The high-res fix's second pass: ``layout`` from ``init_image`` (the upscaled first pass,
    an absolute path) at ``strength`` everywhere, in :func:`second_pass_steps` steps. Its
    reference pull is off: the init image already holds the composition."""
    return dataclasses.replace(
        layout,
        init_image=init_image,
        strength=strength,
        keep_outside=False,
        steps=second_pass_steps(layout.steps, strength),
        reference=None,
        reference_scale=0.0,
        regions=[dataclasses.replace(region, strength=None) for region in layout.regions],
    )


def high_res_seconds(
    cost: dict[str, Any], width: int, height: int, steps: int, strength: float = HIGH_RES_STRENGTH
) -> float:
    """Seconds the two passes of the high-res fix take at ``width`` x ``height``."""
    small = native_area_size(width, height, int(cost["native_size"]))
    first = estimate_seconds(cost, *small, steps)
    return first + estimate_seconds(cost, width, height, second_pass_steps(steps, strength))


def duration(seconds: float) -> str:
    """``"12 s"``, ``"4 min"``, ``"1.5 h"``."""
    if seconds < 60:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
