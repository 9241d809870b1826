"""Blender's own output files on a farm, without Blender: which files a crashed renderer left
(placeholders, half-written images) and how they are freed for a rerun."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from test_frames import write_png

from blender_addon.core import frames, placeholders


def _dead_owner() -> frames.Owner:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return frames.Owner(frames.Owner.current().host, child.pid, "d" * 32)


def _age(path, seconds: float) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


def _claim(folder, frame: int, owner: frames.Owner) -> frames.Claim:
    path = os.path.join(str(folder), f"frame_{frame:04d}.png")
    claim = frames.try_claim(placeholders.output_paths(path, frame), owner)
    assert claim is not None
    return claim


def test_what_a_crashed_renderer_left_is_freed_and_nothing_else(tmp_path):
    out = tmp_path

    def png(frame: int) -> str:
        return str(out / f"frame_{frame:04d}.png")

    # 1: an old empty placeholder nobody claims (a renderer killed before it claimed it).
    open(png(1), "wb").close()
    _age(png(1), 600)
    # 2: a young empty placeholder: a live renderer may be about to claim it.
    open(png(2), "wb").close()
    # 3: an empty placeholder a live renderer holds, old as it may be.
    open(png(3), "wb").close()
    _age(png(3), 600)
    live = _claim(out, 3, frames.Owner.current())
    # 4: a dead renderer's placeholder, just made: freed at once.
    open(png(4), "wb").close()
    _claim(out, 4, _dead_owner())
    # 5: a half-written PNG (Blender writes in place), old and unclaimed.
    write_png(png(5), 16, 16, 200)
    with open(png(5), "r+b") as handle:
        handle.truncate(40)
    _age(png(5), 600)
    # 6: a finished PNG whose renderer died before it let the frame go: kept, claim cleared.
    write_png(png(6), 16, 16, 100)
    _claim(out, 6, _dead_owner())
    # 7: a finished PNG.
    write_png(png(7), 16, 16, 50)
    _age(png(7), 600)
    # 8: another machine's placeholder, its heartbeat silent for longer than the stale time.
    open(png(8), "wb").close()
    silent = _claim(out, 8, frames.Owner("render-node-7", 4242, "s" * 32))
    _age(silent.path, 600)
    # 9: another machine's placeholder with a fresh heartbeat.
    open(png(9), "wb").close()
    _claim(out, 9, frames.Owner("render-node-8", 4243, "r" * 32))
    # 10: an EXR a dead renderer was writing: it cannot be checked, so it is rendered again.
    exr = str(out / "frame_0010.exr")
    with open(exr, "wb") as handle:
        handle.write(b"v/1\x01" + b"\x00" * 100)
    frames.try_claim(placeholders.output_paths(exr, 10), _dead_owner())
    # 11: an unclaimed EXR with contents: taken as finished.
    other_exr = str(out / "frame_0011.exr")
    with open(other_exr, "wb") as handle:
        handle.write(b"v/1\x01" + b"\x00" * 100)
    _age(other_exr, 600)
    # 12: no file at all.
    outputs = [(frame, png(frame)) for frame in (1, 2, 3, 4, 5, 6, 7, 8, 9, 12)]
    outputs += [(10, exr), (11, other_exr)]

    mine = frames.Owner.current()
    freed = placeholders.free_leftovers(outputs, mine, stale_seconds=60)
    assert [frame for frame, _ in freed] == [1, 4, 5, 8, 10]
    reasons = dict(freed)
    assert reasons[1] == "an empty placeholder nobody is rendering"
    assert reasons[4].startswith("left by a renderer that stopped while rendering it")
    assert "does not decode" in reasons[5]
    assert "render-node-7, process 4242" in reasons[8]
    remaining = sorted(os.listdir(out))
    assert remaining == [
        ".frame_0003.claim",
        ".frame_0009.claim",
        "frame_0002.png",
        "frame_0003.png",
        "frame_0006.png",
        "frame_0007.png",
        "frame_0009.png",
        "frame_0011.exr",
    ]
    assert frames.holds(live)
    # A second look finds nothing more to free.
    assert placeholders.free_leftovers(outputs, mine, stale_seconds=60) == []


def test_a_live_renderer_keeps_its_frame_while_another_frees_leftovers(tmp_path):
    path = str(tmp_path / "frame_0001.png")
    open(path, "wb").close()
    _age(path, 600)
    holder = frames.Owner.current()
    claim = _claim(tmp_path, 1, holder)
    assert placeholders.leftover_reason(placeholders.output_paths(path, 1), 60) is None
    # Once its owner lets it go without writing the file (it stopped), the file is freed.
    frames.release(claim)
    assert placeholders.leftover_reason(placeholders.output_paths(path, 1), 60) is not None
    assert placeholders.free_leftovers([(1, path)], frames.Owner.current(), 60) == [
        (1, "an empty placeholder nobody is rendering")
    ]
    assert os.listdir(tmp_path) == []
