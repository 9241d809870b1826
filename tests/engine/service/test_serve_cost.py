"""``hello``'s ``cost``: the native size and the seconds per step, before and after a run."""

from __future__ import annotations

import time

import pytest
from serve_client import EngineClient

from engine.wire.cost import estimate_seconds


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    logs = tmp_path_factory.mktemp("serve-logs")
    client = EngineClient("--device", "cpu", stderr_path=logs / "stderr.log")
    yield client
    client.close()


def test_cost_before_and_after_a_generation(engine, tiny_model_dir, tmp_path):
    hello = {"op": "hello", "model": tiny_model_dir, "cost": True}
    before = engine.request({**hello, "id": "c1"}, timeout=180)["cost"]
    assert before["available"] is True and before["spec"] == tiny_model_dir
    # The tiny UNet samples 32 latent pixels, its two-level VAE scales by 2.
    assert (before["native_size"], before["latent_factor"]) == (64, 2)
    assert before["source"] == "device_speed"
    assert before["step_seconds"] > 0
    big, small = (estimate_seconds(before, side, side, 10) for side in (256, 64))
    assert big > 10 * small  # 16x the pixels, attention growing faster still
    # A health check with cost must not load the model.
    assert engine.request({**hello, "id": "c2"})["loaded_model"] is None

    steps = 6
    layout = {"prompt": "a red circle", "width": 128, "height": 128, "steps": steps, "seed": 1}
    out = str(tmp_path / "out.png")
    engine.send(
        {"op": "generate", "id": "g", "model": tiny_model_dir, "layout": layout, "out": out}
    )
    result = engine.until("g", {"result", "error"})[-1]
    assert result["event"] == "result", result

    after = engine.request({**hello, "id": "c3"})["cost"]
    assert after["source"] == "measured"
    assert after["seconds_per_flop"] != before["seconds_per_flop"]
    # The measured rate predicts the run it was measured on: the steps' share of its seconds.
    predicted = estimate_seconds(after, 128, 128, steps)
    assert 0.2 * result["seconds"] < predicted < 2.0 * result["seconds"]


def test_cost_of_a_missing_model_says_why(engine, tmp_path):
    missing = str(tmp_path / "nowhere")
    reply = engine.request({"op": "hello", "id": "m", "model": missing, "cost": True})
    assert reply["cost"]["available"] is False
    assert missing in reply["cost"]["message"]
    assert "cost" not in engine.request({"op": "hello", "id": "n"})


def test_a_cancel_after_a_cost_request_is_answered_at_once(tiny_model_dir, tmp_path):
    """Counting a new model's operations takes seconds; it must not hold up the cancel read
    after it. A fresh engine generates with the tiny model (counted before its first step)
    and is asked the cost of the shipped shapes model, not counted yet."""
    engine = EngineClient("--device", "cpu", stderr_path=tmp_path / "stderr.log")
    try:
        assert engine.request({"op": "hello", "id": "h"}, timeout=180)["event"] == "hello"
        layout = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 500, "seed": 1}
        out = str(tmp_path / "out.png")
        engine.send(
            {"op": "generate", "id": "g", "model": tiny_model_dir, "layout": layout, "out": out}
        )
        engine.until("g", {"progress"}, timeout=180)
        engine.send({"op": "hello", "id": "c", "model": "shapes", "cost": True})
        sent = time.monotonic()
        engine.send({"op": "cancel", "id": "x", "target": "g"})
        ack = engine.until("x", {"ack"}, timeout=60)[-1]
        waited = time.monotonic() - sent
        assert ack["found"] is True
        assert waited < 1.0, f"the cancel waited {waited:.1f} s"
        assert engine.until("g", {"cancelled", "result", "error"})[-1]["event"] == "cancelled"
        # The cost reply comes after the cancel's, and still comes.
        order = [m.get("id") for m in engine.seen]
        hello = engine.until("c", {"hello"}, timeout=180)[-1]
        assert hello["cost"]["available"] is True and hello["cost"]["native_size"] == 640
        assert "c" not in order[: order.index("x")], "the cost reply did not hold up the cancel"
    finally:
        engine.close()
