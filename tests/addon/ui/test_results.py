"""The result history under real bpy: every Generate keeps its result with its provenance, the
history keeps the newest N, intermediate files go, and an older result loads back."""

from __future__ import annotations

import os
import sys

import blender_scenario
import pytest


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_model_dir) -> dict:
    user_dir = str(tmp_path_factory.mktemp("blender-user"))
    return blender_scenario.run_scenario(__file__, "history", user_dir, str(tiny_model_dir))


def test_each_generate_keeps_its_result_and_only_the_newest_n(report):
    runs = report["runs"]
    assert [run["result"] for run in runs] == [["FINISHED"]] * 3
    # History size 2: after three results, the last two, newest first, with their seeds.
    assert runs[0]["history"] == [[1, 1]]
    assert runs[1]["history"] == [[2, 2], [1, 1]]
    assert runs[2]["history"] == [[3, 3], [2, 2]]
    assert report["history_files"] == ["result_0002.png", "result_0003.png"]
    # Each entry is the result it was, provenance included.
    assert runs[2]["newest_is_result"] is True
    assert report["newest_prompt"] == "two boxes on a table"


def test_intermediate_files_are_removed_once_the_result_is_in(report):
    for run in report["runs"]:
        assert run["folder"] == ["history", "layout.json", "result.png"]
    # The request wrote masks and depth while it ran.
    assert report["sent_files"] >= 3


def test_an_older_result_loads_back_as_the_current_one(report):
    loaded = report["loaded"]
    assert loaded["result"] == ["FINISHED"]
    assert loaded["result_seed"] == 2
    assert loaded["result_png_seed"] == 2
    assert loaded["image_is_result"] is True
    assert loaded["gone"] == ["CANCELLED", "Result #1 is no longer in the history"]


def test_the_history_panel_lists_entries_with_load_buttons(report):
    drawn = report["drawn"]
    assert drawn["labels"][:2] == [
        "#3  seed 3  two boxes on a table",
        "#2  seed 2  two boxes on a table",
    ]
    assert drawn["loads"] == [3, 2]


def test_unsaved_files_never_go_into_a_folder_someone_else_controls(report):
    private = report["private"]
    assert private["planted_link_used"] is False
    assert private["mode"] == 0o700 and private["owned"] is True


# -- The child process --------------------------------------------------------------------------


class _Op:
    def __init__(self, log: list):
        object.__setattr__(self, "_log", log)

    def __setattr__(self, name, value):
        self._log.append(value)


class _Layout:
    """Records labels and the numbers given to Load buttons."""

    def __init__(self, log: dict):
        self._log = log

    def label(self, text="", **_kwargs):
        self._log["labels"].append(text)

    def operator(self, idname, **_kwargs):
        return _Op(self._log["loads"]) if idname == "layout_diffusion.load_result" else None

    def __getattr__(self, _name):
        return lambda *args, **kwargs: self


def scenario_history(model: str) -> dict:
    import bpy  # noqa: I001 -- bpy first: it puts addon_utils on sys.path
    import addon_utils

    addon_utils.enable("blender_addon", default_set=True, handle_error=None)
    from blender_addon.blender import outputs
    from blender_addon.client import engine_client, engine_session
    from blender_addon.core import history, request
    from blender_addon.ui import operators, results

    scene = blender_scenario.two_box_scene()
    settings = scene.layout_diffusion
    settings.model, settings.steps, settings.prompt = model, 2, "two boxes on a table"
    settings.history_size = 2
    folder = outputs.output_dir(scene)
    out: dict = {"runs": []}

    # Count the files each request names while it is sent.
    sent_files = []
    original = engine_client.EngineClient.generate

    def generate(client, layout, path, model=None, options=None):
        names = [layout.get("depth")] + [r.get("mask") for r in layout["regions"]]
        sent_files.append(sum(1 for n in names if n and os.path.isfile(n)))
        return original(client, layout, path, model, options=options)

    engine_client.EngineClient.generate = generate
    for seed in (1, 2, 3):
        settings.seed = seed
        if seed == 3:
            # A mask left by an object labeled in an earlier request.
            open(os.path.join(folder, "mask_009_gone.png"), "wb").close()
        result = sorted(bpy.ops.layout_diffusion.generate())
        entries = history.entries(folder)
        with open(entries[0].path, "rb") as a, open(os.path.join(folder, "result.png"), "rb") as b:
            newest_is_result = a.read() == b.read()
        out["runs"].append(
            {
                "result": result,
                "history": [[e.number, e.seed] for e in entries],
                "folder": sorted(os.listdir(folder)),
                "newest_is_result": newest_is_result,
            }
        )
    engine_client.EngineClient.generate = original
    out["sent_files"] = min(sent_files)
    out["history_files"] = sorted(os.listdir(history.history_dir(folder)))
    out["newest_prompt"] = history.entries(folder)[0].prompt

    log: dict = {"labels": [], "loads": []}
    results.draw_history(_Layout(log), scene)
    out["drawn"] = log

    result = sorted(bpy.ops.layout_diffusion.load_result(number=2))
    image = bpy.data.images[operators.RESULT_IMAGE]
    result_png = os.path.join(folder, request.RESULT_NAME)
    out["loaded"] = {
        "result": result,
        "result_seed": settings.result_seed,
        "result_png_seed": history.read_provenance(result_png)["layout"]["seed"],
        "image_is_result": bpy.path.abspath(image.filepath) == result_png,
    }
    try:
        bpy.ops.layout_diffusion.load_result(number=1)
        out["loaded"]["gone"] = ["FINISHED", ""]
    except RuntimeError as exc:
        out["loaded"]["gone"] = ["CANCELLED", str(exc).split("Error: ")[-1].strip()]

    # Someone planted a link under this user's temporary folder name: it is not used.
    import tempfile

    tempfile.tempdir = os.path.join(os.environ["BLENDER_USER_RESOURCES"], "tmp")
    os.makedirs(os.path.join(tempfile.tempdir, "elsewhere"))
    planted = os.path.join(tempfile.tempdir, f"layout_diffusion-{os.getuid()}")
    os.symlink(os.path.join(tempfile.tempdir, "elsewhere"), planted)
    private = outputs.private_temp_dir()
    info = os.lstat(private)
    out["private"] = {
        "planted_link_used": os.path.realpath(private).startswith(os.path.realpath(planted)),
        "mode": info.st_mode & 0o777,
        "owned": info.st_uid == os.getuid(),
    }
    engine_session.shutdown()
    return out


if __name__ == "__main__":
    blender_scenario.report(globals()[f"scenario_{sys.argv[1]}"](*sys.argv[2:]))
