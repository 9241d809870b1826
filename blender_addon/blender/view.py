"""Colour management that keeps a render's pixels the engine's.

The render engine puts the engine's sRGB image, linearized, into Combined; only the Standard
view transform on an sRGB display, with no look, exposure, gamma, curves or white balance, turns
it back into the same pixels on screen and in saved 8-bit files. Blender's default view (AgX,
Filmic before 4.0) changes them.
"""

from __future__ import annotations

NEUTRAL_VIEW = {
    "view_transform": "Standard",
    "look": "None",
    "exposure": 0.0,
    "gamma": 1.0,
    "use_curve_mapping": False,
    "use_white_balance": False,
}
"""View settings under which a render shows and saves the engine's pixels unchanged."""
NEUTRAL_DISPLAY = "sRGB"


def view_changes(scene) -> list[str]:
    """What in the scene's Color Management changes the engine's pixels, in the panel's words;
    empty when nothing does."""
    view = scene.view_settings
    changes = []
    if scene.display_settings.display_device != NEUTRAL_DISPLAY:
        changes.append(f"Display Device is {scene.display_settings.display_device!r}")
    labels = {
        "view_transform": "View Transform",
        "look": "Look",
        "exposure": "Exposure",
        "gamma": "Gamma",
        "use_curve_mapping": "Curves",
        "use_white_balance": "White Balance",
    }
    for name, neutral in NEUTRAL_VIEW.items():
        if not hasattr(view, name):
            continue  # White Balance exists from Blender 4.3 on
        value = getattr(view, name)
        differs = abs(value - neutral) > 1e-6 if isinstance(neutral, float) else value != neutral
        if differs:
            shown = "on" if value is True else repr(value) if isinstance(value, str) else value
            changes.append(f"{labels[name]} is {shown}")
    return changes


def use_standard_view(scene) -> None:
    """Set the scene's Color Management so renders show and save the engine's pixels."""
    scene.display_settings.display_device = NEUTRAL_DISPLAY
    view = scene.view_settings
    for name, value in NEUTRAL_VIEW.items():
        if hasattr(view, name):
            setattr(view, name, value)
