"""The stored settings (Scene and Object ``layout_diffusion``): defaults and the prompt from the
name.
"""

from __future__ import annotations

import addon_guidance_scenarios
import addon_ui_scenarios

from engine.loading.defaults import SDXL_DEFAULTS

# Fixtures: one scenario run checked by several test files.
guidance = addon_guidance_scenarios.guidance
registration = addon_ui_scenarios.registration


def test_scene_settings_defaults(registration):
    assert registration["scene_defaults"] == {
        "prompt": "",
        "negative_prompt": "",
        "background_prompt": "",
        "base_ratio": 0.2,
        "model": "shapes",
        "seed": 0,
        "steps": 30,
        "guidance_scale": 6.0,
        "show_overlay": True,
        "use_as_camera_background": False,
    }


def test_object_prompt_defaults_to_readable_name(registration):
    assert registration["prompts"] == {
        "default": "golden retriever",
        "after_rename": "red vintage car",
        "typed": "a dog on a sofa",
        "after_rename_when_typed": "a dog on a sofa",
        "cleared": "red vintage car",
        "weight": 1.0,
        "enabled": False,
    }
    assert registration["readable"] == {
        "golden_retriever.001": "golden retriever",
        "RedVintageCar": "red vintage car",
        "tree-big.002": "tree big",
    }


def test_new_settings_default_to_the_layout_defaults(guidance):
    from blender_addon.wire.layout import Layout, Region

    layout, region = Layout(prompt=""), Region(prompt="", box=(0, 0, 1, 1))
    assert guidance["defaults"] == {
        "scene": {
            "mode": layout.mode.upper(),
            "use_reference": False,
            "reference_source": "PROXIES",
            # Left to the model, as a Layout leaves it; the manual value starts at SDXL's.
            "use_model_fraction": layout.reference_fraction is None,
            "reference_fraction": SDXL_DEFAULTS["reference_fraction"],
            "init_source": "NONE",
            "strength": layout.strength,
            "controlnet": "",
            "depth_scale": layout.depth_scale,
            "depth_start": layout.depth_start,
            "depth_end": layout.depth_end,
            "ip_adapter": "",
            "regenerate_seed": "NEXT",
            "result_seed": -1,
        },
        "object": {
            "strength": 1.0,
            "reference_image": None,
            "reference_image_scale": region.image_scale,
            "use_depth_scale": False,
        },
    }
