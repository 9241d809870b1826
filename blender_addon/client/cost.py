"""What a Generate will cost, as the panels and operators say it (no bpy).

The engine's ``hello`` with ``cost`` (``engine.wire.cost``) is asked once per model and kept
here by model spec; after each generation it is asked again, so the estimate follows the
engine's measured step time. The panels multiply it out for the current size and steps on
every redraw, without a round trip.
"""

from __future__ import annotations

import threading
from typing import Any

from ..wire.cost import (
    duration,
    estimate_seconds,
    far_above_native,
    high_res_seconds,
    native_area_size,
)
from .engine_client import EngineClient, EngineError, Job
from .engine_session import Task, get_client

LONG_SECONDS = 120.0
"""An estimate above this is shown as a warning."""

_costs: dict[str, dict[str, Any]] = {}
_tasks: dict[str, CostTask] = {}
_lock = threading.Lock()


def known(spec: str) -> dict[str, Any] | None:
    """The last cost the engine gave for model ``spec`` (None before one, or if unavailable)."""
    cost = _costs.get(spec)
    return cost if cost and cost.get("available") else None


def remember(spec: str, cost: dict[str, Any] | None) -> None:
    """Keep ``cost`` (a ``hello`` reply's ``cost``) for model ``spec``."""
    if isinstance(cost, dict):
        with _lock:
            _costs[spec] = cost


def forget() -> None:
    """Drop every cost (another engine: its device and speed differ)."""
    with _lock:
        _costs.clear()


def ask(client: EngineClient, spec: str, timeout: float | None = 120.0) -> dict[str, Any] | None:
    """Ask the engine for model ``spec``'s cost (blocking) and keep it; None when it has none.
    Raises EngineError when the engine cannot answer, TimeoutError when it is too slow."""
    reply = client.request("hello", model=spec or None, cost=True).wait(timeout)
    if reply.get("event") == "error":
        raise EngineError(str(reply.get("code")), str(reply.get("message")))
    remember(spec, reply.get("cost"))
    return known(spec)


def answer(job: Job, spec: str, timeout: float) -> dict[str, Any] | None:
    """Wait up to ``timeout`` seconds for a ``hello`` with ``cost`` already sent (see
    :func:`ask`) and keep its cost; the cost known for ``spec`` afterwards (an older one when
    the engine is too slow or fails to answer)."""
    try:
        reply = job.wait(timeout)
    except TimeoutError:
        return known(spec)
    if reply.get("event") == "hello":
        remember(spec, reply.get("cost"))
    return known(spec)


def native_size(spec: str) -> int | None:
    """Model ``spec``'s native side from its known cost, else None."""
    cost = known(spec)
    return int(cost["native_size"]) if cost else None


class CostTask(Task):
    """Ask the engine for a model's cost off the UI thread (starting the engine if needed)."""

    def __init__(self, python_setting: str, spec: str, command_setting: str = ""):
        super().__init__("Engine cost")
        self.python_setting, self.spec, self.command_setting = python_setting, spec, command_setting

    def work(self) -> dict[str, Any] | None:
        self.status = "starting the engine"
        client = get_client(self.python_setting, self.command_setting)
        self.status = "asking the engine"
        return ask(client, self.spec, timeout=300.0)


def check(python_setting: str, spec: str, command_setting: str = "") -> CostTask:
    """Start asking for ``spec``'s cost in the background, unless that is already under way."""
    with _lock:
        task = _tasks.get(spec)
        if task is not None and task.running:
            return task
        task = _tasks[spec] = CostTask(python_setting, spec, command_setting)
    return task.start()


def checking(spec: str) -> CostTask | None:
    """The cost check for ``spec`` under way or last finished (None if none ran)."""
    return _tasks.get(spec)


def describe(
    cost: dict[str, Any] | None,
    width: int,
    height: int,
    steps: int,
    high_res: bool,
    strength: float,
) -> list[tuple[str, str]]:
    """``(text, icon)`` lines on what generating ``width`` x ``height`` in ``steps`` steps
    costs: the native size, the size generated at, the estimate, and whether the high-res fix
    runs (or should). Without a cost: one line saying how to get it."""
    if cost is None:
        return [("Estimate: press Estimate Cost or Check engine", "TIME")]
    native = int(cost["native_size"])
    lines = [(f"Native {native} x {native}, generating {width} x {height}", "IMAGE_DATA")]
    direct = estimate_seconds(cost, width, height, steps)
    # Before a generation the engine knows only its device's speed: a lower bound.
    about = "About" if cost.get("source") == "measured" else "At least"
    if not far_above_native(width, height, native):
        icon = "ERROR" if direct > LONG_SECONDS else "TIME"
        lines.append((f"{about} {duration(direct)} at {width} x {height}", icon))
        return lines
    ratio = width * height / (native * native)
    if high_res:
        fixed = high_res_seconds(cost, width, height, steps, strength)
        small = native_area_size(width, height, native)
        icon = "ERROR" if fixed > LONG_SECONDS else "TIME"
        text = f"{about} {duration(fixed)} with High-res Fix"
        if fixed > LONG_SECONDS:
            # Its full-size pass still runs at the full size: only a smaller size is quicker.
            text += ": lower the resolution for a quicker image"
        lines.append((text, icon))
        lines.append(
            (
                f"{small[0]} x {small[1]}, then {width} x {height} at strength {strength:.2f} "
                f"(directly: {duration(direct)})",
                "INFO",
            )
        )
    else:
        lines.append(
            (
                f"{about} {duration(direct)} at {width} x {height}, {ratio:.0f}x the "
                "native area: turn on High-res Fix or lower the resolution",
                "ERROR",
            )
        )
    return lines
