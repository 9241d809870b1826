"""Uncompressed OpenEXR files read with numpy: the id render's passes on every Blender version.

Blender 4.x writes a multilayer EXR as one part with every pass's channels, Blender 5 as one
part per pass; OpenImageIO, which reads both, is not bundled with every ``bpy`` build (the 4.2
wheel has none). The add-on writes its own EXRs without compression, so this reader handles
scanline files with compression NONE, single- or multi-part, in half, float or uint pixels,
and refuses anything else with a message saying so.
"""

from __future__ import annotations

import os
import struct

import numpy as np

MAGIC = 20000630
_TILED, _DEEP, _MULTIPART = 0x200, 0x800, 0x1000
_PIXEL_TYPES = {0: np.dtype("<u4"), 1: np.dtype("<f2"), 2: np.dtype("<f4")}


class ExrError(ValueError):
    """The file is not an EXR this reader can decode."""


def _cstring(data: bytes, pos: int) -> tuple[str, int]:
    end = data.index(b"\0", pos)
    return data[pos:end].decode("utf-8", "replace"), end + 1


def _header(data: bytes, pos: int) -> tuple[dict, int]:
    """One header's attributes as raw bytes, and the position after its terminating zero."""
    attributes: dict[str, tuple[str, bytes]] = {}
    while data[pos] != 0:
        name, pos = _cstring(data, pos)
        kind, pos = _cstring(data, pos)
        (size,) = struct.unpack_from("<i", data, pos)
        pos += 4
        attributes[name] = (kind, data[pos : pos + size])
        pos += size
    return attributes, pos + 1


def _channels(raw: bytes) -> list[tuple[str, np.dtype]]:
    channels, pos = [], 0
    while raw[pos] != 0:
        name, pos = _cstring(raw, pos)
        pixel_type, _, x_sampling, y_sampling = struct.unpack_from("<iI ii", raw, pos)
        pos += 16
        if pixel_type not in _PIXEL_TYPES or (x_sampling, y_sampling) != (1, 1):
            raise ExrError(f"channel {name!r} has an unsupported pixel type or sampling")
        channels.append((name, _PIXEL_TYPES[pixel_type]))
    return channels


def read_exr(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every channel of an uncompressed scanline EXR as (H, W) float32, row 0 at the top.

    Channel names are as stored (Blender: ``ViewLayer.Depth.Z``); a part whose channels do not
    start with its name gets it prefixed. Raises ExrError for files this reader cannot decode.
    """
    with open(path, "rb") as handle:
        data = handle.read()
    if len(data) < 8:
        raise ExrError(f"{path} is not an OpenEXR file")
    magic, version = struct.unpack_from("<ii", data, 0)
    if magic != MAGIC:
        raise ExrError(f"{path} is not an OpenEXR file")
    if version & (_TILED | _DEEP):
        raise ExrError(f"{path} is tiled or deep; only scanline EXRs are read")
    multipart = bool(version & _MULTIPART)
    pos, headers = 8, []
    while True:
        header, pos = _header(data, pos)
        headers.append(header)
        if not multipart or data[pos] == 0:
            pos += 1 if multipart else 0
            break

    parts = []
    for header in headers:
        if header.get("compression", ("", b"\0"))[1][0] != 0:
            raise ExrError(f"{path} is compressed; write it with EXR codec None")
        x0, y0, x1, y1 = struct.unpack("<4i", header["dataWindow"][1])
        width, height = x1 - x0 + 1, y1 - y0 + 1
        if "chunkCount" in header:
            (count,) = struct.unpack("<i", header["chunkCount"][1])
        else:
            count = height  # uncompressed: one scanline per chunk
        part_name = header.get("name", ("", b""))[1].decode("utf-8", "replace")
        channels = _channels(header["channels"][1])
        parts.append((channels, width, height, y0, count, part_name))

    offsets = []
    for *_, count, _ in parts:
        offsets.append(np.frombuffer(data, "<u8", count, pos))
        pos += 8 * count

    out: dict[str, np.ndarray] = {}
    for index, (channels, width, height, y0, _, part_name) in enumerate(parts):
        images = [np.zeros((height, width), np.float32) for _ in channels]
        line_bytes = sum(width * dtype.itemsize for _, dtype in channels)
        for offset in offsets[index]:
            at = int(offset) + (4 if multipart else 0)
            y, size = struct.unpack_from("<ii", data, at)
            if size != line_bytes:
                raise ExrError(f"{path} has {size}-byte scanlines, expected {line_bytes}")
            at += 8
            row = y - y0
            for image, (_, dtype) in zip(images, channels, strict=True):
                image[row] = np.frombuffer(data, dtype, width, at)
                at += width * dtype.itemsize
        for image, (name, _) in zip(images, channels, strict=True):
            if part_name and not name.startswith(part_name + "."):
                name = f"{part_name}.{name}"
            out[name] = image
    return out


def exr_channels(
    path: str | os.PathLike[str], wanted: tuple[tuple[str, ...], ...]
) -> list[np.ndarray]:
    """The channels whose names end with one of each entry's endings, in ``wanted``'s order.

    Blender names a pass differently across versions (``ViewLayer.Object Index.X`` in 5.x,
    ``ViewLayer.IndexOB.X`` before). Raises ExrError naming the channels found when one is
    missing.
    """
    channels = read_exr(path)
    found = []
    for endings in wanted:
        match = next((image for name, image in channels.items() if name.endswith(endings)), None)
        if match is None:
            raise ExrError(f"{path} has no {endings[0].strip('.')} channel (has: {list(channels)})")
        found.append(match)
    return found
