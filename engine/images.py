"""Reading the image files a Layout names: RGB pictures, grayscale maps and region masks.

Every file is opened through :func:`open_image`, which reads the header first and refuses an
image of more than ``MAX_INPUT_PIXELS`` pixels before decoding it (a small file can declare a
huge image), and turns whatever the decoder raises into a LayoutError naming the Layout field
and saying what to do: the engine never fails with an internal error over a bad image file.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from engine.wire.layout import MAX_INPUT_PIXELS, LayoutError, LimitError, short

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I")

ASPECT_TOLERANCE = 0.02
"""How far a mask's aspect ratio may differ from the image's (sides rounded to multiples of 8
move it by up to about 1.5% at 512 px) before the mask counts as made for another frame."""


@contextlib.contextmanager
def open_image(path: str, field_name: str, what: str = "save it as a PNG") -> Iterator[Any]:
    """A PIL image of ``path`` with its size checked, for reading inside the block.

    Raises LayoutError naming ``field_name`` when the file is missing or cannot be decoded
    (``what`` says how to fix it), LimitError when it has more than ``MAX_INPUT_PIXELS``.
    """
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # The size is checked below against our own, lower limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except FileNotFoundError:
        raise LayoutError(
            f"'{field_name}' {short(path)} does not exist; write the image first or fix the path",
            field_name,
        ) from None
    except Image.DecompressionBombError as exc:
        raise _too_many_pixels(path, field_name, str(exc)) from None
    except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, ...
        raise _unreadable(path, field_name, exc, what) from None
    with image:
        width, height = image.size
        if width * height > MAX_INPUT_PIXELS:
            raise _too_many_pixels(path, field_name, f"{width}x{height}")
        try:
            yield image
        except LayoutError:
            raise
        except Image.DecompressionBombError as exc:
            raise _too_many_pixels(path, field_name, str(exc)) from None
        except Exception as exc:  # truncated data, bad chunks, oversized text chunks
            raise _unreadable(path, field_name, exc, what) from None


def _too_many_pixels(path: str, field_name: str, detail: str) -> LimitError:
    return LimitError(
        f"'{field_name}' {short(path)} is too large ({detail}); images a Layout names may have "
        f"at most {MAX_INPUT_PIXELS} pixels: save it at the image's own size",
        field_name,
        "input_pixels",
        MAX_INPUT_PIXELS,
    )


def _unreadable(path: str, field_name: str, exc: BaseException, what: str) -> LayoutError:
    detail = short(str(exc) or type(exc).__name__, 160)
    return LayoutError(
        f"'{field_name}' {short(path)} is not a readable image ({detail}); {what}", field_name
    )


def image_size(path: str, field_name: str) -> tuple[int, int]:
    """``(width, height)`` from the file's header, with :func:`open_image`'s checks."""
    with open_image(path, field_name) as image:
        return image.size


def load_rgb(path: str, field_name: str) -> Any:
    """An image file as an RGB PIL image; LayoutError naming ``field_name`` if unreadable."""
    with open_image(path, field_name) as image:
        return image.convert("RGB")


def grayscale(image: Any) -> np.ndarray:
    """A PIL image as float32 gray in 0..1, keeping 16-bit precision where the file has it."""
    if image.mode in _SIXTEEN_BIT:
        return np.asarray(image, dtype=np.float32) / 65535.0
    if image.mode == "F":
        return np.asarray(image, dtype=np.float32)
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def mask_values(image: Any) -> np.ndarray:
    """A mask image as float32 in 0..1: its alpha when the alpha varies (a region painted on a
    transparent background, whatever its colour), else its gray values (white = region)."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        alpha = np.asarray(image.convert("RGBA").getchannel("A"), dtype=np.float32) / 255.0
        if alpha.size and alpha.min() != alpha.max():
            return alpha
    return grayscale(image)


def check_aspect(size: tuple[int, int], target: tuple[int, int], field_name: str) -> None:
    """Refuse an image ``size`` ``(width, height)`` whose aspect ratio differs from the
    target's by more than ``ASPECT_TOLERANCE``: stretching it would misplace the region."""
    (width, height), (target_w, target_h) = size, target
    ratio, target_ratio = width / height, target_w / target_h
    if abs(ratio / target_ratio - 1.0) > ASPECT_TOLERANCE:
        raise LayoutError(
            f"'{field_name}' is {width}x{height} but the image is {target_w}x{target_h}: its "
            "aspect ratio differs, so it was made for another frame or camera. Render the mask "
            f"again at {target_w}x{target_h} (or any size with that aspect ratio)",
            field_name,
        )


def read_mask(path: str, field_name: str, image_size: tuple[int, int]) -> np.ndarray:
    """A region mask as float32 ``(height, width)`` in 0..1 at ``image_size`` ``(height,
    width)``: checked (:func:`open_image`, :func:`check_aspect`), read by :func:`mask_values`
    and resized bilinearly when its size differs."""
    from PIL import Image

    height, width = image_size
    what = "save the mask as a grayscale PNG (white = region) or with alpha (opaque = region)"
    with open_image(path, field_name, what) as image:
        check_aspect(image.size, (width, height), field_name)
        values = mask_values(image)
    if values.shape != (height, width):
        resized = Image.fromarray(values).resize((width, height), Image.Resampling.BILINEAR)
        values = np.asarray(resized, dtype=np.float32)
    return np.clip(values, 0.0, 1.0)
