"""The panels draw with existing properties and operators, and grey out what the engine lacks."""

from __future__ import annotations

import addon_guidance_scenarios
import addon_ui_scenarios

# Fixtures: one scenario run checked by several test files.
guidance = addon_guidance_scenarios.guidance
registration = addon_ui_scenarios.registration


def test_panels_draw_with_existing_properties_and_operators(registration):
    drawn = registration["drawn"]
    assert drawn["errors"] == []
    # Idle: the Generate button; running: a progress bar with Cancel.
    assert "layout_diffusion.generate" in drawn["idle"]["operators"]
    assert "layout_diffusion.cancel" in drawn["running"]["operators"]
    assert drawn["running"]["progress"] == [[0.25, "Step 1/4"]]
    assert {"model", "model_config"} <= set(drawn["idle"]["props"])
    listed = [label for label in drawn["objects"]["labels"] if label in {"A", "B", "C"}]
    assert listed == ["B"]  # only B is still labeled
    assert drawn["header"] == ["layout_diffusion.generate"]
    assert {"python", "engine_command", "engine_source", "torch_build"} <= set(
        drawn["preferences"]["props"]
    )
    assert "layout_diffusion.setup_engine" in drawn["preferences"]["operators"]


def test_preferences_show_where_the_engine_comes_from_and_the_set_up_progress(registration):
    drawn = registration["drawn"]
    assert any(
        label.startswith("Installs the engine from ") for label in drawn["preferences"]["labels"]
    )
    running = drawn["setup_running"]
    assert running["progress"] == [[0.4, "3/6 Installing torch: 900 of 2500 MB"]]
    assert "Torch build: CUDA 12.6 (RTX, driver 550)" in running["labels"]
    assert "Downloading torch-2.8.0+cu126.whl" in running["labels"]
    assert "wm.path_open" in running["operators"]  # the full log, opened by Blender
    done = drawn["setup_done"]
    assert "Engine installed: torch 2.8.0+cu126, runs on CUDA (RTX)" in done["labels"]


def test_health_check_greys_out_what_the_engine_lacks(guidance):
    check = guidance["check"]
    assert check["controlnet"] == [True, "Depth ControlNet found: " + check["controlnet_path"]]
    assert check["ip_adapter"][0] is False
    assert check["ip_adapter"][1].startswith("IP-Adapter unavailable: IP-Adapter ")
    assert "Depth ControlNet: available" in check["report"]
    drawn = guidance["drawn"]
    assert drawn["errors"] == []
    assert {"controlnet", "depth_scale", "ip_adapter"} <= set(drawn["conditions"]["props"])
    assert check["ip_adapter"][1] in drawn["conditions"]["labels"]
    assert "layout_diffusion.check_engine" in drawn["conditions"]["operators"]
    assert {"use_reference", "reference_scale", "init_source", "init_image"} <= set(
        drawn["guidance"]["props"]
    )
    assert {"mode", "base_ratio", "regenerate_seed"} <= set(drawn["regions"]["props"])
    # The engine's cost: (R + 3) / 2 with the default base_ratio.
    assert "Up to 2.5x the time of Attention (2 prompts)" in drawn["regions"]["labels"]
    assert (
        "Latent mode, proxy pull, init image, depth, 1 reference image" in drawn["main"]["labels"]
    )
    assert {"strength", "reference_image", "reference_image_scale", "depth_scale"} <= set(
        drawn["object"]["props"]
    )
    assert "layout_diffusion.regenerate_object" in drawn["object"]["operators"]
    assert drawn["context_menu"] == ["layout_diffusion.regenerate_object"]
    assert drawn["context_menu_unlabeled"] == []
