"""Read a Blender camera and the render settings into a pure :class:`CameraModel`."""

from __future__ import annotations

import numpy as np

from ..core.projection import CameraModel, camera_to_world_matrix


def render_resolution(scene) -> tuple[int, int]:
    """The rendered size in pixels: resolution times percentage, as Blender computes it."""
    render = scene.render
    percent = render.resolution_percentage
    return (render.resolution_x * percent // 100, render.resolution_y * percent // 100)


def camera_model(scene, camera_object, depsgraph=None) -> CameraModel:
    """Describe ``camera_object`` as seen through ``scene``'s render settings.

    With a depsgraph, the evaluated camera is read (animated or driven lens and transform).
    Panoramic cameras have no rectangular frame and are refused.
    """
    if camera_object.type != "CAMERA":
        raise ValueError(
            f"{camera_object.name!r} is a {camera_object.type.lower()}, not a camera; "
            "set a camera object as the scene camera"
        )
    if depsgraph is not None:
        camera_object = camera_object.evaluated_get(depsgraph)
    data = camera_object.data
    if data.type not in ("PERSP", "ORTHO"):
        raise ValueError(
            f"camera {camera_object.name!r} is panoramic; layouts need a perspective or "
            "orthographic camera (Camera properties > Lens > Type)"
        )
    render = scene.render
    width, height = render_resolution(scene)
    if width < 1 or height < 1:
        raise ValueError(
            f"the render resolution is {width}x{height} pixels; set a resolution in "
            "Output properties > Format"
        )
    to_world = camera_to_world_matrix(np.array(camera_object.matrix_world, dtype=np.float64))
    return CameraModel(
        world_to_camera=np.linalg.inv(to_world),
        ortho=data.type == "ORTHO",
        lens=float(data.lens),
        ortho_scale=float(data.ortho_scale),
        sensor_width=float(data.sensor_width),
        sensor_height=float(data.sensor_height),
        sensor_fit=data.sensor_fit,
        shift_x=float(data.shift_x),
        shift_y=float(data.shift_y),
        clip_start=float(data.clip_start),
        clip_end=float(data.clip_end),
        resolution=(width, height),
        pixel_aspect=(float(render.pixel_aspect_x), float(render.pixel_aspect_y)),
    )
