"""The headless animation batch (``python -m blender_addon.render``) with real bpy and engine.

bpy runs in child processes (this file run as a script with a scenario name, or the batch
command itself) so bpy and torch never share the pytest process. The scene: a labeled cube
moving left to right over frames 1-3 (linear keys), off-camera at frame 4; 64x64, 2 steps.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time

import blender_scenario
import pytest
from blender_scenario import ROOT

USER_DIR = os.path.join(os.environ.get("TMPDIR", "/tmp"), "ld-user")


def run_scenario(name: str, *args: str, timeout: float = 600) -> dict:
    return blender_scenario.run_scenario(__file__, name, USER_DIR, *args, timeout=timeout)


def run_batch(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            blender_scenario.bpy_python(),
            "-m",
            "blender_addon.render",
            *args,
            "--engine-python",
            blender_scenario.engine_python(),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=blender_scenario.child_env(USER_DIR),
        cwd=ROOT,
    )


def read_json(path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def listing(folder) -> dict[str, tuple[int, bytes]]:
    """Every file directly in ``folder``: name -> (mtime_ns, bytes)."""
    out = {}
    for entry in os.scandir(folder):
        if entry.is_file():
            with open(entry.path, "rb") as handle:
                out[entry.name] = (entry.stat().st_mtime_ns, handle.read())
    return out


@pytest.fixture(scope="module")
def blend(tmp_path_factory, tiny_model_dir) -> str:
    path = str(tmp_path_factory.mktemp("scene") / "moving_cube.blend")
    run_scenario("make_scene", path, str(tiny_model_dir))
    return path


def test_batch_renders_the_moving_cube_with_one_engine(blend, tmp_path):
    out = tmp_path / "frames"
    result = run_scenario("batch", blend, str(out), "1-3")
    assert [o["status"] for o in result["outcomes"]] == ["written"] * 3
    assert len(result["engine_pids"]) == 1, "one engine process must serve the whole batch"
    assert result["stopped"] == ""

    records = [read_json(out / f"frame_{f:04d}.json") for f in (1, 2, 3)]
    boxes = [r["layout"]["regions"][0]["box"] for r in records]
    assert boxes[0][0] < boxes[1][0] < boxes[2][0], boxes  # left to right
    assert boxes[1][0] == pytest.approx(0.5 - (boxes[1][2] - boxes[1][0]) / 2, abs=1e-6)
    # Keyframed weight and scene guidance, read at each frame.
    assert [r["layout"]["regions"][0]["weight"] for r in records] == [1.0, 1.5, 2.0]
    assert [r["layout"]["guidance_scale"] for r in records] == pytest.approx([5.0, 6.0, 7.0])
    for frame, record in zip((1, 2, 3), records, strict=True):
        assert record["frame"] == frame
        assert record["image_size"] == [64, 64]
        assert record["seed"] == 7 and record["settings"]["seed_mode"] == "shot"
        assert record["engine"]["version"] and record["engine"]["protocol"] == 2
        with open(out / f"frame_{frame:04d}.png", "rb") as handle:
            head = handle.read(24)
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        assert int.from_bytes(head[16:20], "big") == 64 == int.from_bytes(head[20:24], "big")
    # The model loads for the first frame only: the same process keeps it.
    loads = [r["timings"]["load_seconds"] for r in records]
    assert loads[0] > 0 and loads[1:] == [0.0, 0.0], loads

    # A sidecar reproduces its frame: its Layout resolves against the output folder.
    from engine.wire.layout import Layout

    layout = Layout.from_dict(records[1]["layout"], base_dir=str(out))
    assert os.path.isfile(layout.regions[0].mask) and os.path.isfile(layout.depth)
    assert layout.regions[0].name == "Cube" and layout.regions[0].prompt == "a blue square"

    # Running the command again finds every frame complete and touches nothing.
    before = listing(out)
    proc = run_batch(blend, "--frames", "1-3", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "0 written, 3 already complete, 0 failed" in proc.stderr
    assert listing(out) == before


def test_seed_per_frame_failed_frame_and_leftovers_of_an_interrupted_run(blend, tmp_path):
    out = tmp_path / "frames"
    out.mkdir()
    # What a run killed mid-frame leaves: an image without sidecar, temporary files.
    (out / "frame_0003.png").write_bytes(b"half a frame")
    (out / ".frame_0003.partial-4242.png").write_bytes(b"x")
    (out / ".frame_0003.json.4242.tmp").write_bytes(b"x")
    proc = run_batch(blend, "--frames", "3-4", "--out", str(out), "--seed-mode", "frame")
    assert proc.returncode == 1
    assert "frame 4 FAILED: No labeled object is visible from camera 'Camera'" in proc.stderr
    assert "frames not written: 4" in proc.stderr
    record = read_json(out / "frame_0003.json")
    assert record["seed"] == 7 + 3 and record["image_size"] == [64, 64]
    assert sorted(p for p in os.listdir(out) if p != "layout") == [
        "frame_0003.json",
        "frame_0003.png",
    ]


def test_killed_engine_is_replaced_and_a_rerun_resumes(blend, tmp_path):
    out = tmp_path / "frames"
    result = run_scenario("batch", blend, str(out), "1-2", "--kill-after", "1")
    assert [(o["frame"], o["status"]) for o in result["outcomes"]] == [
        (1, "written"),
        (2, "written"),
    ]
    assert len(result["engine_pids"]) == 2, "a new engine serves frame 2"
    assert result["stopped"] == ""
    # Besides the cost line every batch prints first ("each frame: ..."), one notice.
    (notice,) = [n for n in result["notices"] if not n.startswith("each frame: ")]
    assert notice.startswith("frame 2: the engine process stopped unexpectedly")
    assert notice.endswith("starting a new one")
    assert sorted(os.listdir(out)) == [
        "frame_0001.json",
        "frame_0001.png",
        "frame_0002.json",
        "frame_0002.png",
        "layout",
    ]
    first = listing(out)
    os.remove(out / "frame_0002.json")  # as if killed between the image and its sidecar

    # The rerun also starts each frame from the one before: frame 2 from the kept frame 1.
    # That changes frame 2's and 3's settings (stale), while frame 1 stays.
    proc = run_batch(blend, "--frames", "1-3", "--out", str(out), "--init-previous", "0.6")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 written, 1 already complete, 0 failed; 0 stale, 0 damaged" in proc.stderr
    inits = [read_json(out / f"frame_000{f}.json")["layout"] for f in (2, 3)]
    assert [(x["init_image"], x["strength"]) for x in inits] == [
        ("frame_0001.png", 0.6),
        ("frame_0002.png", 0.6),
    ]
    after = listing(out)
    assert sorted(after) == [f"frame_000{f}.{e}" for f in (1, 2, 3) for e in ("json", "png")]
    for name in ("frame_0001.png", "frame_0001.json"):
        assert after[name] == first[name], f"{name} was rewritten"
    assert not [name for name in os.listdir(out) if name.startswith(".")]
    assert not [n for n in os.listdir(out / "layout") if n.startswith(".")]


def test_hung_engine_is_replaced_and_the_frame_retried(blend, tmp_path):
    out = tmp_path / "frames"
    result = run_scenario("batch", blend, str(out), "1-2", "--stop-after", "1", "--stall", "4")
    assert [(o["frame"], o["status"], o["retries"]) for o in result["outcomes"]] == [
        (1, "written", 0),
        (2, "written", 1),
    ]
    assert result["stopped"] == "" and len(result["engine_pids"]) == 2
    (notice,) = [n for n in result["notices"] if not n.startswith("each frame: ")]
    assert notice.startswith("frame 2: the engine made no progress for 4 s")
    assert "replaced the engine and retrying the frame (retry 1 of 2)" in notice
    assert read_json(out / "frame_0002.json")["frame"] == 2


def test_resume_rerenders_stale_and_damaged_frames_and_counts_them(blend, tmp_path):
    out = tmp_path / "frames"
    proc = run_batch(blend, "--frames", "1-3", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    # A truncated PNG whose sidecar was edited to match it: only decoding tells.
    image = out / "frame_0002.png"
    data = image.read_bytes()[:-40]
    image.write_bytes(data)
    record = read_json(out / "frame_0002.json")
    import hashlib

    record["image_bytes"] = len(data)
    record["image_sha256"] = hashlib.sha256(data).hexdigest()
    (out / "frame_0002.json").write_text(json.dumps(record))
    kept = listing(out)["frame_0001.png"]
    proc = run_batch(blend, "--frames", "1-3", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 written, 2 already complete, 0 failed; 0 stale, 1 damaged re-rendered" in (
        proc.stderr
    )
    assert listing(out)["frame_0001.png"] == kept
    # Another seed mode gives every frame another seed: all three are stale.
    proc = run_batch(blend, "--frames", "1-3", "--out", str(out), "--seed-mode", "frame")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "3 written, 0 already complete, 0 failed; 3 stale, 0 damaged re-rendered" in (
        proc.stderr
    )
    assert [read_json(out / f"frame_000{f}.json")["seed"] for f in (1, 2, 3)] == [8, 9, 10]


@pytest.fixture(scope="module")
def long_blend(tmp_path_factory, tiny_model_dir) -> str:
    path = str(tmp_path_factory.mktemp("scene") / "eight_frames.blend")
    run_scenario("make_scene", path, str(tiny_model_dir), "8")
    return path


def test_two_renderers_on_one_folder_one_killed_render_each_frame_once(long_blend, tmp_path):
    """The fault test: two renderers (two farm machines) start on the same 8 frames in one
    folder; one is killed after its first frame. The survivor takes over its claim and every
    frame ends complete, each rendered exactly once."""
    out = tmp_path / "frames"
    logs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    env = blender_scenario.child_env(USER_DIR)
    script = os.path.abspath(__file__)
    outputs = [tmp_path / "a.out", tmp_path / "b.out"]
    procs = []
    for log, output in zip(logs, outputs, strict=True):
        with open(output, "wb") as sink:
            procs.append(
                subprocess.Popen(
                    [
                        blender_scenario.bpy_python(),
                        script,
                        "farm",
                        long_blend,
                        str(out),
                        "1-8",
                        str(log),
                    ],
                    env=env,
                    cwd=ROOT,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                )
            )
    survivor, victim = procs
    deadline = time.monotonic() + 300
    while not _written(logs[1]) and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _written(logs[1]), outputs[1].read_text()[-3000:]
    victim.kill()
    victim.wait()
    assert survivor.wait(timeout=600) == 0, outputs[0].read_text()[-3000:]

    by_survivor, by_victim = _written(logs[0]), _written(logs[1])
    renders = {frame: 0 for frame in range(1, 9)}
    for frame in by_survivor + by_victim:
        renders[frame] += 1
    for frame in range(1, 9):
        record = read_json(out / f"frame_{frame:04d}.json")
        assert record["frame"] == frame and (out / f"frame_{frame:04d}.png").is_file()
        pid = record["settings"]["renderer"]["pid"]
        assert pid in (survivor.pid, victim.pid)
        if not renders[frame]:
            # Published by the victim in its last instant, before it could log it.
            assert pid == victim.pid
            renders[frame] = 1
        else:
            assert pid == (survivor.pid if frame in by_survivor else victim.pid)
    assert renders == {frame: 1 for frame in range(1, 9)}, (by_survivor, by_victim)
    assert len(by_survivor) >= 4, "the survivor rendered its share and took the victim's over"
    # The survivor left no claim, staging folder or temporary file of its own behind.
    assert not [n for n in os.listdir(out) if n.startswith(".") and "partial" not in n]
    assert not [n for n in os.listdir(out / "layout") if n.startswith(".")]


def _written(log) -> list[int]:
    try:
        lines = log.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line)["frame"] for line in lines if '"written"' in line]


def test_command_line_errors_say_what_to_do(blend, tmp_path):
    proc = run_batch(str(tmp_path / "missing.blend"), "--out", str(tmp_path))
    assert proc.returncode == 2
    assert "no such .blend file" in proc.stderr
    proc = run_batch(blend, "--out", str(tmp_path), "--frames", "9-2")
    assert proc.returncode == 2
    assert "frame range '9-2' runs backwards; write '2-9'" in proc.stderr
    proc = run_batch(blend, "--out", str(tmp_path), "--init-previous", "2")
    assert proc.returncode == 2
    assert "strength from 0 (keep the previous frame) to 1 (ignore it), got 2.0" in proc.stderr
    missing = str(tmp_path / "no-such-model")
    proc = run_batch(blend, "--out", str(tmp_path / "out"), "--frames", "1", "--model", missing)
    assert proc.returncode == 1
    assert f"error: model {missing!r} not found" in proc.stderr
    assert "Frames already written are kept" in proc.stderr
    assert not os.path.exists(tmp_path / "out" / "frame_0001.png")
    # No engine: the fix named is the command's own option, not Blender's preferences.
    proc = subprocess.run(
        [
            blender_scenario.bpy_python(),
            "-m",
            "blender_addon.render",
            blend,
            "--out",
            str(tmp_path / "out"),
            "--frames",
            "1",
            "--engine-python",
            str(tmp_path / "no-python"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=blender_scenario.child_env(USER_DIR),
        cwd=ROOT,
    )
    assert proc.returncode == 1
    assert "Pass --engine-python with the Python that has the engine" in proc.stderr
    assert "press Set up engine" not in proc.stderr


def test_engine_command_renders_through_a_remote_engine_the_pixels_of_a_local_one(blend, tmp_path):
    from PIL import Image

    local = tmp_path / "local"
    proc = run_batch(blend, "--frames", "1-2", "--out", str(local))
    assert proc.returncode == 0, proc.stderr[-2000:]

    # The renderer's files (output, layouts, temporary files) are hidden from the engine.
    client = tmp_path / "client"
    (client / "tmp").mkdir(parents=True)
    wrapper = os.path.join(ROOT, "tests", "fixtures", "remote_engine.py")
    command = [sys.executable, wrapper, "--home", str(tmp_path / "remote"), "--hide", str(client)]
    remote = client / "frames"
    env = blender_scenario.child_env(USER_DIR)
    env["TMPDIR"] = str(client / "tmp")

    def batch(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [blender_scenario.bpy_python(), "-m", "blender_addon.render", blend, *args],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
            cwd=ROOT,
        )

    proc = batch("--frames", "1-2", "--out", str(remote), "--engine-command", shlex.join(command))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 written" in proc.stderr
    for frame in (1, 2):
        name = f"frame_{frame:04d}"
        with Image.open(local / f"{name}.png") as a, Image.open(remote / f"{name}.png") as b:
            assert a.size == b.size == (64, 64)
            assert list(a.getdata()) == list(b.getdata()), f"frame {frame} differs"
        mine, theirs = read_json(local / f"{name}.json"), read_json(remote / f"{name}.json")
        assert mine["layout"] == theirs["layout"] and mine["seed"] == theirs["seed"]
    requests = os.listdir(tmp_path / "remote" / "tmp")
    assert [n for n in requests if n.startswith("ld-request-")] == []

    # The connection drops after frame 1: frame 2 starts the command again.
    dropped = tmp_path / "dropped"
    run = run_scenario(
        "batch", blend, str(dropped), "1-2", "--kill-after", "1", "--command", json.dumps(command)
    )
    assert [(o["frame"], o["status"]) for o in run["outcomes"]] == [(1, "written"), (2, "written")]
    assert len(run["engine_pids"]) == 2 and run["stopped"] == ""
    assert [n for n in run["notices"] if n.startswith("frame 2: the engine process stopped")]
    with Image.open(remote / "frame_0002.png") as a, Image.open(dropped / "frame_0002.png") as b:
        assert list(a.getdata()) == list(b.getdata())

    proc = batch("--out", str(remote), "--engine-command", "ssh 'gpu-box")
    assert proc.returncode == 2 and "--engine-command: the engine command" in proc.stderr
    proc = batch("--out", str(remote), "--engine-command", "ssh gpu", "--ray")
    assert proc.returncode == 2 and "exclude each other" in proc.stderr


# -- Scenarios (run in a child process) ----------------------------------------------------------


def scenario_make_scene(path: str, model: str, frames: str = "3") -> dict:
    import bpy

    from samples.moving_cube import build_moving_cube

    # Frame 4 moves the cube out of view; the batch renders frames 1-3. With more frames, the
    # cube crosses the view over all of them.
    last = int(frames)
    keys = ((1, -2.0), (3, 2.0), (4, 60.0)) if last == 3 else ((1, -2.0), (last, 2.0))
    scene = build_moving_cube(keys, size=64, steps=2, model=model)
    scene.frame_end = last
    cube = scene.objects["Cube"]
    # Animated label weight and scene guidance: each frame's Layout must carry its own values.
    settings = scene.layout_diffusion
    for frame, weight, guidance in ((1, 1.0, 5.0), (3, 2.0, 7.0)):
        cube.layout_diffusion.weight = weight
        cube.layout_diffusion.keyframe_insert("weight", frame=frame)
        settings.guidance_scale = guidance
        settings.keyframe_insert("guidance_scale", frame=frame)
    _linear_keys(cube)
    _linear_keys(scene)
    settings.seed = 7
    bpy.ops.wm.save_as_mainfile(filepath=path)
    return {"saved": path}


def _linear_keys(obj) -> None:
    blender_scenario.linear_keys(obj)


def scenario_batch(blend: str, out: str, spec: str, *options: str) -> dict:
    import signal

    import bpy

    import blender_addon
    from blender_addon.client.engine_client import EngineClient
    from blender_addon.core import frames
    from blender_addon.render.batch import BatchRenderer, Watchdog

    flags = dict(zip(options[::2], options[1::2], strict=True))
    kill_after = int(flags.get("--kill-after", 0)) or None
    stop_after = int(flags.get("--stop-after", 0)) or None
    blender_addon.register()
    bpy.ops.wm.open_mainfile(filepath=blend)
    command = json.loads(flags.get("--command", "null"))
    client = EngineClient(blender_scenario.engine_python(), cwd=ROOT, command=command)

    def on_frame(outcome) -> None:
        if outcome.status != "written":
            return
        if outcome.frame == kill_after:
            client.kill()
        if outcome.frame == stop_after:
            # Alive but silent: what a hung engine looks like from outside.
            os.kill(client.pid, signal.SIGSTOP)

    stall = float(flags.get("--stall", 120))
    renderer = BatchRenderer(
        bpy.context.scene,
        out,
        client,
        on_frame=on_frame,
        watchdog=Watchdog(stall_seconds=stall, load_seconds=max(stall, 300.0)),
    )
    try:
        summary = renderer.run(frames.parse_frames(spec))
    finally:
        client.close()
    return {
        "outcomes": [vars(o) for o in summary.outcomes],
        "engine_pids": summary.engine_pids,
        "stopped": summary.stopped,
        "notices": summary.notices,
    }


def scenario_farm(blend: str, out: str, spec: str, log: str) -> dict:
    """One farm renderer: the batch with short heartbeats, each outcome logged as it happens."""
    import bpy

    import blender_addon
    from blender_addon.client.engine_client import EngineClient
    from blender_addon.core import frames
    from blender_addon.render.batch import BatchRenderer

    blender_addon.register()
    bpy.ops.wm.open_mainfile(filepath=blend)
    client = EngineClient(blender_scenario.engine_python(), cwd=ROOT)

    def on_frame(outcome) -> None:
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(vars(outcome)) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    renderer = BatchRenderer(
        bpy.context.scene, out, client, on_frame=on_frame, heartbeat_seconds=1.0, stale_seconds=20
    )
    try:
        summary = renderer.run(frames.parse_frames(spec))
    finally:
        client.close()
    return {"outcomes": [vars(o) for o in summary.outcomes], "stopped": summary.stopped}


if __name__ == "__main__":
    blender_scenario.report(globals()[f"scenario_{sys.argv[1]}"](*sys.argv[2:]))
