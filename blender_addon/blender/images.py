"""Images between Blender and files: Blender images as PNG files the engine can read
(reference images, init images), and image files read through Blender's OpenImageIO (the
engine's generated PNGs, whatever their PNG filters).

Blender's Python has no PIL, so an image datablock is written by one of two routes: an
unmodified PNG on disk is copied byte for byte (exact, and instant), anything else (a JPEG or
EXR, a packed, generated or painted image) goes through its pixels and the add-on's own PNG
writer. Blender keeps byte images' pixels in their file's colour encoding and float images'
pixels in scene-linear; the latter are encoded to sRGB. Alpha is dropped.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

import bpy
import numpy as np

from ..core.errors import UserError
from ..core.png import png_size, write_rgb_png
from . import main_thread


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
        raise UserError(
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

    Raises UserError when the image has no pixels.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    source = _file_path(image)
    if source is not None:
        if os.path.abspath(source) != os.path.abspath(path):
            shutil.copyfile(source, path)
        return path
    write_rgb_png(path, rgb8_pixels(image))
    return path


def import_oiio():
    """Blender's OpenImageIO module (bundled with Blender, outside the ``bpy`` wheel's path).

    Raises ImportError where this Blender build has none (the ``bpy`` 4.2 wheel).
    """
    try:
        import OpenImageIO
    except ImportError:
        # Blender's bundled Python modules live outside the default path of the `bpy` module.
        site = os.path.join(bpy.utils.resource_path("LOCAL"), "python", "lib")
        for candidate in glob.glob(os.path.join(site, "python3*", "site-packages")):
            if candidate not in sys.path:
                sys.path.append(candidate)
        import OpenImageIO
    return OpenImageIO


def read_image_rgb(path: str) -> np.ndarray:
    """An 8-bit image file (the engine's PNG) as (H, W, 3) float32 in [0, 1], row 0 at the top.

    Read with OpenImageIO where Blender bundles it (any thread); else through a temporary image
    datablock, which only the main thread may create (a render thread waits for it there).
    """
    try:
        oiio = import_oiio()
    except ImportError:
        return _read_through_datablock(path)
    image = oiio.ImageInput.open(path)
    if image is None:
        raise RuntimeError(f"cannot read the generated image {path}: {oiio.geterror()}")
    try:
        spec = image.spec()
        pixels = np.asarray(image.read_image(oiio.FLOAT), dtype=np.float32)
    finally:
        image.close()
    pixels = pixels.reshape(spec.height, spec.width, spec.nchannels)
    if spec.nchannels == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    return pixels[:, :, :3]


def _read_through_datablock(path: str) -> np.ndarray:
    # Only the main thread may create a datablock: a render thread hands the read over to it.
    return main_thread.call(lambda: _read_on_main(path))


def _read_on_main(path: str) -> np.ndarray:
    image = bpy.data.images.load(path, check_existing=False)
    try:
        width, height = image.size
        if not width or not height:
            raise RuntimeError(f"cannot read the generated image {path}")
        # Byte images keep their file's values: no colour conversion happens here.
        pixels = np.empty(width * height * image.channels, dtype=np.float32)
        image.pixels.foreach_get(pixels)
    finally:
        bpy.data.images.remove(image)
    rgba = pixels.reshape(height, width, -1)[::-1]
    if rgba.shape[2] < 3:
        rgba = np.repeat(rgba[:, :, :1], 3, axis=2)
    return np.ascontiguousarray(rgba[:, :, :3])
