"""The vocabulary of ``engine serve``'s JSON-lines protocol, shared by the engine and the add-on.

``engine.service.serve``'s docstring is the protocol's reference; this module holds the names
both sides must agree on, so neither retypes them.
"""

from __future__ import annotations

PROTOCOL_VERSION = 2
"""Version of the ``engine serve`` line protocol (newline-delimited JSON). Version 2 adds inline
files (a generate's ``files`` and ``result: "inline"``) and ``hello``'s file-sharing probe; every
version 1 request still means what it meant."""

OPS = ("hello", "generate", "cancel", "release", "shutdown")
"""Requests the engine answers."""

PROGRESS_EVENTS = frozenset({"queued", "loading", "progress"})
"""Events a generate may send before its final one."""

FINAL_EVENTS = frozenset({"result", "cancelled", "error"})
"""Every generate ends with exactly one of these."""

QUEUE_LIMIT = 4
"""Generates that may wait behind the running one before ``busy`` is answered."""

MAX_INLINE_FILE_BYTES = 16 * 1024 * 1024
"""Bytes of one file carried inline in a generate (decoded size)."""
MAX_INLINE_REQUEST_BYTES = 32 * 1024 * 1024
"""Bytes of all the files one generate carries inline, together (decoded size)."""
MAX_LINE_CHARS = 48 * 1024 * 1024
"""Characters of one request line; a longer line is skipped and answered ``limit_exceeded``.
Leaves room for ``MAX_INLINE_REQUEST_BYTES`` as base64 (4 characters per 3 bytes) and the Layout."""
MAX_PROBE_BYTES = 256
"""Bytes of ``hello``'s probe file the engine reads to compare with the token."""
INLINE_RESULT = "inline"
"""A generate's ``result`` value asking for the PNG back inside the ``result`` event."""
MAX_ID_CHARS = 256
"""Characters of a request ``id`` string."""
DEFAULT_MAX_SECONDS = 3600.0
"""Estimated seconds a generate may take before it is refused (``engine serve --max-seconds``)."""

OPTION_TYPES: dict[str, type] = {
    "device": str,
    "dtype": str,
    "cpu_offload": bool,
    "vae_tiling": bool,
    "kept_text_mib": int,
    "allow_pickle": bool,
    "config": str,
    "controlnet": str,
    "ip_adapter": str,
    "gligen": str,
}
"""A generate's ``options``: per-request overrides of the serve flags, with their JSON types."""

NULLABLE_OPTIONS = ("config", "controlnet", "ip_adapter", "gligen", "kept_text_mib")
"""Options that may be ``null`` (turned off for this request)."""

# Error codes the engine sends in ``error`` events.
BAD_JSON = "bad_json"
BAD_REQUEST = "bad_request"
UNKNOWN_OP = "unknown_op"
BAD_LAYOUT = "bad_layout"
MODEL_NOT_FOUND = "model_not_found"
UNSUPPORTED_MODEL = "unsupported_model"
UNSAFE_CHECKPOINT = "unsafe_checkpoint"
BAD_DEVICE = "bad_device"
OUT_OF_MEMORY = "out_of_memory"
OUTPUT_FAILED = "output_failed"
BUSY = "busy"
LIMIT_EXCEEDED = "limit_exceeded"
CANCELLED = "cancelled"
INTERNAL = "internal"

ERROR_CODES = frozenset(
    {
        BAD_JSON,
        BAD_REQUEST,
        UNKNOWN_OP,
        BAD_LAYOUT,
        MODEL_NOT_FOUND,
        UNSUPPORTED_MODEL,
        UNSAFE_CHECKPOINT,
        BAD_DEVICE,
        OUT_OF_MEMORY,
        OUTPUT_FAILED,
        BUSY,
        LIMIT_EXCEEDED,
        INTERNAL,
    }
)
