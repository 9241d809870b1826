"""A scene's generated results and the files a request leaves behind. No bpy.

Every result Generate or Re-generate Object brings back is kept as ``history/result_NNNN.png``
in the scene's output folder, numbered in order; the engine's PNG carries its own provenance
(the Layout, seed, model and sampler in the ``layout-diffusion`` chunk), so each entry says how
it was made. Only the newest ``keep`` entries stay.

A request's intermediate files (masks, depth map, proxy render, init and reference images, the
copy of the previous result) are only needed while the engine works: they are removed once the
result is in, and at the start of the next request, so files of objects no longer labeled never
linger beside the new ones.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shutil
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from ..wire.files import atomic_open
from .png import PNG_SIGNATURE, png_size

HISTORY_DIR = "history"
"""The history's folder inside a scene's output folder."""
DEFAULT_KEEP = 10
"""Results the history keeps unless the scene says otherwise."""
PROVENANCE_KEY = "layout-diffusion"
"""The engine's PNG text chunk holding its provenance JSON (see engine/service/provenance.py)."""

INTERMEDIATE_PATTERNS = (
    "mask_*.png",
    "image_*.png",
    "depth.png",
    "reference.png",
    "init.png",
    "previous.png",
)
"""The files a request writes beside its Layout that no result needs afterwards."""

_ENTRY = re.compile(r"^result_(\d+)\.png$")


@dataclass(frozen=True)
class Entry:
    """One kept result."""

    number: int
    path: str
    seed: int | None
    prompt: str
    size: tuple[int, int] | None

    @property
    def label(self) -> str:
        """A short line for a list: number, seed and the start of the prompt."""
        seed = f"seed {self.seed}" if self.seed is not None else "no provenance"
        prompt = self.prompt if len(self.prompt) <= 40 else self.prompt[:39] + "\u2026"
        return f"#{self.number}  {seed}  {prompt}".rstrip()


def history_dir(folder: str) -> str:
    """The history folder of a scene's output ``folder``."""
    return os.path.join(folder, HISTORY_DIR)


def clean_intermediates(folder: str) -> list[str]:
    """Remove the intermediate files of the last request from ``folder``; the removed paths.

    The result, the Layout JSON and the history are kept.
    """
    removed = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return removed
    for name in sorted(names):
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in INTERMEDIATE_PATTERNS):
            continue
        path = os.path.join(folder, name)
        try:
            if os.path.isfile(path):
                os.remove(path)
                removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def _numbers(directory: str) -> list[tuple[int, str]]:
    """(number, path) of the history's entries, oldest first."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        match = _ENTRY.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(directory, name)))
    return sorted(found)


def record(folder: str, result: str, keep: int = DEFAULT_KEEP) -> str:
    """Copy the result at ``result`` into the history of ``folder`` as its newest entry and
    drop entries beyond the newest ``keep``; the entry's path.

    The copy is written atomically: an entry with a final name is always a whole PNG.
    """
    directory = history_dir(folder)
    os.makedirs(directory, exist_ok=True)
    existing = _numbers(directory)
    number = existing[-1][0] + 1 if existing else 1
    path = os.path.join(directory, f"result_{number:04d}.png")
    with open(result, "rb") as source, atomic_open(path, "wb") as target:
        shutil.copyfileobj(source, target)
    prune(folder, keep)
    return path


def prune(folder: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` (at least 1) history entries; the deleted paths."""
    entries = _numbers(history_dir(folder))
    doomed = [path for _, path in entries[: max(0, len(entries) - max(1, keep))]]
    for path in doomed:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    return doomed


def read_provenance(path: str) -> dict[str, Any] | None:
    """The engine's provenance record of a PNG (``layout-diffusion`` chunk), None without one.

    Reads the chunks with the standard library alone (Blender's Python has no PIL).
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    if not data.startswith(PNG_SIGNATURE):
        return None
    offset = len(PNG_SIGNATURE)
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        body = data[offset + 8 : offset + 8 + length]
        offset += 12 + length
        if kind == b"IEND":
            break
        text = _text_chunk(kind, body)
        if text is not None and text[0] == PROVENANCE_KEY:
            try:
                record = json.loads(text[1])
            except ValueError:
                return None
            return record if isinstance(record, dict) else None
    return None


def _text_chunk(kind: bytes, body: bytes) -> tuple[str, str] | None:
    """(keyword, text) of a tEXt, zTXt or iTXt chunk, else None."""
    keyword, _, rest = body.partition(b"\0")
    try:
        if kind == b"tEXt":
            return keyword.decode("latin-1"), rest.decode("latin-1")
        if kind == b"zTXt":
            return keyword.decode("latin-1"), zlib.decompress(rest[1:]).decode("latin-1")
        if kind == b"iTXt":
            compressed = rest[:1] == b"\1"
            _language, _, rest = rest[2:].partition(b"\0")
            _translated, _, text = rest.partition(b"\0")
            if compressed:
                text = zlib.decompress(text)
            return keyword.decode("latin-1"), text.decode("utf-8")
    except (UnicodeDecodeError, zlib.error):
        return None
    return None


_cache: dict[str, tuple[tuple[int, int], Entry]] = {}


def entries(folder: str) -> list[Entry]:
    """The history of ``folder``, newest first, each with its seed and prompt from its
    provenance (read once per file version)."""
    found = []
    for number, path in reversed(_numbers(history_dir(folder))):
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            continue
        version = (stat.st_mtime_ns, stat.st_size)
        cached = _cache.get(path)
        if cached is None or cached[0] != version:
            layout = (read_provenance(path) or {}).get("layout") or {}
            seed = layout.get("seed")
            entry = Entry(
                number=number,
                path=path,
                seed=seed if isinstance(seed, int) else None,
                prompt=str(layout.get("prompt") or ""),
                size=png_size(path),
            )
            cached = _cache[path] = (version, entry)
        found.append(cached[1])
    return found


def find(folder: str, number: int) -> Entry | None:
    """The history entry ``number`` of ``folder``, None when it is gone."""
    return next((entry for entry in entries(folder) if entry.number == number), None)


def restore(entry: Entry, result: str) -> None:
    """Make ``entry`` the current result again: copied atomically onto ``result``."""
    with open(entry.path, "rb") as source, atomic_open(result, "wb") as target:
        shutil.copyfileobj(source, target)
