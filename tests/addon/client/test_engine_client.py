"""The add-on's engine client against a real ``python -m engine serve`` on the tiny model."""

from __future__ import annotations

import os
import struct
import sys
import time

import pytest
from blender_scenario import ROOT

from blender_addon.client.engine_client import (
    ENGINE_GONE,
    NOT_INSTALLED,
    EngineClient,
    EngineError,
)


def layout(steps: int = 2, size: int = 64) -> dict:
    return {
        "prompt": "a red circle and a blue square on grey",
        "width": size,
        "height": size,
        "steps": steps,
        "seed": 3,
        "regions": [
            {"prompt": "a red circle", "box": [0.0, 0.0, 0.5, 0.5], "name": "Circle"},
            {"prompt": "a blue square", "box": [0.5, 0.5, 1.0, 1.0], "name": "Square"},
        ],
    }


def png_size(path: str) -> tuple[int, int]:
    with open(path, "rb") as handle:
        header = handle.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


def generate_and_wait(
    client: EngineClient, layout: dict, out: str, model: str, timeout: float = 300
) -> tuple[dict, list[dict]]:
    """Generate, wait for the final event; (final event, the events before it). Raises
    EngineError for an error event, as the batch and the operators read it."""
    job = client.generate(layout, out, model)
    final = job.wait(timeout)
    events = [event for event in job.poll() if event is not final]
    if final["event"] == "error":
        raise EngineError(final["code"], final["message"])
    return final, events


@pytest.fixture(scope="module")
def client():
    """One warm engine for the module: starting one costs seconds (torch import)."""
    engine = EngineClient(sys.executable, cwd=ROOT)
    engine.start()
    yield engine
    engine.close()


def test_hello_reports_engine_and_model(client, tiny_model_dir):
    reply = client.hello(model=tiny_model_dir)
    assert reply["event"] == "hello"
    assert reply["protocol"] == 2
    assert reply["shares_files"] is True, "a local engine reads the probe file"
    assert reply["device"] == "cpu" and reply["dtype"] == "float32"
    assert "cancel" in reply["capabilities"]
    assert reply["model"]["found"] is True
    assert os.path.samefile(reply["model"]["path"], tiny_model_dir)

    missing = client.hello(model=os.path.join(ROOT, "no-such-model"))
    assert missing["model"]["found"] is False
    assert "no-such-model" in missing["model"]["message"]


def test_generate_reports_every_step_and_writes_the_image(client, tiny_model_dir, tmp_path):
    out = str(tmp_path / "out.png")
    result, events = generate_and_wait(client, layout(steps=3), out, tiny_model_dir)
    assert result["event"] == "result"
    assert (result["width"], result["height"], result["seed"]) == (64, 64, 3)
    assert png_size(out) == (64, 64)
    steps = [(e["step"], e["total"]) for e in events if e["event"] == "progress"]
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert {e["id"] for e in events} == {result["id"]}


def test_request_ids_are_unique(client):
    ids = {client.request("hello").id for _ in range(20)}
    assert len(ids) == 20


def test_engine_errors_raise_with_code_and_message(client, tiny_model_dir, tmp_path):
    bad = layout()
    bad["width"] = 65
    with pytest.raises(EngineError) as info:
        generate_and_wait(client, bad, str(tmp_path / "x.png"), tiny_model_dir, timeout=60)
    assert info.value.code == "bad_layout"
    assert "multiple of 8" in info.value.message

    with pytest.raises(EngineError) as info:
        generate_and_wait(
            client, layout(), str(tmp_path / "x.png"), str(tmp_path / "missing"), timeout=60
        )
    assert info.value.code == "model_not_found"
    assert "missing" in info.value.message
    assert client.alive, "an error answer must leave the engine running"


def test_cancel_stops_the_job_and_keeps_the_model(client, tiny_model_dir, tmp_path):
    job = client.generate(layout(steps=200), str(tmp_path / "long.png"), tiny_model_dir)
    seen = []
    for event in job:
        seen.append(event["event"])
        if event["event"] == "progress" and event["step"] == 1:
            job.cancel()
    assert seen[-1] == "cancelled"
    assert seen.count("progress") < 200
    assert not os.path.exists(tmp_path / "long.png")
    # The model stayed loaded: the next generate does not announce a load.
    result, events = generate_and_wait(
        client, layout(steps=1), str(tmp_path / "after.png"), tiny_model_dir
    )
    assert result["load_seconds"] == 0
    assert "loading" not in [e["event"] for e in events]


def test_wait_timeout_then_cancel_frees_the_engine(client, tiny_model_dir, tmp_path):
    job = client.generate(layout(steps=500), str(tmp_path / "t.png"), tiny_model_dir)
    with pytest.raises(TimeoutError):
        job.wait(0.5)
    job.cancel()
    assert job.wait(120)["event"] == "cancelled"
    # The cancel went through: the engine takes the next request.
    assert client.hello()["event"] == "hello"


def test_killed_engine_fails_the_job_and_restarts(client, tiny_model_dir, tmp_path):
    # Last user of the shared client: killing it mid-job is what a crash looks like.
    job = client.generate(layout(steps=500), str(tmp_path / "k.png"), tiny_model_dir)
    first_pid = client.pid
    deadline = time.monotonic() + 120
    while not any(e["event"] == "progress" for e in job.poll()):
        assert time.monotonic() < deadline, "no progress from the engine"
        time.sleep(0.05)
    client.kill()
    assert not client.alive
    # The next request starts a new process by itself, even while the dead one's reader is
    # still reporting the crash: only the dead process's jobs fail.
    assert client.hello()["event"] == "hello"
    assert client.alive and client.pid != first_pid
    final = job.wait(10)
    assert final["event"] == "error" and final["code"] == ENGINE_GONE
    assert "exit code -9" in final["message"] and "restarts" in final["message"]
    client.close()
    assert not client.alive


def test_crash_report_carries_the_stderr_tail():
    script = "import sys; print('boom: CUDA driver too old', file=sys.stderr); sys.exit(3)"
    engine = EngineClient(sys.executable, args=("-c", script))
    with pytest.raises(EngineError) as info:
        engine.hello(timeout=30)
    assert info.value.code == ENGINE_GONE
    assert "exit code 3" in info.value.message
    assert "boom: CUDA driver too old" in info.value.message
    assert "boom" in engine.stderr_tail()


def test_missing_interpreter_says_how_to_install(tmp_path):
    engine = EngineClient(str(tmp_path / "bin" / "python"))
    with pytest.raises(EngineError) as info:
        engine.start()
    assert info.value.code == NOT_INSTALLED
    assert "Set up engine" in info.value.message


def test_interpreter_without_engine_says_how_to_install(tmp_path):
    # -I -S: no site-packages and no current folder on sys.path, so ``engine`` cannot import.
    engine = EngineClient(sys.executable, args=("-I", "-S", "-m", "engine", "serve"), cwd=tmp_path)
    with pytest.raises(EngineError) as info:
        engine.hello(timeout=30)
    assert info.value.code == NOT_INSTALLED
    assert "Preferences > Add-ons > Layout Diffusion" in info.value.message
