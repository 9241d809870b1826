"""The Image panel says the model's native size, the size generated at and the estimate, and
Generate runs the high-res fix far above the native size (real bpy, real engine)."""

from __future__ import annotations

import addon_cost_scenarios

cost_scenario = addon_cost_scenarios.cost_scenario


def test_panel_offers_an_estimate_then_shows_native_size_and_cost(cost_scenario):
    assert cost_scenario["errors"] == []
    before = cost_scenario["before"]
    assert "layout_diffusion.estimate_cost" in before["operators"]
    assert "1920 x 1080 px (Output properties)" in before["labels"]
    assert cost_scenario["task"] == {"error": None, "native": 64}

    on = cost_scenario["fix_on"]
    assert "Native 64 x 64, generating 1920 x 1080" in on["labels"]
    assert {"use_high_res_fix", "high_res_strength"} <= set(on["props"])
    estimate = [label for label in on["labels"] if " with High-res Fix" in label]
    assert len(estimate) == 1 and estimate[0].startswith("At least ")
    assert estimate[0].endswith(": lower the resolution for a quicker image")
    assert any(
        label.startswith("128 x 72, then 1920 x 1080 at strength 0.40") for label in on["labels"]
    )
    # Hours on the CPU: the main panel says so before anything runs.
    assert estimate[0] in cost_scenario["main"]["labels"]

    off = cost_scenario["fix_off"]
    assert any(
        label.startswith("At least ") and "turn on High-res Fix or lower the resolution" in label
        for label in off["labels"]
    )


def test_panel_shows_size_changes(cost_scenario):
    assert "Rounded 100 x 60 to 104 x 64 (multiples of 8)" in cost_scenario["rounded"]["labels"]
    scaled = cost_scenario["scaled"]["labels"]
    assert "Scaled 8192 x 2048 to 4096 x 1024 to fit the engine's limits" in scaled
    assert "4096 x 1024 px (Output properties)" in scaled


def test_generate_far_above_native_runs_the_high_res_fix(cost_scenario):
    run = cost_scenario["generate"]
    assert run["result"] == ["FINISHED"] and run["kind"] == "HighResJob"
    assert run["sizes"] == [[120, 72], [160, 96]]
    assert run["init"] == [None, run["first_out"]] and run["strength"] == [1.0, 0.5]
    assert run["regions_same"]
    assert run["final"] == {"event": "result", "width": 160, "height": 96}
    assert run["image"] == [160, 96]
    assert "Native 64 x 64, generating 160 x 96" in run["reports"]
