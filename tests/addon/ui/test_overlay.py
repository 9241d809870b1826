"""The camera-view overlay of the last Layout's boxes."""

from __future__ import annotations

import addon_ui_scenarios

# Fixtures: one scenario run checked by several test files.
registration = addon_ui_scenarios.registration


def test_overlay_maps_boxes_through_the_camera_frame(registration):
    # Camera frame from (100, 50) to (300, 250) in region pixels (y up, as Blender's regions).
    assert registration["overlay"]["center"] == [200.0, 150.0]
    assert registration["overlay"]["outline"] == [
        [100.0, 250.0],
        [200.0, 250.0],
        [200.0, 150.0],
        [100.0, 150.0],
    ]
