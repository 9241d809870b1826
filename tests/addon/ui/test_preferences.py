"""The add-on's preferences: the engine interpreter and Set up engine."""

from __future__ import annotations

import os

import addon_ui_scenarios
from blender_scenario import ROOT

# Fixtures: one scenario run checked by several test files.
registration = addon_ui_scenarios.registration


def test_preferences_default_to_checkout_venv(registration):
    assert registration["prefs_python"] == os.path.join(ROOT, ".venv", "bin", "python")
    # Empty: the engine shipped with the add-on (here the checkout) is installed.
    assert registration["prefs_source"] == ""


def test_set_up_engine_refuses_without_online_access(registration):
    assert registration["online_access"] is False
    assert "allow Online Access in Preferences > System > Network" in registration["setup_offline"]
