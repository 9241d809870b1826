"""Blender scene -> Layout: each labeled object's box, occlusion-aware mask and a depth map.

Boxes come from projecting the evaluated geometry (modifiers applied) through the scene camera;
masks and depth come from one Cycles render of object indices (:mod:`.id_render`). The math lives
in :mod:`..core`; this module only gathers data from bpy and writes files.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import bpy
import numpy as np

from ..core import masks as mask_ops
from ..core.names import safe_name
from ..core.png import write_gray_png
from ..core.projection import layout_size, project_objects, square_pixel_size
from ..wire.layout import Layout
from .camera import camera_model, render_resolution
from .id_render import render_ids
from .reference_render import REFERENCE_NAME, id_colors, write_reference

NO_GEOMETRY_TYPES = {
    "EMPTY": "is an empty: it has no geometry to project; label a mesh instead",
    "CAMERA": "is a camera, not geometry",
    "LIGHT": "is a light, not geometry",
    "LIGHT_PROBE": "is a light probe, not geometry",
    "SPEAKER": "is a speaker, not geometry",
    "ARMATURE": "is an armature: label the meshes it deforms instead",
    "LATTICE": "is a lattice: label the meshes it deforms instead",
}


@dataclass
class LabeledObject:
    """An object and what it should become in the image."""

    obj: bpy.types.Object
    prompt: str
    weight: float = 1.0


@dataclass
class SceneLayout:
    """What :func:`layout_from_camera` produced."""

    layout: Layout
    """Mask and depth paths are absolute; the files are already written."""
    skipped: list[tuple[str, str]]
    """(object name, why it is not in the Layout)."""
    pixel_counts: dict[str, int]
    """Visible mask pixels per object name (empty when masks were not rendered)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds spent per stage: boxes, render, masks, png, reference."""


def _default_depsgraph(scene):
    """The evaluated depsgraph of ``scene``'s active (or first) view layer."""
    context = bpy.context
    if getattr(context, "scene", None) == scene and getattr(context, "view_layer", None):
        return context.evaluated_depsgraph_get()
    # Not the context's scene: ask for its depsgraph through a context override, which creates
    # and evaluates it (ViewLayer.depsgraph is None until something has built it).
    with context.temp_override(scene=scene, view_layer=scene.view_layers[0]):
        return context.evaluated_depsgraph_get()


def _geometry(obj, depsgraph) -> tuple[np.ndarray, np.ndarray] | str:
    """World-space vertices and edges of the evaluated object, or why it has none."""
    if obj.type in NO_GEOMETRY_TYPES:
        return NO_GEOMETRY_TYPES[obj.type]
    evaluated = obj.evaluated_get(depsgraph)
    try:
        mesh = evaluated.to_mesh()
    except RuntimeError:
        mesh = None
    if mesh is None:
        return f"has no mesh geometry ({obj.type.lower()})"
    try:
        coords = np.empty(len(mesh.vertices) * 3, dtype=np.float32)
        mesh.vertices.foreach_get("co", coords)
        edges = np.empty(len(mesh.edges) * 2, dtype=np.int32)
        mesh.edges.foreach_get("vertices", edges)
    finally:
        evaluated.to_mesh_clear()
    if coords.size == 0:
        return "has no vertices"
    matrix = np.array(evaluated.matrix_world, dtype=np.float64)
    world = coords.reshape(-1, 3).astype(np.float64) @ matrix[:3, :3].T + matrix[:3, 3]
    return world, edges.reshape(-1, 2)


def _hidden_reason(ids: np.ndarray, box: np.ndarray, own: int, names: dict[int, str]) -> str:
    """Why an object in the frame got no pixel: what covers most of its box, if anything."""
    occluder, _ = mask_ops.dominant_id(ids, box, exclude=own)
    if occluder and occluder in names:
        return f"fully hidden by {names[occluder]}"
    if occluder:
        return "hidden behind other objects"
    height, width = ids.shape
    return (
        f"covers no pixel of the {width}x{height} render (too small or thin, or disabled in "
        "renders); move it closer or enlarge it"
    )


def _write_masks(shape: tuple[int, int], jobs: list[tuple[str, np.ndarray]]) -> None:
    """Write one mask PNG per (path, flat pixel indices), on all cores (zlib frees the GIL)."""

    def write(job: tuple[str, np.ndarray]) -> None:
        path, pixels = job
        write_gray_png(path, mask_ops.mask_image(shape, pixels))

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(write, jobs))


@dataclass
class _Placed:
    """A labeled object with a box in the frame; ``mask`` is set once its PNG is written."""

    item: LabeledObject
    box: np.ndarray
    mask: str | None = None


def _place_objects(labeled, depsgraph, cam, skipped) -> list[_Placed]:
    """Boxes of the labeled objects that can appear; the others go to ``skipped`` with why."""
    view_layer = depsgraph.view_layer
    candidates: list[LabeledObject] = []
    chunks, edge_chunks, owners = [], [], []
    offset = 0
    seen: set[str] = set()
    for item in labeled:
        obj = item.obj
        if obj.name in seen:
            skipped.append((obj.name, "is labeled twice; only its first label is used"))
            continue
        seen.add(obj.name)
        if not item.prompt.strip():
            skipped.append((obj.name, "has an empty label; describe what it should become"))
            continue
        if obj.hide_render:
            skipped.append((obj.name, "is disabled in renders (camera icon in the Outliner)"))
            continue
        if view_layer.objects.get(obj.name) is None:
            skipped.append((obj.name, f"is not in view layer {view_layer.name!r}"))
            continue
        geometry = _geometry(obj, depsgraph)
        if isinstance(geometry, str):
            skipped.append((obj.name, geometry))
            continue
        vertices, edges = geometry
        chunks.append(vertices)
        edge_chunks.append(edges + offset)
        owners.append(np.full(len(vertices), len(candidates), dtype=np.int64))
        offset += len(vertices)
        candidates.append(item)
    if not candidates:
        return []
    projected = project_objects(
        cam,
        np.concatenate(chunks),
        np.concatenate(edge_chunks),
        np.concatenate(owners),
        len(candidates),
    )
    placed = []
    for item, box, reason in zip(candidates, projected.boxes, projected.reasons, strict=True):
        if reason is None:
            placed.append(_Placed(item, np.round(box, 6)))
        else:
            skipped.append((item.obj.name, reason))
    return placed


def _write_object_masks(
    ids: np.ndarray, placed: list[_Placed], others: dict[int, str], out_dir: str, skipped, timings
) -> tuple[list[_Placed], dict[str, int]]:
    """Write a mask per visible object; objects with no visible pixel go to ``skipped``.

    ``ids`` holds 1..N for ``placed`` in order; ``others`` names further ids (occluders).
    """
    started = time.perf_counter()
    counts = mask_ops.pixel_counts(ids, len(placed))
    names = {index: p.item.obj.name for index, p in enumerate(placed, start=1)}
    names.update(others)
    visible, pixel_counts, jobs = [], {}, []
    for index, pixels in mask_ops.pixels_by_id(ids, len(placed)):
        entry = placed[index - 1]
        entry.mask = os.path.join(out_dir, f"mask_{index:03d}_{safe_name(entry.item.obj.name)}.png")
        jobs.append((entry.mask, pixels))
    for index, entry in enumerate(placed, start=1):
        if counts[index]:
            visible.append(entry)
            pixel_counts[entry.item.obj.name] = int(counts[index])
        else:
            skipped.append((entry.item.obj.name, _hidden_reason(ids, entry.box, index, names)))
    timings["masks"] += time.perf_counter() - started
    started = time.perf_counter()
    _write_masks(ids.shape, jobs)
    timings["png"] += time.perf_counter() - started
    return visible, pixel_counts


def _write_reference(ids: np.ndarray, placed: list[_Placed], others, out_dir: str) -> str:
    """Paint the id render in flat object colours; ids 1..N are ``placed`` in order."""
    tracked = [(entry.item.obj, entry.item.prompt) for entry in placed]
    path = os.path.join(out_dir, REFERENCE_NAME)
    return write_reference(path, ids, id_colors(tracked, others))


def layout_from_camera(
    scene,
    labeled: list[LabeledObject],
    out_dir: str,
    *,
    settings: dict | None = None,
    camera=None,
    depsgraph=None,
    masks: bool = True,
    depth: bool = True,
    reference: bool = False,
) -> SceneLayout:
    """Project labeled objects through the scene camera into a Layout, writing masks and depth.

    The Layout's width and height are the render size (resolution x percentage) rounded to the
    nearest multiple of 8 within [64, 4096], as the Layout requires. The camera's frame is kept
    as it is: boxes are normalized to it, and the id render keeps its proportions and is
    resampled to the Layout's size. ``settings`` holds further Layout fields (prompt,
    negative_prompt, background_prompt, base_ratio, seed, steps, guidance_scale).

    Masks (8-bit PNG, 255 inside) hold each object's visible pixels only, exactly; the depth
    map (16-bit PNG) is white at the nearest visible surface, 0 on the background. Both come
    from one Cycles render in a temporary copy of the scene, so the user's scene, render
    settings and pass indices are left as they were. With ``reference``, the same render is
    painted in flat object colours and written as ``reference.png``, the Layout's
    ``reference`` (see :mod:`.reference_render`).

    Objects that cannot appear are left out and listed in ``skipped`` with the reason. Raises
    ``ValueError`` when there is no camera or no labeled object is visible.
    """
    camera = camera or scene.camera
    if camera is None:
        raise ValueError(
            "Set an active camera: the scene has none (Scene properties > Camera, or select a "
            "camera and press Ctrl+Numpad 0)"
        )
    timings = {"boxes": 0.0, "render": 0.0, "masks": 0.0, "png": 0.0, "reference": 0.0}
    started = time.perf_counter()
    depsgraph = depsgraph or _default_depsgraph(scene)
    cam = camera_model(scene, camera, depsgraph)
    width, height = layout_size(*render_resolution(scene))
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    skipped: list[tuple[str, str]] = []
    placed = _place_objects(labeled, depsgraph, cam, skipped)
    timings["boxes"] = time.perf_counter() - started

    pixel_counts: dict[str, int] = {}
    depth_path = reference_path = None
    if placed and (masks or depth or reference):
        started = time.perf_counter()
        rendered = render_ids(
            scene,
            camera,
            [entry.item.obj for entry in placed],
            *square_pixel_size(cam, width, height),
            depsgraph.view_layer.name,
        )
        ids = mask_ops.resample_nearest(rendered.ids, height, width)
        distances = mask_ops.resample_nearest(rendered.depth, height, width)
        timings["render"] = time.perf_counter() - started
        if reference:
            started = time.perf_counter()
            reference_path = _write_reference(ids, placed, rendered.others, out_dir)
            timings["reference"] = time.perf_counter() - started
        if masks:
            placed, pixel_counts = _write_object_masks(
                ids, placed, rendered.others, out_dir, skipped, timings
            )
        if depth and placed:
            started = time.perf_counter()
            depth_image = mask_ops.depth_to_uint16(distances, np.isfinite(distances))
            timings["masks"] += time.perf_counter() - started
            started = time.perf_counter()
            depth_path = os.path.join(out_dir, "depth.png")
            write_gray_png(depth_path, depth_image)
            timings["png"] += time.perf_counter() - started

    if not placed:
        if not skipped:
            raise ValueError("No labeled objects: give objects a label before generating")
        reasons = "; ".join(f"{name!r} {reason}" for name, reason in skipped)
        raise ValueError(f"No labeled object is visible from camera {camera.name!r}: {reasons}")

    data = {"prompt": "", **(settings or {})}
    data.update(
        width=width,
        height=height,
        depth=depth_path,
        reference=reference_path,
        regions=[
            {
                "prompt": entry.item.prompt,
                "box": [float(v) for v in entry.box],
                "mask": entry.mask,
                "weight": float(entry.item.weight),
                "name": entry.item.obj.name,
            }
            for entry in placed
        ],
    )
    return SceneLayout(
        layout=Layout.from_dict(data),
        skipped=skipped,
        pixel_counts=pixel_counts,
        timings=timings,
    )
