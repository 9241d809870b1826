"""The Blender add-on on bpy 5.0 (headless), end to end with the real engine on the tiny model.

bpy runs in a child ``python`` (this file run as a script with a scenario name) so that bpy and
torch never share the pytest process; each scenario prints one JSON line that the tests check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import blender_scenario
import pytest
from blender_scenario import ROOT


def run_scenario(name: str, user_dir: str, *args: str, timeout: float = 600) -> dict:
    return blender_scenario.run_scenario(__file__, name, user_dir, *args, timeout=timeout)


# -- Tests without bpy ---------------------------------------------------------------------------


def test_importing_the_package_does_not_import_bpy():
    code = (
        "import sys; import blender_addon, blender_addon.client.engine_client, "
        "blender_addon.client.engine_session; print('bpy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr


def test_default_python_is_the_checkout_venv():
    from blender_addon.client import engine_session

    assert engine_session.checkout_root() == ROOT
    assert engine_session.default_python() == os.path.join(ROOT, ".venv", "bin", "python")
    assert engine_session.resolve_python(os.path.join(ROOT, ".venv")) == os.path.join(
        ROOT, ".venv", "bin", "python"
    )


def test_setup_installs_torch_before_the_engine(tmp_path):
    from blender_addon.client import engine_session

    commands = engine_session.setup_commands("/usr/bin/python3", str(tmp_path / "v"), ROOT)
    argvs = [argv for _, argv in commands]
    assert argvs[0] == ["/usr/bin/python3", "-m", "venv", str(tmp_path / "v")]
    venv_python = str(tmp_path / "v" / "bin" / "python")
    installs = [argv[-1] for argv in argvs if argv[:4] == [venv_python, "-m", "pip", "install"]]
    assert installs[-2:] == [engine_session.TORCH_SPEC, f"{ROOT}[engine]"]

    cpu = engine_session.setup_commands(
        "/usr/bin/python3", str(tmp_path / "v"), ROOT, torch_index_url="https://example.org/cpu"
    )
    torch_step = [argv for _, argv in cpu if engine_session.TORCH_SPEC in argv][0]
    assert torch_step[-2:] == ["--index-url", "https://example.org/cpu"]
    engine_step = [argv for _, argv in cpu if f"{ROOT}[engine]" in argv][0]
    assert "--index-url" not in engine_step, "only torch comes from the torch index"


def test_setup_task_runs_in_background_and_reports_the_failing_step():
    from blender_addon.client import engine_session

    gate = threading.Event()
    commands = [
        ("Saying hello", [sys.executable, "-c", "print('hello from step one')"]),
        ("Failing", [sys.executable, "-c", "import sys; print('no wheel'); sys.exit(4)"]),
    ]
    task = engine_session.SetupTask(commands)
    original = task.work

    def work():
        gate.wait(10)
        return original()

    task.work = work
    task.start()
    assert task.running and not task.done, "the task must not block its caller"
    gate.set()
    task.join(30)
    assert task.done and task.status == "failed"
    assert "Failing failed (exit code 4)" in task.error
    assert "no wheel" in task.error
    assert "hello from step one" in task.log


def test_health_check_reports_missing_interpreter(tmp_path):
    from blender_addon.client import engine_session

    task = engine_session.HealthCheckTask(str(tmp_path / "nope" / "python"), "shapes").start()
    task.join(30)
    assert task.error and "Set up engine" in task.error


def test_health_check_asks_the_real_engine(tiny_model_dir):
    from blender_addon.client import engine_session

    try:
        task = engine_session.HealthCheckTask(engine_session.default_python(), tiny_model_dir)
        task.start().join(300)
        assert task.error is None and task.status == "done"
        lines = engine_session.describe_hello(task.result)
    finally:
        engine_session.shutdown()
    assert lines[0].startswith("Engine 0.1.0 (protocol 1) on cpu, float32")
    assert lines[1] == f"Model '{tiny_model_dir}' found: {tiny_model_dir}"
    assert engine_session.current_client() is None


def test_describe_hello_lists_model_state():
    from blender_addon.client.engine_session import describe_hello

    lines = describe_hello(
        {
            "engine_version": "0.1.0",
            "protocol": 1,
            "device": "cpu",
            "dtype": "float32",
            "model": {"spec": "big", "found": False, "message": "not in the cache"},
        }
    )
    assert lines == [
        "Engine 0.1.0 (protocol 1) on cpu, float32",
        "Model 'big' not found: not in the cache",
    ]


def test_model_default_comes_from_the_check_made_with_that_model():
    from blender_addon.client.engine_session import model_default

    reply = {
        "model": {"spec": "shapes", "found": True, "layout_defaults": {"reference_fraction": 0.4}}
    }
    assert model_default("reference_fraction", "shapes", reply) == 0.4
    assert model_default("reference_fraction", "other", reply) is None
    assert model_default("steps", "shapes", reply) is None
    assert model_default("reference_fraction", "shapes", {}) is None


# -- bpy: registration, properties, label operators ----------------------------------------------


@pytest.fixture(scope="module")
def registration(tmp_path_factory) -> dict:
    return run_scenario("registration", str(tmp_path_factory.mktemp("blender-user")))


def test_addon_registers_and_unregisters_cleanly(registration):
    assert registration["registered"] == {
        "scene_props": True,
        "object_props": True,
        "generate": True,
        "panel": True,
        "prefs": True,
        "load_handlers": ["_forget_layouts"],
    }
    assert registration["unregistered"] == {
        "scene_props": False,
        "object_props": False,
        "load_handlers": [],
    }
    assert registration["reregistered"] is True


def test_scene_settings_defaults(registration):
    assert registration["scene_defaults"] == {
        "prompt": "",
        "negative_prompt": "",
        "background_prompt": "",
        "base_ratio": 0.2,
        "model": "shapes",
        "seed": 0,
        "steps": 30,
        "guidance_scale": 6.0,
        "show_overlay": True,
        "use_as_camera_background": False,
    }


def test_object_prompt_defaults_to_readable_name(registration):
    assert registration["prompts"] == {
        "default": "golden retriever",
        "after_rename": "red vintage car",
        "typed": "a dog on a sofa",
        "after_rename_when_typed": "a dog on a sofa",
        "cleared": "red vintage car",
        "weight": 1.0,
        "enabled": False,
    }
    assert registration["readable"] == {
        "golden_retriever.001": "golden retriever",
        "RedVintageCar": "red vintage car",
        "tree-big.002": "tree big",
    }


def test_blend_relative_model_paths_become_absolute(registration):
    spec, expected = registration["model_spec"]
    assert spec == expected


def test_outputs_go_next_to_the_blend_file_or_to_temp(registration):
    unsaved, saved, expected_unsaved, expected_saved = registration["output_dirs"]
    assert (unsaved, saved) == (expected_unsaved, expected_saved)


def test_label_and_unlabel_selected(registration):
    assert registration["labels"] == {
        "after_label": ["A", "B"],
        "after_unlabel": ["B"],
        "label_undo": True,
    }


def test_preferences_default_to_checkout_venv(registration):
    assert registration["prefs_python"] == os.path.join(ROOT, ".venv", "bin", "python")
    assert registration["prefs_source"] == ROOT


def test_set_up_engine_refuses_without_online_access(registration):
    assert registration["online_access"] is False
    assert "allow Online Access in Preferences > System > Network" in registration["setup_offline"]


def test_engine_failures_read_as_actions(registration):
    reports = registration["finish_reports"]
    assert reports["out_of_memory"] == {
        "result": ["CANCELLED"],
        "reports": [
            "The device ran out of memory at 2048x2048. (lower the render resolution, or press "
            "Check engine to see the device)"
        ],
    }
    assert reports["crashed"]["reports"] == [
        "The engine stopped unexpectedly (exit code 1); it restarts when you press Generate "
        "again. Cause: RuntimeError: CUDA driver version is insufficient"
    ]


def test_overlay_maps_boxes_through_the_camera_frame(registration):
    # Camera frame from (100, 50) to (300, 250) in region pixels (y up, as Blender's regions).
    assert registration["overlay"]["center"] == [200.0, 150.0]
    assert registration["overlay"]["outline"] == [
        [100.0, 250.0],
        [200.0, 250.0],
        [200.0, 150.0],
        [100.0, 150.0],
    ]


def test_panels_draw_with_existing_properties_and_operators(registration):
    drawn = registration["drawn"]
    assert drawn["errors"] == []
    # Idle: the Generate button; running: a progress bar with Cancel.
    assert "layout_diffusion.generate" in drawn["idle"]["operators"]
    assert "layout_diffusion.cancel" in drawn["running"]["operators"]
    assert drawn["running"]["progress"] == [[0.25, "Step 1/4"]]
    assert {"prompt", "model", "show_overlay"} <= set(drawn["idle"]["props"])
    assert drawn["objects"]["labels"] == ["B"]  # only B is still labeled
    assert drawn["header"] == ["layout_diffusion.generate"]
    assert {"python", "engine_source", "torch_index_url"} <= set(drawn["preferences"]["props"])
    assert "layout_diffusion.setup_engine" in drawn["preferences"]["operators"]


# -- bpy + engine: generate end to end -----------------------------------------------------------


@pytest.fixture(scope="module")
def generation(tiny_model_dir, tmp_path_factory) -> dict:
    return run_scenario("generation", str(tmp_path_factory.mktemp("blender-user")), tiny_model_dir)


def test_generate_sends_one_region_per_labeled_object(generation):
    first = generation["first"]
    assert first["result"] == ["FINISHED"]
    assert first["layout"]["size"] == [96, 64]
    assert first["layout"]["prompt"] == "two boxes on a table"
    assert first["layout"]["base_ratio"] == 0.2
    regions = first["layout"]["regions"]
    assert [(r["name"], r["prompt"]) for r in regions] == [
        ("red_box", "red box"),
        ("blue_ball.001", "a blue ball"),
    ]
    # The left cube's box lies in the left half, the right one's in the right half.
    assert regions[0]["box"][2] < 0.5 < regions[1]["box"][0]
    assert all(os.path.isabs(r["mask"]) for r in regions)
    assert first["overlay"] == ["red_box", "blue_ball.001"]
    assert first["overlay_reloaded"] == ["red_box", "blue_ball.001"]


def test_result_image_has_render_size_and_is_reused(generation):
    assert generation["first"]["image"] == [96, 64]
    assert generation["result_images"] == 1
    assert generation["camera_background"] is True


def test_warm_engine_is_reused_between_clicks(generation):
    assert generation["second"]["pid"] == generation["first"]["pid"]


def test_crashed_engine_reports_and_restarts_on_next_click(generation):
    crash = generation["crash"]
    assert "engine stopped unexpectedly" in crash["error"]
    assert "press Generate again" in crash["error"]
    assert crash["next_result"] == ["FINISHED"]
    assert crash["next_pid"] != crash["killed_pid"]


def test_modal_operator_shows_progress_and_finishes(generation):
    log = generation["modal"]["finished"]
    assert log["mouse"] == ["PASS_THROUGH"], "other events must reach Blender while generating"
    assert log["result"] == ["FINISHED"]
    assert log["progress"][-1] == 100 and log["progress"] == sorted(log["progress"])
    assert "Layout Diffusion: Step 3/3 (Esc to cancel)" in log["status"]
    assert log["status"][-1] is None, "the status bar text must be cleared"
    assert log["timer_removed"] and not log["running_after"]
    assert log["reports"][0][0] == "INFO" and log["reports"][0][1].startswith("Generated 96x64")


@pytest.mark.parametrize("how", ["esc", "button"])
def test_modal_operator_cancels_and_keeps_the_engine(generation, how):
    log = generation["modal"][how]
    expected = ["RUNNING_MODAL"] if how == "esc" else ["FINISHED"]
    assert log["cancel"] == expected
    assert log["result"] == ["CANCELLED"]
    assert log["steps_seen"] < 200
    assert any("Cancelling" in (text or "") for text in log["status"])
    assert log["reports"] == [["INFO", "Generation cancelled"]]
    assert not log["running_after"]
    assert generation["engine_alive_after_cancel"] is True


def test_errors_the_artist_can_act_on(generation):
    errors = generation["errors"]
    assert "camera" in errors["no_camera"].lower()
    assert "Label Selected" in errors["no_labels"]
    assert "No labeled object is visible from camera 'Camera'" in errors["not_visible"]
    assert "'red_box' outside the frame" in errors["not_visible"]
    assert "'blue_ball.001' outside the frame" in errors["not_visible"]
    assert "Set up engine" in errors["not_installed"]
    assert "not found" in errors["model_missing"]


# -- Scenarios (run in a child process with bpy) -------------------------------------------------


def _props_of(group, names):
    return {name: getattr(group, name) for name in names}


def scenario_registration() -> dict:
    import bpy  # noqa: I001 -- bpy first: it puts addon_utils on sys.path
    import addon_utils

    out: dict = {}
    addon_utils.enable("blender_addon", default_set=True, handle_error=None)
    from blender_addon.blender import models
    from blender_addon.ui import overlay, preferences, props

    def registered():
        return {
            "scene_props": hasattr(bpy.types.Scene, "layout_diffusion"),
            "object_props": hasattr(bpy.types.Object, "layout_diffusion"),
        }

    handlers = [
        h.__name__ for h in bpy.app.handlers.load_post if h.__module__.startswith("blender_addon")
    ]

    out["registered"] = {
        **registered(),
        "generate": bpy.ops.layout_diffusion.generate.poll(),
        "panel": hasattr(bpy.types, "VIEW3D_PT_layout_diffusion"),
        "prefs": preferences.get_preferences() is not None,
        "load_handlers": handlers,
    }
    prefs = preferences.get_preferences()
    out["prefs_python"] = prefs.python
    out["prefs_source"] = prefs.engine_source
    settings = bpy.context.scene.layout_diffusion
    defaults = _props_of(
        settings,
        [
            "prompt",
            "negative_prompt",
            "background_prompt",
            "base_ratio",
            "model",
            "seed",
            "steps",
            "guidance_scale",
            "show_overlay",
            "use_as_camera_background",
        ],
    )
    defaults["base_ratio"] = round(defaults["base_ratio"], 6)
    out["scene_defaults"] = defaults

    mesh = bpy.data.meshes.new("m")
    ob = bpy.data.objects.new("golden_retriever.001", mesh)
    bpy.context.scene.collection.objects.link(ob)
    label = ob.layout_diffusion
    prompts = {"default": label.prompt, "weight": label.weight, "enabled": label.enabled}
    ob.name = "red_vintage_car"
    prompts["after_rename"] = label.prompt
    label.prompt = "a dog on a sofa"
    prompts["typed"] = label.prompt
    ob.name = "something_else"
    prompts["after_rename_when_typed"] = label.prompt
    ob.name = "RedVintageCar"
    label.prompt = ""
    prompts["cleared"] = label.prompt
    out["prompts"] = prompts
    from blender_addon.blender import outputs

    folder = os.path.join(os.environ["BLENDER_USER_RESOURCES"], "project")
    os.makedirs(folder, exist_ok=True)
    unsaved_dir = outputs.output_dir(bpy.context.scene, create=False)
    bpy.ops.wm.save_as_mainfile(filepath=os.path.join(folder, "scene.blend"))
    out["output_dirs"] = [
        unsaved_dir,
        outputs.output_dir(bpy.context.scene, create=False),
        os.path.join(tempfile.gettempdir(), "layout_diffusion", "Scene"),
        os.path.join(folder, "layout_diffusion", "Scene"),
    ]
    settings.model = "//models/tiny"
    out["model_spec"] = [models.model_spec(settings), os.path.join(folder, "models", "tiny")]
    settings.model = "shapes"
    out["readable"] = {
        name: props.readable_name(name)
        for name in ("golden_retriever.001", "RedVintageCar", "tree-big.002")
    }

    for name in ("A", "B", "C"):
        other = bpy.data.objects.new(name, mesh)
        bpy.context.scene.collection.objects.link(other)
    view_layer = bpy.context.view_layer
    for obj in bpy.context.scene.objects:
        obj.select_set(obj.name in {"A", "B"})
    view_layer.objects.active = bpy.data.objects["A"]
    bpy.ops.layout_diffusion.label_selected()

    def enabled():
        return sorted(o.name for o in bpy.context.scene.objects if o.layout_diffusion.enabled)

    labels = {"after_label": enabled()}
    for obj in bpy.context.scene.objects:
        obj.select_set(obj.name == "A")
    bpy.ops.layout_diffusion.unlabel_selected()
    labels["after_unlabel"] = enabled()
    labels["label_undo"] = "UNDO" in bpy.types.LAYOUT_DIFFUSION_OT_label_selected.bl_options
    out["labels"] = labels

    out["drawn"] = _draw_everything()
    out["finish_reports"] = _finish_reports()
    # Offline (the default for bpy): Set up engine must refuse to download, and say how.
    out["online_access"] = bpy.app.online_access
    if not bpy.app.online_access:
        out["setup_offline"] = _error_of(bpy.ops.layout_diffusion.setup_engine)

    corners = [(300.0, 250.0), (300.0, 50.0), (100.0, 50.0), (100.0, 250.0)]
    out["overlay"] = {
        "center": list(overlay.frame_point(corners, 0.5, 0.5)),
        "outline": [list(p) for p in overlay.box_outline(corners, (0.0, 0.0, 0.5, 0.5))],
    }

    addon_utils.disable("blender_addon", default_set=True, handle_error=None)
    out["unregistered"] = registered()
    out["unregistered"]["load_handlers"] = [
        h.__name__ for h in bpy.app.handlers.load_post if h.__module__.startswith("blender_addon")
    ]
    addon_utils.enable("blender_addon", default_set=True, handle_error=None)
    out["reregistered"] = hasattr(bpy.types.Scene, "layout_diffusion")
    addon_utils.disable("blender_addon", default_set=True, handle_error=None)
    return out


class _Recorder:
    """A UILayout stand-in that records what a draw function shows and checks every call:
    methods must exist on bpy.types.UILayout, properties on the data, operators in bpy.ops."""

    def __init__(self, log: dict):
        self._log = log

    def __getattr__(self, name):
        import bpy

        if name not in bpy.types.UILayout.bl_rna.functions:
            self._log["errors"].append(f"UILayout has no {name}")

        def call(*args, **kwargs):
            if name in {"prop", "template_ID"}:
                data, prop = args[0], args[1]
                if prop not in data.bl_rna.properties:
                    self._log["errors"].append(f"{data} has no property {prop}")
                self._log["props"].append(prop)
            elif name == "operator":
                category, op = args[0].split(".")
                try:
                    getattr(getattr(bpy.ops, category), op).get_rna_type()
                except (AttributeError, KeyError):
                    self._log["errors"].append(f"no operator {args[0]}")
                self._log["operators"].append(args[0])
            elif name == "label":
                self._log["labels"].append(kwargs.get("text", ""))
            elif name == "progress":
                self._log["progress"].append([round(kwargs["factor"], 3), kwargs["text"]])
            return _Recorder(self._log)

        return call

    def __setattr__(self, name, value):
        import bpy

        if name != "_log" and name not in bpy.types.UILayout.bl_rna.properties:
            self._log["errors"].append(f"UILayout has no attribute {name}")
        object.__setattr__(self, name, value)


def _draw_everything() -> dict:
    """Draw every panel, the header button and the preferences into recorders."""
    from types import SimpleNamespace

    import bpy

    from blender_addon.client import engine_client
    from blender_addon.ui import operators, panels, preferences

    errors: list[str] = []

    def draw(function, **context_fields) -> dict:
        log = {"errors": errors, "props": [], "operators": [], "labels": [], "progress": []}
        context = SimpleNamespace(
            scene=bpy.context.scene,
            object=bpy.data.objects["A"],
            preferences=bpy.context.preferences,
            **context_fields,
        )
        function(SimpleNamespace(layout=_Recorder(log)), context)
        return {k: v for k, v in log.items() if k != "errors"}

    drawn: dict = {"errors": errors}
    drawn["object"] = draw(panels.OBJECT_PT_layout_diffusion.draw)
    draw(panels.OBJECT_PT_layout_diffusion.draw_header)
    drawn["idle"] = draw(panels.VIEW3D_PT_layout_diffusion.draw)
    draw(panels.VIEW3D_PT_layout_diffusion_settings.draw)
    drawn["objects"] = draw(panels.VIEW3D_PT_layout_diffusion_objects.draw)
    camera_view = SimpleNamespace(region_3d=SimpleNamespace(view_perspective="CAMERA"))
    drawn["header"] = draw(panels.draw_camera_header, space_data=camera_view)["operators"]
    job = engine_client.Job(None, "x", "generate")
    run = operators.GenerationRun(job, bpy.context.scene.name, "/tmp/x.png", 64, 64)
    run.update({"event": "progress", "step": 1, "total": 4})
    operators._run = run
    drawn["running"] = draw(panels.VIEW3D_PT_layout_diffusion.draw)
    operators._run = None

    class PrefsView:
        def __init__(self, prefs, log):
            object.__setattr__(self, "_prefs", prefs)
            object.__setattr__(self, "layout", _Recorder(log))

        def __getattr__(self, name):
            return getattr(self._prefs, name)

    log = {"errors": errors, "props": [], "operators": [], "labels": [], "progress": []}
    view = PrefsView(preferences.get_preferences(), log)
    preferences.LayoutDiffusionPreferences.draw(view, SimpleNamespace())
    drawn["preferences"] = {k: v for k, v in log.items() if k != "errors"}
    return drawn


def _drive_modal(operators, steps: int, cancel_with: str | None = None) -> dict:
    """Drive the generate operator's modal handler with timer events, as the UI does; after the
    first step, cancel with ``"esc"`` (a key event) or ``"button"`` (the Cancel operator)."""
    from types import SimpleNamespace

    import bpy

    settings = bpy.context.scene.layout_diffusion
    steps_before, settings.steps = settings.steps, steps
    log = {"progress": [], "status": [], "reports": [], "timer_removed": False}
    wm = SimpleNamespace(
        progress_update=log["progress"].append,
        progress_end=lambda: None,
        event_timer_remove=lambda timer: log.update(timer_removed=timer == "timer"),
    )
    context = SimpleNamespace(
        window_manager=wm,
        workspace=SimpleNamespace(status_text_set=log["status"].append),
        screen=None,
    )
    try:
        op = SimpleNamespace(
            _run=operators.start_generation(bpy.context),
            _timer="timer",
            _shown="",
            report=lambda kind, text: log["reports"].append([sorted(kind)[0], text]),
        )
    finally:
        settings.steps = steps_before
    op._show = lambda ctx: operators.LAYOUT_DIFFUSION_OT_generate._show(op, ctx)
    modal = operators.LAYOUT_DIFFUSION_OT_generate.modal
    timer = SimpleNamespace(type="TIMER", value="NOTHING")
    esc = SimpleNamespace(type="ESC", value="PRESS")
    mouse = SimpleNamespace(type="MOUSEMOVE", value="NOTHING")
    log["mouse"] = sorted(modal(op, context, mouse))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if cancel_with is not None and op._run.step >= 1:
            if cancel_with == "esc":
                log["cancel"] = sorted(modal(op, context, esc))
            else:
                log["cancel"] = sorted(bpy.ops.layout_diffusion.cancel())
            log["steps_seen"] = op._run.step
            cancel_with = None
        result = modal(op, context, timer)
        if result != {"PASS_THROUGH"}:
            log["result"] = sorted(result)
            break
        time.sleep(0.05)
    log["running_after"] = operators.current_run() is not None
    return log


def _finish_reports() -> dict:
    """What the artist reads for engine failures that a test cannot provoke for real."""
    from blender_addon.client import engine_client
    from blender_addon.ui import operators

    finals = {
        "out_of_memory": {
            "event": "error",
            "code": "out_of_memory",
            "message": "The device ran out of memory at 2048x2048.",
        },
        "crashed": {
            "event": "error",
            "code": engine_client.ENGINE_GONE,
            "message": "The engine stopped unexpectedly (exit code 1); it restarts on the next "
            "request. Last engine output:\nTraceback (most recent call last):\n  File x\n"
            "RuntimeError: CUDA driver version is insufficient\nexiting",
        },
    }
    reports = {}
    for name, final in finals.items():
        job = engine_client.Job(None, name, "generate")
        job._deliver(final)
        run = operators.GenerationRun(job, "Scene", "/tmp/none.png", 64, 64)
        seen = []
        result = operators.finish(run, lambda kind, text, seen=seen: seen.append(text))
        reports[name] = {"result": sorted(result), "reports": seen}
    return reports


def _error_of(op) -> str:
    try:
        result = op()
    except RuntimeError as exc:
        return str(exc)
    return f"no error (returned {sorted(result)})"


def scenario_generation(model: str) -> dict:
    import bpy  # noqa: I001 -- bpy first: it puts addon_utils on sys.path
    import addon_utils

    addon_utils.enable("blender_addon", default_set=True, handle_error=None)
    from blender_addon.blender import outputs
    from blender_addon.client import engine_session
    from blender_addon.ui import operators, overlay, preferences

    out: dict = {}
    scene = blender_scenario.empty_project_scene()
    errors: dict = {}
    errors["no_labels"] = _error_of(bpy.ops.layout_diffusion.generate)
    for name, x in (("red_box", -1.5), ("blue_ball.001", 1.5)):
        bpy.ops.mesh.primitive_cube_add(location=(x, 0, 0))
        bpy.context.object.name = name
        bpy.context.object.layout_diffusion.enabled = True
    bpy.data.objects["blue_ball.001"].layout_diffusion.prompt = "a blue ball"
    camera = scene.camera
    camera.location = (0.0, -10.0, 0.0)
    camera.rotation_euler = (1.5708, 0.0, 0.0)
    settings = scene.layout_diffusion
    settings.model = model
    settings.steps = 2
    settings.prompt = "two boxes on a table"
    settings.use_as_camera_background = True

    def run_info(result) -> dict:
        client = engine_session.current_client()
        return {"result": sorted(result), "pid": client.pid if client else None}

    first = run_info(bpy.ops.layout_diffusion.generate())
    folder = outputs.output_dir(scene)
    with open(os.path.join(folder, "layout.json"), encoding="utf-8") as handle:
        sent = json.load(handle)
    first["layout"] = {
        "size": [sent["width"], sent["height"]],
        "prompt": sent["prompt"],
        "base_ratio": sent["base_ratio"],
        "regions": [
            {
                "name": r["name"],
                "prompt": r["prompt"],
                "box": r["box"],
                "mask": os.path.join(folder, r["mask"]),
            }
            for r in sent["regions"]
        ],
    }
    image = bpy.data.images[operators.RESULT_IMAGE]
    first["image"] = list(image.size)
    first["overlay"] = [label for _, label in overlay.get_layout(scene.name)]
    overlay._forget_layouts()  # as after reopening the file
    first["overlay_reloaded"] = [label for _, label in overlay._saved_layout(scene)]
    out["first"] = first

    # The second click goes through the modal handler, as in the UI.
    out["modal"] = {"finished": _drive_modal(operators, steps=3)}
    out["second"] = {"pid": engine_session.current_client().pid}
    out["result_images"] = sum(
        1 for img in bpy.data.images if img.name.startswith(operators.RESULT_IMAGE)
    )
    out["camera_background"] = any(
        bg.image == image for bg in camera.data.background_images
    ) and bool(camera.data.show_background_images)
    out["modal"]["esc"] = _drive_modal(operators, steps=200, cancel_with="esc")
    out["modal"]["button"] = _drive_modal(operators, steps=200, cancel_with="button")
    out["engine_alive_after_cancel"] = engine_session.current_client().alive

    # A crash mid-generation: kill the engine from another thread once it reports a step.
    settings.steps = 200
    killed = {}

    def kill_after_first_step():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            run = operators.current_run()
            if run is not None and run.step >= 1:
                killed["pid"] = run.job.client.pid
                run.job.client.kill()
                return
            time.sleep(0.02)

    threading.Thread(target=kill_after_first_step, daemon=True).start()
    crash = {"error": _error_of(bpy.ops.layout_diffusion.generate), "killed_pid": killed.get("pid")}
    settings.steps = 2
    crash["next_result"] = sorted(bpy.ops.layout_diffusion.generate())
    crash["next_pid"] = engine_session.current_client().pid
    out["crash"] = crash

    settings.model = os.path.join(os.path.dirname(model), "no-such-model")
    errors["model_missing"] = _error_of(bpy.ops.layout_diffusion.generate)
    settings.model = model

    prefs = preferences.get_preferences()
    python = prefs.python
    prefs.python = os.path.join(folder, "missing-venv", "bin", "python")
    errors["not_installed"] = _error_of(bpy.ops.layout_diffusion.generate)
    prefs.python = python

    for name in ("red_box", "blue_ball.001"):
        bpy.data.objects[name].location.z = 50.0
    errors["not_visible"] = _error_of(bpy.ops.layout_diffusion.generate)

    scene.camera = None
    errors["no_camera"] = _error_of(bpy.ops.layout_diffusion.generate)
    out["errors"] = errors
    engine_session.shutdown()
    return out


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    scenario = {"registration": scenario_registration, "generation": scenario_generation}
    result = scenario[sys.argv[1]](*sys.argv[2:])
    blender_scenario.report(result)
