"""Every setting has a place in a panel, under a label no other field of that panel shares; the
sidebar's panels come in the artist's order; model fields browse files; Random Seed draws a new,
recorded seed; Re-generate Object works on the object it is given. Real bpy, in a child python
(this file run as a script)."""

from __future__ import annotations

import os
import sys

import blender_scenario
import pytest

INTERNAL = {
    "scene": {
        # Bookkeeping: the last result's seed, shown as text ("Last result: seed N").
        "result_seed",
    },
    "object": {
        # What Prompt stores; Prompt itself is drawn.
        "prompt_text",
    },
}
"""Properties of props.py that are not settings, so no panel draws them as fields."""


@pytest.fixture(scope="module")
def panels(tmp_path_factory) -> dict:
    user_dir = str(tmp_path_factory.mktemp("blender-user"))
    return blender_scenario.run_scenario(__file__, "panels", user_dir)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory, tiny_model_dir) -> dict:
    user_dir = str(tmp_path_factory.mktemp("blender-user"))
    return blender_scenario.run_scenario(__file__, "seeds", user_dir, str(tiny_model_dir))


def test_every_setting_is_drawn_in_some_panel(panels):
    assert panels["errors"] == []
    for group in ("scene", "object"):
        drawn = {
            prop
            for fields in panels["drawn"].values()
            for owner, prop, _ in fields
            if owner == group
        }
        missing = set(panels["properties"][group]) - drawn - INTERNAL[group]
        assert missing == set(), f"{group} settings in no panel: {sorted(missing)}"
        # The allow-list names only what exists and is really left out.
        assert INTERNAL[group] <= set(panels["properties"][group])
        assert not INTERNAL[group] & drawn


def test_no_two_fields_of_a_panel_share_a_label(panels):
    for panel, fields in panels["drawn"].items():
        labels: dict[str, set] = {}
        for owner, prop, label in fields:
            if label:
                labels.setdefault(label, set()).add((owner, prop))
        shared = {label: sorted(props) for label, props in labels.items() if len(props) > 1}
        assert shared == {}, f"{panel}: {shared}"


def test_labels_that_were_ambiguous_are_not_any_more(panels):
    names = panels["names"]
    assert names["guidance_scale"] != names["mode"]
    assert names["reference_fraction"] != names["steps"]
    assert names["prompt"] == "Scene Prompt"
    # The scene prompt shows its label (not drawn with text="").
    assert ("scene", "prompt", "Scene Prompt") in [tuple(f) for f in panels["drawn"]["Prompt"]]


def test_sidebar_panels_come_in_the_artists_order_under_their_own_tab(panels):
    sidebar = panels["sidebar"]
    assert sidebar["categories"] == ["Layout Diffusion"]
    assert sidebar["children"][:6] == [
        "Prompt",
        "Image",
        "Regions",
        "Guidance",
        "Conditions",
        "Output",
    ]
    assert panels["object_panel"] == "Proxy Label"


def test_model_fields_browse_files_and_keep_plain_ids(panels):
    assert panels["subtypes"] == {
        "model": "FILE_PATH",
        "model_config": "DIR_PATH",
        "controlnet": "FILE_PATH",
        "ip_adapter": "FILE_PATH",
        "gligen": "DIR_PATH",
    }
    relative = panels["blend_relative"]
    assert relative["fields"] == ([True] if relative["supported"] else [None])
    specs = panels["specs"]
    assert specs["shapes"] == "shapes"
    assert specs["repo id"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert specs["relative"] == os.path.join(specs["blend_dir"], "models", "my.safetensors")
    # Model Config only matters for a single checkpoint file.
    assert panels["config_active"] == {"shapes": False, "file": True}
    assert specs["options_with_config"]["config"] == os.path.join(specs["blend_dir"], "sdxl")
    assert "config" not in specs["options_without_config"]


def test_regenerate_object_is_offered_to_scripts_naming_an_object(panels):
    regenerate = panels["regenerate"]
    # The active object is unlabeled; a named labeled object is still accepted.
    assert regenerate["poll_unlabeled_active"] is True
    assert "not a labeled object" in regenerate["unlabeled_named"]
    assert "'Camera'" in regenerate["unlabeled_named"]
    assert "no object 'Nope'" in regenerate["missing"]
    # The labeled one gets past the checks to the engine (not installed here).
    assert "context is incorrect" not in regenerate["labeled_named"]
    assert "not a labeled object" not in regenerate["labeled_named"]
    assert "Set up engine" in regenerate["labeled_named"]


def test_the_regions_button_names_the_active_object_or_says_what_to_select(panels):
    button = panels["regions_button"]
    assert ["object_name", "red_box"] in button["labeled"]["operator_props"]
    assert button["unlabeled"]["operator_props"] == []
    assert "Select a labeled object to re-generate it" in button["unlabeled"]["labels"]


def test_random_seed_draws_a_new_seed_each_generate_and_records_it(seeds):
    runs = seeds["random"]
    assert [run["result"] for run in runs] == [["FINISHED"]] * 3
    sent = [run["sent_seed"] for run in runs]
    assert len(set(sent)) == 3, sent
    # The seed shown for the result is the one sent: the image can be made again.
    assert [run["result_seed"] for run in runs] == sent
    assert seeds["scene_seed"] == 11  # the Seed setting itself is left alone
    assert seeds["no_result_poll"] is False
    assert seeds["fixed"]["sent_seed"] == 11 and seeds["fixed"]["result_seed"] == 11
    # Use Result Seed turns the last random draw into the Seed: the same image again.
    again = seeds["again"]
    assert seeds["use_result_seed"] == ["FINISHED"]
    assert again["sent_seed"] == again["last"] == sent[-1]
    assert again["random_after"] is False


def test_regenerate_object_acts_on_the_named_object_when_another_is_active(seeds):
    named = seeds["regenerate_named"]
    assert named["active"] == "Camera"
    assert named["result"] == ["FINISHED"]
    assert named["regenerated"] == ["red_box"]


def test_a_single_file_models_error_names_model_config_not_the_engines_flag(seeds):
    error = seeds["single_file_error"]
    assert isinstance(error, str), error
    assert "--config" not in error
    assert "Model Config (3D View sidebar > Layout Diffusion)" in error


# -- Scenarios (run in a child python with bpy) --------------------------------------------------


def _recording_layout(log: list, errors: list):
    """A UILayout stand-in recording each drawn property as (owner, name, label): the label
    is the ``text`` given, else the property's name; ``template_ID`` takes the label drawn
    just before it (its row's label)."""
    import bpy

    owners = {}

    def owner_of(data) -> str:
        name = type(data).__name__
        owners.setdefault(name, "scene" if "Scene" in name else "object")
        return owners[name]

    class Layout:
        last_label = ""

        def __getattr__(self, name):
            if name not in bpy.types.UILayout.bl_rna.functions:
                errors.append(f"UILayout has no {name}")

            def call(*args, **kwargs):
                if name in {"prop", "template_ID"}:
                    data, prop = args[0], args[1]
                    if prop not in data.bl_rna.properties:
                        errors.append(f"{data} has no property {prop}")
                        return Layout()
                    if name == "template_ID":
                        label = Layout.last_label
                    else:
                        label = kwargs.get("text", data.bl_rna.properties[prop].name)
                    log.append([owner_of(data), prop, label])
                elif name == "label":
                    Layout.last_label = kwargs.get("text", "")
                elif name == "operator":
                    return _Anything()
                return Layout()

            return call

        def __setattr__(self, name, value):
            if name not in bpy.types.UILayout.bl_rna.properties:
                errors.append(f"UILayout has no attribute {name}")

    return Layout()


class _Anything:
    def __setattr__(self, name, value):
        pass


def _error_of(op, **kwargs) -> str:
    try:
        return f"no error {sorted(op(**kwargs))}"
    except RuntimeError as exc:
        return str(exc)


def _outcome(op, **kwargs) -> list | str:
    """The operator's result set, sorted, or the error it raised (errors raise in background)."""
    try:
        return sorted(op(**kwargs))
    except RuntimeError as exc:
        return str(exc)


def scenario_panels() -> dict:
    import bpy  # noqa: I001 -- bpy first: it puts addon_utils on sys.path
    import addon_utils
    from types import SimpleNamespace

    addon_utils.enable("blender_addon", default_set=True, handle_error=None)
    from blender_addon.blender.models import model_spec
    from blender_addon.client import cost
    from blender_addon.core import request
    from blender_addon.ui import panels, preferences

    out: dict = {"errors": []}
    scene = blender_scenario.empty_project_scene()
    settings = scene.layout_diffusion
    groups = {
        "scene": bpy.types.Scene.bl_rna.properties["layout_diffusion"].fixed_type,
        "object": bpy.types.Object.bl_rna.properties["layout_diffusion"].fixed_type,
    }
    out["properties"] = {
        group: [p.identifier for p in rna.properties if p.identifier not in {"rna_type", "name"}]
        for group, rna in groups.items()
    }
    out["names"] = {p.identifier: p.name for p in groups["scene"].properties}
    out["subtypes"] = {
        name: groups["scene"].properties[name].subtype
        for name in ("model", "model_config", "controlnet", "ip_adapter", "gligen")
    }
    # From Blender 4.5 on, a browsed path stays blend-relative only where the field allows it.
    out["blend_relative"] = {
        "supported": "is_path_supports_blend_relative" in bpy.types.Property.bl_rna.properties,
        "fields": sorted(
            {
                getattr(groups["scene"].properties[name], "is_path_supports_blend_relative", None)
                for name in out["subtypes"]
            },
            key=str,
        ),
    }

    bpy.ops.mesh.primitive_cube_add()
    cube = bpy.context.object
    cube.name = "red_box"
    cube.layout_diffusion.enabled = True
    cube.layout_diffusion.reference_image = bpy.data.images.new("photo", 8, 8)

    ours = [
        cls
        for cls in bpy.types.Panel.__subclasses__()
        if cls.__module__.startswith("blender_addon") and hasattr(bpy.types, cls.__name__)
    ]
    sidebar = [cls for cls in ours if cls.bl_space_type == "VIEW_3D"]
    out["sidebar"] = {
        "categories": sorted({cls.bl_category for cls in sidebar}),
        # Registration order is the order sub-panels show in.
        "children": [
            cls.bl_label
            for cls in sidebar
            if getattr(cls, "bl_parent_id", "") == "VIEW3D_PT_layout_diffusion"
        ],
    }
    out["object_panel"] = panels.OBJECT_PT_layout_diffusion.bl_label

    # Each panel drawn in the states that show its conditional fields; fields drawn in any.
    drawn: dict[str, list] = {}
    states = [
        {"init_source": "IMAGE", "mode": "LATENT", "use_reference": True},
        {"init_source": "NONE", "mode": "ATTENTION", "use_reference": False},
        # Far above the model's native size, with its cost known: the High-res Fix shows.
        {"render.resolution_x": 512, "render.resolution_y": 512},
    ]
    cost.remember(
        model_spec(settings),
        {
            "available": True,
            "native_size": 64,
            "latent_factor": 8,
            "unet_flops": [1.0, 1.0, 0.0],
            "vae_flops": [1.0, 1.0, 0.0],
            "seconds_per_flop": 1e-6,
        },
    )
    for state in states:
        for key, value in state.items():
            if key.startswith("render."):
                setattr(scene.render, key.removeprefix("render."), value)
            else:
                setattr(settings, key, value)
        for cls in ours:
            log: list = []
            context = SimpleNamespace(scene=scene, object=cube, preferences=bpy.context.preferences)
            view = SimpleNamespace(layout=_recording_layout(log, out["errors"]))
            cls.draw(view, context)
            if hasattr(cls, "draw_header"):
                cls.draw_header(view, context)
            fields = drawn.setdefault(cls.bl_label, [])
            fields += [entry for entry in log if entry not in fields]
    out["drawn"] = drawn

    def config_active(model: str) -> bool:
        settings.model = model
        return panels.is_single_file(settings.model)

    out["config_active"] = {
        "shapes": config_active("shapes"),
        "file": config_active("//m.safetensors"),
    }

    folder = os.path.join(os.environ["BLENDER_USER_RESOURCES"], "project")
    specs = {"blend_dir": folder}
    for name, value in (
        ("shapes", "shapes"),
        ("repo id", "stabilityai/stable-diffusion-xl-base-1.0"),
        ("relative", "//models/my.safetensors"),
    ):
        settings.model = value
        specs[name] = model_spec(settings)
    settings.model_config = "//sdxl/"
    specs["options_with_config"] = request.engine_options(settings, model_spec)
    settings.model_config = ""
    specs["options_without_config"] = request.engine_options(settings, model_spec)
    out["specs"] = specs

    camera = scene.camera

    def regions_with(obj) -> dict:
        from addon_ui_scenarios import _Recorder

        log = {"errors": out["errors"], "props": [], "operators": [], "labels": [], "progress": []}
        context = SimpleNamespace(
            scene=scene, object=obj, active_object=obj, preferences=bpy.context.preferences
        )
        panels.VIEW3D_PT_layout_diffusion_objects.draw(
            SimpleNamespace(layout=_Recorder(log)), context
        )
        return {"operator_props": log.get("operator_props", []), "labels": log["labels"]}

    out["regions_button"] = {"labeled": regions_with(cube), "unlabeled": regions_with(camera)}

    # Re-generate Object named from a script while an unlabeled object is active.
    bpy.context.view_layer.objects.active = camera
    prefs = preferences.get_preferences()
    prefs.python = os.path.join(folder, "missing-venv", "bin", "python")
    op = bpy.ops.layout_diffusion.regenerate_object
    out["regenerate"] = {
        "poll_unlabeled_active": op.poll(),
        "unlabeled_named": _error_of(op, object_name="Camera"),
        "missing": _error_of(op, object_name="Nope"),
        "labeled_named": _error_of(op, object_name="red_box"),
    }
    return out


def scenario_seeds(model: str) -> dict:
    import bpy  # noqa: I001 -- bpy first: it puts addon_utils on sys.path
    import addon_utils
    import json

    addon_utils.enable("blender_addon", default_set=True, handle_error=None)
    from blender_addon.blender import outputs
    from blender_addon.client import engine_session

    scene = blender_scenario.two_box_scene()
    scene.render.resolution_x, scene.render.resolution_y = 64, 64
    settings = scene.layout_diffusion
    settings.model = model
    settings.steps = 1
    settings.seed = 11
    settings.prompt = "two boxes"
    folder = outputs.output_dir(scene)

    def generate() -> dict:
        result = _outcome(bpy.ops.layout_diffusion.generate)
        with open(os.path.join(folder, "layout.json"), encoding="utf-8") as handle:
            sent = json.load(handle)
        return {
            "result": result,
            "sent_seed": sent["seed"],
            "result_seed": settings.result_seed,
        }

    out: dict = {"no_result_poll": bpy.ops.layout_diffusion.use_result_seed.poll()}
    settings.use_random_seed = True
    out["random"] = [generate() for _ in range(3)]
    out["scene_seed"] = settings.seed
    last = settings.result_seed
    # Use Result Seed: the random result made again, with the seed fixed.
    out["use_result_seed"] = _outcome(bpy.ops.layout_diffusion.use_result_seed)
    out["again"] = generate()
    out["again"]["last"] = last
    out["again"]["random_after"] = settings.use_random_seed
    settings.seed = 11
    out["fixed"] = generate()

    camera = scene.camera
    bpy.context.view_layer.objects.active = camera
    result = _outcome(bpy.ops.layout_diffusion.regenerate_object, object_name="red_box")
    with open(os.path.join(folder, "layout.json"), encoding="utf-8") as handle:
        sent = json.load(handle)
    out["regenerate_named"] = {
        "active": bpy.context.view_layer.objects.active.name,
        "result": result,
        # Re-generating keeps every object but the named one at strength 0.
        "regenerated": [r["name"] for r in sent["regions"] if r.get("strength", 1.0) == 1.0],
    }

    # A single .safetensors file whose tensors are not SDXL's: the engine's answer names its
    # --config flag; the artist reads the add-on's field instead.
    single = os.path.join(folder, "single.safetensors")
    with open(single, "wb") as handle:
        header = b"{}"
        handle.write(len(header).to_bytes(8, "little") + header)
    settings.model = single
    out["single_file_error"] = _outcome(bpy.ops.layout_diffusion.generate)
    engine_session.shutdown()
    return out


if __name__ == "__main__":
    blender_scenario.report(globals()[f"scenario_{sys.argv[1]}"](*sys.argv[2:]))
