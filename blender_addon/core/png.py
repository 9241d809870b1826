"""PNG files with numpy and the standard library (Blender's Python has no PIL).

Writes 8-bit masks, 16-bit depth maps and 8-bit RGB reference renders: one IHDR, one IDAT, IEND,
filter type 0 on every row. Masks and flat-colour renders are mostly flat, so a fast zlib level
already compresses them to a few kilobytes.
"""

from __future__ import annotations

import functools
import os
import struct
import zlib

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """(width, height) from a PNG file's header without decoding it; None when the file is
    missing or not a PNG."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(24)
    except OSError:
        return None
    if len(head) < 24 or not head.startswith(PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return int(width), int(height)


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(kind)) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


_ADLER_MOD = 65521
_ZERO_BLOCK = 1 << 16


@functools.lru_cache(maxsize=1)
def _deflated_zeros() -> bytes:
    """A self-contained raw deflate segment for ``_ZERO_BLOCK`` zero bytes (ends byte-aligned).

    Computed once, so it uses the best compression (83 bytes instead of 305 at level 1).
    """
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    return packer.compress(bytes(_ZERO_BLOCK)) + packer.flush(zlib.Z_FULL_FLUSH)


def _deflate_segment(data: bytes, level: int, final: bool) -> bytes:
    packer = zlib.compressobj(level, zlib.DEFLATED, -15)
    return packer.compress(data) + packer.flush(zlib.Z_FINISH if final else zlib.Z_FULL_FLUSH)


def _deflate_zero_run(count: int, level: int, final: bool) -> bytes:
    blocks, rest = divmod(count, _ZERO_BLOCK)
    return _deflated_zeros() * blocks + _deflate_segment(bytes(rest), level, final)


def _zlib_stream(zeros_before: int, band: bytes, zeros_after: int, level: int) -> bytes:
    """zlib data for ``zeros_before`` zero bytes, ``band``, then ``zeros_after`` zero bytes.

    Masks are mostly zero rows. Deflating them costs time for nothing, so the zero runs are
    made of one cached, self-contained compressed block repeated; segments flushed with
    Z_FULL_FLUSH hold no back-references, so concatenating them is a valid deflate stream.
    """
    parts = [b"\x78\x01"]  # zlib header: deflate, 32 KiB window, fastest-level hint
    parts.append(_deflate_zero_run(zeros_before, level, final=False))
    parts.append(_deflate_segment(band, level, final=zeros_after == 0))
    if zeros_after:
        parts.append(_deflate_zero_run(zeros_after, level, final=True))
    # Adler-32 over everything; a run of n zeros leaves A alone and adds n * A to B.
    a, b = 1, zeros_before % _ADLER_MOD
    checksum = zlib.adler32(band, (b << 16) | a)
    a, b = checksum & 0xFFFF, checksum >> 16
    b = (b + zeros_after * a) % _ADLER_MOD
    parts.append(struct.pack(">I", (b << 16) | a))
    return b"".join(parts)


def encode_gray_png(image: np.ndarray, level: int = 1) -> bytes:
    """Encode a (H, W) uint8 or uint16 array as a grayscale PNG (row 0 at the top).

    Only the band of rows holding nonzero pixels is compressed; the zero rows around it cost
    next to nothing (see :func:`_zlib_stream`).
    """
    image = np.asarray(image)
    if image.ndim != 2 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"a grayscale PNG needs a non-empty (H, W) array, got shape {image.shape}")
    if image.dtype == np.uint8:
        bit_depth, rows = 8, image
    elif image.dtype == np.uint16:
        bit_depth, rows = 16, image.astype(">u2")  # PNG stores 16-bit samples big-endian
    else:
        raise ValueError(f"grayscale PNG pixels must be uint8 or uint16, got {image.dtype}")
    height, width = image.shape
    raw = rows.view(np.uint8).reshape(height, -1)
    used = np.flatnonzero(raw.any(axis=1))
    first, last = (int(used[0]), int(used[-1]) + 1) if len(used) else (0, 0)
    band = np.zeros((last - first, raw.shape[1] + 1), dtype=np.uint8)  # column 0: filter "none"
    band[:, 1:] = raw[first:last]
    row_bytes = raw.shape[1] + 1
    data = _zlib_stream(first * row_bytes, band.tobytes(), (height - last) * row_bytes, level)
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return b"".join(
        [
            PNG_SIGNATURE,
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", data),
            _chunk(b"IEND", b""),
        ]
    )


def write_gray_png(path: str | os.PathLike[str], image: np.ndarray, level: int = 1) -> None:
    """Write a (H, W) uint8 or uint16 array as a grayscale PNG file."""
    data = encode_gray_png(image, level)
    with open(path, "wb") as handle:
        handle.write(data)


def encode_rgb_png(image: np.ndarray, level: int = 1) -> bytes:
    """Encode an (H, W, 3) uint8 array as an 8-bit RGB PNG (row 0 at the top)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or not image.size:
        raise ValueError(
            f"an RGB PNG needs a non-empty (H, W, 3) uint8 array, got {image.dtype} {image.shape}"
        )
    height, width, _ = image.shape
    rows = np.zeros((height, width * 3 + 1), dtype=np.uint8)  # column 0: filter "none"
    rows[:, 1:] = image.reshape(height, -1)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"".join(
        [
            PNG_SIGNATURE,
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", zlib.compress(rows.tobytes(), level)),
            _chunk(b"IEND", b""),
        ]
    )


def write_rgb_png(path: str | os.PathLike[str], image: np.ndarray, level: int = 1) -> None:
    """Write an (H, W, 3) uint8 array as an 8-bit RGB PNG file."""
    data = encode_rgb_png(image, level)
    with open(path, "wb") as handle:
        handle.write(data)


def _read_png(
    path: str | os.PathLike[str], color_type: int, depths: tuple[int, ...], what: str
) -> tuple[int, np.ndarray]:
    """Bit depth and pixel rows ``(H, W * channels * bytes)`` of an unfiltered, non-interlaced
    PNG of ``color_type`` (0 gray, 2 RGB); anything else is rejected as ``what`` expected."""
    with open(path, "rb") as handle:
        data = handle.read()
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError(f"{path} is not a PNG file")
    pos, idat, header = len(PNG_SIGNATURE), [], None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
    if header is None:
        raise ValueError(f"{path} has no IHDR chunk")
    width, height, bit_depth, found, _, _, interlace = header
    if found != color_type or bit_depth not in depths or interlace:
        raise ValueError(f"{path}: only non-interlaced {what} PNGs are supported")
    channels = 3 if color_type == 2 else 1
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8)
    raw = raw.reshape(height, width * channels * bit_depth // 8 + 1)
    if np.any(raw[:, 0] != 0):
        raise ValueError(f"{path} uses PNG row filters this reader does not decode")
    return bit_depth, raw[:, 1:]


def read_gray_png(path: str | os.PathLike[str]) -> np.ndarray:
    """Read back a grayscale PNG written by :func:`write_gray_png` (filter type 0 only).

    Used by tests and tools to check files without PIL; it rejects what it cannot decode.
    """
    bit_depth, rows = _read_png(path, 0, (8, 16), "8/16-bit grayscale")
    if bit_depth == 16:
        return rows.copy().view(">u2").astype(np.uint16)
    return rows.copy()


def read_rgb_png(path: str | os.PathLike[str]) -> np.ndarray:
    """Read back an 8-bit RGB PNG written by :func:`write_rgb_png` (the proxy render) as
    ``(H, W, 3)`` uint8 (filter type 0 only)."""
    _, rows = _read_png(path, 2, (8,), "8-bit RGB")
    return rows.reshape(rows.shape[0], -1, 3).copy()
