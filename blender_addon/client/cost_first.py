"""A generate that learns the model's cost off the UI thread before it decides how to run (no bpy).

Generate asks the engine for the model's cost (``hello`` with ``cost``) before it renders the
masks, and the cost decides whether the high-res fix runs (it needs the model's native size).
A cold engine answers only once torch is imported, which can take a minute: waiting for it on
Blender's UI thread would freeze the interface. :class:`CostFirstJob` starts at once instead:

- when the native size is already known (an earlier reply), the generation is sent at once and
  the reply only refreshes the cost;
- otherwise its own thread waits for the reply (up to ``wait_seconds``), keeps the cost, then
  sends the generation (through the high-res fix when the reply says the size is far above
  native).

Either way the reply arrives as a ``cost`` event (``{"event": "cost", "cost": ...}``, the cost
now known for the model or None) among the generation's progress events, so the UI can
refresh its cost lines. Callers see the same ``events``, ``final``, ``poll``, ``wait`` and
``cancel`` as a plain :class:`~.engine_client.Job`.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from . import cost
from .engine_client import EngineClient, EventStream, Job
from .high_res import HighResJob

COST_EVENT = "cost"
"""The event that carries the engine's cost reply (not a progress event, never final)."""
POLL_SECONDS = 0.05
"""How often the job's thread looks at the cost reply and the generation's events."""

Starter = Callable[[int | None], Job | HighResJob]
"""Sends the generation, given the model's native side (None: unknown)."""


class CostFirstJob(EventStream):
    """A generation that starts once the model's native size is known (see the module)."""

    def __init__(
        self,
        client: EngineClient,
        asked: Job,
        spec: str,
        start: Starter,
        wait_seconds: float = 60.0,
    ):
        super().__init__("generate", asked.id)
        self.client = client
        self.asked, self.spec, self._start = asked, spec, start
        self.wait_seconds = wait_seconds
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        self._cost_said = False
        self.inner: Job | HighResJob | None = None
        """The generation once sent (a plain job or the high-res fix's)."""
        native = cost.native_size(spec)
        if native is not None:
            # Known from an earlier reply: nothing to wait for. Errors sending it raise here,
            # as a plain generate's do.
            self.inner = start(native)
            self.id = self.inner.id
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="cost first", daemon=True)
        self._thread.start()

    # -- The Job interface ---------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop the generation, or never send it; the final event is ``cancelled``."""
        self._cancelled.set()
        with self._lock:
            inner = self.inner
        if inner is not None:
            inner.cancel()

    # -- The thread ----------------------------------------------------------------------------

    def _finish(self, event: dict[str, Any]) -> None:
        # Under the lock that guards the cost event: no cost event comes after the final one.
        with self._lock:
            super()._finish(event)

    def _take_cost(self) -> None:
        """Keep the engine's reply (once it is there) and pass it on as a ``cost`` event."""
        if self._cost_said or not self.asked.done:
            return
        self._cost_said = True
        reply = self.asked.final or {}
        if reply.get("event") == "hello":
            cost.remember(self.spec, reply.get("cost"))
            if isinstance(reply.get("protocol"), int):
                self.client.protocol = reply["protocol"]
        with self._lock:
            if not self._done.is_set():
                self.events.put({"id": self.id, "event": COST_EVENT, "cost": cost.known(self.spec)})

    def _waiting_for_cost(self) -> bool:
        return not self.asked.done and time.monotonic() - self._started < self.wait_seconds

    def _run(self) -> None:
        self._finish_with(self._follow, "the generation could not start")
        # A reply later than the generation still refreshes the estimate.
        if not self._cost_said:
            cost.answer(self.asked, self.spec, max(0.0, self.wait_seconds))

    def _follow(self) -> dict[str, Any]:
        """Wait for the cost if the generation needs it, send it, pass its events on; its final
        event."""
        while self.inner is None:
            self._take_cost()
            if self._cancelled.is_set():
                return {"id": self.id, "event": "cancelled"}
            if self._waiting_for_cost():
                with contextlib.suppress(TimeoutError):
                    self.asked.wait(POLL_SECONDS)
                continue
            inner = self._start(cost.native_size(self.spec))
            with self._lock:
                self.inner = inner
            if self._cancelled.is_set():
                inner.cancel()
        inner = self.inner
        while True:
            self._take_cost()
            try:
                event = inner.events.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue
            if event is inner.final:
                return {**event, "id": self.id}
            self.events.put(event)
