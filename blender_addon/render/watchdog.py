"""How long a running generate may stay silent before its engine counts as hung.

Shared by the local batch and the Ray actors' engines; no bpy, so a Ray actor imports it.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..client.engine_client import EngineClient, EventStream
from ..wire.protocol import PROGRESS_EVENTS

ENGINE_HUNG = "engine_hung"


@dataclass(frozen=True)
class Watchdog:
    """How long the engine may go without a progress event before it counts as hung."""

    stall_seconds: float = 120.0
    """Never less than this between two events of a running frame."""
    step_factor: float = 10.0
    """Times the slowest step measured so far (the bound grows with the image size)."""
    load_seconds: float = 900.0
    """While a model loads, and before the first step of a fresh engine."""

    def bound(self, slowest_step: float | None, loading: bool) -> float:
        """Seconds to wait for the next event."""
        if loading or slowest_step is None:
            return max(self.load_seconds, self.stall_seconds)
        return max(self.stall_seconds, self.step_factor * slowest_step)


@dataclass
class EngineWatch:
    """What the watchdog has learnt of one client's engine: its slowest step so far, and the
    process that last finished a frame (a new process loads its model first)."""

    slowest_step: float | None = None
    warm_pid: int | None = None

    def wait(
        self,
        job: EventStream,
        client: EngineClient,
        watchdog: Watchdog,
        hung: Callable[[float, bool], str],
    ) -> dict[str, Any]:
        """``job``'s final event; when no event comes within the watchdog's bound, the engine
        is killed and an ``engine_hung`` error returned, its message ``hung(bound, loading)``."""
        loading = client.pid != self.warm_pid
        last = time.monotonic()
        previous_step: float | None = None
        while True:
            bound = watchdog.bound(self.slowest_step, loading)
            try:
                event = job.events.get(timeout=max(0.0, last + bound - time.monotonic()))
            except queue.Empty:
                client.kill()
                return {"event": "error", "code": ENGINE_HUNG, "message": hung(bound, loading)}
            now = time.monotonic()
            kind = event.get("event")
            if kind == "loading":
                loading = True
            elif kind == "progress":
                if previous_step is not None:
                    self.slowest_step = max(self.slowest_step or 0.0, now - previous_step)
                previous_step = now
                loading = False
            last = now
            if event is job.final or kind not in PROGRESS_EVENTS:
                if kind == "result":
                    self.warm_pid = client.pid
                return event
