"""Camera projection as pure numpy: camera description, projection matrix, clipping, boxes.

Nothing here imports Blender; ``blender_addon.blender.camera`` fills a :class:`CameraModel` from a
scene. The frame follows Blender's own rules (``BKE_camera_params_compute_viewplane``): the sensor
size and lens (or ortho scale) set the size of the *fitted* side of the frame, the sensor fit
chooses that side (``AUTO``: the longer side, using the sensor width), pixel aspect stretches the
frame, and lens shift moves it by a fraction of the fitted side.

Image coordinates returned by this module are normalized to the frame, origin at the top-left,
y down -- the Layout's convention. Blender's ``world_to_camera_view`` has y up instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SENSOR_FITS = ("AUTO", "HORIZONTAL", "VERTICAL")


@dataclass(frozen=True)
class CameraModel:
    """Everything that decides where a world point lands in a camera's frame.

    ``world_to_camera`` is a rigid 4x4 transform (the camera's world matrix with its scale
    removed, inverted): the camera looks down its local -Z with +Y up, like Blender's.
    """

    world_to_camera: np.ndarray = field(default_factory=lambda: np.eye(4))
    ortho: bool = False
    lens: float = 50.0
    """Focal length in millimetres (perspective)."""
    ortho_scale: float = 6.0
    """Width of the fitted frame side in scene units (orthographic)."""
    sensor_width: float = 36.0
    sensor_height: float = 24.0
    sensor_fit: str = "AUTO"
    shift_x: float = 0.0
    shift_y: float = 0.0
    clip_start: float = 0.1
    clip_end: float = 1000.0
    resolution: tuple[int, int] = (1920, 1080)
    """Rendered pixels (resolution already scaled by the render percentage)."""
    pixel_aspect: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self) -> None:
        if self.sensor_fit not in SENSOR_FITS:
            raise ValueError(f"sensor_fit must be one of {SENSOR_FITS}, got {self.sensor_fit!r}")
        matrix = np.asarray(self.world_to_camera, dtype=np.float64)
        if matrix.shape != (4, 4):
            raise ValueError(f"world_to_camera must be 4x4, got shape {matrix.shape}")
        object.__setattr__(self, "world_to_camera", matrix)

    @property
    def frame_aspect(self) -> float:
        """Width over height of the frame as displayed (pixel aspect included)."""
        (w, h), (ax, ay) = self.resolution, self.pixel_aspect
        return (w * ax) / (h * ay)


def camera_to_world_matrix(matrix_world: np.ndarray) -> np.ndarray:
    """A camera object's world matrix with its axes normalized (Blender ignores camera scale)."""
    matrix = np.array(matrix_world, dtype=np.float64)
    norms = np.linalg.norm(matrix[:3, :3], axis=0)
    matrix[:3, :3] /= np.where(norms > 0.0, norms, 1.0)
    return matrix


def view_plane(camera: CameraModel) -> tuple[float, float, float, float]:
    """The frame's ``(xmin, xmax, ymin, ymax)`` in camera space, y up.

    Perspective: on the plane at distance 1 in front of the camera. Orthographic: in scene units.
    """
    if camera.ortho:
        size = camera.ortho_scale
    else:
        sensor = camera.sensor_height if camera.sensor_fit == "VERTICAL" else camera.sensor_width
        size = sensor / camera.lens
    aspect = camera.frame_aspect
    fit = camera.sensor_fit
    if fit == "AUTO":
        fit = "HORIZONTAL" if aspect >= 1.0 else "VERTICAL"
    if fit == "HORIZONTAL":
        half_w, half_h = 0.5 * size, 0.5 * size / aspect
    else:
        half_w, half_h = 0.5 * size * aspect, 0.5 * size
    dx, dy = camera.shift_x * size, camera.shift_y * size
    return (-half_w + dx, half_w + dx, -half_h + dy, half_h + dy)


def projection_matrix(camera: CameraModel) -> np.ndarray:
    """The camera's 4x4 projection (OpenGL convention, like Blender's ``calc_matrix_camera``).

    Maps camera-space points to clip space; after the divide by w the frame spans [-1, 1] in x
    and y (y up) and the clip range maps to z in [-1, 1].
    """
    xmin, xmax, ymin, ymax = view_plane(camera)
    near, far = camera.clip_start, camera.clip_end
    m = np.zeros((4, 4))
    if camera.ortho:
        m[0, 0] = 2.0 / (xmax - xmin)
        m[1, 1] = 2.0 / (ymax - ymin)
        m[0, 3] = -(xmax + xmin) / (xmax - xmin)
        m[1, 3] = -(ymax + ymin) / (ymax - ymin)
        m[2, 2] = -2.0 / (far - near)
        m[2, 3] = -(far + near) / (far - near)
        m[3, 3] = 1.0
    else:
        # view_plane is at distance 1; the frustum's near window is that scaled by `near`.
        m[0, 0] = 2.0 / (xmax - xmin)
        m[1, 1] = 2.0 / (ymax - ymin)
        m[0, 2] = (xmax + xmin) / (xmax - xmin)
        m[1, 2] = (ymax + ymin) / (ymax - ymin)
        m[2, 2] = -(far + near) / (far - near)
        m[2, 3] = -2.0 * far * near / (far - near)
        m[3, 2] = -1.0
    return m


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply an affine 4x4 matrix to (N, 3) points."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def world_to_ndc(camera: CameraModel, points: np.ndarray) -> np.ndarray:
    """World (N, 3) points to normalized device coordinates (N, 3), x and y in [-1, 1] on frame.

    Points behind a perspective camera come out mirrored; clip them first
    (:func:`clip_segments_to_depth`).
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    homogeneous = np.hstack([points, np.ones((len(points), 1))])
    clip = homogeneous @ (projection_matrix(camera) @ camera.world_to_camera).T
    return clip[:, :3] / clip[:, 3:4]


def camera_to_image(camera: CameraModel, points: np.ndarray) -> np.ndarray:
    """Camera-space (N, 3) points in front of the camera to normalized image (x, y down)."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    xmin, xmax, ymin, ymax = view_plane(camera)
    x, y = points[:, 0], points[:, 1]
    if not camera.ortho:
        depth = -points[:, 2]
        x, y = x / depth, y / depth
    u = (x - xmin) / (xmax - xmin)
    v = 1.0 - (y - ymin) / (ymax - ymin)
    return np.stack([u, v], axis=1)


def world_to_image(camera: CameraModel, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World (N, 3) points to normalized image (N, 2) (x, y down) and their depth along the view.

    Same numbers as ``bpy_extras.object_utils.world_to_camera_view`` with y flipped
    (``y_down = 1 - y_up``). Depth is negative behind the camera.
    """
    cam_points = transform_points(camera.world_to_camera, points)
    return camera_to_image(camera, cam_points), -cam_points[:, 2]


def clip_segments_to_depth(
    points: np.ndarray, edges: np.ndarray, near: float, far: float = np.inf
) -> tuple[np.ndarray, np.ndarray]:
    """Cut camera-space segments to the slab ``near <= depth <= far`` (depth = -z).

    Returns the clipped segments' end points (M, 3) and, for each, the edge it came from.
    Parts of an edge behind the near plane are cut off rather than projected, so nothing
    behind the camera is ever mirrored into the frame. Vertices on no edge are not returned;
    see :func:`points_in_depth_range` for them.
    """
    points = np.asarray(points, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    a, b = points[edges[:, 0]], points[edges[:, 1]]
    da, db = -a[:, 2], -b[:, 2]
    dd = db - da
    moving = dd != 0.0
    safe = np.where(moving, dd, 1.0)
    t_near, t_far = (near - da) / safe, (far - da) / safe
    rising = dd > 0.0
    t0 = np.where(rising, t_near, t_far)
    t1 = np.where(rising, t_far, t_near)
    t0 = np.where(moving, np.maximum(t0, 0.0), 0.0)
    t1 = np.where(moving, np.minimum(t1, 1.0), 1.0)
    inside_flat = (da >= near) & (da <= far)
    keep = np.where(moving, t0 <= t1, inside_flat)
    a, b, t0, t1 = a[keep], b[keep], t0[keep, None], t1[keep, None]
    ends = np.concatenate([a + t0 * (b - a), a + t1 * (b - a)])
    edge_index = np.flatnonzero(keep)
    return ends, np.concatenate([edge_index, edge_index])


def points_in_depth_range(points: np.ndarray, near: float, far: float = np.inf) -> np.ndarray:
    """Boolean mask of camera-space points with ``near <= depth <= far``."""
    depth = -np.asarray(points, dtype=np.float64)[:, 2]
    return (depth >= near) & (depth <= far)


def boxes_by_owner(
    points: np.ndarray, owners: np.ndarray, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Bounding box ``[x0, y0, x1, y1]`` of (N, 2) points per owner id in ``range(count)``.

    Returns (count, 4) boxes (NaN where an owner has no point) and a boolean "has points".
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    owners = np.asarray(owners, dtype=np.int64)
    boxes = np.full((count, 4), np.nan)
    present = np.zeros(count, dtype=bool)
    if len(points) == 0:
        return boxes, present
    order = np.argsort(owners, kind="stable")
    sorted_owners, sorted_points = owners[order], points[order]
    starts = np.flatnonzero(np.r_[True, sorted_owners[1:] != sorted_owners[:-1]])
    ids = sorted_owners[starts]
    boxes[ids, :2] = np.minimum.reduceat(sorted_points, starts, axis=0)
    boxes[ids, 2:] = np.maximum.reduceat(sorted_points, starts, axis=0)
    present[ids] = True
    return boxes, present


@dataclass
class ProjectedBoxes:
    """Per-object result of :func:`project_objects`."""

    boxes: np.ndarray
    """(K, 4) normalized ``[x0, y0, x1, y1]`` clipped to the frame; NaN rows for skipped objects."""
    reasons: list[str | None]
    """Why each object has no box (None when it has one)."""


def project_objects(
    camera: CameraModel,
    vertices: np.ndarray,
    edges: np.ndarray,
    vertex_owner: np.ndarray,
    count: int,
) -> ProjectedBoxes:
    """Frame boxes of many objects at once.

    ``vertices`` (N, 3) are world-space points of all objects concatenated, ``vertex_owner`` (N,)
    says which object (0..count-1) each belongs to, ``edges`` (E, 2) index into ``vertices``.
    Edges crossing the near or far clip plane are cut there and the cut points count, so an
    object reaching behind the camera gets a box that runs to the frame edge, not a mirrored one.
    """
    vertices = np.asarray(vertices, dtype=np.float64).reshape(-1, 3)
    vertex_owner = np.asarray(vertex_owner, dtype=np.int64)
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    near, far = camera.clip_start, camera.clip_end
    cam = transform_points(camera.world_to_camera, vertices)
    inside = points_in_depth_range(cam, near, far)
    # Only edges with an end outside the slab add points beyond their (inside) vertices.
    crossing = edges[~(inside[edges[:, 0]] & inside[edges[:, 1]])]
    ends, edge_index = clip_segments_to_depth(cam, crossing, near, far)
    points = np.concatenate([cam[inside], ends])
    owners = np.concatenate([vertex_owner[inside], vertex_owner[crossing[edge_index, 0]]])
    image = camera_to_image(camera, points) if len(points) else np.zeros((0, 2))
    boxes, present = boxes_by_owner(image, owners, count)

    has_vertices = np.bincount(vertex_owner, minlength=count)[:count] > 0
    # Nearest depth only matters for objects with nothing in the slab (usually few).
    nearest = np.full(count, np.inf)
    unseen = (has_vertices & ~present)[vertex_owner]
    if unseen.any():
        np.minimum.at(nearest, vertex_owner[unseen], -cam[unseen, 2])
    clipped = np.clip(boxes, 0.0, 1.0)
    reasons: list[str | None] = []
    for i in range(count):
        x0, y0, x1, y1 = boxes[i]
        if not has_vertices[i]:
            reasons.append("has no geometry")
        elif not present[i]:
            if nearest[i] > far:
                reasons.append(f"beyond the camera's Clip End ({far:g})")
            else:
                reasons.append("behind the camera")
        elif x1 <= 0.0 or x0 >= 1.0 or y1 <= 0.0 or y0 >= 1.0:
            reasons.append("outside the frame")
        elif clipped[i, 2] <= clipped[i, 0] or clipped[i, 3] <= clipped[i, 1]:
            reasons.append("has no area in the frame (seen edge-on)")
        else:
            reasons.append(None)
    clipped[[r is not None for r in reasons]] = np.nan
    return ProjectedBoxes(boxes=clipped, reasons=reasons)


@dataclass(frozen=True)
class SizeChange:
    """The size a render resolution is generated at, and what changed on the way."""

    requested: tuple[int, int]
    size: tuple[int, int]
    clamped: bool
    """True when the size was scaled (both sides together) to fit the limits."""

    @property
    def changed(self) -> bool:
        return self.size != self.requested

    @property
    def aspect_kept(self) -> bool:
        """Whether the generated size shows the requested proportions to within one rounding step
        (a side pinned at a limit by an extreme aspect cannot keep them)."""
        (w0, h0), (w1, h1) = self.requested, self.size
        return abs(w1 / h1 - w0 / h0) <= (w0 / h0) * 8.0 / min(w1, h1) + 1e-9

    @property
    def message(self) -> str:
        """One line for the artist: ``1920 x 1080`` when nothing changed, else what did."""
        (w0, h0), (w1, h1) = self.requested, self.size
        if not self.changed:
            return f"{w1} x {h1}"
        if not self.clamped:
            return f"Rounded {w0} x {h0} to {w1} x {h1} (multiples of 8)"
        text = f"Scaled {w0} x {h0} to {w1} x {h1} to fit the engine's limits"
        return text if self.aspect_kept else text + " (aspect not kept: too extreme)"


def size_change(
    width: int, height: int, multiple: int = 8, low: int = 64, high: int = 4096
) -> SizeChange:
    """The Layout size for a render size: both sides scaled by one factor into ``[low, high]``
    (so the aspect is kept), then each rounded to the nearest multiple of ``multiple``.

    Halves round up (100 -> 104), unlike Python's ``round``. Only an aspect more extreme than
    ``high / low`` cannot be kept: the short side then stays at ``low``.
    """
    w, h = max(int(width), 1), max(int(height), 1)

    def nearest(value: float) -> int:
        return int((value + multiple / 2) // multiple) * multiple

    def one(value: float) -> int:
        return int(min(max(nearest(value), low), high))

    scale = 1.0
    if nearest(max(w, h)) > high:
        scale = high / max(w, h)
    elif nearest(min(w, h)) < low:
        scale = min(low / min(w, h), high / max(w, h))

    if scale == 1.0:
        size = (one(w), one(h))
    else:
        size = (one(round(w * scale, 6)), one(round(h * scale, 6)))
    return SizeChange(requested=(w, h), size=size, clamped=scale != 1.0)


def layout_size(
    width: int, height: int, multiple: int = 8, low: int = 64, high: int = 4096
) -> tuple[int, int]:
    """The Layout size for a render size (see :func:`size_change`, which also says what changed)."""
    return size_change(width, height, multiple, low, high).size


def square_pixel_size(camera: CameraModel, width: int, height: int) -> tuple[int, int]:
    """A render size close to ``width`` x ``height`` that shows ``camera``'s frame in square pixels.

    Rounding to the Layout's multiple of 8 changes the image's proportions slightly, and the
    frame must not change with it: the id render uses this size (square pixels, same frame
    proportions, one side kept) and is then resampled to the Layout's size. Square pixels also
    avoid Blender failing to write multilayer EXRs with a pixel aspect other than 1.
    """
    aspect = camera.frame_aspect
    if aspect >= width / height:
        return width, max(1, round(width / aspect))
    return max(1, round(height * aspect)), height
