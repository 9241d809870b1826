"""The batch command far above the model's native size: it says the size and what each frame
costs, renders through the high-res fix, and leaves no first-pass file behind (real bpy, the
shipped shapes model declared native at 64 px)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import blender_scenario
import pytest
from blender_scenario import ROOT

USER_DIR = os.path.join(os.environ.get("TMPDIR", "/tmp"), "ld-user-high-res")


@pytest.fixture(scope="module")
def blend(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("scene") / "wide.blend")
    blender_scenario.run_scenario(__file__, "make_scene", USER_DIR, path)
    return path


def run_batch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [blender_scenario.bpy_python(), "-m", "blender_addon.render", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=blender_scenario.child_env(USER_DIR),
        cwd=ROOT,
    )


def test_batch_far_above_native_runs_the_high_res_fix(blend, tmp_path):
    out = tmp_path / "frames"
    python = blender_scenario.engine_python()
    proc = run_batch(blend, "--frames", "1", "--out", str(out), "--engine-python", python)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "size: Rounded 162 x 97 to 160 x 96 (multiples of 8)" in proc.stderr
    assert "each frame: Native 64 x 64, generating 160 x 96; " in proc.stderr
    assert " with High-res Fix; 120 x 72, then 160 x 96 at strength 0.50" in proc.stderr
    with open(out / "frame_0001.png", "rb") as handle:
        head = handle.read(24)
    assert (int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")) == (160, 96)
    with open(out / "frame_0001.json", encoding="utf-8") as handle:
        record = json.load(handle)
    assert record["settings"]["high_res_strength"] == 0.5
    assert not [name for name in os.listdir(out) if "first_pass" in name]

    # The fix's strength joins the frame's fingerprint, the same on every run: a rerun skips it.
    proc = run_batch(blend, "--frames", "1", "--out", str(out), "--engine-python", python)
    assert "0 written, 1 already complete" in proc.stderr


def scenario_make_scene(path: str) -> dict:
    import bpy
    from shapes_native import high_res_scene

    high_res_scene(os.path.dirname(path), 162, 97)
    bpy.ops.wm.save_as_mainfile(filepath=path)
    return {"saved": path}


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    blender_scenario.report(globals()[f"scenario_{sys.argv[1]}"](*sys.argv[2:]))
