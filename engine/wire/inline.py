"""Files carried inside protocol lines (protocol 2): base64 with their size and SHA-256.

Standard library only: the engine decodes a generate's ``files`` and encodes its result PNG with
these; the add-on's client encodes the files and checks the result with the same functions.
An entry is ``{"data": "<base64>", "bytes": <size>, "sha256": "<hex digest>"}``; a generate's
``files`` entries also carry ``path``, the string the Layout names the file by.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from typing import Any

from .layout import IMAGE_FIELDS, REGION_IMAGE_FIELDS

_HEX64 = re.compile(r"[0-9a-f]{64}")


class InlineFileError(ValueError):
    """An inline file that cannot be used. ``field`` names the entry's field at fault; ``limit``
    and ``maximum`` are set when a size limit was exceeded."""

    def __init__(
        self,
        message: str,
        field: str | None = None,
        limit: str | None = None,
        maximum: int | None = None,
    ):
        super().__init__(message)
        self.field = field
        self.limit = limit
        self.maximum = maximum


def encode_file(data: bytes) -> dict[str, Any]:
    """An inline entry for ``data``: base64 text, byte size and SHA-256."""
    return {
        "data": base64.b64encode(data).decode("ascii"),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def decode_file(entry: Any, max_bytes: int, where: str = "file") -> bytes:
    """The bytes of inline entry ``entry``, checked against its size, its SHA-256 and
    ``max_bytes``. Raises InlineFileError saying which field is wrong and what to do."""
    if not isinstance(entry, dict):
        raise InlineFileError(f"{where} must be an object with 'data', 'bytes' and 'sha256'", where)
    size, digest, text = entry.get("bytes"), entry.get("sha256"), entry.get("data")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InlineFileError(f"{where}.bytes must be the file's size in bytes", f"{where}.bytes")
    if size > max_bytes:
        raise InlineFileError(
            f"{where} is {size} bytes; files sent inline may be at most {max_bytes} bytes. "
            "Make the image smaller (a lower resolution, or 8-bit depth), or run the engine "
            "where it can read the file",
            f"{where}.bytes",
            "inline_file_bytes",
            max_bytes,
        )
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        raise InlineFileError(
            f"{where}.sha256 must be the file's SHA-256 as 64 lowercase hex digits",
            f"{where}.sha256",
        )
    if not isinstance(text, str) or len(text) > 4 * (max_bytes // 3 + 1):
        raise InlineFileError(
            f"{where}.data must be the file's bytes as base64 text", f"{where}.data"
        )
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise InlineFileError(
            f"{where}.data is not valid base64; send the file's bytes base64-encoded",
            f"{where}.data",
        ) from None
    if len(data) != size:
        raise InlineFileError(
            f"{where} decodes to {len(data)} bytes, not the {size} its 'bytes' says; it was cut "
            "or changed on the way: send it again",
            f"{where}.data",
        )
    if hashlib.sha256(data).hexdigest() != digest:
        raise InlineFileError(
            f"{where}'s SHA-256 does not match its data; it was changed on the way: send it again",
            f"{where}.sha256",
        )
    return data


def image_holders(layout: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """Every ``(object, key)`` of a Layout dict that may name an image file, in a fixed order:
    the Layout's image fields, then each region's."""
    holders = [(layout, key) for key in IMAGE_FIELDS]
    regions = layout.get("regions")
    if isinstance(regions, list):
        for region in regions:
            if isinstance(region, dict):
                holders += [(region, key) for key in REGION_IMAGE_FIELDS]
    return holders


def named_files(layout: dict[str, Any]) -> list[str]:
    """The image paths a Layout dict names, each once, in order."""
    seen: dict[str, None] = {}
    for holder, key in image_holders(layout):
        value = holder.get(key)
        if isinstance(value, str) and value:
            seen.setdefault(value, None)
    return list(seen)
