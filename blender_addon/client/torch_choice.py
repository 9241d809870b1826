"""Which torch build Set up engine installs: the one that fits this machine's GPU (no bpy).

PyTorch publishes one build per GPU platform, each on its own package index; PyPI's default on
Linux is a CUDA build of several GB that a machine without an NVIDIA GPU cannot use. So the
machine is looked at first (:func:`probe_machine`: operating system, NVIDIA driver, ROCm) and
:func:`choose_torch` picks the build, its index and a sentence saying why.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass

TORCH_INDEX = "https://download.pytorch.org/whl/"
TORCH_SPEC = "torch>=2.4"
"""The oldest torch the engine is tested with that every current build index still carries."""

CUDA_BUILDS = (
    (580, "cu130", "CUDA 13.0"),
    (570, "cu128", "CUDA 12.8"),
    (525, "cu126", "CUDA 12.6"),
)
"""(lowest NVIDIA driver major version, PyTorch index name, what to call it), newest first."""
CUDA_OLD_DRIVER = (450, "cu118", "CUDA 11.8")
ROCM_BUILDS = (((6, 4), "rocm6.4"), ((6, 3), "rocm6.3"), ((6, 2), "rocm6.2.4"))
"""(lowest installed ROCm version, PyTorch index name), newest first."""
ROCM_UNKNOWN = (0, 0)
"""ROCm is installed but its version file is missing."""

SIZES_GB = {"cuda": 5.5, "rocm": 9.0, "mps": 1.0, "cpu": 1.2}
"""About how much the engine's environment takes on disk with each build (torch, diffusers,
transformers and the rest), for the free-space check and the preferences."""


@dataclass(frozen=True)
class Machine:
    """What decides the torch build."""

    system: str
    """``platform.system()``: Linux, Windows, Darwin."""
    arch: str
    """``platform.machine()`` lower-cased: x86_64, amd64, arm64, aarch64."""
    nvidia_driver: int | None = None
    """Major version of the NVIDIA driver, when ``nvidia-smi`` answers."""
    gpu_name: str = ""
    rocm: tuple[int, int] | None = None
    """Installed ROCm version (Linux), when found."""


@dataclass(frozen=True)
class TorchChoice:
    """The build to install and why."""

    build: str
    """``cuda``, ``rocm``, ``mps`` or ``cpu``."""
    label: str
    """For the artist: "CUDA 12.6 (NVIDIA GeForce RTX 4090, driver 550)"."""
    index_url: str
    """Package index to install torch from; empty for PyPI."""
    spec: str = TORCH_SPEC

    @property
    def size_gb(self) -> float:
        return SIZES_GB[self.build]


def choose_torch(machine: Machine, build: str = "AUTO", custom_index: str = "") -> TorchChoice:
    """The torch build for ``machine``.

    ``build`` is the preference: ``AUTO`` (detect), ``CPU`` (the small CPU-only build) or
    ``CUSTOM`` (``custom_index``, for a mirror or a build not listed here).
    """
    if build == "CUSTOM":
        index = custom_index.strip()
        if not index:
            raise ValueError(
                "Torch Build is Custom Index but no Torch Index is set: enter the package "
                "index URL, or set Torch Build to Automatic"
            )
        return TorchChoice("cpu" if "cpu" in index else "cuda", f"from {index}", index)
    mac = machine.system == "Darwin"
    if build == "CPU":
        # macOS wheels on PyPI are the CPU/MPS build already; the CPU index has none for it.
        return TorchChoice("cpu", "CPU only", "" if mac else TORCH_INDEX + "cpu")
    if mac:
        if machine.arch in ("arm64", "aarch64"):
            return TorchChoice("mps", "Apple Silicon (Metal, MPS)", "")
        # PyTorch stopped building for Intel Macs after 2.2.
        return TorchChoice(
            "cpu", "CPU only (Intel Mac: torch 2.2, the last build)", "", "torch>=2.1,<2.3"
        )
    if machine.nvidia_driver is not None:
        gpu = f"{machine.gpu_name}, driver {machine.nvidia_driver}".lstrip(", ")
        for lowest, name, label in CUDA_BUILDS:
            if machine.nvidia_driver >= lowest:
                return TorchChoice("cuda", f"{label} ({gpu})", TORCH_INDEX + name)
        lowest, name, label = CUDA_OLD_DRIVER
        if machine.nvidia_driver >= lowest:
            return TorchChoice(
                "cuda",
                f"{label} ({gpu}; a newer driver allows newer builds)",
                TORCH_INDEX + name,
                "torch>=2.4,<2.8",
            )
        return TorchChoice(
            "cpu",
            f"CPU only (NVIDIA driver {machine.nvidia_driver} is too old for CUDA "
            "builds: update the driver and set up again)",
            TORCH_INDEX + "cpu",
        )
    if machine.system == "Linux" and machine.rocm == ROCM_UNKNOWN:
        return TorchChoice(
            "cpu",
            "CPU only (ROCm is installed but /opt/rocm/.info/version does not say which: set "
            "Torch Build to Custom Index with the PyTorch index of your ROCm version)",
            TORCH_INDEX + "cpu",
        )
    if machine.system == "Linux" and machine.rocm is not None:
        for lowest, name in ROCM_BUILDS:
            if machine.rocm >= lowest:
                version = ".".join(map(str, machine.rocm))
                return TorchChoice(
                    "rocm", f"ROCm ({name[4:]} build, ROCm {version} found)", TORCH_INDEX + name
                )
        return TorchChoice(
            "cpu",
            f"CPU only (ROCm {'.'.join(map(str, machine.rocm))} is older than the "
            "builds PyTorch publishes: update ROCm to 6.2 or newer)",
            TORCH_INDEX + "cpu",
        )
    return TorchChoice("cpu", "CPU only (no NVIDIA or AMD GPU found)", TORCH_INDEX + "cpu")


def _run(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout if done.returncode == 0 else ""


def _rocm_version() -> tuple[int, int] | None:
    for path in ("/opt/rocm/.info/version", "/opt/rocm/.info/version-dev"):
        try:
            with open(path, encoding="utf-8") as handle:
                found = re.match(r"(\d+)\.(\d+)", handle.read().strip())
        except OSError:
            continue
        if found:
            return int(found.group(1)), int(found.group(2))
    if shutil.which("rocminfo") or os.path.isdir("/opt/rocm"):
        return ROCM_UNKNOWN
    return None


def probe_machine() -> Machine:
    """This machine: operating system, NVIDIA driver (``nvidia-smi``) and ROCm, if any."""
    system, arch = platform.system(), platform.machine().lower()
    driver, name = None, ""
    if system in ("Linux", "Windows"):
        out = _run(["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"])
        first = out.strip().splitlines()[0] if out.strip() else ""
        found = re.match(r"\s*(\d+)[\d.]*\s*,\s*(.+)", first)
        if found:
            driver, name = int(found.group(1)), found.group(2).strip()
    rocm = _rocm_version() if system == "Linux" and driver is None else None
    return Machine(system=system, arch=arch, nvidia_driver=driver, gpu_name=name, rocm=rocm)
