"""``engine serve`` as a real subprocess: handshake, generation, cancel, errors, shutdown."""

from __future__ import annotations

import os

import pytest
from PIL import Image
from serve_client import EngineClient

from engine.service.provenance import layout_from_png, read_provenance
from engine.wire.protocol import PROTOCOL_VERSION


@pytest.fixture(scope="module")
def mask_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("masks") / "left.png"
    image = Image.new("L", (64, 64), 0)
    image.paste(255, (0, 0, 32, 64))
    image.save(path)
    return str(path)


def layout(mask: str | None = None, **overrides) -> dict:
    data = {
        "prompt": "a red circle on grey",
        "width": 64,
        "height": 64,
        "steps": 3,
        "seed": 5,
        "regions": [{"prompt": "a red circle", "box": [0.0, 0.0, 0.5, 1.0], "mask": mask}],
    }
    data.update(overrides)
    return data


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    logs = tmp_path_factory.mktemp("serve-logs")
    client = EngineClient("--device", "cpu", stderr_path=logs / "stderr.log")
    yield client
    client.close()
    assert client.stray_lines == [], "stdout must carry protocol lines only"


def test_hello_reports_protocol_device_and_model_presence(engine, tiny_model_dir, tmp_path):
    reply = engine.request({"op": "hello", "id": "h1"}, timeout=120)
    assert reply["event"] == "hello"
    assert reply["protocol"] == PROTOCOL_VERSION
    assert (reply["device"], reply["dtype"]) == ("cpu", "float32")
    assert {"attention", "cancel", "release"} <= set(reply["capabilities"])
    assert "model" not in reply

    found = engine.request({"op": "hello", "id": "h2", "model": tiny_model_dir})["model"]
    assert found == {
        "spec": tiny_model_dir,
        "found": True,
        "path": os.path.abspath(tiny_model_dir),
        "message": found["message"],
        "layout_defaults": {"reference_fraction": 0.1},
        "native_size": 64,
    }
    shapes = engine.request({"op": "hello", "id": "h4", "model": "shapes"})["model"]
    assert shapes["layout_defaults"] == {"reference_fraction": 0.4}
    # The shapes model declares the side it composes at (it was trained at 64 px).
    assert shapes["native_size"] == 640
    missing = str(tmp_path / "no-such-model")
    report = engine.request({"op": "hello", "id": "h3", "model": missing})["model"]
    assert report["found"] is False and report["path"] is None
    assert missing in report["message"]
    # A health check must not load anything.
    assert engine.request({"op": "hello", "id": "h4"})["loaded_model"] is None


def test_second_generate_reuses_the_loaded_model(engine, tiny_model_dir, mask_path, tmp_path):
    first_out, second_out = str(tmp_path / "one.png"), str(tmp_path / "two.png")
    engine.send(
        {
            "op": "generate",
            "id": "g1",
            "model": tiny_model_dir,
            "layout": layout(mask_path),
            "out": first_out,
        }
    )
    # Sent while the first runs: no model named, so the last one is used; it must wait its turn.
    engine.send(
        {"op": "generate", "id": "g2", "layout": layout(mask_path, seed=6), "out": second_out}
    )

    first = engine.until("g1", {"result", "error"}, timeout=300)
    kinds = [e["event"] for e in first]
    assert kinds[0] == "loading" and kinds[-1] == "result", first
    progress = [(e["step"], e["total"]) for e in first if e["event"] == "progress"]
    assert progress == [(1, 3), (2, 3), (3, 3)]
    result = first[-1]
    assert result["path"] == first_out and result["seed"] == 5
    assert (result["width"], result["height"]) == (64, 64)
    assert result["load_seconds"] > 0 and result["seconds"] > 0

    second = engine.until("g2", {"result", "error"}, timeout=300)
    kinds = [e["event"] for e in second]
    assert kinds == ["queued", "progress", "progress", "progress", "result"], second
    assert second[0]["position"] == 1
    assert second[-1]["load_seconds"] == 0
    assert second[-1]["seed"] == 6

    with Image.open(second_out) as image:
        assert image.size == (64, 64)
    assert layout_from_png(second_out).seed == 6
    assert engine.request({"op": "hello", "id": "h"})["loaded_model"] == tiny_model_dir


def test_cancel_stops_within_a_step_and_keeps_the_model(engine, tiny_model_dir, tmp_path):
    out = str(tmp_path / "cancelled.png")
    engine.send(
        {
            "op": "generate",
            "id": "long",
            "model": tiny_model_dir,
            "layout": layout(steps=40),
            "out": out,
        }
    )
    events = engine.until("long", {"progress", "error"}, timeout=300)
    assert events[-1]["event"] == "progress", events
    engine.send({"op": "cancel", "id": "c1"})
    ack = engine.until("c1", {"ack"})[-1]
    assert ack == {"id": "c1", "event": "ack", "op": "cancel", "target": "long", "found": True}
    after = engine.until("long", {"cancelled", "result", "error"}, timeout=120)
    assert after[-1] == {"id": "long", "event": "cancelled"}
    # Only the step already under way when the cancel arrived may still finish: at most one
    # progress event follows the acknowledgement in the engine's (single, ordered) output.
    acked = engine.seen.index(ack)
    late_steps = [e for e in engine.seen[acked:] if e["id"] == "long" and e["event"] == "progress"]
    assert len(late_steps) <= 1, late_steps
    assert max(e["step"] for e in events + after if e["event"] == "progress") < 40
    assert not os.path.exists(out)

    # Nothing left to cancel: acknowledged, but not found.
    late = engine.request({"op": "cancel", "id": "c2", "target": "long"})
    assert late["found"] is False

    ok = engine.request(
        {"op": "generate", "id": "after", "layout": layout(), "out": str(tmp_path / "ok.png")},
        timeout=300,
    )
    assert ok["event"] == "result" and ok["load_seconds"] == 0


@pytest.mark.parametrize(
    "request_line, code, field, words",
    [
        ('{"op": "hello", "id": 1', "bad_json", None, "not valid JSON"),
        ('{"op": "paint", "id": 2}', "unknown_op", "op", "known ops"),
        ('["hello"]', "bad_request", None, "JSON object"),
        ('{"op": "hello"}', "bad_request", "id", "'id'"),
        (
            '{"op": "generate", "id": 3, "out": "/tmp/x.png", "layout": {"prompt": "p", '
            '"regions": [{"prompt": "a", "box": [0.1, 0.1, NaN, 0.5]}]}}',
            "bad_layout",
            "layout.regions[0].box",
            "finite",
        ),
        (
            '{"op": "generate", "id": 4, "out": "/tmp/x.png", "layout": {"prompt": "p", '
            '"regions": [{"prompt": "a", "box": [0.3, 0.3, 0.3, 0.6]}]}}',
            "bad_layout",
            "layout.regions[0].box",
            "no area",
        ),
        (
            '{"op": "generate", "id": 5, "out": "/tmp/x.png", "layout": {"prompt": "p", '
            '"regions": [{"prompt": "a", "box": [1.2, 0.1, 1.5, 0.4]}]}}',
            "bad_layout",
            "layout.regions[0].box",
            "entirely outside",
        ),
        (
            '{"op": "generate", "id": 6, "out": "/tmp/x.png", '
            '"layout": {"prompt": "p", "width": 2049, "height": 17}}',
            "bad_layout",
            "layout.height",
            "between 64 and 4096, got 17",
        ),
        (
            '{"op": "generate", "id": 7, "out": "/tmp/x.png", "layout": {"prompt": "p", '
            '"regions": [{"prompt": "a", "box": [0, 0, 1, 1], "mask": "/nonexistent/m.png"}]}}',
            "bad_layout",
            "layout.regions[0].mask",
            "/nonexistent/m.png",
        ),
        (
            '{"op": "generate", "id": 8, "out": "/tmp/x.png", "model": "/nonexistent/model", '
            '"layout": {"prompt": "p"}}',
            "model_not_found",
            None,
            "/nonexistent/model",
        ),
        (
            '{"op": "generate", "id": 9, "out": "x.png", "layout": {"prompt": "p"}}',
            "bad_request",
            "out",
            "absolute",
        ),
        (
            '{"op": "generate", "id": 10, "out": "/tmp/x.png"}',
            "bad_request",
            "layout",
            "inline Layout",
        ),
        (
            '{"op": "hello", "id": 11, "options": {"device": "cuda"}}',
            "bad_device",
            "device",
            "not available",
        ),
    ],
)
def test_bad_request_gets_a_structured_error_and_the_server_stays_up(
    engine, request_line, code, field, words
):
    engine.send_line(request_line)
    reply = engine.next_event(timeout=60)
    assert reply["event"] == "error", reply
    assert reply["code"] == code
    assert reply.get("field") == field
    assert words in reply["message"]
    assert engine.request({"op": "hello", "id": "still-up"})["event"] == "hello"


def test_release_unloads_and_next_generate_loads_again(engine, tiny_model_dir, tmp_path):
    engine.request(
        {
            "op": "generate",
            "id": "warm",
            "model": tiny_model_dir,
            "layout": layout(steps=1),
            "out": str(tmp_path / "a.png"),
        },
        timeout=300,
    )
    ack = engine.request({"op": "release", "id": "r"})
    assert ack == {"id": "r", "event": "ack", "op": "release", "released": True}
    assert engine.request({"op": "hello", "id": "h"})["loaded_model"] is None
    engine.send(
        {"op": "generate", "id": "cold", "layout": layout(steps=1), "out": str(tmp_path / "b.png")}
    )
    events = engine.until("cold", {"result", "error"}, timeout=300)
    assert [e["event"] for e in events] == ["loading", "progress", "result"]
    assert events[-1]["load_seconds"] > 0


def test_output_that_cannot_be_written_is_reported(engine, tiny_model_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    reply = engine.request(
        {
            "op": "generate",
            "id": "unwritable",
            "model": tiny_model_dir,
            "layout": layout(steps=1),
            "out": str(blocker / "x.png"),
        },
        timeout=300,
    )
    assert (reply["event"], reply["code"], reply["field"]) == ("error", "bad_request", "out")
    assert str(blocker) in reply["message"] and "is not a folder" in reply["message"]


def test_queue_limit_then_shutdown_cancels_everything(tmp_path, tiny_model_dir):
    client = EngineClient("--device", "cpu", stderr_path=tmp_path / "stderr.log")
    try:
        running = {
            "op": "generate",
            "id": "run",
            "model": tiny_model_dir,
            "layout": layout(steps=200),
            "out": str(tmp_path / "run.png"),
        }
        client.send(running)
        assert client.until("run", {"progress", "error"}, timeout=300)[-1]["event"] == "progress"
        for n in range(5):
            client.send({**running, "id": f"wait{n}", "out": str(tmp_path / f"{n}.png")})
        positions = [client.until(f"wait{n}", {"queued"})[-1]["position"] for n in range(4)]
        assert positions == [1, 2, 3, 4]
        refused = client.until("wait4", {"error"})[-1]
        assert refused["code"] == "busy" and "cancel one" in refused["message"]

        client.send({"op": "shutdown", "id": "bye"})
        for job in ["wait0", "wait1", "wait2", "wait3", "run"]:
            assert client.until(job, {"cancelled", "result", "error"})[-1]["event"] == "cancelled"
        assert client.until("bye", {"ack"})[-1] == {"id": "bye", "event": "ack", "op": "shutdown"}
        assert client.wait(timeout=60) == 0
    finally:
        client.close()
    assert client.stray_lines == []
    assert not any(tmp_path.glob("*.png"))


def test_end_of_input_exits_zero(tmp_path):
    client = EngineClient(stderr_path=tmp_path / "stderr.log")
    try:
        client.send({"op": "hello", "id": 1})
        client.proc.stdin.close()
        assert client.next_event(timeout=120)["event"] == "hello"
        assert client.wait(timeout=60) == 0
    finally:
        client.close()


def test_out_of_memory_becomes_advice_not_a_crash(tmp_path):
    import torch

    from engine.errors import OutOfMemoryError, is_out_of_memory
    from engine.service.generate import run_generation
    from engine.wire.layout import Layout

    class Exhausted:
        # What run_generation reads of a RegionalSDXLPipeline before calling it.
        scheduler = name_or_path = model_defaults = None
        depth_controlnet = object_image_adapter = gligen_pipeline = None

        def __call__(self, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    out = tmp_path / "x.png"
    with pytest.raises(OutOfMemoryError) as error:
        run_generation(Exhausted(), Layout(prompt="p", width=1024, height=768), str(out), "m")
    assert error.value.code == "out_of_memory"
    assert "1024x768" in str(error.value) and "--cpu-offload" in str(error.value)
    assert not out.exists()
    assert is_out_of_memory(RuntimeError("MPS backend out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_stray_prints_go_to_stderr_not_the_protocol():
    import subprocess
    import sys

    from serve_client import ROOT, engine_env

    script = (
        "import os\n"
        "from engine.service.serve import protocol_streams\n"
        "lines_in, out = protocol_streams()\n"
        "print('python print')\n"
        "os.write(1, b'C-level write\\n')\n"
        "out.write('{\"id\": 1}\\n'); out.flush()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=engine_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == '{"id": 1}\n'
    assert "python print" in done.stderr and "C-level write" in done.stderr


def test_depth_controlnet_and_region_images_through_serve(
    engine, tiny_model_dir, tiny_controlnet_dir, tiny_ip_adapter_dir, condition_images, tmp_path
):
    options = {"controlnet": tiny_controlnet_dir, "ip_adapter": tiny_ip_adapter_dir}
    hello = engine.request({"op": "hello", "id": "c0", "options": options})
    assert {"controlnet", "ip_adapter"} <= set(hello["capabilities"])
    assert hello["conditions"]["controlnet"]["available"] is True
    plain = engine.request({"op": "hello", "id": "c1"})
    assert not {"controlnet", "ip_adapter"} & set(plain["capabilities"])
    assert "--controlnet" in plain["conditions"]["controlnet"]["message"]

    data = layout(depth=condition_images["depth"], depth_scale=0.8, depth_end=0.9)
    data["regions"][0].update(image=condition_images["reference"], image_scale=0.7, depth_scale=0.0)
    out = str(tmp_path / "conditioned.png")
    request = {"op": "generate", "model": tiny_model_dir, "layout": data, "out": out}
    reply = engine.request({**request, "id": "c2", "options": options}, timeout=300)
    assert reply["event"] == "result", reply
    assert reply["conditions"] == {
        "controlnet": {
            "model": tiny_controlnet_dir,
            "scale": 0.8,
            "start": 0.0,
            "end": 0.9,
            "region_scales": [0.0],
        },
        "ip_adapter": {"model": tiny_ip_adapter_dir, "images": 1},
        "reference": None,
    }
    record = read_provenance(out)
    assert record["conditions"] == reply["conditions"]
    assert record["layout"]["regions"][0]["image"] == condition_images["reference"]
    assert record["layout"]["depth_scale"] == 0.8
    assert "ControlNet: tiny-controlnet, ControlNet condition: depth" in record["parameters"]

    # Without an IP-Adapter the region image is refused at once, naming the field.
    refused = engine.request({**request, "id": "c3"})
    assert (refused["code"], refused["field"]) == ("bad_layout", "layout.regions[0].image")
    missing = {"controlnet": str(tmp_path / "no-controlnet")}
    refused = engine.request({**request, "id": "c4", "options": missing})
    assert (refused["code"], refused["field"]) == ("model_not_found", "controlnet")

    # The depth map alone, with no ControlNet configured, is simply not used.
    data["regions"][0]["image"] = None
    reply = engine.request({**request, "id": "c5", "layout": data}, timeout=300)
    assert reply["conditions"] == {"controlnet": None, "ip_adapter": None, "reference": None}
