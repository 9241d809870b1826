"""The Layout wire schema: validation errors are specific, round trips are lossless."""

from __future__ import annotations

import json
import math

import pytest

from engine.loading.defaults import SDXL_DEFAULTS, with_model_defaults
from engine.wire.layout import Layout, LayoutError
from engine.wire.phrases import strip_phrases


def base(**overrides):
    data = {
        "version": 1,
        "width": 512,
        "height": 384,
        "prompt": "a street",
        "regions": [{"prompt": "a red car", "box": [0.1, 0.5, 0.4, 0.9]}],
    }
    data.update(overrides)
    return data


def test_minimal_layout_gets_defaults():
    layout = Layout.from_dict({"prompt": "a field"})
    assert (layout.width, layout.height, layout.steps, layout.mode) == (1024, 1024, 30, "attention")
    assert layout.regions == []


@pytest.mark.parametrize(
    "box, message",
    [
        ([0.1, 0.1, float("nan"), 0.5], "finite"),
        ([0.3, 0.3, 0.3, 0.6], "no area"),
        ([1.2, 0.1, 1.5, 0.4], "entirely outside"),
        ([0.1, 0.2, 0.3], "x0, y0, x1, y1"),
        (["a", 0, 1, 1], "finite"),
    ],
)
def test_bad_boxes_are_rejected_with_the_field(box, message):
    with pytest.raises(LayoutError, match=message) as info:
        Layout.from_dict(base(regions=[{"prompt": "x", "box": box}]))
    assert info.value.field == "regions[0].box"


def test_box_sticking_out_is_clipped():
    layout = Layout.from_dict(base(regions=[{"prompt": "x", "box": [-0.2, 0.5, 0.5, 1.3]}]))
    assert layout.regions[0].box == (0.0, 0.5, 0.5, 1.0)


@pytest.mark.parametrize("width, height", [(2049, 512), (512, 17), (8192, 512), (0, 512)])
def test_bad_sizes_are_rejected(width, height):
    with pytest.raises(LayoutError, match="width|height"):
        Layout.from_dict(base(width=width, height=height))


def test_nan_in_json_text_is_rejected():
    text = json.dumps(base()).replace('"seed": 0', '"seed": NaN')
    text = text.replace("}", ', "guidance_scale": NaN}', 1) if "NaN" not in text else text
    with pytest.raises(LayoutError, match="finite"):
        Layout.from_json(text)


def test_unknown_field_is_named():
    with pytest.raises(LayoutError, match="seeds"):
        Layout.from_dict(base(seeds=3))


def test_newer_version_asks_for_an_update():
    with pytest.raises(LayoutError, match="update the engine"):
        Layout.from_dict(base(version=2))


def test_relative_mask_needs_a_folder(tmp_path):
    data = base(regions=[{"prompt": "x", "box": [0, 0, 1, 1], "mask": "m.png"}])
    with pytest.raises(LayoutError, match="relative"):
        Layout.from_dict(data)
    layout = Layout.from_dict(data, base_dir=str(tmp_path))
    assert layout.regions[0].mask == str(tmp_path / "m.png")


def test_save_and_load_round_trip(tmp_path):
    data = base(
        regions=[{"prompt": "x", "box": [0, 0, 0.5, 1], "mask": "masks/a.png", "name": "Cube"}],
        depth="depth.png",
    )
    layout = Layout.from_dict(data, base_dir=str(tmp_path))
    layout.save(tmp_path / "layout.json")
    stored = json.loads((tmp_path / "layout.json").read_text())
    assert stored["regions"][0]["mask"] == "masks/a.png"
    assert stored["depth"] == "depth.png"
    assert Layout.load(tmp_path / "layout.json") == layout
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "prompt, phrases, expected",
    [
        ("a red circle and a blue square on grey", ["a red circle", "a blue square"], "on grey"),
        (
            "a city street at dusk with a red vintage car, photo",
            ["a red vintage car"],
            "a city street at dusk, photo",
        ),
        ("photo of a dog, a cat and a bird", ["A Cat"], "photo of a dog and a bird"),
        ("a red circle and a blue square", ["a red circle", "a blue square"], ""),
        ("a catalogue of cats", ["a cat"], "a catalogue of cats"),
    ],
)
def test_strip_phrases(prompt, phrases, expected):
    assert strip_phrases(prompt, phrases) == expected


def test_background_prompt_defaults_to_scene_without_regions():
    layout = Layout.from_dict(base(prompt="a street with a red car, dusk"))
    assert layout.effective_background_prompt() == "a street, dusk"
    layout.background_prompt = "empty road"
    assert layout.effective_background_prompt() == "empty road"


def test_weights_must_be_finite():
    with pytest.raises(LayoutError, match="weight"):
        Layout.from_dict(base(regions=[{"prompt": "x", "box": [0, 0, 1, 1], "weight": math.inf}]))


def test_old_layouts_keep_their_meaning_under_the_image_fields():
    layout = Layout.from_dict(base())
    assert (layout.reference, layout.reference_scale) == (None, 0.0)
    assert layout.reference_fraction is None
    # Left to the model: an SDXL model without its own defaults guides the first 10% of steps.
    assert with_model_defaults(layout, SDXL_DEFAULTS).reference_fraction == 0.1
    assert (layout.init_image, layout.strength, layout.keep_outside) == (None, 1.0, False)
    assert layout.regions[0].strength is None


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"strength": 0.5}, "strength"),
        ({"keep_outside": True}, "keep_outside"),
        (
            {
                "regions": [
                    {"prompt": "x", "box": [0, 0, 1, 1]},
                    {"prompt": "y", "box": [0, 0, 1, 1], "strength": 0.0},
                ]
            },
            "regions[1].strength",
        ),
    ],
)
def test_strengths_without_an_init_image_name_the_field(overrides, field):
    with pytest.raises(LayoutError, match="no 'init_image'") as info:
        Layout.from_dict(base(**overrides))
    assert info.value.field == field


def test_keep_outside_needs_the_background_kept():
    data = base(init_image="/tmp/previous.png", keep_outside=True)
    with pytest.raises(LayoutError, match="set 'strength' to 0") as info:
        Layout.from_dict(data)
    assert info.value.field == "strength"
    data["strength"] = 0
    data["regions"][0]["strength"] = 1
    layout = Layout.from_dict(data)
    assert layout.keep_outside and layout.strength == 0.0 and layout.regions[0].strength == 1.0


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"init_image": "/i.png", "strength": 1.5}, "strength"),
        ({"init_image": "/i.png", "strength": 0, "keep_outside": "yes"}, "keep_outside"),
        ({"reference_scale": -1}, "reference_scale"),
        ({"reference_fraction": 2}, "reference_fraction"),
        ({"reference": ""}, "reference"),
        (
            {
                "init_image": "/i.png",
                "regions": [{"prompt": "x", "box": [0, 0, 1, 1], "strength": -0.1}],
            },
            "regions[0].strength",
        ),
    ],
)
def test_bad_image_settings_name_the_field(overrides, field):
    with pytest.raises(LayoutError) as info:
        Layout.from_dict(base(**overrides))
    assert info.value.field == field


def test_reference_and_init_image_resolve_and_save_like_masks(tmp_path):
    data = base(reference="refs/proxies.png", init_image="previous.png", reference_scale=0.3)
    with pytest.raises(LayoutError, match="relative"):
        Layout.from_dict(data)
    layout = Layout.from_dict(data, base_dir=str(tmp_path))
    assert layout.reference == str(tmp_path / "refs" / "proxies.png")
    assert layout.init_image == str(tmp_path / "previous.png")
    layout.save(tmp_path / "layout.json")
    stored = json.loads((tmp_path / "layout.json").read_text())
    assert (stored["reference"], stored["init_image"]) == ("refs/proxies.png", "previous.png")
    assert Layout.load(tmp_path / "layout.json") == layout


# -- Depth ControlNet and per-object reference images -------------------------------------------


def test_conditioning_fields_default_to_their_documented_values():
    layout = Layout.from_dict(base())
    assert (layout.depth_scale, layout.depth_start, layout.depth_end) == (1.0, 0.0, 1.0)
    region = layout.regions[0]
    assert (region.depth_scale, region.image, region.image_scale) == (None, None, 0.5)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"depth_scale": -0.5}, "depth_scale"),
        ({"depth_start": 1.5}, "depth_start"),
        ({"depth_start": 0.6, "depth_end": 0.4}, "depth_end"),
        (
            {"regions": [{"prompt": "x", "box": [0, 0, 1, 1], "depth_scale": "high"}]},
            "regions[0].depth_scale",
        ),
        ({"regions": [{"prompt": "x", "box": [0, 0, 1, 1], "image": 3}]}, "regions[0].image"),
        (
            {"regions": [{"prompt": "x", "box": [0, 0, 1, 1], "image_scale": -1}]},
            "regions[0].image_scale",
        ),
    ],
)
def test_bad_conditioning_settings_name_the_field(overrides, field):
    with pytest.raises(LayoutError) as info:
        Layout.from_dict(base(**overrides))
    assert info.value.field == field


def test_region_image_resolves_and_saves_like_its_mask(tmp_path):
    region = {"prompt": "a car", "box": [0, 0, 1, 1], "image": "refs/car.png", "image_scale": 0.8}
    data = base(regions=[region], depth_scale=0.4, depth_start=0.1, depth_end=0.7)
    with pytest.raises(LayoutError, match="relative") as info:
        Layout.from_dict(data)
    assert info.value.field == "regions[0].image"
    layout = Layout.from_dict(data, base_dir=str(tmp_path))
    assert layout.regions[0].image == str(tmp_path / "refs" / "car.png")
    layout.save(tmp_path / "layout.json")
    stored = json.loads((tmp_path / "layout.json").read_text())
    assert stored["regions"][0]["image"] == "refs/car.png"
    assert (stored["depth_scale"], stored["depth_start"], stored["depth_end"]) == (0.4, 0.1, 0.7)
    assert Layout.load(tmp_path / "layout.json") == layout


def test_latent_mode_is_accepted_and_other_modes_are_named_in_the_error(tmp_path):
    layout = Layout.from_dict(base(mode="latent"))
    assert layout.mode == "latent"
    layout.save(tmp_path / "latent.json")
    assert Layout.load(tmp_path / "latent.json").mode == "latent"
    with pytest.raises(LayoutError, match=r"\['attention', 'latent'\]") as info:
        Layout.from_dict(base(mode="tiles"))
    assert info.value.field == "mode"
