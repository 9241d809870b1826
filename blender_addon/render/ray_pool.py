"""A batch's frames across a Ray cluster: a pool of actors, one per GPU, each with a warm engine.

No bpy and no torch: this module runs on Ray's workers, where Blender is not installed. Each
actor (:class:`EngineWorker`) starts ``engine serve`` as its own child process with the
add-on's client and keeps it (and its model) warm between frames. Nothing is shared through
files: a frame's Layout goes to the actor with its images as bytes (:func:`pack_layout`), the
actor writes them into its own temporary folder, generates, and sends the PNG back as bytes,
its provenance naming the renderer's paths again (:func:`restore_paths`), so the PNG is the one
a local engine would have written.

:class:`RayPool` hands frames to actors as they free up. An actor that dies mid-frame loses
nothing: the frame goes to another actor (up to ``RETRIES`` times) and the dead actor is
replaced, or dropped once too many have died. Writing the frames stays with the renderer
(:mod:`.ray_batch`), so each is written once, atomically, with its sidecar.

Ray is an optional extra (``pip install -e .[cluster]``), imported only when a pool starts.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import socket
import struct
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

from ..client.engine_client import ENGINE_GONE, NOT_INSTALLED, EngineClient, EngineError
from ..client.high_res import start_generate
from ..core.errors import UserError
from ..wire.cost import HIGH_RES_STRENGTH
from ..wire.layout import IMAGE_FIELDS, REGION_IMAGE_FIELDS
from ..wire.protocol import MODEL_NOT_FOUND
from .watchdog import ENGINE_HUNG, EngineWatch, Watchdog

INSTALL_HINT = "pip install -e .[cluster]"
"""How to get Ray, from a checkout of this project."""
"""The batch's code for an engine its watchdog stopped (as in :mod:`.batch`)."""
WORKERS_GONE = "workers_gone"
"""No actor is left to render on."""
RETRIES = 2
"""How often one frame is sent again after its engine or its actor died."""
PROVENANCE_KEY = "layout-diffusion"
"""The PNG text chunk holding the engine's provenance record (``engine.service.provenance``)."""
FIRST_PASS_NAME = "first_pass.png"
"""The high-res fix's first pass in a frame's temporary folder on the actor."""
RAY_ENGINE_FIX = (
    "Install the engine on every Ray node (pip install -e .[engine,cluster] in a checkout) or "
    "pass --engine-python with the Python that has it there."
)


def import_ray() -> Any:
    """The ``ray`` module; a UserError that says how to install it when it is missing."""
    try:
        import ray
    except ImportError:
        raise UserError(
            f"--ray needs Ray, which is not installed in this Python ({sys.executable}): "
            f"run {INSTALL_HINT} in the project's checkout (or pip install 'ray>=2.60')."
        ) from None
    return ray


# -- Files as bytes ---------------------------------------------------------------------------


def _image_holders(layout: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    holders = [(layout, key) for key in IMAGE_FIELDS]
    holders += [(region, key) for region in layout["regions"] for key in REGION_IMAGE_FIELDS]
    return holders


def pack_layout(layout: dict[str, Any]) -> tuple[dict[str, Any], dict[str, bytes], dict[str, str]]:
    """A Layout dict whose image paths are replaced by names of files carried as bytes.

    Returns ``(packed, files, origins)``: ``files`` maps each name to the file's bytes,
    ``origins`` each name to the path it came from. A file named twice travels once.
    """
    packed = json.loads(json.dumps(layout))
    files: dict[str, bytes] = {}
    origins: dict[str, str] = {}
    names: dict[str, str] = {}
    for holder, key in _image_holders(packed):
        path = holder.get(key)
        if not isinstance(path, str) or not path:
            continue
        if path not in names:
            name = f"{len(names)}-{os.path.basename(path)}"
            with open(path, "rb") as handle:
                files[name] = handle.read()
            names[path] = name
            origins[name] = path
        holder[key] = names[path]
    return packed, files, origins


def unpack_layout(packed: dict[str, Any], files: dict[str, bytes], folder: str) -> dict[str, Any]:
    """Write ``files`` into ``folder`` and return the Layout dict naming them by absolute path."""
    layout = json.loads(json.dumps(packed))
    written: dict[str, str] = {}
    for name, data in files.items():
        if os.path.basename(name) != name or name in (".", ".."):
            raise ValueError(f"a packed file name must be a plain name, got {name!r}")
        path = os.path.join(folder, name)
        with open(path, "wb") as handle:
            handle.write(data)
        written[name] = path
    for holder, key in _image_holders(layout):
        name = holder.get(key)
        if isinstance(name, str) and name:
            if name not in written:
                raise ValueError(f"the Layout's {key} names {name!r}, which was not sent")
            holder[key] = written[name]
    return layout


def restore_paths(png: bytes, mapping: dict[str, str]) -> bytes:
    """``png`` with the image paths in its provenance record mapped through ``mapping``.

    The engine records the Layout it read, with the paths of the actor's temporary copies; the
    renderer's own paths make the PNG the one a local engine writes (and name files that stay).
    Only the ``layout-diffusion`` iTXt chunk changes; a PNG without one comes back unchanged.
    """
    signature = b"\x89PNG\r\n\x1a\n"
    if not png.startswith(signature) or not mapping:
        return png
    out = [signature]
    at = len(signature)
    while at + 12 <= len(png):
        (length,) = struct.unpack(">I", png[at : at + 4])
        kind = png[at + 4 : at + 8]
        body = png[at + 8 : at + 8 + length]
        end = at + 12 + length
        if kind == b"iTXt" and body.startswith(PROVENANCE_KEY.encode() + b"\0"):
            body = _restore_itxt(body, mapping)
            crc = zlib.crc32(kind + body) & 0xFFFFFFFF
            out.append(struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc))
        else:
            out.append(png[at:end])
        at = end
    out.append(png[at:])
    return b"".join(out)


def _restore_itxt(body: bytes, mapping: dict[str, str]) -> bytes:
    keyword, rest = body.split(b"\0", 1)
    compressed, method = rest[0], rest[1]
    language, rest = rest[2:].split(b"\0", 1)
    translated, text = rest.split(b"\0", 1)
    if compressed:
        return body  # the engine writes it plain; leave anything else alone
    record = json.loads(text.decode("utf-8"))
    layout = record.get("layout")
    if not isinstance(layout, dict):
        return body
    for holder, key in _image_holders(layout):
        value = holder.get(key)
        if isinstance(value, str) and value in mapping:
            holder[key] = mapping[value]
    # The engine wrote json.dumps(record, ensure_ascii=False): the same call gives its bytes.
    text = json.dumps(record, ensure_ascii=False).encode("utf-8")
    head = keyword + b"\0" + bytes([compressed, method]) + language + b"\0" + translated + b"\0"
    return head + text


# -- One actor ----------------------------------------------------------------------------------


@dataclass
class FrameTask:
    """One frame's request as it travels to an actor."""

    frame: int
    layout: dict[str, Any]
    """The Layout dict with image names from :func:`pack_layout`."""
    files: dict[str, bytes]
    origins: dict[str, str]
    """Each file's path on the renderer's side (written back into the PNG's provenance)."""
    model: str | None = None
    options: dict[str, Any] | None = None
    high_res: HighResTask | None = None
    """The scene's High-res Fix, when it is on."""


@dataclass
class HighResTask:
    """The high-res fix as a frame's actor runs it (:func:`..client.high_res.start_generate`)."""

    native: int | None
    """The model's native side (None: unknown, one pass)."""
    strength: float
    first_out: str
    """Where the renderer's own batch would put the first pass: the frame's PNG names it."""


@dataclass
class FrameResult:
    """What an actor sends back for one frame."""

    frame: int
    event: dict[str, Any]
    """The engine's final event: ``result``, or an ``error`` (also for a dead actor)."""
    image: bytes | None = None
    worker: str = ""
    host: str = ""
    engine_pid: int | None = None
    hello: dict[str, Any] = field(default_factory=dict)
    """The actor engine's ``hello`` reply (version, device, dtype)."""
    seconds: float = 0.0
    """Wall time on the actor, files and engine included."""
    retries: int = 0

    @property
    def ok(self) -> bool:
        return self.event.get("event") == "result" and self.image is not None


class EngineWorker:
    """The body of one Ray actor: a warm ``engine serve`` child and the frames sent to it.

    ``engine_python`` is the interpreter with the engine on the actor's node (default: the
    actor's own). The watchdog bounds are the batch's: an engine silent for longer is killed
    and the frame answered with ``engine_hung``; the next frame starts a new engine.
    """

    def __init__(
        self,
        name: str,
        engine_python: str | None = None,
        stall_seconds: float = 120.0,
        step_factor: float = 10.0,
        load_seconds: float = 900.0,
    ):
        self.name = name
        self.host = socket.gethostname()
        self.client = EngineClient(engine_python or sys.executable, fix=RAY_ENGINE_FIX)
        self.watchdog = Watchdog(stall_seconds, step_factor, load_seconds)
        self.root = tempfile.mkdtemp(prefix=f"ld-ray-{name}-")
        self._hello: dict[str, Any] = {}
        self._watch = EngineWatch()

    def hello(self, model: str | None = None) -> dict[str, Any]:
        """Start the engine and return its ``hello`` (an ``error`` event if it cannot start)."""
        try:
            self._hello = self.client.hello(model=model, timeout=self.watchdog.load_seconds)
        except EngineError as exc:
            return {"event": "error", "code": exc.code, "message": exc.message}
        return self._hello

    def render(self, task: FrameTask) -> FrameResult:
        """Generate one frame; its PNG comes back as bytes."""
        started = time.perf_counter()
        folder = tempfile.mkdtemp(prefix=f"frame-{task.frame}-", dir=self.root)
        result = FrameResult(task.frame, {}, worker=self.name, host=self.host)
        try:
            if not self._hello or not self.client.alive:
                hello = self.hello(task.model)
                if hello.get("event") == "error":
                    result.event = hello
                    return result
            try:
                layout = unpack_layout(task.layout, task.files, folder)
            except (OSError, ValueError) as exc:
                result.event = {"event": "error", "code": "bad_request", "message": str(exc)}
                return result
            out = os.path.join(folder, "frame.png")
            fix = task.high_res
            first_out = os.path.join(folder, FIRST_PASS_NAME)
            job = start_generate(
                self.client,
                layout,
                out,
                task.model,
                task.options,
                native=fix.native if fix else None,
                high_res=fix is not None,
                strength=fix.strength if fix else HIGH_RES_STRENGTH,
                first_out=first_out,
            )
            result.engine_pid = self.client.pid
            result.event = self._wait(job)
            if result.event.get("event") == "result":
                with open(out, "rb") as handle:
                    png = handle.read()
                mapping = {os.path.join(folder, n): p for n, p in task.origins.items()}
                if fix is not None:
                    mapping[first_out] = fix.first_out
                result.image = restore_paths(png, mapping)
            result.hello = self._hello
            return result
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            result.seconds = time.perf_counter() - started

    def close(self) -> None:
        """Stop the engine and remove the temporary folder."""
        self.client.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def _wait(self, job: Any) -> dict[str, Any]:
        """The job's final event, or ``engine_hung`` (engine killed) when it goes silent."""

        def hung(bound: float, loading: bool) -> str:
            return (
                f"the engine on Ray worker {self.name} ({self.host}) made no progress for "
                f"{bound:.0f} s and was stopped"
            )

        return self._watch.wait(job, self.client, self.watchdog, hung)


# -- The pool -----------------------------------------------------------------------------------


@dataclass
class _Ticket:
    task: FrameTask
    retries: int = 0


@dataclass
class _Worker:
    name: str
    handle: Any
    started: float
    frames: int = 0
    first: float | None = None
    """When its first frame was sent (its rate counts from then)."""
    warm: bool = False
    busy: tuple[Any, _Ticket, float] | None = None
    """The running call's object ref, its ticket and when it was sent."""


class RayPool:
    """Ray actors, each with a warm engine, taking frames as they free up.

    Use :meth:`connect` to join (or start) a cluster. :meth:`start` creates the actors and
    checks their engines; :meth:`submit` queues a frame; :meth:`next_result` waits for the
    next frame that is done for good (rendered, or failed after its retries).
    """

    def __init__(
        self,
        ray: Any,
        workers: int,
        *,
        gpus: bool,
        engine_python: str | None = None,
        stall_seconds: float = 120.0,
        step_factor: float = 10.0,
        load_seconds: float = 900.0,
        retries: int = RETRIES,
        replacements: int | None = None,
    ):
        if workers < 1:
            raise UserError(f"a Ray pool needs at least 1 worker, got {workers}")
        self.ray = ray
        self.size = workers
        self.gpus = gpus
        self.engine_python = engine_python
        self.stall_seconds = stall_seconds
        self.step_factor = step_factor
        self.load_seconds = load_seconds
        self.retries = retries
        self.replacements = workers if replacements is None else replacements
        """How many dead actors are replaced in all; after that they are dropped."""
        self._workers: dict[str, _Worker] = {}
        self._queue: collections.deque[_Ticket] = collections.deque()
        self._notices: list[str] = []
        self._count = 0
        self._replaced = 0
        self._slowest_frame: float | None = None
        self._actor_class = ray.remote(EngineWorker)

    @classmethod
    def connect(
        cls,
        address: str | None,
        workers: int | None = None,
        **options: Any,
    ) -> RayPool:
        """Join the cluster at ``address`` (None: ``RAY_ADDRESS`` or a new local one) and size
        the pool: one actor per GPU, else ``workers`` CPU actors (default 1)."""
        ray = import_ray()
        if not ray.is_initialized():
            options_init: dict[str, Any] = {"log_to_driver": False, "logging_level": "WARNING"}
            if not address and not os.environ.get("RAY_ADDRESS"):
                # A cluster of its own, for this batch only: no dashboard to serve.
                options_init["include_dashboard"] = False
            ray.init(address=address or None, **options_init)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        count = workers or gpus or 1
        pool = cls(ray, count, gpus=gpus > 0, **options)
        kind = f"{count} GPU worker(s)" if gpus else f"{count} CPU worker(s) (no GPUs)"
        pool._notices.append(
            f"Ray cluster: {resources.get('CPU', 0):g} CPUs, {gpus} GPUs; rendering on {kind}"
        )
        if gpus and count > gpus:
            pool._notices.append(
                f"{count - gpus} of the {count} workers wait for a GPU the cluster does not have "
                f"yet; one not ready within {pool.load_seconds + pool.stall_seconds:.0f} s is "
                "dropped"
            )
        return pool

    # -- Actors -------------------------------------------------------------------------------

    def start(self, model: str | None = None) -> dict[str, Any]:
        """Create the actors and start their engines; the first engine's ``hello``.

        Raises EngineError when no engine can start or the model is missing; an actor that is
        not ready within the load bound is dropped with a notice.
        """
        while len(self._workers) < self.size:
            self._spawn()
        calls = {w.handle.hello.remote(model): w for w in self._workers.values()}
        ready, late = self.ray.wait(
            list(calls), num_returns=len(calls), timeout=self.load_seconds + self.stall_seconds
        )
        hellos = []
        for ref in late:
            worker = calls[ref]
            self._drop(worker, f"Ray worker {worker.name} was not ready in time; dropped")
        for ref in ready:
            try:
                hellos.append(self.ray.get(ref))
            except self.ray.exceptions.RayError as exc:
                self._drop(calls[ref], f"Ray worker {calls[ref].name} failed to start: {exc}")
        for hello in hellos:
            if hello.get("event") == "error":
                raise EngineError(str(hello.get("code")), str(hello.get("message")))
            found = hello.get("model")
            if isinstance(found, dict) and found.get("found") is False:
                message = found.get("message") or f"model {model!r} not found"
                raise EngineError(MODEL_NOT_FOUND, str(message))
        if not hellos:
            raise EngineError(NOT_INSTALLED, "no Ray worker could start an engine")
        for worker in self._workers.values():
            worker.warm = True
        return hellos[0]

    def _spawn(self) -> _Worker:
        self._count += 1
        name = f"w{self._count}"
        options: dict[str, Any] = {"num_cpus": 1, "max_restarts": 0}
        if self.gpus:
            options["num_gpus"] = 1
        handle = self._actor_class.options(**options).remote(
            name,
            self.engine_python,
            self.stall_seconds,
            self.step_factor,
            self.load_seconds,
        )
        worker = _Worker(name, handle, time.monotonic())
        self._workers[name] = worker
        return worker

    def _drop(self, worker: _Worker, notice: str) -> None:
        self._workers.pop(worker.name, None)
        self.ray.kill(worker.handle)
        self._notices.append(notice)

    def close(self) -> None:
        """Stop every actor's engine and the actors."""
        workers = list(self._workers.values())
        self._workers.clear()
        closing = [w.handle.close.remote() for w in workers]
        if closing:
            self.ray.wait(closing, num_returns=len(closing), timeout=10.0)
        for worker in workers:
            self.ray.kill(worker.handle)

    # -- Frames -------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Frames worth keeping in the pool: one per live actor, plus one ready for whichever
        frees up first (so no actor waits while Blender builds the next frame)."""
        return len(self._workers) + 1

    @property
    def pending(self) -> int:
        """Frames submitted and not yet returned by :meth:`next_result`."""
        return len(self._queue) + sum(1 for w in self._workers.values() if w.busy)

    def submit(self, task: FrameTask) -> None:
        """Queue a frame for the next free actor."""
        self._queue.append(_Ticket(task))
        self._dispatch()

    def busy(self) -> list[tuple[str, int, float, Any]]:
        """``(worker, frame, seconds running, actor handle)`` for every actor at work."""
        now = time.monotonic()
        return [
            (w.name, w.busy[1].task.frame, now - w.busy[2], w.handle)
            for w in self._workers.values()
            if w.busy
        ]

    def take_notices(self) -> list[str]:
        """What the pool did since the last call: actors replaced or dropped, frames resent."""
        notices, self._notices = self._notices, []
        return notices

    def rates(self) -> list[tuple[str, int, float]]:
        """``(worker, frames done, frames per minute)`` for every live actor that has worked."""
        now = time.monotonic()
        return [
            (w.name, w.frames, 60.0 * w.frames / max(now - w.first, 1e-6))
            for w in self._workers.values()
            if w.first is not None
        ]

    def next_result(self) -> FrameResult:
        """The next frame that is done for good; frames of dead actors are sent again first."""
        while True:
            self._dispatch()
            running = {w.busy[0]: w for w in self._workers.values() if w.busy}
            if not running:
                if self._queue:
                    ticket = self._queue.popleft()
                    return self._failed(ticket, WORKERS_GONE, "no Ray worker is left to render on")
                raise RuntimeError("next_result() with no frame submitted")
            ready, _ = self.ray.wait(list(running), num_returns=1, timeout=1.0)
            if not ready:
                self._check_deadlines()
                continue
            worker = running[ready[0]]
            done = self._collect(worker)
            if done is not None:
                return done

    def _dispatch(self) -> None:
        for worker in self._workers.values():
            if not self._queue:
                return
            if worker.busy is None:
                ticket = self._queue.popleft()
                ref = worker.handle.render.remote(ticket.task)
                worker.busy = (ref, ticket, time.monotonic())
                if worker.first is None:
                    worker.first = time.monotonic()

    def _collect(self, worker: _Worker) -> FrameResult | None:
        """The finished call's result when it is final; None when its frame was requeued."""
        assert worker.busy is not None
        ref, ticket, sent = worker.busy
        frame = ticket.task.frame
        try:
            result: FrameResult = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as exc:
            return self._lost(worker, f"stopped during frame {frame} ({_first_line(exc)})")
        except self.ray.exceptions.RayError as exc:
            worker.busy = None
            return self._failed(ticket, "internal", f"Ray worker {worker.name}: {exc}")
        worker.busy = None
        worker.warm = True
        result.retries = ticket.retries
        code = str(result.event.get("code") or result.event.get("event"))
        if result.ok:
            worker.frames += 1
            elapsed = time.monotonic() - sent
            self._slowest_frame = max(self._slowest_frame or 0.0, elapsed)
            return result
        if code in (ENGINE_GONE, ENGINE_HUNG) and ticket.retries < self.retries:
            ticket.retries += 1
            self._notices.append(
                f"frame {frame}: {_first_line(result.event.get('message'))} on Ray worker "
                f"{worker.name}; its engine restarts and the frame is sent again "
                f"(retry {ticket.retries} of {self.retries})"
            )
            self._queue.appendleft(ticket)
            return None
        return result

    def _lost(self, worker: _Worker, why: str) -> FrameResult | None:
        """An actor died: replace or drop it; send its frame to another actor."""
        assert worker.busy is not None
        _, ticket, _ = worker.busy
        worker.busy = None
        self._workers.pop(worker.name, None)
        with_retry = ticket.retries < self.retries
        text = f"Ray worker {worker.name} {why}"
        if self._replaced < self.replacements:
            self._replaced += 1
            replacement = self._spawn()
            text += f"; started {replacement.name} in its place"
        else:
            text += f"; dropped ({len(self._workers)} left)"
        if not with_retry:
            self._notices.append(text)
            return self._failed(ticket, ENGINE_GONE, f"Ray worker {worker.name} {why}")
        ticket.retries += 1
        self._notices.append(
            text + f"; frame {ticket.task.frame} goes to the next free worker "
            f"(retry {ticket.retries} of {self.retries})"
        )
        self._queue.appendleft(ticket)
        return None

    def _check_deadlines(self) -> None:
        """Kill an actor whose call outlived any bound (a hung worker or node); its frame is
        then sent again like that of an actor that died."""
        now = time.monotonic()
        for worker in list(self._workers.values()):
            if worker.busy is None:
                continue
            if worker.warm and self._slowest_frame is not None:
                bound = self.stall_seconds + self.step_factor * self._slowest_frame
            else:
                bound = self.load_seconds + self.stall_seconds
            if now - worker.busy[2] > bound:
                self.ray.kill(worker.handle)

    def _failed(self, ticket: _Ticket, code: str, message: str) -> FrameResult:
        event = {"event": "error", "code": code, "message": message}
        return FrameResult(ticket.task.frame, event, retries=ticket.retries)


def _first_line(text: Any) -> str:
    return str(text or "the engine failed").strip().splitlines()[0].rstrip(".")
