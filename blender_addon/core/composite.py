"""Object layers composited over the proxy render: the "Object Layers" init image (pure numpy).

Each labeled object may bring an image of itself (its Reference Image). The image is scaled to
fit the object's box, keeping its aspect ratio, and centred in it; its alpha (an RGBA image's
cut-out) is multiplied by the object's visible mask, so whatever hides the object in the camera
view hides its layer too. The layers are then alpha-composited over the flat-colour proxy render
back to front: the farthest object first, the nearest last. Objects without an image, the
transparent parts of an image and the parts of a box the fitted image leaves free show the proxy
render beneath.

The masks come from one id render and never overlap, so the order only matters for soft or
hand-made masks; it is kept so the result does not depend on the order objects are listed in.
Colours are 8-bit sRGB with straight (not premultiplied) alpha, row 0 at the top.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Layer:
    """One object's image, where it goes and what of it is visible."""

    image: np.ndarray
    """(h, w, 4) RGBA or (h, w, 3) RGB (opaque), uint8, straight alpha."""
    box: Sequence[float]
    """The object's normalized ``[x0, y0, x1, y1]`` box (origin top-left)."""
    mask: np.ndarray | None = None
    """(H, W) visible pixels at the canvas size (uint8 0..255, bool or float 0..1); None: the
    whole box."""
    distance: float = 0.0
    """How far the object is from the camera: farther layers go under nearer ones."""


def fit_rect(
    size: tuple[int, int], box: Sequence[float], width: int, height: int
) -> tuple[int, int, int, int]:
    """Pixel columns and rows ``(c0, r0, c1, r1)`` (end exclusive) an image of ``size`` (w, h)
    covers when scaled to fit the normalized ``box`` of a ``width`` x ``height`` canvas,
    keeping its aspect ratio, centred in the box. At least one pixel each way."""
    image_w, image_h = size
    if image_w <= 0 or image_h <= 0:
        raise ValueError(f"a layer image needs pixels, got {image_w}x{image_h}")
    x0, y0, x1, y1 = (float(v) for v in box)
    box_w, box_h = (x1 - x0) * width, (y1 - y0) * height
    scale = min(box_w / image_w, box_h / image_h)
    fit_w, fit_h = image_w * scale, image_h * scale
    left = x0 * width + (box_w - fit_w) / 2
    top = y0 * height + (box_h - fit_h) / 2
    c0, r0 = _round(left), _round(top)
    c1, r1 = max(_round(left + fit_w), c0 + 1), max(_round(top + fit_h), r0 + 1)
    return c0, r0, c1, r1


def _round(value: float) -> int:
    # Halves round up: round() sends them to the even side, moving some edges and not others.
    return math.floor(value + 0.5)


def _axis_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights, each (dst, taps), resizing one axis from ``src`` to ``dst``.

    Shrinking averages the source pixels under each output pixel (weighted by overlap), so
    a photo scaled into a small box does not alias; enlarging interpolates linearly.
    """
    scale = src / dst
    if scale >= 1.0:
        starts = np.arange(dst) * scale
        first = np.floor(starts).astype(np.int64)
        index = first[:, None] + np.arange(int(np.ceil(scale)) + 1)[None, :]
        low = np.maximum(index, starts[:, None])
        high = np.minimum(index + 1, starts[:, None] + scale)
        weights = np.maximum(high - low, 0.0)
    else:
        centres = (np.arange(dst) + 0.5) * scale - 0.5
        first = np.floor(centres).astype(np.int64)
        index = first[:, None] + np.arange(2)[None, :]
        weights = np.maximum(1.0 - np.abs(index - centres[:, None]), 0.0)
    # Taps past the edge repeat the edge pixel.
    index = np.clip(index, 0, src - 1)
    return index, weights / weights.sum(axis=1, keepdims=True)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an (h, w, C) image to (height, width, C) float32; see :func:`_axis_taps`."""
    image = np.asarray(image, dtype=np.float32)
    for axis, size in ((0, height), (1, width)):
        if image.shape[axis] == size:
            continue
        index, weights = _axis_taps(image.shape[axis], size)
        moved = np.moveaxis(image, axis, 0)
        out = np.zeros((size, *moved.shape[1:]), dtype=np.float32)
        for tap in range(index.shape[1]):
            out += weights[:, tap, None, None].astype(np.float32) * moved[index[:, tap]]
        image = np.moveaxis(out, 0, axis)
    return image


def _mask_fraction(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.dtype == bool:
        return mask.astype(np.float32)
    if mask.dtype.kind in "ui":
        return mask.astype(np.float32) / np.iinfo(mask.dtype).max
    return np.clip(mask.astype(np.float32), 0.0, 1.0)


def composite_layers(background: np.ndarray, layers: Sequence[Layer]) -> np.ndarray:
    """``layers`` over ``background`` ((H, W, 3) uint8), farthest first; an (H, W, 3) uint8.

    Each layer's image is fitted into its box (:func:`fit_rect`), its alpha multiplied by its
    mask, and composited "over" what lies beneath (premultiplied, so resampled edges do not
    pick up the colour of transparent pixels).
    """
    background = np.asarray(background)
    if background.ndim != 3 or background.shape[2] != 3 or background.dtype != np.uint8:
        raise ValueError(
            "the background must be an (H, W, 3) uint8 image, got "
            f"{background.dtype} {background.shape}"
        )
    height, width = background.shape[:2]
    out = background.astype(np.float32) / 255.0
    for number, layer in sorted(enumerate(layers), key=lambda item: -item[1].distance):
        image = np.asarray(layer.image)
        if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
            raise ValueError(
                f"layer {number}: the image must be (h, w, 3) or (h, w, 4) uint8, got "
                f"{image.dtype} {image.shape}"
            )
        # Float32: half the memory of float64 for large photos, ample for 8-bit results.
        rgba = np.ones((*image.shape[:2], 4), dtype=np.float32)
        rgba[..., : image.shape[2]] = image / np.float32(255.0)
        rgba[..., :3] *= rgba[..., 3:]
        c0, r0, c1, r1 = fit_rect((image.shape[1], image.shape[0]), layer.box, width, height)
        placed = resize(rgba, r1 - r0, c1 - c0)
        # Boxes lie inside the frame, but a rounded edge may not: keep the canvas part.
        top, left = max(r0, 0), max(c0, 0)
        bottom, right = min(r1, height), min(c1, width)
        if bottom <= top or right <= left:
            continue
        placed = placed[top - r0 : bottom - r0, left - c0 : right - c0]
        if layer.mask is not None:
            mask = np.asarray(layer.mask)
            if mask.shape != (height, width):
                raise ValueError(
                    f"layer {number}: the mask is {mask.shape[1]}x{mask.shape[0]}, the canvas "
                    f"{width}x{height}"
                )
            placed = placed * _mask_fraction(mask)[top:bottom, left:right, None]
        beneath = out[top:bottom, left:right]
        out[top:bottom, left:right] = beneath * (1.0 - placed[..., 3:]) + placed[..., :3]
    return np.rint(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)
