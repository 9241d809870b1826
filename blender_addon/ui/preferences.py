"""Add-on preferences: which Python runs the engine, setting it up, and checking it."""

from __future__ import annotations

import os
import sys

import bpy
from bpy.props import EnumProperty, StringProperty

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


def engine_command(context=None) -> str:
    """The Engine Command setting: a command line started instead of the Engine Python's
    ``-m engine serve`` (e.g. over SSH); empty when unset."""
    prefs = get_preferences(context)
    return prefs.engine_command.strip() if prefs else ""


def default_venv_dir() -> str:
    """Where Set up engine creates the engine's virtual environment."""
    try:
        return bpy.utils.extension_path_user(addon_package(), path="engine-venv", create=True)
    except ValueError:
        # Not installed as an extension (legacy add-on or a checkout on sys.path).
        return os.path.join(bpy.utils.user_resource("DATAFILES", path="layout_diffusion"), "venv")


def setup_log_path(venv: str) -> str:
    """Where Set up engine writes its full log: next to the environment it creates."""
    return os.path.join(os.path.dirname(os.path.abspath(venv)), "setup.log")


TORCH_BUILDS = (
    (
        "AUTO",
        "Automatic",
        "Detect the GPU: CUDA for NVIDIA, ROCm for AMD (Linux), Metal on Apple "
        "Silicon, else the CPU-only build",
    ),
    ("CPU", "CPU Only", "The small CPU-only build (about 1 GB); slow, but runs everywhere"),
    (
        "CUSTOM",
        "Custom Index",
        "Torch from the package index below (a mirror, or a build not detected automatically)",
    ),
)


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
    engine_command: StringProperty(
        name="Engine Command",
        description=(
            "A command line that starts the engine elsewhere and carries its input and output, "
            "used instead of Engine Python, e.g. ssh gpu-box /opt/ld/.venv/bin/python -m engine "
            "serve (split like a shell; quote paths with spaces). Images go with each request "
            "and come back inline; empty: run the engine here with Engine Python"
        ),
        default="",
    )
    engine_source: StringProperty(
        name="Engine Source",
        description=(
            "Folder with the engine's source that Set up engine installs (a Layout Diffusion "
            "checkout); empty: the engine shipped inside this add-on"
        ),
        subtype="DIR_PATH",
        default="",
    )
    torch_build: EnumProperty(
        name="Torch Build",
        description="Which build of torch Set up engine installs",
        items=TORCH_BUILDS,
        default="AUTO",
    )
    torch_index_url: StringProperty(
        name="Torch Index",
        description=(
            "Package index for torch when Torch Build is Custom Index, e.g. "
            "https://download.pytorch.org/whl/cu126"
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
        layout.prop(self, "engine_command")
        if self.engine_command.strip():
            layout.label(
                text="The Engine Command runs the engine; Engine Python is not used",
                icon="INFO",
            )
        box = layout.box()
        box.label(text="Set up engine: a Python environment with torch and the engine")
        box.prop(self, "engine_source")
        if not self.engine_source.strip():
            shipped = engine_session.shipped_engine_source()
            box.label(
                text=f"Installs the engine from {shipped}"
                if shipped
                else "No engine shipped: pick an Engine Source folder",
                icon="INFO" if shipped else "ERROR",
            )
        box.prop(self, "torch_build")
        if self.torch_build == "CUSTOM":
            box.prop(self, "torch_index_url")
        box.prop(self, "venv_dir")
        setup = _tasks["setup"]
        row = box.row(align=True)
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
    setup = isinstance(task, engine_session.SetupTask)
    choice = getattr(task, "choice", None)
    if choice is not None:
        layout.label(text=f"Torch build: {choice.label}", icon="SETTINGS")
    if task.error:
        for line in task.error.splitlines()[:6]:
            layout.label(text=line, icon="ERROR")
    elif not task.done:
        if setup:
            layout.progress(factor=task.fraction, type="BAR", text=task.status)
        else:
            layout.label(text=task.status, icon="SORTTIME")
    elif setup:
        layout.label(text=engine_session.describe_setup(task.result), icon="CHECKMARK")
    if setup and task.log:
        col = layout.column(align=True)
        for line in task.log[-6:]:
            col.label(text=line[:120])
        if task.log_path:
            layout.operator(
                "wm.path_open", text="Open Full Log", icon="TEXT"
            ).filepath = task.log_path


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
        try:
            source = engine_session.resolve_engine_source(bpy.path.abspath(prefs.engine_source))
        except engine_session.SetupError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        task = _tasks["setup"] = engine_session.EngineSetupTask(
            sys.executable,
            venv,
            source,
            torch_build=prefs.torch_build,
            torch_index=prefs.torch_index_url,
            log_path=setup_log_path(venv),
        ).start()
        package = addon_package()

        def done(task):
            if task.error is None:
                addon = bpy.context.preferences.addons.get(package)
                if addon:
                    addon.preferences.python = engine_session.venv_python(venv)

        _watch(task, done)
        self.report({"INFO"}, f"Setting up the engine in {venv} from {source}")
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
            engine_python(context), model, options, engine_command(context)
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
