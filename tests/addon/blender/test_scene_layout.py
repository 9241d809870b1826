"""Blender scenes built in code -> Layout, through real bpy (headless) and a real Cycles render."""

from __future__ import annotations

import os

import numpy as np
import pytest

bpy = pytest.importorskip("bpy")

from blender_addon.blender.scene_layout import (  # noqa: E402
    LabeledObject,
    layout_from_camera,
)
from blender_addon.core.png import read_gray_png  # noqa: E402

HALF = (1 / 9) / 0.72
"""Half-width of a 2-unit cube's top face (9 in front) through a 50 mm lens on a 36 mm sensor."""


@pytest.fixture
def scene():
    """An empty scene with a camera at (0, 0, 10) looking down -Z, lens 50, 64x64."""
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    data = bpy.data.cameras.new("Camera")
    camera = bpy.data.objects.new("Camera", data)
    scene.collection.objects.link(camera)
    camera.location = (0.0, 0.0, 10.0)
    scene.camera = camera
    scene.render.resolution_x = scene.render.resolution_y = 64
    return scene


def cube(location=(0.0, 0.0, 0.0), size=2.0, name=None):
    bpy.ops.mesh.primitive_cube_add(size=size, location=location)
    obj = bpy.context.object
    if name:
        obj.name = name
    return obj


def sphere(location, radius=1.0, name=None):
    bpy.ops.mesh.primitive_uv_sphere_add(radius=radius, location=location)
    obj = bpy.context.object
    if name:
        obj.name = name
    return obj


def run(scene, objects, out_dir, **kwargs):
    labeled = [LabeledObject(obj, f"a {obj.name.lower()}") for obj in objects]
    return layout_from_camera(
        scene, labeled, str(out_dir), settings={"prompt": "a scene"}, **kwargs
    )


def mask_extent(path) -> tuple[int, int, int, int]:
    """(col0, row0, col1, row1) of the white pixels, end exclusive."""
    mask = read_gray_png(path)
    rows, cols = np.nonzero(mask)
    return cols.min(), rows.min(), cols.max() + 1, rows.max() + 1


def test_cube_box_mask_and_depth_by_hand(scene, tmp_path):
    # 512x512: the top face spans 0.5 +- HALF = 0.345679..0.654321 of the frame, i.e. pixels
    # 176.99..335.01: pixel centres 177.5..334.5 -> 158 columns and rows lie inside.
    scene.render.resolution_x = scene.render.resolution_y = 512
    result = run(scene, [cube(name="Box")], tmp_path, depth=True)
    layout = result.layout
    assert (layout.width, layout.height) == (512, 512)
    (region,) = layout.regions
    np.testing.assert_allclose(
        region.box, [0.5 - HALF, 0.5 - HALF, 0.5 + HALF, 0.5 + HALF], atol=1e-6
    )
    assert region.name == "Box" and region.prompt == "a box"
    assert os.path.isabs(region.mask) and os.path.dirname(region.mask) == str(tmp_path)
    mask = read_gray_png(region.mask)
    assert mask.shape == (512, 512) and mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 255}
    assert result.pixel_counts == {"Box": 158 * 158}
    assert mask_extent(region.mask) == (177, 177, 335, 335)
    assert result.skipped == []


def test_orthographic_camera_box(scene, tmp_path):
    scene.camera.data.type = "ORTHO"
    scene.camera.data.ortho_scale = 4.0
    result = run(scene, [cube()], tmp_path, masks=False, depth=False)
    np.testing.assert_allclose(result.layout.regions[0].box, [0.25, 0.25, 0.75, 0.75], atol=1e-6)
    assert result.layout.regions[0].mask is None and result.layout.depth is None
    assert os.listdir(tmp_path) == []


def test_depth_without_masks(scene, tmp_path):
    result = run(scene, [cube(name="Box")], tmp_path, masks=False, depth=True)
    assert result.layout.regions[0].mask is None and result.pixel_counts == {}
    assert os.listdir(tmp_path) == ["depth.png"]
    depth = read_gray_png(result.layout.depth)
    assert (depth > 0).sum() == 20 * 20  # the cube's top face, the only surface in view


def test_shifted_camera_moves_box_left_by_the_shift(scene, tmp_path):
    # shift_x 0.1 moves the frame right by 0.1 of its (square) width.
    scene.camera.data.shift_x = 0.1
    result = run(scene, [cube()], tmp_path, masks=False, depth=False)
    expected = [0.4 - HALF, 0.5 - HALF, 0.4 + HALF, 0.5 + HALF]
    np.testing.assert_allclose(result.layout.regions[0].box, expected, atol=1e-6)


def test_non_square_vertical_fit_and_percentage(scene, tmp_path):
    # 400x200 at 50% renders 200x100. VERTICAL fit with a 24 mm sensor height: the frame is
    # 24/50 = 0.48 high and 0.96 wide at distance 1 -> half-extents (1/9)/0.96 and (1/9)/0.48.
    scene.render.resolution_x, scene.render.resolution_y = 400, 200
    scene.render.resolution_percentage = 50
    scene.camera.data.sensor_fit = "VERTICAL"
    result = run(scene, [cube()], tmp_path, depth=False)
    layout = result.layout
    assert (layout.width, layout.height) == (200, 104)  # 100 rounds to the nearest multiple of 8
    dx, dy = (1 / 9) / 0.96, (1 / 9) / 0.48
    box = layout.regions[0].box
    np.testing.assert_allclose(box, [0.5 - dx, 0.5 - dy, 0.5 + dx, 0.5 + dy], atol=1e-6)
    # The id render keeps the 2:1 frame (200x100) and is resampled to 200x104: the mask sits
    # where the box says (to the pixel), although 104 is not half of 200.
    c0, r0, c1, r1 = mask_extent(layout.regions[0].mask)
    assert abs(c0 - box[0] * 200) <= 1 and abs(c1 - box[2] * 200) <= 1
    assert abs(r0 - box[1] * 104) <= 1 and abs(r1 - box[3] * 104) <= 1


def test_pixel_aspect_keeps_masks_on_their_boxes(scene, tmp_path):
    # 64x64 pixels twice as wide as high: a 2:1 frame (horizontal fit, 0.72 x 0.36 at distance
    # 1) in a 64x64 Layout. The id render uses 64x32 square pixels, resampled to 64x64.
    scene.render.pixel_aspect_x = 2.0
    result = run(scene, [cube()], tmp_path, depth=False)
    layout = result.layout
    assert (layout.width, layout.height) == (64, 64)
    dx, dy = (1 / 9) / 0.72, (1 / 9) / 0.36
    box = layout.regions[0].box
    np.testing.assert_allclose(box, [0.5 - dx, 0.5 - dy, 0.5 + dx, 0.5 + dy], atol=1e-6)
    c0, r0, c1, r1 = mask_extent(layout.regions[0].mask)
    assert abs(c0 - box[0] * 64) <= 1 and abs(c1 - box[2] * 64) <= 1
    assert abs(r0 - box[1] * 64) <= 2 and abs(r1 - box[3] * 64) <= 2  # 2 rows per render row


def test_cube_half_behind_camera_touches_the_edge_without_mirroring(scene, tmp_path):
    # Camera at z=10; a 4-unit cube centred at (2.5, 0, 10) spans x 0.5..4.5 and z 8..12, so
    # half of it is behind the camera. In front, its edge nearest the centre (x = 0.5) is at
    # most 2 away: u = 0.5 + (0.5/2)/0.72. It runs off the right, top and bottom near the
    # camera. Mirroring the corners behind it (x = 4.5 at depth -2) would give x0 = 0.
    obj = cube(location=(2.5, 0.0, 10.0), size=4.0)
    result = run(scene, [obj], tmp_path, depth=False)
    box = result.layout.regions[0].box
    np.testing.assert_allclose(box, [0.5 + 0.25 / 0.72, 0.0, 1.0, 1.0], atol=1e-6)
    assert result.pixel_counts[obj.name] > 0


def test_invisible_objects_are_skipped_with_reasons(scene, tmp_path):
    visible = cube(name="Visible")
    outside = cube(location=(40.0, 0.0, 0.0), name="Outside")
    behind = cube(location=(0.0, 0.0, 20.0), name="Behind")
    empty = bpy.data.objects.new("Marker", None)
    scene.collection.objects.link(empty)
    result = run(scene, [visible, outside, behind, empty], tmp_path, masks=False, depth=False)
    assert [r.name for r in result.layout.regions] == ["Visible"]
    reasons = dict(result.skipped)
    assert reasons["Outside"] == "outside the frame"
    assert reasons["Behind"] == "behind the camera"
    assert reasons["Marker"].startswith("is an empty")


def test_no_visible_object_raises_with_each_reason(scene, tmp_path):
    outside = cube(location=(40.0, 0.0, 0.0), name="Outside")
    behind = cube(location=(0.0, 0.0, 20.0), name="Behind")
    with pytest.raises(ValueError, match="No labeled object is visible") as info:
        run(scene, [outside, behind], tmp_path)
    assert "'Outside' outside the frame" in str(info.value)
    assert "'Behind' behind the camera" in str(info.value)


def test_no_camera_raises(scene, tmp_path):
    obj = cube()
    scene.camera = None
    with pytest.raises(ValueError, match="Set an active camera"):
        run(scene, [obj], tmp_path)


def test_modifier_widens_the_box(scene, tmp_path):
    obj = cube()
    plain = run(scene, [obj], tmp_path, masks=False, depth=False).layout.regions[0].box
    array = obj.modifiers.new("Array", "ARRAY")
    array.count = 2  # a second cube right next to the first: x from -1 to 3
    wide = run(scene, [obj], tmp_path, masks=False, depth=False).layout.regions[0].box
    assert wide[0] == pytest.approx(plain[0]) and wide[1] == pytest.approx(plain[1])
    assert wide[2] == pytest.approx(0.5 + (3 / 9) / 0.72, abs=1e-6)


def test_text_object_gets_a_box_from_its_geometry(scene, tmp_path):
    curve = bpy.data.curves.new("Title", "FONT")
    curve.body = "HI"
    text = bpy.data.objects.new("Title", curve)
    scene.collection.objects.link(text)
    result = run(scene, [text], tmp_path, depth=False)
    x0, y0, x1, y1 = result.layout.regions[0].box
    # Text starts at the object's origin and grows right and up: the frame's centre-right.
    assert x0 == pytest.approx(0.5, abs=0.02) and y1 == pytest.approx(0.5, abs=0.02)
    assert x1 > 0.55 and y0 < 0.45
    assert result.pixel_counts["Title"] > 0


def test_occlusion_halves_a_sphere_behind_a_cube(scene, tmp_path):
    # A sphere at the origin; nearer the camera, a cube hides everything left of x = 0.
    scene.render.resolution_x = scene.render.resolution_y = 128
    ball = sphere((0.0, 0.0, 0.0), name="Ball")
    wall = cube(location=(-1.5, 0.0, 4.0), size=3.0, name="Wall")
    wall.hide_render = True
    alone = run(scene, [ball], tmp_path / "alone", depth=False).pixel_counts["Ball"]
    wall.hide_render = False
    result = run(scene, [ball], tmp_path / "hidden", depth=False)
    ratio = result.pixel_counts["Ball"] / alone
    assert 0.35 <= ratio <= 0.65, ratio
    mask = read_gray_png(result.layout.regions[0].mask)
    assert mask[:, :63].sum() == 0 and mask[:, 68:].sum() > 0  # hidden on the left only
    # Unlabeled objects occlude; labeled ones too, and each keeps its own pixels.
    both = run(scene, [ball, wall], tmp_path / "both", depth=False)
    assert both.pixel_counts["Ball"] == result.pixel_counts["Ball"]
    assert both.pixel_counts["Wall"] > 0


def test_fully_hidden_object_is_skipped_naming_the_occluder(scene, tmp_path):
    ball = sphere((0.0, 0.0, 0.0), radius=0.5, name="Ball")
    cube(location=(0.0, 0.0, 4.0), size=3.0, name="Wall")
    other = cube(location=(3.0, 3.0, 0.0), size=1.0, name="Other")
    result = run(scene, [ball, other], tmp_path, depth=False)
    assert dict(result.skipped) == {"Ball": "fully hidden by Wall"}
    assert [r.name for r in result.layout.regions] == ["Other"]
    assert "Ball" not in result.pixel_counts


def test_depth_png_is_16_bit_and_nearer_is_brighter(scene, tmp_path):
    near = cube(location=(-2.0, 0.0, 3.0), size=1.0, name="Near")
    far = cube(location=(2.0, 0.0, -3.0), size=1.0, name="Far")
    result = run(scene, [near, far], tmp_path)
    depth = read_gray_png(result.layout.depth)
    assert depth.dtype == np.uint16 and depth.shape == (64, 64)
    masks = {r.name: read_gray_png(r.mask) > 0 for r in result.layout.regions}
    assert depth[masks["Near"]].max() == 65535  # the nearest surface is white
    assert depth[masks["Far"]].max() < depth[masks["Near"]].min()
    assert depth[masks["Far"]].min() >= 1  # farthest visible stays above the background
    background = ~(masks["Near"] | masks["Far"])
    assert depth[background].max() == 0


def test_user_scene_is_left_unchanged(scene, tmp_path):
    obj = cube(name="Box")
    bystander = cube(location=(2.0, 2.0, 0.0), size=0.5, name="Bystander")
    obj.pass_index, bystander.pass_index = 7, 3
    render = scene.render
    render.engine = "BLENDER_EEVEE"
    render.filepath = "//renders/frame_"
    render.image_settings.file_format = "JPEG"
    scene.cycles.samples = 256
    scene.cycles.max_bounces = 9
    scene.frame_current = 17
    layer = bpy.context.view_layer
    layer.use_pass_z = False
    layer.use_pass_object_index = False
    layer.use_pass_normal = True
    scene.camera.data.dof.use_dof = True  # must not blur the ids; must stay on
    scene.camera.data.dof.aperture_fstop = 0.1
    scene.camera.data.dof.focus_distance = 1.0

    def snapshot():
        return {
            "engine": render.engine,
            "filepath": render.filepath,
            "format": render.image_settings.file_format,
            "resolution": (render.resolution_x, render.resolution_y, render.resolution_percentage),
            "samples": scene.cycles.samples,
            "bounces": scene.cycles.max_bounces,
            "frame": scene.frame_current,
            "passes": (layer.use_pass_z, layer.use_pass_object_index, layer.use_pass_normal),
            "pass_index": (obj.pass_index, bystander.pass_index),
            "camera": scene.camera.name,
            "dof": scene.camera.data.dof.use_dof,
            "world": scene.world,
            "material_override": layer.material_override,
            "counts": (
                len(bpy.data.scenes),
                len(bpy.data.materials),
                len(bpy.data.node_groups),
                len(bpy.data.collections),
                len(bpy.data.objects),
                len(bpy.data.meshes),
                len(bpy.data.cameras),
                len(bpy.data.images),
            ),
        }

    before = snapshot()
    result = run(scene, [obj], tmp_path)
    assert result.pixel_counts["Box"] == 20 * 20  # exact despite depth of field
    assert snapshot() == before
    assert bpy.context.scene == scene


def test_empty_label_and_unknown_setting(scene, tmp_path):
    obj = cube(name="Box")
    other = cube(location=(3.0, 0.0, 0.0), size=1.0, name="Other")
    labeled = [
        LabeledObject(obj, "  "),
        LabeledObject(other, "a crate", weight=2.0),
        LabeledObject(other, "a barrel"),
    ]
    result = layout_from_camera(scene, labeled, str(tmp_path), masks=False, depth=False)
    assert result.skipped[0][0] == "Box" and "empty label" in result.skipped[0][1]
    assert result.skipped[1] == ("Other", "is labeled twice; only its first label is used")
    assert [r.prompt for r in result.layout.regions] == ["a crate"]
    assert result.layout.regions[0].weight == 2.0
    with pytest.raises(ValueError, match="unknown Layout field"):
        layout_from_camera(
            scene, labeled, str(tmp_path), settings={"prompt": "x", "sampler": "euler"}
        )


def test_objects_left_out_of_renders_are_skipped(scene, tmp_path):
    shown = cube(name="Shown")
    off = cube(location=(2.0, 0.0, 0.0), size=1.0, name="RenderOff")
    off.hide_render = True
    excluded_collection = bpy.data.collections.new("Excluded")
    scene.collection.children.link(excluded_collection)
    parked = bpy.data.objects.new("Parked", shown.data)
    excluded_collection.objects.link(parked)
    bpy.context.view_layer.layer_collection.children["Excluded"].exclude = True
    result = run(scene, [shown, off, parked], tmp_path, depth=False)
    reasons = dict(result.skipped)
    assert "disabled in renders" in reasons["RenderOff"]
    assert reasons["Parked"] == "is not in view layer 'ViewLayer'"
    assert list(result.pixel_counts) == ["Shown"]


def test_scene_other_than_the_context_scene(scene, tmp_path):
    other = bpy.data.scenes.new("Other")
    other.render.resolution_x = other.render.resolution_y = 64
    camera = bpy.data.objects.new("OtherCamera", scene.camera.data)
    camera.location = (0.0, 0.0, 10.0)
    other.collection.objects.link(camera)
    other.camera = camera
    obj = cube(name="Box")
    scene.collection.objects.unlink(obj)
    other.collection.objects.link(obj)
    obj.modifiers.new("Array", "ARRAY").count = 2  # evaluated in the other scene's depsgraph
    result = run(other, [obj], tmp_path)
    box = result.layout.regions[0].box
    assert box[2] == pytest.approx(0.5 + (3 / 9) / 0.72, abs=1e-6)
    assert result.pixel_counts["Box"] == 2 * 20 * 20  # two 20x20 faces at 64 px
    assert bpy.context.scene == scene
    assert not any(image.type == "RENDER_RESULT" for image in bpy.data.images)


def test_instanced_objects_do_not_leak_into_masks(scene, tmp_path):
    # An object outside the scene, shown through a collection instance, carries pass index 1:
    # the same id the first labeled object gets. It must occlude, not count as that object.
    props = bpy.data.collections.new("Props")
    stray = bpy.data.objects.new("Stray", cube(size=1.0, name="Template").data)
    bpy.data.objects.remove(bpy.data.objects["Template"])
    props.objects.link(stray)
    stray.pass_index = 1
    instance = bpy.data.objects.new("PropsInstance", None)
    instance.instance_type = "COLLECTION"
    instance.instance_collection = props
    instance.location = (2.5, 2.5, 0.0)
    scene.collection.objects.link(instance)
    labeled = cube(name="Box")
    result = run(scene, [labeled], tmp_path, depth=False)
    assert result.pixel_counts == {"Box": 20 * 20}  # the 2-unit cube alone at 64 px
    assert stray.pass_index == 1


def test_object_smaller_than_a_pixel_is_skipped_with_a_hint(scene, tmp_path):
    speck = cube(location=(0.3, 0.3, 0.0), size=0.002, name="Speck")
    cube(location=(-2.0, -2.0, 0.0), size=1.0, name="Other")
    result = run(scene, [speck, bpy.data.objects["Other"]], tmp_path, depth=False)
    reason = dict(result.skipped)["Speck"]
    assert reason.startswith("covers no pixel of the 64x64 render")
    assert "move it closer or enlarge it" in reason
