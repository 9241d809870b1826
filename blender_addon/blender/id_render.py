"""One cheap Cycles render giving, per pixel, which object is seen there and how far it is.

The render happens in a temporary copy of the scene (it shares the objects and collections, but
has its own render settings and view layers) through a temporary copy of the camera (depth of
field off), both removed afterwards. Object pass indices are the one thing that must be set on
the shared objects; they are restored in a ``finally``.

Cycles writes the Object Index and Depth passes to an uncompressed multilayer EXR that
:mod:`..core.exr` reads back with numpy on every Blender version: the compositor's Viewer node
yields nothing in background mode, ``bpy.data.images.load`` cannot open multilayer EXRs and
not every ``bpy`` build bundles OpenImageIO. Blender
5.0 fails to write multilayer EXRs whose pixel aspect is not 1, so the render uses square pixels.
"""

from __future__ import annotations

import glob
import os
import tempfile
from dataclasses import dataclass

import bpy
import numpy as np

from ..core.exr import ExrError, exr_channels
from .compat import MULTILAYER_EXR, new_material_nodes, set_file_format

PASS_INDEX_MAX = 32767
"""Blender's upper limit for ``Object.pass_index``."""

BACKGROUND_DEPTH = 1e9
"""Cycles stores 1e10 as depth where no surface was hit; anything beyond this is background."""

_PASS_FLAGS_OFF = (
    "use_pass_combined",
    "use_pass_vector",
    "use_pass_position",
    "use_pass_normal",
    "use_pass_uv",
    "use_pass_mist",
    "use_pass_material_index",
    "use_pass_shadow",
    "use_pass_ambient_occlusion",
    "use_pass_emit",
    "use_pass_environment",
    "use_pass_diffuse_direct",
    "use_pass_diffuse_indirect",
    "use_pass_diffuse_color",
    "use_pass_glossy_direct",
    "use_pass_glossy_indirect",
    "use_pass_glossy_color",
    "use_pass_transmission_direct",
    "use_pass_transmission_indirect",
    "use_pass_transmission_color",
    "use_pass_subsurface_direct",
    "use_pass_subsurface_indirect",
    "use_pass_subsurface_color",
    "use_pass_cryptomatte_object",
    "use_pass_cryptomatte_material",
    "use_pass_cryptomatte_asset",
)


@dataclass
class IdRender:
    """Result of :func:`render_ids`: images with row 0 at the top."""

    ids: np.ndarray
    """(H, W) int32: 1..N for the tracked objects in order, larger for other objects, 0 = none."""
    depth: np.ndarray
    """(H, W) float32 distance along the view axis; ``inf`` where no surface was hit."""
    others: dict[int, str]
    """Names of untracked objects by their id (those that could get a unique pass index)."""


def read_exr_channels(path: str, wanted: tuple[tuple[str, ...], ...]) -> list[np.ndarray]:
    """Read single channels of the id render's EXR, each given by accepted name endings.

    Blender 5 writes every pass as its own part, e.g. ``ViewLayer.Object Index.X``; older
    releases write one part and name it ``ViewLayer.IndexOB.X``.
    """
    try:
        return exr_channels(path, wanted)
    except ExrError as exc:
        raise RuntimeError(f"cannot read the id render: {exc}") from None


def _configure(render_scene, view_layer_name: str, width: int, height: int, path: str):
    render = render_scene.render
    render.engine = "CYCLES"
    render.resolution_x, render.resolution_y = width, height
    render.resolution_percentage = 100
    render.pixel_aspect_x = render.pixel_aspect_y = 1.0
    render.use_border = False
    render.use_compositing = False
    render.use_sequencer = False
    render.use_motion_blur = False
    render.use_persistent_data = False
    render.film_transparent = True
    render.use_stamp = False
    render.filepath = path
    render.use_file_extension = True
    render.use_overwrite = True
    render.use_placeholder = False
    render.use_simplify = True
    render.simplify_volumes = 0.0
    render.simplify_child_particles_render = 0.0
    settings = render.image_settings
    set_file_format(settings, MULTILAYER_EXR)
    settings.color_depth = "32"  # ids must stay exact integers
    settings.exr_codec = "NONE"  # fastest to write and read back; the file is deleted at once

    cycles = render_scene.cycles
    cycles.device = "CPU"
    cycles.samples = 1
    cycles.use_adaptive_sampling = False
    cycles.use_denoising = False
    cycles.use_light_tree = False
    for bounces in (
        "max_bounces",
        "diffuse_bounces",
        "glossy_bounces",
        "transmission_bounces",
        "volume_bounces",
        "transparent_max_bounces",
    ):
        setattr(cycles, bounces, 0)
    # One sample at the pixel centre, unfiltered: each pixel holds exactly one object's index.
    cycles.pixel_filter_type = "BOX"
    cycles.filter_width = 0.01
    render_scene.world = None

    layer = render_scene.view_layers[view_layer_name]
    for flag in _PASS_FLAGS_OFF:
        if hasattr(layer, flag):
            setattr(layer, flag, False)
    layer.use_pass_z = True
    layer.use_pass_object_index = True
    layer.samples = 0  # a per-layer sample override would win over the scene's single sample
    layer.cycles.use_denoising = False
    layer.cycles.denoising_store_passes = False
    for collection in (layer.aovs, layer.lightgroups):
        for item in list(collection):
            collection.remove(item)


def _flat_material():
    """An emission-only material for every surface of the id render.

    No textures to load and no BSDF or light sampling: a third faster than the default
    material at 1024 px, with identical ids and depth.
    """
    material = bpy.data.materials.new(".layout-ids-material")
    nodes = new_material_nodes(material).nodes
    nodes.clear()
    output = nodes.new("ShaderNodeOutputMaterial")
    emission = nodes.new("ShaderNodeEmission")
    material.node_tree.links.new(emission.outputs["Emission"], output.inputs["Surface"])
    return material


def render_ids(
    scene,
    camera,
    tracked: list,
    width: int,
    height: int,
    view_layer_name: str | None = None,
) -> IdRender:
    """Render ``scene`` through ``camera`` once, in square pixels, and return ids and depth.

    ``tracked`` objects get ids 1..N in order; every other object in the scene gets a further
    id while they last (so occluders can be named), and all of them still hide what is behind.
    The user's scene, render settings and pass indices are left as they were (pass indices
    with animation curves are not supported: the render would evaluate the curves).
    """
    if len(tracked) > PASS_INDEX_MAX:
        raise ValueError(
            f"{len(tracked)} labeled objects; masks support at most {PASS_INDEX_MAX}. "
            "Turn masks off or label fewer objects"
        )
    layer_name = view_layer_name or scene.view_layers[0].name
    if layer_name not in scene.view_layers:
        raise ValueError(f"scene {scene.name!r} has no view layer {layer_name!r}")
    saved: dict = {}
    others: dict[int, str] = {}
    render_scene = render_camera = camera_data = material = None
    had_render_result = any(image.type == "RENDER_RESULT" for image in bpy.data.images)

    def set_index(obj, value: int) -> None:
        saved.setdefault(obj, obj.pass_index)
        obj.pass_index = value

    with tempfile.TemporaryDirectory(prefix="layout-ids-") as workdir:
        try:
            # Every object in the file, not only the scene's: collection instances render
            # objects from elsewhere, and a leftover index would read as a labeled object.
            for obj in bpy.data.objects:
                if obj.pass_index and obj.library is None:
                    set_index(obj, 0)
            for index, obj in enumerate(tracked, start=1):
                if obj.library is not None:
                    raise ValueError(
                        f"{obj.name!r} is linked from {obj.library.filepath}; make it local "
                        "(Object > Relations > Make Local) to give it a mask"
                    )
                set_index(obj, index)
            tracked_set = set(tracked)
            next_id = len(tracked) + 1
            for obj in scene.objects:
                if next_id > PASS_INDEX_MAX:
                    break
                if obj in tracked_set or obj.library is not None:
                    continue
                if obj.type in ("CAMERA", "LIGHT", "EMPTY", "LIGHT_PROBE", "SPEAKER"):
                    continue
                set_index(obj, next_id)
                others[next_id] = obj.name
                next_id += 1

            render_scene = scene.copy()
            render_scene.name = f".layout-ids-{scene.name}"
            # A private copy of the camera: depth of field would scatter a single sample's ids.
            render_camera = camera.copy()
            render_camera.data = camera_data = camera.data.copy()
            camera_data.dof.use_dof = False
            render_scene.collection.objects.link(render_camera)
            render_scene.camera = render_camera
            _configure(
                render_scene,
                layer_name,
                width,
                height,
                os.path.join(workdir, "ids"),
            )
            material = _flat_material()
            render_scene.view_layers[layer_name].material_override = material
            bpy.ops.render.render(write_still=True, layer=layer_name, scene=render_scene.name)
            outputs = glob.glob(os.path.join(workdir, "ids*.exr"))
            if not outputs:
                raise RuntimeError(
                    "the object-id render wrote no file; check that Cycles is available"
                )
            index, depth = read_exr_channels(
                outputs[0], ((".Object Index.X", ".IndexOB.X"), (".Depth.Z",))
            )
        finally:
            for obj, value in saved.items():
                if obj.pass_index != value:
                    obj.pass_index = value
            if render_scene is not None:
                bpy.data.scenes.remove(render_scene)
            if render_camera is not None:
                bpy.data.objects.remove(render_camera)
            if camera_data is not None:
                bpy.data.cameras.remove(camera_data)
            if material is not None:
                bpy.data.materials.remove(material)
            if not had_render_result:
                for image in [i for i in bpy.data.images if i.type == "RENDER_RESULT"]:
                    bpy.data.images.remove(image)
    ids = np.rint(index).astype(np.int32)
    depth = np.where(depth < BACKGROUND_DEPTH, depth, np.inf).astype(np.float32)
    return IdRender(ids=ids, depth=depth, others=others)
