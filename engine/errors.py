"""Errors the engine reports to its users, each with a stable machine-readable code.

``engine serve`` sends ``code`` and the message in its ``error`` events; the command line prints
the message. Messages say what is wrong and what to do about it.
"""

from __future__ import annotations

import sys


class EngineError(Exception):
    """An error with a protocol ``code`` and, where it concerns one, the request ``field``."""

    code = "internal"

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class BadRequestError(EngineError):
    """A request that is not well formed (missing or mistyped fields)."""

    code = "bad_request"


class ModelNotFoundError(EngineError):
    """The model spec names nothing usable on this machine."""

    code = "model_not_found"


class UnsupportedModelError(EngineError):
    """A model that exists but is not an SDXL text-to-image model the engine can drive."""

    code = "unsupported_model"


class UnsafeCheckpointError(EngineError):
    """A pickle checkpoint, refused because loading it could run arbitrary code."""

    code = "unsafe_checkpoint"


class DeviceError(EngineError):
    """The requested device or dtype is not available here."""

    code = "bad_device"


class OutOfMemoryError(EngineError):
    """The device ran out of memory; the message suggests what to reduce."""

    code = "out_of_memory"


class OutputError(EngineError):
    """The output image could not be written."""

    code = "output_failed"


class LimitExceededError(EngineError):
    """A documented limit of the engine exceeded (Layout limits are ``LimitError``s):
    ``limit`` names it as ``hello`` lists it, ``maximum`` is its value."""

    code = "limit_exceeded"

    def __init__(self, message: str, limit: str, maximum: float, field: str | None = None):
        super().__init__(message, field)
        self.limit = limit
        self.maximum = maximum


class CancelledError(EngineError):
    """A generation stopped because a cancel arrived."""

    code = "cancelled"


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception is a device running out of memory (CUDA, MPS or CPU allocator)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
