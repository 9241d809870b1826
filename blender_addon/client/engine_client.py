"""Client for the local generation engine (``python -m engine serve``).

The engine runs in its own Python (with torch) as a child process and speaks newline-delimited
JSON: one request per line on stdin, events tagged with the request's ``id`` on stdout, logs on
stderr. This module is standard library only so it runs inside Blender's Python, in the
animation renderer, and in tests without bpy.

``job = client.generate(...)`` returns at once; a reader thread fills each job's event queue,
so a UI timer polls ``job.poll()`` without waiting on the pipe, and a batch blocks on
``job.wait()`` or iterates the job.

Instead of ``<python> -m engine serve`` the client can start any **engine command** that runs
``engine serve`` and carries its stdin/stdout, e.g. ``ssh gpu-box /opt/ld/.venv/bin/python -m
engine serve``: SSH carries the bytes, the engine binds no port. Such an engine does not see
this machine's files, so the client sends the Layout's images inside the request and gets the
PNG back inside the ``result`` event (protocol 2), then writes it atomically where a local
engine would have. It does the same for a local engine whose ``hello`` probe shows that it does
not see the client's files.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import queue
import re
import secrets
import shlex
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..wire.files import atomic_open
from ..wire.inline import InlineFileError, decode_file, encode_file, named_files
from ..wire.protocol import (
    INLINE_RESULT,
    LIMIT_EXCEEDED,
    MAX_INLINE_FILE_BYTES,
    MAX_INLINE_REQUEST_BYTES,
    OUTPUT_FAILED,
    PROGRESS_EVENTS,
    PROTOCOL_VERSION,
)

SERVE_ARGS: tuple[str, ...] = ("-m", "engine", "serve")
"""Arguments that start the engine's line-protocol server."""

NOT_INSTALLED_HINT = "Open Preferences > Add-ons > Layout Diffusion and press Set up engine."

ENGINE_GONE = "engine_crashed"
NOT_INSTALLED = "not_installed"
TIMEOUT = "timeout"
BAD_REQUEST = "bad_request"
ENGINE_TOO_OLD = "engine_too_old"
"""The engine's protocol lacks what the request needs (inline files: protocol 2)."""
RESULT_DAMAGED = "result_damaged"
"""The PNG sent back inline did not match its size or SHA-256."""
MAX_RESULT_BYTES = 1 << 30
"""Bytes of a PNG sent back inline that the client accepts (a 4096x4096 RGB PNG is far less)."""

# Terminal control sequences (colours, cursor moves) that progress bars write to stderr.
_ESCAPES = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|[@-Z\\-_])")


def clean_log_line(line: str) -> str:
    """A stderr line as a person reads it: a progress bar's redraws (``\\r``) reduced to the
    last, terminal escape codes removed."""
    line = line.rstrip("\r\n")
    line = line.rsplit("\r", 1)[-1] if "\r" in line.strip("\r") else line.strip("\r")
    return _ESCAPES.sub("", line)


def parse_command(text: str) -> list[str]:
    """An engine command line split into its arguments as a shell would (quotes kept together).

    On Windows backslashes stay as they are (paths), and quotes around an argument are removed.
    Raises ValueError (unbalanced quotes) with what to fix.
    """
    try:
        if sys.platform == "win32":
            return [_unquote(part) for part in shlex.split(text, posix=False)]
        return shlex.split(text)
    except ValueError as exc:
        raise ValueError(f"the engine command {text!r} cannot be read: {exc}") from None


def write_probe() -> tuple[str, str] | None:
    """A new probe file in this machine's temporary folder holding a random token: ``(path,
    token)``, or None when it cannot be written (the engine is then taken to share files)."""
    token = secrets.token_hex(16)
    try:
        fd, path = tempfile.mkstemp(prefix="ld-probe-", suffix=".txt")
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(token)
    except OSError:
        return None
    return os.path.abspath(path), token


def _size(count: int) -> str:
    if count >= 1_000_000:
        return f"{count / 1e6:.1f} MB"
    return f"{count / 1e3:.1f} kB" if count >= 1000 else f"{count} bytes"


def _unquote(part: str) -> str:
    if len(part) >= 2 and part[0] == part[-1] and part[0] in "\"'":
        return part[1:-1]
    return part


class EngineError(RuntimeError):
    """The engine answered with an error, or could not answer at all.

    ``code`` is machine-readable (the engine's own codes such as ``model_not_found`` or
    ``out_of_memory``, plus ``engine_crashed``, ``not_installed`` and ``timeout`` from this
    client); ``message`` says what happened and what to do.
    """

    def __init__(self, code: str, message: str, stderr_tail: str = ""):
        super().__init__(message)
        self.code = code
        self.message = message
        self.stderr_tail = stderr_tail

    def __str__(self) -> str:
        return self.message


class EventStream:
    """The events of one request in order, the last one final: what every kind of job shares."""

    def __init__(self, op: str, request_id: str = "") -> None:
        self.op = op
        self.id = request_id
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.final: dict[str, Any] | None = None
        self._done = threading.Event()

    @property
    def done(self) -> bool:
        """True once the final event (result, error, cancelled, ...) has arrived."""
        return self._done.is_set()

    def poll(self) -> list[dict[str, Any]]:
        """Every event that arrived since the last call, without waiting."""
        out = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Events as they arrive, blocking, ending after the final one (or at once if a
        previous :meth:`poll` already took it)."""
        while True:
            if self.done and self.events.empty():
                return
            event = self.events.get()
            yield event
            if event is self.final:
                return

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Block until the final event and return it; ``TimeoutError`` if it does not come."""
        if not self._done.wait(timeout):
            raise TimeoutError(
                f"engine request {self.op} ({self.id}) still running after {timeout} s"
            )
        assert self.final is not None
        return self.final

    def _finish(self, event: dict[str, Any]) -> None:
        """Put the final event on the queue and mark the stream done."""
        self.final = event
        self.events.put(event)
        self._done.set()

    def _finish_with(self, follow: Callable[[], dict[str, Any]], failure: str) -> None:
        """Finish with the final event ``follow`` returns, or with an ``error`` event if it
        raises (``failure`` starts its message): a job's thread must never end without one, as
        the UI waits for it."""
        try:
            event = follow()
        except EngineError as exc:
            event = {"id": self.id, "event": "error", "code": exc.code, "message": str(exc)}
        except Exception as exc:
            message = f"{failure}: {type(exc).__name__}: {exc}"
            event = {"id": self.id, "event": "error", "code": "internal", "message": message}
        self._finish(event)


class Job(EventStream):
    """One request in flight: its events arrive on ``events`` in order, the last one is final."""

    def __init__(self, client: EngineClient, request_id: str, op: str):
        super().__init__(op, request_id)
        self.client = client
        self._deliver_lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None  # the process that owes the answer
        self.out: str | None = None
        """Where an inline result PNG is written (generates sent with inline files)."""

    def _deliver(self, event: dict[str, Any]) -> None:
        # The reader thread and a crash report (another thread) may race to end a job.
        with self._deliver_lock:
            if self._done.is_set():
                return
            if event.get("event") not in PROGRESS_EVENTS:
                self._finish(event)
            else:
                self.events.put(event)

    def cancel(self) -> None:
        """Ask the engine to stop this request; the model stays loaded. Final event: cancelled."""
        if not self.done:
            self.client.cancel(self.id)


class EngineClient:
    """A warm engine child process and the requests sent to it.

    ``python`` is the interpreter that has the engine installed; ``command`` (a command line or
    its arguments), when given, is started instead of ``python -m engine serve``: any command
    that runs ``engine serve`` and carries its stdin/stdout (``ssh host .../python -m engine
    serve``). The process starts on :meth:`start` (or the first request) and stays up between
    requests so the model stays loaded; a request after it died starts it again.
    """

    def __init__(
        self,
        python: str,
        args: tuple[str, ...] | list[str] = SERVE_ARGS,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stderr_lines: int = 200,
        fix: str = NOT_INSTALLED_HINT,
        command: str | Sequence[str] | None = None,
    ):
        self.python = python
        self.command: tuple[str, ...] = tuple(
            parse_command(command) if isinstance(command, str) else command or ()
        )
        self.shares_files: bool | None = None
        """Whether the engine reads this machine's files at their paths: from the last
        ``hello`` probe; None before one (a local engine is then taken to share them)."""
        self.limits: dict[str, Any] = {}
        """The engine's limits from its last ``hello``."""
        self.protocol: int | None = None
        """The engine's protocol version from its last ``hello``."""
        self.fix = fix
        """What to do when the engine cannot start, in the words of where this client runs: the
        preferences in Blender, ``--engine-python`` in the batch command."""
        self.args = tuple(args)
        self.env = env
        self.cwd = cwd
        self._stderr_lines = stderr_lines
        self._stderr: collections.deque[str] = collections.deque(maxlen=stderr_lines)
        self._proc: subprocess.Popen[str] | None = None
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._ids = itertools.count(1)
        # Distinct per client so ids never repeat across restarts or clients in one log.
        self._prefix = f"{os.getpid():x}{id(self) & 0xFFFF:04x}"
        self._readers: list[threading.Thread] = []

    # -- Process ------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """True while the engine process runs."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The engine process id, or None before start."""
        return self._proc.pid if self._proc else None

    @property
    def inline_files(self) -> bool:
        """True when generates carry their files inline and get the PNG back inline: always
        for an engine command, and for an engine whose probe showed it does not see our files."""
        return bool(self.command) or self.shares_files is False

    def describe(self) -> str:
        """The engine command line, or the interpreter, for messages."""
        return shlex.join(self.command) if self.command else self.python

    def start(self) -> EngineClient:
        """Start the engine process if it is not running. Raises EngineError(not_installed)."""
        if self.alive:
            return self
        if self.command:
            return self._launch(list(self.command))
        if not self.python or not os.path.isfile(self.python):
            raise EngineError(
                NOT_INSTALLED,
                f"The engine's Python interpreter {self.python!r} does not exist. " + self.fix,
            )
        return self._launch([self.python, *self.args])

    def _launch(self, argv: list[str]) -> EngineClient:
        env = dict(os.environ if self.env is None else self.env)
        # Line-buffered pipes both ways; the engine's progress must not sit in a buffer.
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("PYTHONIOENCODING", "utf-8")
        # Blender's own Python settings must not leak into the engine's interpreter.
        for key in ("PYTHONHOME", "PYTHONPATH") if self.env is None else ():
            env.pop(key, None)
        flags = subprocess.CREATE_NO_WINDOW if sys.platform == "win32" else 0
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                encoding="utf-8",
                errors="replace",
                bufsize=1,
                env=env,
                cwd=self.cwd,
                creationflags=flags,
            )
        except OSError as exc:
            if self.command:
                raise EngineError(
                    NOT_INSTALLED,
                    f"Cannot run the engine command {self.describe()!r}: {argv[0]!r}: "
                    f"{exc.strerror}. Check the Engine Command (the program must be installed "
                    "here, e.g. ssh).",
                ) from None
            raise EngineError(
                NOT_INSTALLED,
                f"Cannot start the engine with {self.python!r}: {exc.strerror}. " + self.fix,
            ) from None
        # Each process has its own log tail: a dying one's reader may still be reporting its
        # crash while its replacement starts.
        tail: collections.deque[str] = collections.deque(maxlen=self._stderr_lines)
        self._stderr = tail
        self._proc = proc
        stderr_reader = threading.Thread(target=self._read_stderr, args=(proc, tail), daemon=True)
        self._readers = [
            stderr_reader,
            threading.Thread(
                target=self._read_stdout, args=(proc, tail, stderr_reader), daemon=True
            ),
        ]
        for thread in self._readers:
            thread.start()
        return self

    def restart(self) -> EngineClient:
        """Stop the process (if any) and start a fresh one."""
        self.close()
        return self.start()

    def close(self, timeout: float = 5.0) -> None:
        """Ask the engine to shut down, then terminate it if it does not within ``timeout``."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                self._write({"op": "shutdown", "id": self._next_id()})
                proc.wait(timeout)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for thread in self._readers:
            thread.join(timeout)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream:
                with contextlib.suppress(OSError):
                    stream.close()
        self._fail_pending(proc)
        self._proc = None

    def kill(self) -> None:
        """Kill the engine process at once (what a crash looks like to the client)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def stderr_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines the engine wrote to stderr (its log)."""
        return "\n".join(list(self._stderr)[-lines:])

    def __enter__(self) -> EngineClient:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- Requests -----------------------------------------------------------------------------

    def request(self, op: str, **fields: Any) -> Job:
        """Send ``{"op": op, "id": ..., **fields}`` and return its Job (starting the engine)."""
        return self._send(op, fields)

    def _send(self, op: str, fields: dict[str, Any], out: str | None = None) -> Job:
        request_id = self._next_id()
        try:
            line = json.dumps({"op": op, "id": request_id, **fields}, allow_nan=False)
        except (TypeError, ValueError) as exc:
            # Not the engine's fault: say what is wrong with the request, start nothing.
            raise EngineError(
                BAD_REQUEST,
                f"The {op} request cannot be sent: {exc} (numbers must be finite, values "
                "plain JSON).",
            ) from None
        self.start()
        job = Job(self, request_id, op)
        job._proc = self._proc
        job.out = out
        with self._lock:
            self._jobs[job.id] = job
        try:
            self._write_line(line)
        except (OSError, ValueError):
            # The pipe closed under us: the reader thread reports the crash to this job.
            self._fail_pending(self._proc)
        return job

    def hello(
        self,
        model: str | None = None,
        timeout: float | None = 120.0,
        options: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The engine's version, device, dtype and capabilities; with ``model``, whether it exists.

        ``options`` (e.g. ``{"controlnet": spec}``) are checked as a generate would use them:
        the reply's ``conditions`` say whether each is available and why not. Blocking. Raises
        EngineError if the engine cannot start or answers with an error.

        It also asks whether the engine sees this machine's files (a probe file with a random
        token, removed once answered); :attr:`shares_files` and :attr:`limits` keep the answer.
        """
        fields: dict[str, Any] = {"model": model} if model else {}
        if options:
            fields["options"] = options
        probe = write_probe()
        if probe is not None:
            fields["probe"] = {"path": probe[0], "token": probe[1]}
        try:
            reply = self._final(self.request("hello", **fields), timeout)
        finally:
            if probe is not None:
                with contextlib.suppress(OSError):
                    os.remove(probe[0])
        if isinstance(reply.get("shares_files"), bool):
            self.shares_files = reply["shares_files"]
        if isinstance(reply.get("limits"), dict):
            self.limits = reply["limits"]
        if isinstance(reply.get("protocol"), int):
            self.protocol = reply["protocol"]
        return reply

    def generate(
        self,
        layout: dict[str, Any],
        out: str,
        model: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> Job:
        """Start generating ``layout`` (an inline Layout dict, absolute mask paths) into ``out``.

        ``options`` override the engine's start-up options for this request (``controlnet``,
        ``ip_adapter``, ...; None values turn one off). With :attr:`inline_files` the Layout's
        images travel inside the request and the PNG comes back inside the result, written to
        ``out`` here; the result event's ``path`` is ``out`` either way. Raises EngineError
        (``limit_exceeded``, ``bad_request``) when the images cannot be sent inline.
        """
        out = os.path.abspath(out)
        fields: dict[str, Any] = {"layout": layout}
        if model:
            fields["model"] = model
        if options:
            fields["options"] = options
        if not self.inline_files:
            return self.request("generate", out=out, **fields)
        if self.protocol is not None and self.protocol < 2:
            raise EngineError(
                ENGINE_TOO_OLD,
                f"The engine ({self.describe()}) speaks protocol {self.protocol}, which cannot "
                "take files with a request; update the engine there to this add-on's version.",
            )
        fields.update(protocol=PROTOCOL_VERSION, files=self.pack_files(layout))
        fields["result"] = INLINE_RESULT
        return self._send("generate", fields, out=out)

    def pack_files(self, layout: dict[str, Any]) -> list[dict[str, Any]]:
        """The inline ``files`` entries for every image ``layout`` names that exists here,
        checked against the engine's inline limits. Raises EngineError saying what to do."""
        file_limit = int(self.limits.get("inline_file_bytes") or MAX_INLINE_FILE_BYTES)
        request_limit = int(self.limits.get("inline_request_bytes") or MAX_INLINE_REQUEST_BYTES)
        files, total = [], 0
        for path in named_files(layout):
            if not os.path.isfile(path):
                continue  # the engine says which field names a missing file
            size = os.path.getsize(path)
            if size > file_limit:
                raise EngineError(
                    LIMIT_EXCEEDED,
                    f"{path} is {_size(size)}; the engine ({self.describe()}) takes files "
                    f"of at most {_size(file_limit)} with a request. Use a smaller image "
                    "(lower resolution, 8-bit depth), or an engine on this machine.",
                )
            total += size
            if total > request_limit:
                raise EngineError(
                    LIMIT_EXCEEDED,
                    f"The Layout's images add up to more than {_size(request_limit)}, the "
                    f"most one request to the engine ({self.describe()}) may carry. Use fewer or "
                    "smaller images (object images, depth, reference).",
                )
            try:
                with open(path, "rb") as handle:
                    files.append({"path": path, **encode_file(handle.read())})
            except OSError as exc:
                raise EngineError(
                    BAD_REQUEST, f"Cannot read {path} to send it: {exc.strerror or exc}."
                ) from None
        return files

    def cancel(self, target: str) -> None:
        """Ask the engine to stop request ``target``; answered on the target job (cancelled)."""
        if self.alive:
            with contextlib.suppress(OSError, ValueError):
                self._write({"op": "cancel", "id": self._next_id(), "target": target})

    def release(self, timeout: float | None = 60.0) -> dict[str, Any]:
        """Ask the engine to unload its model and free memory. Blocking."""
        return self._final(self.request("release"), timeout)

    # -- Internals ----------------------------------------------------------------------------

    def _final(self, job: Job, timeout: float | None) -> dict[str, Any]:
        try:
            event = job.wait(timeout)
        except TimeoutError:
            raise EngineError(
                TIMEOUT, f"The engine did not answer '{job.op}' within {timeout} s."
            ) from None
        return self._check(event)

    def _check(self, event: dict[str, Any]) -> dict[str, Any]:
        if event.get("event") == "error":
            raise EngineError(
                str(event.get("code") or "internal"),
                str(event.get("message") or "the engine reported an error without a message"),
                self.stderr_tail(),
            )
        return event

    def _next_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    def _write(self, message: dict[str, Any]) -> None:
        self._write_line(json.dumps(message, allow_nan=False))

    def _write_line(self, line: str) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None:
            raise ValueError("engine not started")
        with self._write_lock:
            proc.stdin.write(line + "\n")
            proc.stdin.flush()

    def _read_stdout(
        self,
        proc: subprocess.Popen[str],
        tail: collections.deque[str],
        stderr_reader: threading.Thread,
    ) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                # Libraries sometimes print to stdout; keep it with the log rather than lose it.
                tail.append(line)
                continue
            if not isinstance(event, dict):
                tail.append(line)
                continue
            with self._lock:
                job = self._jobs.get(str(event.get("id")))
            if job is None:
                continue
            if job.out is not None and event.get("event") == "result":
                event = self._land_result(event, job.out)
            job._deliver(event)
            if job.done:
                with self._lock:
                    self._jobs.pop(job.id, None)
        # stdout closed: the process is gone (or going). Let stderr finish so the report has it.
        proc.wait()
        stderr_reader.join(2.0)
        self._fail_pending(proc, tail)

    def _land_result(self, event: dict[str, Any], out: str) -> dict[str, Any]:
        """Write a result's inline PNG to ``out`` atomically, after checking its size and
        SHA-256; the event with ``path`` set to ``out``, or an error event."""
        try:
            data = decode_file(event.get("png"), MAX_RESULT_BYTES, "the result's png")
            with atomic_open(out, "wb") as handle:
                handle.write(data)
        except InlineFileError as exc:
            return {
                "id": event.get("id"),
                "event": "error",
                "code": RESULT_DAMAGED,
                "message": f"The image the engine sent back is damaged ({exc}). Generate again.",
            }
        except OSError as exc:
            return {
                "id": event.get("id"),
                "event": "error",
                "code": OUTPUT_FAILED,
                "message": f"Cannot write {out}: {exc.strerror or exc}; choose a folder you can "
                "write to.",
            }
        landed = {key: value for key, value in event.items() if key != "png"}
        landed["path"] = out
        return landed

    def _read_stderr(self, proc: subprocess.Popen[str], tail: collections.deque[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            line = clean_log_line(line)
            if line.strip():
                tail.append(line)

    def _fail_pending(
        self, proc: subprocess.Popen[str] | None, tail: collections.deque[str] | None = None
    ) -> None:
        """Answer the open requests sent to ``proc`` with an error: it is gone."""
        with self._lock:
            jobs = [job for job in self._jobs.values() if job._proc is proc]
            for job in jobs:
                del self._jobs[job.id]
        if not jobs:
            return
        error = self._gone_error(proc, self._stderr if tail is None else tail)
        for job in jobs:
            job._deliver(
                {"id": job.id, "event": "error", "code": error.code, "message": error.message}
            )

    def _gone_error(
        self, proc: subprocess.Popen[str] | None, lines: collections.deque[str]
    ) -> EngineError:
        tail = "\n".join(list(lines)[-8:])
        code = proc.poll() if proc is not None else None
        detail = f" Last engine output:\n{tail}" if tail else ""
        if self.command:
            if "No module named" in tail and "engine" in tail:
                return EngineError(
                    NOT_INSTALLED,
                    f"The engine command {self.describe()!r} runs a Python without the engine: "
                    "install the engine there, or fix the Engine Command.",
                    tail,
                )
            return EngineError(
                ENGINE_GONE,
                f"The connection to the engine ended (exit code {code} from "
                f"{self.describe()!r}): the network dropped or the engine stopped. It starts "
                f"again on the next request.{detail}",
                tail,
            )
        if "No module named" in tail and "engine" in tail:
            return EngineError(
                NOT_INSTALLED,
                f"The engine is not installed in {self.python!r}. " + self.fix,
                tail,
            )
        return EngineError(
            ENGINE_GONE,
            f"The engine stopped unexpectedly (exit code {code}); it restarts on the next "
            f"request.{detail}",
            tail,
        )
