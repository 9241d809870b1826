"""F12 far above the model's native size runs the scene's High-res Fix, as Generate and the
batch do (real bpy, the shipped shapes model declared native at 64 px, a 162 x 97 render at
160 x 96): the render thread hands the request to the main thread, the engine runs two passes,
the first pass's file is removed, the sidecar records the fix, and the frame's pixels are the
batch command's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import blender_scenario
import numpy as np
import pytest
from blender_scenario import ROOT
from PIL import Image

USER_DIR = os.path.join(os.environ.get("TMPDIR", "/tmp"), "ld-user-render-high-res")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    folder = str(tmp_path_factory.mktemp("render-high-res"))
    return blender_scenario.run_scenario(__file__, "f12", USER_DIR, folder)


def pixels(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_f12_far_above_native_runs_the_high_res_fix(report):
    assert report["result"] == ["FINISHED"], report
    assert report["build_on_main"] == [True], "the render thread handed the build over"
    assert report["kind"] == "HighResJob"
    assert report["sizes"] == [[120, 72], [160, 96]]
    assert report["init"] == [None, report["first_out"]] and report["strength"] == [1.0, 0.5]
    assert report["first_out"] == os.path.join(
        report["render_dir"], "layout", "frame_0001", "first_pass.png"
    )
    assert report["first_out_left"] is False, "the first pass is removed after the frame"
    assert report["png_size"] == [160, 96] and report["saved_size"] == [162, 97]
    assert report["sidecar_high_res_strength"] == 0.5


def test_f12_frame_is_the_batch_frame(report, tmp_path):
    out = tmp_path / "frames"
    proc = subprocess.run(
        [
            blender_scenario.bpy_python(),
            "-m",
            "blender_addon.render",
            report["blend"],
            "--frames",
            "1",
            "--out",
            str(out),
            "--engine-python",
            blender_scenario.engine_python(),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=blender_scenario.child_env(USER_DIR),
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    batch = pixels(str(out / "frame_0001.png"))
    f12 = pixels(report["engine_png"])
    assert batch.shape == (96, 160, 3)
    assert np.array_equal(f12, batch), "F12 and the batch generate the same frame"
    with open(out / "frame_0001.json", encoding="utf-8") as handle:
        assert json.load(handle)["settings"]["high_res_strength"] == 0.5


def scenario_f12(folder: str) -> dict:

    import bpy
    from shapes_native import high_res_scene

    from blender_addon.blender import main_thread
    from blender_addon.client import engine_session
    from blender_addon.core import frames
    from blender_addon.render import engine as render_engine

    scene = high_res_scene(folder, 162, 97)
    blend = os.path.join(folder, "wide.blend")
    bpy.ops.wm.save_as_mainfile(filepath=blend)
    scene.render.engine = "LAYOUT_DIFFUSION"
    scene.view_settings.view_transform = "Standard"
    scene.frame_set(1)
    still = os.path.join(folder, "still", "still.png")
    scene.render.filepath = still

    jobs, built = [], []
    start_generate, build_request = render_engine.start_generate, render_engine.build_request

    def recording_start(*args, **kwargs):
        jobs.append(start_generate(*args, **kwargs))
        return jobs[-1]

    def spying_build(*args, **kwargs):
        built.append(main_thread.on_main_thread())
        return build_request(*args, **kwargs)

    render_engine.start_generate = recording_start
    render_engine.build_request = spying_build
    done = blender_scenario.f12_in_worker_thread()
    job = jobs[0]
    requests = getattr(job, "requests", [])
    render_dir = os.path.join(folder, "still", "layout_diffusion")
    engine_png = os.path.join(render_dir, "frame_0001.png")
    with open(engine_png, "rb") as handle:
        head = handle.read(24)
    record = frames.read_sidecar(os.path.join(render_dir, "frame_0001.json"))
    saved = bpy.data.images.load(still)
    out = {
        **done,
        "blend": blend,
        "build_on_main": built,
        "kind": type(job).__name__,
        "sizes": [[r["width"], r["height"]] for r in requests],
        "init": [r["init_image"] for r in requests],
        "strength": [r["strength"] for r in requests],
        "first_out": getattr(job, "first_out", None),
        "first_out_left": os.path.exists(getattr(job, "first_out", "") or ""),
        "render_dir": render_dir,
        "engine_png": engine_png,
        "png_size": [int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")],
        "saved_size": list(saved.size),
        "sidecar_high_res_strength": record["settings"].get("high_res_strength"),
    }
    engine_session.shutdown()
    return out


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    blender_scenario.report(globals()[f"scenario_{sys.argv[1]}"](*sys.argv[2:]))
