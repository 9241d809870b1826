"""Where a scene's files go, and model settings as the engine reads them."""

from __future__ import annotations

import addon_ui_scenarios

# Fixtures: one scenario run checked by several test files.
registration = addon_ui_scenarios.registration


def test_blend_relative_model_paths_become_absolute(registration):
    spec, expected = registration["model_spec"]
    assert spec == expected


def test_outputs_go_next_to_the_blend_file_or_to_the_users_own_temp_folder(registration):
    unsaved, saved, expected_unsaved, expected_saved = registration["output_dirs"]
    assert (unsaved, saved) == (expected_unsaved, expected_saved)
    # An unsaved file's outputs are readable by their user alone.
    assert registration["private_temp_mode"] == 0o700


def test_render_files_go_under_the_output_path(registration):
    # "//" before the file is saved resolves into the user's private folder.
    found, expected = registration["render_dirs"]
    assert found == expected
