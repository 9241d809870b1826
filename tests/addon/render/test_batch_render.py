"""The headless animation batch (``python -m blender_addon.render``) with real bpy and engine.

bpy runs in child processes (this file run as a script with a scenario name, or the batch
command itself) so bpy and torch never share the pytest process. The scene: a labeled cube
moving left to right over frames 1-3 (linear keys), off-camera at frame 4; 64x64, 2 steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import blender_scenario
import pytest
from blender_scenario import ROOT

USER_DIR = os.path.join(os.environ.get("TMPDIR", "/tmp"), "ld-user")


def run_scenario(name: str, *args: str, timeout: float = 600) -> dict:
    return blender_scenario.run_scenario(__file__, name, USER_DIR, *args, timeout=timeout)


def run_batch(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blender_addon.render", *args, "--engine-python", sys.executable],
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
        assert record["engine"]["version"] and record["engine"]["protocol"] == 1
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


def test_killed_engine_stops_the_batch_and_a_rerun_resumes(blend, tmp_path):
    out = tmp_path / "frames"
    result = run_scenario("batch", blend, str(out), "1-3", "--kill-after", "1")
    assert [(o["frame"], o["status"]) for o in result["outcomes"]] == [
        (1, "written"),
        (2, "failed"),
    ]
    assert "engine process stopped unexpectedly" in result["stopped"]
    assert sorted(os.listdir(out)) == ["frame_0001.json", "frame_0001.png", "layout"]
    first = listing(out)

    # The rerun also starts each frame from the one before: frame 2 from the kept frame 1.
    proc = run_batch(blend, "--frames", "1-3", "--out", str(out), "--init-previous", "0.6")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 written, 1 already complete, 0 failed" in proc.stderr
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


# -- Scenarios (run in a child process) ----------------------------------------------------------


def scenario_make_scene(path: str, model: str) -> dict:
    import bpy

    from samples.moving_cube import build_moving_cube

    # Frame 4 moves the cube out of view; the batch renders frames 1-3.
    scene = build_moving_cube(((1, -2.0), (3, 2.0), (4, 60.0)), size=64, steps=2, model=model)
    scene.frame_end = 3
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
    """Make every keyframe of ``obj`` linear (Blender 5 keeps F-curves in action channelbags)."""
    action = obj.animation_data.action
    curves = []
    for layer in getattr(action, "layers", []):
        for strip in layer.strips:
            for bag in strip.channelbags:
                curves.extend(bag.fcurves)
    assert curves, "no F-curves found on the animated object"
    for curve in curves:
        for key in curve.keyframe_points:
            key.interpolation = "LINEAR"


def scenario_batch(blend: str, out: str, spec: str, *options: str) -> dict:
    import bpy

    import blender_addon
    from blender_addon.client.engine_client import EngineClient
    from blender_addon.core import frames
    from blender_addon.render.batch import BatchRenderer

    kill_after = int(options[1]) if options[:1] == ("--kill-after",) else None
    blender_addon.register()
    bpy.ops.wm.open_mainfile(filepath=blend)
    client = EngineClient(sys.executable, cwd=ROOT)

    def on_frame(outcome) -> None:
        if outcome.frame == kill_after and outcome.status == "written":
            client.kill()

    renderer = BatchRenderer(bpy.context.scene, out, client, on_frame=on_frame)
    try:
        summary = renderer.run(frames.parse_frames(spec))
    finally:
        client.close()
    return {
        "outcomes": [vars(o) for o in summary.outcomes],
        "engine_pids": summary.engine_pids,
        "stopped": summary.stopped,
    }


if __name__ == "__main__":
    blender_scenario.report(globals()[f"scenario_{sys.argv[1]}"](*sys.argv[2:]))
