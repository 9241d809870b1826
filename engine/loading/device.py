"""The torch device and precision a pipeline runs in."""

from __future__ import annotations

from typing import Any

from engine.errors import DeviceError

_DTYPES = {
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}


def pick_device(requested: str | None = "auto") -> str:
    """The torch device to run on: ``auto`` picks cuda, then mps, then cpu."""
    import torch

    requested = (requested or "auto").strip().lower()
    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if requested == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    kind = requested.split(":")[0]
    if kind == "cpu":
        return "cpu"
    if kind == "cuda" and cuda:
        index = requested.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise DeviceError(
                f"device {requested!r} does not exist: this machine has "
                f"{torch.cuda.device_count()} CUDA device(s), numbered from 0",
                "device",
            )
        return requested
    if kind == "mps" and mps:
        return "mps"
    if kind in ("cuda", "mps"):
        raise DeviceError(
            f"device {requested!r} is not available here (cuda: {cuda}, mps: {mps}); use "
            "--device auto or cpu, or install a torch build for your GPU",
            "device",
        )
    raise DeviceError(f"unknown device {requested!r}; use auto, cuda, cuda:N, mps or cpu", "device")


def pick_dtype(device: str, requested: str | None = "auto") -> Any:
    """The torch dtype: ``auto`` is float16 on a GPU and float32 on the CPU."""
    import torch

    requested = (requested or "auto").strip().lower()
    if requested == "auto":
        return torch.float32 if device == "cpu" else torch.float16
    if requested not in _DTYPES:
        raise DeviceError(
            f"unknown dtype {requested!r}; use auto, float16, bfloat16 or float32", "dtype"
        )
    return getattr(torch, _DTYPES[requested])


def dtype_name(dtype: Any) -> str:
    """``torch.float16`` -> ``float16``."""
    return str(dtype).removeprefix("torch.")
