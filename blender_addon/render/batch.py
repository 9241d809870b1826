"""Render an animation headless, frame by frame, resumable: ``python -m blender_addon.render``.

    python -m blender_addon.render SCENE.blend --frames 1-48 --out DIR [--model shapes]
        [--engine-python PATH] [--step N] [--seed-mode shot|frame] [--overwrite]
        [--init-previous STRENGTH]

Needs only the ``bpy`` wheel on the Blender side; the engine runs in its own Python as one
subprocess for the whole batch, so the model loads once. Every frame goes to
``DIR/frame_NNNN.png`` with a sidecar ``DIR/frame_NNNN.json`` (Layout, seed, settings, model,
engine version, timings) and its masks under ``DIR/layout/frame_NNNN/``; see
:mod:`blender_addon.frames` for what counts as complete and how files are written. Running the
same command again renders only the frames that are not complete.

The Blender work for frame N+1 (frame change, projection, mask render) runs while the engine
generates frame N; the next request is sent once frame N is written, so a stopped batch never
leaves a later frame half done.

The per-frame steps (:func:`evaluated_labels`, :func:`frame_request`) are shared with the render
engine (:mod:`blender_addon.render_engine`) that F12 and Ctrl-F12 use.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import frames
from .engine_client import ENGINE_GONE, NOT_INSTALLED, EngineClient, EngineError, Job
from .wire.protocol import BAD_DEVICE, MODEL_NOT_FOUND

SEED_MODES = ("shot", "frame")
FATAL_CODES = frozenset({ENGINE_GONE, NOT_INSTALLED, MODEL_NOT_FOUND, BAD_DEVICE})
"""Engine errors that would fail every following frame too: the batch stops at the first."""


class BatchError(Exception):
    """The batch cannot run at all (bad arguments, missing file); the message says what to do."""


# -- One frame, as the engine and the batch both build it ----------------------------------------


def evaluated_labels(scene, depsgraph) -> list:
    """The labeled objects of ``scene`` with prompt, weight and switch as evaluated at its frame.

    Reading through the evaluated copies honours keyframes on the label's weight and enabled
    switch in render threads too, where the original data is not updated per frame.
    """
    from .blender.scene_layout import LabeledObject

    labeled = []
    for obj in scene.objects:
        settings = obj.evaluated_get(depsgraph).layout_diffusion
        if settings.enabled:
            labeled.append(LabeledObject(obj, settings.prompt, settings.weight))
    return labeled


def scene_seed_mode(scene) -> str:
    """The scene's seed mode (``shot`` or ``frame``); ``shot`` when the setting is absent."""
    value = getattr(scene.layout_diffusion, "seed_mode", "SHOT")
    return str(value).lower()


@dataclass
class FrameRequest:
    """Everything one frame's generate request needs, built from the scene at that frame."""

    layout: Any
    """The :class:`~.layout.Layout` (absolute image paths; files already written)."""
    skipped: list
    """(object name, why it is not in the Layout), as :func:`layout_from_camera` reports."""
    model: str | None
    options: dict[str, Any]
    """The request's engine ``options`` (depth ControlNet, IP-Adapter)."""


def frame_request(
    scene,
    depsgraph,
    out_dir: str,
    frame: int,
    seed_mode: str,
    *,
    masks: bool = True,
    init: str | None = None,
    strength: float | None = None,
) -> FrameRequest:
    """Build the request for the depsgraph's frame, writing its images into ``out_dir``.

    The same steps as Generate from Camera (:func:`.operators.build_layout`), with settings
    read from the evaluated scene so keyframed settings are honoured, the seed following
    ``seed_mode``, and ``init`` (with ``strength``) replacing the scene's init image when given.
    A Proxy Render or Object Layers init image comes from the frame's own proxy render.
    ``masks=False`` skips the mask, depth and reference render (boxes only). Raises ValueError
    with what to fix when nothing can be generated.
    """
    from . import request
    from .blender.scene_layout import layout_from_camera
    from .props import model_spec

    settings = depsgraph.scene_eval.layout_diffusion
    labeled = evaluated_labels(scene, depsgraph)
    if not labeled:
        raise ValueError(
            "No labeled objects: select proxy objects and press Label Selected "
            "(3D View sidebar > Layout), or tick Layout in Object properties"
        )
    # Files of objects labeled in an earlier attempt must not linger next to this frame's.
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir, exist_ok=True)
    try:
        # Everything is read from the evaluated scene before the mask render: that render
        # changes bpy.data, after which the evaluated copy may be re-evaluated or freed.
        request.check_settings(settings)
        fields = request.layout_settings(settings)
        fields["seed"] = frames.seed_for_frame(int(fields["seed"]), frame, seed_mode)
        options = request.engine_options(settings, model_spec)
        model = model_spec(settings) or None
        reference = masks and request.sends_proxy_reference(settings)
        source = settings.init_source
        if strength is None:
            strength = settings.strength
        # Each frame starts from its own proxy render, made with the frame's masks below.
        rendered = init is None and source in request.RENDERED_SOURCES
        if rendered and not masks:
            raise request.UserError(
                f"Init Image is {request.RENDERED_SOURCES[source]}, but an interactive F12 "
                "sends boxes only (the mask and proxy render cannot run in its render thread): "
                "use Generate from Camera, render in the background (blender -b), or set "
                "another Init Image"
            )
        if init is None and source == "IMAGE":
            # "Last Result" belongs to Generate from Camera; animations use --init-previous.
            init = request.init_image(settings, out_dir)
        made = layout_from_camera(
            scene,
            labeled,
            out_dir,
            settings=fields,
            depsgraph=depsgraph,
            masks=masks,
            depth=masks,
            reference=reference or rendered,
        )
        objects = {item.obj.name: item.obj for item in labeled}
        if rendered:
            init = request.rendered_init(source, out_dir, made.layout, objects)
        layout = request.apply_objects(
            made.layout,
            objects,
            out_dir,
            init=init,
            strength=strength,
            ip_adapter=options["ip_adapter"],
            reference=reference,
            layers=source == "LAYERS",
        )
    except request.UserError as exc:
        raise ValueError(str(exc)) from None
    return FrameRequest(
        layout=layout,
        skipped=[list(item) for item in made.skipped],
        model=model,
        options=options,
    )


def render_settings(scene, seed_mode: str) -> dict[str, Any]:
    """What the sidecar records about where a frame came from (beyond the Layout itself)."""
    import bpy

    render = scene.render
    return {
        "blend_file": bpy.data.filepath,
        "scene": scene.name,
        "camera": scene.camera.name if scene.camera else None,
        "resolution": [render.resolution_x, render.resolution_y],
        "resolution_percentage": render.resolution_percentage,
        "seed_mode": seed_mode,
        "base_seed": int(scene.layout_diffusion.seed),
    }


def publish_frame(
    paths: frames.FramePaths,
    tmp: str,
    event: dict[str, Any],
    layout: dict[str, Any],
    *,
    engine: dict[str, Any],
    settings: dict[str, Any],
    layout_seconds: float,
    started: float,
) -> dict[str, float]:
    """Give a generated image (at ``tmp``) its final name, then write its sidecar.

    ``event`` is the engine's ``result`` event; ``started`` the ``time.perf_counter()`` at which
    work on the frame began. Returns the timings recorded in the sidecar.
    """
    frames.publish(tmp, paths.image)
    timings = {
        "layout_seconds": layout_seconds,
        "generate_seconds": float(event.get("seconds") or 0.0),
        "load_seconds": float(event.get("load_seconds") or 0.0),
        "frame_seconds": time.perf_counter() - started,
    }
    record = frames.make_sidecar(
        paths,
        layout,
        seed=int(layout["seed"]),
        model=str(event.get("model") or ""),
        engine=engine,
        settings=settings,
        timings=timings,
    )
    frames.write_sidecar(paths.sidecar, record)
    return timings


def engine_details(hello: dict[str, Any]) -> dict[str, Any]:
    """The parts of a ``hello`` reply a sidecar records."""
    return {key: hello.get(src) for key, src in _ENGINE_KEYS}


_ENGINE_KEYS = (
    ("version", "engine_version"),
    ("protocol", "protocol"),
    ("device", "device"),
    ("dtype", "dtype"),
)


# -- The batch ------------------------------------------------------------------------------------


@dataclass
class FrameOutcome:
    """What happened to one frame of a batch."""

    frame: int
    status: str
    """``written``, ``skipped`` (already complete) or ``failed``."""
    message: str = ""
    seconds: float = 0.0
    generate_seconds: float = 0.0
    layout_seconds: float = 0.0


@dataclass
class BatchSummary:
    """The outcome of :meth:`BatchRenderer.run`."""

    outcomes: list[FrameOutcome] = field(default_factory=list)
    engine_pids: list[int] = field(default_factory=list)
    """Engine process ids in the order they served frames (one entry per process)."""
    stopped: str = ""
    """Why the batch stopped early (empty when every frame was attempted)."""
    seconds: float = 0.0
    load_seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def ok(self) -> bool:
        return not self.stopped and self.count("failed") == 0


@dataclass
class _Pending:
    paths: frames.FramePaths
    job: Job
    tmp: str
    layout: dict[str, Any]
    skipped: list
    layout_seconds: float
    started: float


class BatchRenderer:
    """Renders frames of one scene into one folder through one warm engine client.

    ``on_frame(outcome)`` is called after each frame is written or fails (before the next
    request goes out); ``progress(done, total, outcome)`` drives the progress display.
    """

    def __init__(
        self,
        scene,
        out_dir: str,
        client: EngineClient,
        *,
        model: str | None = None,
        seed_mode: str = "shot",
        overwrite: bool = False,
        init_previous: float | None = None,
        on_frame: Callable[[FrameOutcome], None] | None = None,
        progress: Callable[[int, int, FrameOutcome], None] | None = None,
    ):
        if seed_mode not in SEED_MODES:
            raise BatchError(f"unknown seed mode {seed_mode!r}; use one of {list(SEED_MODES)}")
        self.scene = scene
        self.out_dir = os.path.abspath(out_dir)
        self.client = client
        self.model = model
        """The model every frame uses; None: each frame's scene setting."""
        self.seed_mode = seed_mode
        if init_previous is not None and not 0.0 <= init_previous <= 1.0:
            raise BatchError(
                f"--init-previous is a strength from 0 (keep the previous frame) to 1 "
                f"(ignore it), got {init_previous}"
            )
        self.overwrite = overwrite
        self.init_previous = init_previous
        self._previous: dict[int, int] = {}
        self.on_frame = on_frame
        self.progress = progress
        self.engine: dict[str, Any] = {}

    def run(self, frame_list: list[int]) -> BatchSummary:
        """Render every frame of ``frame_list`` that is not complete yet; never raises for a frame."""
        started = time.perf_counter()
        summary = BatchSummary()
        try:
            self._run(frame_list, summary)
        finally:
            summary.seconds = time.perf_counter() - started
        return summary

    def _run(self, frame_list: list[int], summary: BatchSummary) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        frames.sweep_temp_files(self.out_dir)
        todo, done = frames.plan_frames(self.out_dir, frame_list, overwrite=self.overwrite)
        total = len(frame_list)
        ordered = sorted(frame_list)
        self._previous = dict(zip(ordered[1:], ordered[:-1], strict=True))
        for state in done:
            self._record(summary, FrameOutcome(state.frame, "skipped", "already complete"), total)
        if not todo:
            return
        from .props import model_spec

        try:
            hello = self.client.hello(model=self.model or model_spec(self.scene.layout_diffusion))
        except EngineError as exc:
            summary.stopped = exc.message
            return
        model = hello.get("model")
        if isinstance(model, dict) and model.get("found") is False:
            summary.stopped = str(model.get("message") or f"model {self.model!r} not found")
            return
        self.engine = engine_details(hello)
        pending: _Pending | None = None
        for paths in todo:
            self.scene.frame_set(paths.frame)
            depsgraph = _depsgraph(self.scene)
            layout_start = time.perf_counter()
            previous = self._previous_paths(paths.frame)
            init = previous.image if previous else None
            try:
                made = frame_request(
                    self.scene,
                    depsgraph,
                    paths.layout_dir,
                    paths.frame,
                    self.seed_mode,
                    init=init,
                    strength=self.init_previous if init else None,
                )
                error = None
            except ValueError as exc:
                made, error = None, str(exc)
            layout_seconds = time.perf_counter() - layout_start
            if pending is not None:
                self._finish(pending, summary, total)
                pending = None
                if summary.stopped:
                    break
            if made is None:
                self._record(summary, FrameOutcome(paths.frame, "failed", error), total)
                continue
            if summary.engine_pids and not self.client.alive:
                # Restarting behind the user's back would hide an engine that keeps dying
                # (out of memory, killed): stop, and let a rerun resume from here.
                tail = self.client.stderr_tail(3)
                message = "the engine process stopped unexpectedly" + (
                    f"; its last output:\n{tail}" if tail else ""
                )
                self._record(summary, FrameOutcome(paths.frame, "failed", message), total)
                summary.stopped = f"stopped at frame {paths.frame}: {message}"
                break
            try:
                pending = self._submit(paths, made, layout_seconds, summary)
            except EngineError as exc:
                self._record(summary, FrameOutcome(paths.frame, "failed", exc.message), total)
                summary.stopped = f"stopped at frame {paths.frame}: {exc.message}"
                break
        if pending is not None:
            self._finish(pending, summary, total)
        frames.sweep_temp_files(self.out_dir)

    def _submit(
        self, paths, made: FrameRequest, layout_seconds: float, summary: BatchSummary
    ) -> _Pending:
        layout = made.layout.to_dict()
        previous = self._previous_paths(paths.frame)
        if previous is not None and not frames.frame_state(previous).complete:
            # The frame before failed: this one starts from noise instead.
            layout = _without_init(layout)
        tmp = frames.temp_path(paths.image)
        job = self.client.generate(layout, tmp, self.model or made.model, options=made.options)
        if self.client.pid is not None and self.client.pid not in summary.engine_pids:
            summary.engine_pids.append(self.client.pid)
        return _Pending(
            paths=paths,
            job=job,
            tmp=tmp,
            layout=layout,
            skipped=[list(item) for item in made.skipped],
            layout_seconds=layout_seconds,
            started=time.perf_counter() - layout_seconds,
        )

    def _previous_paths(self, frame: int) -> frames.FramePaths | None:
        """With ``init_previous``: the frame whose image ``frame`` starts from (the one before).

        Requests go out only after the frame before is written, so it is on disk by then.
        """
        if self.init_previous is None or frame not in self._previous:
            return None
        return frames.frame_paths(self.out_dir, self._previous[frame])

    def _finish(self, pending: _Pending, summary: BatchSummary, total: int) -> None:
        paths = pending.paths
        event = pending.job.wait()
        if event.get("event") != "result":
            _remove(pending.tmp)
            code = str(event.get("code") or event.get("event"))
            message = str(event.get("message") or f"generation ended with {code}")
            outcome = FrameOutcome(paths.frame, "failed", message)
            if code in FATAL_CODES or event.get("event") == "cancelled":
                summary.stopped = f"stopped at frame {paths.frame}: {message}"
            self._record(summary, outcome, total)
            return
        settings = render_settings(self.scene, self.seed_mode)
        settings["skipped"] = pending.skipped
        settings["init_previous"] = self.init_previous
        timings = publish_frame(
            paths,
            pending.tmp,
            event,
            pending.layout,
            engine=self.engine,
            settings=settings,
            layout_seconds=pending.layout_seconds,
            started=pending.started,
        )
        summary.load_seconds += timings["load_seconds"]
        outcome = FrameOutcome(
            paths.frame,
            "written",
            seconds=timings["frame_seconds"],
            generate_seconds=timings["generate_seconds"],
            layout_seconds=timings["layout_seconds"],
        )
        self._record(summary, outcome, total)

    def _record(self, summary: BatchSummary, outcome: FrameOutcome, total: int) -> None:
        summary.outcomes.append(outcome)
        if self.progress is not None:
            self.progress(len(summary.outcomes), total, outcome)
        if self.on_frame is not None:
            self.on_frame(outcome)


def _without_init(layout: dict[str, Any]) -> dict[str, Any]:
    """A Layout dict generating from noise: no init image, no strengths."""
    layout = dict(layout, init_image=None, strength=1.0, keep_outside=False)
    layout["regions"] = [dict(region, strength=None) for region in layout["regions"]]
    return layout


def _depsgraph(scene):
    """The evaluated depsgraph of ``scene`` at its current frame."""
    import bpy

    if bpy.context.scene == scene:
        return bpy.context.evaluated_depsgraph_get()
    depsgraph = scene.view_layers[0].depsgraph
    depsgraph.update()
    return depsgraph


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


# -- Command line ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m blender_addon.render",
        description=(
            "Render a Blender scene's animation through the Layout Diffusion engine, one PNG and "
            "one JSON sidecar per frame. Frames already complete in --out are skipped."
        ),
    )
    parser.add_argument("blend", help="the .blend file to render")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument(
        "--frames", help="frames to render, e.g. 1-48 or 1,5,10-12 (default: the scene's range)"
    )
    parser.add_argument(
        "--step", type=int, help="render every N-th frame (default: the scene's frame step)"
    )
    parser.add_argument("--scene", help="scene name (default: the file's active scene)")
    parser.add_argument("--model", help="model spec (default: the scene's Layout Diffusion model)")
    parser.add_argument(
        "--engine-python",
        help="Python interpreter with the engine installed (default: the checkout's .venv, "
        "else this interpreter)",
    )
    parser.add_argument(
        "--seed-mode",
        choices=SEED_MODES,
        help="'shot': the scene seed for every frame; 'frame': scene seed + frame number "
        "(default: the scene's setting, else shot)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="render every frame again, even complete ones"
    )
    parser.add_argument(
        "--init-previous",
        type=float,
        metavar="STRENGTH",
        help="start each frame from the previous frame's image (img2img): 0 keeps it, "
        "1 ignores it; steadier animations at around 0.5-0.7",
    )
    return parser


class _Progress:
    """A tqdm bar when tqdm is importable, plain lines otherwise."""

    def __init__(self, total: int, stream=None):
        self.stream = stream or sys.stderr
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, unit="frame", file=self.stream, dynamic_ncols=True)

    def __call__(self, done: int, total: int, outcome: FrameOutcome) -> None:
        if outcome.status == "written":
            text = f"frame {outcome.frame} written in {outcome.seconds:.2f} s"
        elif outcome.status == "skipped":
            text = f"frame {outcome.frame} already complete"
        else:
            text = f"frame {outcome.frame} FAILED: {outcome.message}"
        if self.bar is None:
            print(f"[{done}/{total}] {text}", file=self.stream, flush=True)
            return
        if outcome.status == "failed":
            self.bar.write(text, file=self.stream)
        self.bar.set_postfix_str(f"frame {outcome.frame}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _open_scene(path: str, scene_name: str | None):
    import bpy

    if not os.path.isfile(path):
        raise BatchError(f"no such .blend file: {path}")
    bpy.ops.wm.open_mainfile(filepath=os.path.abspath(path), load_ui=False)
    if scene_name is None:
        return bpy.context.scene
    scene = bpy.data.scenes.get(scene_name)
    if scene is None:
        names = ", ".join(s.name for s in bpy.data.scenes)
        raise BatchError(f"{path} has no scene {scene_name!r}; its scenes: {names}")
    window = getattr(bpy.context, "window", None)
    if window is not None:
        window.scene = scene
    return scene


def _register_addon() -> None:
    import bpy

    from . import register

    if not hasattr(bpy.types.Scene, "layout_diffusion"):
        register()


def main(argv: list[str] | None = None) -> int:
    """Run the batch; exit status 0 when every requested frame is complete, 1 otherwise."""
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except BatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    from . import engine_session

    if args.step is not None and args.step < 1:
        raise BatchError(f"--step must be 1 or more, got {args.step}")
    if not os.path.isfile(args.blend):
        raise BatchError(f"no such .blend file: {args.blend}")
    _register_addon()
    scene = _open_scene(args.blend, args.scene)
    step = args.step or scene.frame_step
    try:
        if args.frames:
            frame_list = frames.parse_frames(args.frames, step)
        else:
            frame_list = list(range(scene.frame_start, scene.frame_end + 1, step))
    except frames.FrameSpecError as exc:
        raise BatchError(str(exc)) from None
    if not frame_list:
        raise BatchError(f"scene {scene.name!r} has an empty frame range; pass --frames")
    python = args.engine_python or engine_session.default_python() or sys.executable
    python = engine_session.resolve_python(python)
    seed_mode = args.seed_mode or scene_seed_mode(scene)
    client = EngineClient(python, cwd=engine_session.checkout_root())
    renderer = BatchRenderer(
        scene,
        args.out,
        client,
        model=args.model,
        seed_mode=seed_mode,
        overwrite=args.overwrite,
        init_previous=args.init_previous,
    )
    progress = renderer.progress = _Progress(len(frame_list))
    try:
        summary = renderer.run(frame_list)
    except KeyboardInterrupt:
        print(
            "\ninterrupted: complete frames are kept; run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    finally:
        progress.close()
        client.close()
    written, skipped, failed = (summary.count(s) for s in ("written", "skipped", "failed"))
    print(
        f"{written} written, {skipped} already complete, {failed} failed "
        f"in {summary.seconds:.1f} s -> {renderer.out_dir}",
        file=sys.stderr,
    )
    if summary.stopped:
        print(
            f"error: {summary.stopped}\n"
            "Frames already written are kept; run the same command again to resume.",
            file=sys.stderr,
        )
        return 1
    if failed:
        names = ", ".join(str(o.frame) for o in summary.outcomes if o.status == "failed")
        print(f"error: frames not written: {names} (reasons above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
