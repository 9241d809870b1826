"""The flat-colour reference render: colour words, colour conversion, the RGB PNG, and scenes
built in real bpy (headless) rendered through the object-id render."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from blender_addon.core.colors import (
    BACKGROUND,
    COLOR_WORDS,
    UNCOLORED,
    linear_to_srgb8,
    paint_ids,
    prompt_color,
)
from blender_addon.core.png import encode_rgb_png, read_gray_png, write_rgb_png

# -- Pure parts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, color",
    [
        ("a red vintage car", COLOR_WORDS["red"]),
        ("A Grey cat on a mat", COLOR_WORDS["grey"]),
        ("a car with light blue doors", (148, 162, 228)),  # halfway from (40, 70, 200) to white
        ("a dark green hedge", (22, 88, 28)),  # (40, 160, 50) * 0.55
        ("a yellow taxi and a white van", COLOR_WORDS["yellow"]),  # the first colour word wins
        ("a redwood tree, greenish light", None),  # whole words only
        ("a vintage car", None),
    ],
)
def test_prompt_colors_come_from_whole_colour_words(prompt, color):
    assert prompt_color(prompt) == color


def test_linear_colors_become_srgb():
    assert linear_to_srgb8((0.0, 1.0, 0.5)) == (0, 255, 188)
    assert linear_to_srgb8((0.2158605, 0.002, 2.0, 1.0)) == (128, 7, 255)  # clipped; alpha ignored


def test_ids_are_painted_with_background_and_default():
    ids = np.array([[0, 1], [2, 9]])
    image = paint_ids(ids, {1: (255, 0, 0), 2: (0, 0, 255)})
    assert image.dtype == np.uint8 and image.shape == (2, 2, 3)
    assert [tuple(p) for p in image.reshape(-1, 3)] == [
        BACKGROUND,
        (255, 0, 0),
        (0, 0, 255),
        UNCOLORED,
    ]


def test_rgb_png_round_trips_through_pillow(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = tmp_path / "reference.png"
    write_rgb_png(path, image)
    with Image.open(path) as back:
        assert back.mode == "RGB" and back.size == (7, 5)
        np.testing.assert_array_equal(np.asarray(back), image)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        encode_rgb_png(image[..., :2])


# -- In Blender -----------------------------------------------------------------------------------


@pytest.fixture
def bpy():
    return pytest.importorskip("bpy")


@pytest.fixture
def scene(bpy):
    """An empty scene with a camera at (0, 0, 10) looking down -Z, lens 50, 64x64."""
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    camera = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    scene.collection.objects.link(camera)
    camera.location = (0.0, 0.0, 10.0)
    scene.camera = camera
    scene.render.resolution_x = scene.render.resolution_y = 64
    return scene


def add_cube(bpy, name, location, size=2.0, base_color=None):
    bpy.ops.mesh.primitive_cube_add(size=size, location=location)
    obj = bpy.context.object
    obj.name = name
    if base_color is not None:
        material = bpy.data.materials.new(f"{name} material")
        if material.node_tree is None:
            material.use_nodes = True
        principled = next(n for n in material.node_tree.nodes if n.type == "BSDF_PRINCIPLED")
        principled.inputs["Base Color"].default_value = (*base_color, 1.0)
        obj.data.materials.append(material)
    return obj


def colors_of(image: np.ndarray) -> dict[tuple[int, int, int], int]:
    values, counts = np.unique(image.reshape(-1, 3), axis=0, return_counts=True)
    return {tuple(int(c) for c in v): int(n) for v, n in zip(values, counts, strict=True)}


def test_labeled_objects_take_their_label_or_material_colour(bpy, scene, tmp_path):
    from blender_addon.blender.scene_layout import LabeledObject, layout_from_camera

    # The red-labeled car has a blue material: the label's colour wins.
    car = add_cube(bpy, "Car", (-1.5, 0.0, 0.0), size=1.5, base_color=(0.0, 0.0, 1.0))
    hedge = add_cube(bpy, "Hedge", (1.5, 0.0, 0.0), size=1.5, base_color=(0.5, 0.2158605, 0.0))
    rock = add_cube(bpy, "Rock", (0.0, 2.5, 0.0), size=1.0)  # no material, no colour word
    add_cube(bpy, "Bystander", (0.0, -2.5, 0.0), size=1.0, base_color=(0, 1, 0))
    labeled = [
        LabeledObject(car, "a red vintage car"),
        LabeledObject(hedge, "a hedge"),
        LabeledObject(rock, "a rock"),
    ]
    result = layout_from_camera(
        scene, labeled, str(tmp_path), settings={"prompt": "a street"}, reference=True
    )
    layout = result.layout
    assert layout.reference == os.path.join(str(tmp_path), "reference.png")
    with Image.open(layout.reference) as opened:
        assert opened.mode == "RGB" and opened.size == (layout.width, layout.height)
        image = np.asarray(opened)
    expected = {
        "Car": COLOR_WORDS["red"],
        "Hedge": (188, 128, 0),  # its linear base colour in sRGB
        "Rock": UNCOLORED,
    }
    covered = np.zeros(image.shape[:2], bool)
    for region in layout.regions:
        mask = read_gray_png(region.mask) == 255
        assert mask.sum() == result.pixel_counts[region.name] > 0
        assert (image[mask] == expected[region.name]).all(), region.name
        covered |= mask
    # Outside the masks: the unlabeled bystander in its material's green, else background.
    found = colors_of(image[~covered][None])
    assert set(found) == {BACKGROUND, (0, 255, 0)}
    bystander_pixels = found[(0, 255, 0)]
    assert 0 < bystander_pixels < 200
    assert found[BACKGROUND] + bystander_pixels + covered.sum() == 64 * 64
    assert result.timings["reference"] > 0


def test_reference_leaves_the_user_scene_unchanged(bpy, scene, tmp_path):
    from blender_addon.blender.scene_layout import LabeledObject, layout_from_camera

    car = add_cube(bpy, "Car", (0.0, 0.0, 0.0), base_color=(0.1, 0.2, 0.3))
    car.color = (0.3, 0.4, 0.5, 1.0)
    car.pass_index = 4
    scene.render.engine = "BLENDER_WORKBENCH"
    scene.display_settings.display_device = "sRGB"
    scene.view_settings.view_transform = "AgX"

    def snapshot():
        principled = car.active_material.node_tree.nodes["Principled BSDF"]
        return {
            "color": tuple(car.color),
            "base": tuple(principled.inputs["Base Color"].default_value),
            "pass_index": car.pass_index,
            "engine": scene.render.engine,
            "view": scene.view_settings.view_transform,
            "counts": tuple(
                len(getattr(bpy.data, kind))
                for kind in ("scenes", "objects", "materials", "images", "cameras", "meshes")
            ),
        }

    before = snapshot()
    layout_from_camera(
        scene, [LabeledObject(car, "a car")], str(tmp_path), settings={}, reference=True
    )
    assert snapshot() == before


def test_standalone_render_matches_the_layouts_reference(bpy, scene, tmp_path):
    from blender_addon.blender.reference_render import render_reference
    from blender_addon.blender.scene_layout import LabeledObject, layout_from_camera

    scene.render.resolution_x, scene.render.resolution_y = 96, 64
    car = add_cube(bpy, "Car", (-1.0, 0.0, 0.0))
    tree = add_cube(bpy, "Tree", (1.5, 0.5, 1.0), size=1.0)
    labels = [(car, "a purple car"), (tree, "a tree")]
    made = layout_from_camera(
        scene,
        [LabeledObject(obj, text) for obj, text in labels],
        str(tmp_path / "layout"),
        settings={},
        masks=False,
        depth=False,
        reference=True,
    )
    assert made.layout.regions[0].mask is None
    alone = render_reference(scene, labels, str(tmp_path / "alone" / "ref.png"))
    with Image.open(made.layout.reference) as a, Image.open(alone) as b:
        assert a.size == b.size == (96, 64)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert COLOR_WORDS["purple"] in colors_of(np.asarray(a))


def test_no_reference_unless_asked(bpy, scene, tmp_path):
    from blender_addon.blender.scene_layout import LabeledObject, layout_from_camera

    car = add_cube(bpy, "Car", (0.0, 0.0, 0.0))
    made = layout_from_camera(scene, [LabeledObject(car, "a red car")], str(tmp_path), settings={})
    assert made.layout.reference is None
    assert not (tmp_path / "reference.png").exists()
