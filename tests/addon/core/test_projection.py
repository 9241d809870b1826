"""Pure projection, mask and PNG code, checked by hand arithmetic and against Blender's own math."""

from __future__ import annotations

import time

import numpy as np
import pytest

from blender_addon.core import masks as mask_ops
from blender_addon.core.png import encode_gray_png, read_gray_png, write_gray_png
from blender_addon.core.projection import (
    CameraModel,
    boxes_by_owner,
    camera_to_image,
    clip_segments_to_depth,
    layout_size,
    project_objects,
    projection_matrix,
    size_change,
    square_pixel_size,
    view_plane,
    world_to_image,
    world_to_ndc,
)

# A 2x2x2 cube at the origin: 8 corners and 12 edges.
CUBE = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=float)
CUBE_EDGES = np.array(
    [(i, j) for i in range(8) for j in range(i + 1, 8) if np.sum(CUBE[i] != CUBE[j]) == 1]
)


def translation(x: float, y: float, z: float) -> np.ndarray:
    m = np.eye(4)
    m[:3, 3] = (x, y, z)
    return m


def camera_at(z: float = 10.0, **kwargs) -> CameraModel:
    """A camera on the +Z axis looking down -Z (Blender's default orientation), square 512."""
    kwargs.setdefault("resolution", (512, 512))
    return CameraModel(world_to_camera=np.linalg.inv(translation(0, 0, z)), **kwargs)


def cube_box(camera: CameraModel, offset=(0.0, 0.0, 0.0)) -> tuple[np.ndarray, str | None]:
    result = project_objects(camera, CUBE + offset, CUBE_EDGES, np.zeros(8, int), 1)
    return result.boxes[0], result.reasons[0]


# -- Exact boxes -----------------------------------------------------------------------------


def test_perspective_cube_box_by_hand():
    # Lens 50, sensor 36: the frame is 36/50 = 0.72 wide at distance 1. The cube's top face
    # (z = 1) is 9 in front of the camera: half-width 1/9 -> 1/9 / 0.72 = 0.154321 of the frame.
    box, reason = cube_box(camera_at())
    half = (1 / 9) / 0.72
    assert reason is None
    np.testing.assert_allclose(box, [0.5 - half, 0.5 - half, 0.5 + half, 0.5 + half], atol=1e-12)
    assert box[0] == pytest.approx(0.345679, abs=1e-6)


def test_orthographic_box_by_hand():
    # Ortho scale 4: the frame spans 4 units, the cube 2 units -> the middle half.
    box, _ = cube_box(camera_at(ortho=True, ortho_scale=4.0))
    np.testing.assert_allclose(box, [0.25, 0.25, 0.75, 0.75], atol=1e-12)


def test_shift_moves_box_by_the_shift_on_a_square_frame():
    # Shift is a fraction of the fitted side: shift_x 0.1 moves the frame right by 0.1 of its
    # width, so everything in it moves left by exactly 0.1; shift_y 0.2 moves it down by 0.2
    # (y up in Blender, y down in the Layout).
    plain, _ = cube_box(camera_at())
    shifted, _ = cube_box(camera_at(shift_x=0.1, shift_y=-0.2))
    np.testing.assert_allclose(shifted - plain, [-0.1, -0.2, -0.1, -0.2], atol=1e-12)


@pytest.mark.parametrize(
    ("fit", "resolution", "pixel_aspect", "half_w", "half_h"),
    [
        # 2:1 AUTO -> horizontal fit: width 0.72, height 0.36 at distance 1.
        ("AUTO", (200, 100), (1.0, 1.0), 0.36, 0.18),
        # Square pixels count twice as wide: the same 2:1 frame.
        ("AUTO", (100, 100), (2.0, 1.0), 0.36, 0.18),
        # 1:2 AUTO -> vertical fit, still sized by the sensor *width* (Blender's rule).
        ("AUTO", (100, 200), (1.0, 1.0), 0.18, 0.36),
        # VERTICAL uses the sensor height (24 mm): height 0.48, width 0.96.
        ("VERTICAL", (200, 100), (1.0, 1.0), 0.48, 0.24),
        # HORIZONTAL on a tall frame: width 0.72, height 1.44.
        ("HORIZONTAL", (100, 200), (1.0, 1.0), 0.36, 0.72),
    ],
)
def test_sensor_fit_and_aspect(fit, resolution, pixel_aspect, half_w, half_h):
    camera = camera_at(sensor_fit=fit, resolution=resolution, pixel_aspect=pixel_aspect)
    assert view_plane(camera) == pytest.approx((-half_w, half_w, -half_h, half_h))
    box, _ = cube_box(camera)
    dx, dy = (1 / 9) / (2 * half_w), (1 / 9) / (2 * half_h)
    np.testing.assert_allclose(box, [0.5 - dx, 0.5 - dy, 0.5 + dx, 0.5 + dy], atol=1e-12)


def test_object_half_behind_camera_is_clipped_not_mirrored():
    # Camera at the origin looking down -Z, clip start 0.1. A block x 0.5..1.5, y -0.5..0.5,
    # z -3..1 reaches behind the camera. In front, its left edge is nearest the centre at the
    # far end: x/d = 0.5/3 -> u = 0.5 + (0.5/3)/0.72. Near the clip plane it runs off the right,
    # top and bottom edges. Projecting the vertices behind the camera (d = -1) would mirror
    # x = 1.5 to the left half of the frame and pull x0 to 0.
    block = np.array(
        [[x, y, z] for x in (0.5, 1.5) for y in (-0.5, 0.5) for z in (-3.0, 1.0)], dtype=float
    )
    camera = camera_at(z=0.0)
    result = project_objects(camera, block, CUBE_EDGES, np.zeros(8, int), 1)
    x0 = 0.5 + (0.5 / 3) / 0.72
    np.testing.assert_allclose(result.boxes[0], [x0, 0.0, 1.0, 1.0], atol=1e-12)
    naive, _ = world_to_image(camera, block)
    assert naive[:, 0].min() < 0.5  # what mirroring would have produced


def test_segment_clipping_keeps_the_near_plane_intersection():
    points = np.array([[0.0, 2.0, 1.0], [0.0, -2.0, -3.0]])  # depth -1 .. 3
    ends, edge = clip_segments_to_depth(points, np.array([[0, 1]]), near=0.1)
    # depth(t) = -1 + 4t = 0.1 -> t = 0.275 -> y = 2 - 4 * 0.275 = 0.9
    np.testing.assert_allclose(ends, [[0.0, 0.9, -0.1], [0.0, -2.0, -3.0]], atol=1e-12)
    np.testing.assert_array_equal(edge, [0, 0])
    ends, _ = clip_segments_to_depth(points, np.array([[0, 1]]), near=0.1, far=2.0)
    np.testing.assert_allclose(ends[:, 2], [-0.1, -2.0], atol=1e-12)
    ends, _ = clip_segments_to_depth(points, np.array([[0, 1]]), near=5.0)
    assert ends.shape == (0, 3)


@pytest.mark.parametrize(
    ("offset", "reason"),
    [
        ((0.0, 0.0, 20.0), "behind the camera"),
        ((30.0, 0.0, 0.0), "outside the frame"),
        ((0.0, 0.0, -2000.0), "beyond the camera's Clip End (1000)"),
    ],
)
def test_invisible_objects_get_a_reason(offset, reason):
    box, why = cube_box(camera_at(), offset)
    assert why == reason
    assert np.isnan(box).all()


def test_object_without_vertices_and_loose_vertices():
    camera = camera_at()
    verts = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])  # loose points, no edges
    result = project_objects(camera, verts, np.zeros((0, 2), int), np.array([1, 1]), 3)
    assert result.reasons[0] == "has no geometry"
    assert result.reasons[2] == "has no geometry"
    u = 0.5 + 0.1 / 0.72  # (1/10) / 0.72
    np.testing.assert_allclose(result.boxes[1], [0.5, 1 - u, u, 0.5], atol=1e-12)


def test_many_objects_match_one_at_a_time():
    rng = np.random.default_rng(3)
    camera = camera_at(lens=35.0, shift_x=0.05, resolution=(640, 480))
    offsets = rng.uniform([-6, -6, -12], [6, 6, 16], size=(60, 3))
    verts = np.concatenate([CUBE * rng.uniform(0.2, 2) + o for o in offsets])
    edges = np.concatenate([CUBE_EDGES + 8 * i for i in range(60)])
    owners = np.repeat(np.arange(60), 8)
    together = project_objects(camera, verts, edges, owners, 60)
    for i in range(60):
        alone = project_objects(camera, verts[8 * i : 8 * i + 8], CUBE_EDGES, np.zeros(8, int), 1)
        assert together.reasons[i] == alone.reasons[0]
        np.testing.assert_array_equal(together.boxes[i], alone.boxes[0])
    assert {None, "behind the camera", "outside the frame"} <= set(together.reasons)


def test_thousand_objects_are_fast():
    rng = np.random.default_rng(0)
    camera = camera_at(z=30.0)
    count, sphere = 1000, rng.normal(size=(500, 3))
    verts = np.concatenate([sphere + rng.uniform(-10, 10, 3) for _ in range(count)])
    edges = np.concatenate(
        [np.c_[np.arange(499), np.arange(1, 500)] + 500 * i for i in range(count)]
    )
    owners = np.repeat(np.arange(count), 500)
    started = time.perf_counter()
    result = project_objects(camera, verts, edges, owners, count)
    elapsed = time.perf_counter() - started
    assert sum(r is None for r in result.reasons) == count
    # About 0.2 s on one idle core; the margin absorbs a busy machine.
    assert elapsed < 2.0, f"1000 objects x 500 vertices took {elapsed:.2f} s"


def test_boxes_by_owner_matches_a_loop():
    rng = np.random.default_rng(1)
    points, owners = rng.normal(size=(300, 2)), rng.integers(0, 12, 300)
    owners[owners == 5] = 6  # owner 5 has no point
    boxes, present = boxes_by_owner(points, owners, 13)
    for k in range(13):
        mine = points[owners == k]
        assert present[k] == bool(len(mine))
        if len(mine):
            np.testing.assert_array_equal(boxes[k], [*mine.min(0), *mine.max(0)])
        else:
            assert np.isnan(boxes[k]).all()


def random_camera(rng: np.random.Generator) -> CameraModel:
    angles = rng.uniform(-np.pi, np.pi, 3)
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rot = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]) @ np.array(
        [[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]]
    )
    rot = rot @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    to_world = np.eye(4)
    to_world[:3, :3], to_world[:3, 3] = rot, rng.normal(size=3) * 5
    return CameraModel(
        world_to_camera=np.linalg.inv(to_world),
        ortho=bool(rng.integers(2)),
        lens=rng.uniform(10, 200),
        ortho_scale=rng.uniform(0.5, 20),
        sensor_width=rng.uniform(10, 50),
        sensor_height=rng.uniform(10, 50),
        sensor_fit=str(rng.choice(["AUTO", "HORIZONTAL", "VERTICAL"])),
        shift_x=rng.uniform(-1, 1),
        shift_y=rng.uniform(-1, 1),
        clip_start=rng.uniform(0.01, 1),
        clip_end=rng.uniform(50, 500),
        resolution=(int(rng.integers(64, 3000)), int(rng.integers(64, 3000))),
        pixel_aspect=(rng.uniform(1, 3), rng.uniform(1, 3)),
    )


def test_projection_matrix_agrees_with_direct_projection():
    rng = np.random.default_rng(7)
    for _ in range(100):
        camera = random_camera(rng)
        cam_points = np.c_[rng.normal(size=(20, 2)) * 3, -rng.uniform(1, 40, 20)]
        to_world = np.linalg.inv(camera.world_to_camera)
        world = cam_points @ to_world[:3, :3].T + to_world[:3, 3]
        ndc = world_to_ndc(camera, world)
        image = camera_to_image(camera, cam_points)
        np.testing.assert_allclose((ndc[:, 0] + 1) / 2, image[:, 0], atol=1e-9)
        np.testing.assert_allclose(1 - (ndc[:, 1] + 1) / 2, image[:, 1], atol=1e-9)
        # The clip range maps to NDC z in [-1, 1].
        near = np.array([[0.0, 0.0, -camera.clip_start], [0.0, 0.0, -camera.clip_end]])
        clip = np.c_[near, np.ones(2)] @ projection_matrix(camera).T
        np.testing.assert_allclose(clip[:, 2] / clip[:, 3], [-1.0, 1.0], atol=1e-9)


# -- Blender as the reference ----------------------------------------------------------------


def test_random_cameras_match_world_to_camera_view():
    """Our projection equals ``bpy_extras``'s for random cameras (points in front, near the frame).

    Blender works in float32, hence a tolerance of 1e-4 of the frame (0.1 px at 1024 px).

    The render percentage stays 100: ``world_to_camera_view`` sizes the frame from the unscaled
    resolution while renders use the integer-scaled one, which differ by rounding.
    """
    bpy = pytest.importorskip("bpy")
    from bpy_extras.object_utils import world_to_camera_view
    from mathutils import Vector

    from blender_addon.blender.camera import camera_model

    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    data = bpy.data.cameras.new("Camera")
    obj = bpy.data.objects.new("Camera", data)
    scene.collection.objects.link(obj)
    scene.camera = obj
    rng = np.random.default_rng(11)
    compared = 0
    for _ in range(150):
        spec = random_camera(rng)
        data.type = "ORTHO" if spec.ortho else "PERSP"
        for name in ("lens", "ortho_scale", "sensor_width", "sensor_height", "sensor_fit"):
            setattr(data, name, getattr(spec, name))
        data.shift_x, data.shift_y = spec.shift_x, spec.shift_y
        render = scene.render
        render.resolution_x, render.resolution_y = spec.resolution
        render.resolution_percentage = 100
        render.pixel_aspect_x, render.pixel_aspect_y = spec.pixel_aspect
        obj.matrix_world = np.linalg.inv(spec.world_to_camera).T.tolist()
        obj.scale = rng.uniform(0.5, 2, 3)  # Blender ignores camera scale; so must we
        bpy.context.view_layer.update()

        camera = camera_model(scene, obj)
        # Points in front of the camera, spread over about twice the frame.
        xmin, xmax, ymin, ymax = view_plane(camera)
        depth = rng.uniform(0.5, 30, 40)
        scale = 1.0 if camera.ortho else depth
        cam_points = np.c_[
            rng.uniform(2 * xmin - xmax, 2 * xmax - xmin, 40) * scale,
            rng.uniform(2 * ymin - ymax, 2 * ymax - ymin, 40) * scale,
            -depth,
        ]
        to_world = np.array(obj.matrix_world.normalized())
        world = cam_points @ to_world[:3, :3].T + to_world[:3, 3]
        ours, our_depth = world_to_image(camera, world)
        theirs = np.array([tuple(world_to_camera_view(scene, obj, Vector(p))) for p in world])
        np.testing.assert_allclose(ours[:, 0], theirs[:, 0], atol=1e-4)
        np.testing.assert_allclose(ours[:, 1], 1.0 - theirs[:, 1], atol=1e-4)
        np.testing.assert_allclose(our_depth, theirs[:, 2], rtol=1e-5, atol=1e-5)

        depsgraph = bpy.context.evaluated_depsgraph_get()
        blender_matrix = np.array(
            obj.calc_matrix_camera(
                depsgraph,
                x=camera.resolution[0],
                y=camera.resolution[1],
                scale_x=camera.pixel_aspect[0],
                scale_y=camera.pixel_aspect[1],
            )
        )
        ours_matrix = projection_matrix(camera)
        np.testing.assert_allclose(ours_matrix, blender_matrix, rtol=1e-4, atol=1e-5)
        compared += 1
    assert compared == 150


# -- Sizes ----------------------------------------------------------------------------------


def test_layout_size_rounds_to_multiples_of_eight_within_limits():
    assert layout_size(1920, 1080) == (1920, 1080)
    assert layout_size(1000, 563) == (1000, 560)
    assert layout_size(1003, 1005) == (1000, 1008)
    assert layout_size(20, 9000) == (64, 4096)
    assert layout_size(100, 108) == (104, 112)  # halves round up


def test_square_pixel_size_keeps_the_frame_proportions():
    camera = camera_at(resolution=(1000, 563))
    assert square_pixel_size(camera, 1000, 560) == (995, 560)
    assert square_pixel_size(camera, 64, 64) == (64, 36)
    assert square_pixel_size(camera, 1024, 4096) == (1024, 577)
    # Pixel aspect 2 on a square render: the frame is twice as wide as high.
    wide = camera_at(resolution=(100, 100), pixel_aspect=(2.0, 1.0))
    assert square_pixel_size(wide, 104, 104) == (104, 52)
    tall = camera_at(resolution=(100, 300))
    assert square_pixel_size(tall, 104, 304) == (101, 304)


# -- Masks and depth ------------------------------------------------------------------------


def test_pixels_by_id_and_counts():
    ids = np.array([[0, 2, 2], [1, 0, 7], [2, 1, 0]], dtype=np.int32)
    found = {k: sorted(v.tolist()) for k, v in mask_ops.pixels_by_id(ids, 3)}
    assert found == {1: [3, 7], 2: [1, 2, 6]}  # id 3 absent, id 7 not tracked
    np.testing.assert_array_equal(mask_ops.pixel_counts(ids, 3), [4, 2, 3, 0])
    mask = mask_ops.mask_image(ids.shape, np.array([3, 7]))
    np.testing.assert_array_equal(mask, [[0, 0, 0], [255, 0, 0], [0, 255, 0]])


def test_resample_nearest_keeps_ids_and_positions():
    ids = np.arange(12).reshape(3, 4)
    assert mask_ops.resample_nearest(ids, 3, 4) is ids
    np.testing.assert_array_equal(mask_ops.resample_nearest(ids, 6, 4), np.repeat(ids, 2, axis=0))
    np.testing.assert_array_equal(mask_ops.resample_nearest(ids, 3, 2), ids[:, [1, 3]])
    # 563 -> 560 rows: each output row takes the source row under its centre.
    tall = np.arange(563)[:, None]
    out = mask_ops.resample_nearest(tall, 560, 1)[:, 0]
    assert out[0] == 0 and out[-1] == 562
    assert np.abs(out - (np.arange(560) + 0.5) * 563 / 560).max() <= 1.0


def test_dominant_id_names_the_occluder():
    ids = np.zeros((10, 10), dtype=np.int32)
    ids[2:8, 2:8] = 5
    ids[4:6, 4:6] = 3
    occluder, share = mask_ops.dominant_id(ids, np.array([0.2, 0.2, 0.8, 0.8]), exclude=3)
    assert occluder == 5
    assert share == pytest.approx(32 / 32)
    assert mask_ops.dominant_id(ids, np.array([0.0, 0.0, 0.1, 0.1])) == (0, 1.0)
    # A box smaller than a pixel still looks at the pixel it falls in.
    assert mask_ops.dominant_id(ids, np.array([0.41, 0.41, 0.42, 0.42]))[0] == 3


def test_depth_map_is_near_white_far_one_background_zero():
    depth = np.array([[2.0, 4.0], [np.inf, 3.0]])
    out = mask_ops.depth_to_uint16(depth, np.isfinite(depth))
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, [[65535, 1], [0, 32768]])
    flat = mask_ops.depth_to_uint16(np.full((2, 2), 5.0), np.eye(2, dtype=bool))
    np.testing.assert_array_equal(flat, [[65535, 0], [0, 65535]])


# -- PNG ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(0)
    image = rng.integers(0, np.iinfo(dtype).max, size=(37, 53), dtype=dtype)
    path = tmp_path / "image.png"
    write_gray_png(path, image)
    back = read_gray_png(path)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, image)


@pytest.mark.parametrize(
    ("dtype", "rows"),
    [
        (np.uint16, slice(0, 48)),
        (np.uint8, slice(0, 48)),
        (np.uint8, slice(20, 23)),
        (np.uint8, slice(0, 0)),
        (np.uint16, slice(40, 48)),
    ],
)
def test_png_is_readable_by_another_decoder(tmp_path, dtype, rows):
    """OpenImageIO (shipped with Blender) decodes our files to the same pixels and bit depth,
    including masks whose zero rows are written as repeated precompressed blocks."""
    pytest.importorskip("bpy")
    from blender_addon.blender.images import import_oiio as _import_oiio

    oiio = _import_oiio()
    image = np.zeros((48, 1500), dtype=dtype)
    image[rows] = (np.arange(1500) * 37 % np.iinfo(dtype).max).astype(dtype)
    path = str(tmp_path / "image.png")
    write_gray_png(path, image)
    handle = oiio.ImageInput.open(path)
    spec = handle.spec()
    kind = oiio.UINT16 if dtype == np.uint16 else oiio.UINT8
    pixels = np.asarray(handle.read_image(0, 0, 0, 1, kind)).reshape(48, 1500)
    handle.close()
    assert (spec.width, spec.height, spec.nchannels) == (1500, 48, 1)
    assert spec.format == oiio.TypeDesc(kind)
    np.testing.assert_array_equal(pixels, image)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_is_readable_by_pillow(tmp_path, dtype):
    """The engine reads masks and depth with Pillow: same pixels, 8-bit "L" / 16-bit "I;16"."""
    image_module = pytest.importorskip("PIL.Image")
    image = np.zeros((300, 257), dtype=dtype)
    image[120:180, 30:200] = np.iinfo(dtype).max
    image[150, 40] = 7
    path = tmp_path / "image.png"
    write_gray_png(path, image)
    with image_module.open(path) as decoded:
        assert decoded.mode == ("L" if dtype == np.uint8 else "I;16")
        np.testing.assert_array_equal(np.array(decoded).astype(dtype), image)


def test_mostly_empty_mask_png_is_small_and_fast():
    mask = np.zeros((1024, 1024), dtype=np.uint8)
    mask[500:540, 200:260] = 255
    started = time.perf_counter()
    data = encode_gray_png(mask)
    elapsed = time.perf_counter() - started
    assert len(data) < 4000
    assert elapsed < 0.05, f"encoding a 1024^2 mask took {elapsed * 1000:.1f} ms"


def test_png_rejects_what_it_cannot_store():
    with pytest.raises(ValueError, match="uint8 or uint16"):
        encode_gray_png(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        encode_gray_png(np.zeros((4, 4, 3), dtype=np.uint8))


def test_pure_modules_import_without_blender():
    """``blender_addon.core`` must stay usable outside Blender (the engine side, tools, CI)."""
    import subprocess
    import sys

    code = (
        "import sys; import blender_addon.core.projection, blender_addon.core.masks, "
        "blender_addon.core.png, blender_addon.core.colors, blender_addon.core.composite, "
        "blender_addon.core.frames, blender_addon.core.request, blender_addon.core.names, "
        "blender_addon.core.errors; assert 'bpy' not in sys.modules, 'bpy was imported'"
    )
    root = __file__.rsplit("/tests/", 1)[0]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_layout_size_clamps_both_sides_together_keeping_the_aspect():
    assert layout_size(8192, 2048) == (4096, 1024)
    assert layout_size(7680, 4320) == (4096, 2304)
    small = size_change(40, 30)  # scaled up to the 64 px minimum, 4:3 kept
    assert small.size == (88, 64)
    assert small.clamped and small.aspect_kept


def test_size_change_says_what_changed():
    same = size_change(1920, 1080)
    assert not same.changed and same.message == "1920 x 1080"
    rounded = size_change(100, 60)
    assert rounded.size == (104, 64) and not rounded.clamped
    assert rounded.message == "Rounded 100 x 60 to 104 x 64 (multiples of 8)"
    scaled = size_change(8192, 2048)
    assert scaled.message == "Scaled 8192 x 2048 to 4096 x 1024 to fit the engine's limits"
    extreme = size_change(20, 9000)
    assert extreme.size == (64, 4096) and not extreme.aspect_kept
    assert extreme.message.endswith("(aspect not kept: too extreme)")
