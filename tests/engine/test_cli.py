"""``python -m engine`` as users run it: generate, info, and the errors they see."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image
from serve_client import ROOT, engine_env

from engine.__main__ import main
from engine.loading.defaults import SDXL_DEFAULTS, with_model_defaults
from engine.service.provenance import PARAMETERS_KEY, PROVENANCE_KEY, read_provenance
from engine.wire.layout import Layout


def run_engine(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine", *args],
        cwd=ROOT,
        env=engine_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture()
def layout_file(tmp_path):
    mask = tmp_path / "masks" / "car.png"
    mask.parent.mkdir()
    image = Image.new("L", (96, 64), 0)
    image.paste(255, (10, 20, 50, 60))
    image.save(mask)
    layout = {
        "prompt": "a red car on a street",
        "negative_prompt": "blurry, dark",
        "width": 96,
        "height": 64,
        "steps": 2,
        "seed": 11,
        "guidance_scale": 5.5,
        "regions": [{"prompt": "a red car", "box": [0.1, 0.3, 0.5, 0.95], "mask": "masks/car.png"}],
    }
    path = tmp_path / "scene.json"
    path.write_text(json.dumps(layout))
    return path


def test_generate_writes_png_of_layout_size_with_provenance(tiny_model_dir, layout_file, tmp_path):
    out = tmp_path / "renders" / "scene.png"
    done = run_engine(
        "generate",
        str(layout_file),
        "--model",
        tiny_model_dir,
        "--out",
        str(out),
        "--device",
        "cpu",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    assert "generating" in done.stderr and "2/2" in done.stderr  # tqdm progress on stderr

    with Image.open(out) as image:
        assert image.size == (96, 64)
        assert image.format == "PNG"
        chunks = dict(image.text)
    assert set(chunks) >= {PARAMETERS_KEY, PROVENANCE_KEY}
    assert chunks[PARAMETERS_KEY] == (
        "a red car on a street\n"
        "Negative prompt: blurry, dark\n"
        "Steps: 2, Sampler: Euler, CFG scale: 5.5, Seed: 11, Size: 96x64, Model: tiny-sdxl, "
        "Regions: 1, Regional mode: attention, Version: layout-diffusion 0.1.0"
    )
    record = read_provenance(str(out))
    assert record["model"] == tiny_model_dir
    assert (record["seed"], record["steps"], record["prompt"]) == (11, 2, "a red car on a street")
    # The record holds the Layout as generated: the fields it left to the model filled in.
    sent = Layout.load(layout_file)
    assert sent.reference_fraction is None
    assert Layout.from_dict(record["layout"]) == with_model_defaults(sent, SDXL_DEFAULTS)
    assert [p.name for p in out.parent.iterdir()] == ["scene.png"]  # no temporary file left


def test_generate_overrides_seed_and_defaults_out_next_to_layout(
    tiny_model_dir, layout_file, capsys
):
    # In-process this time: the same entry point the console script runs.
    status = main(
        ["generate", str(layout_file), "--model", tiny_model_dir, "--seed", "3", "--steps", "1"]
    )
    assert status == 0
    out = layout_file.with_suffix(".png")
    assert capsys.readouterr().out.strip() == str(out)
    record = read_provenance(str(out))
    assert (record["seed"], record["steps"]) == (3, 1)


def test_generate_bad_layout_names_the_field(layout_file, tmp_path):
    data = json.loads(layout_file.read_text())
    data["regions"][0]["box"] = [0.5, 0.5, 0.2, 0.9]
    layout_file.write_text(json.dumps(data))
    done = run_engine("generate", str(layout_file), "--out", str(tmp_path / "x.png"))
    assert done.returncode == 1
    assert "error: bad Layout [regions[0].box]" in done.stderr
    assert "no area" in done.stderr
    assert not (tmp_path / "x.png").exists()


def test_generate_missing_mask_and_missing_model_fail_clearly(layout_file, tmp_path):
    missing = tmp_path / "nowhere" / "model"
    done = run_engine("generate", str(layout_file), "--model", str(missing))
    assert done.returncode == 1
    assert f"model {str(missing)!r} not found" in done.stderr

    (tmp_path / "masks" / "car.png").unlink()
    done = run_engine("generate", str(layout_file), "--model", str(missing))
    assert done.returncode == 1
    assert "[regions[0].mask]" in done.stderr and "does not exist" in done.stderr


def test_info_reports_device_and_model_presence(tiny_model_dir):
    done = run_engine("info", "--json", "--device", "cpu", "--model", tiny_model_dir)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert (info["device"], info["dtype"]) == ("cpu", "float32")
    assert info["model"]["found"] is True and info["model"]["path"] == tiny_model_dir


def test_hello_text_says_when_the_model_is_missing(capsys):
    assert main(["hello", "--device", "cpu", "--model", "/no/such/model"]) == 1
    printed = capsys.readouterr().out
    assert "device: cpu, dtype: float32" in printed
    assert "model /no/such/model: NOT FOUND" in printed and "no file or folder" in printed


def test_info_says_why_conditions_are_unavailable(capsys, tiny_model_dir, tmp_path):
    args = ["info", "--device", "cpu", "--model", tiny_model_dir]
    assert main([*args, "--controlnet", str(tmp_path / "none")]) == 0
    printed = capsys.readouterr().out
    assert "controlnet: unavailable: ControlNet" in printed and "no file or folder" in printed
    assert "ip_adapter: unavailable: no IP-Adapter configured; start the engine with" in printed
