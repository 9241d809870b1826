"""``kept_text_mib``: what a regional generate keeps of its prompts' keys and values is reported,
bounded per request or by the serve flag, and changes memory only, never pixels."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from engine.__main__ import _load_options, build_parser
from engine.loading.locate import LoadOptions
from engine.service.serve import Server


def serve(lines: list[str], options: LoadOptions) -> list[dict]:
    out = io.StringIO()
    Server(out, options).run(io.StringIO("".join(line + "\n" for line in lines)))
    replies = [json.loads(line) for line in out.getvalue().splitlines()]
    return [r for r in replies if r["event"] not in ("queued", "loading", "progress")]


def request(rid: str, out: str, model: str, **options) -> str:
    layout = {
        "prompt": "a plain background",
        "width": 64,
        "height": 64,
        "steps": 2,
        "seed": 3,
        "regions": [
            {"prompt": "a red circle", "box": [0.0, 0.0, 0.5, 0.5]},
            {"prompt": "a blue square", "box": [0.5, 0.5, 1.0, 1.0]},
        ],
    }
    data = {"op": "generate", "id": rid, "model": model, "layout": layout, "out": out}
    if options:
        data["options"] = options
    return json.dumps(data)


def pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_kept_text_is_reported_bounded_and_leaves_the_pixels_alone(tiny_model_dir, tmp_path):
    paths = {name: str(tmp_path / f"{name}.png") for name in ("kept", "none", "flag")}
    replies = serve(
        [
            request("kept", paths["kept"], tiny_model_dir),
            request("none", paths["none"], tiny_model_dir, kept_text_mib=0),
            request("bad", paths["none"], tiny_model_dir, kept_text_mib=-1),
            request("bool", paths["none"], tiny_model_dir, kept_text_mib=True),
        ],
        LoadOptions(device="cpu"),
    )
    by_id = {r["id"]: r for r in replies}
    assert by_id["kept"]["event"] == "result" and by_id["none"]["event"] == "result"
    # Three blocks (scene, two regions) in each of the tiny UNet's cross-attention layers.
    assert by_id["kept"]["kept_text_bytes"] > 0
    assert by_id["none"]["kept_text_bytes"] == 0
    assert np.array_equal(pixels(paths["kept"]), pixels(paths["none"]))
    for rid in ("bad", "bool"):
        assert by_id[rid]["event"] == "error" and by_id[rid]["code"] == "bad_request"
        assert "kept_text_mib" in by_id[rid]["message"]

    # The serve flag sets the default for every request; a request may still lift it.
    flag = _load_options(build_parser().parse_args(["serve", "--kept-text-mib", "0"]))
    assert flag.kept_text_mib == 0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--kept-text-mib", "-5"])
    (done,) = serve([request("flag", paths["flag"], tiny_model_dir)], flag)
    assert done["kept_text_bytes"] == 0
    (lifted,) = serve([request("lift", paths["flag"], tiny_model_dir, kept_text_mib=64)], flag)
    assert lifted["kept_text_bytes"] == by_id["kept"]["kept_text_bytes"]
