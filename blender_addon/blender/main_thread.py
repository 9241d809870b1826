"""Work a render thread hands to Blender's main thread.

An interactive F12 or Ctrl-F12 renders in a worker thread while the main thread keeps the UI
running. Some steps of a frame may only run on the main thread: the object-id render behind the
masks, the depth map and the proxy render is a nested render, which Blender starts from the main
thread only, and reading an image through a datablock creates one. :func:`call` queues such a
step and waits; a timer registered with the add-on runs it on the main thread, between UI
events. In background renders (``blender -b``) the render itself runs on the main thread and
:func:`call` runs the step at once.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import bpy

T = TypeVar("T")

INTERVAL = 0.05
"""Seconds between the timer's looks at the queue."""
START_TIMEOUT = 30.0
"""Seconds a step may wait for the main thread to take it before the render gives up on it."""


class Cancelled(Exception):
    """Esc was pressed before the main thread took the step."""


class MainThreadBusy(RuntimeError):
    """The main thread did not take the step in time (blocked by another long task)."""


class _Job:
    def __init__(self, fn: Callable[[], object]):
        self.fn = fn
        self.lock = threading.Lock()
        self.state = "waiting"  # then "running", or "dropped" when the caller gave up
        self.done = threading.Event()
        self.result: object = None
        self.error: BaseException | None = None


_jobs: queue.Queue[_Job] = queue.Queue()


def on_main_thread() -> bool:
    """Whether the caller runs on Blender's main thread."""
    return threading.current_thread() is threading.main_thread()


def call(
    fn: Callable[[], T],
    test_break: Callable[[], bool] = lambda: False,
    timeout: float = START_TIMEOUT,
) -> T:
    """``fn()`` run on the main thread; its result, or its exception raised here.

    Called on the main thread, runs ``fn`` at once. Otherwise waits for the timer to run it,
    raising Cancelled when ``test_break()`` turns true, or MainThreadBusy after ``timeout``
    seconds, before the main thread took it (once taken, the step runs to its end).
    """
    if on_main_thread():
        return fn()
    job = _Job(fn)
    _jobs.put(job)
    deadline = time.monotonic() + timeout
    while not job.done.wait(INTERVAL):
        with job.lock:
            if job.state != "waiting":
                continue
            if test_break():
                job.state = "dropped"
                raise Cancelled
            if time.monotonic() > deadline:
                job.state = "dropped"
                raise MainThreadBusy(f"Blender's main thread did not answer within {timeout:.0f} s")
    if job.error is not None:
        raise job.error
    return job.result  # type: ignore[return-value]


def pump() -> float:
    """Run every queued step (main thread only); the seconds until the next look.

    The add-on's timer calls this; a script that keeps the main thread busy while a render
    runs in another thread calls it itself.
    """
    while True:
        try:
            job = _jobs.get_nowait()
        except queue.Empty:
            return INTERVAL
        with job.lock:
            if job.state != "waiting":
                continue
            job.state = "running"
        try:
            job.result = job.fn()
        except BaseException as exc:  # handed to the waiting thread, which raises it
            job.error = exc
        finally:
            job.done.set()


def register() -> None:
    if not bpy.app.timers.is_registered(pump):
        bpy.app.timers.register(pump, first_interval=INTERVAL, persistent=True)


def unregister() -> None:
    if bpy.app.timers.is_registered(pump):
        bpy.app.timers.unregister(pump)
