"""The add-on's engine session: the checkout's interpreter, Set up engine, the health check and
what the panels read from it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
from blender_scenario import ROOT


def test_default_python_is_the_checkout_venv():
    from blender_addon.client import engine_session

    assert engine_session.checkout_root() == ROOT
    assert engine_session.default_python() == os.path.join(ROOT, ".venv", "bin", "python")
    assert engine_session.resolve_python(os.path.join(ROOT, ".venv")) == os.path.join(
        ROOT, ".venv", "bin", "python"
    )


def test_setup_installs_torch_before_the_engine_from_a_copy_of_the_source(tmp_path):
    from blender_addon.client import engine_session
    from blender_addon.client.torch_choice import Machine, choose_torch

    cpu = choose_torch(Machine("Linux", "x86_64"))
    venv = str(tmp_path / "v")
    commands = engine_session.setup_commands("/usr/bin/python3", venv, ROOT, cpu)
    steps = [step for _, step in commands]
    assert steps[0] == ["/usr/bin/python3", "-m", "venv", venv]
    python = str(tmp_path / "v" / "bin" / "python")
    installs = [
        s for s in steps if isinstance(s, list) and s[:4] == [python, "-m", "pip", "install"]
    ]
    torch_step, engine_step = installs[-2:]
    assert torch_step[-3:] == [cpu.spec, "--index-url", cpu.index_url]
    copy = str(tmp_path / "engine-build")
    assert engine_step[-1] == f"{copy}[engine]"
    assert "--index-url" not in engine_step, "only torch comes from the torch index"
    # pip builds in a copy: the extension's own folder gets no build/ or egg-info.
    copy_step = next(s for s in steps if callable(s))
    copy_step()
    assert engine_session.is_engine_source(copy)
    assert not os.path.exists(os.path.join(copy, ".venv"))


def test_engine_source_is_a_folder_never_a_package_name(tmp_path):
    from blender_addon.client import engine_session

    assert engine_session.shipped_engine_source() == ROOT  # a checkout
    assert engine_session.resolve_engine_source("") == ROOT
    # What older versions stored as the default is read as "the shipped engine".
    assert engine_session.resolve_engine_source("layout-diffusion") == ROOT
    assert engine_session.resolve_engine_source(ROOT + os.sep) == ROOT
    for wrong in ("requests", str(tmp_path)):
        with pytest.raises(engine_session.SetupError, match="is not an engine folder"):
            engine_session.resolve_engine_source(wrong)


def test_setup_refuses_before_downloading_when_space_is_short(tmp_path):
    from blender_addon.client import engine_session
    from blender_addon.client.torch_choice import Machine

    ran = []
    task = engine_session.EngineSetupTask(
        sys.executable,
        str(tmp_path / "venv"),
        ROOT,
        log_path=str(tmp_path / "setup.log"),
        probe=lambda: ran.append("probe") or Machine("Linux", "x86_64", nvidia_driver=550),
    )
    original = engine_session.check_setup

    def little_space(venv, choice, free_bytes=None):
        return original(venv, choice, free_bytes=2 * 10**9)

    engine_session.check_setup = little_space
    try:
        task.start().join(30)
    finally:
        engine_session.check_setup = original
    assert ran == ["probe"] and task.status == "failed"
    assert task.choice.build == "cuda"
    assert "needs about 6.5 GB" in task.error and "2.0 GB free" in task.error
    assert "Environment Folder" in task.error
    assert not os.path.exists(tmp_path / "venv"), "nothing may be created before the checks"


def test_setup_task_runs_in_background_and_reports_the_failing_step(tmp_path):
    from blender_addon.client import engine_session

    gate = threading.Event()
    pip = "print('Progress 5000000 of 10000000'); print('Collecting torch')"
    commands = [
        ("Saying hello", [sys.executable, "-c", "print('hello from step one')"]),
        ("Downloading", [sys.executable, "-c", pip]),
        ("Failing", [sys.executable, "-c", "import sys; print('no wheel'); sys.exit(4)"]),
    ]
    log = tmp_path / "setup.log"
    task = engine_session.SetupTask(commands, log_path=str(log))
    original = task.work
    seen = []

    def work():
        gate.wait(10)
        return original()

    task.work = work
    original_log = task._log

    def watch(line):
        seen.append((round(task.fraction, 3), task.status))
        original_log(line)

    task._log = watch
    task.start()
    assert task.running and not task.done, "the task must not block its caller"
    gate.set()
    task.join(30)
    assert task.done and task.status == "failed"
    assert "Failing failed (exit code 4)" in task.error
    assert "no wheel" in task.error
    assert "hello from step one" in task.log
    # pip's raw progress moves the bar within its step and says how much is downloaded.
    assert (0.5, "2/3 Downloading: 5 of 10 MB") in seen
    written = log.read_text()
    assert "== 1/3 Saying hello" in written and "no wheel" in written


def test_setup_says_which_torch_it_installed():
    from blender_addon.client import engine_session

    result = {"torch": "2.8.0+cu126", "device": "cuda", "gpu": "RTX 4090", "hip": None}
    assert engine_session.describe_setup(result) == (
        "Engine installed: torch 2.8.0+cu126, runs on CUDA (RTX 4090)"
    )
    cpu = {"torch": "2.8.0+cpu", "device": "cpu", "gpu": ""}
    assert (
        engine_session.describe_setup(cpu) == "Engine installed: torch 2.8.0+cpu, runs on the CPU"
    )
    # The check script prints exactly what describe_setup reads, with this venv's torch.
    done = subprocess.run(
        [sys.executable, "-c", engine_session.CHECK_SCRIPT],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    reported = json.loads(done.stdout.strip().splitlines()[-1])
    assert reported["device"] == "cpu" and reported["torch"]


def test_health_check_reports_missing_interpreter(tmp_path):
    from blender_addon.client import engine_session

    task = engine_session.HealthCheckTask(str(tmp_path / "nope" / "python"), "shapes").start()
    task.join(30)
    assert task.error and "Set up engine" in task.error


def test_health_check_asks_the_real_engine(tiny_model_dir):
    from blender_addon.client import engine_session

    try:
        task = engine_session.HealthCheckTask(engine_session.default_python(), tiny_model_dir)
        task.start().join(300)
        assert task.error is None and task.status == "done"
        lines = engine_session.describe_hello(task.result)
    finally:
        engine_session.shutdown()
    assert lines[0].startswith("Engine 0.1.0 (protocol 2) on cpu, float32")
    assert lines[-1] == "Files: the engine reads Blender's files where they are"
    assert lines[1] == f"Model '{tiny_model_dir}' found: {tiny_model_dir}"
    assert engine_session.current_client() is None


def test_describe_hello_lists_model_state():
    from blender_addon.client.engine_session import describe_hello

    lines = describe_hello(
        {
            "engine_version": "0.1.0",
            "protocol": 1,
            "device": "cpu",
            "dtype": "float32",
            "model": {"spec": "big", "found": False, "message": "not in the cache"},
        }
    )
    assert lines == [
        "Engine 0.1.0 (protocol 1) on cpu, float32",
        "Model 'big' not found: not in the cache",
    ]


def test_model_default_comes_from_the_check_made_with_that_model():
    from blender_addon.client.engine_session import model_default

    reply = {
        "model": {"spec": "shapes", "found": True, "layout_defaults": {"reference_fraction": 0.4}}
    }
    assert model_default("reference_fraction", "shapes", reply) == 0.4
    assert model_default("reference_fraction", "other", reply) is None
    assert model_default("steps", "shapes", reply) is None
    assert model_default("reference_fraction", "shapes", {}) is None


def test_condition_state_reads_the_last_health_check():
    from blender_addon.client.engine_session import condition_state, describe_hello, has_capability

    reply = {
        "engine_version": "0.1.0",
        "protocol": 1,
        "device": "cpu",
        "dtype": "float32",
        "capabilities": ["attention", "latent", "cancel", "controlnet"],
        "conditions": {
            "controlnet": {"available": True, "spec": "/m/cn", "message": "/m/cn"},
            "ip_adapter": {"available": False, "spec": "/m/ip", "message": "no weights in /m/ip"},
        },
    }
    assert condition_state("controlnet", "/m/cn", reply) == (
        True,
        "Depth ControlNet found: /m/cn",
    )
    assert condition_state("ip_adapter", "/m/ip", reply) == (
        False,
        "IP-Adapter unavailable: no weights in /m/ip",
    )
    # A check made with another spec says nothing about this one.
    assert condition_state("controlnet", "/other", reply)[0] is None
    assert condition_state("controlnet", "", reply) == (False, "No Depth ControlNet set")
    assert condition_state("controlnet", "/m/cn", {})[0] is None
    assert has_capability("latent", reply) is True
    assert has_capability("latent", {"capabilities": ["attention"]}) is False
    assert has_capability("latent", {}) is None
    assert describe_hello(reply)[1:] == [
        "Region modes: attention, latent",
        "Depth ControlNet: available (/m/cn)",
        "IP-Adapter: unavailable: no weights in /m/ip",
    ]


def test_check_engine_names_the_addons_fields_not_the_engines_flags():
    from blender_addon.client.engine_session import describe_hello

    reply = {
        "model": {
            "spec": "/m/x.safetensors",
            "found": False,
            "message": "building it needs configs; Pass --config with a diffusers folder",
        },
        "conditions": {
            "gligen": {
                "available": False,
                "spec": None,
                "message": "no GLIGEN model configured; start the engine with --gligen or send "
                "options.gligen with a request",
            },
        },
    }
    lines = describe_hello(reply)[1:]
    assert lines == [
        "Model '/m/x.safetensors' not found: building it needs configs; Set Model Config "
        "(3D View sidebar > Layout Diffusion) to a diffusers folder",
        "GLIGEN: unavailable: no GLIGEN model configured; set GLIGEN under 3D View sidebar > "
        "Layout Diffusion > Conditions",
    ]
