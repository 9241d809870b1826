"""Interactive F12 and Ctrl-F12 under real bpy: the request a render thread sends, where a
render writes its files, and the view transform.

Blender renders an interactive F12 in a worker thread while the main thread runs the UI. The
child process does the same: it starts F12 in a worker thread and keeps the main thread
answering the add-on's queue of main-thread steps (what Blender's timer does in the UI).
"""

from __future__ import annotations

import os
import sys

import blender_scenario
import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_model_dir) -> dict:
    folder = tmp_path_factory.mktemp("interactive")
    user_dir = str(tmp_path_factory.mktemp("blender-user"))
    return blender_scenario.run_scenario(
        __file__, "interactive", user_dir, str(folder), str(tiny_model_dir)
    )


def test_f12_in_a_render_thread_sends_the_masks_and_depth_generate_sends(report):
    threaded = report["threaded"]
    assert threaded["result"] == ["FINISHED"]
    # The render ran in a worker thread; the request (with its id render) on the main thread.
    assert threaded["render_on_main"] is False
    assert threaded["build_on_main"] == [True]
    assert threaded["masks"] == [True] and threaded["depth"] is True
    # Pixel for pixel what Generate from Camera builds at the same frame.
    assert threaded["mask_vs_generate"] == [0]
    assert threaded["depth_vs_generate"] == 0
    assert threaded["mask_pixels"][0] > 0
    # The Layout Region pass is the mask, not the box.
    assert threaded["region_pass_vs_mask"] == 0


def test_a_locked_interface_sends_boxes_only_and_says_so(report):
    locked = report["locked"]
    assert locked["result"] == ["FINISHED"]
    assert locked["masks"] == [False] and locked["depth"] is False
    assert any("boxes only" in text and "Lock Interface" in text for text in locked["warnings"])


def test_render_files_stay_under_the_output_path(report):
    files = report["files"]
    assert files["anim"] == ["img_0001.png", "img_0002.png", "img_0003.png", "layout_diffusion"]
    assert files["anim_layout_diffusion"] == [
        "frame_0001.json",
        "frame_0001.png",
        "frame_0002.json",
        "frame_0002.png",
        "frame_0003.json",
        "frame_0003.png",
        "layout",
    ]
    # Nothing beside the blend file but the Output paths' folders.
    assert files["project"] == ["anim", "scene.blend", "still"]


def test_the_default_view_warns_once_and_one_click_gives_the_engines_pixels(report):
    view = report["view"]
    assert view["default"] in ("AgX", "Filmic")
    # Under the default view the saved frame is not the engine's image.
    assert view["default_diff"]["max"] > 1
    # One warning for the 3-frame animation and the stills after it, not one per frame.
    assert len(view["warnings"]) == 1
    assert "View Transform is 'AgX'" in view["warnings"][0]
    assert "Use Standard View" in view["warnings"][0]
    # The button is offered where the settings are, and is gone once pressed.
    assert view["offered_before"] == ["layout_diffusion.use_standard_view"]
    assert view["offered_after"] == []
    assert view["changes_after"] == []
    # After the click an F12 saves the engine's PNG within 1/255.
    assert view["standard_diff"]["max"] <= 1


# -- The child process --------------------------------------------------------------------------


class _Layout:
    """Records the operators a draw function offers."""

    def __init__(self, log: list):
        self._log = log

    def operator(self, idname, **_kwargs):
        self._log.append(idname)

    def __getattr__(self, _name):
        return lambda *args, **kwargs: self


def _diff(saved: str, engine_png: str) -> dict:
    from blender_addon.blender.images import read_image_rgb

    delta = np.abs(np.rint(read_image_rgb(saved) * 255) - np.rint(read_image_rgb(engine_png) * 255))
    return {"mean": float(delta.mean()), "max": int(delta.max())}


def scenario_interactive(folder: str, model: str) -> dict:
    import bpy

    sys.path.insert(0, HERE)
    import test_batch_render
    from test_batch_render import scenario_make_scene

    test_batch_render._linear_keys = blender_scenario.linear_keys

    from blender_addon.blender import main_thread
    from blender_addon.blender.compat import set_file_format
    from blender_addon.blender.frame_request import build_request
    from blender_addon.blender.view import view_changes
    from blender_addon.client import engine_session
    from blender_addon.core import frames
    from blender_addon.core.png import read_gray_png
    from blender_addon.render import engine as render_engine
    from blender_addon.ui import results
    from engine.wire.layout import Layout

    blend = os.path.join(folder, "scene.blend")
    scenario_make_scene(blend, model)
    bpy.ops.wm.open_mainfile(filepath=blend)
    scene = bpy.context.scene
    scene.render.engine = "LAYOUT_DIFFUSION"
    settings = scene.render.image_settings
    set_file_format(settings, "PNG")
    settings.color_depth = "8"
    out: dict = {}

    warnings: list[str] = []
    cls = render_engine.LayoutDiffusionRenderEngine
    warn_once = cls._warn_once

    def recording_warn_once(self, scene, message):
        if (scene.name, message) not in render_engine._warned:
            warnings.append(message)
        warn_once(self, scene, message)

    cls._warn_once = recording_warn_once
    built: list[dict] = []
    original_build = render_engine.build_request

    def spying_build(*args, **kwargs):
        made = original_build(*args, **kwargs)
        built.append({"on_main": main_thread.on_main_thread(), "layout": made.layout})
        return made

    render_engine.build_request = spying_build

    def threaded_f12(path: str) -> dict:
        """F12 as the UI runs it: in a worker thread, the main thread free for the add-on."""
        scene.render.filepath = path
        built.clear()
        done = blender_scenario.f12_in_worker_thread()
        layout = built[-1]["layout"] if built else None
        return {
            **done,
            "build_on_main": [b["on_main"] for b in built],
            "masks": [r.mask is not None for r in layout.regions] if layout else [],
            "depth": layout.depth is not None if layout else None,
            "layout": layout,
        }

    # Ctrl-F12 over frames 1-3 under Blender's default view: one warning, not three.
    out["view"] = {"default": scene.view_settings.view_transform}
    scene.render.filepath = os.path.join(folder, "anim", "img_####")
    bpy.ops.render.render(animation=True)
    anim = os.path.join(folder, "anim")
    out["files"] = {
        "anim": sorted(os.listdir(anim)),
        "anim_layout_diffusion": sorted(os.listdir(os.path.join(anim, "layout_diffusion"))),
    }

    # F12 at frame 2 in a render thread, against what Generate builds at frame 2.
    scene.frame_set(2)
    still = os.path.join(folder, "still", "still.png")
    threaded = threaded_f12(still)
    render_dir = os.path.join(folder, "still", "layout_diffusion")
    engine_png = os.path.join(render_dir, "frame_0002.png")
    record = frames.read_sidecar(os.path.join(render_dir, "frame_0002.json"))
    sent = Layout.from_dict(record["layout"], base_dir=render_dir)
    generate = build_request(
        scene, bpy.context.evaluated_depsgraph_get(), os.path.join(folder, "generate")
    ).layout
    masks = [read_gray_png(r.mask) for r in sent.regions]
    expected = [read_gray_png(r.mask) for r in generate.regions]
    region_pass = render_engine.layout_passes(sent, 64, 64)[render_engine.PASS_REGION][:, :, 0]
    threaded.pop("layout")
    threaded.update(
        mask_vs_generate=[
            int(np.count_nonzero(a != b)) for a, b in zip(masks, expected, strict=True)
        ],
        depth_vs_generate=int(
            np.abs(
                read_gray_png(sent.depth).astype(int) - read_gray_png(generate.depth).astype(int)
            ).max()
        ),
        mask_pixels=[int(np.count_nonzero(m > 127)) for m in masks],
        region_pass_vs_mask=int(np.count_nonzero((region_pass > 0) != (masks[0] > 127))),
    )
    out["threaded"] = threaded
    saved = os.path.join(folder, "still", "saved.png")
    bpy.data.images["Render Result"].save_render(saved)
    out["view"]["default_diff"] = _diff(saved, engine_png)

    # The button, where the settings are; then F12 once more under the view it sets.
    offered: list = []
    results.draw_view_warning(_Layout(offered), scene)
    out["view"]["offered_before"] = offered
    bpy.ops.layout_diffusion.use_standard_view()
    offered = []
    results.draw_view_warning(_Layout(offered), scene)
    out["view"]["offered_after"] = offered
    out["view"]["changes_after"] = view_changes(scene)
    threaded_f12(still)
    bpy.data.images["Render Result"].save_render(saved)
    out["view"]["standard_diff"] = _diff(saved, engine_png)
    out["view"]["warnings"] = list(warnings)

    # Lock Interface: the main thread runs no Python during the render.
    scene.render.use_lock_interface = True
    warnings.clear()
    locked = threaded_f12(still)
    locked.pop("layout")
    locked["warnings"] = list(warnings)
    out["locked"] = locked
    scene.render.use_lock_interface = False

    out["files"]["project"] = sorted(
        name for name in os.listdir(folder) if name not in ("generate", "scene.blend1")
    )
    render_engine.build_request = original_build
    cls._warn_once = warn_once
    engine_session.shutdown()
    return out


if __name__ == "__main__":
    blender_scenario.report(globals()[f"scenario_{sys.argv[1]}"](*sys.argv[2:]))
