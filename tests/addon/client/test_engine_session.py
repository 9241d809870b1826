"""The add-on's engine session: the checkout's interpreter, Set up engine, the health check and
what the panels read from it.
"""

from __future__ import annotations

import os
import sys
import threading

from blender_scenario import ROOT


def test_default_python_is_the_checkout_venv():
    from blender_addon.client import engine_session

    assert engine_session.checkout_root() == ROOT
    assert engine_session.default_python() == os.path.join(ROOT, ".venv", "bin", "python")
    assert engine_session.resolve_python(os.path.join(ROOT, ".venv")) == os.path.join(
        ROOT, ".venv", "bin", "python"
    )


def test_setup_installs_torch_before_the_engine(tmp_path):
    from blender_addon.client import engine_session

    commands = engine_session.setup_commands("/usr/bin/python3", str(tmp_path / "v"), ROOT)
    argvs = [argv for _, argv in commands]
    assert argvs[0] == ["/usr/bin/python3", "-m", "venv", str(tmp_path / "v")]
    venv_python = str(tmp_path / "v" / "bin" / "python")
    installs = [argv[-1] for argv in argvs if argv[:4] == [venv_python, "-m", "pip", "install"]]
    assert installs[-2:] == [engine_session.TORCH_SPEC, f"{ROOT}[engine]"]

    cpu = engine_session.setup_commands(
        "/usr/bin/python3", str(tmp_path / "v"), ROOT, torch_index_url="https://example.org/cpu"
    )
    torch_step = [argv for _, argv in cpu if engine_session.TORCH_SPEC in argv][0]
    assert torch_step[-2:] == ["--index-url", "https://example.org/cpu"]
    engine_step = [argv for _, argv in cpu if f"{ROOT}[engine]" in argv][0]
    assert "--index-url" not in engine_step, "only torch comes from the torch index"


def test_setup_task_runs_in_background_and_reports_the_failing_step():
    from blender_addon.client import engine_session

    gate = threading.Event()
    commands = [
        ("Saying hello", [sys.executable, "-c", "print('hello from step one')"]),
        ("Failing", [sys.executable, "-c", "import sys; print('no wheel'); sys.exit(4)"]),
    ]
    task = engine_session.SetupTask(commands)
    original = task.work

    def work():
        gate.wait(10)
        return original()

    task.work = work
    task.start()
    assert task.running and not task.done, "the task must not block its caller"
    gate.set()
    task.join(30)
    assert task.done and task.status == "failed"
    assert "Failing failed (exit code 4)" in task.error
    assert "no wheel" in task.error
    assert "hello from step one" in task.log


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
    assert lines[0].startswith("Engine 0.1.0 (protocol 1) on cpu, float32")
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
        "Guidance modes: attention, latent",
        "Depth ControlNet: available (/m/cn)",
        "IP-Adapter: unavailable: no weights in /m/ip",
    ]
