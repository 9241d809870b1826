"""Shared fixtures: a tiny SDXL model saved to disk once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The test models are tiny: one thread per process is fastest, and it keeps the test process,
# engine subprocesses and Blender from spin-waiting on each other's cores (measured: a 64x64
# two-step generate took 0.3 s with one thread and 5-13 s with two under that contention).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny random SDXL diffusers folder, loaded by tests through the engine's real loader."""
    from tiny import save_tiny_sdxl

    return save_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_controlnet_dir(tmp_path_factory) -> str:
    """A tiny depth ControlNet folder matching ``tiny_model_dir``'s UNet."""
    from tiny import save_tiny_controlnet

    return save_tiny_controlnet(tmp_path_factory.mktemp("models") / "tiny-controlnet")


@pytest.fixture(scope="session")
def tiny_ip_adapter_dir(tmp_path_factory) -> str:
    """A tiny IP-Adapter folder (weights + image_encoder/) matching ``tiny_model_dir``'s UNet."""
    from tiny import save_tiny_ip_adapter

    return save_tiny_ip_adapter(tmp_path_factory.mktemp("models") / "tiny-ip-adapter")


@pytest.fixture(scope="session")
def tiny_gligen_dir(tmp_path_factory) -> str:
    """A tiny GLIGEN (text-box) diffusers folder, for the reference pass."""
    from tiny import save_tiny_gligen

    return save_tiny_gligen(tmp_path_factory.mktemp("models") / "tiny-gligen")


@pytest.fixture(scope="session")
def condition_images(tmp_path_factory) -> dict[str, str]:
    """A 16-bit depth gradient (near = white on the right) and an RGB reference photo."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("conditions")
    ramp = np.tile(np.linspace(0, 65535, 64), (64, 1)).astype(np.uint16)
    Image.fromarray(ramp).save(folder / "depth.png")
    noise = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "reference.png")
    return {"depth": str(folder / "depth.png"), "reference": str(folder / "reference.png")}
