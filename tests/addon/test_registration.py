"""Registering the add-on: importing it needs no bpy, register/unregister leave nothing behind."""

from __future__ import annotations

import subprocess
import sys

import addon_ui_scenarios
from blender_scenario import ROOT

# Fixtures: one scenario run checked by several test files.
registration = addon_ui_scenarios.registration


def test_importing_the_package_does_not_import_bpy():
    code = (
        "import sys; import blender_addon, blender_addon.client.engine_client, "
        "blender_addon.client.engine_session; print('bpy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr


def test_addon_registers_and_unregisters_cleanly(registration):
    assert registration["registered"] == {
        "scene_props": True,
        "object_props": True,
        "generate": True,
        "panel": True,
        "prefs": True,
        "load_handlers": ["_forget_layouts"],
    }
    assert registration["unregistered"] == {
        "scene_props": False,
        "object_props": False,
        "load_handlers": [],
    }
    assert registration["reregistered"] is True
