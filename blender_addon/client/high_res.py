"""Generating with the high-resolution fix: two engine requests that read as one job (no bpy).

Far above the model's native size (``wire.cost.far_above_native``) a model repeats and smears
objects, and every step costs much more. :func:`start_generate` then sends the Layout's first
pass at about the native area, and when its image is back, the second pass: the same Layout at
the full size starting from that image at a moderate strength (``wire.cost.second_pass``). The
engine resizes an init image to the Layout's size (Lanczos), so the first pass's PNG is sent as
it is: no full-size intermediate file travels to an engine that does not share this machine's
files. Callers see one :class:`HighResJob` with the same ``events``, ``final``, ``poll`` and
``cancel`` as a plain :class:`~.engine_client.Job`.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from ..wire.cost import HIGH_RES_STRENGTH, far_above_native, first_pass, second_pass
from ..wire.layout import Layout
from ..wire.protocol import PROGRESS_EVENTS
from .engine_client import EngineClient, EventStream, Job

FIRST_PASS_SUFFIX = "_first_pass.png"
"""The first pass's PNG is written next to the result, named after it with this suffix."""


def uses_high_res(width: int, height: int, native: int | None, enabled: bool) -> bool:
    """Whether a generate at ``width`` x ``height`` goes through the high-res fix."""
    return bool(enabled and native and far_above_native(width, height, native))


def start_generate(
    client: EngineClient,
    layout: dict[str, Any],
    out: str,
    model: str | None = None,
    options: dict[str, Any] | None = None,
    *,
    native: int | None = None,
    high_res: bool = False,
    strength: float = HIGH_RES_STRENGTH,
    first_out: str | None = None,
) -> Job | HighResJob:
    """Send ``layout`` to the engine: in two passes when ``high_res`` is on and its size is far
    above ``native`` (the model's native side), else as one generate. ``first_out`` names the
    first pass's PNG (default: next to ``out``, see :data:`FIRST_PASS_SUFFIX`). Raises
    EngineError like :meth:`EngineClient.generate` when the (first) request cannot be sent."""
    if uses_high_res(int(layout["width"]), int(layout["height"]), native, high_res):
        assert native is not None
        return HighResJob(client, layout, out, model, options, native, strength, first_out)
    return client.generate(layout, out, model, options=options)


class HighResJob(EventStream):
    """The high-res fix's two generates as one job (see the module).

    Events: the first pass's progress then the second's, ``step`` and ``total`` counted over
    both and each with ``"pass": 1 | 2`` and ``"passes": 2``; the final event is the second
    pass's ``result`` with ``seconds`` of both passes and ``high_res`` saying what ran
    (``first_pass``: its size, path, seed and seconds; ``strength``, ``steps``), or the first
    ``error`` or ``cancelled`` of either pass. The first pass's PNG is kept (next to ``out``
    unless ``first_out`` names it).
    """

    def __init__(
        self,
        client: EngineClient,
        layout: dict[str, Any],
        out: str,
        model: str | None,
        options: dict[str, Any] | None,
        native: int,
        strength: float = HIGH_RES_STRENGTH,
        first_out: str | None = None,
    ):
        super().__init__("generate")
        self.client = client
        self.out = os.path.abspath(out)
        self.model, self.options, self.strength = model, options, strength
        self.layout = Layout.from_dict(layout)
        self.first_layout = first_pass(self.layout, native)
        # The second pass's provenance names this file: a renderer that must give the same
        # bytes on every machine names it the same everywhere.
        self.first_out = os.path.abspath(
            first_out or os.path.splitext(self.out)[0] + FIRST_PASS_SUFFIX
        )
        self.second_layout: Layout | None = None
        self.requests: list[dict[str, Any]] = []
        """The Layouts sent, in order (for provenance and tests)."""
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        self._pass_total = 0
        first = self.first_layout.to_dict()
        self.requests.append(first)
        self._current: Job = client.generate(first, self.first_out, model, options=options)
        self.id = self._current.id
        self._thread = threading.Thread(target=self._run, name="high-res fix", daemon=True)
        self._thread.start()

    # -- The Job interface ---------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop whichever pass runs; the final event is ``cancelled``."""
        self._cancelled.set()
        with self._lock:
            current = self._current
        current.cancel()

    # -- The two passes ------------------------------------------------------------------------

    def _forward(self, job: Job, number: int, offset: int, later: int) -> dict[str, Any]:
        """Pass ``job``'s progress on (steps counted over both passes); its final event."""
        for event in job:
            if event.get("event") not in PROGRESS_EVENTS:
                return event
            event = {**event, "id": self.id, "pass": number, "passes": 2}
            if event.get("event") == "progress":
                self._pass_total = int(event.get("total", 0))
                event["step"] = offset + int(event.get("step", 0))
                event["total"] = offset + self._pass_total + later
                event.pop("seconds_left", None)  # it would count one pass only
            self.events.put(event)
        return job.final or {"event": "error", "code": "internal", "message": "no final event"}

    def _run(self) -> None:
        self._finish_with(self._passes, "the high-res fix failed")

    def _passes(self) -> dict[str, Any]:
        first_path = self.first_out
        second = second_pass(self.layout, first_path, self.strength)
        first = self._forward(self._current, 1, 0, second.steps)
        if first.get("event") != "result":
            return {**first, "id": self.id}
        if self._cancelled.is_set():
            return {"id": self.id, "event": "cancelled"}
        first_path = first.get("path") or self.first_out
        second = second_pass(self.layout, first_path, self.strength)
        self.second_layout = second
        data = second.to_dict()
        self.requests.append(data)
        with self._lock:
            self._current = self.client.generate(data, self.out, self.model, options=self.options)
        if self._cancelled.is_set():
            self._current.cancel()
        # The first pass's steps as the engine counted them (a reference pass adds its own).
        done = self._pass_total or int(self.first_layout.steps)
        final = self._forward(self._current, 2, done, 0)
        if final.get("event") != "result":
            return {**final, "id": self.id}
        seconds = [e.get("seconds") for e in (first, final)]
        return {
            **final,
            "id": self.id,
            "seconds": sum(s for s in seconds if isinstance(s, int | float)),
            "high_res": {
                "first_pass": {
                    "width": first.get("width"),
                    "height": first.get("height"),
                    "path": first_path,
                    "seed": first.get("seed"),
                    "seconds": first.get("seconds"),
                },
                "strength": self.strength,
                "steps": second.steps,
            },
        }
