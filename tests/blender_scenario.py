"""Run a test file as a bpy scenario in a child Python and read back its one JSON result line.

bpy runs in a child ``python`` (the test file run as a script with a scenario name) so that bpy
and torch never share the pytest process; the scenario prints one marked JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "SCENARIO-RESULT "


def run_scenario(script: str, name: str, user_dir: str, *args: str, timeout: float = 600) -> dict:
    """Run ``script name *args`` with bpy's user folder in ``user_dir``; return its result."""
    env = dict(os.environ)
    # Blender must not read or write the real user's configuration.
    env["BLENDER_USER_RESOURCES"] = user_dir
    proc = subprocess.run(
        [sys.executable, os.path.abspath(script), name, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    assert proc.returncode == 0 and lines, (
        f"scenario {name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return json.loads(lines[-1][len(MARK) :])


def report(result: dict) -> None:
    """Print a scenario's result as the line :func:`run_scenario` reads."""
    print(MARK + json.dumps(result), flush=True)


def empty_project_scene(width: int = 96, height: int = 64):
    """Save the open file into the test's own folder, set the render size and drop every mesh.

    Saving first keeps every output the add-on writes next to the blend file inside the test's
    ``BLENDER_USER_RESOURCES`` folder. Returns the scene.
    """
    import bpy

    folder = os.path.join(os.environ["BLENDER_USER_RESOURCES"], "project")
    os.makedirs(folder, exist_ok=True)
    bpy.ops.wm.save_as_mainfile(filepath=os.path.join(folder, "scene.blend"))
    scene = bpy.context.scene
    scene.render.resolution_x, scene.render.resolution_y = width, height
    scene.render.resolution_percentage = 100
    for obj in list(bpy.data.objects):
        if obj.type == "MESH":
            bpy.data.objects.remove(obj)
    return scene
