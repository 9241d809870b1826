"""Add-on preferences: which Python runs the engine, setting it up, and checking it."""

from __future__ import annotations

import os
import sys

import bpy
from bpy.props import StringProperty

from ..blender.models import model_spec
from ..client import engine_session
from ..core import request

ADDON_PACKAGE = __package__.rpartition(".")[0]
"""The add-on's package (``bl_ext.<repo>.layout_diffusion`` when installed): preferences are
registered under it, not under this ``ui`` sub-package."""

_tasks: dict[str, engine_session.Task | None] = {"setup": None, "check": None}


def addon_package() -> str:
    """The add-on's package name (``bl_ext.<repo>.layout_diffusion`` when installed)."""
    return ADDON_PACKAGE


def get_preferences(context=None):
    """This add-on's preferences, or None if it is not enabled under its package name."""
    context = context or bpy.context
    addon = context.preferences.addons.get(addon_package())
    return addon.preferences if addon else None


def engine_python(context=None) -> str:
    """The interpreter setting (falls back to the checkout's .venv when prefs are missing)."""
    prefs = get_preferences(context)
    return prefs.python if prefs else engine_session.default_python()


def default_venv_dir() -> str:
    """Where Set up engine creates the engine's virtual environment."""
    try:
        return bpy.utils.extension_path_user(addon_package(), path="engine-venv", create=True)
    except ValueError:
        # Not installed as an extension (legacy add-on or a checkout on sys.path).
        return os.path.join(bpy.utils.user_resource("DATAFILES", path="layout_diffusion"), "venv")


def _default_source() -> str:
    return engine_session.checkout_root() or "layout-diffusion"


class LayoutDiffusionPreferences(bpy.types.AddonPreferences):
    """Engine location and set-up."""

    bl_idname = ADDON_PACKAGE

    python: StringProperty(
        name="Engine Python",
        description=(
            "Python interpreter (or virtual environment folder) with the engine installed; "
            "Set up engine fills this in"
        ),
        subtype="FILE_PATH",
        default=engine_session.default_python(),
    )
    engine_source: StringProperty(
        name="Engine Source",
        description="What Set up engine installs: the project folder or a pip package name",
        default=_default_source(),
    )
    torch_index_url: StringProperty(
        name="Torch Index",
        description=(
            "Package index for torch (empty: PyPI). For a CPU-only machine use "
            "https://download.pytorch.org/whl/cpu to avoid the large CUDA build"
        ),
        default="",
    )
    venv_dir: StringProperty(
        name="Environment Folder",
        description="Where Set up engine creates the engine's Python environment (empty: default)",
        subtype="DIR_PATH",
        default="",
    )

    def draw(self, context) -> None:
        layout = self.layout
        layout.prop(self, "python")
        box = layout.box()
        box.label(text="Set up engine (downloads torch and diffusers, several GB)")
        box.prop(self, "engine_source")
        box.prop(self, "torch_index_url")
        box.prop(self, "venv_dir")
        row = box.row(align=True)
        setup = _tasks["setup"]
        row.enabled = not (setup and setup.running)
        row.operator("layout_diffusion.setup_engine", icon="IMPORT")
        _draw_task(box, setup)
        box = layout.box()
        check = _tasks["check"]
        row = box.row()
        row.enabled = not (check and check.running)
        row.operator("layout_diffusion.check_engine", icon="CHECKMARK")
        _draw_task(box, check)
        if check and check.done and check.result:
            for line in engine_session.describe_hello(check.result):
                box.label(text=line)


def check_task() -> engine_session.Task | None:
    """The last (or running) health check, for panels that show its outcome."""
    return _tasks["check"]


def _draw_task(layout, task) -> None:
    if task is None:
        return
    if task.error:
        for line in task.error.splitlines()[:6]:
            layout.label(text=line, icon="ERROR")
    elif not task.done:
        layout.label(text=task.status, icon="SORTTIME")
    elif task.title == "Set up engine":
        layout.label(text="Engine installed", icon="CHECKMARK")


def _watch(task: engine_session.Task, on_done=None) -> None:
    """Redraw the preferences while ``task`` runs, without blocking Blender."""

    def tick():
        for window in bpy.context.window_manager.windows:
            for area in window.screen.areas:
                # The sidebar shows the health check's outcome too.
                if area.type in {"PREFERENCES", "VIEW_3D", "PROPERTIES"}:
                    area.tag_redraw()
        if task.done:
            if on_done is not None:
                on_done(task)
            return None
        return 0.5

    bpy.app.timers.register(tick, first_interval=0.2)


class LAYOUT_DIFFUSION_OT_setup_engine(bpy.types.Operator):
    """Create a Python environment for the engine and install it there (runs in the background)"""

    bl_idname = "layout_diffusion.setup_engine"
    bl_label = "Set up engine"

    def execute(self, context):
        prefs = get_preferences(context)
        if prefs is None:
            self.report({"ERROR"}, "Enable the Layout Diffusion add-on first")
            return {"CANCELLED"}
        if not bpy.app.online_access:
            self.report(
                {"ERROR"},
                "Set up engine downloads packages: allow Online Access in Preferences > System > "
                "Network, then press Set up engine again",
            )
            return {"CANCELLED"}
        task = _tasks["setup"]
        if task is not None and task.running:
            self.report({"WARNING"}, "Set up engine is already running")
            return {"CANCELLED"}
        venv = bpy.path.abspath(prefs.venv_dir) if prefs.venv_dir else default_venv_dir()
        commands = engine_session.setup_commands(
            sys.executable, venv, prefs.engine_source, torch_index_url=prefs.torch_index_url
        )
        task = _tasks["setup"] = engine_session.SetupTask(commands).start()
        package = addon_package()

        def done(task):
            if task.error is None:
                addon = bpy.context.preferences.addons.get(package)
                if addon:
                    addon.preferences.python = engine_session.venv_python(venv)

        _watch(task, done)
        self.report({"INFO"}, f"Setting up the engine in {venv}")
        return {"FINISHED"}


class LAYOUT_DIFFUSION_OT_check_engine(bpy.types.Operator):
    """Start the engine and show its version, device, and whether the scene's model, depth
    ControlNet and IP-Adapter are found"""

    bl_idname = "layout_diffusion.check_engine"
    bl_label = "Check engine"

    def execute(self, context):
        task = _tasks["check"]
        if task is not None and task.running:
            return {"CANCELLED"}
        settings = getattr(context.scene, "layout_diffusion", None)
        model = model_spec(settings) if settings else ""
        # The scene's ControlNet and IP-Adapter go along, so the reply says whether they exist.
        options = request.engine_options(settings, model_spec) if settings else None
        task = _tasks["check"] = engine_session.HealthCheckTask(
            engine_python(context), model, options
        )
        task.start()
        if bpy.app.background:
            task.join()
            if task.error:
                self.report({"ERROR"}, task.error)
                return {"CANCELLED"}
            self.report({"INFO"}, "; ".join(engine_session.describe_hello(task.result)))
            return {"FINISHED"}
        _watch(task)
        return {"FINISHED"}


CLASSES = (
    LayoutDiffusionPreferences,
    LAYOUT_DIFFUSION_OT_setup_engine,
    LAYOUT_DIFFUSION_OT_check_engine,
)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister() -> None:
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
