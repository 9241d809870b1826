"""Blender images as PNG files the engine can read (reference images, init images).

Blender's Python has no PIL, so an image datablock is written by one of two routes: an
unmodified PNG on disk is copied byte for byte (exact, and instant), anything else (a JPEG or
EXR, a packed, generated or painted image) goes through its pixels and the add-on's own PNG
writer. Blender keeps byte images' pixels in their file's colour encoding and float images'
pixels in scene-linear; the latter are encoded to sRGB. Alpha is dropped.
"""

from __future__ import annotations

import os
import shutil
import struct

import bpy
import numpy as np

from .io.png import PNG_SIGNATURE, write_rgb_png


class ImageExportError(ValueError):
    """An image that cannot be written; the message says which and what to do."""


def png_size(path: str) -> tuple[int, int] | None:
    """(width, height) from a PNG file's header, or None if it is not a readable PNG."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(24)
    except OSError:
        return None
    if len(head) < 24 or not head.startswith(PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return int(width), int(height)


def _file_path(image) -> str | None:
    """The image's own file if writing it would be a plain copy: an unmodified, unpacked PNG."""
    if image.source != "FILE" or image.packed_file is not None or image.is_dirty:
        return None
    path = bpy.path.abspath(image.filepath, library=image.library)
    if not path.lower().endswith(".png") or not os.path.isfile(path):
        return None
    return path if png_size(path) is not None else None


def rgb8_pixels(image) -> np.ndarray:
    """The image as an (H, W, 3) uint8 sRGB array, row 0 at the top."""
    return np.ascontiguousarray(rgba8_pixels(image)[:, :, :3])


def rgba8_pixels(image) -> np.ndarray:
    """The image as (H, W, 4) uint8: sRGB colour and straight alpha, row 0 at the top; opaque
    when the image's alpha mode is None."""
    # Asking for the size loads a file image; a missing file leaves it 0 x 0.
    width, height = image.size
    if not width or not height:
        where = f" (file {bpy.path.abspath(image.filepath)})" if image.filepath else ""
        raise ImageExportError(
            f"Image {image.name!r} has no pixels{where}: its file may be missing; open or "
            "repack it in the Image Editor, or choose another image"
        )
    pixels = np.empty(width * height * 4, dtype=np.float32)
    image.pixels.foreach_get(pixels)
    rgba = pixels.reshape(height, width, 4)[::-1]
    rgb = rgba[:, :, :3]
    if image.is_float:
        rgb = np.clip(rgb, 0.0, 1.0)
        rgb = np.where(rgb <= 0.0031308, rgb * 12.92, 1.055 * np.power(rgb, 1 / 2.4) - 0.055)
    alpha = rgba[:, :, 3:] if image.alpha_mode != "NONE" else np.ones_like(rgba[:, :, 3:])
    out = np.concatenate([rgb, alpha], axis=2)
    return np.rint(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)


def save_png(image, path: str) -> str:
    """Write ``image`` (a ``bpy.types.Image``) to ``path`` as an RGB PNG; returns ``path``.

    Raises ImageExportError when the image has no pixels.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    source = _file_path(image)
    if source is not None:
        if os.path.abspath(source) != os.path.abspath(path):
            shutil.copyfile(source, path)
        return path
    write_rgb_png(path, rgb8_pixels(image))
    return path
