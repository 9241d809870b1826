"""One frame's request, built from the scene the same way for Generate from Camera,
Re-generate Object, every frame of the batch renderer and the render engine: the labeled
objects projected into a Layout (:mod:`.scene_layout`), the images it names written next to it
(init image, objects' reference images), the model and the engine options.

The init image can also be made from the frame's own proxy render: the render itself, or the
objects' Reference Images composited over it as layers (:mod:`..core.composite`).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any

from ..core import places, request
from ..core.composite import Layer, composite_layers
from ..core.errors import UserError
from ..core.frames import frame_paths, seed_for_frame
from ..core.masks import DEPTH_MAX
from ..core.names import safe_name
from ..core.png import read_gray_png, read_rgb_png, write_rgb_png
from ..wire.layout import Layout
from .images import rgba8_pixels, save_png
from .models import model_spec
from .scene_layout import LabeledObject, layout_from_camera

NO_LABELS = (
    "No labeled objects: select proxy objects and press Label Selected "
    f"({places.sidebar(places.REGIONS)}), or tick {places.object_panel()}"
)


@dataclass
class FrameRequest:
    """Everything one generate request needs, built from the scene at one frame."""

    layout: Layout
    """Absolute image paths; the files are already written."""
    skipped: list[tuple[str, str]]
    """(object name, why it is not in the Layout), as :func:`layout_from_camera` reports."""
    model: str | None
    options: dict[str, Any]
    """The request's engine ``options`` (depth ControlNet, IP-Adapter, GLIGEN)."""


def scene_seed_mode(scene) -> str:
    """The scene's seed mode (``shot`` or ``frame``); ``shot`` when the setting is absent."""
    value = getattr(scene.layout_diffusion, "seed_mode", "SHOT")
    return str(value).lower()


def scene_init_previous(scene) -> float | None:
    """The scene's Start From Previous Frame as the batch's ``--init-previous`` strength; None
    when it is off."""
    settings = scene.layout_diffusion
    if not getattr(settings, "use_init_previous", False):
        return None
    return request.number(settings.init_previous_strength)


def previous_frame_init(scene, frame: int, folder: str) -> tuple[str | None, float | None]:
    """With Start From Previous Frame: ``(image, strength)`` for animation frame ``frame`` to
    start from the frame rendered before it (``frame`` minus the scene's Frame Step) in
    ``folder``, as the batch renderer's ``--init-previous`` sends it; ``(None, None)`` for the
    first frame, when the setting is off, or when that frame's image is not there (it was not
    rendered in this folder): the frame then starts as any other."""
    strength = scene_init_previous(scene)
    if strength is None:
        return None, None
    previous = frame - max(1, scene.frame_step)
    if previous < scene.frame_start:
        return None, None
    image = frame_paths(folder, previous).image
    if not os.path.isfile(image):
        return None, None
    return image, strength


def labeled_objects(scene, depsgraph=None) -> list[LabeledObject]:
    """The scene's labeled objects with prompt and weight; with ``depsgraph``, as evaluated at
    its frame (keyframes on the label's weight and enabled switch are honoured in render threads
    too, where the original data is not updated per frame)."""
    labeled = []
    for obj in scene.objects:
        label = (obj.evaluated_get(depsgraph) if depsgraph else obj).layout_diffusion
        if label.enabled:
            labeled.append(LabeledObject(obj, label.prompt, label.weight))
    return labeled


def build_request(
    scene,
    depsgraph,
    folder: str,
    *,
    frame: int | None = None,
    seed_mode: str = "shot",
    masks: bool = True,
    init: str | None = None,
    strength: float | None = None,
    regenerate: str | None = None,
    seed: int | None = None,
) -> FrameRequest:
    """Project the labeled objects through the camera into a request, writing its files.

    A still (``frame`` None; Generate from Camera) reads the settings and labels as edited and
    writes into the scene's output folder, where Last Result may be its init image; ``seed``
    replaces the scene's Seed (Random Seed), and with ``regenerate`` (an object name) it
    re-generates that object of the last result with ``seed``, keeping every other pixel. An animation frame reads them as evaluated at the
    depsgraph's frame (keyframes honoured), starts from an emptied ``folder``, takes its seed
    from ``seed_mode`` and ``init`` (with ``strength``) replaces the scene's init image when
    given. Proxy Render and Object Layers init images come from the request's own proxy render;
    ``masks=False`` skips the mask, depth and proxy render (boxes only). Raises UserError saying
    what to fix.
    """
    still = frame is None
    settings = scene.layout_diffusion if still else depsgraph.scene_eval.layout_diffusion
    labeled = labeled_objects(scene, None if still else depsgraph)
    if not labeled:
        raise UserError(NO_LABELS)
    if not still:
        # Files of objects labeled in an earlier attempt must not linger next to this frame's.
        shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder, exist_ok=True)
    # Everything is read from the (evaluated) settings before the mask render: that render
    # changes bpy.data, after which the evaluated copy may be re-evaluated or freed.
    request.check_settings(settings)
    fields = request.layout_settings(settings)
    if not still:
        fields["seed"] = seed_for_frame(int(fields["seed"]), frame, seed_mode)
    elif seed is not None:
        fields["seed"] = seed  # Random Seed's draw; a re-generate sets its own below
    options = request.engine_options(settings, model_spec)
    model = model_spec(settings) or None
    reference = masks and request.sends_proxy_reference(settings)
    source = settings.init_source
    if strength is None:
        strength = settings.strength
    # The proxy render is also the init image (or what its object layers go over).
    rendered = init is None and not regenerate and source in request.RENDERED_SOURCES
    if rendered and not masks:
        raise UserError(
            f"Init Image is {request.RENDERED_SOURCES[source]}, but this render sends boxes "
            "only (with Render > Lock Interface on, the proxy render cannot run during an "
            "interactive render): turn Lock Interface off, render in the background "
            "(blender -b), or set another Init Image"
        )
    if init is None and not regenerate and (source == "IMAGE" or (still and source == "RESULT")):
        # Last Result belongs to Generate from Camera; animations use --init-previous.
        init = init_image(settings, folder)
    try:
        made = layout_from_camera(
            scene,
            labeled,
            folder,
            settings=fields,
            depsgraph=depsgraph,
            masks=masks,
            depth=masks,
            reference=reference or rendered,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    objects = {item.obj.name: item.obj for item in labeled}
    if rendered:
        init = rendered_init(source, folder, made.layout, objects)
    layout = apply_objects(
        made.layout,
        objects,
        folder,
        init=init,
        strength=strength,
        ip_adapter=options["ip_adapter"],
        reference=reference,
        layers=source == "LAYERS",
    )
    if regenerate:
        skipped = dict(made.skipped)
        if regenerate in skipped:
            raise UserError(f"{regenerate!r} cannot be re-generated: it {skipped[regenerate]}")
        previous = request.previous_result(folder, (layout.width, layout.height))
        layout = request.regenerate(layout, regenerate, previous, seed)
    return FrameRequest(
        layout=layout,
        skipped=[tuple(item) for item in made.skipped],
        model=model,
        options=options,
    )


# -- Images --------------------------------------------------------------------------------------


def init_image(settings, folder: str, layout: Layout | None = None, objects=None) -> str | None:
    """Write the scene's init image to ``folder/init.png``; its path, or None without one.

    The sources in :data:`~..core.request.RENDERED_SOURCES` need ``layout`` made with its proxy render and
    ``objects`` (see :func:`rendered_init`).
    """
    source = settings.init_source
    if source == "NONE":
        return None
    if source in request.RENDERED_SOURCES:
        return rendered_init(source, folder, layout, objects or {})
    path = os.path.join(folder, request.INIT_NAME)
    if source == "RESULT":
        result = os.path.join(folder, request.RESULT_NAME)
        if not os.path.isfile(result):
            raise UserError(
                "Init Image is Last Result, but there is no result yet: generate once first, "
                f"or set Init Image to None ({places.sidebar(places.GUIDANCE)})"
            )
        shutil.copyfile(result, path)
        return path
    if settings.init_image is None:
        raise UserError(
            "Init Image is Image, but no image is chosen: pick one under "
            f"{places.sidebar(places.GUIDANCE)}, or set Init Image to None"
        )
    try:
        return save_png(settings.init_image, path)
    except UserError as exc:
        raise UserError(f"Init Image: {exc}") from None


def rendered_init(source: str, folder: str, layout: Layout | None, objects) -> str:
    """Write the init image made from ``layout``'s proxy render (its ``reference``) to
    ``folder/init.png``; its path.

    ``"PROXIES"``: the proxy render as it is. ``"LAYERS"``: every object's Reference Image
    fitted into its region's box, cut by the region's mask and composited over the proxy
    render, farther objects first (by the depth map); ``objects`` maps region names to objects.
    Raises UserError when the proxy render is missing or no object in the image has an image.
    """
    name = request.RENDERED_SOURCES[source]
    proxies = layout.reference if layout is not None else None
    if proxies is None or not os.path.isfile(proxies):
        raise UserError(
            f"Init Image is {name}, but no proxy render was made for this image (it comes with "
            "the object masks): generate with Generate from Camera, or set Init Image to None"
        )
    path = os.path.join(folder, request.INIT_NAME)
    if source == "PROXIES":
        shutil.copyfile(proxies, path)
        return path
    layers = object_layers(layout, objects)
    if not layers:
        raise UserError(
            "Init Image is Object Layers, but no labeled object in the image has a Reference "
            "Image: give objects an image of themselves ("
            f"{places.object_panel('Reference Image')}; an RGBA image's alpha cuts it out), or "
            f"set Init Image to Proxy Render ({places.sidebar(places.GUIDANCE)})"
        )
    write_rgb_png(path, composite_layers(read_rgb_png(proxies), layers))
    return path


def object_layers(layout: Layout, objects) -> list[Layer]:
    """The layers of the regions whose objects have a Reference Image: the image, the region's
    box and mask, and the mean distance of its visible pixels in the Layout's depth map."""
    nearness = read_gray_png(layout.depth) if layout.depth else None
    layers = []
    for region in layout.regions:
        obj = objects.get(region.name)
        image = obj.layout_diffusion.reference_image if obj is not None else None
        if image is None:
            continue
        try:
            pixels = rgba8_pixels(image)
        except UserError as exc:
            raise UserError(f"Object {obj.name!r}, reference image: {exc}") from None
        mask = read_gray_png(region.mask) if region.mask else None
        visible = mask > 127 if mask is not None else None
        distance = 0.0
        if nearness is not None and visible is not None and visible.any():
            # The depth map is white at the nearest surface.
            distance = DEPTH_MAX - float(nearness[visible].mean())
        layers.append(Layer(pixels, region.box, mask, distance))
    return layers


# -- Objects -------------------------------------------------------------------------------------


def apply_objects(
    layout: Layout,
    objects,
    folder: str,
    *,
    init: str | None = None,
    strength: float = 1.0,
    ip_adapter: str | None = None,
    reference: bool = True,
    layers: bool = False,
) -> Layout:
    """``layout`` with each region's object settings and the init image filled in.

    ``objects`` maps object names (the regions' names) to objects. Region strengths go out only
    with an ``init`` image (they say how much of it to keep); objects' reference images are
    written to ``folder`` and need an ``ip_adapter``, unless they are the init image's
    ``layers``: then without an IP-Adapter they are not sent. ``reference=False`` leaves the
    proxy render out (it was made only to start from). Raises UserError naming the object.
    """
    data = layout.to_dict()
    if not reference:
        data["reference"] = None
    # Images that are the init image's layers need no IP-Adapter; with one they shape too.
    send_images = bool(ip_adapter) or not layers
    with_images = []
    for index, region in enumerate(data["regions"]):
        obj = objects.get(region["name"])
        if obj is None:
            continue
        label = obj.layout_diffusion
        if init is not None:
            region["strength"] = request.number(label.strength)
        if label.use_depth_scale:
            region["depth_scale"] = request.number(label.depth_scale)
        if send_images and label.reference_image is not None and label.reference_image_scale > 0:
            with_images.append(obj.name)
            path = os.path.join(folder, f"image_{index + 1:03d}_{safe_name(obj.name)}.png")
            try:
                region["image"] = save_png(label.reference_image, path)
            except UserError as exc:
                raise UserError(f"Object {obj.name!r}, reference image: {exc}") from None
            region["image_scale"] = request.number(label.reference_image_scale)
    if with_images and not ip_adapter:
        names = ", ".join(repr(name) for name in with_images)
        raise UserError(
            f"{names} {'has' if len(with_images) == 1 else 'have'} a reference image, but no "
            f"IP-Adapter is set to apply it: set IP-Adapter under {request.CONDITIONS_PANEL}, or clear "
            f"the reference image ({places.object_panel()})"
        )
    if init is not None:
        data["init_image"] = init
        data["strength"] = request.number(strength)
    return request.validated(data)
