"""Build the Blender extension zip: ``python blender_addon/build.py [--output-dir DIR]``.

The add-on folder holds ``wire`` as a symlink to the engine's wire package (one source of truth),
but Blender's extension builder skips symlinks and zips cannot carry them portably. So the add-on
is first staged into a folder with every symlink replaced by the real file, then built and
validated by Blender's own extension tool (``blender_ext.py``, shipped inside the bpy wheel and
every Blender 4.2+), which writes ``layout_diffusion-<version>.zip``.

The zip also carries the engine's source (``engine_source/``: ``engine/`` with the bundled shapes
model, ``pyproject.toml`` and ``README.md``), so Set up engine installs the engine from the zip
itself, with no checkout and no package name to look up.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import shutil
import subprocess
import sys

ADDON_DIR = os.path.dirname(os.path.abspath(__file__))
PROJECT_DIR = os.path.dirname(ADDON_DIR)
EXCLUDE = shutil.ignore_patterns("__pycache__", "*.pyc", ".*", "*.zip", "build.py")
ENGINE_SOURCE = "engine_source"
"""The extension's folder with the engine's source (``engine_session.ENGINE_SOURCE_DIR``)."""
ENGINE_EXCLUDE = shutil.ignore_patterns("__pycache__", "*.pyc", ".*", "*.tmp", "*.old")
ENGINE_FILES = ("pyproject.toml", "README.md")
"""Project files pip needs to build the engine (the README is the package's description)."""


def find_blender_ext() -> str:
    """Path of Blender's ``blender_ext.py`` from the installed bpy module.

    Found without importing bpy (which takes seconds and a lot of memory). Raises FileNotFoundError
    saying how to get it.
    """
    spec = importlib.util.find_spec("bpy")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            pattern = os.path.join(root, "*", "scripts", "addons_core", "bl_pkg", "cli")
            found = sorted(glob.glob(os.path.join(pattern, "blender_ext.py")))
            if found:
                return found[-1]
    raise FileNotFoundError(
        "Blender's extension tool (blender_ext.py) was not found: install the 'blender' extra "
        "(pip install -e '.[blender]') or run 'blender --command extension build' in "
        "the staged folder instead"
    )


def stage(dest: str, source: str = ADDON_DIR, project: str = PROJECT_DIR) -> str:
    """Copy the add-on to ``dest`` with symlinks resolved to real files, and the engine's
    source into ``dest/engine_source``; returns ``dest``."""
    if os.path.exists(dest):
        shutil.rmtree(dest)
    shutil.copytree(source, dest, symlinks=False, ignore=EXCLUDE)
    engine = os.path.join(dest, ENGINE_SOURCE)
    shutil.copytree(
        os.path.join(project, "engine"), os.path.join(engine, "engine"), ignore=ENGINE_EXCLUDE
    )
    for name in ENGINE_FILES:
        shutil.copy2(os.path.join(project, name), os.path.join(engine, name))
    return dest


def run_blender_ext(*args: str, tool: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run Blender's extension tool with plain Python; raises RuntimeError with its output."""
    tool = tool or find_blender_ext()
    proc = subprocess.run(
        [sys.executable, tool, *args], capture_output=True, text=True, check=False
    )
    if proc.returncode:
        raise RuntimeError(
            f"blender_ext {args[0]} failed (exit code {proc.returncode}):\n"
            f"{proc.stdout}{proc.stderr}"
        )
    return proc


def build(output_dir: str, staging_dir: str | None = None) -> str:
    """Stage, validate and build the extension; returns the zip's path."""
    output_dir = os.path.abspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    staging_dir = staging_dir or os.path.join(output_dir, "layout_diffusion")
    stage(staging_dir)
    tool = find_blender_ext()
    run_blender_ext("validate", staging_dir, tool=tool)
    before = set(glob.glob(os.path.join(output_dir, "*.zip")))
    run_blender_ext("build", "--source-dir", staging_dir, "--output-dir", output_dir, tool=tool)
    built = sorted(set(glob.glob(os.path.join(output_dir, "*.zip"))) - before) or sorted(
        glob.glob(os.path.join(output_dir, "layout_diffusion-*.zip"))
    )
    if not built:
        raise RuntimeError(f"blender_ext build reported success but wrote no zip in {output_dir}")
    return built[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output-dir",
        default=os.path.join(os.path.dirname(ADDON_DIR), "dist"),
        help="where the zip goes (default: dist/ in the project)",
    )
    args = parser.parse_args(argv)
    try:
        path = build(args.output_dir)
    except (RuntimeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
