"""The batch renderer: frames of one scene into one folder through one warm engine, resumable.

Every frame goes to ``DIR/frame_NNNN.png`` with a sidecar ``DIR/frame_NNNN.json`` and its masks
under ``DIR/layout/frame_NNNN/`` (:mod:`.publish`); frames already complete are skipped
(:mod:`..core.frames`). The command line is :mod:`.__main__` (``python -m blender_addon.render``).

The Blender work for frame N+1 (frame change, projection, mask render) runs while the engine
generates frame N; the next request is sent once frame N is written, so a stopped batch never
leaves a later frame half done. Each frame's request is built as Generate builds its own
(:func:`~..blender.frame_request.build_request`).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import bpy

from ..blender.frame_request import FrameRequest, build_request
from ..blender.models import model_spec
from ..client.engine_client import ENGINE_GONE, NOT_INSTALLED, EngineClient, EngineError, Job
from ..core import frames
from ..core.errors import UserError
from ..wire.protocol import BAD_DEVICE, MODEL_NOT_FOUND
from .publish import engine_details, publish_frame, render_settings

SEED_MODES = ("shot", "frame")
FATAL_CODES = frozenset({ENGINE_GONE, NOT_INSTALLED, MODEL_NOT_FOUND, BAD_DEVICE})
"""Engine errors that would fail every following frame too: the batch stops at the first."""


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
            raise UserError(f"unknown seed mode {seed_mode!r}; use one of {list(SEED_MODES)}")
        self.scene = scene
        self.out_dir = os.path.abspath(out_dir)
        self.client = client
        self.model = model
        """The model every frame uses; None: each frame's scene setting."""
        self.seed_mode = seed_mode
        if init_previous is not None and not 0.0 <= init_previous <= 1.0:
            raise UserError(
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
                made = build_request(
                    self.scene,
                    depsgraph,
                    paths.layout_dir,
                    frame=paths.frame,
                    seed_mode=self.seed_mode,
                    init=init,
                    strength=self.init_previous if init else None,
                )
                error = None
            except UserError as exc:
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
    if bpy.context.scene == scene:
        return bpy.context.evaluated_depsgraph_get()
    depsgraph = scene.view_layers[0].depsgraph
    depsgraph.update()
    return depsgraph


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
