"""``engine serve`` protocol 2: files and the result PNG inline, the file-sharing probe, and
version 1 requests unchanged."""

from __future__ import annotations

import base64
import hashlib
import os

import pytest
from PIL import Image
from serve_client import EngineClient, engine_env

from engine.service.provenance import read_provenance
from engine.wire.inline import encode_file
from engine.wire.protocol import (
    MAX_INLINE_FILE_BYTES,
    MAX_INLINE_REQUEST_BYTES,
    PROTOCOL_VERSION,
)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("client-files")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    mask.save(folder / "left.png")
    init = Image.new("RGB", (64, 64), (90, 120, 200))
    init.save(folder / "init.png")
    return {"mask": str(folder / "left.png"), "init": str(folder / "init.png")}


@pytest.fixture(scope="module")
def engine_tmp(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("engine-tmp"))


@pytest.fixture(scope="module")
def engine(tmp_path_factory, engine_tmp):
    logs = tmp_path_factory.mktemp("serve-logs")
    client = EngineClient(
        "--device", "cpu", stderr_path=logs / "stderr.log", env=engine_env(TMPDIR=engine_tmp)
    )
    yield client
    client.close()
    assert client.stray_lines == [], "stdout must carry protocol lines only"


def layout(images: dict[str, str], steps: int = 2) -> dict:
    return {
        "prompt": "a red circle on grey",
        "width": 64,
        "height": 64,
        "steps": steps,
        "seed": 5,
        "init_image": images["init"],
        "strength": 0.8,
        "regions": [
            {"prompt": "a red circle", "box": [0.0, 0.0, 0.5, 1.0], "mask": images["mask"]},
            {"prompt": "a blue square", "box": [0.5, 0.0, 1.0, 1.0]},
        ],
    }


def inline_files(*paths: str) -> list[dict]:
    files = []
    for path in paths:
        with open(path, "rb") as handle:
            files.append({"path": path, **encode_file(handle.read())})
    return files


def test_inline_files_and_result_give_the_bytes_of_a_version_1_request(
    engine, tiny_model_dir, images, engine_tmp, tmp_path
):
    hello = engine.request({"op": "hello", "id": "h"}, timeout=120)
    assert hello["protocol"] == PROTOCOL_VERSION == 2
    assert hello["limits"]["inline_file_bytes"] == MAX_INLINE_FILE_BYTES
    assert hello["limits"]["inline_request_bytes"] == MAX_INLINE_REQUEST_BYTES
    assert hello["shares_files"] is None, "without a probe the engine cannot know"

    # A version 1 client: paths the engine reads, a PNG the engine writes.
    out = str(tmp_path / "v1.png")
    old = {"op": "generate", "id": "v1", "layout": layout(images), "out": out}
    v1 = engine.request({**old, "model": tiny_model_dir}, timeout=300)
    assert v1["event"] == "result" and v1["path"] == out and "png" not in v1
    with open(out, "rb") as handle:
        local_png = handle.read()

    request = {
        "op": "generate",
        "id": "v2",
        "protocol": 2,
        "layout": layout(images),
        "files": inline_files(images["mask"], images["init"]),
        "result": "inline",
    }
    v2 = engine.request(request, timeout=300)
    assert v2["event"] == "result", v2
    assert v2["path"] is None
    png = base64.b64decode(v2["png"]["data"])
    assert len(png) == v2["png"]["bytes"]
    assert hashlib.sha256(png).hexdigest() == v2["png"]["sha256"]
    # The provenance names the client's paths, so the PNG is byte for byte the local one.
    assert png == local_png
    assert os.listdir(engine_tmp) == [], "the request's temporary folder must be removed"

    record = read_provenance(out)
    assert record["layout"]["regions"][0]["mask"] == images["mask"]


def test_inline_file_errors_name_the_field_and_keep_the_engine_up(
    engine, tiny_model_dir, images, engine_tmp
):
    def refused(request_id: str, **fields) -> dict:
        request = {
            "op": "generate",
            "id": request_id,
            "layout": layout(images),
            "result": "inline",
            "model": tiny_model_dir,
            **fields,
        }
        reply = engine.request(request, timeout=120)
        assert reply["event"] == "error", reply
        assert os.listdir(engine_tmp) == []
        return reply

    files = inline_files(images["mask"], images["init"])
    changed = [{**files[0], "sha256": hashlib.sha256(b"other").hexdigest()}, files[1]]
    reply = refused("sha", files=changed)
    assert (reply["code"], reply["field"]) == ("bad_request", "files[0].sha256")
    assert "send it again" in reply["message"]

    cut = [{**files[0], "data": files[0]["data"][:-8]}, files[1]]
    assert refused("cut", files=cut)["code"] == "bad_request"

    stranger = [*files, {"path": "/elsewhere/x.png", **encode_file(b"x")}]
    reply = refused("stranger", files=stranger)
    assert reply["field"] == "files[2].path" and "the Layout names" in reply["message"]

    assert refused("twice", files=[files[0], files[0]])["field"] == "files[1].path"

    # The engine's own checks of the files name the client's path, not its temporary copy.
    broken = os.path.join(os.path.dirname(images["mask"]), "broken.png")
    with open(broken, "wb") as handle:
        handle.write(b"not an image")
    data = layout(images)
    data["regions"][0]["mask"] = broken
    reply = refused("broken", layout=data, files=inline_files(broken, images["init"]))
    assert (reply["code"], reply["field"]) == ("bad_layout", "layout.regions[0].mask")
    assert "broken.png" in reply["message"] and "ld-request-" not in reply["message"]

    reply = refused("out", files=files, out="/tmp/x.png")
    assert reply["field"] == "out" and "leave 'out' out" in reply["message"]

    big = bytes(MAX_INLINE_FILE_BYTES + 1)
    reply = refused("big", files=[{"path": images["mask"], **encode_file(big)}, files[1]])
    assert reply["code"] == "limit_exceeded"
    assert (reply["limit"], reply["max"]) == ("inline_file_bytes", MAX_INLINE_FILE_BYTES)
    assert reply["field"] == "files[0].bytes" and "smaller" in reply["message"]

    claimed = [{**f, "bytes": MAX_INLINE_REQUEST_BYTES // 2 + 1} for f in files]
    reply = refused("total", files=claimed)
    assert (reply["limit"], reply["max"]) == ("inline_request_bytes", MAX_INLINE_REQUEST_BYTES)

    newer = engine.request({"op": "hello", "id": "newer", "protocol": 3})
    assert newer["code"] == "bad_request" and "update the engine" in newer["message"]
    assert engine.request({"op": "hello", "id": "still-up"})["event"] == "hello"


def test_probe_says_whether_the_engine_reads_the_clients_files(engine, tmp_path):
    token = "a3f1c2d4e5b6a7980112233445566778"
    probe = tmp_path / "probe"
    probe.write_text(token)
    ask = {"op": "hello", "probe": {"path": str(probe), "token": token}}
    assert engine.request({**ask, "id": "p1"})["shares_files"] is True

    other = {"path": str(probe), "token": "b" * 32}
    assert engine.request({**ask, "id": "p2", "probe": other})["shares_files"] is False
    gone = {"path": str(tmp_path / "missing"), "token": token}
    assert engine.request({**ask, "id": "p3", "probe": gone})["shares_files"] is False
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        pipe = {"path": str(fifo), "token": token}
        # A pipe nobody writes to must not block the engine.
        assert (
            engine.request({**ask, "id": "p4", "probe": pipe}, timeout=10)["shares_files"] is False
        )
    short = engine.request({**ask, "id": "p5", "probe": {"path": str(probe), "token": "x"}})
    assert short["code"] == "bad_request" and short["field"] == "probe.token"


def test_cancelling_a_queued_inline_generate_removes_its_files(
    engine, tiny_model_dir, images, engine_tmp
):
    base = {"op": "generate", "result": "inline", "model": tiny_model_dir}
    engine.send({**base, "id": "long", "layout": layout(images, steps=200)})
    engine.until("long", {"progress"}, timeout=300)
    files = inline_files(images["mask"], images["init"])
    engine.send({**base, "id": "queued", "layout": layout(images), "files": files})
    assert engine.until("queued", {"queued"})[-1]["position"] == 1
    assert len(os.listdir(engine_tmp)) == 2
    engine.send({"op": "cancel", "id": "c1", "target": "queued"})
    assert engine.until("queued", {"cancelled"})[-1]["event"] == "cancelled"
    engine.send({"op": "cancel", "id": "c2", "target": "long"})
    assert engine.until("long", {"cancelled", "result"})[-1]["event"] == "cancelled"
    assert os.listdir(engine_tmp) == []
