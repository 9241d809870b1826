"""What Generate and Re-generate Object send: Layout fields from the scene and its objects, the
images they name (init image, objects' reference images) written as PNG next to the Layout, the
engine options, and artist-readable words for the engine's errors about them.

The init image can also be made from the generation's own proxy render: the render itself, or
the objects' Reference Images composited over it as layers (:mod:`.io.composite`).

The Layout's own validation (``layout.py``) stays the judge of what is valid; this module only
maps settings onto fields and catches, in the artist's terms, what the settings make likely.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from typing import Any

from .engine_client import CONDITION_LABELS
from .images import ImageExportError, png_size, rgba8_pixels, save_png
from .io.composite import Layer, composite_layers
from .io.masks import DEPTH_MAX
from .io.png import read_gray_png, read_rgb_png, write_rgb_png
from .wire.layout import Layout, LayoutError

RESULT_NAME = "result.png"
"""The result's file name in the scene's output folder."""
INIT_NAME = "init.png"
"""The init image as sent, next to the Layout."""
PREVIOUS_NAME = "previous.png"
"""The result an object is re-generated from: a copy, because the new result replaces it."""

RENDERED_SOURCES = {"PROXIES": "Proxy Render", "LAYERS": "Object Layers"}
"""Init sources made from the proxy render (see :func:`rendered_init`), by their panel names:
Generate renders the proxies for them even when the pull toward the render is off."""

MAX_SEED = 2**31 - 1
"""Largest seed a Blender integer property holds."""

CONDITIONS_PANEL = "3D View sidebar > Layout > Conditions"


class UserError(Exception):
    """Something the artist can fix; the message says what and how."""


def _number(value: float) -> float:
    # Blender stores floats in single precision: 0.2 would travel as 0.20000000298.
    return round(float(value), 6)


def _safe_name(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "object"


# -- Scene settings ------------------------------------------------------------------------------


def layout_settings(settings) -> dict[str, Any]:
    """The Layout fields that come from ``Scene.layout_diffusion`` alone (no files, no objects).

    The image size comes from the render settings; init image, strength and objects' fields
    need files and are added by :func:`apply_objects`.
    """
    return {
        "prompt": settings.prompt,
        "negative_prompt": settings.negative_prompt,
        "background_prompt": settings.background_prompt.strip() or None,
        "base_ratio": _number(settings.base_ratio),
        "seed": settings.seed,
        "steps": settings.steps,
        "guidance_scale": _number(settings.guidance_scale),
        "mode": settings.mode.lower(),
        "depth_scale": _number(settings.depth_scale),
        "depth_start": _number(settings.depth_start),
        "depth_end": _number(settings.depth_end),
        "reference_scale": _number(settings.reference_scale) if settings.use_reference else 0.0,
        "reference_fraction": (
            None if settings.use_model_fraction else _number(settings.reference_fraction)
        ),
    }


def sends_proxy_reference(settings) -> bool:
    """Whether the pull goes toward the add-on's proxy render (else the engine makes the
    reference: GLIGEN from the boxes when it has a GLIGEN model, a half-size first pass
    otherwise)."""
    return settings.use_reference and settings.reference_source == "PROXIES"


def check_settings(settings) -> None:
    """Raise UserError for scene settings the engine would refuse, in the panel's words."""
    if settings.depth_end <= settings.depth_start:
        raise UserError(
            f"Depth End ({settings.depth_end:.2f}) must be after Depth Start "
            f"({settings.depth_start:.2f}): they are the fractions of the steps between which the "
            f"depth ControlNet acts ({CONDITIONS_PANEL})"
        )


def engine_options(settings, spec=None) -> dict[str, Any]:
    """The request's ``options``: the scene's depth ControlNet, IP-Adapter and GLIGEN model,
    None when unset.

    ``spec(settings, name)`` turns a setting into what the engine reads (blend-relative paths
    made absolute); without it the setting is sent as typed.
    """
    options = {}
    for name in CONDITION_LABELS:
        value = spec(settings, name) if spec else getattr(settings, name).strip()
        options[name] = value or None
    return options


# -- Images --------------------------------------------------------------------------------------


def init_image(settings, folder: str, layout: Layout | None = None, objects=None) -> str | None:
    """Write the scene's init image to ``folder/init.png``; its path, or None without one.

    The sources in :data:`RENDERED_SOURCES` need ``layout`` made with its proxy render and
    ``objects`` (see :func:`rendered_init`).
    """
    source = settings.init_source
    if source == "NONE":
        return None
    if source in RENDERED_SOURCES:
        return rendered_init(source, folder, layout, objects or {})
    path = os.path.join(folder, INIT_NAME)
    if source == "RESULT":
        result = os.path.join(folder, RESULT_NAME)
        if not os.path.isfile(result):
            raise UserError(
                "Init Image is Last Result, but there is no result yet: generate once first, "
                "or set Init Image to None (Layout sidebar > Guidance)"
            )
        shutil.copyfile(result, path)
        return path
    if settings.init_image is None:
        raise UserError(
            "Init Image is Image, but no image is chosen: pick one under Layout sidebar > "
            "Guidance, or set Init Image to None"
        )
    try:
        return save_png(settings.init_image, path)
    except ImageExportError as exc:
        raise UserError(f"Init Image: {exc}") from None


def rendered_init(source: str, folder: str, layout: Layout | None, objects) -> str:
    """Write the init image made from ``layout``'s proxy render (its ``reference``) to
    ``folder/init.png``; its path.

    ``"PROXIES"``: the proxy render as it is. ``"LAYERS"``: every object's Reference Image
    fitted into its region's box, cut by the region's mask and composited over the proxy
    render, farther objects first (by the depth map); ``objects`` maps region names to objects.
    Raises UserError when the proxy render is missing or no object in the image has an image.
    """
    name = RENDERED_SOURCES[source]
    proxies = layout.reference if layout is not None else None
    if proxies is None or not os.path.isfile(proxies):
        raise UserError(
            f"Init Image is {name}, but no proxy render was made for this image (it comes with "
            "the object masks): generate with Generate from Camera, or set Init Image to None"
        )
    path = os.path.join(folder, INIT_NAME)
    if source == "PROXIES":
        shutil.copyfile(proxies, path)
        return path
    layers = object_layers(layout, objects)
    if not layers:
        raise UserError(
            "Init Image is Object Layers, but no labeled object in the image has a Reference "
            "Image: give objects an image of themselves (Object properties > Layout > Reference "
            "Image; an RGBA image's alpha cuts it out), or set Init Image to Proxy Render "
            "(Layout sidebar > Guidance)"
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
        except ImageExportError as exc:
            raise UserError(f"Object {obj.name!r}, reference image: {exc}") from None
        mask = read_gray_png(region.mask) if region.mask else None
        visible = mask > 127 if mask is not None else None
        distance = 0.0
        if nearness is not None and visible is not None and visible.any():
            # The depth map is white at the nearest surface.
            distance = DEPTH_MAX - float(nearness[visible].mean())
        layers.append(Layer(pixels, region.box, mask, distance))
    return layers


def previous_result(folder: str, size: tuple[int, int]) -> str:
    """Copy the last result to ``folder/previous.png`` for re-generating from it; its path.

    Raises UserError when there is no result or its size is not the Layout's ``size``.
    """
    result = os.path.join(folder, RESULT_NAME)
    found = png_size(result)
    if found is None:
        raise UserError(
            "There is no result to re-generate an object in: press Generate from Camera first"
        )
    if found != tuple(size):
        raise UserError(
            f"The last result is {found[0]}x{found[1]} but the render size now gives "
            f"{size[0]}x{size[1]}: generate the whole image again at this size first"
        )
    path = os.path.join(folder, PREVIOUS_NAME)
    shutil.copyfile(result, path)
    return path


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
            region["strength"] = _number(label.strength)
        if label.use_depth_scale:
            region["depth_scale"] = _number(label.depth_scale)
        if send_images and label.reference_image is not None and label.reference_image_scale > 0:
            with_images.append(obj.name)
            path = os.path.join(folder, f"image_{index + 1:03d}_{_safe_name(obj.name)}.png")
            try:
                region["image"] = save_png(label.reference_image, path)
            except ImageExportError as exc:
                raise UserError(f"Object {obj.name!r}, reference image: {exc}") from None
            region["image_scale"] = _number(label.reference_image_scale)
    if with_images and not ip_adapter:
        names = ", ".join(repr(name) for name in with_images)
        raise UserError(
            f"{names} {'has' if len(with_images) == 1 else 'have'} a reference image, but no "
            f"IP-Adapter is set to apply it: set IP-Adapter under {CONDITIONS_PANEL}, or clear "
            "the reference image (Object properties > Layout)"
        )
    if init is not None:
        data["init_image"] = init
        data["strength"] = _number(strength)
    return _validated(data)


def regenerate(layout: Layout, name: str, previous: str, seed: int) -> Layout:
    """``layout`` re-generating object ``name`` of the ``previous`` result with ``seed``: that
    object at strength 1, everything else kept, pixels outside it exactly the previous ones."""
    data = layout.to_dict()
    names = [region["name"] for region in data["regions"]]
    if name not in names:
        raise UserError(f"{name!r} is not in the image, so it cannot be re-generated")
    for region in data["regions"]:
        region["strength"] = 1.0 if region["name"] == name else None
    data.update(init_image=previous, strength=0.0, keep_outside=True, seed=seed)
    return _validated(data)


def next_seed(settings, how: str = "NEXT", rng: random.Random | None = None) -> int:
    """The seed Re-generate Object uses: the last result's + 1 (wrapping), or a random one."""
    if how == "RANDOM":
        return (rng or random.SystemRandom()).randint(0, MAX_SEED)
    base = settings.result_seed if settings.result_seed >= 0 else settings.seed
    return (base + 1) % (MAX_SEED + 1)


def _validated(data: dict[str, Any]) -> Layout:
    try:
        return Layout.from_dict(data)
    except LayoutError as exc:
        raise UserError(str(exc)) from None


# -- The engine's answers ------------------------------------------------------------------------

_REGION_FIELD = re.compile(r"^(?:layout\.)?regions\[(\d+)\]")


def explain_error(event: dict[str, Any], layout: dict[str, Any] | None) -> str | None:
    """The artist's wording of an engine error about a condition or an object, else None.

    ``layout`` is the Layout dict that was sent (its regions name the objects).
    """
    message = str(event.get("message") or "")
    field = str(event.get("field") or "")
    condition = field.removeprefix("options.")
    if condition in CONDITION_LABELS:
        label = CONDITION_LABELS[condition]
        return (
            f"{label} is not available: {message}. Fix {label} under {CONDITIONS_PANEL}, or "
            f"clear it to generate without it"
        )
    match = _REGION_FIELD.match(field)
    regions = (layout or {}).get("regions") or []
    if match and int(match.group(1)) < len(regions):
        name = regions[int(match.group(1))].get("name") or f"region {match.group(1)}"
        return f"Object {name!r}: {message}"
    return None
