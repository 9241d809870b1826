"""The add-on's own EXR reader on files built here byte by byte (Blender's own files are read in
the id-render and render-engine scenarios, on every supported Blender version)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from blender_addon.core.exr import ExrError, exr_channels, read_exr


def _attribute(name: str, kind: str, value: bytes) -> bytes:
    return name.encode() + b"\0" + kind.encode() + b"\0" + struct.pack("<i", len(value)) + value


def _header(channels: dict[str, np.ndarray], part: str | None, compression: int) -> bytes:
    height, width = next(iter(channels.values())).shape
    chlist = b"".join(
        name.encode() + b"\0" + struct.pack("<iIii", 2, 0, 1, 1) for name in sorted(channels)
    )
    out = _attribute("channels", "chlist", chlist + b"\0")
    out += _attribute("compression", "compression", bytes([compression]))
    out += _attribute("dataWindow", "box2i", struct.pack("<4i", 0, 0, width - 1, height - 1))
    out += _attribute("lineOrder", "lineOrder", bytes([1]))
    if part is not None:
        out += _attribute("name", "string", part.encode())
        out += _attribute("type", "string", b"scanlineimage")
        out += _attribute("chunkCount", "int", struct.pack("<i", height))
    return out + b"\0"


def write_exr(path, parts: list[tuple[str | None, dict[str, np.ndarray]]], compression=0):
    """A scanline EXR, lines stored bottom first as Blender does; several parts make it
    multi-part."""
    multipart = len(parts) > 1
    head = struct.pack("<ii", 20000630, 2 | (0x1000 if multipart else 0))
    head += b"".join(_header(channels, name, compression) for name, channels in parts)
    if multipart:
        head += b"\0"
    heights = [next(iter(c.values())).shape[0] for _, c in parts]
    pos = len(head) + 8 * sum(heights)
    tables, chunks = [], []
    for index, (_, channels) in enumerate(parts):
        table = []
        for y in reversed(range(heights[index])):
            line = b"".join(channels[n][y].astype("<f4").tobytes() for n in sorted(channels))
            chunk = (struct.pack("<i", index) if multipart else b"") + struct.pack(
                "<ii", y, len(line)
            )
            table.append((y, pos))
            chunks.append(chunk + line)
            pos += len(chunk) + len(line)
        tables.append(b"".join(struct.pack("<Q", p) for _, p in sorted(table)))
    with open(path, "wb") as handle:
        handle.write(head + b"".join(tables) + b"".join(chunks))


def test_single_part_file_reads_back_every_channel_top_row_first(tmp_path):
    ids = np.arange(12, dtype=np.float32).reshape(3, 4)
    depth = ids * 0.5 + 2
    path = tmp_path / "ids.exr"
    write_exr(path, [(None, {"ViewLayer.IndexOB.X": ids, "ViewLayer.Depth.Z": depth})])
    channels = read_exr(path)
    np.testing.assert_array_equal(channels["ViewLayer.IndexOB.X"], ids)
    np.testing.assert_array_equal(channels["ViewLayer.Depth.Z"], depth)
    index, z = exr_channels(path, ((".Object Index.X", ".IndexOB.X"), (".Depth.Z",)))
    np.testing.assert_array_equal(index, ids)
    np.testing.assert_array_equal(z, depth)


def test_multi_part_file_names_channels_by_part(tmp_path):
    ids = np.eye(3, dtype=np.float32)
    path = tmp_path / "ids.exr"
    write_exr(
        path,
        [("ViewLayer.Object Index", {"X": ids}), ("ViewLayer.Depth", {"ViewLayer.Depth.Z": ids})],
    )
    assert sorted(read_exr(path)) == ["ViewLayer.Depth.Z", "ViewLayer.Object Index.X"]
    (index,) = exr_channels(path, ((".Object Index.X", ".IndexOB.X"),))
    np.testing.assert_array_equal(index, ids)


def test_what_it_cannot_read_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "zip.exr"
    write_exr(path, [(None, {"R": np.zeros((2, 2), np.float32)})], compression=3)
    with pytest.raises(ExrError, match="codec None"):
        read_exr(path)
    path.write_bytes(b"not an exr")
    with pytest.raises(ExrError, match="not an OpenEXR"):
        read_exr(path)
    write_exr(path, [(None, {"R": np.zeros((2, 2), np.float32)})])
    with pytest.raises(ExrError, match="no Depth.Z channel"):
        exr_channels(path, ((".Depth.Z",),))
