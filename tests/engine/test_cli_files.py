"""``engine generate``'s file rules: a Layout file's inputs stay in its folder, outputs are PNGs,
and a hostile Layout file is an error message, not a traceback (in-process, nothing loads)."""

from __future__ import annotations

import json

from PIL import Image

from engine.__main__ import main


def write_layout(folder, **fields) -> str:
    path = folder / "scene.json"
    layout = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 1, **fields}
    path.write_text(json.dumps(layout))
    return str(path)


def test_inputs_outside_the_layout_folder_need_the_flag(tmp_path, capsys):
    shot = tmp_path / "shot"
    shot.mkdir()
    Image.new("L", (64, 64), 255).save(tmp_path / "elsewhere.png")
    region = {"prompt": "a circle", "box": [0, 0, 1, 1], "mask": "../elsewhere.png"}
    path = write_layout(shot, regions=[region])
    assert main(["generate", path, "--model", str(tmp_path / "none")]) == 1
    error = capsys.readouterr().err
    assert "bad Layout [regions[0].mask]" in error and "--allow-outside-inputs" in error
    # With the flag the Layout is read; the missing model is the next (and last) complaint.
    assert main(["generate", path, "--allow-outside-inputs", "--model", str(tmp_path / "no")]) == 1
    assert "not found" in capsys.readouterr().err


def test_outputs_must_be_png_files_in_allowed_places(tmp_path, capsys):
    path = write_layout(tmp_path)
    notes = tmp_path / "notes.png"
    notes.write_text("keep me")
    (tmp_path / "folder.png").mkdir()
    for out, words in [
        (str(tmp_path / "x.jpg"), "must end in .png"),
        (str(notes), "is not a PNG"),
        (str(tmp_path / "folder.png"), "is a folder"),
        ("/nonexistent-root/deep/x.png", "does not exist"),
    ]:
        assert main(["generate", path, "--out", out]) == 1
        assert words in capsys.readouterr().err, out
    assert notes.read_text() == "keep me"


def test_a_deeply_nested_layout_file_is_an_error_not_a_crash(tmp_path, capsys):
    path = tmp_path / "deep.json"
    path.write_text('{"prompt": "x", "regions": ' + "[" * 5000 + "]" * 5000 + "}")
    assert main(["generate", str(path)]) == 1
    error = capsys.readouterr().err
    assert "bad Layout" in error and "more than 32 deep" in error
