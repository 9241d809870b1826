"""The extension zip: built and validated by Blender's own tool, installable into Blender (the
scenario interpreter's version: 5.0, or 4.2 in the oldest-version run)."""

from __future__ import annotations

import os
import stat
import subprocess
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
import sys, bpy
zip_path, = sys.argv[1:]
bpy.ops.extensions.package_install_files(
    filepath=zip_path, repo="user_default", enable_on_install=True
)
module = "bl_ext.user_default.layout_diffusion"
prefs = bpy.context.preferences.addons[module].preferences
package = sys.modules[module]
print("INSTALLED", hasattr(bpy.types.Scene, "layout_diffusion"), repr(prefs.python),
      package.__file__)
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
    _, registered, python, init_file = lines[0].split(" ", 3)
    assert registered == "True"
    # Installed outside a checkout: no engine interpreter is guessed, Set up engine is needed.
    assert python == "''"
    assert init_file.startswith(str(tmp_path / "user"))
