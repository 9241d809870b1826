"""A generation that learns the model's cost off the UI thread: it is created at once, waits for
the engine's reply on its own thread when the native size is unknown, and passes the reply on
as a ``cost`` event (engine requests are stand-ins fed by hand)."""

from __future__ import annotations

import threading
import time

import pytest

from blender_addon.client import cost
from blender_addon.client.cost_first import COST_EVENT, CostFirstJob
from blender_addon.client.engine_client import EngineError, Job

SHAPES = {
    "available": True,
    "native_size": 64,
    "latent_factor": 4,
    "unet_flops": [6.4e7, 2.34e6, 880.0],
    "vae_flops": [0.0, 2.0e6, 256.0],
    "seconds_per_flop": 3e-11,
    "source": "measured",
}


class Client:
    """Records cancels; sent jobs are answered by the test."""

    def __init__(self):
        self.cancelled: list[str] = []
        self.protocol = None

    def cancel(self, target: str) -> None:
        self.cancelled.append(target)


@pytest.fixture(autouse=True)
def no_known_cost():
    cost.forget()
    yield
    cost.forget()


def starter(client: Client):
    """A start function that records the native size it got and returns a job to feed."""
    started: list[tuple[int | None, Job]] = []

    def start(native):
        job = Job(client, f"g{len(started)}", "generate")  # type: ignore[arg-type]
        started.append((native, job))
        return job

    return start, started


def hello(cost_reply=SHAPES) -> dict:
    return {"event": "hello", "protocol": 2, "cost": cost_reply}


def test_without_a_known_cost_it_returns_at_once_and_starts_after_the_reply():
    client = Client()
    asked = Job(client, "h1", "hello")  # type: ignore[arg-type]
    start, started = starter(client)
    began = time.monotonic()
    job = CostFirstJob(client, asked, "shapes", start, wait_seconds=30.0)  # type: ignore[arg-type]
    assert time.monotonic() - began < 0.5, "nothing waits for the engine here"
    time.sleep(0.3)
    assert started == [] and not job.done, "the generation waits for the native size"

    asked._deliver(hello())
    deadline = time.monotonic() + 5
    while not started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [native for native, _ in started] == [64], "sent with the native size of the reply"
    assert cost.native_size("shapes") == 64 and client.protocol == 2
    inner = started[0][1]
    inner._deliver({"id": "g0", "event": "progress", "step": 1, "total": 2})
    inner._deliver({"id": "g0", "event": "result", "path": "/x.png"})
    final = job.wait(5)
    events = list(job.poll())
    kinds = [e["event"] for e in events]
    assert kinds == [COST_EVENT, "progress", "result"]
    assert events[0]["cost"] == SHAPES
    assert final["event"] == "result" and final["path"] == "/x.png" and events[-1] is final


def test_a_known_native_size_sends_at_once_and_the_reply_refreshes_the_cost():
    cost.remember("shapes", {**SHAPES, "source": "device_speed"})
    client = Client()
    asked = Job(client, "h1", "hello")  # type: ignore[arg-type]
    start, started = starter(client)
    job = CostFirstJob(client, asked, "shapes", start, wait_seconds=30.0)  # type: ignore[arg-type]
    assert [native for native, _ in started] == [64] and job.inner is started[0][1]
    asked._deliver(hello())
    event = job.events.get(timeout=5)
    assert event["event"] == COST_EVENT and event["cost"]["source"] == "measured"
    started[0][1]._deliver({"id": "g0", "event": "result"})
    assert job.wait(5)["event"] == "result"


def test_cancel_before_the_reply_sends_nothing():
    client = Client()
    asked = Job(client, "h1", "hello")  # type: ignore[arg-type]
    start, started = starter(client)
    job = CostFirstJob(client, asked, "shapes", start, wait_seconds=30.0)  # type: ignore[arg-type]
    job.cancel()
    assert job.wait(5)["event"] == "cancelled"
    assert started == []


def test_cancel_reaches_the_running_generation():
    cost.remember("shapes", SHAPES)
    client = Client()
    asked = Job(client, "h1", "hello")  # type: ignore[arg-type]
    start, started = starter(client)
    job = CostFirstJob(client, asked, "shapes", start, wait_seconds=30.0)  # type: ignore[arg-type]
    job.cancel()
    assert client.cancelled == ["g0"]
    started[0][1]._deliver({"id": "g0", "event": "cancelled"})
    assert job.wait(5)["event"] == "cancelled"


def test_a_silent_engine_gets_the_request_without_the_fix_after_the_wait():
    client = Client()
    asked = Job(client, "h1", "hello")  # type: ignore[arg-type]
    start, started = starter(client)
    job = CostFirstJob(client, asked, "shapes", start, wait_seconds=0.3)  # type: ignore[arg-type]
    deadline = time.monotonic() + 5
    while not started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [native for native, _ in started] == [None]
    started[0][1]._deliver({"id": "g0", "event": "result"})
    assert job.wait(5)["event"] == "result"


def test_a_request_that_cannot_be_sent_ends_in_its_error():
    client = Client()
    asked = Job(client, "h1", "hello")  # type: ignore[arg-type]

    def start(native):
        raise EngineError("limit_exceeded", "too big to send")

    job = CostFirstJob(client, asked, "shapes", start, wait_seconds=30.0)  # type: ignore[arg-type]
    threading.Timer(0.1, asked._deliver, args=(hello(),)).start()
    final = job.wait(5)
    assert final["event"] == "error" and final["code"] == "limit_exceeded"
    assert "too big to send" in final["message"]
