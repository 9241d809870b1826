"""The operators end to end with the real engine on the tiny model: Generate (blocking and modal),
Cancel, labels, Re-generate Object, and the reports the artist can act on.
"""

from __future__ import annotations

import os

import addon_guidance_scenarios
import addon_ui_scenarios
import numpy as np
import pytest

# Fixtures: one scenario run checked by several test files.
guidance = addon_guidance_scenarios.guidance
regenerated = addon_guidance_scenarios.regenerated
generation = addon_ui_scenarios.generation
registration = addon_ui_scenarios.registration


def test_label_and_unlabel_selected(registration):
    assert registration["labels"] == {
        "after_label": ["A", "B"],
        "after_unlabel": ["B"],
        "label_undo": True,
    }


def test_engine_failures_read_as_actions(registration):
    reports = registration["finish_reports"]
    assert reports["out_of_memory"] == {
        "result": ["CANCELLED"],
        "reports": [
            "The device ran out of memory at 2048x2048. (lower the render resolution, or press "
            "Check engine to see the device)"
        ],
    }
    assert reports["crashed"]["reports"] == [
        "The engine stopped unexpectedly (exit code 1); it restarts when you press Generate "
        "again. Cause: RuntimeError: CUDA driver version is insufficient"
    ]


def test_generate_sends_one_region_per_labeled_object(generation):
    first = generation["first"]
    assert first["result"] == ["FINISHED"]
    assert first["layout"]["size"] == [96, 64]
    assert first["layout"]["prompt"] == "two boxes on a table"
    assert first["layout"]["base_ratio"] == 0.2
    regions = first["layout"]["regions"]
    assert [(r["name"], r["prompt"]) for r in regions] == [
        ("red_box", "red box"),
        ("blue_ball.001", "a blue ball"),
    ]
    # The left cube's box lies in the left half, the right one's in the right half.
    assert regions[0]["box"][2] < 0.5 < regions[1]["box"][0]
    assert all(os.path.isabs(r["mask"]) for r in regions)
    assert first["overlay"] == ["red_box", "blue_ball.001"]
    assert first["overlay_reloaded"] == ["red_box", "blue_ball.001"]


def test_result_image_has_render_size_and_is_reused(generation):
    assert generation["first"]["image"] == [96, 64]
    assert generation["result_images"] == 1
    assert generation["camera_background"] is True


def test_warm_engine_is_reused_between_clicks(generation):
    assert generation["second"]["pid"] == generation["first"]["pid"]


def test_crashed_engine_reports_and_restarts_on_next_click(generation):
    crash = generation["crash"]
    assert "engine stopped unexpectedly" in crash["error"]
    assert "press Generate again" in crash["error"]
    assert crash["next_result"] == ["FINISHED"]
    assert crash["next_pid"] != crash["killed_pid"]


def test_modal_operator_shows_progress_and_finishes(generation):
    log = generation["modal"]["finished"]
    assert log["mouse"] == ["PASS_THROUGH"], "other events must reach Blender while generating"
    assert log["result"] == ["FINISHED"]
    assert log["progress"][-1] == 100 and log["progress"] == sorted(log["progress"])
    assert "Layout Diffusion: Step 3/3 (Esc to cancel)" in log["status"]
    assert log["status"][-1] is None, "the status bar text must be cleared"
    assert log["timer_removed"] and not log["running_after"]
    assert log["reports"][0][0] == "INFO" and log["reports"][0][1].startswith("Generated 96x64")


@pytest.mark.parametrize("how", ["esc", "button"])
def test_modal_operator_cancels_and_keeps_the_engine(generation, how):
    log = generation["modal"][how]
    expected = ["RUNNING_MODAL"] if how == "esc" else ["FINISHED"]
    assert log["cancel"] == expected
    assert log["result"] == ["CANCELLED"]
    assert log["steps_seen"] < 200
    assert any("Cancelling" in (text or "") for text in log["status"])
    assert log["reports"] == [["INFO", "Generation cancelled"]]
    assert not log["running_after"]
    assert generation["engine_alive_after_cancel"] is True


def test_errors_the_artist_can_act_on(generation):
    errors = generation["errors"]
    assert "camera" in errors["no_camera"].lower()
    assert "Label Selected" in errors["no_labels"]
    assert "No labeled object is visible from camera 'Camera'" in errors["not_visible"]
    assert "'red_box' outside the frame" in errors["not_visible"]
    assert "'blue_ball.001' outside the frame" in errors["not_visible"]
    assert "Set up engine" in errors["not_installed"]
    assert "not found" in errors["model_missing"]


def test_guided_generation_runs_with_every_condition(guidance):
    result = guidance["result"]
    assert result["operator"] == ["FINISHED"], result["reports"]
    conditions = result["conditions"]
    assert conditions["controlnet"]["scale"] == 0.8
    assert conditions["controlnet"]["region_scales"] == [None, 0.4]
    assert conditions["ip_adapter"]["images"] == 1


def test_a_condition_the_engine_did_not_apply_is_reported(guidance):
    assert guidance["unused_depth_reports"] == [
        ["INFO", "Generated 96x64, seed 3"],
        [
            "WARNING",
            "The depth ControlNet did not act: every depth scale is 0 or no object's depth was "
            "rendered",
        ],
    ]


def test_unavailable_conditions_read_as_actions(guidance):
    errors = guidance["errors"]
    assert errors["no_ip_adapter"] == (
        "'red_box' has a reference image, but no IP-Adapter is set to apply it: set IP-Adapter "
        "under 3D View sidebar > Layout Diffusion > Conditions, or clear the reference image "
        "(Object properties > Proxy Label)"
    )
    assert errors["missing_controlnet"].startswith("Depth ControlNet is not available: ")
    assert "no-such-controlnet" in errors["missing_controlnet"]
    assert "clear it to generate without it" in errors["missing_controlnet"]
    assert errors["missing_ip_adapter"].startswith("IP-Adapter is not available: ")
    assert "Depth End (0.20) must be after Depth Start (0.50)" in errors["depth_order"]
    assert "there is no result yet" in errors["init_without_result"]
    assert "no image is chosen" in errors["init_without_image"]


def test_regenerate_sends_one_free_object_over_the_last_result(regenerated):
    first = regenerated["first"]
    assert first["operator"] == ["FINISHED"] and first["result_seed"] == 5
    # By default the model chooses how long the proxy render pulls.
    assert regenerated["first_fraction"] is None
    sent = regenerated["sent"]
    assert os.path.basename(sent["init_image"]) == "previous.png"
    assert (sent["strength"], sent["keep_outside"], sent["seed"]) == (0.0, True, 6)
    assert [(r["name"], r["strength"]) for r in sent["regions"]] == [
        ("red_box", 1.0),
        ("blue_ball", None),
    ]
    assert regenerated["operator"] == ["FINISHED"]
    assert regenerated["reports"][0] == ["INFO", "Re-generating 'red_box' with seed 6"]
    assert regenerated["reports"][-1][1].startswith("Re-generated 'red_box' 96x64")
    assert regenerated["result_seed"] == 6 and regenerated["next_seed"] == 7
    assert regenerated["result_images"] == 1, "the result replaces the image, no copy"
    assert regenerated["image_is_new_result"] is True


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """``mask`` grown by ``pixels`` in every direction (a square neighbourhood)."""
    grown = mask.copy()
    for _ in range(pixels):
        padded = np.pad(grown, 1)
        grown = np.zeros_like(grown)
        for dy in range(3):
            for dx in range(3):
                grown |= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return grown


def test_regenerate_keeps_every_pixel_outside_the_object(regenerated):
    sent = regenerated["sent"]
    before = addon_guidance_scenarios.read_rgb(sent["init_image"])
    after = addon_guidance_scenarios.read_rgb(regenerated["result_path"])
    red = next(r for r in sent["regions"] if r["name"] == "red_box")
    mask = addon_guidance_scenarios.read_rgb(red["mask"])[..., 0] > 0
    # The composite's feathered band reaches 2 * vae_scale_factor pixels past the mask: 4 here.
    near = dilate(mask, 4)
    assert (after[~near] == before[~near]).all()
    assert (after[mask] != before[mask]).any(), "the object itself must change"


def test_regenerate_refusals_say_what_to_do(regenerated):
    errors = regenerated["errors"]
    assert errors["before_any_result"] == (
        "There is no result to re-generate an object in: press Generate from Camera first"
    )
    assert "is not a labeled object" in errors["unlabeled"]
    assert errors["size_changed"] == (
        "The last result is 96x64 but the render size now gives 128x64: generate the whole "
        "image again at this size first"
    )
