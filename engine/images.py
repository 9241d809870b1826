"""Reading the image files a Layout names: RGB pictures and grayscale maps.

Errors are LayoutErrors naming the Layout field, saying what to do.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.wire.layout import LayoutError

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I")


def load_rgb(path: str, field_name: str) -> Any:
    """An image file as an RGB PIL image; LayoutError naming ``field_name`` if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise LayoutError(
            f"'{field_name}' {path!r} does not exist; write the image first or fix the path",
            field_name,
        ) from None
    except (OSError, UnidentifiedImageError) as exc:
        raise LayoutError(
            f"'{field_name}' {path!r} is not a readable image ({exc}); save it as a PNG",
            field_name,
        ) from None


def grayscale(image: Any) -> np.ndarray:
    """A PIL image as float32 gray in 0..1, keeping 16-bit precision where the file has it."""
    if image.mode in _SIXTEEN_BIT:
        return np.asarray(image, dtype=np.float32) / 65535.0
    if image.mode == "F":
        return np.asarray(image, dtype=np.float32)
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
