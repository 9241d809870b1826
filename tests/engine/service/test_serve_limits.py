"""``engine serve`` against hostile input: one final reply per request, limits with their names
and values, file rules for ``out``; run in-process on the tiny model (lines in, lines out)."""

from __future__ import annotations

import io
import json
import os

import pytest
from hostile import png_header_only
from PIL import Image

from engine.loading.locate import LoadOptions
from engine.service.serve import Server, guess_id, read_line
from engine.wire.layout import LIMITS, MAX_JSON_DEPTH
from engine.wire.protocol import ERROR_CODES, MAX_ID_CHARS


def serve_lines(lines: list[str], **kwargs) -> list[dict]:
    """Run a Server over ``lines`` to the end of input; every reply, each checked to be one
    valid UTF-8 JSON object per line (as the real stdout, a strict UTF-8 stream, needs)."""
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="utf-8", newline="\n", write_through=True)
    options = kwargs.pop("options", LoadOptions(device="cpu"))
    Server(out, options, **kwargs).run(io.StringIO("".join(line + "\n" for line in lines)))
    text = raw.getvalue().decode("utf-8")
    replies = [json.loads(line) for line in text.splitlines()]
    assert all(isinstance(r, dict) for r in replies)
    return replies


def finals(replies: list[dict]) -> list[dict]:
    return [r for r in replies if r["event"] not in ("queued", "loading", "progress")]


def generate(request_id, out: str, model: str, **layout) -> str:
    data = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 1, "seed": 1}
    data.update(layout)
    return json.dumps(
        {"op": "generate", "id": request_id, "model": model, "layout": data, "out": out}
    )


def test_hello_reports_every_limit():
    (reply,) = serve_lines(['{"op": "hello", "id": 1}'], max_seconds=120.0)
    limits = reply["limits"]
    assert {k: limits[k] for k in LIMITS} == LIMITS
    assert limits["generate_seconds"] == 120.0 and limits["queue"] == 4
    assert limits["id_chars"] == MAX_ID_CHARS and limits["line_chars"] > 1_000_000
    assert limits["prompt_tokens"] == 77 and limits["input_pixels"] == 8192 * 8192


def test_deep_nesting_invalid_unicode_and_nan_each_get_one_error():
    deep = '{"op":"hello","id":1,"x":' + "[" * 5000
    lines = [
        deep,
        '{"op": "hello", "id": 2, "x": ' + "[" * 100 + "]" * 100 + "}",
        '{"op": "hello", "id": "a\\ud800"}',
        '{"op": "hello", "id": 4, "model": "x\\udfff"}',
        '{"op": "hello", "id": NaN}',
        '{"op": "cancel", "id": 6, "target": NaN}',
        '{"op": "hello", "id": 7, "options": {"device": Infinity}}',
        '{"op": "hello", "id": 8, "x": 1e999}',
        '{"op": "generate", "id": 9, "out": "/tmp/x.png", "layout": {"prompt": "a\\ud800"}}',
        '{"op": "generate", "id": 10, "out": "/tmp/x.png", "layout": {"prompt": "a", '
        '"guidance_scale": -Infinity}}',
        '{"op": "hello", "id": "' + "i" * (MAX_ID_CHARS + 1) + '"}',
        '{"op": "hello", "id": 12}',
    ]
    replies = serve_lines(lines)
    assert [r.get("id") for r in replies] == [
        1,
        2,
        "a\ud800",
        4,
        None,
        6,
        7,
        8,
        9,
        10,
        "i" * (MAX_ID_CHARS + 1),
        12,
    ]
    codes = [(r.get("code"), r.get("field"), r.get("limit")) for r in replies]
    assert codes == [
        ("limit_exceeded", None, "json_depth"),
        ("limit_exceeded", "x" + "[0]" * 31, "json_depth"),
        ("bad_request", "id", None),
        ("bad_request", "model", None),
        ("bad_request", "id", None),
        ("bad_request", "target", None),
        ("bad_request", "options.device", None),
        ("bad_request", "x", None),
        ("bad_layout", "layout.prompt", None),
        ("bad_layout", "layout.guidance_scale", None),
        ("limit_exceeded", "id", "id_chars"),
        (None, None, None),
    ]
    assert replies[0]["max"] == MAX_JSON_DEPTH and replies[-1]["event"] == "hello"
    assert all(r["code"] in ERROR_CODES for r in replies[:-1])


def test_a_line_over_the_limit_is_skipped_and_answered_to_its_id():
    long_line = '{"op": "generate", "id": "big", "layout": {"prompt": "' + "x" * 5000 + '"}}'
    replies = serve_lines([long_line, '{"op": "hello", "id": "after"}'], max_line_chars=1000)
    assert replies[0]["id"] == "big"
    assert (replies[0]["code"], replies[0]["limit"], replies[0]["max"]) == (
        "limit_exceeded",
        "line_chars",
        1000,
    )
    assert f"{len(long_line)} characters" in replies[0]["message"]
    assert replies[1]["event"] == "hello" and replies[1]["limits"]["line_chars"] == 1000

    stream = io.StringIO("a" * 50 + "\nshort\n")
    assert read_line(stream, 10) == ("a" * 11, 50)
    assert read_line(stream, 10) == ("short\n", 0)
    assert read_line(stream, 10) == ("", 0)
    assert guess_id('{"op": "hello", "id": "r\\"1", "x": [') == 'r"1'
    assert guess_id('{"id": 17, "op"') == 17 and guess_id("[[[") is None


def test_pickle_only_by_the_engines_own_flag():
    line = '{"op": "hello", "id": 1, "options": {"allow_pickle": true}}'
    (reply,) = serve_lines([line])
    assert (reply["code"], reply["field"]) == ("unsafe_checkpoint", "options.allow_pickle")
    assert "--allow-pickle" in reply["message"]
    (reply,) = serve_lines([line], options=LoadOptions(device="cpu", allow_pickle=True))
    assert reply["event"] == "hello"


def test_output_rules(tmp_path, tiny_model_dir):
    text_file = tmp_path / "notes.png"
    text_file.write_text("my notes")
    folder = tmp_path / "a-folder.png"
    folder.mkdir()
    root = tmp_path / "renders"
    root.mkdir()
    cases = [
        ("nul", str(tmp_path / "a\x00b.png"), "NUL"),
        ("relative", "out.png", "absolute"),
        ("suffix", str(tmp_path / "out.txt"), "must end in .png"),
        ("folder", str(folder), "is a folder"),
        ("text", str(text_file), "is not a PNG"),
        ("missing", str(tmp_path / "new" / "deeper" / "x.png"), "does not exist"),
    ]
    lines = [generate(name, out, tiny_model_dir) for name, out, _ in cases]
    created = root / "shot" / "frame.png"
    lines.append(generate("created", str(created), tiny_model_dir))
    replies = finals(serve_lines(lines, out_roots=[str(root)]))
    for (name, _, words), reply in zip(cases, replies, strict=False):
        assert (reply["id"], reply["code"], reply["field"]) == (name, "bad_request", "out")
        assert words in reply["message"], reply
    assert replies[-1]["event"] == "result" and created.is_file()
    assert text_file.read_text() == "my notes"
    assert not (tmp_path / "new").exists()


def test_duplicate_ids_are_refused_and_each_generate_ends_once(tmp_path, tiny_model_dir):
    first, second = str(tmp_path / "one.png"), str(tmp_path / "two.png")
    replies = serve_lines(
        [generate("g", first, tiny_model_dir), generate("g", second, tiny_model_dir)]
    )
    ends = finals(replies)
    assert [(r["id"], r["event"], r.get("code")) for r in ends] == [
        ("g", "error", "bad_request"),
        ("g", "result", None),
    ]
    assert "already used by a generate in flight" in ends[0]["message"]
    assert os.path.isfile(first) and not os.path.exists(second)


def test_prompts_over_the_token_window_are_refused_not_cut(tmp_path, tiny_model_dir):
    out = str(tmp_path / "x.png")
    # The tiny tokenizer reads one token per character: 76 characters + start and end = 78.
    region = {"prompt": "a" * 76, "box": [0, 0, 0.5, 1]}
    replies = finals(
        serve_lines(
            [
                generate("long", out, tiny_model_dir, regions=[region]),
                generate("fits", out, tiny_model_dir, prompt="b" * 75),
            ]
        )
    )
    assert (replies[0]["code"], replies[0]["field"]) == (
        "limit_exceeded",
        "layout.regions[0].prompt",
    )
    assert (replies[0]["limit"], replies[0]["max"]) == ("prompt_tokens", 77)
    assert "78 tokens long" in replies[0]["message"]
    assert replies[1]["event"] == "result"

    from engine.service.provenance import read_provenance

    assert read_provenance(out)["prompt"] == "b" * 75


def test_a_generate_that_would_take_too_long_is_refused_before_its_first_step(
    tmp_path, tiny_model_dir
):
    out = tmp_path / "huge.png"
    line = generate("huge", str(out), tiny_model_dir, width=4096, height=4096, steps=50)
    replies = serve_lines([line], max_seconds=30.0)
    assert [r["event"] for r in replies] == ["loading", "error"]
    error = replies[-1]
    assert (error["code"], error["limit"], error["max"]) == (
        "limit_exceeded",
        "generate_seconds",
        30.0,
    )
    assert "would take at least" in error["message"] and "--max-seconds" in error["message"]
    assert not out.exists()


def test_progress_carries_the_estimate_left(tmp_path, tiny_model_dir):
    line = generate("g", str(tmp_path / "x.png"), tiny_model_dir, steps=3)
    progress = [r for r in serve_lines([line]) if r["event"] == "progress"]
    assert [p["step"] for p in progress] == [1, 2, 3]
    assert all(p["seconds_left"] >= 0 for p in progress) and progress[-1]["seconds_left"] < 5


@pytest.mark.parametrize("suffix", [".png"])
def test_images_are_checked_when_the_request_arrives(tmp_path, tiny_model_dir, suffix):
    bomb = tmp_path / f"bomb{suffix}"
    png_header_only(bomb, 13000, 13000)
    wide = tmp_path / "wide.png"
    Image.new("L", (128, 64), 255).save(wide)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    out = str(tmp_path / "x.png")
    cases = [
        ("bomb", {"init_image": str(bomb)}, "limit_exceeded", "layout.init_image"),
        ("mask-bomb", _mask_region(bomb), "limit_exceeded", "layout.regions[0].mask"),
        ("aspect", _mask_region(wide), "bad_layout", "layout.regions[0].mask"),
        ("broken", {"reference": str(broken)}, "bad_layout", "layout.reference"),
        ("dir", {"depth": str(tmp_path)}, "bad_layout", "layout.depth"),
    ]
    lines = [generate(name, out, tiny_model_dir, **fields) for name, fields, _, _ in cases]
    replies = serve_lines(lines)
    assert [(r["id"], r["code"], r["field"]) for r in replies] == [
        (name, code, field) for name, _, code, field in cases
    ]
    assert replies[0]["limit"] == "input_pixels" and "13000x13000" in replies[0]["message"]
    assert "aspect ratio" in replies[2]["message"]


def _mask_region(path) -> dict:
    return {"regions": [{"prompt": "a red circle", "box": [0, 0, 1, 1], "mask": str(path)}]}
