"""``hello``'s ``cost``: the native size and the seconds per step, before and after a run."""

from __future__ import annotations

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
