"""Operators: generate from the camera (non-blocking), re-generate one object, cancel, label and
unlabel objects."""

from __future__ import annotations

import os
import time
from typing import Any

import bpy

from ..blender.frame_request import build_request
from ..blender.models import model_spec
from ..blender.outputs import output_dir
from ..client import cost, engine_session
from ..client.cost_first import COST_EVENT, CostFirstJob
from ..client.engine_client import ENGINE_GONE, EngineError, Job
from ..client.high_res import HighResJob, start_generate
from ..core import history, places, request
from ..core.errors import UserError
from . import overlay, preferences

RESULT_IMAGE = "Layout Diffusion Result"
"""Name of the Image datablock that receives every result (reloaded, never duplicated)."""


class GenerationRun:
    """The generation in flight (at most one): its job, progress and where the result goes."""

    def __init__(
        self,
        job: Job | HighResJob | CostFirstJob,
        scene_name: str,
        out: str,
        width: int,
        height: int,
        layout: dict[str, Any] | None = None,
        what: str = "Generated",
    ):
        self.job = job
        self.layout = layout
        """The Layout dict sent (its regions name the objects in error messages)."""
        self.what = what
        """How the result report starts: "Generated", "Re-generated 'Car'"."""
        self.scene_name = scene_name
        self.out = out
        self.width = width
        self.height = height
        self.step = 0
        self.total = 0
        self.status = "Starting the engine"
        self.cancel_requested_at: float | None = None
        self.skipped: list = []
        self.started = time.monotonic()
        self.cost_lines: list[tuple[str, str]] = []
        """What the generation costs (``client.cost.describe``); empty while no cost is known."""
        self.cost_late = False
        """True once the engine's cost arrived for a generation that started without one
        (until it is reported)."""
        self.cost_args: tuple[int, int, int, bool, float] | None = None
        """Width, height, steps, High-res Fix and its strength, for the cost lines."""

    def set_cost(self, known: dict[str, Any] | None) -> None:
        """Describe what the generation costs by ``known`` (a model's cost; None: unknown)."""
        if known is not None and self.cost_args is not None:
            self.cost_lines = cost.describe(known, *self.cost_args)

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 0.0

    def update(self, event: dict[str, Any]) -> None:
        """Take in a non-final engine event (queued, loading, progress)."""
        kind = event.get("event")
        if kind == COST_EVENT:
            late = not self.cost_lines
            self.set_cost(event.get("cost"))
            self.cost_late = late and bool(self.cost_lines)
        if kind == "progress":
            self.step = int(event.get("step", 0))
            self.total = int(event.get("total", 0))
        if self.cancel_requested_at is not None:
            return  # keep saying "Cancelling" until the engine confirms
        if kind == "queued":
            self.status = "Waiting for the engine (a render is running)"
        elif kind == "loading":
            self.status = "Loading the model"
        elif kind == "progress":
            self.status = f"Step {self.step}/{self.total}"
            if event.get("passes") == 2:
                self.status += " (High-res Fix: full size)" if event.get("pass") == 2 else ""

    def cancel(self) -> None:
        """First call: ask the engine to stop (model stays loaded). Second: kill the engine."""
        if self.cancel_requested_at is None:
            self.cancel_requested_at = time.monotonic()
            self.status = "Cancelling (press again to stop the engine)"
            self.job.cancel()
        else:
            self.job.client.kill()


_run: GenerationRun | None = None


def current_run() -> GenerationRun | None:
    """The generation in flight, if any (the sidebar shows its progress)."""
    return _run if _run is not None and not _run.job.done else None


# -- Starting a generation ---------------------------------------------------------------------


def start_generation(
    context, regenerate: str | None = None, seed: int | None = None
) -> GenerationRun:
    """Build the Layout, save it, and send it to the (warm) engine. Raises UserError/EngineError.

    With ``regenerate`` (an object name): re-generate that object of the last result with
    ``seed`` (see :func:`~..blender.frame_request.build_request`). Otherwise ``seed`` replaces
    the scene's Seed; with Random Seed on, a new one is drawn (the result event reports it and
    :func:`finish` keeps it as the result's seed, so the image can be reproduced).
    """
    global _run
    if current_run() is not None:
        raise UserError("A generation is already running: wait for it or press Cancel")
    scene = context.scene
    # The engine first: a missing one fails before the mask render, and a cold one imports
    # torch while the masks render.
    client = engine_session.get_client(
        preferences.engine_python(context), preferences.engine_command(context)
    )
    settings = scene.layout_diffusion
    spec = model_spec(settings)
    # Asked before the mask render, so a cold engine answers while the masks render; asked
    # every time, so the estimate follows the engine's last measured steps.
    asked = client.request("hello", model=spec or None, cost=True)
    if seed is None and regenerate is None and scene.layout_diffusion.use_random_seed:
        seed = request.next_seed(scene.layout_diffusion, "RANDOM")
    folder = output_dir(scene)
    # Files of the last request (masks of objects since unlabeled) must not sit beside these.
    history.clean_intermediates(folder)
    made = build_request(
        scene, context.evaluated_depsgraph_get(), folder, regenerate=regenerate, seed=seed
    )
    layout = made.layout
    layout.save(os.path.join(folder, "layout.json"))
    overlay.set_layout(scene.name, layout.to_dict())
    out = os.path.join(folder, request.RESULT_NAME)
    sent = layout.to_dict()
    # Re-generate Object keeps every other pixel of the last result: one pass at full size.
    high_res = settings.use_high_res_fix and regenerate is None
    strength = settings.high_res_strength

    def start(native: int | None) -> Job | HighResJob:
        return start_generate(
            client,
            sent,
            out,
            made.model,
            made.options,
            native=native,
            high_res=high_res,
            strength=strength,
        )

    # Never waits here: without a known native size the job's own thread waits for the reply
    # (a cold engine answers once torch is imported) and then sends the generation.
    job = CostFirstJob(client, asked, spec, start, COST_WAIT_SECONDS)
    what = f"Re-generated {regenerate!r}" if regenerate else "Generated"
    _run = GenerationRun(job, scene.name, out, layout.width, layout.height, sent, what)
    _run.skipped = list(made.skipped)
    _run.cost_args = (layout.width, layout.height, layout.steps, high_res, strength)
    _run.set_cost(cost.known(spec))
    return _run


COST_WAIT_SECONDS = 60.0
"""How long a Generate's job waits for the engine's cost before it sends the request without
it (off the UI thread; a cold engine answers once torch is imported)."""


def report_cost(run: GenerationRun, report) -> None:
    """Say what the generation costs: one line, a warning when it is long."""
    lines = getattr(run, "cost_lines", [])
    if lines:
        warn = any(icon == "ERROR" for _, icon in lines)
        report({"WARNING" if warn else "INFO"}, "; ".join(text for text, _ in lines))


def report_late_cost(run: GenerationRun, report) -> None:
    """Say the cost once it arrived, when none was known as the generation started."""
    if run.cost_late:
        run.cost_late = False
        report_cost(run, report)


def regenerate_target(context, name: str = ""):
    """The object Re-generate Object acts on: ``name``, else the active object."""
    if name:
        return context.scene.objects.get(name)
    return getattr(context, "object", None) or getattr(context, "active_object", None)


# -- Showing the result --------------------------------------------------------------------------


def load_result(path: str, scene=None):
    """Load (or reload) the result into the ``Layout Diffusion Result`` image and show it."""
    image = bpy.data.images.get(RESULT_IMAGE)
    if image is None:
        image = bpy.data.images.load(path, check_existing=False)
        image.name = RESULT_IMAGE
    else:
        image.filepath = path
        image.reload()
    show_in_image_editors(image)
    if scene is not None and scene.layout_diffusion.use_as_camera_background:
        show_as_camera_background(scene, image)
    return image


def show_in_image_editors(image) -> None:
    """Show ``image`` in every open Image Editor."""
    wm = getattr(bpy.context, "window_manager", None)
    for window in wm.windows if wm else ():
        for area in window.screen.areas:
            if area.type == "IMAGE_EDITOR":
                area.spaces.active.image = image
                area.tag_redraw()


def show_as_camera_background(scene, image) -> None:
    """Put ``image`` behind the active camera's view (reusing its slot if already there)."""
    camera = scene.camera
    if camera is None or camera.type != "CAMERA":
        return
    data = camera.data
    slot = next((bg for bg in data.background_images if bg.image == image), None)
    if slot is None:
        slot = data.background_images.new()
        slot.image = image
    slot.source = "IMAGE"
    slot.alpha = 1.0
    slot.show_background_image = True
    data.show_background_images = True


def finish(run: GenerationRun, report) -> set[str]:
    """Act on the final event of ``run``; ``report`` is the operator's report method."""
    global _run
    _run = None
    event = run.job.final or {}
    kind = event.get("event")
    if kind == "result":
        scene = bpy.data.scenes.get(run.scene_name)
        path = event.get("path") or run.out
        _keep_result(run, path, scene, report)
        image = load_result(path, scene)
        seed = event.get("seed")
        if scene is not None and isinstance(seed, int) and 0 <= seed <= request.MAX_SEED:
            scene.layout_diffusion.result_seed = seed
        seconds = event.get("seconds")
        took = f" in {seconds:.1f} s" if isinstance(seconds, (int, float)) else ""
        report({"INFO"}, f"{run.what} {image.size[0]}x{image.size[1]}{took}, seed {seed}")
        if run.skipped:
            report({"WARNING"}, "Not in the image: " + _skipped_text(run.skipped))
        for warning in _condition_warnings(event, scene):
            report({"WARNING"}, warning)
        return {"FINISHED"}
    if kind == "cancelled":
        report({"INFO"}, "Generation cancelled")
        return {"CANCELLED"}
    code = event.get("code", "internal")
    message = event.get("message") or "the engine failed without a message"
    explained = request.explain_error(event, run.layout)
    if explained:
        message = explained
    elif code == "out_of_memory":
        message += " (lower the render resolution, or press Check engine to see the device)"
    elif code == ENGINE_GONE:
        # The report keeps the engine's last error line (the cause), not its whole log.
        head, _, tail = message.partition(" Last engine output:")
        causes = [line.strip() for line in tail.splitlines() if "Error" in line]
        message = head.replace("on the next request", "when you press Generate again")
        if causes:
            message += f" Cause: {causes[-1]}"

    report({"ERROR"}, message)
    return {"CANCELLED"}


def _keep_result(run: GenerationRun, path: str, scene, report) -> str | None:
    """Add the result to the scene's history and remove the request's intermediate files; the
    history entry's path, None when it could not be written (reported as a warning)."""
    folder = os.path.dirname(run.out)
    keep = scene.layout_diffusion.history_size if scene is not None else history.DEFAULT_KEEP
    try:
        entry = history.record(folder, path, keep)
    except OSError as exc:
        report({"WARNING"}, f"The result could not be added to the history: {exc}")
        return None
    history.clean_intermediates(folder)
    return entry


def _condition_warnings(event: dict[str, Any], scene) -> list[str]:
    """Warnings for conditions the scene asks for that the engine reports it did not apply."""
    used = event.get("conditions")
    if scene is None or not isinstance(used, dict):
        return []
    settings = scene.layout_diffusion
    warnings = []
    if settings.controlnet.strip() and used.get("controlnet") is None:
        warnings.append(
            "The depth ControlNet did not act: every depth scale is 0 or no object's depth "
            "was rendered"
        )
    return warnings


def _skipped_text(skipped) -> str:
    parts = []
    for item in skipped:
        if isinstance(item, (tuple, list)) and len(item) == 2:
            parts.append(f"{item[0]} ({item[1]})")
        else:
            parts.append(str(getattr(item, "name", item)))
    return ", ".join(parts)


# -- Operators -----------------------------------------------------------------------------------


def _tag_ui(context) -> None:
    screen = getattr(context, "screen", None)
    for area in screen.areas if screen else ():
        if area.type in {"VIEW_3D", "PROPERTIES"}:
            area.tag_redraw()


class _GenerationOperator:
    """What Generate and Re-generate Object share: blocking execute for scripts and background
    mode, a modal timer loop with progress and Esc in the UI. Subclasses say how to start."""

    # No UNDO flag: nothing in the scene changes while the engine works; the result's undo step
    # is pushed explicitly once the image arrives.
    bl_options = {"REGISTER"}

    _timer = None
    _run: GenerationRun | None = None
    _shown = ""

    def _start(self, context) -> GenerationRun | None:
        raise NotImplementedError

    def execute(self, context):
        """Blocking generation: background mode and scripts (timers and modals do not run there)."""
        run = self._start(context)
        if run is None:
            return {"CANCELLED"}
        report_cost(run, self.report)
        for event in run.job:
            run.update(event)
            report_late_cost(run, self.report)
        return finish(run, self.report)

    def invoke(self, context, event):
        if bpy.app.background:
            return self.execute(context)
        run = self._start(context)
        if run is None:
            return {"CANCELLED"}
        report_cost(run, self.report)
        self._run = run
        wm = context.window_manager
        wm.progress_begin(0, 100)
        self._timer = wm.event_timer_add(0.1, window=context.window)
        wm.modal_handler_add(self)
        self._show(context)
        return {"RUNNING_MODAL"}

    def _show(self, context) -> None:
        run = self._run
        self._shown = run.status
        context.window_manager.progress_update(int(run.fraction * 100))
        if context.workspace is not None:
            context.workspace.status_text_set(f"Layout Diffusion: {run.status} (Esc to cancel)")
        _tag_ui(context)

    def modal(self, context, event):
        run = self._run
        if event.type == "ESC" and event.value == "PRESS":
            run.cancel()
            self._show(context)
            return {"RUNNING_MODAL"}
        if event.type != "TIMER":
            return {"PASS_THROUGH"}
        events = run.job.poll()
        for item in events:
            run.update(item)
        report_late_cost(run, self.report)
        # Shown even when the same poll brought the result: the last step's progress must not
        # be skipped. The Cancel button changes the status between events.
        if events or run.status != self._shown:
            self._show(context)
        if not run.job.done:
            return {"PASS_THROUGH"}
        wm = context.window_manager
        wm.event_timer_remove(self._timer)
        wm.progress_end()
        if context.workspace is not None:
            context.workspace.status_text_set(None)
        result = finish(run, self.report)
        _tag_ui(context)
        if result == {"FINISHED"} and not bpy.app.background:
            # The operator has no UNDO flag (it must not snapshot mid-generation); the new
            # image and camera background get their own undo step now that they exist.
            bpy.ops.ed.undo_push(message="Layout Diffusion result")
        return result


class LAYOUT_DIFFUSION_OT_generate(_GenerationOperator, bpy.types.Operator):
    """Generate an image from the active camera: every labeled object's prompt appears where the
    object stands"""

    bl_idname = "layout_diffusion.generate"
    bl_label = "Generate from Camera"

    @classmethod
    def poll(cls, context) -> bool:
        return context.scene is not None and current_run() is None

    def _start(self, context) -> GenerationRun | None:
        try:
            return start_generation(context)
        except (UserError, EngineError) as exc:
            self.report({"ERROR"}, str(exc))
            return None


class LAYOUT_DIFFUSION_OT_regenerate_object(_GenerationOperator, bpy.types.Operator):
    """Generate this object again with a new seed, keeping every other pixel of the last result"""

    bl_idname = "layout_diffusion.regenerate_object"
    bl_label = "Re-generate Object"

    object_name: bpy.props.StringProperty(
        name="Object",
        description="The labeled object to re-generate (empty: the active object)",
        options={"SKIP_SAVE"},
    )
    seed: bpy.props.IntProperty(
        name="Seed",
        description="Seed for the new attempt (-1: from the scene's New Seed setting)",
        default=-1,
        min=-1,
        options={"SKIP_SAVE"},
    )

    @classmethod
    def poll(cls, context) -> bool:
        # Permissive: poll cannot see object_name, and a script naming a labeled object must
        # not be refused for the active one. An unlabeled target is refused in _start, saying
        # why; buttons grey themselves out for the object they act on.
        if context.scene is None:
            return False
        if current_run() is not None:
            cls.poll_message_set("A generation is running: wait for it or press Cancel")
            return False
        return True

    def _start(self, context) -> GenerationRun | None:
        obj = regenerate_target(context, self.object_name)
        try:
            if obj is None and self.object_name:
                raise UserError(f"There is no object {self.object_name!r} in this scene")
            if obj is None or not obj.layout_diffusion.enabled:
                what = repr(obj.name) if obj is not None else "The active object"
                raise UserError(
                    f"{what} is not a labeled object: label it ({places.object_panel()}) "
                    "and generate the whole image first"
                )
            settings = context.scene.layout_diffusion
            seed = (
                self.seed
                if self.seed >= 0
                else request.next_seed(settings, settings.regenerate_seed)
            )
            self.report({"INFO"}, f"Re-generating {obj.name!r} with seed {seed}")
            return start_generation(context, regenerate=obj.name, seed=seed)
        except (UserError, EngineError) as exc:
            self.report({"ERROR"}, str(exc))
            return None


class LAYOUT_DIFFUSION_OT_cancel(bpy.types.Operator):
    """Stop the running generation (the model stays loaded); press again to stop the engine"""

    bl_idname = "layout_diffusion.cancel"
    bl_label = "Cancel"

    @classmethod
    def poll(cls, context) -> bool:
        return current_run() is not None

    def execute(self, context):
        run = current_run()
        if run is not None:
            run.cancel()
        return {"FINISHED"}


class _LabelSelected:
    bl_options = {"REGISTER", "UNDO"}
    enable = True

    @classmethod
    def poll(cls, context) -> bool:
        return bool(context.selected_objects)

    def execute(self, context):
        count = 0
        for ob in context.selected_objects:
            if ob.type in {"CAMERA", "LIGHT"}:
                continue
            ob.layout_diffusion.enabled = self.enable
            count += 1
        verb = "Labeled" if self.enable else "Unlabeled"
        self.report({"INFO"}, f"{verb} {count} object{'s' if count != 1 else ''}")
        return {"FINISHED"}


class LAYOUT_DIFFUSION_OT_label_selected(_LabelSelected, bpy.types.Operator):
    """Label the selected objects so they take part in generation (prompt from their names)"""

    bl_idname = "layout_diffusion.label_selected"
    bl_label = "Label Selected"
    enable = True


class LAYOUT_DIFFUSION_OT_unlabel_selected(_LabelSelected, bpy.types.Operator):
    """Remove the selected objects from generation (their prompts are kept)"""

    bl_idname = "layout_diffusion.unlabel_selected"
    bl_label = "Unlabel Selected"
    enable = False


class LAYOUT_DIFFUSION_OT_use_result_seed(bpy.types.Operator):
    """Set Seed to the last result's seed and turn Random Seed off, so Generate makes that image
    again"""

    bl_idname = "layout_diffusion.use_result_seed"
    bl_label = "Use Result Seed"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context) -> bool:
        scene = context.scene
        if scene is None or scene.layout_diffusion.result_seed < 0:
            cls.poll_message_set("No result yet: generate first")
            return False
        return True

    def execute(self, context):
        settings = context.scene.layout_diffusion
        settings.seed = settings.result_seed
        settings.use_random_seed = False
        self.report({"INFO"}, f"Seed {settings.seed}: Generate makes the last result again")
        return {"FINISHED"}


class LAYOUT_DIFFUSION_OT_show_result(bpy.types.Operator):
    """Open the last result in an Image Editor window"""

    bl_idname = "layout_diffusion.show_result"
    bl_label = "Show Result"

    @classmethod
    def poll(cls, context) -> bool:
        return RESULT_IMAGE in bpy.data.images

    def execute(self, context):
        image = bpy.data.images[RESULT_IMAGE]
        # Opens an Image Editor the way F11 does (window, area or full screen, per the
        # Preferences > Interface > Temporary Editors setting), then points it at the result.
        bpy.ops.render.view_show("INVOKE_DEFAULT")
        show_in_image_editors(image)
        return {"FINISHED"}


class LAYOUT_DIFFUSION_OT_estimate_cost(bpy.types.Operator):
    """Ask the engine what generating at the render size costs with the scene's model: its
    native size and the time per step on its device (starts the engine)"""

    bl_idname = "layout_diffusion.estimate_cost"
    bl_label = "Estimate Cost"

    def execute(self, context):
        spec = model_spec(context.scene.layout_diffusion)
        task = cost.check(
            preferences.engine_python(context), spec, preferences.engine_command(context)
        )

        def redraw_when_done() -> float | None:
            if task.running:
                return 0.5
            for window in getattr(bpy.context.window_manager, "windows", ()):
                for area in window.screen.areas:
                    if area.type == "VIEW_3D":
                        area.tag_redraw()
            return None

        if not bpy.app.background:
            bpy.app.timers.register(redraw_when_done, first_interval=0.5)
        return {"FINISHED"}


CLASSES = (
    LAYOUT_DIFFUSION_OT_generate,
    LAYOUT_DIFFUSION_OT_estimate_cost,
    LAYOUT_DIFFUSION_OT_regenerate_object,
    LAYOUT_DIFFUSION_OT_cancel,
    LAYOUT_DIFFUSION_OT_label_selected,
    LAYOUT_DIFFUSION_OT_unlabel_selected,
    LAYOUT_DIFFUSION_OT_show_result,
    LAYOUT_DIFFUSION_OT_use_result_seed,
)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister() -> None:
    global _run
    if _run is not None and not _run.job.done:
        _run.job.cancel()
    _run = None
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
