"""Where the add-on's settings are shown, in the words messages use to send the artist there.

The panels take their titles from here too, so a message never names a panel that is called
something else.
"""

from __future__ import annotations

SIDEBAR_TAB = "Layout Diffusion"
"""The 3D View sidebar tab holding Generate and the scene's settings."""
OBJECT_PANEL = "Proxy Label"
"""The Object properties panel holding an object's label."""

PROMPT = "Prompt"
IMAGE = "Image"
REGIONS = "Regions"
GUIDANCE = "Guidance"
CONDITIONS = "Conditions"
OUTPUT = "Output"
SIDEBAR_PANELS = (PROMPT, IMAGE, REGIONS, GUIDANCE, CONDITIONS, OUTPUT)
"""The sidebar's sub-panels, top to bottom."""


def sidebar(panel: str | None = None) -> str:
    """The path to the sidebar tab, or to one of its sub-panels: ``"3D View sidebar > Layout
    Diffusion > Conditions"``."""
    path = f"3D View sidebar > {SIDEBAR_TAB}"
    return f"{path} > {panel}" if panel else path


def object_panel(field: str | None = None) -> str:
    """The path to the object's label panel, or to one field of it."""
    path = f"Object properties > {OBJECT_PANEL}"
    return f"{path} > {field}" if field else path
