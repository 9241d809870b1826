"""The add-on's client with a "remote" engine: an engine command that cannot see the client's
files (``tests/fixtures/remote_engine.py``, a stand-in for ``ssh gpu-box python -m engine
serve``), on the tiny model."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import tempfile
import time

import pytest
from blender_scenario import ROOT
from PIL import Image

from blender_addon.client.engine_client import (
    ENGINE_GONE,
    ENGINE_TOO_OLD,
    NOT_INSTALLED,
    RESULT_DAMAGED,
    EngineClient,
    EngineError,
    parse_command,
)
from blender_addon.client.engine_session import (
    HealthCheckTask,
    describe_hello,
    get_client,
    shutdown,
)
from engine.wire.inline import encode_file
from engine.wire.protocol import LIMIT_EXCEEDED

WRAPPER = os.path.join(ROOT, "tests", "fixtures", "remote_engine.py")


@pytest.fixture
def client_dir(tmp_path, monkeypatch) -> str:
    """The client's own folder, its temporary folder too (the probe file goes there)."""
    folder = tmp_path / "client"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return str(folder)


def remote_command(tmp_path, client_dir: str) -> list[str]:
    home = tmp_path / "remote"
    return [
        sys.executable,
        WRAPPER,
        "--home",
        str(home),
        "--hide",
        client_dir,
        "--pid-file",
        str(tmp_path / "engine.pid"),
    ]


def layout(client_dir: str, steps: int = 2) -> dict:
    mask = os.path.join(client_dir, "mask.png")
    if not os.path.exists(mask):
        image = Image.new("L", (64, 64), 0)
        image.paste(255, (0, 0, 32, 64))
        image.save(mask)
        Image.new("RGB", (64, 64), (200, 80, 40)).save(os.path.join(client_dir, "init.png"))
    return {
        "prompt": "a red circle and a blue square on grey",
        "width": 64,
        "height": 64,
        "steps": steps,
        "seed": 11,
        "init_image": os.path.join(client_dir, "init.png"),
        "strength": 0.9,
        "regions": [
            {"prompt": "a red circle", "box": [0.0, 0.0, 0.5, 1.0], "mask": mask},
            {"prompt": "a blue square", "box": [0.5, 0.5, 1.0, 1.0]},
        ],
    }


def run(client: EngineClient, data: dict, out: str, model: str) -> dict:
    final = client.generate(data, out, model).wait(300)
    assert final["event"] == "result", final
    return final


def request_folders(tmp_path) -> list[str]:
    folder = tmp_path / "remote" / "tmp"
    return [name for name in os.listdir(folder) if name.startswith("ld-request-")]


def test_remote_engine_gives_the_pixels_of_a_local_one(tmp_path, client_dir, tiny_model_dir):
    data = layout(client_dir)
    local_out = os.path.join(client_dir, "local.png")
    with EngineClient(sys.executable, cwd=ROOT) as local:
        assert local.hello()["shares_files"] is True
        assert not local.inline_files
        run(local, data, local_out, tiny_model_dir)

    remote = EngineClient("", command=remote_command(tmp_path, client_dir))
    try:
        hello = remote.hello()
        assert hello["shares_files"] is False, "the wrapper hides the client's files"
        assert remote.protocol == 2
        probes = [name for name in os.listdir(client_dir) if name.startswith("ld-probe-")]
        assert probes == [], "the probe file goes once the engine has answered"
        assert remote.inline_files
        remote_out = os.path.join(client_dir, "out", "remote.png")
        os.makedirs(os.path.dirname(remote_out))
        final = run(remote, data, remote_out, tiny_model_dir)
        assert final["path"] == remote_out and "png" not in final
        # The provenance names the client's files: the whole PNG is the local one.
        with open(local_out, "rb") as a, open(remote_out, "rb") as b:
            assert a.read() == b.read()
        assert list(Image.open(remote_out).getdata()) == list(Image.open(local_out).getdata())
        assert request_folders(tmp_path) == [], "the engine removes each request's files"
        assert sorted(os.listdir(os.path.dirname(remote_out))) == ["remote.png"]
    finally:
        remote.close()


def test_local_engine_that_cannot_see_the_files_gets_them_inline(
    tmp_path, client_dir, tiny_model_dir
):
    # An interpreter setting, not an engine command: the probe decides.
    args = remote_command(tmp_path, client_dir)[1:]
    with EngineClient(sys.executable, args=args) as engine:
        assert not engine.inline_files, "a local engine is taken to share files until probed"
        assert engine.hello()["shares_files"] is False
        assert engine.inline_files
        out = os.path.join(client_dir, "probed.png")
        assert run(engine, layout(client_dir), out, tiny_model_dir)["path"] == out
        assert Image.open(out).size == (64, 64)


def test_dropped_connection_mid_generation_then_the_next_request_reconnects(
    tmp_path, client_dir, tiny_model_dir
):
    remote = EngineClient("", command=remote_command(tmp_path, client_dir))
    try:
        out = os.path.join(client_dir, "dropped.png")
        job = remote.generate(layout(client_dir, steps=400), out, tiny_model_dir)
        deadline = time.monotonic() + 180
        while not any(e["event"] == "progress" for e in job.poll()):
            assert time.monotonic() < deadline, "no progress from the remote engine"
            time.sleep(0.05)
        first = remote.pid
        with open(tmp_path / "engine.pid", encoding="ascii") as handle:
            engine_pid = int(handle.read())
        os.kill(first, signal.SIGKILL)  # the SSH connection drops
        final = job.wait(30)
        assert final["event"] == "error" and final["code"] == ENGINE_GONE
        assert "connection to the engine ended" in final["message"]
        assert "starts again on the next request" in final["message"]
        assert not os.path.exists(out)

        # The engine on the far side finds no reader and stops instead of computing on.
        deadline = time.monotonic() + 60
        while _running(engine_pid):
            assert time.monotonic() < deadline, "the orphaned engine kept running"
            time.sleep(0.2)
        assert request_folders(tmp_path) == []

        again = run(remote, layout(client_dir), out, tiny_model_dir)
        assert again["path"] == out and remote.pid != first
        assert Image.open(out).size == (64, 64)
    finally:
        remote.close()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            return "\nState:\tZ" not in handle.read()
    except FileNotFoundError:
        return False


def test_inline_limits_and_a_damaged_result_are_clear_errors(tmp_path, client_dir):
    remote = EngineClient("", command=remote_command(tmp_path, client_dir))
    remote.limits = {"inline_file_bytes": 100, "inline_request_bytes": 1000}
    with pytest.raises(EngineError) as info:
        remote.generate(layout(client_dir), os.path.join(client_dir, "x.png"))
    assert info.value.code == LIMIT_EXCEEDED
    assert "init.png is" in info.value.message and "at most 100 bytes" in info.value.message
    assert "smaller image" in info.value.message
    assert not remote.alive, "nothing is sent (or started) for a request over the limits"
    remote.limits, remote.protocol = {}, 1
    with pytest.raises(EngineError) as info:
        remote.generate(layout(client_dir), os.path.join(client_dir, "x.png"))
    assert info.value.code == ENGINE_TOO_OLD and "update the engine" in info.value.message

    out = os.path.join(client_dir, "damaged.png")
    png = encode_file(b"\x89PNG not really")
    damaged = remote._land_result({"id": 1, "event": "result", "png": {**png, "bytes": 3}}, out)
    assert damaged["event"] == "error" and damaged["code"] == RESULT_DAMAGED
    assert not os.path.exists(out)
    landed = remote._land_result({"id": 1, "event": "result", "png": png, "path": None}, out)
    assert landed["path"] == out and "png" not in landed
    with open(out, "rb") as handle:
        assert handle.read() == b"\x89PNG not really"


def test_engine_command_is_split_like_a_shell_and_a_missing_program_says_so(tmp_path):
    assert parse_command("ssh gpu-box '/opt/l d/python' -m engine serve") == [
        "ssh",
        "gpu-box",
        "/opt/l d/python",
        "-m",
        "engine",
        "serve",
    ]
    with pytest.raises(ValueError, match="cannot be read"):
        parse_command("ssh 'gpu-box")
    missing = EngineClient("", command=str(tmp_path / "no-ssh") + " host python -m engine serve")
    with pytest.raises(EngineError) as info:
        missing.start()
    assert info.value.code == NOT_INSTALLED and "no-ssh" in info.value.message


def test_session_uses_the_engine_command_when_set(tmp_path, client_dir):
    command = f"{sys.executable} -c 'import sys; sys.exit(0)'"
    try:
        client = get_client("", command)
        assert client.command == (sys.executable, "-c", "import sys; sys.exit(0)")
        assert client.inline_files
        assert get_client("", command) is client
        assert get_client(sys.executable, "").command == ()
    finally:
        shutdown()


def test_check_engine_through_the_engine_command(tmp_path, client_dir, tiny_model_dir):
    command = shlex.join(remote_command(tmp_path, client_dir))
    try:
        task = HealthCheckTask("", tiny_model_dir, None, command).start()
        task.join(300)
        assert task.done and task.error is None, task.error
        assert task.result["model"]["found"] is True
        lines = describe_hello(task.result)
        assert lines[-1] == "Files: sent with each request (the engine does not see this machine's)"
    finally:
        shutdown()
