"""``python -m engine serve``: the engine as a long-lived subprocess speaking JSON lines.

Protocol (version ``PROTOCOL_VERSION`` in ``engine.wire.protocol``)
-------------------------------------------------------------------

The client writes requests to the engine's stdin and reads replies and events from its stdout,
one JSON object per line, UTF-8, ``\\n``-terminated. stdout carries protocol lines only; logs
and library output go to stderr. Every request is an object with ``op`` (string) and ``id``
(string or number, chosen by the client); every line the engine writes carries the ``id`` of the
request it answers (``null`` only when a request had no readable id). Lines are written whole
and flushed one at a time.

Requests:

``{"op": "hello", "id": 1, "model": "shapes"}``
    Answers ``{"id": 1, "event": "hello", "protocol": 2, "engine_version": "0.1.0",
    "device": "cuda", "dtype": "float16", "capabilities": ["attention", "cancel", ...],
    "default_model": "shapes", "loaded_model": null, "conditions": {...}, "limits": {...}}``.
    ``limits`` names every limit the engine enforces with its value (see Limits below).
    ``capabilities`` lists the modes (``attention``, ``latent``), ``cancel`` and ``release``,
    and also ``controlnet``, ``ip_adapter`` and ``gligen`` when a depth ControlNet / an
    IP-Adapter / a GLIGEN model is configured and present; ``conditions`` says for each
    ``{"available": bool, "spec": ..., "message": ...}``, the message saying why one is
    unavailable. With ``model`` (optional), it also reports whether that model is on this
    machine, without loading it:
    ``"model": {"spec": "shapes", "found": true, "path": "/...", "message": "...",
    "layout_defaults": {"reference_fraction": 0.4}}`` (the values the model chooses for Layout
    fields left null). With ``probe`` (protocol 2, optional): ``{"path": "/abs/file", "token":
    "..."}``, a file the client wrote holding the token (16-256 bytes); ``shares_files`` then says
    whether the engine read that token there (true: it sees the client's files at the client's
    paths), else it is null. ``model`` also says the model's ``native_size`` (the side it
    composes at in one pass, see ``engine.loading.defaults.native_size``). With ``"cost": true`` (optional) the reply's ``cost`` tells what generating
    with that model (default: the next generate's) costs on this device, without loading it:
    ``{"spec", "available": true, "native_size": 1024, "latent_factor": 8, "unet_flops": [c, a,
    b], "vae_flops": [c, a, b], "seconds_per_flop": ..., "source": "measured" |
    "device_speed", "step_seconds": ..., "device", "dtype"}``: one guided step costs
    ``c + a*p + b*p*p`` FLOPs for ``p`` latent pixels (the decode likewise), at
    ``seconds_per_flop`` measured on the last generation with this UNet here, else from the
    device's matrix-multiply speed (a lower bound); ``step_seconds`` is one step at the native
    size (``engine.service.estimate``). ``{"available": false, "message": ...}`` when unknown.

``{"op": "generate", "id": "r1", "layout": {...}, "out": "/abs/out.png", "model": "shapes"}``
    ``layout`` is an inline Layout (``engine.wire.layout``; mask and depth paths absolute), ``out``
    the absolute PNG path to write, ``model`` optional (default: the model of the previous
    generate, else the serve ``--model``, else ``shapes``). Optional ``options`` overrides the
    serve flags for this request: ``{"device", "dtype", "cpu_offload", "vae_tiling",
    "kept_text_mib", "allow_pickle", "config", "controlnet", "ip_adapter", "gligen"}``; ``controlnet`` names an
    SDXL depth ControlNet (folder, cached repo id or .safetensors file) applied with the
    Layout's ``depth`` and ``depth_scale``/``depth_start``/``depth_end`` and each region's
    ``depth_scale``; ``ip_adapter`` an SDXL IP-Adapter (weights file, folder or cached repo id)
    applying each region's ``image`` (its object image) inside its mask at its ``image_scale``;
    ``gligen`` a GLIGEN text-box model (diffusers folder or cached repo id) that makes the layout
    reference from the regions' prompts and boxes when ``reference_scale`` is above 0 and the Layout has
    no ``reference`` (otherwise a half-size first pass of the model makes it). Changing any of
    them keeps the base model loaded. The request is validated when it arrives (Layout, image
    files, model presence) and errors come back at once.

    Protocol 2 adds inline files, for an engine that does not share the client's files (one
    reached over SSH). ``files``: a list of ``{"path", "data", "bytes", "sha256"}``, each the
    content of an image the Layout names by ``path`` (exactly as written there), as base64 with
    its size and SHA-256. The engine decodes them into a private temporary folder for this
    request, checks them like files it reads, records the client's paths in the PNG's
    provenance, and removes the folder when the generate ends. Paths not sent inline are read
    on the engine's machine. ``"result": "inline"`` (then without ``out``): the PNG comes back
    in the ``result`` event as ``"png": {"data", "bytes", "sha256"}`` with ``"path": null``,
    never through a shared path. Both sides check the size and digest. Events, in order:

    - ``{"id": "r1", "event": "queued", "position": 1}`` only if another generate is ahead;
    - ``{"id": "r1", "event": "loading", "model": "shapes", "path": "/..."}`` only if the model
      is not the one already loaded;
    - ``{"id": "r1", "event": "progress", "step": k, "total": n, "seconds_left": 12.5}`` after
      each step, k = 1..n (``seconds_left``: the estimate from the measured steps);
      when a first pass or GLIGEN makes the layout reference, its steps count too (n = both
      passes);
    - ``{"id": "r1", "event": "result", "path": "/abs/out.png", "seed": 7, "width": 1024,
      "height": 1024, "seconds": 12.3, "load_seconds": 0.0, "model": "shapes",
      "conditions": {"controlnet": null, "ip_adapter": null, "reference": null},
      "kept_text_bytes": 0}``: ``seconds`` is generation time without loading, ``load_seconds``
      is 0 when the model was kept loaded; ``kept_text_bytes`` the device memory the call spent
      keeping its prompts' attention keys and values (option ``kept_text_mib`` bounds it);
      ``conditions`` says which optional conditions acted, with their settings, and where the
      reference pull's layout reference came from (``{"source": "file" | "gligen" | "first_pass",
      "scale": ..., "fraction": ..., "model": ...}``, ``model`` for GLIGEN only; also in the
      PNG's provenance).

    The PNG is written atomically and carries provenance (``engine.service.provenance``).

``{"op": "cancel", "id": 5, "target": "r1"}``
    Stops generate ``target`` (default: the running one). A running generate stops within one
    UNet or VAE block (not at the end of its step); a queued one is dropped. The target then gets
    ``{"id": "r1", "event": "cancelled"}`` instead of a result, and the model stays loaded. The
    cancel is acknowledged with ``{"id": 5, "event": "ack", "op": "cancel", "target": "r1",
    "found": true}`` (``found`` false if nothing matched: it had already finished). A generate
    past its last step when the cancel arrives still ends with its ``result``.

``{"op": "release", "id": 6}``
    Unloads the model and frees device memory, after any generate ahead of it in the queue:
    ``{"id": 6, "event": "ack", "op": "release", "released": true}``.

``{"op": "shutdown", "id": 7}``
    Cancels running and queued generates (each gets ``cancelled``), answers
    ``{"id": 7, "event": "ack", "op": "shutdown"}`` and exits with status 0. End of input on
    stdin also exits with 0, after finishing the generates already queued. When replies can no
    longer be written (stdout closed: the client or its SSH connection died), the running
    generate stops within one block and the queued ones are dropped.

Generates run one at a time, in the order received; up to 4 (``QUEUE_LIMIT``) may wait behind
the running one, more are refused with ``busy``. Every generate ends with exactly one of
``result``, ``cancelled`` or ``error``. stdin is read while a generate runs, so ``hello``
and ``cancel`` answer at once; a ``hello`` with ``cost`` once the model's operations are
counted (seconds for a new model), on a thread of its own: the requests after it, a ``cancel``
above all, do not wait for it, and their replies may come first.

Every request line gets exactly one final reply, whatever it holds. An ``id`` in use by a
generate or release still in flight is refused (``bad_request``, field ``id``). An id that is
itself refused (too long, invalid Unicode) is still echoed when it is a string or a finite
number; a string holding unpaired surrogates comes back as JSON escapes (``"\\ud800"``), so the
client decodes the id it sent.

Limits (all in ``hello``'s ``limits``; exceeding one answers ``limit_exceeded`` with ``limit``,
its name, and ``max``, its value, plus ``field`` where one field is at fault):
``line_chars`` (one request line; a longer line is skipped unread and answered with the ``id``
found near its start, if any), ``json_depth`` (nesting), ``id_chars``, ``queue``, the Layout's
(``image_side``, ``regions``, ``steps``, ``prompt_chars``, ``path_chars``, ``name_chars``,
``input_pixels``: pixels of any image file a Layout names, read from its header, and
``prompt_tokens``: a prompt longer than the model's token window is refused, never cut), and
``inline_file_bytes`` and ``inline_request_bytes`` (decoded bytes of one file sent inline, and
of all of one generate's together), ``generate_seconds`` (``--max-seconds``): a generate whose
estimated time on this device exceeds it is refused before its first step (the estimate counts
the model's operations at the requested size against the device's measured speed) or stopped
after a step once the measured step time shows it would; ``progress`` events then carry
``seconds_left``, the estimate.
Non-finite numbers (``NaN``, ``Infinity``, ``1e999``) and text with unpaired surrogates are
refused wherever they appear (``bad_layout`` inside ``layout``, else ``bad_request``).

Files: ``out`` must be an absolute path ending in ``.png`` that is not a folder and not an
existing file other than a PNG; its folder must exist, or lie under a root given with
``--out-root`` (then it is created). Pickle weights load only when the engine was started with
``--allow-pickle``; a request's ``options.allow_pickle`` cannot turn it on.

Errors: ``{"id": ..., "event": "error", "code": "...", "message": "...", "field": ...}`` where
``message`` says what is wrong and what to do, ``field`` (when known) names the offending
request or Layout field (``layout.regions[0].box``). The process stays up after every error.
Codes: ``bad_json`` (line is not JSON), ``bad_request`` (missing or mistyped request fields),
``unknown_op``, ``bad_layout``, ``model_not_found``, ``unsupported_model`` (not an SDXL
text-to-image checkpoint), ``unsafe_checkpoint`` (pickle weights without ``allow_pickle``),
``bad_device``, ``out_of_memory``, ``output_failed`` (the PNG could not be written), ``busy``,
``limit_exceeded`` (with ``limit`` and ``max``), ``internal``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import json
import logging
import math
import os
import re
import shutil
import stat
import sys
import tempfile
import threading
import traceback
from collections.abc import Sequence
from typing import IO, Any

from engine import __version__
from engine.conditions.apply import check_conditions
from engine.errors import (
    BadRequestError,
    CancelledError,
    EngineError,
    LimitExceededError,
    UnsafeCheckpointError,
    is_out_of_memory,
)
from engine.loading.assemble import PipelineCache, resolve_conditions
from engine.loading.defaults import describe_model
from engine.loading.device import dtype_name, pick_device, pick_dtype
from engine.loading.locate import (
    LoadOptions,
    ModelLocation,
    default_model_spec,
    describe_conditions,
    resolve_model,
)
from engine.service.estimate import model_cost
from engine.service.generate import (
    check_layout_files,
    check_output_path,
    prepare_output_folder,
    run_generation,
)
from engine.wire.inline import InlineFileError, decode_file, encode_file, image_holders, named_files
from engine.wire.layout import (
    LIMITS,
    MAX_JSON_DEPTH,
    MODES,
    Layout,
    LayoutError,
    LimitError,
    invalid_unicode,
    short,
)
from engine.wire.protocol import (
    DEFAULT_MAX_SECONDS,
    INLINE_RESULT,
    MAX_ID_CHARS,
    MAX_INLINE_FILE_BYTES,
    MAX_INLINE_REQUEST_BYTES,
    MAX_LINE_CHARS,
    MAX_PROBE_BYTES,
    NULLABLE_OPTIONS,
    OPTION_TYPES,
    PROTOCOL_VERSION,
    QUEUE_LIMIT,
)

log = logging.getLogger(__name__)

CAPABILITIES = [*MODES, "cancel", "release"]
"""What every engine offers: the modes, cancelling and releasing; ``hello`` adds the optional
conditions that are available."""


@dataclasses.dataclass
class _Job:
    id: Any
    op: str
    layout: Layout | None = None
    out: str = ""
    model: str = ""
    options: LoadOptions | None = None
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    max_seconds: float = 0.0
    folder: str | None = None
    """The request's private temporary folder (inline files, inline result); removed after."""
    names: dict[str, str] = dataclasses.field(default_factory=dict)
    """Each inline file's path in ``folder`` -> the path the client named it by."""
    inline_result: bool = False

    def discard(self) -> None:
        """Remove the request's temporary folder, if it has one."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


class Server:
    """Reads requests, answers the quick ones at once and runs generates on a worker thread.

    ``out_roots``: folders under which a generate's missing output folders may be created;
    ``max_seconds``: the estimated generation time above which a generate is refused (0: no
    limit); ``max_line_chars``: the longest request line read.
    """

    def __init__(
        self,
        out: IO[str],
        options: LoadOptions | None = None,
        model: str | None = None,
        *,
        out_roots: Sequence[str] = (),
        max_seconds: float = DEFAULT_MAX_SECONDS,
        max_line_chars: int = MAX_LINE_CHARS,
    ):
        self._out = out
        self._write_lock = threading.Lock()
        self._options = options or LoadOptions()
        self._out_roots = tuple(os.path.abspath(root) for root in out_roots)
        self._max_seconds = max_seconds
        self._max_line_chars = max_line_chars
        self._default_model = model or default_model_spec()
        self._last_model: str | None = None
        self._cache = PipelineCache()
        self._jobs: collections.deque[_Job] = collections.deque()
        self._cond = threading.Condition()
        self._running: _Job | None = None
        self._stopping = False
        self._worker = threading.Thread(target=self._work, name="engine-worker", daemon=True)
        self._cost_thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="engine-cost"
        )
        """Answers ``hello`` with ``cost`` off the reading thread, one at a time."""

    # -- Output ------------------------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        """Write one protocol line (serialized across threads, flushed); never raises."""
        try:
            line = json.dumps(message, ensure_ascii=False, allow_nan=False, default=str)
        except (ValueError, TypeError, RecursionError) as exc:
            log.error("reply %s could not be encoded: %s", short(message, 200), exc)
            request_id = message.get("id")
            line = json.dumps(
                {
                    "id": request_id if _valid_id(request_id) else None,
                    "event": "error",
                    "code": "internal",
                    "message": f"the reply could not be encoded ({exc}); please report it",
                },
                default=str,
            )
        if invalid_unicode(line):
            # A client's id or text holding unpaired surrogates: as JSON escapes they are valid
            # UTF-8 and decode back to exactly what the client sent.
            line = json.dumps(json.loads(line), ensure_ascii=True)
        with self._write_lock:
            try:
                self._out.write(line + "\n")
                self._out.flush()
                return
            except (BrokenPipeError, ValueError):
                pass
        self._client_gone()

    def _client_gone(self) -> None:
        """Nobody reads the replies any more (the client or its SSH connection died): stop the
        running generate and drop the queued ones rather than compute images no one receives.
        The reader then sees end of input and the process exits."""
        with self._cond:
            if self._stopping and not self._jobs and self._running is None:
                return
            log.warning("the client stopped reading replies: dropping the work in flight")
            self._stopping = True
            if self._running is not None:
                self._running.cancel.set()
            for job in self._jobs:
                job.discard()
            self._jobs.clear()
            self._cond.notify_all()

    def _error(self, request_id: Any, exc: BaseException) -> None:
        self.send(self._error_message(request_id, exc))

    def _error_message(self, request_id: Any, exc: BaseException) -> dict[str, Any]:
        limit = None
        if isinstance(exc, (LimitError, LimitExceededError)):
            limit = (exc.limit, exc.maximum)
        if isinstance(exc, LimitError):
            code = LimitError.code
            field = f"layout.{exc.field}" if exc.field else None
        elif isinstance(exc, LayoutError):
            code = "bad_layout"
            field = f"layout.{exc.field}" if exc.field else "layout"
        elif isinstance(exc, EngineError):
            code, field = exc.code, exc.field
        elif is_out_of_memory(exc):
            # While loading: generation itself reports OutOfMemoryError with its own advice.
            code, field = "out_of_memory", None
            exc = RuntimeError(
                f"the device ran out of memory loading the model ({exc}): try --cpu-offload, "
                "--dtype float16, or close other programs using the GPU"
            )
        else:
            log.error("internal error:\n%s", traceback.format_exc())
            code, field = "internal", None
            exc = RuntimeError(
                f"internal error ({type(exc).__name__}: {exc}); the engine log on stderr has "
                "the details, please report it"
            )
        message = {"id": request_id, "event": "error", "code": code, "message": str(exc)}
        if field:
            message["field"] = field
        if limit is not None:
            message["limit"], message["max"] = limit
        return message

    # -- Reading -----------------------------------------------------------------------------

    def run(self, lines: IO[str]) -> int:
        """Serve requests from ``lines`` until shutdown or end of input; the exit status."""
        self._worker.start()
        self._log_start()
        while True:
            try:
                line, overflow = read_line(lines, self._max_line_chars)
            except Exception:  # an unreadable stream ends the input, like a closed one
                log.error("cannot read stdin:\n%s", traceback.format_exc())
                line, overflow = "", 0
            if overflow:
                self._line_too_long(line, overflow)
                continue
            if not line:
                # End of input: finish what is queued, then stop.
                with self._cond:
                    self._stopping = True
                    self._cond.notify_all()
                break
            if line.strip() and not self.handle_line(line):
                break
        self._worker.join()
        self._cost_thread.shutdown(wait=True)  # every hello read gets its reply
        return 0

    def _line_too_long(self, head: str, length: int) -> None:
        self.send(
            {
                "id": guess_id(head),
                "event": "error",
                "code": "limit_exceeded",
                "limit": "line_chars",
                "max": self._max_line_chars,
                "message": f"request line of {length} characters is longer than the limit of "
                f"{self._max_line_chars}; it was skipped. Send smaller images inline, or run "
                "the engine where it can read the files by path",
            }
        )

    def _log_start(self) -> None:
        log.info("engine %s serving protocol %s on stdin/stdout", __version__, PROTOCOL_VERSION)

    def handle_line(self, line: str) -> bool:
        """Handle one request line; False once the server should stop reading. Never raises:
        whatever the line holds, it gets exactly one final reply."""
        request_id = None
        try:
            request = self._parse(line)
            if request is _ANSWERED:
                return True
            request_id = request.get("id") if isinstance(request, dict) else None
            if not _valid_id(request_id):
                request_id = None
            return self._dispatch(request)
        except Exception as exc:  # every failure becomes an error line; the server stays up
            self._error(request_id, exc)
            return True

    def _parse(self, line: str) -> Any:
        """The decoded request, or ``_ANSWERED`` once an error has been sent for it."""
        try:
            # NaN and Infinity are let through here so the checks can name the field.
            return json.loads(line)
        except RecursionError:
            problem = f"it nests arrays or objects more than {MAX_JSON_DEPTH} deep"
            self.send(
                {
                    "id": guess_id(line),
                    "event": "error",
                    "code": "limit_exceeded",
                    "limit": "json_depth",
                    "max": MAX_JSON_DEPTH,
                    "message": f"request refused: {problem}",
                }
            )
        except ValueError as exc:
            self.send(
                {
                    "id": guess_id(line),
                    "event": "error",
                    "code": "bad_json",
                    "message": f"request is not valid JSON ({short(str(exc), 200)}); send one "
                    "JSON object per line",
                }
            )
        return _ANSWERED

    def _dispatch(self, request: Any) -> bool:
        if not isinstance(request, dict):
            raise BadRequestError(
                f"a request is a JSON object with 'op' and 'id', got {type(request).__name__}"
            )
        if "id" not in request or request["id"] is None or not _valid_id(request["id"]):
            raise BadRequestError("request needs an 'id' (a string or a finite number)", "id")
        check_request_values(request)
        wanted = request.get("protocol", 1)
        if isinstance(wanted, int) and not isinstance(wanted, bool) and wanted > PROTOCOL_VERSION:
            raise BadRequestError(
                f"this engine speaks protocol {PROTOCOL_VERSION}, the request needs {wanted}: "
                "update the engine (the same version as the add-on)",
                "protocol",
            )
        op = request.get("op")
        handler = (
            {
                "hello": self._hello,
                "generate": self._generate,
                "cancel": self._cancel,
                "release": self._release,
                "shutdown": self._shutdown,
            }.get(op)
            if isinstance(op, str)
            else None
        )
        if handler is None:
            self.send(
                {
                    "id": request["id"],
                    "event": "error",
                    "code": "unknown_op",
                    "message": f"unknown op {short(op)}; known ops are hello, generate, cancel, "
                    "release and shutdown",
                    "field": "op",
                }
            )
            return True
        self._check_id_free(request["id"])
        return handler(request)

    def _check_id_free(self, request_id: Any) -> None:
        """Refuse an id already used by a generate or release in flight: its replies would mix."""
        with self._cond:
            busy = [j for j in (self._running, *self._jobs) if j is not None and j.id == request_id]
        if busy:
            raise BadRequestError(
                f"id {short(request_id)} is already used by a {busy[0].op} in flight; give each "
                "request its own id",
                "id",
            )

    # -- Ops ---------------------------------------------------------------------------------

    def _hello(self, request: dict) -> bool:
        options = self._request_options(request)
        reply = {"id": request["id"], "event": "hello", **engine_info(options)}
        reply["limits"] = self.limits()
        reply["default_model"] = self._last_model or self._default_model
        reply["loaded_model"] = self._cache.location.spec if self._cache.location else None
        if "model" in request:
            spec = _optional_str(request, "model")
            reply["model"] = describe_model(spec or self._default_model, options)
        reply["shares_files"] = _probe(request["probe"]) if "probe" in request else None
        if request.get("cost") is True:
            # Counting a new model's operations takes seconds: on the cost thread, so that a
            # cancel read meanwhile is answered at once. The reply waits for its cost.
            spec = _optional_str(request, "model") or self._last_model or self._default_model
            self._cost_thread.submit(self._send_with_cost, reply, spec, options)
            return True
        self.send(reply)
        return True

    def _send_with_cost(self, reply: dict[str, Any], spec: str, options: LoadOptions) -> None:
        """Send a ``hello`` reply once its ``cost`` is known (on the cost thread)."""
        try:
            reply["cost"] = self._cost(spec, options)
        except Exception as exc:  # the client waits for this reply: it must go out
            log.warning("no cost estimate for %s", spec, exc_info=True)
            reply["cost"] = {"available": False, "spec": spec, "message": str(exc)}
        self.send(reply)

    def _cost(self, spec: str | None, options: LoadOptions) -> dict[str, Any]:
        """``hello``'s ``cost`` for model ``spec`` (default: the next generate's model)."""
        spec = spec or self._last_model or self._default_model
        try:
            location = resolve_model(spec, options)
        except EngineError as exc:
            return {"available": False, "spec": spec, "message": str(exc)}
        return {"spec": spec, **model_cost(location, options)}

    def limits(self) -> dict[str, float]:
        """Every limit this engine enforces, by name (``hello``'s ``limits``)."""
        return {
            **LIMITS,
            "line_chars": self._max_line_chars,
            "id_chars": MAX_ID_CHARS,
            "queue": QUEUE_LIMIT,
            "generate_seconds": self._max_seconds,
            "inline_file_bytes": MAX_INLINE_FILE_BYTES,
            "inline_request_bytes": MAX_INLINE_REQUEST_BYTES,
        }

    def _generate(self, request: dict) -> bool:
        inline_result = _result_mode(request)
        if inline_result:
            if "out" in request:
                raise BadRequestError(
                    "'out' names a path on the engine's machine; with result 'inline' the PNG "
                    "comes back in the result event: leave 'out' out",
                    "out",
                )
            out = ""
        else:
            out = check_output_path(request.get("out"), self._out_roots)
        if "layout" not in request:
            raise BadRequestError("generate needs 'layout': an inline Layout object", "layout")
        folder = None
        try:
            if inline_result or "files" in request:
                folder = tempfile.mkdtemp(prefix="ld-request-")
            return self._queue_generate(request, out, folder, inline_result)
        except BaseException:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            raise

    def _queue_generate(
        self, request: dict, out: str, folder: str | None, inline_result: bool
    ) -> bool:
        layout_data, names = request["layout"], {}
        if "files" in request:
            assert folder is not None
            layout_data, names = unpack_files(layout_data, request["files"], folder)
        layout = Layout.from_dict(layout_data)
        try:
            check_layout_files(layout)
        except LayoutError as exc:
            # Name the client's file, not this request's temporary copy of it.
            message = str(exc)
            for copy, path in names.items():
                message = message.replace(copy, path)
            exc.args = (message,)
            raise
        options = self._request_options(request)
        pick_device(options.device)
        model = _optional_str(request, "model") or self._last_model or self._default_model
        resolve_model(model, options)
        resolve_conditions(options)
        check_conditions(layout, options.ip_adapter)
        job = _Job(request["id"], "generate", layout, out, model, options)
        job.max_seconds = self._max_seconds
        job.folder, job.names, job.inline_result = folder, names, inline_result
        with self._cond:
            waiting = sum(1 for j in self._jobs if j.op == "generate")
            if waiting >= QUEUE_LIMIT:
                raise _Busy(
                    f"{waiting} generates are already waiting; wait for a result or cancel one"
                )
            self._last_model = model
            self._jobs.append(job)
            ahead = waiting + (self._running is not None)
            if ahead:
                # Sent under the lock: the worker cannot start this job (and send its first
                # events) before the client has heard that it is queued.
                self.send({"id": job.id, "event": "queued", "position": ahead})
            self._cond.notify_all()
        return True

    def _cancel(self, request: dict) -> bool:
        target = request.get("target")
        if not _valid_id(target):
            raise BadRequestError(
                f"'target' must be the id of a generate (a string or a finite number) or null, "
                f"got {short(target)}",
                "target",
            )
        with self._cond:
            running = self._running if self._running and self._running.op == "generate" else None
            if target is None and running is not None:
                target = running.id
            found = False
            if running is not None and running.id == target:
                running.cancel.set()
                found = True
            else:
                for job in list(self._jobs):
                    if job.op == "generate" and job.id == target:
                        self._jobs.remove(job)
                        job.discard()
                        found = True
                        self.send({"id": job.id, "event": "cancelled"})
        self.send(
            {"id": request["id"], "event": "ack", "op": "cancel", "target": target, "found": found}
        )
        return True

    def _release(self, request: dict) -> bool:
        with self._cond:
            self._jobs.append(_Job(request["id"], "release"))
            self._cond.notify_all()
        return True

    def _shutdown(self, request: dict) -> bool:
        with self._cond:
            self._stopping = True
            if self._running is not None:
                self._running.cancel.set()
            for job in self._jobs:
                if job.op == "generate":
                    job.discard()
                    self.send({"id": job.id, "event": "cancelled"})
            self._jobs.clear()
            self._cond.notify_all()
        self._worker.join()
        self._cost_thread.shutdown(wait=True)
        self.send({"id": request["id"], "event": "ack", "op": "shutdown"})
        return False

    def _request_options(self, request: dict) -> LoadOptions:
        overrides = request.get("options", {})
        if not isinstance(overrides, dict):
            raise BadRequestError("'options' must be an object", "options")
        for key, value in overrides.items():
            kind = OPTION_TYPES.get(key)
            if kind is None:
                raise BadRequestError(
                    f"unknown option {short(key)}; known options are {sorted(OPTION_TYPES)}",
                    "options",
                )
            if not isinstance(value, kind) and not (key in NULLABLE_OPTIONS and value is None):
                raise BadRequestError(
                    f"option {key!r} must be a {kind.__name__}, got {short(value)}",
                    f"options.{key}",
                )
            if (
                key == "kept_text_mib"
                and value is not None
                and (isinstance(value, bool) or value < 0)
            ):
                raise BadRequestError(
                    f"option 'kept_text_mib' must be a whole number of MiB >= 0 (0 keeps "
                    f"nothing), got {short(value)}",
                    "options.kept_text_mib",
                )
            if isinstance(value, str) and (len(value) > LIMITS["path_chars"] or "\x00" in value):
                raise BadRequestError(
                    f"option {key!r} must be a path or name without NUL characters, at most "
                    f"{LIMITS['path_chars']} characters long",
                    f"options.{key}",
                )
        if overrides.get("allow_pickle") and not self._options.allow_pickle:
            # Loading pickle runs code from the file: only whoever starts the engine decides.
            raise UnsafeCheckpointError(
                "pickle checkpoints can run code when loaded, so only the engine's own start "
                "flag --allow-pickle allows them; a request cannot. Use .safetensors weights, or "
                "restart the engine with --allow-pickle if you trust the files",
                "options.allow_pickle",
            )
        return dataclasses.replace(self._options, **overrides)

    # -- Worker ------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stopping:
                    self._cond.wait()
                if not self._jobs:
                    return
                job = self._running = self._jobs.popleft()
            try:
                if job.op == "release":
                    final = {
                        "id": job.id,
                        "event": "ack",
                        "op": "release",
                        "released": self._cache.release(),
                    }
                else:
                    final = self._run_generate(job)
            except CancelledError:
                final = {"id": job.id, "event": "cancelled"}
            except Exception as exc:
                final = self._error_message(job.id, exc)
            finally:
                job.discard()
            # Cleared before the final event goes out, so a client reacting to it never finds
            # this job still "running" (a late cancel must report found: false).
            with self._cond:
                self._running = None
            self.send(final)

    def _run_generate(self, job: _Job) -> dict[str, Any]:
        def announce(location: ModelLocation) -> None:
            self.send({"id": job.id, "event": "loading", "model": job.model, "path": location.path})

        def progress(step: int, total: int, seconds_left: float | None = None) -> None:
            event = {"id": job.id, "event": "progress", "step": step, "total": total}
            if seconds_left is not None:
                event["seconds_left"] = round(seconds_left, 1)
            self.send(event)

        if job.cancel.is_set():
            raise CancelledError("cancelled before it started")
        pipe, load_seconds = self._cache.get(job.model, job.options, on_load=announce)
        if job.inline_result:
            assert job.folder is not None
            out = os.path.join(job.folder, "result.png")
        else:
            out = job.out
            prepare_output_folder(out, self._out_roots)
        result = run_generation(
            pipe,
            job.layout,
            out,
            job.model,
            on_step=progress,
            should_stop=job.cancel.is_set,
            max_seconds=job.max_seconds,
            make_folders=False,
            recorded_paths=job.names,
        )
        png = None
        if job.inline_result:
            with open(result.path, "rb") as handle:
                png = encode_file(handle.read())
        final = {
            "id": job.id,
            "event": "result",
            "path": None if job.inline_result else result.path,
            "seed": result.seed,
            "width": result.width,
            "height": result.height,
            "seconds": round(result.seconds, 4),
            "load_seconds": round(load_seconds, 4),
            "model": job.model,
            "conditions": result.conditions,
            "kept_text_bytes": pipe.regional_last_kept_bytes,
        }
        if png is not None:
            final["png"] = png
        return final


def engine_info(options: LoadOptions | None = None) -> dict[str, Any]:
    """Version, protocol, device, dtype and capabilities: the body of a ``hello`` reply.

    ``capabilities`` lists ``controlnet`` / ``ip_adapter`` / ``gligen`` when that model is
    configured and present; ``conditions`` says, for each, whether it is available and if not, why.
    """
    options = options or LoadOptions()
    device = pick_device(options.device)
    conditions = describe_conditions(options)
    available = [name for name, state in conditions.items() if state["available"]]
    return {
        "protocol": PROTOCOL_VERSION,
        "engine_version": __version__,
        "device": device,
        "dtype": dtype_name(pick_dtype(device, options.dtype)),
        "capabilities": [*CAPABILITIES, *available],
        "conditions": conditions,
    }


class _Busy(EngineError):
    code = "busy"


_ANSWERED = object()
"""What a line that was already answered with an error parses to (``null`` is a request)."""


def _valid_id(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or (isinstance(value, (str, int)) and not isinstance(value, bool))


def read_line(stream: IO[str], limit: int) -> tuple[str, int]:
    """The next line of ``stream`` (``""`` at its end) and 0; or, for a line longer than
    ``limit`` characters, its first characters and its length, the rest skipped unread into
    memory."""
    line = stream.readline(limit + 1)
    if len(line) <= limit or line.endswith("\n"):
        return line, 0
    length, head = len(line), line[:4096]
    while not line.endswith("\n"):
        line = stream.readline(1 << 20)
        if not line:
            break
        length += len(line)
    return head, length - line.endswith("\n")


_ID_NEAR_START = re.compile(r'"id"\s*:\s*("(?:[^"\\]|\\.){0,256}"|-?\d{1,19}(?:\.\d+)?)')


def guess_id(text: str) -> Any:
    """The ``id`` of a request that could not be read whole, found near its start; else None.

    Clients write ``id`` first or second, so a refused line can still be answered to its id.
    """
    match = _ID_NEAR_START.search(text[:4096])
    if match is None:
        return None
    try:
        value = json.loads(match.group(1))
    except ValueError:
        return None
    return value if _valid_id(value) else None


def check_request_values(request: dict) -> None:
    """Refuse values no field may hold, wherever they are: non-finite numbers, text with
    unpaired surrogates, nesting deeper than ``MAX_JSON_DEPTH`` and over-long ids.

    Walked without recursion. Inside ``layout`` only the nesting is checked here: the Layout's
    own validation names the offending field (``bad_layout``).
    """
    request_id = request.get("id")
    if isinstance(request_id, str) and len(request_id) > MAX_ID_CHARS:
        raise LimitExceededError(
            f"'id' is {len(request_id)} characters long; the limit is {MAX_ID_CHARS}",
            "id_chars",
            MAX_ID_CHARS,
            "id",
        )
    stack: list[tuple[Any, str, int, bool]] = [(request, "", 0, True)]
    while stack:
        value, path, depth, strict = stack.pop()
        problem = None
        if strict and isinstance(value, float) and not math.isfinite(value):
            problem = f"{value} is not a finite number"
        elif strict and isinstance(value, str) and invalid_unicode(value):
            problem = "the text is not valid Unicode (an unpaired surrogate such as \\ud800)"
        elif isinstance(value, (dict, list)):
            if depth >= MAX_JSON_DEPTH:
                raise LimitExceededError(
                    f"request nests arrays or objects more than {MAX_JSON_DEPTH} deep",
                    "json_depth",
                    MAX_JSON_DEPTH,
                    path[:200] or None,
                )
            if isinstance(value, dict):
                for key, child in value.items():
                    if strict and invalid_unicode(key):
                        problem = "a key is not valid Unicode (an unpaired surrogate)"
                        break
                    inner = f"{path}.{key}" if path else key
                    stack.append((child, inner, depth + 1, strict and inner != "layout"))
            else:
                stack.extend(
                    (child, f"{path}[{i}]", depth + 1, strict) for i, child in enumerate(value)
                )
        if problem is not None:
            field = path[:200] or None
            raise BadRequestError(
                f"'{field}': {problem}; send finite numbers and UTF-8 text", field
            )


def _result_mode(request: dict) -> bool:
    """Whether a generate asks for its PNG inline (``"result": "inline"``)."""
    mode = request.get("result")
    if mode is None:
        return False
    if mode != INLINE_RESULT:
        raise BadRequestError(
            f"'result' must be {INLINE_RESULT!r} (the PNG comes back in the result event) or "
            f"left out (the engine writes 'out'), got {short(mode)}",
            "result",
        )
    return True


def unpack_files(layout: Any, files: Any, folder: str) -> tuple[Any, dict[str, str]]:
    """Write a generate's inline ``files`` into ``folder``; the Layout naming them there instead.

    Returns ``(layout, names)``: a copy of the Layout dict whose image paths sent inline name
    the written files, and each written path -> the path the client named it by. Every file
    must be one the Layout names, each once; sizes are checked against the inline limits before
    anything is decoded. Raises BadRequestError or LimitExceededError naming the field.
    """
    if not isinstance(files, list):
        raise BadRequestError(
            "'files' must be a list of {'path', 'data', 'bytes', 'sha256'} objects", "files"
        )
    if not isinstance(layout, dict):
        return layout, {}  # the Layout's own check says what is wrong with it
    layout = {**layout}
    if isinstance(layout.get("regions"), list):
        layout["regions"] = [
            {**region} if isinstance(region, dict) else region for region in layout["regions"]
        ]
    wanted, sent = set(named_files(layout)), set()
    total = 0
    for i, entry in enumerate(files):
        path = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(path, str) or path not in wanted:
            raise BadRequestError(
                f"files[{i}].path must be an image path the Layout names (mask, image, depth, "
                f"reference or init_image), got {short(path)}",
                f"files[{i}].path",
            )
        if path in sent:
            raise BadRequestError(
                f"files[{i}] sends {short(path)} a second time; send each file once",
                f"files[{i}].path",
            )
        sent.add(path)
        size = entry.get("bytes")
        total += size if isinstance(size, int) and size > 0 else 0
    if total > MAX_INLINE_REQUEST_BYTES:
        raise LimitExceededError(
            f"the files sent inline are {total} bytes together; one generate may carry at most "
            f"{MAX_INLINE_REQUEST_BYTES}. Send fewer or smaller images (lower resolution, 8-bit "
            "depth, fewer object images), or run the engine where it can read them by path",
            "inline_request_bytes",
            MAX_INLINE_REQUEST_BYTES,
            "files",
        )
    written: dict[str, str] = {}
    for i, entry in enumerate(files):
        try:
            data = decode_file(entry, MAX_INLINE_FILE_BYTES, f"files[{i}]")
        except InlineFileError as exc:
            if exc.limit is not None:
                raise LimitExceededError(str(exc), exc.limit, exc.maximum, exc.field) from None
            raise BadRequestError(str(exc), exc.field) from None
        suffix = os.path.splitext(entry["path"].replace("\\", "/"))[1]
        suffix = suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", suffix) else ""
        target = os.path.join(folder, f"{i}{suffix}")
        with open(target, "wb") as handle:
            handle.write(data)
        written[entry["path"]] = target
    for holder, key in image_holders(layout):
        value = holder.get(key)
        if isinstance(value, str) and value in written:
            holder[key] = written[value]
    return layout, {target: path for path, target in written.items()}


def _probe(probe: Any) -> bool:
    """Whether the file ``probe["path"]`` holds ``probe["token"]``: this engine then reads the
    client's files where the client wrote them. Reads at most ``MAX_PROBE_BYTES`` of a regular
    file, never blocking on a pipe or device."""
    if not isinstance(probe, dict):
        raise BadRequestError("'probe' must be an object with 'path' and 'token'", "probe")
    path, token = probe.get("path"), probe.get("token")
    if not isinstance(path, str) or not path or len(path) > LIMITS["path_chars"] or "\x00" in path:
        raise BadRequestError("'probe.path' must be the absolute path of a file", "probe.path")
    if not isinstance(token, str) or not 16 <= len(token.encode()) <= MAX_PROBE_BYTES:
        raise BadRequestError(
            f"'probe.token' must be text of 16 to {MAX_PROBE_BYTES} bytes", "probe.token"
        )
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except (OSError, ValueError):
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        return os.read(fd, MAX_PROBE_BYTES + 1) == token.encode()
    except OSError:
        return False
    finally:
        os.close(fd)


def _optional_str(request: dict, key: str) -> str | None:
    value = request.get(key)
    if value is not None and not isinstance(value, str):
        raise BadRequestError(f"'{key}' must be a string", key)
    if value is not None and (len(value) > LIMITS["path_chars"] or "\x00" in value):
        raise BadRequestError(
            f"'{key}' must be a name or path without NUL characters, at most "
            f"{LIMITS['path_chars']} characters long",
            key,
        )
    return value


def protocol_streams() -> tuple[IO[str], IO[str]]:
    """Take over stdin/stdout for the protocol; anything else printing goes to stderr.

    The real stdout file descriptor is duplicated for protocol lines, then fd 1 and
    ``sys.stdout`` are pointed at stderr, so stray prints (ours, libraries', C code's) cannot
    corrupt the stream.
    """
    sys.stdout.flush()
    protocol_out = io.TextIOWrapper(
        os.fdopen(os.dup(1), "wb", buffering=0), encoding="utf-8", newline="\n"
    )
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    # Lines end at "\n" only: a stray "\r" inside a line must not split it into two requests.
    protocol_in = io.TextIOWrapper(
        sys.stdin.buffer, encoding="utf-8", errors="replace", newline="\n"
    )
    return protocol_in, protocol_out


def serve(
    options: LoadOptions | None = None,
    model: str | None = None,
    *,
    out_roots: Sequence[str] = (),
    max_seconds: float = DEFAULT_MAX_SECONDS,
) -> int:
    """Run the protocol on this process's stdin/stdout; returns the exit status."""
    protocol_in, protocol_out = protocol_streams()
    server = Server(protocol_out, options, model, out_roots=out_roots, max_seconds=max_seconds)
    return server.run(protocol_in)
