"""The add-on's warm engine process, engine set-up and health check (no bpy).

One :class:`~.engine_client.EngineClient` lives at module level and is reused by every
"Generate" click so the model stays loaded; a client whose process died is restarted on the
next request. The set-up and the health check run in background threads and publish their
progress as plain attributes that the panels read on redraw; the last health check's reply is
kept, so the panels can grey out the conditions (depth ControlNet, IP-Adapter) the engine lacks.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import threading
from typing import Any

from ..core.request import CONDITION_LABELS
from .engine_client import (
    NOT_INSTALLED,
    NOT_INSTALLED_HINT,
    EngineClient,
    EngineError,
)

TORCH_SPEC = "torch>=2.1"
"""What Set up engine installs first (the engine's own requirement)."""

_client: EngineClient | None = None
_client_lock = threading.Lock()


# -- Where things are ----------------------------------------------------------------------------


def addon_dir() -> str:
    """The folder this add-on runs from (symlinks resolved): the package above ``client/``."""
    return os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def checkout_root() -> str | None:
    """The project checkout the add-on runs from, or None when installed from a zip."""
    root = os.path.dirname(addon_dir())
    if os.path.isfile(os.path.join(root, "engine", "__init__.py")) and os.path.isfile(
        os.path.join(root, "pyproject.toml")
    ):
        return root
    return None


def venv_python(venv: str) -> str:
    """The interpreter inside a virtual environment folder."""
    if sys.platform == "win32":
        return os.path.join(venv, "Scripts", "python.exe")
    return os.path.join(venv, "bin", "python")


def default_python() -> str:
    """The checkout's ``.venv`` interpreter when running from a checkout that has one, else ''."""
    root = checkout_root()
    if root:
        candidate = venv_python(os.path.join(root, ".venv"))
        if os.path.isfile(candidate):
            return candidate
    return ""


def resolve_python(setting: str) -> str:
    """The interpreter for a preference value that names an interpreter or a venv folder."""
    path = os.path.abspath(os.path.expanduser(setting.strip())) if setting.strip() else ""
    if path and os.path.isdir(path):
        return venv_python(path)
    return path


# -- The warm client -----------------------------------------------------------------------------


def get_client(python_setting: str) -> EngineClient:
    """The shared engine client for this interpreter, started; a dead process is restarted.

    Raises EngineError(not_installed) with what to do when the interpreter is missing.
    """
    global _client
    python = resolve_python(python_setting)
    if not python:
        raise EngineError(
            NOT_INSTALLED, "No Python interpreter is set for the engine. " + NOT_INSTALLED_HINT
        )
    with _client_lock:
        if _client is not None and _client.python != python:
            _client.close()
            _client = None
            forget_hello()  # another interpreter: what the old engine offered no longer holds
        if _client is None:
            # In a checkout the engine package is importable from the root even if not installed.
            _client = EngineClient(python, cwd=checkout_root())
        _client.start()
        return _client


def current_client() -> EngineClient | None:
    """The shared client if one was created (it may have died)."""
    return _client


def shutdown() -> None:
    """Stop the shared engine process (on add-on unregister or Blender exit)."""
    global _client
    with _client_lock:
        if _client is not None:
            _client.close()
            _client = None


# Blender quitting must not leave the engine (and its memory) behind.
atexit.register(shutdown)


# -- Background tasks ----------------------------------------------------------------------------


class Task:
    """A background thread whose status text the UI shows while it runs."""

    def __init__(self, title: str):
        self.title = title
        self.status = "starting"
        self.log: list[str] = []
        self.error: str | None = None
        self.result: Any = None
        self.done = False
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Task:
        self._thread = threading.Thread(target=self._main, name=self.title, daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _main(self) -> None:
        try:
            self.result = self.work()
            self.status = "done"
        except Exception as exc:  # shown in the UI; the thread must not die silently
            self.error = str(exc)
            self.status = "failed"
        finally:
            self.done = True

    def work(self) -> Any:
        raise NotImplementedError


def setup_commands(
    base_python: str,
    venv: str,
    source: str,
    torch_spec: str = TORCH_SPEC,
    torch_index_url: str = "",
):
    """The commands that create ``venv`` and install the engine from ``source`` into it.

    torch goes first, from ``torch_index_url`` if given (e.g. PyTorch's CPU-only index), so the
    engine's open torch requirement is already met and pip does not pull another build;
    ``source`` is a project folder or a pip requirement name.
    """
    python = venv_python(venv)
    target = f"{source}[engine]"
    torch = [python, "-m", "pip", "install", torch_spec]
    if torch_index_url.strip():
        torch += ["--index-url", torch_index_url.strip()]
    return [
        ("Creating the engine's Python environment", [base_python, "-m", "venv", venv]),
        ("Updating pip", [python, "-m", "pip", "install", "--upgrade", "pip"]),
        ("Installing torch (large download)", torch),
        ("Installing the engine", [python, "-m", "pip", "install", target]),
        ("Checking the engine", [python, "-c", "import engine, torch, diffusers"]),
    ]


class SetupTask(Task):
    """Run :func:`setup_commands` one after the other, keeping the last output line as status."""

    def __init__(self, commands, log_limit: int = 200):
        super().__init__("Set up engine")
        self.commands = list(commands)
        self.log_limit = log_limit

    def work(self) -> None:
        for number, (title, argv) in enumerate(self.commands, 1):
            self.status = f"{number}/{len(self.commands)} {title}"
            proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip()
                if line:
                    self.log = (self.log + [line])[-self.log_limit :]
                    self.status = f"{number}/{len(self.commands)} {title}: {line[:80]}"
            if proc.wait():
                tail = "\n".join(self.log[-5:])
                raise RuntimeError(f"{title} failed (exit code {proc.returncode}):\n{tail}")


_last_hello: dict[str, Any] | None = None


def last_hello() -> dict[str, Any] | None:
    """The reply of the last successful health check (None before one), for the panels."""
    return _last_hello


def forget_hello() -> None:
    """Drop the remembered health check (the engine interpreter changed)."""
    global _last_hello
    _last_hello = None


class HealthCheckTask(Task):
    """Start (or reuse) the engine and ask ``hello`` with the model and the conditions' options,
    off the UI thread. The reply is remembered for :func:`condition_state`."""

    def __init__(self, python_setting: str, model: str, options: dict[str, Any] | None = None):
        super().__init__("Engine health check")
        self.python_setting = python_setting
        self.model = model
        self.options = options

    def work(self) -> dict[str, Any]:
        global _last_hello
        self.status = "starting the engine"
        client = get_client(self.python_setting)
        self.status = "asking the engine"
        reply = client.hello(model=self.model or None, options=self.options)
        _last_hello = reply
        return reply


def condition_state(
    name: str, spec: str, reply: dict[str, Any] | None = None
) -> tuple[bool | None, str]:
    """Whether the engine can apply condition ``name`` (a key of ``CONDITION_LABELS``) with
    model ``spec``, and what to tell the artist.

    From the last health check (or ``reply``): None when it is unknown (no check yet, or one
    made with another spec), then the message says to press Check engine.
    """
    reply = reply if reply is not None else _last_hello
    label = CONDITION_LABELS.get(name, name)
    if not spec:
        return False, f"No {label} set"
    conditions = (reply or {}).get("conditions")
    state = conditions.get(name) if isinstance(conditions, dict) else None
    if not isinstance(state, dict) or (state.get("spec") or "") != spec:
        return None, f"Press Check engine to see whether the {label} is available"
    if state.get("available"):
        return True, f"{label} found: {state.get('message') or spec}"
    return False, f"{label} unavailable: {state.get('message') or 'no reason given'}"


def model_default(name: str, spec: str, reply: dict[str, Any] | None = None) -> float | None:
    """The value model ``spec`` chooses for Layout field ``name`` when it is left to the
    model, from the last health check made with that model; None when unknown."""
    reply = reply if reply is not None else _last_hello
    model = (reply or {}).get("model")
    if not isinstance(model, dict) or (model.get("spec") or "") != spec:
        return None
    value = (model.get("layout_defaults") or {}).get(name)
    return value if isinstance(value, int | float) else None


def has_capability(name: str, reply: dict[str, Any] | None = None) -> bool | None:
    """Whether the engine lists capability ``name`` (a mode such as ``latent``); None if no
    health check has run."""
    reply = reply if reply is not None else _last_hello
    if not reply or not isinstance(reply.get("capabilities"), list):
        return None
    return name in reply["capabilities"]


def describe_hello(reply: dict[str, Any]) -> list[str]:
    """Readable lines for a ``hello`` reply (preferences panel)."""
    lines = [
        f"Engine {reply.get('engine_version', '?')} (protocol {reply.get('protocol', '?')}) "
        f"on {reply.get('device', '?')}, {reply.get('dtype', '?')}"
    ]
    model = reply.get("model")
    if isinstance(model, dict):
        if model.get("found"):
            lines.append(f"Model '{model.get('spec')}' found: {model.get('path')}")
        else:
            lines.append(
                f"Model '{model.get('spec')}' not found: {model.get('message') or 'no message'}"
            )
    capabilities = reply.get("capabilities")
    if isinstance(capabilities, list):
        modes = [mode for mode in ("attention", "latent") if mode in capabilities]
        lines.append("Guidance modes: " + (", ".join(modes) or "none reported"))
    conditions = reply.get("conditions")
    for name, label in CONDITION_LABELS.items():
        state = conditions.get(name) if isinstance(conditions, dict) else None
        if not isinstance(state, dict):
            continue
        if state.get("available"):
            lines.append(f"{label}: available ({state.get('message') or state.get('spec')})")
        else:
            lines.append(f"{label}: unavailable: {state.get('message') or 'no reason given'}")
    return lines
