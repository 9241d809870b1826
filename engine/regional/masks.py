"""Region masks rasterized at the latent resolution, and the one blur that softens them.

A region's mask is its mask image when it has one, else its box. Mask images are read with PIL
(``engine.images.read_mask``: gray values, or the alpha channel when it carries the region; a
mask of another aspect ratio or over the pixel limit is refused) in 0..1, resized to the image
size and area-averaged down to the latent grid; the result is cached per file path and
modification time, so an unchanged mask file is read once (up to ``MASK_CACHE_BYTES`` of decoded
masks, least recently used dropped first).
"""

from __future__ import annotations

import collections
import functools
import math
import os
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from engine.images import read_mask
from engine.wire.layout import LayoutError, Region


def box_coverage(box: tuple[float, float, float, float], height: int, width: int) -> torch.Tensor:
    """The fraction of each cell of a ``height`` x ``width`` grid that ``box`` covers.

    Exact area coverage rather than a hard edge, so a box smaller than a cell still shows up as
    a small positive value instead of vanishing or snapping to a whole cell.
    """
    x0, y0, x1, y1 = box
    return torch.outer(_interval_coverage(y0, y1, height), _interval_coverage(x0, x1, width))


def _interval_coverage(lo: float, hi: float, cells: int) -> torch.Tensor:
    edges = torch.arange(cells, dtype=torch.float64)
    covered = torch.minimum(edges + 1, torch.tensor(hi * cells)) - torch.maximum(
        edges, torch.tensor(lo * cells)
    )
    return covered.clamp(0.0, 1.0).to(torch.float32)


def region_mask(
    region: Region, index: int, image_size: tuple[int, int], latent_size: tuple[int, int]
) -> torch.Tensor:
    """A region's mask, float32 in 0..1, at the latent size ``(height, width)``.

    ``image_size`` is ``(height, width)`` in pixels; ``index`` names the region in errors.
    """
    if region.mask is None:
        return box_coverage(region.box, *latent_size)
    where = f"regions[{index}].mask"
    try:
        stat = os.stat(region.mask)
    except OSError as exc:
        raise LayoutError(
            f"{where}: cannot read mask image {region.mask!r}: {exc.strerror or exc}; "
            "write the mask file again or remove 'mask' to use the box",
            where,
        ) from None
    try:
        return _load_mask(region.mask, stat.st_mtime_ns, stat.st_size, image_size, latent_size)
    except LayoutError as exc:  # unreadable, too large or of another aspect ratio
        raise exc.for_field(where) from None


MASK_CACHE_BYTES = 256 * 2**20
"""Decoded masks kept between calls, by their bytes: 64 KiB each at 1024x1024 (latent
128x128), so a scene of 1000 masked objects is read once and hits on the next request, also
at 2048x2048 (256 KiB each)."""


class _ByteBoundedCache:
    """A function's least recently used results, kept while their tensors fit ``max_bytes``."""

    def __init__(self, function: Callable[..., torch.Tensor], max_bytes: int):
        functools.update_wrapper(self, function)
        self._function = function
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[tuple, torch.Tensor] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __call__(self, *args: Any) -> torch.Tensor:
        with self._lock:
            found = self._entries.get(args)
            if found is not None:
                self._entries.move_to_end(args)
                self.hits += 1
                return found
        value = self._function(*args)
        size = value.numel() * value.element_size()
        with self._lock:
            self.misses += 1
            if args not in self._entries and size <= self.max_bytes:
                self._entries[args] = value
                self._bytes += size
                while self._bytes > self.max_bytes:
                    _, dropped = self._entries.popitem(last=False)
                    self._bytes -= dropped.numel() * dropped.element_size()
        return value

    def cache_info(self) -> dict[str, int]:
        """Hits, misses, entries and bytes held."""
        with self._lock:
            return {
                "hits": self.hits,
                "misses": self.misses,
                "entries": len(self._entries),
                "bytes": self._bytes,
            }

    def cache_clear(self) -> None:
        """Forget every kept result."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self.hits = self.misses = 0


def _byte_bounded_cache(max_bytes: int) -> Callable[[Callable[..., torch.Tensor]], Any]:
    return lambda function: _ByteBoundedCache(function, max_bytes)


@_byte_bounded_cache(MASK_CACHE_BYTES)
def _load_mask(
    path: str,
    mtime_ns: int,
    file_size: int,
    image_size: tuple[int, int],
    latent_size: tuple[int, int],
) -> torch.Tensor:
    # mtime_ns and file_size are part of the cache key only: a rewritten file reloads.
    mask = torch.from_numpy(read_mask(path, "mask", image_size))
    # Shared through the cache: callers must treat it as read-only.
    return F.adaptive_avg_pool2d(mask[None, None], latent_size)[0, 0]


def blur(mask: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """A ``(H, W)`` mask blurred by a Gaussian of ``sigma`` pixels (edges extended)."""
    if sigma <= 0:
        return mask
    radius = max(1, math.ceil(2 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    blurred = F.pad(mask[None, None], (radius, radius, radius, radius), mode="replicate")
    blurred = F.conv2d(blurred, kernel.view(1, 1, 1, -1))
    blurred = F.conv2d(blurred, kernel.view(1, 1, -1, 1))
    return blurred[0, 0].clamp(0.0, 1.0)
