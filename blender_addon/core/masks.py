"""Object-index and depth images to Layout masks and depth maps (pure numpy).

An id image holds, per pixel, the pass index of the nearest object seen there (0 = background or
an object that is not tracked). Labeled objects get ids 1..N; other objects may carry larger ids
so whatever hides a labeled object can be named.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

DEPTH_MAX = 65535


def pixels_by_id(ids: np.ndarray, count: int) -> Iterator[tuple[int, np.ndarray]]:
    """Flat pixel indices of every id in ``1..count`` present in ``ids`` (one sort, no per-id scan)."""
    flat = np.asarray(ids).ravel()
    tracked = np.flatnonzero((flat >= 1) & (flat <= count))  # background is most of the image
    order = tracked[np.argsort(flat[tracked], kind="stable")]
    sorted_ids = flat[order]
    bounds = np.searchsorted(sorted_ids, np.arange(1, count + 2))
    for k in range(1, count + 1):
        start, stop = bounds[k - 1], bounds[k]
        if stop > start:
            yield k, order[start:stop]


def pixel_counts(ids: np.ndarray, count: int) -> np.ndarray:
    """Visible pixels per id; index k holds id k's count (index 0: everything else)."""
    flat = np.asarray(ids).ravel().astype(np.int64)
    flat = np.where((flat >= 0) & (flat <= count), flat, 0)
    return np.bincount(flat, minlength=count + 1)


def mask_image(shape: tuple[int, int], pixels: np.ndarray) -> np.ndarray:
    """An 8-bit mask of ``shape``: 255 at the flat pixel indices, 0 elsewhere."""
    mask = np.zeros(shape[0] * shape[1], dtype=np.uint8)
    mask[pixels] = 255
    return mask.reshape(shape)


def box_pixels(box: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel rows/columns ``(c0, r0, c1, r1)`` (end exclusive) whose centres lie in a normalized box.

    At least one pixel is returned for a box inside the frame, so tiny boxes still name a pixel.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    c0 = int(np.clip(np.ceil(x0 * width - 0.5), 0, width - 1))
    r0 = int(np.clip(np.ceil(y0 * height - 0.5), 0, height - 1))
    c1 = int(np.clip(np.floor(x1 * width - 0.5) + 1, c0 + 1, width))
    r1 = int(np.clip(np.floor(y1 * height - 0.5) + 1, r0 + 1, height))
    return c0, r0, c1, r1


def dominant_id(ids: np.ndarray, box: np.ndarray, exclude: int = -1) -> tuple[int, float]:
    """The most frequent nonzero id inside a normalized box and the share of the box it covers.

    Returns ``(0, share_of_background)`` when nothing but background is there.
    """
    height, width = ids.shape
    c0, r0, c1, r1 = box_pixels(box, width, height)
    window = np.asarray(ids[r0:r1, c0:c1]).ravel().astype(np.int64)
    window = window[window != exclude]
    if window.size == 0:
        return 0, 0.0
    values, counts = np.unique(window, return_counts=True)
    nonzero = values != 0
    if not nonzero.any():
        return 0, 1.0
    best = int(np.argmax(np.where(nonzero, counts, -1)))
    return int(values[best]), float(counts[best]) / window.size


def resample_nearest(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of an (h, w) image: ids stay ids, no blending between objects."""
    image = np.asarray(image)
    src_h, src_w = image.shape
    if (src_h, src_w) == (height, width):
        return image
    rows = np.minimum(((np.arange(height) + 0.5) * src_h / height).astype(np.int64), src_h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * src_w / width).astype(np.int64), src_w - 1)
    return image[rows[:, None], cols[None, :]]


def depth_to_uint16(depth: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """16-bit depth map: nearest visible surface white (65535), farthest 1, background 0.

    Normalized over the visible depth range so the map uses its full precision whatever the
    scene's scale; ``foreground`` says which pixels hit a surface.
    """
    depth = np.asarray(depth, dtype=np.float64)
    foreground = np.asarray(foreground, dtype=bool) & np.isfinite(depth)
    out = np.zeros(depth.shape, dtype=np.uint16)
    if not foreground.any():
        return out
    visible = depth[foreground]
    near, far = visible.min(), visible.max()
    if far > near:
        scaled = 1.0 + (DEPTH_MAX - 1) * (far - visible) / (far - near)
    else:
        scaled = np.full(visible.shape, float(DEPTH_MAX))
    out[foreground] = np.rint(scaled).astype(np.uint16)
    return out
