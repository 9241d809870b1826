"""The extension zip: built and validated by Blender's own tool, installable into Blender (the
scenario interpreter's version: 5.0, or 4.2 in the oldest-version run)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import zipfile

import blender_scenario
import pytest

from blender_addon import build

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def built_zip(tmp_path_factory) -> str:
    return build.build(str(tmp_path_factory.mktemp("dist")))


def test_manifest_declares_the_extension():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(ROOT, "blender_addon", "blender_manifest.toml"), "rb") as handle:
        manifest = tomllib.load(handle)
    assert manifest["schema_version"] == "1.0.0"
    assert manifest["id"] == "layout_diffusion"
    assert manifest["name"] == "Layout Diffusion"
    assert manifest["type"] == "add-on"
    assert manifest["blender_version_min"] == "4.2.0"
    assert manifest["license"] == ["SPDX:GPL-3.0-or-later"]
    assert set(manifest["permissions"]) == {"files", "network"}
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        assert manifest["version"] == tomllib.load(handle)["project"]["version"]


def test_zip_carries_the_real_wire_package(built_zip):
    wire = os.path.join(ROOT, "engine", "wire")
    with zipfile.ZipFile(built_zip) as archive:
        names = set(archive.namelist())
        shipped = {
            name: archive.read(f"wire/{name}") for name in os.listdir(wire) if name.endswith(".py")
        }
        modes = {info.filename: info.external_attr >> 16 for info in archive.infolist()}
    assert {"layout.py", "protocol.py", "files.py"} <= set(shipped)
    for name, data in shipped.items():
        with open(os.path.join(wire, name), "rb") as handle:
            assert data == handle.read(), f"the zip's wire/{name} differs from engine/wire/{name}"
    assert not [name for name, mode in modes.items() if stat.S_ISLNK(mode)]
    expected = {
        "blender_manifest.toml",
        "__init__.py",
        "core/projection.py",
        "client/engine_client.py",
        "blender/scene_layout.py",
        "blender/frame_request.py",
        "ui/operators.py",
        "render/engine.py",
        "render/__main__.py",
    }
    assert expected <= names
    assert "build.py" not in names
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]


def test_zip_carries_the_engine_source_with_its_model(built_zip):
    with zipfile.ZipFile(built_zip) as archive:
        names = set(archive.namelist())
    expected = {
        "engine_source/pyproject.toml",
        "engine_source/README.md",
        "engine_source/engine/__init__.py",
        "engine_source/engine/service/serve.py",
        "engine_source/engine/models/shapes/model_index.json",
        "engine_source/engine/models/shapes/unet/diffusion_pytorch_model.safetensors",
    }
    assert expected <= names
    assert not [name for name in names if name.startswith("engine_source/training")]


def test_the_shipped_engine_source_builds_an_engine_with_its_model(built_zip, tmp_path):
    """What Set up engine installs from the zip alone: pip builds the engine package from the
    shipped source (a copy of it), and the installed engine finds its bundled model outside
    any checkout."""
    with zipfile.ZipFile(built_zip) as archive:
        archive.extractall(tmp_path / "ext")
    from blender_addon.client import engine_session

    source = str(tmp_path / "ext" / "engine_source")
    assert engine_session.is_engine_source(source)
    build_dir = tmp_path / "build"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(build_dir),
            source,
        ],
        check=True,
        capture_output=True,
        cwd=str(tmp_path),
    )
    (wheel,) = list(build_dir.glob("layout_diffusion-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        assert "engine/models/shapes/unet/diffusion_pytorch_model.safetensors" in archive.namelist()
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    probe = (
        "import json, engine; from engine.loading.defaults import describe_model; "
        "print(json.dumps([engine.__file__, describe_model('shapes')]))"
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=str(tmp_path)
    )
    assert done.returncode == 0, done.stderr
    where, model = json.loads(done.stdout.strip().splitlines()[-1])
    assert where.startswith(str(target)), "the installed engine, not the checkout's"
    assert model["found"] is True and model["path"].startswith(str(target))


def test_blender_validator_accepts_the_zip(built_zip):
    proc = build.run_blender_ext("validate", built_zip)
    assert "Success" in proc.stdout


def test_blender_validator_rejects_a_broken_manifest(tmp_path):
    staged = build.stage(str(tmp_path / "addon"))
    path = os.path.join(staged, "blender_manifest.toml")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text.replace('type = "add-on"', 'type = "plugin"'))
    with pytest.raises(RuntimeError) as info:
        build.run_blender_ext("validate", staged)
    assert "type" in str(info.value)


INSTALL = """
import json, sys, bpy
zip_path, = sys.argv[1:]
bpy.ops.extensions.package_install_files(
    filepath=zip_path, repo="user_default", enable_on_install=True
)
module = "bl_ext.user_default.layout_diffusion"
prefs = bpy.context.preferences.addons[module].preferences
package = sys.modules[module]
session = sys.modules[module + ".client.engine_session"]
refused = ""
try:
    session.resolve_engine_source("requests")
except session.SetupError as exc:
    refused = str(exc)
print("INSTALLED", json.dumps({
    "registered": hasattr(bpy.types.Scene, "layout_diffusion"),
    "python": prefs.python,
    "init": package.__file__,
    "source_setting": prefs.engine_source,
    "shipped": session.shipped_engine_source(),
    "old_default": session.resolve_engine_source("layout-diffusion"),
    "package_name_refused": refused,
}))
"""


def test_zip_installs_and_enables_in_blender(built_zip, tmp_path):
    env = dict(os.environ, BLENDER_USER_RESOURCES=str(tmp_path / "user"))
    proc = subprocess.run(
        [blender_scenario.bpy_python(), "-c", INSTALL, built_zip],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(tmp_path),
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("INSTALLED")]
    assert lines, proc.stdout + proc.stderr
    installed = json.loads(lines[0].split(" ", 1)[1])
    assert installed["registered"] is True
    # Installed outside a checkout: no engine interpreter is guessed, Set up engine is needed.
    assert installed["python"] == ""
    assert installed["init"].startswith(str(tmp_path / "user"))
    # Set up engine installs the engine shipped inside the installed extension, never a package
    # name looked up on an index.
    extension = os.path.dirname(installed["init"])
    assert installed["source_setting"] == ""
    assert installed["shipped"] == os.path.join(extension, "engine_source")
    assert installed["old_default"] == installed["shipped"]
    assert "is not an engine folder" in installed["package_name_refused"]
