"""The Layout Diffusion render engine under real bpy (headless) and the real engine (tiny model).

One child process (this file run as a script) renders the moving-cube scene of
``test_batch_render`` with F12 to a multilayer EXR and as an animation, then reports what it
found; the tests below check that report. bpy and torch never share the pytest process.
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
    folder = tmp_path_factory.mktemp("render_engine")
    user_dir = os.path.join(os.environ.get("TMPDIR", "/tmp"), "ld-user")
    return blender_scenario.run_scenario(
        __file__, "render", user_dir, str(folder), str(tiny_model_dir)
    )


def test_f12_puts_the_generated_image_in_combined(report):
    still = report["still"]
    assert still["result"] == ["FINISHED"]
    # Combined holds the engine's PNG, linearized (sRGB decoded), at the render size.
    assert still["size"] == [64, 64]
    assert still["combined_vs_engine_png"] < 1e-6
    assert still["combined_alpha"] == [1.0, 1.0]
    assert still["combined_std"] > 0.01, "a flat Combined pass is not a generated image"
    # Saved through the Standard view transform, the PNG gives back the engine's pixels.
    assert still["saved_png_vs_engine_png"] <= 1


def test_f12_resizes_a_rounded_layout_back_to_the_render_size(report):
    rounded = report["still"]["rounded"]
    assert rounded["layout_size"] == [64, 72]
    assert rounded["result_size"] == [60, 68]
    assert rounded["combined_vs_resized_png"] < 1e-5


def test_f12_writes_the_layout_passes(report):
    still = report["still"]
    for name in ("Combined.R", "Layout Region.X", "Layout Color.A", "Layout Depth.X"):
        assert any(channel.endswith(name) for channel in still["channels"]), name
    # The region pass is 1 exactly where the cube's mask is white, 0 elsewhere.
    assert still["region_values"] == [0.0, 1.0]
    assert still["region_vs_mask"] == 0
    assert still["color_where_region"] == pytest.approx([0.90, 0.10, 0.10, 1.0])
    assert still["depth_vs_png"] < 1e-6 and still["depth_max"] == 1.0
    assert still["sidecar_frame"] == 2


def test_animation_uses_one_engine_and_blenders_output_settings(report):
    anim = report["animation"]
    assert anim["files"] == ["img_0001.png", "img_0002.png", "img_0003.png"]
    assert anim["png_sizes"] == [[64, 64]] * 3
    x0 = anim["box_x0"]
    assert x0[0] < x0[1] < x0[2], x0
    # Keyframes on the label's weight and the scene settings are read at each rendered frame.
    assert anim["weights"] == [1.0, 1.5, 2.0]
    assert anim["guidance"] == pytest.approx([5.0, 6.0, 7.0])
    # One engine process served F12 and all animation frames; the model loaded once.
    assert anim["engine_pids"] == 1
    assert anim["load_seconds"] == [0.0, 0.0, 0.0]
    # Overwrite off: a second Ctrl-F12 leaves the frames Blender already wrote alone.
    assert anim["rewritten_without_overwrite"] == []


def test_render_without_labels_fails_with_a_message(report):
    assert "No labeled objects" in report["error"]


def test_an_unexpected_error_fails_the_render_instead_of_an_empty_frame(report):
    unexpected = report["unexpected"]
    assert "internal error (TypeError: a bug)" in unexpected["error"]
    assert unexpected["written"] is False


def test_pixel_helpers(report):
    helpers = report["helpers"]
    assert helpers["srgb_to_linear"] == pytest.approx([0.0, 0.04045 / 12.92, 0.21404114, 1.0])
    assert helpers["bilinear_same_size_is_identity"]
    assert helpers["bilinear_corners"] == [0.0, 11.0]
    assert helpers["bilinear_middle"] == pytest.approx(5.5)
    # Without masks (a render with Lock Interface on sends boxes only) the region pass fills
    # each box.
    assert helpers["box_region_rows"] == [4, 5, 6, 7]
    assert helpers["box_region_cols"] == [2, 3, 4, 5]
    assert helpers["box_depth_max"] == 0.0


def pixel_helpers() -> dict:
    from blender_addon.render.engine import (
        PASS_DEPTH,
        PASS_REGION,
        layout_passes,
        resize_bilinear,
        srgb_to_linear,
    )
    from engine.wire.layout import Layout

    boxes_only = Layout.from_dict(
        {
            "prompt": "a",
            "width": 64,
            "height": 64,
            "regions": [{"prompt": "a", "box": [0.25, 0.5, 0.75, 1.0]}],
        }
    )
    passes = layout_passes(boxes_only, 8, 8)
    rows, cols = np.nonzero(passes[PASS_REGION][:, :, 0] == 1)

    image = np.arange(12, dtype=np.float32).reshape(3, 4, 1)
    doubled = resize_bilinear(image, 6, 8)
    return {
        "srgb_to_linear": srgb_to_linear(np.array([0.0, 0.04045, 0.5, 1.0])).tolist(),
        "bilinear_same_size_is_identity": resize_bilinear(image, 3, 4) is image,
        "bilinear_corners": [float(doubled[0, 0, 0]), float(doubled[-1, -1, 0])],
        "bilinear_middle": float(resize_bilinear(image, 1, 1)[0, 0, 0]),
        "box_region_rows": sorted({int(r) for r in rows}),
        "box_region_cols": sorted({int(c) for c in cols}),
        "box_depth_max": float(passes[PASS_DEPTH].max()),
    }


# -- The child process --------------------------------------------------------------------------


def scenario_render(folder: str, model: str) -> dict:
    import bpy

    sys.path.insert(0, HERE)
    import test_batch_render
    from test_batch_render import scenario_make_scene

    # The F-curves' home differs between Blender versions; the shared helper finds both.
    test_batch_render._linear_keys = blender_scenario.linear_keys

    from blender_addon.blender.compat import set_file_format
    from blender_addon.blender.id_render import read_exr_channels
    from blender_addon.blender.images import read_image_rgb as read_rgb_png
    from blender_addon.client import engine_session
    from blender_addon.core import frames
    from blender_addon.core.png import png_size, read_gray_png
    from blender_addon.render.engine import resize_bilinear, srgb_to_linear

    blend = os.path.join(folder, "scene.blend")
    scenario_make_scene(blend, model)  # registers the add-on
    bpy.ops.wm.open_mainfile(filepath=blend)
    scene = bpy.context.scene
    scene.render.engine = "LAYOUT_DIFFUSION"
    scene.view_settings.view_transform = "Standard"
    # The engine's per-frame files go under the Output path's folder.
    render_dir = os.path.join(folder, "layout_diffusion")

    # F12 at frame 2, written as a multilayer EXR.
    scene.frame_set(2)
    settings = scene.render.image_settings
    set_file_format(settings, "OPEN_EXR_MULTILAYER")
    settings.color_depth = "32"
    settings.exr_codec = "NONE"  # read back by the add-on's own EXR reader
    scene.render.filepath = os.path.join(folder, "still.exr")
    result = bpy.ops.render.render(write_still=True)
    channels = _exr_channels(scene.render.filepath)
    r, g, b, a, region, colour_r, colour_g, colour_b, colour_a, depth = read_exr_channels(
        scene.render.filepath,
        tuple(
            (name,)
            for name in (
                "Combined.R",
                "Combined.G",
                "Combined.B",
                "Combined.A",
                "Layout Region.X",
                "Layout Color.R",
                "Layout Color.G",
                "Layout Color.B",
                "Layout Color.A",
                "Layout Depth.X",
            )
        ),
    )
    engine_png = os.path.join(render_dir, "frame_0002.png")
    combined = np.stack([r, g, b], axis=2)
    record = frames.read_sidecar(os.path.join(render_dir, "frame_0002.json"))
    from engine.wire.layout import Layout

    layout = Layout.from_dict(record["layout"], base_dir=render_dir)
    mask = read_gray_png(layout.regions[0].mask) > 127
    saved_png = os.path.join(folder, "still.png")
    set_file_format(settings, "PNG")
    settings.color_depth = "8"
    bpy.data.images["Render Result"].save_render(saved_png)
    inside = region > 0
    still = {
        "result": sorted(result),
        "channels": channels,
        "size": [int(r.shape[1]), int(r.shape[0])],
        "combined_vs_engine_png": float(
            np.abs(combined - srgb_to_linear(read_rgb_png(engine_png))).max()
        ),
        "combined_alpha": [float(a.min()), float(a.max())],
        "combined_std": float(combined.std()),
        "saved_png_vs_engine_png": int(
            np.abs(
                np.rint(read_rgb_png(saved_png) * 255) - np.rint(read_rgb_png(engine_png) * 255)
            ).max()
        ),
        "region_values": sorted(float(v) for v in np.unique(region)),
        "region_vs_mask": int(np.count_nonzero(inside != mask)),
        "color_where_region": [
            float(channel[inside].mean()) for channel in (colour_r, colour_g, colour_b, colour_a)
        ],
        "depth_vs_png": float(np.abs(depth - read_gray_png(layout.depth) / 65535.0).max()),
        "depth_max": float(depth.max()),
        "sidecar_frame": record["frame"],
    }

    # A render size that is no multiple of 8: the Layout rounds it, Combined is resized back.
    scene.render.resolution_x, scene.render.resolution_y = 60, 68
    set_file_format(settings, "OPEN_EXR_MULTILAYER")
    settings.color_depth = "32"
    scene.render.filepath = os.path.join(folder, "rounded.exr")
    bpy.ops.render.render(write_still=True)
    (red,) = read_exr_channels(scene.render.filepath, (("Combined.R",),))
    record = frames.read_sidecar(os.path.join(render_dir, "frame_0002.json"))
    expected = srgb_to_linear(resize_bilinear(read_rgb_png(engine_png), 68, 60))[:, :, 0]
    still["rounded"] = {
        "result_size": [int(red.shape[1]), int(red.shape[0])],
        "layout_size": [record["layout"]["width"], record["layout"]["height"]],
        "combined_vs_resized_png": float(np.abs(red - expected).max()),
    }
    scene.render.resolution_x = scene.render.resolution_y = 64
    set_file_format(settings, "PNG")
    settings.color_depth = "8"

    # Ctrl-F12 over frames 1-3 with Blender's output settings, twice, Overwrite off.
    out = os.path.join(folder, "anim")
    scene.render.filepath = os.path.join(out, "img_####")
    scene.render.use_overwrite = False
    bpy.ops.render.render(animation=True)
    names = sorted(n for n in os.listdir(out) if n.endswith(".png"))
    before = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in names}
    pid = engine_session.current_client().pid
    bpy.ops.render.render(animation=True)
    rewritten = [n for n in names if os.stat(os.path.join(out, n)).st_mtime_ns != before[n]]
    sidecars = [
        frames.read_sidecar(os.path.join(out, "layout_diffusion", f"frame_000{f}.json"))
        for f in (1, 2, 3)
    ]
    animation = {
        "files": names,
        "png_sizes": [list(png_size(os.path.join(out, n))) for n in names],
        "box_x0": [s["layout"]["regions"][0]["box"][0] for s in sidecars],
        "engine_pids": len({pid, engine_session.current_client().pid}),
        "load_seconds": [s["timings"]["load_seconds"] for s in sidecars],
        "weights": [s["layout"]["regions"][0]["weight"] for s in sidecars],
        "guidance": [s["layout"]["guidance_scale"] for s in sidecars],
        "rewritten_without_overwrite": rewritten,
    }

    # Nothing labeled: the render fails with a message instead of an empty image.
    scene.objects["Cube"].layout_diffusion.enabled = False
    scene.render.filepath = os.path.join(folder, "empty.png")
    try:
        bpy.ops.render.render(write_still=True)
        error = ""
    except RuntimeError as exc:
        error = str(exc)

    # An error of a kind nobody expected (here a TypeError) fails the render too: F12 must never
    # report success with an empty frame.
    from blender_addon.render import engine as render_engine

    scene.objects["Cube"].layout_diffusion.enabled = True
    scene.render.filepath = os.path.join(folder, "unexpected.png")

    def broken(*args, **kwargs):
        raise TypeError("a bug")

    saved, render_engine.build_request = render_engine.build_request, broken
    try:
        bpy.ops.render.render(write_still=True)
        unexpected = {"error": "", "written": os.path.exists(scene.render.filepath)}
    except RuntimeError as exc:
        unexpected = {"error": str(exc), "written": os.path.exists(scene.render.filepath)}
    finally:
        render_engine.build_request = saved
    engine_session.shutdown()
    return {
        "still": still,
        "animation": animation,
        "error": error,
        "unexpected": unexpected,
        "helpers": pixel_helpers(),
    }


def _exr_channels(path: str) -> list[str]:
    from blender_addon.core.exr import read_exr

    return list(read_exr(path))


if __name__ == "__main__":
    blender_scenario.report(globals()[f"scenario_{sys.argv[1]}"](*sys.argv[2:]))
