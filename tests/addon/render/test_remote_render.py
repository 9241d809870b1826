"""The add-on with its Engine Command preference under real bpy: Check engine and an F12 render
go through a "remote" engine (``tests/fixtures/remote_engine.py``, a stand-in for ``ssh gpu-box
python -m engine serve`` that cannot see Blender's files) and give the pixels of the local engine.

One child process (this file run as a script) renders the moving-cube scene of
``test_batch_render`` at frame 2 with the local engine, then with the Engine Command set.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile

import blender_scenario
import pytest
from blender_scenario import ROOT

HERE = os.path.dirname(os.path.abspath(__file__))
WRAPPER = os.path.join(ROOT, "tests", "fixtures", "remote_engine.py")


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_model_dir) -> dict:
    folder = tmp_path_factory.mktemp("remote_render")
    user_dir = str(tmp_path_factory.mktemp("blender-user"))
    blend = str(folder / "scene.blend")
    maker = os.path.join(HERE, "test_batch_render.py")
    blender_scenario.run_scenario(maker, "make_scene", user_dir, blend, str(tiny_model_dir))
    return blender_scenario.run_scenario(__file__, "remote", user_dir, str(folder))


def test_check_engine_through_the_engine_command_says_files_travel_with_requests(report):
    check = report["check"]
    assert check["result"] == ["FINISHED"], check
    assert "Files: sent with each request" in check["report"]
    assert check["inline"] is True and check["command"][1] == WRAPPER


def test_f12_through_the_engine_command_gives_the_local_engines_pixels(report):
    local, remote = report["local"], report["remote"]
    assert local["result"] == remote["result"] == ["FINISHED"]
    assert remote["engine_png"] and remote["pixels"] == local["pixels"]
    assert remote["size"] == local["size"] == [64, 64]
    assert remote["engine"]["protocol"] == 2
    assert remote["leftover_requests"] == []
    assert remote["same_engine"], "F12 used the engine the Engine Command started"


# -- Scenario (run in a child process) ----------------------------------------------------------


def scenario_remote(folder: str) -> dict:
    import bpy  # noqa: I001 -- bpy first: it puts addon_utils on sys.path
    import addon_utils

    from blender_addon.blender.images import read_image_rgb
    from blender_addon.client import engine_session
    from blender_addon.core import frames
    from blender_addon.core.png import png_size
    from blender_addon.ui import preferences

    blend = os.path.join(folder, "scene.blend")
    addon_utils.enable("blender_addon", default_set=True, handle_error=None)
    bpy.ops.wm.open_mainfile(filepath=blend)
    prefs = preferences.get_preferences()
    prefs.python = blender_scenario.engine_python()
    scene = bpy.context.scene
    scene.render.engine = "LAYOUT_DIFFUSION"
    scene.view_settings.view_transform = "Standard"
    scene.frame_set(2)

    def render(name: str) -> dict:
        out = os.path.join(folder, name)
        scene.render.filepath = os.path.join(out, "still.png")
        result = bpy.ops.render.render(write_still=True)
        engine_png = os.path.join(out, "layout_diffusion", "frame_0002.png")
        found = os.path.isfile(engine_png)
        pixels = (read_image_rgb(engine_png) * 255).round().astype(int).tolist() if found else []
        size = list(png_size(engine_png) or ())
        record = frames.read_sidecar(os.path.join(out, "layout_diffusion", "frame_0002.json"))
        return {
            "result": sorted(result),
            "engine_png": found,
            "pixels": pixels,
            "size": size,
            "engine": record["engine"],
        }

    out = {"local": render("local")}

    # Blender's own files (scene, outputs, masks, temporary files such as the probe) are hidden
    # from the "remote" engine.
    tempfile.tempdir = os.path.join(folder, "tmp")
    os.makedirs(tempfile.tempdir, exist_ok=True)
    remote_home = os.path.join(folder, "remote")
    command = [blender_scenario.engine_python(), WRAPPER, "--home", remote_home, "--hide", folder]
    prefs.engine_command = shlex.join(command)
    messages: list[str] = []
    result = bpy.ops.layout_diffusion.check_engine()
    task = preferences.check_task()
    if task is not None and task.result:
        messages = engine_session.describe_hello(task.result)
    client = engine_session.current_client()
    out["check"] = {
        "result": sorted(result),
        "report": "; ".join(messages),
        "inline": bool(client and client.inline_files),
        "command": list(client.command) if client else [],
        "error": task.error if task else None,
    }
    out["remote"] = render("remote")
    after = engine_session.current_client()
    out["remote"]["same_engine"] = bool(
        client and after is client and after.alive and after.command == client.command
    )
    tmp = os.path.join(remote_home, "tmp")
    out["remote"]["leftover_requests"] = [n for n in os.listdir(tmp) if n.startswith("ld-request")]
    engine_session.shutdown()
    return out


if __name__ == "__main__":
    blender_scenario.report(globals()[f"scenario_{sys.argv[1]}"](*sys.argv[2:]))
