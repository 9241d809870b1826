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
    assert "3D View sidebar > Layout Diffusion > Conditions" in text
    text = explain_error(
        {"code": "bad_layout", "message": "not a PNG", "field": "layout.regions[1].image"}, layout
    )
    assert text == "Object 'blue_ball.001': not a PNG"
    assert explain_error({"code": "busy", "message": "wait"}, layout) is None


def test_engine_messages_name_the_addons_fields_not_the_engines_flags():
    from blender_addon.core.request import addon_words, explain_error

    unset = addon_words(
        "no depth ControlNet configured; start the engine with --controlnet or send "
        "options.controlnet with a request"
    )
    assert unset == (
        "no depth ControlNet configured; set Depth ControlNet under 3D View sidebar > "
        "Layout Diffusion > Conditions"
    )
    configs = (
        "m.safetensors is a single-file checkpoint; building it needs the component configs "
        "and tokenizers of R, which is not in the Hugging Face cache C. Pass --config with a "
        "diffusers folder of the same architecture, or get the configs"
    )
    text = explain_error({"code": "model_not_found", "message": configs, "field": "config"}, None)
    assert "--config" not in text
    assert "Set Model Config (3D View sidebar > Layout Diffusion) to a diffusers folder" in text
    text = explain_error(
        {"code": "model_not_found", "message": "config 'x' is not a folder", "field": "config"},
        None,
    )
    assert text == "Model Config: config 'x' is not a folder"
    pickle = explain_error(
        {
            "code": "unsafe_checkpoint",
            "message": "m.ckpt is a pickle checkpoint, which can run code when loaded. Use a "
            ".safetensors version of it, or pass --allow-pickle (request field allow_pickle) "
            "if you trust its source",
            "field": "model",
        },
        None,
    )
    assert pickle == (
        "m.ckpt is a pickle checkpoint, which can run code when loaded. Use a .safetensors "
        "version of it"
    )
    # Messages without flags are left to the caller's own wording.
    assert explain_error({"code": "model_not_found", "message": "no such folder"}, None) is None
