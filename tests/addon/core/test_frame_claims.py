"""Farm-safe frames without Blender: claims and their take-over, per-frame temporary files,
PNG decoding checks and fingerprints."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time

import pytest
from test_frames import finished_frame, open_bytes, write_png

from blender_addon.core import frames


def paths(folder, frame: int = 1) -> frames.FramePaths:
    return frames.frame_paths(str(folder), frame)


def test_a_claim_is_exclusive_until_released(tmp_path):
    first, second = frames.Owner.current(), frames.Owner.current()
    claim = frames.try_claim(paths(tmp_path), first)
    assert claim is not None and frames.holds(claim)
    assert os.path.basename(claim.path) == ".frame_0001.claim"
    record = json.loads(open_bytes(claim.path))
    assert (record["pid"], record["token"], record["frame"]) == (os.getpid(), first.token, 1)
    assert frames.try_claim(paths(tmp_path), second) is None
    assert frames.try_claim(paths(tmp_path), first) == claim  # its own claim again
    frames.release(claim)
    assert not os.path.exists(claim.path)
    assert frames.try_claim(paths(tmp_path), second) is not None


def test_held_claims_beat_until_let_go(tmp_path):
    before = set(threading.enumerate())
    held = frames.HeldClaims(heartbeat_seconds=0.05)
    owner = frames.Owner.current()
    kept, given_up, taken = (frames.try_claim(paths(tmp_path, n), owner) for n in (1, 2, 3))
    old = time.time() - 120
    for claim in (kept, given_up, taken):
        held.hold(claim)
        os.utime(claim.path, (old, old))
    held.forget(taken)
    deadline = time.monotonic() + 10
    while os.path.getmtime(kept.path) == old and time.monotonic() < deadline:
        time.sleep(0.02)
    assert os.path.getmtime(kept.path) > old, "a held claim's heartbeat beats"
    assert os.path.getmtime(taken.path) == old, "a forgotten claim is no longer beaten"
    held.let_go(given_up)
    assert not os.path.exists(given_up.path) and os.path.exists(taken.path)
    held.let_go_all()
    assert not os.path.exists(kept.path)
    assert os.path.exists(taken.path), "forgotten claims are not released"
    held.stop()
    assert not [t for t in set(threading.enumerate()) - before if t.name == "frame claims"]


def test_a_dead_owners_claim_is_taken_over_at_once(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = frames.Owner(frames.Owner.current().host, child.pid, "d" * 32)
    assert frames.try_claim(paths(tmp_path), dead) is not None
    mine = frames.Owner.current()
    claim = frames.try_claim(paths(tmp_path), mine)
    assert claim is not None and frames.holds(claim)
    assert not [n for n in os.listdir(tmp_path) if "stale" in n]


def test_a_silent_owners_claim_is_taken_over_after_the_stale_time(tmp_path):
    # Another host: its process cannot be checked, only its heartbeat.
    remote = frames.Owner("render-node-7", 4242, "r" * 32)
    remote_claim = frames.try_claim(paths(tmp_path), remote)
    mine = frames.Owner.current()
    assert frames.try_claim(paths(tmp_path), mine, stale_seconds=60) is None
    assert frames.refresh(remote_claim)  # a heartbeat keeps it
    assert frames.try_claim(paths(tmp_path), mine, stale_seconds=60) is None
    old = time.time() - 120
    os.utime(remote_claim.path, (old, old))
    claim = frames.try_claim(paths(tmp_path), mine, stale_seconds=60)
    assert claim is not None
    # The silent owner learns it lost the frame and cannot release the new claim.
    assert not frames.holds(remote_claim) and not frames.refresh(remote_claim)
    frames.release(remote_claim)
    assert frames.holds(claim)


def _race(folder: str, start: float, results, finished) -> None:
    while time.time() < start:
        time.sleep(0.001)
    owner = frames.Owner.current()
    won = [f for f in range(1, 31) if frames.try_claim(frames.frame_paths(folder, f), owner)]
    results.put((owner.token, won))
    # Stay alive: an exited racer's claims are a dead owner's, which a slower racer (on a busy
    # machine) would rightly take over, and the frame would count as won twice.
    finished.wait(60)


def test_three_renderers_racing_for_stale_claims_each_win_a_frame_once(tmp_path):
    old = time.time() - 600
    for frame in range(1, 31):
        claim = frames.try_claim(paths(tmp_path, frame), frames.Owner("gone", 1, f"{frame:032x}"))
        os.utime(claim.path, (old, old))
    context = multiprocessing.get_context("spawn")
    results, finished = context.Queue(), context.Event()
    start = time.time() + 2.0
    procs = [
        context.Process(target=_race, args=(str(tmp_path), start, results, finished))
        for _ in range(3)
    ]
    for proc in procs:
        proc.start()
    won = [results.get(timeout=60) for _ in procs]
    finished.set()
    for proc in procs:
        proc.join(30)
    frames_won = sorted(f for _, fs in won for f in fs)
    assert frames_won == list(range(1, 31)), won
    for token, fs in won:
        for frame in fs:
            record = json.loads(open_bytes(frames.claim_path(paths(tmp_path, frame))))
            assert record["token"] == token


def test_temporary_files_are_swept_only_under_the_frames_claim(tmp_path):
    names = [
        ".frame_0001.partial-991.png",
        ".frame_0001.json.991.tmp",
        "..frame_0001.partial-991.png.992.140234.tmp",
        ".frame_0001.claim.stale-" + "a" * 32,
        ".frame_0001.claim.5755.78a9a3a6.tmp",
        ".frame_0002.partial-555.png",
        "frame_0001.png",
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    other = frames.Owner("render-node-7", 555, "o" * 32)
    held_elsewhere = frames.try_claim(paths(tmp_path, 2), other)
    removed = frames.sweep_temp_files(str(tmp_path))
    assert sorted(os.path.basename(p) for p in removed) == sorted(names[:5])
    assert sorted(os.listdir(tmp_path)) == sorted(
        [".frame_0002.partial-555.png", "frame_0001.png", ".frame_0002.claim"]
    )
    assert frames.holds(held_elsewhere)
    # The holder itself may sweep its own frame.
    assert frames.sweep_frame(held_elsewhere, paths(tmp_path, 2)) == [
        str(tmp_path / ".frame_0002.partial-555.png")
    ]


def test_claims_dead_renderers_left_on_finished_frames_are_cleared(tmp_path):
    """A renderer killed while it compared a frame another one had written leaves its claim
    and staging folder there; a renderer finishing its range clears them, and only them."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    host = frames.Owner.current().host
    dead = frames.Owner(host, child.pid, "d" * 32)
    silent = frames.Owner("render-node-7", 4242, "s" * 32)
    live = frames.Owner("render-node-8", 4243, "l" * 32)
    for frame, owner in ((1, dead), (2, silent), (3, live)):
        finished_frame(tmp_path, frame)
        assert frames.try_claim(paths(tmp_path, frame), owner) is not None
        staging = tmp_path / "layout" / f".frame_000{frame}.staging-{owner.token[:12]}"
        staging.mkdir(parents=True)
    old = time.time() - 120
    os.utime(frames.claim_path(paths(tmp_path, 2)), (old, old))
    mine = frames.Owner.current()
    every = [paths(tmp_path, frame) for frame in (1, 2, 3, 4)]
    assert frames.clear_dead_claims(every, mine, stale_seconds=60) == [1, 2]
    left = sorted(n for n in os.listdir(tmp_path) if n.startswith("."))
    assert left == [".frame_0003.claim"]
    staged = sorted(n for n in os.listdir(tmp_path / "layout") if n.startswith("."))
    assert staged == [".frame_0003.staging-" + "l" * 12]
    assert all(frames.frame_state(p).complete for p in every[:3])


def test_frames_that_do_not_decode_are_damaged(tmp_path):
    done = finished_frame(tmp_path, 1)
    assert frames.png_problem(done.image) is None
    # A truncated PNG whose sidecar was edited to match: only decoding catches it.
    data = open_bytes(done.image)
    for cut in (len(data) - 12, len(data) // 2, 40):
        with open(done.image, "wb") as handle:
            handle.write(data[:cut])
        record = frames.read_sidecar(done.sidecar)
        record["image_bytes"] = cut
        record["image_sha256"] = frames.file_sha256(done.image)
        frames.write_sidecar(done.sidecar, record)
        state = frames.frame_state(done)
        assert (state.complete, state.kind) == (False, "damaged"), cut
        assert state.reason.startswith("image does not decode")
    write_png(str(tmp_path / "short.png"), 8, 8)
    rows = bytearray(open_bytes(str(tmp_path / "short.png")))
    rows[16:20] = (9).to_bytes(4, "big")  # claims 9 rows; CRC now wrong too
    (tmp_path / "short.png").write_bytes(bytes(rows))
    assert "CRC" in frames.png_problem(str(tmp_path / "short.png"))


def test_fingerprints_follow_layout_contents_seed_model_and_settings(tmp_path):
    done = finished_frame(tmp_path, 1)
    record = frames.read_sidecar(done.sidecar)
    from engine.wire.layout import Layout

    layout = Layout.from_dict(record["layout"], base_dir=str(tmp_path)).to_dict()
    settings = {"seed_mode": "shot", "base_seed": 5, "scene": "Scene", "blend_file": "/a.blend"}

    def print_(**changes):
        fields = dict(layout=layout, seed=5, model="shapes", options={}, settings=settings)
        fields.update(changes)
        return frames.fingerprint(fields.pop("layout"), **fields)

    base = print_()
    assert print_() == base
    assert print_(settings={**settings, "blend_file": "/moved.blend"}) == base
    assert print_(seed=6) != base
    assert print_(model="other") != base
    assert print_(options={"controlnet": "x"}) != base
    assert print_(settings={**settings, "seed_mode": "frame"}) != base
    assert print_(layout={**layout, "prompt": "a blue square"}) != base
    # The mask's contents count, not its path.
    write_png(layout["regions"][0]["mask"], 64, 64, 0)
    assert print_() != base

    record["fingerprint"] = print_()
    frames.write_sidecar(done.sidecar, record)
    assert frames.frame_state(done, print_()).complete
    stale = frames.frame_state(done, base)
    assert (stale.complete, stale.kind) == (False, "stale")
    assert "another Layout or other settings" in stale.reason


@pytest.mark.parametrize("kind", ["missing", "interrupted"])
def test_frame_state_kinds(tmp_path, kind):
    done = finished_frame(tmp_path, 1)
    if kind == "missing":
        os.remove(done.image)
        os.remove(done.sidecar)
    else:
        os.remove(done.sidecar)
    assert frames.frame_state(done).kind == kind
