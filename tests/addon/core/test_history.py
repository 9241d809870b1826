"""The result history and the clean-up of a request's intermediate files (no bpy)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from blender_addon.core import history


def _engine_png(path, seed: int, prompt: str) -> str:
    """A PNG written the way the engine writes results: with its provenance chunks."""
    from PIL import Image

    from engine.service.provenance import save_png
    from engine.wire.layout import Layout

    layout = Layout.from_dict({"prompt": prompt, "width": 64, "height": 72, "seed": seed})
    image = Image.fromarray(np.full((72, 64, 3), seed % 256, dtype=np.uint8))
    return save_png(image, str(path), layout, "shapes", "Euler")


def test_each_result_becomes_a_numbered_entry_with_its_provenance(tmp_path):
    result = tmp_path / "result.png"
    for seed in (3, 4, 5):
        _engine_png(result, seed, f"a red box {seed}")
        history.record(str(tmp_path), str(result), keep=10)
    found = history.entries(str(tmp_path))
    assert [e.number for e in found] == [3, 2, 1]
    assert [e.seed for e in found] == [5, 4, 3]
    assert found[0].prompt == "a red box 5" and found[0].size == (64, 72)
    assert found[0].label == "#3  seed 5  a red box 5"
    # Each entry is the result as it was, byte for byte.
    with open(found[0].path, "rb") as entry, open(result, "rb") as last:
        assert entry.read() == last.read()


def test_the_history_keeps_the_newest_entries_only(tmp_path):
    result = tmp_path / "result.png"
    for seed in range(5):
        _engine_png(result, seed, "x")
        history.record(str(tmp_path), str(result), keep=3)
    assert [e.seed for e in history.entries(str(tmp_path))] == [4, 3, 2]
    assert sorted(os.listdir(tmp_path / "history")) == [
        "result_0003.png",
        "result_0004.png",
        "result_0005.png",
    ]
    # Numbers keep counting after a prune: a new entry never takes an old one's name.
    history.record(str(tmp_path), str(result), keep=3)
    assert history.entries(str(tmp_path))[0].number == 6
    assert history.prune(str(tmp_path), 1) == [
        str(tmp_path / "history" / f"result_000{n}.png") for n in (4, 5)
    ]


def test_restoring_an_entry_makes_it_the_current_result(tmp_path):
    result = tmp_path / "result.png"
    _engine_png(result, 11, "first")
    history.record(str(tmp_path), str(result))
    _engine_png(result, 12, "second")
    history.record(str(tmp_path), str(result))
    history.restore(history.find(str(tmp_path), 1), str(result))
    assert history.read_provenance(str(result))["layout"]["seed"] == 11
    assert history.find(str(tmp_path), 7) is None


def test_a_png_without_provenance_is_listed_without_a_seed(tmp_path):
    from blender_addon.core.png import write_rgb_png

    plain = tmp_path / "plain.png"
    write_rgb_png(str(plain), np.zeros((8, 8, 3), np.uint8))
    assert history.read_provenance(str(plain)) is None
    history.record(str(tmp_path), str(plain))
    (entry,) = history.entries(str(tmp_path))
    assert entry.seed is None and entry.label == "#1  no provenance"


@pytest.mark.parametrize("compressed", [False, True])
def test_provenance_is_read_from_compressed_and_plain_chunks(tmp_path, compressed):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt(
        "layout-diffusion", '{"layout": {"seed": 9, "prompt": "\u00e9t\u00e9"}}', zip=compressed
    )
    path = tmp_path / "x.png"
    Image.new("RGB", (4, 4)).save(path, pnginfo=info)
    assert history.read_provenance(str(path)) == {"layout": {"seed": 9, "prompt": "\u00e9t\u00e9"}}


def test_intermediate_files_go_and_results_stay(tmp_path):
    keep = ["result.png", "layout.json", "notes.txt", "mask.png"]
    drop = [
        "mask_001_Cube.png",
        "image_002_Ball.png",
        "depth.png",
        "reference.png",
        "init.png",
        "previous.png",
    ]
    for name in keep + drop:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "history").mkdir()
    removed = history.clean_intermediates(str(tmp_path))
    assert sorted(os.path.basename(p) for p in removed) == sorted(drop)
    assert sorted(os.listdir(tmp_path)) == sorted(keep + ["history"])
    assert history.clean_intermediates(str(tmp_path / "missing")) == []
