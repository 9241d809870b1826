"""Farms that run Blender itself: ``blender -b scene.blend -E LAYOUT_DIFFUSION -a`` on several
machines over one range, Output > Overwrite off and Placeholders on.

The bpy module has no ``blender`` binary, so each machine is a child Python with the add-on
registered running ``bpy.ops.render.render(animation=True)`` with the render engine, all on one
output folder, with the shipped 64 px shapes model. Each child logs every generation its engine
starts and every frame Blender writes, so the tests count how often each frame was generated.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import blender_scenario
import pytest
from blender_scenario import ROOT

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = os.path.join(ROOT, "engine", "models", "shapes")
USER_DIR = os.path.join(os.environ.get("TMPDIR", "/tmp"), "ld-user")
FRAMES = list(range(1, 9))


@pytest.fixture(scope="module")
def blend(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("farm") / "eight_frames.blend")
    blender_scenario.run_scenario(__file__, "make_scene", USER_DIR, path)
    return path


def start_machine(
    blend: str,
    out,
    log,
    stall_at: int = 0,
    *,
    placeholders: bool = True,
    last: int = FRAMES[-1],
    hold_for=None,
) -> subprocess.Popen:
    """One farm machine rendering frames 1 to ``last`` into ``out``; with ``stall_at``, its
    engine hangs at its ``stall_at``-th generation (until the test kills it); with
    ``hold_for`` (another machine's log), its generation of frame 1 waits until that machine
    has found frame 1 held."""
    with open(str(log) + ".out", "wb") as sink:
        return subprocess.Popen(
            [
                blender_scenario.bpy_python(),
                os.path.abspath(__file__),
                "machine",
                blend,
                str(out),
                str(log),
                str(stall_at),
                "1" if placeholders else "0",
                str(last),
                str(hold_for or ""),
            ],
            env=blender_scenario.child_env(USER_DIR),
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )


def events(log, kind: str) -> list[int]:
    """The frames of ``kind`` events (``generate``, ``stalled``, ``held_elsewhere``,
    ``written``) in a log."""
    try:
        with open(log, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line)["frame"] for line in lines if json.loads(line)["event"] == kind]


def engine_dir(blend: str, out) -> str:
    """Where the render engine keeps each frame's engine PNG and sidecar: the folder
    ``layout_diffusion`` beside Blender's frames, or next to the blend file in older versions."""
    beside = os.path.join(str(out), "layout_diffusion")
    if os.path.isdir(beside):
        return beside
    return os.path.join(os.path.dirname(blend), "layout_diffusion", "Scene", "render")


def frame_files(out) -> list[str]:
    """The files directly in ``out``, hidden ones (claims, temporaries) included."""
    return sorted(n for n in os.listdir(out) if os.path.isfile(os.path.join(out, n)))


def output_of(log, tail: int = 3000) -> str:
    """The last ``tail`` characters a machine printed (0: all)."""
    try:
        with open(str(log) + ".out", encoding="utf-8", errors="replace") as handle:
            return handle.read()[-tail:]
    except FileNotFoundError:
        return ""


def test_two_machines_share_a_range_and_a_rerun_picks_up_a_killed_ones_frame(blend, tmp_path):
    from blender_addon.core import frames

    out = tmp_path / "frames"
    logs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    # Machine b hangs inside its second generation: its frame has Blender's empty placeholder
    # and b's claim while machine a renders the rest of the range. Machine a starts once b's
    # engine generates: started together, a warm a could take every frame b had not reached.
    b = start_machine(blend, out, logs[1], stall_at=2)
    deadline = time.monotonic() + 400
    while not events(logs[1], "generate") and b.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    a = start_machine(blend, out, logs[0])
    while not events(logs[1], "stalled") and b.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert events(logs[1], "stalled"), output_of(logs[1])
    assert a.wait(timeout=400) == 0, output_of(logs[0])
    (stalled,) = events(logs[1], "stalled")
    b.kill()
    b.wait()

    by_a, by_b = events(logs[0], "generate"), events(logs[1], "generate")
    assert sorted(by_a + by_b) == FRAMES, (by_a, by_b)  # every frame generated once
    assert by_a and len(by_b) == 2
    assert sorted(events(logs[0], "written") + events(logs[1], "written")) == [
        f for f in FRAMES if f != stalled
    ]
    placeholder = out / f"frame_{stalled:04d}.png"
    assert placeholder.stat().st_size == 0
    assert (out / f".frame_{stalled:04d}.claim").exists()  # the killed machine's

    # The rerun frees the killed machine's placeholder (its claim's process is gone) and
    # renders exactly that frame, removing what the killed engine left of it; every other
    # frame is left as it is.
    render_dir = engine_dir(blend, out)
    os.makedirs(render_dir, exist_ok=True)
    leftover = os.path.join(render_dir, f".frame_{stalled:04d}.partial-{b.pid}.png")
    with open(leftover, "wb") as handle:
        handle.write(b"\x89PNG half")
    before = {f: (out / f"frame_{f:04d}.png").stat().st_mtime_ns for f in FRAMES if f != stalled}
    rerun = tmp_path / "c.jsonl"
    c = start_machine(blend, out, rerun)
    assert c.wait(timeout=400) == 0, output_of(rerun)
    assert events(rerun, "generate") == [stalled]
    assert events(rerun, "written") == [stalled]
    assert f"frame {stalled}'s output file was left by a renderer that stopped" in output_of(
        rerun, 0
    )
    after = {f: (out / f"frame_{f:04d}.png").stat().st_mtime_ns for f in FRAMES if f != stalled}
    assert after == before
    for frame in FRAMES:
        assert frames.png_problem(str(out / f"frame_{frame:04d}.png")) is None, frame
    assert frame_files(out) == [f"frame_{f:04d}.png" for f in FRAMES]
    assert not os.path.exists(leftover)

    # Each engine sidecar names the process that generated its frame.
    pids = {0: a.pid, 1: b.pid, 2: c.pid}
    for frame in FRAMES:
        record = frames.read_sidecar(os.path.join(render_dir, f"frame_{frame:04d}.json"))
        maker = 2 if frame == stalled else (0 if frame in by_a else 1)
        assert record["settings"]["renderer"]["pid"] == pids[maker], frame


def test_a_frame_two_machines_start_at_once_is_generated_once(blend, tmp_path):
    """Placeholders off: Blender lets both machines start frame 1 (its file is not written
    yet). The second finds it held, waits, and gives Blender the first one's image."""
    import numpy as np
    from PIL import Image

    from blender_addon.core import frames

    out = tmp_path / "frames"
    logs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    # Whichever machine claims frame 1 first holds its generation until the other one has
    # found frame 1 held, so both are surely at frame 1 together.
    a = start_machine(blend, out, logs[0], placeholders=False, last=4, hold_for=logs[1])
    b = start_machine(blend, out, logs[1], placeholders=False, last=4, hold_for=logs[0])
    assert a.wait(timeout=400) == 0, output_of(logs[0])
    assert b.wait(timeout=400) == 0, output_of(logs[1])

    by_a, by_b = events(logs[0], "generate"), events(logs[1], "generate")
    assert sorted(by_a + by_b) == [1, 2, 3, 4], (by_a, by_b)
    waiter = logs[1] if 1 in by_a else logs[0]
    assert events(waiter, "held_elsewhere")[:1] == [1]
    # The waiter wrote frame 1 too (Blender writes what the engine hands it), last: the
    # other machine's image.
    assert 1 in events(waiter, "written")
    render_dir = engine_dir(blend, out)
    for frame in (1, 2, 3, 4):
        written = np.asarray(Image.open(out / f"frame_{frame:04d}.png").convert("RGB"), int)
        engine = np.asarray(Image.open(os.path.join(render_dir, f"frame_000{frame}.png")), int)
        assert np.abs(written - engine[:, :, :3]).max() <= 1, frame
        assert frames.frame_state(frames.frame_paths(render_dir, frame)).complete
    assert frame_files(out) == [f"frame_{f:04d}.png" for f in (1, 2, 3, 4)]


# -- Scenarios (run in a child process) ----------------------------------------------------------


def scenario_make_scene(path: str) -> dict:
    sys.path.insert(0, HERE)
    from test_batch_render import scenario_make_scene as make_moving_cube

    return make_moving_cube(path, SHAPES, str(FRAMES[-1]))


def scenario_machine(
    blend: str, out: str, log: str, stall_at: str, placeholders: str, last: str, hold_for: str
) -> dict:
    """Ctrl-F12 of frames 1 to ``last`` into ``out`` as a farm machine runs it."""
    import re

    import bpy

    import blender_addon
    from blender_addon.client import engine_session
    from blender_addon.client.engine_client import EngineClient
    from blender_addon.core import frames

    def note(event: str, frame: int) -> None:
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"event": event, "frame": frame, "pid": os.getpid()}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    generate = EngineClient.generate
    count = [0]

    def logged(self, layout, out_path, *args, **kwargs):
        frame = int(re.search(r"frame_(\d+)", os.path.basename(out_path)).group(1))
        note("generate", frame)
        count[0] += 1
        if hold_for and frame == 1:
            deadline = time.monotonic() + 300
            while not events(hold_for, "held_elsewhere") and time.monotonic() < deadline:
                time.sleep(0.1)
        if count[0] == int(stall_at):
            note("stalled", frame)
            time.sleep(3600)
        return generate(self, layout, out_path, *args, **kwargs)

    EngineClient.generate = logged
    try_claim = frames.try_claim

    def observed(paths, owner, stale_seconds=frames.STALE_SECONDS):
        claim = try_claim(paths, owner, stale_seconds)
        if claim is None:
            note("held_elsewhere", paths.frame)
        return claim

    frames.try_claim = observed

    @bpy.app.handlers.persistent
    def written(scene, *_args) -> None:
        if scene.render.engine == "LAYOUT_DIFFUSION":  # not the engine's nested mask render
            note("written", scene.frame_current)

    blender_addon.register()
    bpy.ops.wm.open_mainfile(filepath=blend)
    bpy.app.handlers.render_write.append(written)
    scene = bpy.context.scene
    scene.render.engine = "LAYOUT_DIFFUSION"
    scene.view_settings.view_transform = "Standard"
    scene.render.image_settings.file_format = "PNG"
    scene.render.filepath = os.path.join(out, "frame_####")
    scene.render.use_overwrite = False
    scene.render.use_placeholder = placeholders == "1"
    scene.frame_end = int(last)
    try:
        bpy.ops.render.render(animation=True)
    finally:
        engine_session.shutdown()
    return {"rendered": True}


if __name__ == "__main__":
    blender_scenario.report(globals()[f"scenario_{sys.argv[1]}"](*sys.argv[2:]))
