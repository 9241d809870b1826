"""The Layout wire schema: validation errors are specific, round trips are lossless."""

from __future__ import annotations

import json
import math

import pytest

from engine.layout import Layout, LayoutError, strip_phrases


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
