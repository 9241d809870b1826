"""The add-on's warm engine process, engine set-up and health check (no bpy).

One :class:`~.engine_client.EngineClient` lives at module level and is reused by every
"Generate" click so the model stays loaded; a client whose process died is restarted on the
next request. The set-up and the health check run in background threads and publish their
progress as plain attributes that the panels read on redraw; the last health check's reply is
kept, so the panels can grey out the conditions (depth ControlNet, IP-Adapter) the engine lacks.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from typing import Any

from ..core.request import CONDITION_LABELS, addon_words
from .engine_client import (
    NOT_INSTALLED,
    NOT_INSTALLED_HINT,
    EngineClient,
    EngineError,
    parse_command,
)
from .torch_choice import TorchChoice, choose_torch, probe_machine

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


def get_client(python_setting: str, command_setting: str = "") -> EngineClient:
    """The shared engine client, started; a dead process is restarted.

    ``command_setting`` (the Engine Command preference), when set, is the command line started
    instead of ``<python> -m engine serve``, e.g. ``ssh gpu-box /opt/ld/.venv/bin/python -m
    engine serve``; it is split as a shell would. Raises EngineError(not_installed) with what to
    do when neither is usable.
    """
    global _client
    command: tuple[str, ...] = ()
    if command_setting.strip():
        try:
            command = tuple(parse_command(command_setting.strip()))
        except ValueError as exc:
            raise EngineError(NOT_INSTALLED, f"{exc}; fix the Engine Command.") from None
        python = ""
    else:
        python = resolve_python(python_setting)
        if not python:
            raise EngineError(
                NOT_INSTALLED,
                "No Python interpreter is set for the engine. " + NOT_INSTALLED_HINT,
            )
    with _client_lock:
        if _client is not None and (_client.python, _client.command) != (python, command):
            _client.close()
            _client = None
            forget_hello()  # another engine: what the old one offered no longer holds
        if _client is None:
            # In a checkout the engine package is importable from the root even if not installed.
            _client = EngineClient(python, cwd=checkout_root(), command=command)
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


class SetupError(RuntimeError):
    """Set up engine cannot start or failed; the message says what to do."""


ENGINE_SOURCE_DIR = "engine_source"
"""The folder inside the built extension that holds the engine's source (see ``build.py``)."""
OLD_SOURCE_DEFAULT = "layout-diffusion"
"""What Engine Source held before it named a folder: read as empty (the shipped engine)."""
FREE_SPACE_MARGIN_GB = 1.0

CHECK_SCRIPT = (
    "import json, torch, engine, diffusers\n"
    "mps = getattr(torch.backends, 'mps', None)\n"
    "device = 'cuda' if torch.cuda.is_available() else "
    "'mps' if mps is not None and mps.is_available() else 'cpu'\n"
    "gpu = torch.cuda.get_device_name(0) if device == 'cuda' else ''\n"
    "print(json.dumps({'torch': torch.__version__, 'device': device, 'gpu': gpu, "
    "'cuda': torch.version.cuda, 'hip': getattr(torch.version, 'hip', None)}))\n"
)
"""Run by the new environment's Python last: the engine imports, and which device torch sees."""


def is_engine_source(path: str) -> bool:
    """Whether ``path`` is a folder pip can install the engine from."""
    return os.path.isfile(os.path.join(path, "pyproject.toml")) and os.path.isfile(
        os.path.join(path, "engine", "__init__.py")
    )


def shipped_engine_source() -> str | None:
    """The engine source Set up engine installs by default: the copy shipped inside the
    extension, else the checkout the add-on runs from; None when neither exists."""
    shipped = os.path.join(addon_dir(), ENGINE_SOURCE_DIR)
    if is_engine_source(shipped):
        return shipped
    return checkout_root()


def resolve_engine_source(setting: str) -> str:
    """The engine source folder for the Engine Source preference; empty: the shipped one.

    Only a folder is accepted, never a package name: whatever a package index serves under a
    name would run on this machine. Raises SetupError saying what to pick.
    """
    value = setting.strip()
    if value == OLD_SOURCE_DEFAULT:
        value = ""
    if not value:
        shipped = shipped_engine_source()
        if shipped is None:
            raise SetupError(
                "This copy of the add-on carries no engine source: set Engine Source to the "
                "folder of a Layout Diffusion checkout (it holds pyproject.toml and engine/), "
                "or install the add-on from its full zip"
            )
        return shipped
    path = os.path.abspath(os.path.expanduser(value))
    if not is_engine_source(path):
        raise SetupError(
            f"Engine Source {value!r} is not an engine folder (it needs pyproject.toml and "
            "engine/__init__.py): pick the folder of a Layout Diffusion checkout, or clear "
            "Engine Source to install the engine shipped with the add-on"
        )
    return path


def check_setup(venv: str, choice: TorchChoice, free_bytes: int | None = None) -> None:
    """Refuse a set-up that cannot finish, before anything is downloaded: too little free
    space for the chosen torch build where the environment goes. Raises SetupError."""
    parent = os.path.dirname(os.path.abspath(venv)) or "."
    while not os.path.isdir(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if free_bytes is None:
        free_bytes = shutil.disk_usage(parent).free
    need = choice.size_gb + FREE_SPACE_MARGIN_GB
    if free_bytes < need * 1e9:
        raise SetupError(
            f"The engine with torch {choice.label} needs about {need:.1f} GB; {parent} has "
            f"{free_bytes / 1e9:.1f} GB free. Free some space or choose another Environment "
            "Folder (Preferences > Add-ons > Layout Diffusion)"
        )


def setup_commands(base_python: str, venv: str, source: str, choice: TorchChoice):
    """The steps that create ``venv`` and install torch and the engine into it.

    torch goes first, from the build's own index, so the engine's open torch requirement is
    already met and pip pulls no other build. ``source`` is the engine folder (pip builds in a
    temporary copy of it: the extension's own folder stays untouched). A step is ``(title,
    argv)`` or ``(title, callable)``.
    """
    python = venv_python(venv)
    pip = [python, "-m", "pip", "install", "--progress-bar", "raw"]
    torch = [*pip, choice.spec]
    if choice.index_url:
        torch += ["--index-url", choice.index_url]
    build_dir = os.path.join(os.path.dirname(os.path.abspath(venv)), "engine-build")

    def copy_source() -> None:
        shutil.rmtree(build_dir, ignore_errors=True)
        shutil.copytree(
            source,
            build_dir,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*", "build", "*.egg-info"),
        )

    return [
        ("Creating the engine's Python environment", [base_python, "-m", "venv", venv]),
        ("Updating pip", [python, "-m", "pip", "install", "--upgrade", "pip"]),
        (f"Installing torch, {choice.label} (about {choice.size_gb:.0f} GB)", torch),
        ("Copying the engine source", copy_source),
        ("Installing the engine and diffusers", [*pip, f"{build_dir}[engine]"]),
        ("Checking the engine", [python, "-c", CHECK_SCRIPT]),
    ]


_PIP_PROGRESS = re.compile(r"^Progress (\d+) of (\d+)$")


class SetupTask(Task):
    """Run :func:`setup_commands` one after the other: the step and pip's download progress as
    status and ``fraction``, every output line in ``log`` (the last ``log_limit``) and in the
    file ``log_path``. ``result`` is what the check step printed (torch version, device)."""

    def __init__(self, commands, log_limit: int = 200, log_path: str | None = None):
        super().__init__("Set up engine")
        self.commands = list(commands)
        self.log_limit = log_limit
        self.log_path = log_path
        self.fraction = 0.0
        self._file = None

    def _log(self, line: str) -> None:
        self.log = (self.log + [line])[-self.log_limit :]
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()

    def work(self) -> dict[str, Any] | None:
        if self.log_path:
            os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
            self._file = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115 -- kept open
        try:
            return self._run_steps()
        finally:
            if self._file is not None:
                self._file.close()
                self._file = None

    def _run_steps(self) -> dict[str, Any] | None:
        total = len(self.commands)
        last = ""
        for number, (title, step) in enumerate(self.commands, 1):
            self.status = f"{number}/{total} {title}"
            self.fraction = (number - 1) / total
            self._log(f"== {self.status}")
            if callable(step):
                step()
                continue
            proc = subprocess.Popen(
                step,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip()
                progress = _PIP_PROGRESS.match(line)
                if progress:
                    done, size = int(progress.group(1)), int(progress.group(2)) or 1
                    self.fraction = (number - 1 + min(done / size, 1.0)) / total
                    self.status = (
                        f"{number}/{total} {title}: {done / 1e6:.0f} of {size / 1e6:.0f} MB"
                    )
                    continue
                if line:
                    last = line
                    self._log(line)
                    self.status = f"{number}/{total} {title}: {line[:80]}"
            if proc.wait():
                tail = "\n".join(self.log[-5:])
                raise SetupError(f"{title} failed (exit code {proc.returncode}):\n{tail}")
        self.fraction = 1.0
        try:
            return json.loads(last)
        except ValueError:
            return None


class EngineSetupTask(SetupTask):
    """Set up engine: look at the machine, choose the torch build, check the free space, then
    run :func:`setup_commands`. Nothing is downloaded before the checks pass. ``choice`` holds
    the torch build once chosen, for the preferences to show."""

    def __init__(
        self,
        base_python: str,
        venv: str,
        source: str,
        torch_build: str = "AUTO",
        torch_index: str = "",
        log_path: str | None = None,
        probe=probe_machine,
    ):
        super().__init__([], log_path=log_path)
        self.base_python, self.venv, self.source = base_python, venv, source
        self.torch_build, self.torch_index = torch_build, torch_index
        self.probe = probe
        self.choice: TorchChoice | None = None

    def _run_steps(self) -> dict[str, Any] | None:
        self.status = "Looking at this machine's GPU"
        machine = self.probe()
        try:
            self.choice = choose_torch(machine, self.torch_build, self.torch_index)
        except ValueError as exc:
            raise SetupError(str(exc)) from None
        self._log(f"== {machine}: torch {self.choice.label} from {self.choice.index_url or 'PyPI'}")
        check_setup(self.venv, self.choice)
        self.commands = setup_commands(self.base_python, self.venv, self.source, self.choice)
        return super()._run_steps()


def describe_setup(result: dict[str, Any] | None) -> str:
    """One line on what Set up engine installed (from :data:`CHECK_SCRIPT`'s output)."""
    if not result:
        return "Engine installed"
    device = {"cuda": "CUDA", "mps": "Apple Metal (MPS)", "cpu": "the CPU"}.get(
        str(result.get("device")), str(result.get("device"))
    )
    if result.get("device") == "cuda" and result.get("hip"):
        device = "ROCm"
    gpu = f" ({result['gpu']})" if result.get("gpu") else ""
    return f"Engine installed: torch {result.get('torch')}, runs on {device}{gpu}"


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

    def __init__(
        self,
        python_setting: str,
        model: str,
        options: dict[str, Any] | None = None,
        command_setting: str = "",
    ):
        super().__init__("Engine health check")
        self.python_setting = python_setting
        self.command_setting = command_setting
        self.model = model
        self.options = options

    def work(self) -> dict[str, Any]:
        global _last_hello
        self.status = "starting the engine"
        client = get_client(self.python_setting, self.command_setting)
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
    return False, f"{label} unavailable: {addon_words(state.get('message') or 'no reason given')}"


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
                f"Model '{model.get('spec')}' not found: "
                + addon_words(model.get("message") or "no message")
            )
    capabilities = reply.get("capabilities")
    if isinstance(capabilities, list):
        modes = [mode for mode in ("attention", "latent") if mode in capabilities]
        lines.append("Region modes: " + (", ".join(modes) or "none reported"))
    conditions = reply.get("conditions")
    for name, label in CONDITION_LABELS.items():
        state = conditions.get(name) if isinstance(conditions, dict) else None
        if not isinstance(state, dict):
            continue
        if state.get("available"):
            lines.append(f"{label}: available ({state.get('message') or state.get('spec')})")
        else:
            reason = addon_words(state.get("message") or "no reason given")
            lines.append(f"{label}: unavailable: {reason}")
    shares = reply.get("shares_files")
    if shares is True:
        lines.append("Files: the engine reads Blender's files where they are")
    elif shares is False:
        lines.append("Files: sent with each request (the engine does not see this machine's)")
    return lines
