"""Generate never waits for the engine's cost on Blender's UI thread (real bpy, real engine).

The engine command starts ``engine serve`` only after a delay, as a cold engine answers once
torch is imported. Generate returns before the engine has said anything; its job waits for the
cost on its own thread, then runs the high-res fix the reply calls for (160 x 96 with the
shipped shapes model declared native at 64 px), and the Image panel's cost lines change when the reply
arrives.
"""

from __future__ import annotations

import os
import sys

import blender_scenario
from blender_scenario import ROOT

USER_DIR = os.path.join(os.environ.get("TMPDIR", "/tmp"), "ld-user-cost-first")
DELAY = 8.0
"""Seconds the engine takes before it reads its first request."""


def test_generate_returns_at_once_and_the_cost_lines_follow_the_reply():
    result = blender_scenario.run_scenario(__file__, "slow_hello", USER_DIR)
    assert result["returned_seconds"] < DELAY, result
    assert result["answered_at_return"] is False, "the engine had not answered yet"
    assert result["lines_at_return"] == [], "no cost known: nothing to say yet"
    assert result["panel_before"] == ["Estimate: press Estimate Cost or Check engine"]
    # The reply came while the job ran: the panel and the run's cost lines show it.
    assert result["kinds"][0] == "cost" and result["kinds"][-1] == "result", result["kinds"]
    assert "Native 64 x 64, generating 160 x 96" in result["panel_after"]
    assert result["run_lines"][0] == "Native 64 x 64, generating 160 x 96"
    # The job decided on the fix after the reply: two passes, the first at about native area.
    assert result["inner"] == "HighResJob" and result["sizes"] == [[120, 72], [160, 96]]
    assert result["finished"] == ["FINISHED"] and result["image"] == [160, 96]
    # Unknown as it started, the cost is said once it arrives.
    assert len(result["reports"]) == 1
    assert result["reports"][0].startswith("Native 64 x 64, generating 160 x 96; ")
    # With the cost known, the next Generate sends its request at once.
    assert result["second_started_at_once"] is True


def scenario_slow_hello() -> dict:
    import bpy  # noqa: I001 -- bpy first: it puts addon_utils on sys.path
    import addon_utils

    addon_utils.enable("blender_addon", default_set=True, handle_error=None)
    import shlex
    import time

    from blender_addon.client import cost, engine_session
    from blender_addon.ui import operators, panels, preferences

    code = (
        f"import runpy, sys, time; time.sleep({DELAY}); sys.argv = ['engine', 'serve']; "
        "runpy.run_module('engine', run_name='__main__')"
    )
    prefs = preferences.get_preferences()
    prefs.engine_command = shlex.join([blender_scenario.engine_python(), "-c", code])
    scene = blender_scenario.two_box_scene(160, 96)
    settings = scene.layout_diffusion
    import tempfile

    from shapes_native import shapes_at_native

    model = shapes_at_native(tempfile.mkdtemp(prefix="shapes-native-"))
    settings.model, settings.prompt, settings.steps = model, "two boxes", 4
    settings.use_high_res_fix, settings.high_res_strength = True, 0.5

    out: dict = {"panel_before": [text for text, _ in panels.cost_lines(scene)]}
    began = time.monotonic()
    run = operators.start_generation(bpy.context)
    out["returned_seconds"] = time.monotonic() - began
    out["answered_at_return"] = run.job.asked.done
    out["lines_at_return"] = list(run.cost_lines)
    kinds, panel_after, reports = [], [], []
    for event in run.job:
        run.update(event)
        kinds.append(event.get("event"))
        if event.get("event") == "cost":
            panel_after = [text for text, _ in panels.cost_lines(scene)]
        operators.report_late_cost(run, lambda _kind, text: reports.append(text))
    out["kinds"] = [kind for i, kind in enumerate(kinds) if i == 0 or kind != kinds[i - 1]]
    out["panel_after"] = panel_after
    out["run_lines"] = [text for text, _ in run.cost_lines]
    out["reports"] = reports
    inner = run.job.inner
    out["inner"] = type(inner).__name__
    out["sizes"] = [[r["width"], r["height"]] for r in getattr(inner, "requests", [])]
    out["finished"] = sorted(operators.finish(run, lambda *_: None))
    out["image"] = list(bpy.data.images[operators.RESULT_IMAGE].size)

    assert cost.native_size(model) == 64
    second = operators.start_generation(bpy.context)
    out["second_started_at_once"] = second.job.inner is not None
    second.job.wait(600)
    engine_session.shutdown()
    return out


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    blender_scenario.report(globals()[f"scenario_{sys.argv[1]}"](*sys.argv[2:]))
