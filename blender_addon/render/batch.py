"""The batch renderer: frames of one scene into one folder through one warm engine, resumable
and safe with other renderers on the same folder.

Every frame goes to ``DIR/frame_NNNN.png`` with a sidecar ``DIR/frame_NNNN.json`` and its masks
under ``DIR/layout/frame_NNNN/`` (:mod:`.publish`).

- Claims (:mod:`..core.frames`): a frame is claimed before anything is written for it, and its
  claim's heartbeat beats while it is held. Frames another live renderer holds are left to it
  and waited for after this renderer's own share; a dead or silent renderer's claims are taken
  over. Several renderers (farm machines) on one folder render each frame once.
- Resume: a complete frame is kept only when its fingerprint matches what this run would
  render (its Layout is built again, into a staging folder, to compare) and its PNG decodes;
  stale and damaged frames are rendered again and counted in the summary.
- Watchdog: an engine that makes no progress within a bound (``Watchdog``: ``step_factor``
  times the slowest step seen, at least ``stall_seconds``; ``load_seconds`` while a model
  loads) is killed, and a crashed or killed engine is replaced; the frame is retried up to
  ``RETRIES`` times, then the batch stops. Every replacement is reported as a notice.

The Blender work for frame N+1 (frame change, projection, mask render) runs while the engine
generates frame N; the next request is sent once frame N is written, so a stopped batch never
leaves a later frame half done. Each frame's request is built as Generate builds its own
(:func:`~..blender.frame_request.build_request`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import bpy

from ..blender.frame_request import FrameRequest, build_request
from ..blender.models import model_spec
from ..client import cost
from ..client.engine_client import ENGINE_GONE, NOT_INSTALLED, EngineClient, EngineError, Job
from ..client.high_res import HighResJob, start_generate
from ..core import frames
from ..core.errors import UserError
from ..wire.layout import IMAGE_FIELDS, REGION_IMAGE_FIELDS
from ..wire.protocol import BAD_DEVICE, MODEL_NOT_FOUND
from .publish import (
    engine_details,
    first_pass_path,
    high_res_settings,
    publish_frame,
    render_settings,
)
from .watchdog import ENGINE_HUNG, EngineWatch, Watchdog

SEED_MODES = ("shot", "frame")
FATAL_CODES = frozenset({ENGINE_GONE, NOT_INSTALLED, MODEL_NOT_FOUND, BAD_DEVICE})
"""Engine errors that would fail every following frame too: the batch stops at the first
(a crashed engine only once its frame's retries are spent)."""
RETRIES = 2
"""How often one frame is retried on a new engine after its engine crashed or hung."""
POLL_SECONDS = 2.0
"""How often frames held by other renderers are looked at again."""


@dataclass
class FrameOutcome:
    """What happened to one frame of a batch."""

    frame: int
    status: str
    """``written``, ``skipped`` (already complete, or rendered by another renderer) or
    ``failed``."""
    message: str = ""
    seconds: float = 0.0
    generate_seconds: float = 0.0
    layout_seconds: float = 0.0
    redo: str = ""
    """Why a frame that existed was rendered again: ``stale``, ``damaged`` or
    ``interrupted``."""
    retries: int = 0
    """How often the frame was retried on a new engine."""


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
    notices: list[str] = field(default_factory=list)
    """What the batch did beyond rendering: engines replaced, frames waited for."""

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    def redone(self, why: str) -> int:
        """Frames written again because they were ``why`` (``stale``, ``damaged``)."""
        return sum(1 for o in self.outcomes if o.status == "written" and o.redo == why)

    @property
    def ok(self) -> bool:
        return not self.stopped and self.count("failed") == 0


@dataclass
class _Pending:
    paths: frames.FramePaths
    claim: frames.Claim
    job: Job | HighResJob
    tmp: str
    layout: dict[str, Any]
    model: str | None
    options: dict[str, Any]
    fingerprint: str
    skipped: list
    layout_seconds: float
    started: float
    redo: str
    retries: int = 0


class BatchRenderer:
    """Renders frames of one scene into one folder through one warm engine client.

    ``on_frame(outcome)`` is called after each frame is written or fails (before the next
    request goes out); ``progress(done, total, outcome)`` drives the progress display;
    ``notify(text)`` hears what the batch did beyond rendering (an engine replaced, frames
    waited for). ``watchdog``, ``stale_seconds`` (a silent renderer's claims) and
    ``heartbeat_seconds`` set the time bounds.
    """

    high_res = True
    """Whether frames far above the model's native size go through the high-res fix (the
    scene's High-res Fix setting)."""

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
        notify: Callable[[str], None] | None = None,
        watchdog: Watchdog | None = None,
        stale_seconds: float = frames.STALE_SECONDS,
        heartbeat_seconds: float = frames.HEARTBEAT_SECONDS,
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
        self.notify = notify
        self.watchdog = watchdog or Watchdog()
        self.stale_seconds = stale_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.engine: dict[str, Any] = {}
        self.owner = frames.Owner.current()
        self._claims = frames.HeldClaims(heartbeat_seconds)
        self._waited_for: set[int] = set()
        self._watch = EngineWatch()
        self._total = 0
        self._native: int | None = None
        """The model's native side (from the engine), for the high-res fix."""
        self._cost_said = False

    def run(self, frame_list: list[int]) -> BatchSummary:
        """Render every frame of ``frame_list`` that is not complete yet; never raises for a frame."""
        started = time.perf_counter()
        summary = BatchSummary()
        try:
            self._run(frame_list, summary)
        finally:
            self._claims.stop(5.0)
            self._claims.let_go_all()
            summary.seconds = time.perf_counter() - started
        return summary

    def _run(self, frame_list: list[int], summary: BatchSummary) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        ordered = sorted(set(frame_list))
        self._total = len(frame_list)
        self._previous = dict(zip(ordered[1:], ordered[:-1], strict=True))
        todo = ordered
        waited = False
        while todo and not summary.stopped:
            todo = self._pass(todo, summary)
            if todo and not summary.stopped:
                if not waited:
                    self._notice(
                        summary,
                        f"{len(todo)} frame(s) are being rendered by other renderers "
                        f"({_frame_list(todo)}); waiting for them, taking over any whose "
                        f"renderer stops (silent for {self.stale_seconds:.0f} s or exited)",
                    )
                    waited = True
                time.sleep(POLL_SECONDS)
        if not summary.stopped:
            # A renderer killed while it compared a frame this one had already written left
            # its claim and staging folder there; nobody waits for that frame any more.
            frames.clear_dead_claims(
                (frames.frame_paths(self.out_dir, frame) for frame in ordered),
                self.owner,
                self.stale_seconds,
            )

    # -- One pass -------------------------------------------------------------------------------

    def _pass(self, todo: list[int], summary: BatchSummary) -> list[int]:
        """Render or check every frame of ``todo`` this renderer can claim; the frames left to
        other renderers (to be looked at again)."""
        deferred: list[int] = []
        pending: _Pending | None = None
        for frame in todo:
            if summary.stopped:
                break
            previous = self._previous.get(frame)
            if self.init_previous is not None and previous in deferred:
                deferred.append(frame)  # it starts from a frame another renderer is making
                continue
            paths = frames.frame_paths(self.out_dir, frame)
            claim = frames.try_claim(paths, self.owner, self.stale_seconds)
            if claim is None:
                deferred.append(frame)
                self._waited_for.add(frame)
                continue
            self._claims.hold(claim)
            built = self._build(paths)
            if pending is not None:
                self._finish(pending, summary)
                pending = None
            if summary.stopped:
                self._discard(built)
                self._claims.let_go(claim)
                break
            pending = self._start(paths, claim, built, summary)
        if pending is not None:
            self._finish(pending, summary)
        return deferred

    def _build(self, paths: frames.FramePaths) -> tuple[FrameRequest | None, str, str, float]:
        """The frame's request, built into a staging folder: ``(made or None, error, staging,
        seconds)``. Nothing of the frame's own files changes until it is rendered."""
        self.scene.frame_set(paths.frame)
        depsgraph = _depsgraph(self.scene)
        started = time.perf_counter()
        staging = os.path.join(
            os.path.dirname(paths.layout_dir),
            f".{os.path.basename(paths.layout_dir)}.staging-{self.owner.token[:12]}",
        )
        previous = self._previous_paths(paths.frame)
        init = previous.image if previous else None
        try:
            made = build_request(
                self.scene,
                depsgraph,
                staging,
                frame=paths.frame,
                seed_mode=self.seed_mode,
                init=init,
                strength=self.init_previous if init else None,
            )
            error = ""
        except UserError as exc:
            made, error = None, str(exc)
        return made, error, staging, time.perf_counter() - started

    def _start(
        self,
        paths: frames.FramePaths,
        claim: frames.Claim,
        built: tuple[FrameRequest | None, str, str, float],
        summary: BatchSummary,
    ) -> _Pending | None:
        """Compare a built frame with what is on disk; skip it, or send it to the engine."""
        made, error, staging, layout_seconds = built
        frame = paths.frame
        if made is None:
            self._discard(built)
            self._claims.let_go(claim)
            self._settle(summary, FrameOutcome(frame, "failed", error))
            return None
        model = self.model or made.model
        layout = made.layout.to_dict()
        previous = self._previous_paths(frame)
        if previous is not None and not frames.frame_state(previous).complete:
            # The frame before failed: this one starts from noise instead.
            layout = _without_init(layout)
        settings = self._settings()
        fingerprint = frames.fingerprint(
            layout,
            seed=int(layout["seed"]),
            model=model,
            options=made.options,
            settings=settings,
        )
        state = frames.frame_state(paths, fingerprint)
        # --overwrite renders again what was there before, not what another renderer just made.
        if state.complete and (not self.overwrite or frame in self._waited_for):
            self._discard(built)
            frames.sweep_frame(claim, paths)
            self._claims.let_go(claim)
            elsewhere = frame in self._waited_for
            message = "rendered by another renderer" if elsewhere else "already complete"
            self._settle(summary, FrameOutcome(frame, "skipped", message))
            return None
        redo = state.kind if state.kind in ("stale", "damaged", "interrupted") else ""
        if not self._engine_ready(summary):
            self._discard(built)
            self._claims.let_go(claim)
            return None
        frames.replace_folder(staging, paths.layout_dir)
        layout = _moved(layout, staging, paths.layout_dir)
        frames.sweep_frame(claim, paths)
        pending = _Pending(
            paths=paths,
            claim=claim,
            job=None,  # type: ignore[arg-type]  # sent just below
            tmp=frames.temp_path(paths.image),
            layout=layout,
            model=model,
            options=made.options,
            fingerprint=fingerprint,
            skipped=[list(item) for item in made.skipped],
            layout_seconds=layout_seconds,
            started=time.perf_counter() - layout_seconds,
            redo=redo,
        )
        try:
            self._send(pending, summary)
        except EngineError as exc:
            self._claims.let_go(claim)
            self._settle(summary, FrameOutcome(frame, "failed", exc.message))
            summary.stopped = f"stopped at frame {frame}: {exc.message}"
            return None
        return pending

    def _engine_ready(self, summary: BatchSummary) -> bool:
        """Ask the engine who it is once (starting it); False (and the batch stopped) if it
        cannot serve the model."""
        if self.engine:
            return True
        try:
            hello = self.client.hello(model=self.model or model_spec(self.scene.layout_diffusion))
        except EngineError as exc:
            summary.stopped = exc.message
            return False
        model = hello.get("model")
        if isinstance(model, dict) and model.get("found") is False:
            summary.stopped = str(model.get("message") or f"model {self.model!r} not found")
            return False
        self.engine = engine_details(hello)
        if isinstance(model, dict) and isinstance(model.get("native_size"), int):
            self._native = model["native_size"]
        return True

    def _send(self, pending: _Pending, summary: BatchSummary, retry: bool = False) -> None:
        """Send the frame's generate request; a dead engine is replaced first (and said so)."""
        known = summary.engine_pids
        if known and not self.client.alive and not retry:
            tail = self.client.stderr_tail(3)
            self._notice(
                summary,
                f"frame {pending.paths.frame}: the engine process stopped unexpectedly"
                + (f" (its last output: {tail})" if tail else "")
                + "; starting a new one",
            )
        settings = self.scene.layout_diffusion
        if not self._cost_said:
            self._cost_said = True
            self._say_cost(pending, summary)
        pending.job = start_generate(
            self.client,
            pending.layout,
            pending.tmp,
            pending.model,
            pending.options,
            native=self._native,
            high_res=self.high_res and settings.use_high_res_fix,
            strength=settings.high_res_strength,
            first_out=first_pass_path(pending.paths),
        )
        if self.client.pid is not None and self.client.pid not in known:
            known.append(self.client.pid)

    def _say_cost(self, pending: _Pending, summary: BatchSummary) -> None:
        """Tell what each frame will cost (native size, size, estimate, high-res fix), once."""
        spec = pending.model or model_spec(self.scene.layout_diffusion)
        try:
            known = cost.ask(self.client, spec, timeout=300.0)
        except (EngineError, TimeoutError):
            known = None
        if known is None:
            return
        self._native = int(known["native_size"])
        settings = self.scene.layout_diffusion
        layout = pending.layout
        lines = cost.describe(
            known,
            int(layout["width"]),
            int(layout["height"]),
            int(layout["steps"]),
            settings.use_high_res_fix,
            settings.high_res_strength,
        )
        self._notice(summary, "each frame: " + "; ".join(text for text, _ in lines))

    def _previous_paths(self, frame: int) -> frames.FramePaths | None:
        """With ``init_previous``: the frame whose image ``frame`` starts from (the one before).

        Requests go out only after the frame before is written, so it is on disk by then.
        """
        if self.init_previous is None or frame not in self._previous:
            return None
        return frames.frame_paths(self.out_dir, self._previous[frame])

    # -- Waiting for the engine -----------------------------------------------------------------

    def _finish(self, pending: _Pending, summary: BatchSummary) -> None:
        paths = pending.paths
        while True:
            event = self._wait(pending)
            if isinstance(pending.job, HighResJob):
                _remove(pending.job.first_out)  # the second pass has read it
            code = str(event.get("code") or event.get("event"))
            if event.get("event") == "result":
                break
            _remove(pending.tmp)
            if code in (ENGINE_GONE, ENGINE_HUNG) and pending.retries < RETRIES:
                pending.retries += 1
                self._notice(
                    summary,
                    f"frame {paths.frame}: {_first_line(event.get('message'))}; replaced the "
                    f"engine and retrying the frame (retry {pending.retries} of {RETRIES})",
                )
                try:
                    self._send(pending, summary, retry=True)
                except EngineError as exc:
                    event = {"event": "error", "code": exc.code, "message": exc.message}
                else:
                    continue
            message = str(event.get("message") or f"generation ended with {code}")
            if pending.retries:
                message += f" (after {pending.retries} retries on new engines)"
            self._claims.let_go(pending.claim)
            outcome = FrameOutcome(paths.frame, "failed", message, retries=pending.retries)
            if code in FATAL_CODES or code == ENGINE_HUNG or event.get("event") == "cancelled":
                summary.stopped = f"stopped at frame {paths.frame}: {message}"
            self._settle(summary, outcome)
            return
        if not frames.holds(pending.claim):
            # This renderer was silent too long and another one took the frame over.
            _remove(pending.tmp)
            self._claims.forget(pending.claim)
            message = "another renderer took this frame over; its image is kept"
            self._settle(summary, FrameOutcome(paths.frame, "skipped", message))
            return
        self._publish(pending, event, self.engine, summary)

    def _publish(
        self,
        pending: _Pending,
        event: dict[str, Any],
        engine: dict[str, Any],
        summary: BatchSummary,
    ) -> None:
        """Write a generated frame (its image already in ``pending.tmp``) with its sidecar,
        and let its claim go."""
        paths = pending.paths
        settings = self._settings()
        settings["skipped"] = pending.skipped
        settings["engine_options"] = pending.options
        settings["renderer"] = {"host": self.owner.host, "pid": self.owner.pid}
        timings = publish_frame(
            paths,
            pending.tmp,
            event,
            pending.layout,
            engine=engine,
            settings=settings,
            layout_seconds=pending.layout_seconds,
            started=pending.started,
            fingerprint=pending.fingerprint,
        )
        frames.sweep_frame(pending.claim, paths)
        self._claims.let_go(pending.claim)
        summary.load_seconds += timings["load_seconds"]
        outcome = FrameOutcome(
            paths.frame,
            "written",
            seconds=timings["frame_seconds"],
            generate_seconds=timings["generate_seconds"],
            layout_seconds=timings["layout_seconds"],
            redo=pending.redo,
            retries=pending.retries,
        )
        self._settle(summary, outcome)

    def _wait(self, pending: _Pending) -> dict[str, Any]:
        """The job's final event; a synthetic ``engine_hung`` error (the engine killed) when no
        event comes within the watchdog's bound."""
        watchdog = self.watchdog

        def hung(bound: float, loading: bool) -> str:
            return (
                f"the engine made no progress for {bound:.0f} s "
                f"({'loading the model' if loading else 'between steps'}; the bound is "
                f"{watchdog.step_factor:g} x the slowest step, at least "
                f"{watchdog.stall_seconds:g} s) and was stopped"
            )

        return self._watch.wait(pending.job, self.client, watchdog, hung)

    # -- Bookkeeping ----------------------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        settings = render_settings(self.scene, self.seed_mode)
        settings["init_previous"] = self.init_previous
        if self.high_res:
            # Part of the fingerprint: a changed strength renders the frames again.
            settings.update(high_res_settings(self.scene))
        return settings

    def _discard(self, built: tuple[Any, str, str, float]) -> None:
        shutil.rmtree(built[2], ignore_errors=True)

    def _settle(self, summary: BatchSummary, outcome: FrameOutcome) -> None:
        summary.outcomes.append(outcome)
        if self.progress is not None:
            self.progress(len(summary.outcomes), self._total, outcome)
        if self.on_frame is not None:
            self.on_frame(outcome)

    def _notice(self, summary: BatchSummary, text: str) -> None:
        summary.notices.append(text)
        if self.notify is not None:
            self.notify(text)


def _moved(layout: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """A Layout dict whose image paths under ``old`` point under ``new`` instead."""
    prefix = old.rstrip(os.sep) + os.sep

    def move(value: Any) -> Any:
        if isinstance(value, str) and value.startswith(prefix):
            return os.path.join(new, value[len(prefix) :])
        return value

    layout = dict(layout)
    for key in IMAGE_FIELDS:
        layout[key] = move(layout.get(key))
    layout["regions"] = [
        {**r, **{k: move(r.get(k)) for k in REGION_IMAGE_FIELDS}} for r in layout["regions"]
    ]
    return layout


def _frame_list(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:8])
    return shown + (f" and {len(numbers) - 8} more" if len(numbers) > 8 else "")


def _first_line(text: Any) -> str:
    return str(text or "the engine failed").strip().splitlines()[0].rstrip(".")


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
