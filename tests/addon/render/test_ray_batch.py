"""The batch renderer on a local Ray cluster (``--ray``), against the local batch.

The test process starts the cluster (two CPUs, loopback); the batch runs in a child process
with bpy that joins it by address, as a renderer joins a real cluster. The shot: a labeled cube
crossing the view over 12 frames, 64x64, tiny model, one seed per frame; frame 6 takes 60 steps
(the others 2) so that an actor can be killed while it renders it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import blender_scenario
import pytest
from blender_scenario import ROOT

USER_DIR = os.path.join(os.environ.get("TMPDIR", "/tmp"), "ld-user")
FRAMES = list(range(1, 13))
SLOW_FRAME = 6


def run_scenario(name: str, *args: str, timeout: float = 600) -> dict:
    return blender_scenario.run_scenario(__file__, name, USER_DIR, *args, timeout=timeout)


def run_batch(*args: str, python_code: str | None = None) -> subprocess.CompletedProcess:
    """``python -m blender_addon.render *args --engine-python ...`` (or ``python -c code``)."""
    command = ["-c", python_code] if python_code else ["-m", "blender_addon.render"]
    return subprocess.run(
        [
            blender_scenario.bpy_python(),
            *command,
            *args,
            "--engine-python",
            blender_scenario.engine_python(),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=blender_scenario.child_env(USER_DIR),
        cwd=ROOT,
    )


def files_under(folder) -> dict[str, tuple[int, bytes]]:
    """Every file under ``folder``: relative path -> (mtime_ns, bytes)."""
    out = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, "rb") as handle:
                out[os.path.relpath(path, folder)] = (os.stat(path).st_mtime_ns, handle.read())
    return out


def comparable_sidecar(data: bytes) -> dict:
    """A sidecar without what differs between two runs: timings and the renderer's pid."""
    record = json.loads(data)
    record.pop("timings")
    record["settings"].pop("renderer")
    return record


@pytest.fixture(scope="module")
def shot(tmp_path_factory, tiny_model_dir):
    """The scene, and its 12 frames rendered by the local batch. Each test renders into the
    same folder the local batch used (the PNGs record their masks' paths) and empties it."""
    base = tmp_path_factory.mktemp("ray-shot")
    blend = str(base / "shot.blend")
    run_scenario("make_shot", blend, str(tiny_model_dir))
    out = base / "frames"
    proc = run_batch(blend, "--frames", "1-12", "--out", str(out), "--seed-mode", "frame")
    assert proc.returncode == 0, proc.stderr[-3000:]
    local = {name: data for name, (_, data) in files_under(out).items()}
    shutil.rmtree(out)
    return SimpleNamespace(blend=blend, out=out, local=local)


def assert_same_frames(out, local: dict[str, bytes]) -> None:
    rendered = {name: data for name, (_, data) in files_under(out).items()}
    assert sorted(rendered) == sorted(local), "the same files, and no others"
    for frame in FRAMES:
        png, sidecar = f"frame_{frame:04d}.png", f"frame_{frame:04d}.json"
        assert rendered[png] == local[png], f"{png} differs from the local batch's"
        assert comparable_sidecar(rendered[sidecar]) == comparable_sidecar(local[sidecar])


def test_two_actors_render_the_frames_of_the_local_batch_byte_for_byte(shot, ray_cluster):
    try:
        proc = run_batch(
            shot.blend,
            "--frames",
            "1-12",
            "--out",
            str(shot.out),
            "--seed-mode",
            "frame",
            "--ray",
            ray_cluster.address,
            "--ray-workers",
            "2",
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "12 written, 0 already complete, 0 failed" in proc.stderr
        assert "rendering on 2 CPU worker(s) (no GPUs)" in proc.stderr
        # Progress shows the frames of both workers and each one's rate.
        rates = set(re.findall(r"(w[12]) \d+ at \d+\.\d/min", proc.stderr))
        assert rates == {"w1", "w2"}, proc.stderr[-2000:]
        assert_same_frames(shot.out, shot.local)

        before = files_under(shot.out)
        proc = run_batch(
            shot.blend, "--frames", "1-12", "--out", str(shot.out), "--seed-mode", "frame",
            "--ray", ray_cluster.address, "--ray-workers", "2",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "0 written, 12 already complete, 0 failed" in proc.stderr
        assert files_under(shot.out) == before, "a complete shot is left as it is"
    finally:
        shutil.rmtree(shot.out, ignore_errors=True)


def test_an_actor_killed_mid_frame_loses_nothing_and_a_rerun_renders_what_is_missing(
    shot, ray_cluster
):
    try:
        result = run_scenario("ray_batch", shot.blend, str(shot.out), ray_cluster.address)
        outcomes = result["outcomes"]
        assert sorted(o["frame"] for o in outcomes) == FRAMES, "every frame exactly once"
        assert {o["status"] for o in outcomes} == {"written"}, outcomes
        assert {o["frame"]: o["retries"] for o in outcomes if o["retries"]} == {SLOW_FRAME: 1}
        assert result["stopped"] == ""
        victim = result["killed"]
        assert victim in ("w1", "w2")
        assert any(
            text.startswith(f"Ray worker {victim} stopped during frame {SLOW_FRAME}")
            and "started w3 in its place" in text
            for text in result["notices"]
        ), result["notices"]
        assert len(result["engine_pids"]) >= 2
        assert_same_frames(shot.out, shot.local)
        assert not [n for n in os.listdir(shot.out) if n.startswith(".")]
        assert not [n for n in os.listdir(shot.out / "layout") if n.startswith(".")]

        # A rerun renders only the frames that are missing.
        for frame in (3, 9):
            for ext in ("png", "json"):
                os.remove(shot.out / f"frame_{frame:04d}.{ext}")
        kept = files_under(shot.out)
        proc = run_batch(
            shot.blend, "--frames", "1-12", "--out", str(shot.out), "--seed-mode", "frame",
            "--ray", ray_cluster.address, "--ray-workers", "2",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "2 written, 10 already complete, 0 failed" in proc.stderr
        after = files_under(shot.out)
        for name in kept:
            if name.startswith("frame_"):
                assert after[name] == kept[name], f"{name} was rewritten"
        assert_same_frames(shot.out, shot.local)
    finally:
        shutil.rmtree(shot.out, ignore_errors=True)


def test_frames_that_start_from_the_one_before_get_it_as_bytes(shot, ray_cluster):
    """With --init-previous each frame is sent once the frame before it is written, with that
    image among its files: the Ray batch's frames are the local batch's."""
    spec = ("--frames", "1-4", "--out", str(shot.out), "--init-previous", "0.6")
    try:
        proc = run_batch(shot.blend, *spec)
        assert proc.returncode == 0, proc.stderr[-3000:]
        local = {name: data for name, (_, data) in files_under(shot.out).items()}
        shutil.rmtree(shot.out)
        proc = run_batch(shot.blend, *spec, "--ray", ray_cluster.address, "--ray-workers", "2")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "4 written, 0 already complete, 0 failed" in proc.stderr
        rendered = {name: data for name, (_, data) in files_under(shot.out).items()}
        assert sorted(rendered) == sorted(local)
        for frame in range(1, 5):
            png, sidecar = f"frame_{frame:04d}.png", f"frame_{frame:04d}.json"
            assert rendered[png] == local[png], f"{png} differs from the local batch's"
            record = comparable_sidecar(rendered[sidecar])
            assert record == comparable_sidecar(local[sidecar])
            if frame > 1:
                assert record["layout"]["init_image"] == f"frame_{frame - 1:04d}.png"
    finally:
        shutil.rmtree(shot.out, ignore_errors=True)


def test_far_above_native_an_actor_runs_the_high_res_fix_as_the_local_batch(tmp_path, ray_cluster):
    """2 frames at 160 x 96 with the shapes model declared native at 64 px, High-res Fix on: each actor
    runs both passes, the first in its own temporary folder, and the frames are the local
    batch's byte for byte (the PNGs name the first pass where the local batch puts it)."""
    blend = str(tmp_path / "wide.blend")
    run_scenario("make_wide", blend)
    out = tmp_path / "frames"
    spec = ("--frames", "1-2", "--out", str(out))
    proc = run_batch(blend, *spec)
    assert proc.returncode == 0, proc.stderr[-3000:]
    local = {name: data for name, (_, data) in files_under(out).items()}
    shutil.rmtree(out)
    proc = run_batch(blend, *spec, "--ray", ray_cluster.address, "--ray-workers", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 written, 0 already complete, 0 failed" in proc.stderr
    rendered = {name: data for name, (_, data) in files_under(out).items()}
    assert sorted(rendered) == sorted(local), "the same files: no first pass left behind"
    assert not [name for name in rendered if "first_pass" in name]
    for frame in (1, 2):
        png, sidecar = f"frame_{frame:04d}.png", f"frame_{frame:04d}.json"
        assert rendered[png][16:24] == (160).to_bytes(4, "big") + (96).to_bytes(4, "big")
        assert rendered[png] == local[png], f"{png} differs from the local batch's"
        record = comparable_sidecar(rendered[sidecar])
        assert record == comparable_sidecar(local[sidecar])
        assert record["settings"]["high_res_strength"] == 0.5
    # The same fingerprint as the local batch's: a local rerun keeps the Ray frames.
    proc = run_batch(blend, *spec)
    assert "0 written, 2 already complete" in proc.stderr, proc.stderr[-2000:]


def test_ray_options_say_what_to_do(shot, tmp_path):
    # Without Ray in the renderer's Python, --ray names the extra to install.
    code = (
        "import sys; sys.modules['ray'] = None; from blender_addon.render.__main__ import main; "
        "sys.exit(main(sys.argv[1:]))"
    )
    out = str(tmp_path / "out")
    proc = run_batch(shot.blend, "--frames", "1", "--out", out, "--ray", python_code=code)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--ray needs Ray" in proc.stderr and "pip install -e .[cluster]" in proc.stderr
    proc = run_batch(shot.blend, "--frames", "1", "--out", out, "--ray", "--ray-workers", "0")
    assert proc.returncode == 2
    assert "--ray-workers must be 1 or more, got 0" in proc.stderr
    assert not os.path.exists(os.path.join(out, "frame_0001.png"))


# -- Scenarios (run in a child process) ----------------------------------------------------------


def scenario_make_shot(path: str, model: str) -> dict:
    import bpy

    from samples.moving_cube import build_moving_cube

    scene = build_moving_cube(((FRAMES[0], -2.0), (FRAMES[-1], 2.0)), size=64, steps=2, model=model)
    settings = scene.layout_diffusion
    settings.seed = 7
    for frame in FRAMES:
        settings.steps = 60 if frame == SLOW_FRAME else 2
        settings.keyframe_insert("steps", frame=frame)
    blender_scenario.linear_keys(scene.objects["Cube"])
    bpy.ops.wm.save_as_mainfile(filepath=path)
    return {"saved": path}


def scenario_make_wide(path: str) -> dict:
    import bpy
    from shapes_native import high_res_scene

    high_res_scene(os.path.dirname(path), 160, 96)
    bpy.ops.wm.save_as_mainfile(filepath=path)
    return {"saved": path}


def scenario_ray_batch(blend: str, out: str, address: str) -> dict:
    """The batch on two actors; the actor rendering the slow frame is killed 1 s into it."""
    import threading
    import time

    import bpy
    import ray

    import blender_addon
    from blender_addon.render.ray_batch import RayBatchRenderer
    from blender_addon.render.ray_pool import RayPool

    blender_addon.register()
    bpy.ops.wm.open_mainfile(filepath=blend)
    ray.init(address=address, log_to_driver=False)
    pool = RayPool(ray, 2, gpus=False, engine_python=blender_scenario.engine_python())
    renderer = RayBatchRenderer(bpy.context.scene, out, pool, seed_mode="frame")
    killed: list[str] = []

    def kill_the_slow_frame() -> None:
        deadline = time.monotonic() + 500
        while time.monotonic() < deadline:
            try:
                busy = pool.busy()
            except RuntimeError:  # the pool changed while it was read
                continue
            for worker, frame, seconds, handle in busy:
                if frame == SLOW_FRAME and seconds > 1.0:
                    killed.append(worker)
                    ray.kill(handle)
                    return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_the_slow_frame, daemon=True)
    killer.start()
    try:
        summary = renderer.run(FRAMES)
    finally:
        pool.close()
    killer.join(5)
    return {
        "outcomes": [vars(o) for o in summary.outcomes],
        "engine_pids": summary.engine_pids,
        "stopped": summary.stopped,
        "notices": summary.notices,
        "killed": killed[0] if killed else None,
    }


if __name__ == "__main__":
    blender_scenario.report(globals()[f"scenario_{sys.argv[1]}"](*sys.argv[2:]))
