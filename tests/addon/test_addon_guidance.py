"""The add-on's guidance and condition settings, on bpy 5.0 (headless) with the real engine.

Guidance mode, the pull toward the proxy render, init image and strengths, depth ControlNet and
per-object reference images must reach the Layout the operator sends; Re-generate Object must
change one object and keep every other pixel; conditions the engine cannot apply must come back
as messages the artist can act on. bpy runs in a child ``python`` (this file run as a script
with a scenario name), as in ``test_addon.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys

import blender_scenario
import numpy as np
import pytest
from blender_scenario import ROOT
from engine.model_defaults import SDXL_DEFAULTS


def run_scenario(name: str, user_dir: str, *args: str, timeout: float = 600) -> dict:
    return blender_scenario.run_scenario(__file__, name, user_dir, *args, timeout=timeout)


def png_header(path: str) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) of a PNG file."""
    with open(path, "rb") as handle:
        head = handle.read(26)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", path
    return struct.unpack(">IIBB", head[16:26])


def read_rgb(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


# -- Tests without bpy ---------------------------------------------------------------------------


def test_condition_state_reads_the_last_health_check():
    from blender_addon.client.engine_session import condition_state, describe_hello, has_capability

    reply = {
        "engine_version": "0.1.0",
        "protocol": 1,
        "device": "cpu",
        "dtype": "float32",
        "capabilities": ["attention", "latent", "cancel", "controlnet"],
        "conditions": {
            "controlnet": {"available": True, "spec": "/m/cn", "message": "/m/cn"},
            "ip_adapter": {"available": False, "spec": "/m/ip", "message": "no weights in /m/ip"},
        },
    }
    assert condition_state("controlnet", "/m/cn", reply) == (
        True,
        "Depth ControlNet found: /m/cn",
    )
    assert condition_state("ip_adapter", "/m/ip", reply) == (
        False,
        "IP-Adapter unavailable: no weights in /m/ip",
    )
    # A check made with another spec says nothing about this one.
    assert condition_state("controlnet", "/other", reply)[0] is None
    assert condition_state("controlnet", "", reply) == (False, "No Depth ControlNet set")
    assert condition_state("controlnet", "/m/cn", {})[0] is None
    assert has_capability("latent", reply) is True
    assert has_capability("latent", {"capabilities": ["attention"]}) is False
    assert has_capability("latent", {}) is None
    assert describe_hello(reply)[1:] == [
        "Guidance modes: attention, latent",
        "Depth ControlNet: available (/m/cn)",
        "IP-Adapter: unavailable: no weights in /m/ip",
    ]


def test_engine_errors_about_conditions_name_the_setting_and_the_object():
    from blender_addon.core.request import explain_error

    layout = {"regions": [{"name": "red_box"}, {"name": "blue_ball.001"}]}
    text = explain_error(
        {"code": "model_not_found", "message": "ControlNet 'x' not found", "field": "controlnet"},
        layout,
    )
    assert text.startswith("Depth ControlNet is not available: ControlNet 'x' not found.")
    assert "3D View sidebar > Layout > Conditions" in text
    text = explain_error(
        {"code": "bad_layout", "message": "not a PNG", "field": "layout.regions[1].image"}, layout
    )
    assert text == "Object 'blue_ball.001': not a PNG"
    assert explain_error({"code": "busy", "message": "wait"}, layout) is None


# -- bpy + engine --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guidance(
    tiny_model_dir, tiny_controlnet_dir, tiny_ip_adapter_dir, tiny_gligen_dir, tmp_path_factory
) -> dict:
    return run_scenario(
        "guidance",
        str(tmp_path_factory.mktemp("blender-user")),
        tiny_model_dir,
        tiny_controlnet_dir,
        tiny_ip_adapter_dir,
        tiny_gligen_dir,
    )


def test_new_settings_default_to_the_layout_defaults(guidance):
    from blender_addon.wire.layout import Layout, Region

    layout, region = Layout(prompt=""), Region(prompt="", box=(0, 0, 1, 1))
    assert guidance["defaults"] == {
        "scene": {
            "mode": layout.mode.upper(),
            "use_reference": False,
            "reference_source": "PROXIES",
            # Left to the model, as a Layout leaves it; the manual value starts at SDXL's.
            "use_model_fraction": layout.reference_fraction is None,
            "reference_fraction": SDXL_DEFAULTS["reference_fraction"],
            "init_source": "NONE",
            "strength": layout.strength,
            "controlnet": "",
            "depth_scale": layout.depth_scale,
            "depth_start": layout.depth_start,
            "depth_end": layout.depth_end,
            "ip_adapter": "",
            "regenerate_seed": "NEXT",
            "result_seed": -1,
        },
        "object": {
            "strength": 1.0,
            "reference_image": None,
            "reference_image_scale": region.image_scale,
            "use_depth_scale": False,
        },
    }


def test_settings_flow_into_the_layout_sent(guidance, tiny_controlnet_dir, tiny_ip_adapter_dir):
    sent = guidance["sent"]["layout"]
    assert sent["mode"] == "latent"
    assert (sent["reference_scale"], sent["reference_fraction"]) == (0.3, 0.2)
    assert (sent["depth_scale"], sent["depth_start"], sent["depth_end"]) == (0.8, 0.1, 0.9)
    assert sent["strength"] == 0.6 and sent["keep_outside"] is False
    regions = {r["name"]: r for r in sent["regions"]}
    assert (regions["red_box"]["strength"], regions["blue_ball"]["strength"]) == (0.25, 1.0)
    assert (regions["red_box"]["depth_scale"], regions["blue_ball"]["depth_scale"]) == (None, 0.4)
    assert regions["red_box"]["image_scale"] == 0.7 and regions["blue_ball"]["image"] is None
    assert guidance["sent"]["options"] == {
        "controlnet": tiny_controlnet_dir,
        "ip_adapter": tiny_ip_adapter_dir,
        "gligen": None,
    }
    # The Layout file next to the result says the same, paths relative to its folder.
    assert guidance["saved_matches_sent"] is True


def test_pull_toward_an_engine_pass_sends_no_proxy_render_and_gligen_makes_it(
    guidance, tiny_gligen_dir
):
    engine_pass = guidance["engine_pass"]
    assert engine_pass["operator"] == ["FINISHED"], engine_pass["reports"]
    assert engine_pass["reference"] is None and engine_pass["reference_scale"] == 0.3
    assert engine_pass["options"]["gligen"] == tiny_gligen_dir
    reference = engine_pass["conditions"]["reference"]
    assert (reference["source"], reference["model"]) == ("gligen", tiny_gligen_dir)


def test_proxy_render_is_an_rgb_png_of_the_layout_size(guidance):
    sent = guidance["sent"]["layout"]
    assert os.path.isfile(sent["reference"])
    assert png_header(sent["reference"]) == (sent["width"], sent["height"], 8, 2)
    pixels = read_rgb(sent["reference"])
    # "red box" is painted red where its mask is.
    red = next(r for r in sent["regions"] if r["name"] == "red_box")
    inside = read_rgb(red["mask"])[..., 0] > 127
    assert inside.any() and (pixels[inside] == [pixels[inside][0]]).all()
    assert pixels[inside][0][0] > 150 and pixels[inside][0][2] < 100


def test_blender_images_are_written_as_png(guidance):
    sent = guidance["sent"]["layout"]
    red = next(r for r in sent["regions"] if r["name"] == "red_box")
    # A PNG file loaded into Blender travels byte for byte.
    with open(red["image"], "rb") as sent_file, open(guidance["reference_source"], "rb") as src:
        assert sent_file.read() == src.read()
    # A generated (painted) image goes through its pixels, top row first.
    assert png_header(sent["init_image"]) == (96, 64, 8, 2)
    expected = np.asarray(guidance["init_pixels"], dtype=np.uint8)
    assert (read_rgb(sent["init_image"]) == expected).all()


def test_guided_generation_runs_with_every_condition(guidance):
    result = guidance["result"]
    assert result["operator"] == ["FINISHED"], result["reports"]
    conditions = result["conditions"]
    assert conditions["controlnet"]["scale"] == 0.8
    assert conditions["controlnet"]["region_scales"] == [None, 0.4]
    assert conditions["ip_adapter"]["images"] == 1


def test_a_condition_the_engine_did_not_apply_is_reported(guidance):
    assert guidance["unused_depth_reports"] == [
        ["INFO", "Generated 96x64, seed 3"],
        [
            "WARNING",
            "The depth ControlNet did not act: every depth scale is 0 or no object's depth was "
            "rendered",
        ],
    ]


def test_unavailable_conditions_read_as_actions(guidance):
    errors = guidance["errors"]
    assert errors["no_ip_adapter"] == (
        "'red_box' has a reference image, but no IP-Adapter is set to apply it: set IP-Adapter "
        "under 3D View sidebar > Layout > Conditions, or clear the reference image (Object "
        "properties > Layout)"
    )
    assert errors["missing_controlnet"].startswith("Depth ControlNet is not available: ")
    assert "no-such-controlnet" in errors["missing_controlnet"]
    assert "clear it to generate without it" in errors["missing_controlnet"]
    assert errors["missing_ip_adapter"].startswith("IP-Adapter is not available: ")
    assert "Depth End (0.20) must be after Depth Start (0.50)" in errors["depth_order"]
    assert "there is no result yet" in errors["init_without_result"]
    assert "no image is chosen" in errors["init_without_image"]


def test_health_check_greys_out_what_the_engine_lacks(guidance):
    check = guidance["check"]
    assert check["controlnet"] == [True, "Depth ControlNet found: " + check["controlnet_path"]]
    assert check["ip_adapter"][0] is False
    assert check["ip_adapter"][1].startswith("IP-Adapter unavailable: IP-Adapter ")
    assert "Depth ControlNet: available" in check["report"]
    drawn = guidance["drawn"]
    assert drawn["errors"] == []
    assert {"controlnet", "depth_scale", "ip_adapter"} <= set(drawn["conditions"]["props"])
    assert check["ip_adapter"][1] in drawn["conditions"]["labels"]
    assert "layout_diffusion.check_engine" in drawn["conditions"]["operators"]
    assert {"mode", "use_reference", "reference_scale", "init_source", "init_image"} <= set(
        drawn["guidance"]["props"]
    )
    # The engine's cost: (R + 3) / 2 with the default base_ratio.
    assert "Up to 2.5x the time of Attention (2 prompts)" in drawn["guidance"]["labels"]
    assert (
        "Latent mode, proxy pull, init image, depth, 1 reference image" in drawn["main"]["labels"]
    )
    assert {"strength", "reference_image", "reference_image_scale", "depth_scale"} <= set(
        drawn["object"]["props"]
    )
    assert "layout_diffusion.regenerate_object" in drawn["object"]["operators"]
    assert drawn["context_menu"] == ["layout_diffusion.regenerate_object"]
    assert drawn["context_menu_unlabeled"] == []


@pytest.fixture(scope="module")
def regenerated(tiny_model_dir, tmp_path_factory) -> dict:
    return run_scenario("regenerate", str(tmp_path_factory.mktemp("blender-user")), tiny_model_dir)


def test_regenerate_sends_one_free_object_over_the_last_result(regenerated):
    first = regenerated["first"]
    assert first["operator"] == ["FINISHED"] and first["result_seed"] == 5
    # By default the model chooses how long the proxy render pulls.
    assert regenerated["first_fraction"] is None
    sent = regenerated["sent"]
    assert os.path.basename(sent["init_image"]) == "previous.png"
    assert (sent["strength"], sent["keep_outside"], sent["seed"]) == (0.0, True, 6)
    assert [(r["name"], r["strength"]) for r in sent["regions"]] == [
        ("red_box", 1.0),
        ("blue_ball", None),
    ]
    assert regenerated["operator"] == ["FINISHED"]
    assert regenerated["reports"][0] == ["INFO", "Re-generating 'red_box' with seed 6"]
    assert regenerated["reports"][-1][1].startswith("Re-generated 'red_box' 96x64")
    assert regenerated["result_seed"] == 6 and regenerated["next_seed"] == 7
    assert regenerated["result_images"] == 1, "the result replaces the image, no copy"
    assert regenerated["image_is_new_result"] is True


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """``mask`` grown by ``pixels`` in every direction (a square neighbourhood)."""
    grown = mask.copy()
    for _ in range(pixels):
        padded = np.pad(grown, 1)
        grown = np.zeros_like(grown)
        for dy in range(3):
            for dx in range(3):
                grown |= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return grown


def test_regenerate_keeps_every_pixel_outside_the_object(regenerated):
    sent = regenerated["sent"]
    before = read_rgb(sent["init_image"])
    after = read_rgb(regenerated["result_path"])
    red = next(r for r in sent["regions"] if r["name"] == "red_box")
    mask = read_rgb(red["mask"])[..., 0] > 0
    # The composite's feathered band reaches 2 * vae_scale_factor pixels past the mask: 4 here.
    near = dilate(mask, 4)
    assert (after[~near] == before[~near]).all()
    assert (after[mask] != before[mask]).any(), "the object itself must change"


def test_regenerate_refusals_say_what_to_do(regenerated):
    errors = regenerated["errors"]
    assert errors["before_any_result"] == (
        "There is no result to re-generate an object in: press Generate from Camera first"
    )
    assert "is not a labeled object" in errors["unlabeled"]
    assert errors["size_changed"] == (
        "The last result is 96x64 but the render size now gives 128x64: generate the whole "
        "image again at this size first"
    )


@pytest.fixture(scope="module")
def rendered_init(tiny_model_dir, tmp_path_factory) -> dict:
    return run_scenario(
        "rendered_init", str(tmp_path_factory.mktemp("blender-user")), tiny_model_dir
    )


def test_init_images_from_the_proxy_render_and_object_layers(rendered_init):
    from blender_addon.core.colors import BACKGROUND, COLOR_WORDS

    proxies, layers = rendered_init["proxies"], rendered_init["layers"]
    for run in (proxies, layers):
        assert run["operator"] == ["FINISHED"], run["reports"]
        sent = run["sent"]
        # Rendered to start from, not to pull toward: the pull stays off.
        assert sent["reference"] is None and sent["reference_scale"] == 0.0
        assert sent["strength"] == 0.5 and os.path.basename(sent["init_image"]) == "init.png"
        assert [r["strength"] for r in sent["regions"]] == [1.0, 1.0]
    regions = {r["name"]: r for r in proxies["sent"]["regions"]}
    red = read_rgb(regions["red_box"]["mask"])[..., 0] > 127
    blue = read_rgb(regions["blue_ball"]["mask"])[..., 0] > 127

    # Proxy Render: each object in its label's colour where its mask is, grey elsewhere.
    plain = read_rgb(proxies["init"])
    assert (plain[red] == COLOR_WORDS["red"]).all() and (plain[blue] == COLOR_WORDS["blue"]).all()
    assert (plain[~(red | blue)] == BACKGROUND).all()

    # Object Layers: the red box's 2:1 image (left half opaque green, right half transparent)
    # fitted to the box's width and centred; the rest of the box and image is the proxy render.
    composite = read_rgb(layers["init"])
    assert (composite[~red] == plain[~red]).all()
    green = (composite == [0, 200, 0]).all(axis=2)
    assert green.any() and not (green & ~red).any()
    x0, y0, x1, y1 = regions["red_box"]["box"]
    box_w, centre_y = (x1 - x0) * 96, (y0 + y1) / 2 * 64
    rows, cols = np.nonzero(green)
    # The rest of the box is red, but for the column where the image's opaque half ends
    # between two pixels: a blend of the two.
    others = red & ~green & ~(composite == COLOR_WORDS["red"]).all(axis=2)
    assert set(np.nonzero(others)[1]) <= {cols.max() + 1}
    assert abs(cols.min() - x0 * 96) <= 1 and abs(cols.max() + 1 - (x0 * 96 + box_w / 2)) <= 1
    assert abs(rows.max() + 1 - rows.min() - box_w / 2) <= 1, "the image keeps its aspect"
    assert abs((rows.min() + rows.max() + 1) / 2 - centre_y) <= 1
    # The layer image is not an IP-Adapter condition: there is none, and no error for it.
    assert [r["image"] for r in layers["sent"]["regions"]] == [None, None]

    # Batch and F12 renders make each frame's init image from its own proxy render.
    frame = rendered_init["frame"]
    assert frame["reference"] is None and frame["init_image"].endswith("/frame/init.png")
    assert (read_rgb(frame["init_image"]) == composite).all()


def test_init_from_render_refusals_and_hints(rendered_init):
    errors = rendered_init["errors"]
    assert errors["layers_without_images"].startswith(
        "Init Image is Object Layers, but no labeled object in the image has a Reference Image: "
    )
    assert "set Init Image to Proxy Render" in errors["layers_without_images"]
    assert errors["interactive_f12"].startswith(
        "Init Image is Object Layers, but an interactive F12 sends boxes only"
    )
    drawn = rendered_init["drawn"]
    assert drawn["errors"] == []
    assert "No labeled object has a Reference Image" in drawn["without_images"]
    assert "1 object layer over the proxy render" in drawn["with_image"]


# -- Scenarios (run in a child process with bpy) -------------------------------------------------


def _setup_scene(model: str) -> None:
    """Two labeled cubes left and right of a camera, 96x64, saved next to the test's files."""
    import bpy

    scene = blender_scenario.empty_project_scene()
    for name, x in (("red_box", -1.5), ("blue_ball", 1.5)):
        bpy.ops.mesh.primitive_cube_add(location=(x, 0, 0))
        bpy.context.object.name = name
        bpy.context.object.layout_diffusion.enabled = True
    scene.camera.location = (0.0, -10.0, 0.0)
    scene.camera.rotation_euler = (1.5708, 0.0, 0.0)
    settings = scene.layout_diffusion
    settings.model = model
    settings.steps = 3
    settings.prompt = "a red box and a blue ball on a table"


class _Capture:
    """Records what the operator hands the engine client, then lets it through."""

    def __init__(self):
        from blender_addon.client import engine_client

        self.calls: list[dict] = []
        self._original = engine_client.EngineClient.generate
        capture = self

        def generate(client, layout, out, model=None, options=None):
            capture.calls.append({"layout": json.loads(json.dumps(layout)), "options": options})
            return capture._original(client, layout, out, model, options=options)

        engine_client.EngineClient.generate = generate


def _reports(op, **kwargs) -> tuple[list, list]:
    """Run an operator in execute mode, catching its reports (errors raise in background)."""
    try:
        return sorted(op(**kwargs)), []
    except RuntimeError as exc:
        return ["ERROR"], [str(exc)]


def _error_of(op, **kwargs) -> str:
    result, messages = _reports(op, **kwargs)
    return messages[0].removeprefix("Error: ").strip() if messages else f"no error {result}"


def _draw(function, **context_fields) -> dict:
    """Draw a panel or menu function into test_addon's recording layout."""
    from types import SimpleNamespace

    import bpy

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_addon import _Recorder

    log = {"errors": [], "props": [], "operators": [], "labels": [], "progress": []}
    context = SimpleNamespace(
        scene=bpy.context.scene,
        preferences=bpy.context.preferences,
        **context_fields,
    )
    function(SimpleNamespace(layout=_Recorder(log)), context)
    return log


def scenario_guidance(model: str, controlnet: str, ip_adapter: str, gligen: str) -> dict:
    import bpy  # noqa: I001 -- bpy first: it puts addon_utils on sys.path
    import addon_utils

    addon_utils.enable("blender_addon", default_set=True, handle_error=None)
    from blender_addon.blender import outputs
    from blender_addon.client import engine_session
    from blender_addon.core.errors import UserError
    from blender_addon.core.png import write_rgb_png
    from blender_addon.ui import operators, panels
    from blender_addon.wire.layout import Layout

    _setup_scene(model)
    scene = bpy.context.scene
    settings = scene.layout_diffusion
    out: dict = {"errors": {}}
    errors = out["errors"]
    label = bpy.data.objects["red_box"].layout_diffusion
    out["defaults"] = {
        "scene": {
            name: getattr(settings, name)
            for name in (
                "mode",
                "use_reference",
                "reference_source",
                "use_model_fraction",
                "reference_fraction",
                "init_source",
                "strength",
                "controlnet",
                "depth_scale",
                "depth_start",
                "depth_end",
                "ip_adapter",
                "regenerate_seed",
                "result_seed",
            )
        },
        "object": {
            "strength": label.strength,
            "reference_image": label.reference_image,
            "reference_image_scale": label.reference_image_scale,
            "use_depth_scale": label.use_depth_scale,
        },
    }
    out["defaults"]["scene"]["reference_fraction"] = round(settings.reference_fraction, 6)
    capture = _Capture()

    # Before any result: the init image has nothing to start from.
    settings.init_source = "RESULT"
    errors["init_without_result"] = _error_of(bpy.ops.layout_diffusion.generate)
    settings.init_source = "IMAGE"
    errors["init_without_image"] = _error_of(bpy.ops.layout_diffusion.generate)

    # The init image: a painted datablock (no file) with a known gradient.
    plate = bpy.data.images.new("plate", 96, 64, alpha=False)
    rows = np.arange(64, dtype=np.float32)[:, None] * 3 / 255.0
    cols = np.arange(96, dtype=np.float32)[None, :] * 2 / 255.0
    rgba = np.ones((64, 96, 4), dtype=np.float32)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = rows + 0 * cols, cols + 0 * rows, 100 / 255.0
    plate.pixels.foreach_set(rgba.ravel())  # Blender's row 0 is the bottom
    out["init_pixels"] = np.rint(rgba[::-1, :, :3] * 255).astype(int).tolist()
    settings.init_image = plate
    settings.strength = 0.6

    # The red box's reference image: a PNG file loaded as a datablock.
    source = os.path.join(os.environ["BLENDER_USER_RESOURCES"], "photo.png")
    photo = np.random.default_rng(1).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    write_rgb_png(source, photo)
    out["reference_source"] = source
    red = bpy.data.objects["red_box"].layout_diffusion
    red.reference_image = bpy.data.images.load(source)
    red.reference_image_scale = 0.7
    red.strength = 0.25
    blue = bpy.data.objects["blue_ball"].layout_diffusion
    blue.use_depth_scale, blue.depth_scale = True, 0.4

    settings.mode = "LATENT"
    settings.use_reference, settings.reference_scale, settings.reference_fraction = True, 0.3, 0.2
    settings.use_model_fraction = False
    settings.depth_scale, settings.depth_start, settings.depth_end = 0.8, 0.1, 0.9

    # A reference image without an IP-Adapter is refused before the engine is asked.
    errors["no_ip_adapter"] = _error_of(bpy.ops.layout_diffusion.generate)
    settings.controlnet = os.path.join(os.path.dirname(controlnet), "no-such-controlnet")
    settings.ip_adapter = ip_adapter
    errors["missing_controlnet"] = _error_of(bpy.ops.layout_diffusion.generate)
    settings.controlnet = controlnet
    settings.ip_adapter = os.path.join(os.path.dirname(ip_adapter), "no-such-adapter")
    errors["missing_ip_adapter"] = _error_of(bpy.ops.layout_diffusion.generate)
    settings.depth_start, settings.depth_end = 0.5, 0.2
    errors["depth_order"] = _error_of(bpy.ops.layout_diffusion.generate)
    settings.depth_start, settings.depth_end = 0.1, 0.9

    # The health check with the scene's conditions: the bad IP-Adapter is unavailable.
    result, messages = _reports(bpy.ops.layout_diffusion.check_engine)
    out["check"] = {
        "controlnet": list(engine_session.condition_state("controlnet", controlnet)),
        "controlnet_path": controlnet,
        "ip_adapter": list(engine_session.condition_state("ip_adapter", settings.ip_adapter)),
        "report": "; ".join(engine_session.describe_hello(engine_session.last_hello())),
    }
    view_layer = bpy.context.view_layer
    drawn = {"errors": []}
    for name, function, fields in (
        ("conditions", panels.VIEW3D_PT_layout_diffusion_conditions.draw, {}),
        ("guidance", panels.VIEW3D_PT_layout_diffusion_guidance.draw, {}),
        ("main", panels.VIEW3D_PT_layout_diffusion.draw, {}),
        ("object", panels.OBJECT_PT_layout_diffusion.draw, {"object": bpy.data.objects["red_box"]}),
    ):
        log = _draw(function, **fields)
        drawn["errors"] += log.pop("errors")
        drawn[name] = log
    view_layer.objects.active = bpy.data.objects["red_box"]
    menu = _draw(panels.draw_object_context_menu, active_object=bpy.data.objects["red_box"])
    drawn["context_menu"] = menu["operators"]
    camera = scene.camera
    menu = _draw(panels.draw_object_context_menu, active_object=camera)
    drawn["context_menu_unlabeled"] = menu["operators"]
    drawn["errors"] += menu["errors"]
    out["drawn"] = drawn

    settings.ip_adapter = ip_adapter
    capture.calls.clear()
    reports = []
    result = operators.LAYOUT_DIFFUSION_OT_generate
    try:
        run = operators.start_generation(bpy.context)
        for event in run.job:
            run.update(event)
        final = run.job.final
        result = operators.finish(run, lambda kind, text: reports.append([sorted(kind)[0], text]))
    except UserError as exc:
        final, result, reports = {}, {"CANCELLED"}, [["ERROR", str(exc)]]
    out["result"] = {
        "operator": sorted(result),
        "reports": reports,
        "conditions": (final or {}).get("conditions"),
    }
    out["sent"] = capture.calls[-1]
    # An engine that reports the depth ControlNet did not act (every depth scale 0) is heard.
    from blender_addon.client import engine_client

    job = engine_client.Job(None, "fake", "generate")
    job._deliver(
        {
            "event": "result",
            "path": run.out,
            "seed": 3,
            "conditions": {"controlnet": None, "ip_adapter": None},
        }
    )
    unused = []
    operators.finish(
        operators.GenerationRun(job, scene.name, run.out, 96, 64),
        lambda kind, text: unused.append([sorted(kind)[0], text]),
    )
    out["unused_depth_reports"] = unused
    saved = Layout.load(os.path.join(outputs.output_dir(scene), "layout.json"))
    out["saved_matches_sent"] = saved.to_dict() == out["sent"]["layout"]

    # The pull toward an engine pass: no proxy render is sent, GLIGEN makes the reference.
    settings.reference_source, settings.gligen = "ENGINE", gligen
    settings.mode, settings.controlnet, settings.ip_adapter = "ATTENTION", "", ""
    bpy.data.objects["red_box"].layout_diffusion.reference_image = None
    capture.calls.clear()
    result, reports = _reports(bpy.ops.layout_diffusion.generate)
    sent = capture.calls[-1] if capture.calls else {"layout": {}, "options": {}}
    from engine.provenance import read_provenance

    out["engine_pass"] = {
        "operator": result,
        "reports": reports,
        "reference": sent["layout"].get("reference", "absent"),
        "reference_scale": sent["layout"].get("reference_scale"),
        "options": sent["options"],
        "conditions": read_provenance(os.path.join(outputs.output_dir(scene), "result.png"))[
            "conditions"
        ],
    }
    engine_session.shutdown()
    return out


def scenario_regenerate(model: str) -> dict:
    import bpy  # noqa: I001 -- bpy first: it puts addon_utils on sys.path
    import addon_utils

    addon_utils.enable("blender_addon", default_set=True, handle_error=None)
    from blender_addon.blender import outputs
    from blender_addon.client import engine_session
    from blender_addon.core import request
    from blender_addon.ui import operators

    _setup_scene(model)
    scene = bpy.context.scene
    settings = scene.layout_diffusion
    settings.seed = 5
    out: dict = {"errors": {}}
    errors = out["errors"]
    capture = _Capture()
    errors["before_any_result"] = _error_of(
        bpy.ops.layout_diffusion.regenerate_object, object_name="red_box"
    )
    errors["unlabeled"] = _error_of(
        bpy.ops.layout_diffusion.regenerate_object, object_name="Camera"
    )
    first, _ = _reports(bpy.ops.layout_diffusion.generate)
    out["first"] = {"operator": first, "result_seed": settings.result_seed}
    out["first_fraction"] = (
        capture.calls[-1]["layout"].get("reference_fraction", "absent") if capture.calls else "-"
    )

    scene.render.resolution_x = 128
    errors["size_changed"] = _error_of(
        bpy.ops.layout_diffusion.regenerate_object, object_name="red_box"
    )
    scene.render.resolution_x = 96

    # Through the operator class, to read its reports as the artist would.
    capture.calls.clear()
    reports: list = []
    op = operators.LAYOUT_DIFFUSION_OT_regenerate_object
    from types import SimpleNamespace

    fake = SimpleNamespace(
        object_name="red_box",
        seed=-1,
        report=lambda kind, text: reports.append([sorted(kind)[0], text]),
    )
    run = op._start(fake, bpy.context)
    result = {"CANCELLED"}
    if run is not None:
        for event in run.job:
            run.update(event)
        result = operators.finish(run, fake.report)
    out["operator"] = sorted(result)
    out["reports"] = reports
    out["sent"] = capture.calls[-1]["layout"] if capture.calls else {}
    out["result_seed"] = settings.result_seed

    out["next_seed"] = request.next_seed(settings)
    out["result_path"] = os.path.join(outputs.output_dir(scene), request.RESULT_NAME)
    image = bpy.data.images[operators.RESULT_IMAGE]
    out["result_images"] = sum(
        1 for img in bpy.data.images if img.name.startswith(operators.RESULT_IMAGE)
    )
    out["image_is_new_result"] = bpy.path.abspath(image.filepath) == out["result_path"]
    engine_session.shutdown()
    return out


def scenario_rendered_init(model: str) -> dict:
    import bpy  # noqa: I001 -- bpy first: it puts addon_utils on sys.path
    import addon_utils

    addon_utils.enable("blender_addon", default_set=True, handle_error=None)
    from blender_addon.blender import frame_request, outputs
    from blender_addon.client import engine_session
    from blender_addon.core.errors import UserError
    from blender_addon.ui import panels

    _setup_scene(model)
    scene = bpy.context.scene
    settings = scene.layout_diffusion
    settings.strength = 0.5
    folder = outputs.output_dir(scene)
    out: dict = {"errors": {}, "drawn": {"errors": []}}
    capture = _Capture()

    def generate(keep_as: str) -> dict:
        capture.calls.clear()
        result, reports = _reports(bpy.ops.layout_diffusion.generate)
        kept = os.path.join(folder, keep_as)
        # The next run writes init.png again.
        shutil.copyfile(os.path.join(folder, "init.png"), kept)
        sent = capture.calls[-1]["layout"] if capture.calls else {}
        return {"operator": result, "reports": reports, "sent": sent, "init": kept}

    def draw_guidance() -> list:
        log = _draw(panels.VIEW3D_PT_layout_diffusion_guidance.draw)
        out["drawn"]["errors"] += log["errors"]
        return log["labels"]

    settings.init_source = "LAYERS"
    out["errors"]["layers_without_images"] = _error_of(bpy.ops.layout_diffusion.generate)
    out["drawn"]["without_images"] = draw_guidance()

    settings.init_source = "PROXIES"
    out["proxies"] = generate("proxies.png")

    # A 2:1 RGBA image: left half opaque green, right half transparent magenta.
    image = bpy.data.images.new("red layer", 32, 16, alpha=True)
    pixels = np.zeros((16, 32, 4), dtype=np.float32)
    pixels[:, :16] = (0.0, 200 / 255, 0.0, 1.0)
    pixels[:, 16:] = (1.0, 0.0, 1.0, 0.0)
    image.pixels.foreach_set(pixels.ravel())
    bpy.data.objects["red_box"].layout_diffusion.reference_image = image
    settings.init_source = "LAYERS"
    out["layers"] = generate("layers.png")
    out["drawn"]["with_image"] = draw_guidance()

    frame_dir = os.path.join(folder, "frame")
    # Settings set from Python reach the evaluated scene the batch reads once it is tagged.
    scene.update_tag()
    depsgraph = bpy.context.evaluated_depsgraph_get()
    made = frame_request.build_request(scene, depsgraph, frame_dir, frame=1, seed_mode="shot")
    out["frame"] = made.layout.to_dict()
    try:
        frame_request.build_request(
            scene, depsgraph, frame_dir + "-boxes", frame=1, seed_mode="shot", masks=False
        )
        out["errors"]["interactive_f12"] = "no error"
    except UserError as exc:
        out["errors"]["interactive_f12"] = str(exc)
    engine_session.shutdown()
    return out


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    scenario = {
        "guidance": scenario_guidance,
        "regenerate": scenario_regenerate,
        "rendered_init": scenario_rendered_init,
    }
    result = scenario[sys.argv[1]](*sys.argv[2:])
    blender_scenario.report(result)
