"""A bounded, seeded fuzzer against a real ``engine serve``: malformed and extreme requests, each
followed by a ``hello``; every request must get exactly one final reply with a documented code,
none ``internal``, the engine must stay up, answer a valid generate at the end and not grow
without bound."""

from __future__ import annotations

import json
import os
import random
import time

import numpy as np
from hostile import png_header_only
from PIL import Image
from serve_client import EngineClient

from engine.wire.protocol import ERROR_CODES, MAX_LINE_CHARS

SEED = int(os.environ.get("LAYOUT_FUZZ_SEED", "20240611"))
CASES = 300
FINAL = {"result", "error", "cancelled", "ack", "hello"}

HOSTILE_VALUES = [
    None,
    True,
    False,
    -1,
    0,
    7,
    2**70,
    -(2**70),
    1e308,
    -1e308,
    0.5,
    "",
    "x" * 5000,
    "a\ud800b",
    "\udfff",
    "\x00",
    "../../../../etc/passwd",
    "/dev/zero",
    "/proc/self/mem",
    [],
    {},
    [[[[[[]]]]]],
    {"a": {"b": {"c": None}}},
    list(range(50)),
]
NUMBER_FIELDS = ["width", "height", "steps", "seed", "guidance_scale", "base_ratio"]
NUMBER_FIELDS += ["depth_scale", "depth_start", "depth_end", "reference_scale", "strength"]
TEXT_FIELDS = ["prompt", "negative_prompt", "background_prompt", "mode", "version"]
PATH_FIELDS = ["depth", "reference", "init_image"]
REGION_FIELDS = ["prompt", "box", "mask", "weight", "name", "strength", "image", "image_scale"]
EXTREMES = [
    ("width", [64, 72, 128]),
    ("height", [64, 120]),
    ("steps", [1, 2]),
    ("seed", [0, 2**63 - 1]),
    ("guidance_scale", [0, 1, 100]),
    ("base_ratio", [0, 1]),
    ("mode", ["latent", "attention"]),
    ("prompt", ["", "😀 ünïcödé", " a red circle "]),
    ("negative_prompt", ["blurry", ""]),
    ("region.weight", [0, 10]),
    ("region.box", [[-1, -1, 2, 2], [0.5, 0.5, 0.5001, 0.5001]]),
    ("region.mask", ["alpha", "deep", "mask", None]),
    ("region.name", ["", "名前"]),
]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def make_files(folder) -> dict[str, str]:
    """Image files a fuzzed Layout may point at, good and hostile."""
    files = {}
    good = folder / "mask.png"
    pixels = np.zeros((64, 64), dtype=np.uint8)
    pixels[:, :32] = 255
    Image.fromarray(pixels).save(good)
    files["mask"] = str(good)
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[:32, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    files["alpha"] = str(folder / "alpha.png")
    Image.fromarray(pixels.astype(np.uint16) * 257).save(folder / "deep.png")
    files["deep"] = str(folder / "deep.png")
    Image.new("L", (128, 32), 255).save(folder / "wide.png")
    files["wide"] = str(folder / "wide.png")
    png_header_only(folder / "bomb.png", 13000, 13000)
    files["bomb"] = str(folder / "bomb.png")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "photo.png")
    files["photo"] = str(folder / "photo.png")
    (folder / "truncated.png").write_bytes((folder / "photo.png").read_bytes()[:900])
    files["truncated"] = str(folder / "truncated.png")
    (folder / "text.png").write_text("not an image")
    files["text"] = str(folder / "text.png")
    os.mkfifo(folder / "fifo.png")
    files["fifo"] = str(folder / "fifo.png")
    files["folder"] = str(folder)
    files["missing"] = str(folder / "missing.png")
    return files


def valid_generate(request_id, out: str, model: str, mask: str) -> dict:
    return {
        "op": "generate",
        "id": request_id,
        "model": model,
        "out": out,
        "layout": {
            "prompt": "a red circle",
            "width": 64,
            "height": 64,
            "steps": 1,
            "seed": 1,
            "regions": [{"prompt": "a circle", "box": [0.0, 0.0, 0.5, 1.0], "mask": mask}],
        },
    }


def mutate(rng: random.Random, request: dict, files: dict[str, str], out_dir) -> None:
    """One random change to a generate request, somewhere the engine must check."""
    layout = request["layout"]
    region = layout["regions"][0]
    choice = rng.randrange(12)
    if choice >= 9:
        # Extreme but valid: the engine must generate these.
        field, values = rng.choice(EXTREMES)
        target = region if field.startswith("region.") else layout
        value = rng.choice(values)
        named = isinstance(value, str) and value in files
        target[field.removeprefix("region.")] = files[value] if named else value
    elif choice == 0:
        layout[rng.choice(NUMBER_FIELDS)] = rng.choice(HOSTILE_VALUES + [4096, 10**6, 1e-9])
    elif choice == 1:
        layout[rng.choice(TEXT_FIELDS)] = rng.choice(HOSTILE_VALUES)
    elif choice == 2:
        layout[rng.choice(PATH_FIELDS)] = rng.choice(list(files.values()) + HOSTILE_VALUES)
    elif choice == 3:
        region[rng.choice(REGION_FIELDS)] = rng.choice(list(files.values()) + HOSTILE_VALUES)
    elif choice == 4:
        box = region.get("box")
        box = list(box) if isinstance(box, list) and len(box) == 4 else [0.0, 0.0, 1.0, 1.0]
        box[rng.randrange(4)] = rng.choice(HOSTILE_VALUES + [-5, 5, 0.5])
        region["box"] = box
    elif choice == 5:
        request["out"] = rng.choice(
            [
                files["text"],
                files["folder"],
                "relative.png",
                str(out_dir / "a\x00b.png"),
                str(out_dir / "x.txt"),
                str(out_dir / "missing" / "deep" / "x.png"),
                "/proc/self/x.png",
                str(out_dir / "x.png") * 400,
            ]
            + HOSTILE_VALUES
        )
    elif choice == 6:
        key = rng.choice(
            ["allow_pickle", "device", "dtype", "controlnet", "gligen", "config", "bogus"]
        )
        value = rng.choice(
            HOSTILE_VALUES + [True, "cuda:99", "float8", "mps", "/nonexistent", "acme/none"]
        )
        request["options"] = {key: value}
    elif choice == 7:
        request["model"] = rng.choice(
            ["/etc", "/dev/null", "../..", "acme/missing", files["text"], files["folder"]]
            + HOSTILE_VALUES
        )
    else:
        # Many regions, some past the limit, or the images in every role.
        count = rng.choice([2, 40, 1025])
        layout["regions"] = [dict(region, mask=rng.choice(list(files.values())))] * count


def raw_case(rng: random.Random, index: int) -> tuple[bytes, object]:
    """A line that is not a usable request, and the id its reply must carry."""
    choice = rng.randrange(12)
    rid = f"raw-{index}"
    if choice == 0:
        return b'{"op":"hello","id":"' + rid.encode() + b'","x":' + b"[" * 5000, rid
    if choice == 1:
        return b"~" + bytes(rng.randrange(256) for _ in range(rng.randrange(200))), None
    if choice == 2:
        return b'{"op": "hello", "id": "' + rid.encode() + b'", "x": \xff\xfe}', rid
    if choice == 3:
        return json.dumps({"op": "hello", "id": rid, "x": "\ud800"}).encode(), rid
    if choice == 4:
        return f'{{"op": "hello", "id": "{rid}", "n": {"9" * 5000}}}'.encode(), rid
    if choice == 5:
        return f'{{"op": "cancel", "id": "{rid}", "target": NaN}}'.encode(), rid
    if choice == 6:
        return rng.choice([b"[]", b'"hello"', b"42", b"null", b"{}", b"NaN"]), None
    if choice == 7:
        bad = rng.choice(["NaN", "true", "[1]", '{"a": 1}', "null", "1e999"])
        return f'{{"op": "hello", "id": {bad}}}'.encode(), None
    if choice == 8:
        return json.dumps({"op": rng.choice(["", "HELLO", "x" * 300, 5]), "id": rid}).encode(), rid
    if choice == 9:
        return json.dumps({"op": "hello", "id": f"{rid}\ud800"}).encode(), f"{rid}\ud800"
    if choice == 10:
        model = rng.choice(["/etc", "\x00", "x" * 5000, "acme/none", "../../.."])
        return json.dumps({"op": "hello", "id": rid, "model": model}).encode(), rid
    return json.dumps({"op": "release", "id": rid}).encode(), rid


def test_fuzzed_requests_never_stop_the_engine(tmp_path, tiny_model_dir):
    started = time.monotonic()
    files = make_files(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    engine = EngineClient(
        "--device",
        "cpu",
        "--max-seconds",
        "5",
        "--out-root",
        str(out_dir),
        stderr_path=tmp_path / "stderr.log",
    )
    rng = random.Random(SEED)
    codes: dict[str, int] = {"limit_exceeded": 1}
    accepted = lines_sent = 0
    slow: list[tuple[float, int]] = []
    try:
        warm = engine.request(
            valid_generate("warm", str(out_dir / "w.png"), tiny_model_dir, files["mask"])
        )
        assert warm["event"] == "result", warm
        rss_before = rss_mb(engine.proc.pid)
        # One line past the line limit (16 Mi characters): skipped, answered to its id.
        head = b'{"op": "generate", "id": "huge", "layout": {"prompt": "'
        engine.proc.stdin.write(head + b"x" * (MAX_LINE_CHARS + 10) + b'"}}\n')
        engine.proc.stdin.flush()
        huge = engine.until("huge", FINAL, timeout=60)[-1]
        assert (huge["code"], huge["limit"], huge["max"]) == (
            "limit_exceeded",
            "line_chars",
            MAX_LINE_CHARS,
        )
        lines_sent += 1
        for index in range(CASES):
            case_started = time.monotonic()
            expected: list[object] = []
            if rng.random() < 0.3:
                line, rid = raw_case(rng, index)
                engine.proc.stdin.write(line.replace(b"\n", b" ") + b"\n")
                expected.append(rid)
            else:
                rid = f"gen-{index}"
                request = valid_generate(
                    rid, str(out_dir / f"{index}.png"), tiny_model_dir, files["mask"]
                )
                for _ in range(rng.choice([1, 1, 2, 3])):
                    mutate(rng, request, files, out_dir)
                engine.proc.stdin.write(json.dumps(request).encode() + b"\n")
                expected.append(rid)
                if rng.random() < 0.1:  # the same id again while the first may be in flight
                    engine.proc.stdin.write(json.dumps(request).encode() + b"\n")
                    expected.append(rid)
                if rng.random() < 0.1:
                    cancel = {"op": "cancel", "id": f"c-{index}", "target": rid}
                    engine.proc.stdin.write(json.dumps(cancel).encode() + b"\n")
                    expected.append(f"c-{index}")
            probe = f"probe-{index}"
            engine.proc.stdin.write(json.dumps({"op": "hello", "id": probe}).encode() + b"\n")
            engine.proc.stdin.flush()
            lines_sent += len(expected) + 1
            case = line if expected[0] != f"gen-{index}" else json.dumps(request).encode()
            try:
                assert engine.until(probe, FINAL, timeout=60)[-1]["event"] == "hello"
            except AssertionError as exc:
                raise AssertionError(f"case {index} ({case[:300]!r}): {exc}") from None
            for rid in expected:
                try:
                    final = engine.until(rid, FINAL, timeout=60)[-1]
                except AssertionError as exc:
                    raise AssertionError(f"case {index} ({case[:300]!r}): {exc}") from None
                kind = final["event"]
                code = final.get("code", kind)
                codes[code] = codes.get(code, 0) + 1
                accepted += kind == "result"
                if kind == "error":
                    assert code in ERROR_CODES and code != "internal", final
                    assert final["message"]
                    if code == "limit_exceeded":
                        assert final["limit"] and final["max"] is not None, final
            assert engine.proc.poll() is None, engine.stderr_tail()
            slow.append((time.monotonic() - case_started, index))
        # Nothing left over: one more valid generate works and no reply is pending.
        last = engine.request(
            valid_generate("last", str(out_dir / "last.png"), tiny_model_dir, files["alpha"])
        )
        assert last["event"] == "result" and os.path.isfile(out_dir / "last.png")
        growth = rss_mb(engine.proc.pid) - rss_before
        log = engine.stderr_tail(1_000_000)
        # Exactly one final reply per request: nothing beyond what was awaited arrived.
        time.sleep(0.5)
        assert engine._backlog == [] and engine.events.empty(), engine._backlog[:5]
    finally:
        engine.close()
    assert engine.stray_lines == [], "stdout must carry protocol lines only"
    assert "Traceback" not in log, log[-3000:]
    assert codes.get("internal", 0) == 0
    assert accepted >= 10 and len(codes) >= 5, codes
    assert growth < 400, f"engine memory grew by {growth:.0f} MB over {CASES} cases"
    seconds = time.monotonic() - started
    print(f"fuzz: {CASES} cases, {lines_sent} lines, {accepted} accepted, {codes}, {seconds:.0f} s")
    print(f"engine memory: {rss_before:.0f} MB before, {growth:+.0f} MB after")
    print("slowest cases:", sorted(slow)[-3:])
    assert seconds < 170
