"""What Generate, Re-generate Object and every animation frame send, in pure terms: Layout
fields from the scene settings, the engine options, the re-generate edit, and artist-readable
words for the engine's errors about them.

The files a request names (init image, objects' reference images) are written by the Blender
side (:mod:`..blender.frame_request`). The Layout's own validation stays the judge of what is
valid; this module only maps settings onto fields and catches, in the artist's terms, what the
settings make likely.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from typing import Any

from ..wire.edits import regenerate_layout
from ..wire.layout import Layout, LayoutError
from . import places
from .errors import UserError
from .png import png_size

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

CONDITION_LABELS = {
    "controlnet": "Depth ControlNet",
    "ip_adapter": "IP-Adapter",
    "gligen": "GLIGEN",
}
"""The optional models a request's ``options`` name, by option, with the artist's word for each."""

CONDITIONS_PANEL = places.sidebar(places.CONDITIONS)


def number(value: float) -> float:
    # Blender stores floats in single precision: 0.2 would travel as 0.20000000298.
    return round(float(value), 6)


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
        "base_ratio": number(settings.base_ratio),
        "seed": settings.seed,
        "steps": settings.steps,
        "guidance_scale": number(settings.guidance_scale),
        "mode": settings.mode.lower(),
        "depth_scale": number(settings.depth_scale),
        "depth_start": number(settings.depth_start),
        "depth_end": number(settings.depth_end),
        "reference_scale": number(settings.reference_scale) if settings.use_reference else 0.0,
        "reference_fraction": (
            None if settings.use_model_fraction else number(settings.reference_fraction)
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
    None when unset, and ``config`` (a single-file model's configs) only when Model Config is
    set, so an engine started with its own ``--config`` keeps it otherwise.

    ``spec(settings, name)`` turns a setting into what the engine reads (blend-relative paths
    made absolute); without it the setting is sent as typed.
    """
    options = {}
    for name in CONDITION_LABELS:
        value = spec(settings, name) if spec else getattr(settings, name).strip()
        options[name] = value or None
    config = getattr(settings, "model_config", "")
    config = spec(settings, "model_config") if spec and config.strip() else config.strip()
    if config:
        # A folder picked in the file browser ends in a separator; the engine wants the folder.
        options["config"] = config.rstrip("/\\") or config
    return options


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


def regenerate(layout: Layout, name: str, previous: str, seed: int) -> Layout:
    """``layout`` re-generating object ``name`` of the ``previous`` result with ``seed``: that
    object at strength 1, everything else kept, pixels outside it exactly the previous ones."""
    if name not in [region.name for region in layout.regions]:
        raise UserError(f"{name!r} is not in the image, so it cannot be re-generated")
    try:
        return regenerate_layout(layout, name, previous, seed)
    except LayoutError as exc:
        raise UserError(str(exc)) from None


def next_seed(settings, how: str = "NEXT", rng: random.Random | None = None) -> int:
    """The seed Re-generate Object uses: the last result's + 1 (wrapping), or a random one."""
    if how == "RANDOM":
        return (rng or random.SystemRandom()).randint(0, MAX_SEED)
    base = settings.result_seed if settings.result_seed >= 0 else settings.seed
    return (base + 1) % (MAX_SEED + 1)


def validated(data: dict[str, Any]) -> Layout:
    try:
        return Layout.from_dict(data)
    except LayoutError as exc:
        raise UserError(str(exc)) from None


# -- The engine's answers ------------------------------------------------------------------------

_REGION_FIELD = re.compile(r"^(?:layout\.)?regions\[(\d+)\]")


MODEL_CONFIG = f"Model Config ({places.sidebar()})"
"""Where a single-file model's configs are set, as messages name it."""

_UNSET_CONDITION = re.compile(
    r"start the engine with --[\w-]+ or send options\.(\w+)(?: with a request)?"
)
_PASS_CONFIG = re.compile(r"\b([Pp])ass --config(?: with)?")
_AS_CONFIG = re.compile(r"\bas --config\b")
_ALLOW_PICKLE = re.compile(
    r",? or (?:re)?(?:start the engine with|pass) --allow-pickle"
    r"(?: \(request field allow_pickle\))?(?: if you trust [\w ]+)?"
)


def addon_words(message: str) -> str:
    """An engine message in the add-on's terms: the engine's command-line flags and request
    fields (``--controlnet``, ``options.controlnet``, ``--config``) become the add-on's fields
    and where they are. Pickle weights are refused by the add-on's engine, so the flag that
    would allow them is left out."""

    def unset(match: re.Match) -> str:
        label = CONDITION_LABELS.get(match.group(1), match.group(1))
        return f"set {label} under {CONDITIONS_PANEL}"

    message = _UNSET_CONDITION.sub(unset, message)
    message = _PASS_CONFIG.sub(
        lambda match: ("S" if match.group(1) == "P" else "s") + f"et {MODEL_CONFIG} to", message
    )
    message = _AS_CONFIG.sub("as Model Config", message)
    return _ALLOW_PICKLE.sub("", message)


def explain_error(event: dict[str, Any], layout: dict[str, Any] | None) -> str | None:
    """The artist's wording of an engine error about a condition, the model's configs or an
    object, or of one naming the engine's flags; else None.

    ``layout`` is the Layout dict that was sent (its regions name the objects).
    """
    message = addon_words(str(event.get("message") or ""))
    field = str(event.get("field") or "")
    condition = field.removeprefix("options.")
    if condition == "config":
        return message if "Model Config" in message else f"Model Config: {message}"
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
    return message if message != str(event.get("message") or "") else None
