"""Settings a Layout leaves to the model: read from the model folder, applied on every path."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from engine.errors import UnsupportedModelError
from engine.loading.defaults import (
    DEFAULTS_FILE,
    SDXL_DEFAULTS,
    ModelDefaultsError,
    read_model_defaults,
    with_model_defaults,
)
from engine.pipeline import RegionalSDXLPipeline
from engine.service.generate import run_generation
from engine.service.provenance import layout_from_png
from engine.wire.layout import Layout, Region

SIDE = 64


def write_defaults(folder, data) -> None:
    with open(os.path.join(folder, DEFAULTS_FILE), "w", encoding="utf-8") as handle:
        handle.write(data if isinstance(data, str) else json.dumps(data))


def test_folder_file_overrides_the_family_default(tmp_path):
    assert read_model_defaults(str(tmp_path)) == SDXL_DEFAULTS
    assert read_model_defaults(None) == SDXL_DEFAULTS
    write_defaults(tmp_path, {"reference_fraction": 0.4, "note": "measured"})
    assert read_model_defaults(str(tmp_path)) == {"reference_fraction": 0.4}
    # A single-file checkpoint has no folder of its own: family defaults.
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    assert read_model_defaults(str(weights)) == SDXL_DEFAULTS


@pytest.mark.parametrize(
    "data, words",
    [
        ("{not json", "cannot read"),
        ([0.4], "JSON object"),
        ({"steps": 20}, "not a setting"),
        ({"reference_fraction": 1.5}, "[0.0, 1.0]"),
        ({"reference_fraction": True}, "must be a number"),
    ],
)
def test_bad_defaults_files_say_what_is_wrong(tmp_path, data, words):
    write_defaults(tmp_path, data)
    with pytest.raises(ModelDefaultsError, match=words if words[0] != "[" else r"\[0.0") as info:
        read_model_defaults(str(tmp_path))
    assert isinstance(info.value, UnsupportedModelError)
    assert DEFAULTS_FILE in str(info.value)


def test_a_model_may_declare_the_side_it_composes_at(tiny_model_dir, tmp_path):
    """The native size sets where the high-res fix starts; by default it is the training side."""
    from engine.loading.defaults import describe_model, native_size
    from engine.loading.locate import resolve_model
    from engine.service.estimate import model_cost

    assert native_size(resolve_model(tiny_model_dir)) == 64
    folder = tmp_path / "declared"
    shutil.copytree(tiny_model_dir, folder)
    write_defaults(folder, {"native_size": 256, "reference_fraction": 0.3})
    location = resolve_model(str(folder))
    assert native_size(location) == 256
    assert model_cost(location)["native_size"] == 256
    # Not a Layout field: the Layout defaults leave it out.
    assert describe_model(str(folder))["layout_defaults"] == {"reference_fraction": 0.3}
    assert describe_model(str(folder))["native_size"] == 256

    for bad in (100, 32, 2.5, True, "640"):
        write_defaults(folder, {"native_size": bad})
        with pytest.raises(ModelDefaultsError, match="multiple of 8"):
            native_size(location)
        with pytest.raises(ModelDefaultsError, match="multiple of 8"):
            read_model_defaults(str(folder))
        report = model_cost(location)
        assert report["available"] is False and "native_size" in report["message"]
        assert describe_model(str(folder))["found"] is False


def test_explicit_values_win_over_the_model():
    layout = Layout(prompt="x", reference_fraction=0.25)
    assert with_model_defaults(layout, {"reference_fraction": 0.4}) is layout
    open_layout = Layout(prompt="x")
    assert with_model_defaults(open_layout, {"reference_fraction": 0.4}).reference_fraction == 0.4


@pytest.fixture(scope="module")
def model_with_defaults(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny model copied with a layout_defaults.json guiding every step."""
    folder = tmp_path_factory.mktemp("models") / "tiny-with-defaults"
    shutil.copytree(tiny_model_dir, folder)
    write_defaults(folder, {"reference_fraction": 1.0})
    return str(folder)


@pytest.fixture(scope="module")
def reference_png(tmp_path_factory) -> str:
    pixels = np.full((SIDE, SIDE, 3), 128, dtype=np.uint8)
    pixels[: SIDE // 2, : SIDE // 2] = (230, 20, 20)
    path = tmp_path_factory.mktemp("reference") / "proxies.png"
    Image.fromarray(pixels).save(path)
    return str(path)


def test_pipeline_and_generate_use_the_models_fraction(
    tiny_model_dir, model_with_defaults, reference_png, tmp_path
):
    layout = Layout(
        prompt="a red car",
        width=SIDE,
        height=SIDE,
        steps=4,
        seed=2,
        regions=[Region("a red car", (0.0, 0.0, 0.5, 0.5))],
        reference=reference_png,
        reference_scale=0.25,
    )
    plain = RegionalSDXLPipeline.from_pretrained(tiny_model_dir)
    tuned = RegionalSDXLPipeline.from_pretrained(model_with_defaults)
    for pipe in (plain, tuned):
        pipe.set_progress_bar_config(disable=True)

    def image(pipe, lay):
        return pipe(layout=lay, output_type="np").images[0]

    # The same weights: only the model's fraction (1.0 vs SDXL's 0.1) tells the two apart.
    everywhere = dataclasses.replace(layout, reference_fraction=1.0)
    np.testing.assert_array_equal(image(tuned, layout), image(plain, everywhere))
    assert not np.array_equal(image(plain, layout), image(plain, everywhere))
    tenth = dataclasses.replace(layout, reference_fraction=0.1)
    np.testing.assert_array_equal(image(plain, layout), image(plain, tenth))

    # Provenance records the fraction the model chose, not a null.
    out = run_generation(tuned, layout, str(tmp_path / "out.png"), "tiny")
    assert layout_from_png(out.path).reference_fraction == 1.0
