"""Set up engine's torch build: the one that fits the machine, from its own index, said plainly."""

from __future__ import annotations

import pytest

from blender_addon.client.torch_choice import (
    ROCM_UNKNOWN,
    TORCH_INDEX,
    Machine,
    choose_torch,
    probe_machine,
)

LINUX = Machine("Linux", "x86_64")


@pytest.mark.parametrize(
    ("driver", "index", "label"),
    [(590, "cu130", "CUDA 13.0"), (575, "cu128", "CUDA 12.8"), (550, "cu126", "CUDA 12.6")],
)
def test_nvidia_gets_the_newest_cuda_build_its_driver_runs(driver, index, label):
    machine = Machine("Linux", "x86_64", nvidia_driver=driver, gpu_name="NVIDIA RTX 4090")
    choice = choose_torch(machine)
    assert (choice.build, choice.index_url) == ("cuda", TORCH_INDEX + index)
    assert choice.label == f"{label} (NVIDIA RTX 4090, driver {driver})"
    assert choice.size_gb > 3


def test_an_old_nvidia_driver_gets_an_older_build_or_the_cpu_with_the_fix():
    old = choose_torch(Machine("Windows", "amd64", nvidia_driver=470))
    assert old.index_url == TORCH_INDEX + "cu118" and old.spec.endswith("<2.8")
    ancient = choose_torch(Machine("Linux", "x86_64", nvidia_driver=390))
    assert ancient.build == "cpu" and "update the driver" in ancient.label


def test_amd_on_linux_gets_a_rocm_build():
    choice = choose_torch(Machine("Linux", "x86_64", rocm=(6, 3)))
    assert (choice.build, choice.index_url) == ("rocm", TORCH_INDEX + "rocm6.3")
    assert "ROCm 6.3" in choice.label
    old = choose_torch(Machine("Linux", "x86_64", rocm=(5, 7)))
    assert old.build == "cpu" and "update ROCm" in old.label
    unknown = choose_torch(Machine("Linux", "x86_64", rocm=ROCM_UNKNOWN))
    assert unknown.build == "cpu" and "Custom Index" in unknown.label


def test_apple_silicon_gets_the_pypi_build_with_metal():
    choice = choose_torch(Machine("Darwin", "arm64"))
    assert (choice.build, choice.index_url) == ("mps", "")
    intel = choose_torch(Machine("Darwin", "x86_64"))
    assert intel.build == "cpu" and intel.spec == "torch>=2.1,<2.3"


def test_no_gpu_gets_the_small_cpu_build_not_pypis_cuda_one():
    choice = choose_torch(LINUX)
    assert (choice.build, choice.index_url) == ("cpu", TORCH_INDEX + "cpu")
    assert "no NVIDIA or AMD GPU" in choice.label
    assert choice.size_gb < 2


def test_the_artist_can_ask_for_cpu_or_a_custom_index():
    gpu = Machine("Linux", "x86_64", nvidia_driver=550)
    assert choose_torch(gpu, "CPU").index_url == TORCH_INDEX + "cpu"
    assert choose_torch(Machine("Darwin", "arm64"), "CPU").index_url == ""
    mirror = choose_torch(gpu, "CUSTOM", " https://mirror.example/cu126 ")
    assert mirror.index_url == "https://mirror.example/cu126"
    with pytest.raises(ValueError, match="no Torch Index is set"):
        choose_torch(gpu, "CUSTOM", "")


def test_probing_this_machine_answers_without_a_gpu():
    machine = probe_machine()
    assert machine.system and machine.arch
    # Whatever is found, a build is chosen and named.
    assert choose_torch(machine).label
