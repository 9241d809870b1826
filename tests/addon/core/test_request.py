"""The request's pure parts: the engine's errors in the artist's words."""

from __future__ import annotations


def test_engine_errors_about_conditions_name_the_setting_and_the_object():
    from blender_addon.core.request import explain_error

    layout = {"regions": [{"name": "red_box"}, {"name": "blue_ball.001"}]}
    text = explain_error(
        {"code": "model_not_found", "message": "ControlNet 'x' not found", "field": "controlnet"},
        layout,
    )
    assert text.startswith("Depth ControlNet is not available: ControlNet 'x' not found.")
    assert "3D View sidebar > Layout > Conditions" in text
    text = explain_error(
        {"code": "bad_layout", "message": "not a PNG", "field": "layout.regions[1].image"}, layout
    )
    assert text == "Object 'blue_ball.001': not a PNG"
    assert explain_error({"code": "busy", "message": "wait"}, layout) is None
