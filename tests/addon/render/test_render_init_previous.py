"""Start From Previous Frame in a Ctrl-F12 animation under real bpy and the real engine (tiny
model): each frame after the first starts from the frame before, as the batch's
``--init-previous`` does, and its sidecar says so. bpy runs in a child python (this file run as
a script)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import blender_scenario
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_model_dir) -> dict:
    folder = tmp_path_factory.mktemp("render_init_previous")
    user_dir = str(tmp_path_factory.mktemp("blender-user"))
    return blender_scenario.run_scenario(
        __file__, "animation", user_dir, str(folder), str(tiny_model_dir)
    )


def test_each_frame_after_the_first_starts_from_the_one_before(report):
    on = report["on"]
    assert on["files"] == ["img_0001.png", "img_0002.png", "img_0003.png"]
    assert on["init_images"] == [None, "frame_0001.png", "frame_0002.png"]
    assert on["strengths"] == [None, 0.35, 0.35]
    # The sidecar records the option as the batch does; the Layout what each frame used.
    assert on["init_previous"] == [0.35, 0.35, 0.35]


def test_frame_step_takes_the_frame_rendered_before(report):
    assert report["step"]["init_images"] == [None, "frame_0001.png"]
    assert report["step"]["frames"] == ["frame_0001.png", "frame_0003.png"]


def test_the_batch_renderer_takes_the_scenes_setting_when_no_flag_is_given(report, tmp_path):
    out = tmp_path / "frames"
    proc = subprocess.run(
        [
            blender_scenario.bpy_python(),
            "-m",
            "blender_addon.render",
            report["saved"],
            "--frames",
            "1-2",
            "--out",
            str(out),
            "--engine-python",
            blender_scenario.engine_python(),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=blender_scenario.child_env(str(tmp_path / "user")),
        cwd=blender_scenario.ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    sidecars = [json.loads((out / f"frame_000{f}.json").read_text()) for f in (1, 2)]
    assert [s["layout"].get("init_image") for s in sidecars] == [None, "frame_0001.png"]
    assert sidecars[1]["layout"]["strength"] == 0.35
    assert [s["settings"]["init_previous"] for s in sidecars] == [0.35, 0.35]


def test_off_every_frame_starts_from_noise(report):
    assert report["off"]["init_images"] == [None, None, None]
    assert report["off"]["init_previous"] == [None, None, None]


def scenario_animation(folder: str, model: str) -> dict:
    import bpy

    sys.path.insert(0, HERE)
    import test_batch_render

    test_batch_render._linear_keys = blender_scenario.linear_keys
    from blender_addon.blender.compat import set_file_format
    from blender_addon.client import engine_session
    from blender_addon.core import frames

    blend = os.path.join(folder, "scene.blend")
    test_batch_render.scenario_make_scene(blend, model)  # registers the add-on
    bpy.ops.wm.open_mainfile(filepath=blend)
    scene = bpy.context.scene
    scene.render.engine = "LAYOUT_DIFFUSION"
    scene.view_settings.view_transform = "Standard"
    set_file_format(scene.render.image_settings, "PNG")
    settings = scene.layout_diffusion

    def render(name: str, step: int = 1) -> dict:
        out = os.path.join(folder, name)
        scene.render.filepath = os.path.join(out, "img_####")
        scene.frame_step = step
        bpy.ops.render.render(animation=True)
        render_dir = os.path.join(out, "layout_diffusion")
        numbers = range(scene.frame_start, scene.frame_end + 1, step)
        sidecars = [
            frames.read_sidecar(os.path.join(render_dir, f"frame_{n:04d}.json")) for n in numbers
        ]
        return {
            "files": sorted(n for n in os.listdir(out) if n.endswith(".png")),
            "frames": sorted(n for n in os.listdir(render_dir) if n.endswith(".png")),
            "init_images": [
                os.path.basename(s["layout"]["init_image"])
                if s["layout"].get("init_image")
                else None
                for s in sidecars
            ],
            "strengths": [
                s["layout"]["strength"] if s["layout"].get("init_image") else None for s in sidecars
            ],
            "init_previous": [s["settings"].get("init_previous") for s in sidecars],
        }

    out = {}
    settings.use_init_previous = True
    settings.init_previous_strength = 0.35
    out["on"] = render("on")
    out["step"] = render("step", step=2)
    settings.use_init_previous = False
    out["off"] = render("off")
    engine_session.shutdown()
    # For the batch renderer's default: the scene saved with the setting on.
    settings.use_init_previous = True
    scene.frame_step = 1
    bpy.ops.wm.save_as_mainfile(filepath=os.path.join(folder, "init_previous.blend"))
    out["saved"] = os.path.join(folder, "init_previous.blend")
    return out


if __name__ == "__main__":
    blender_scenario.report(globals()[f"scenario_{sys.argv[1]}"](*sys.argv[2:]))
