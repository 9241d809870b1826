"""Output PNGs that say how they were made, written atomically.

Every image carries two text chunks:

- ``layout-diffusion`` (iTXt): JSON with the engine version, model, sampler and the complete
  Layout, so the image can be regenerated or loaded back (:func:`layout_from_png`);
- ``parameters`` (tEXt, iTXt if not Latin-1): the AUTOMATIC1111 summary that image browsers and
  other SD tools read::

      a street at dusk
      Negative prompt: blurry
      Steps: 30, Sampler: Euler, CFG scale: 6, Seed: 7, Size: 1024x1024, Model: sdxl-base, ...

A PNG is written to a temporary file in the target folder, synced and renamed over the final
name, so no reader ever sees half an image under that name.
"""

from __future__ import annotations

import json
import os
from typing import Any

from engine import __version__
from engine.wire.files import atomic_open
from engine.wire.layout import Layout

PROVENANCE_KEY = "layout-diffusion"
PARAMETERS_KEY = "parameters"

# AUTOMATIC1111's names for diffusers schedulers, so its readers show familiar sampler names.
_A1111_SAMPLERS = {
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "DPMSolverSinglestepScheduler": "DPM++ SDE",
    "KDPM2DiscreteScheduler": "DPM2",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a",
    "HeunDiscreteScheduler": "Heun",
    "LMSDiscreteScheduler": "LMS",
    "DDIMScheduler": "DDIM",
    "PNDMScheduler": "PLMS",
    "UniPCMultistepScheduler": "UniPC",
    "LCMScheduler": "LCM",
}


def sampler_name(scheduler: Any) -> str:
    """The AUTOMATIC1111 name of a diffusers scheduler (its class name if it has none)."""
    name = type(scheduler).__name__ if not isinstance(scheduler, str) else scheduler
    label = _A1111_SAMPLERS.get(name, name)
    if getattr(getattr(scheduler, "config", None), "use_karras_sigmas", False):
        label += " Karras"
    return label


def model_label(model: str) -> str:
    """A short model name for summaries: a file or folder's stem, a repo id as is."""
    if os.path.isabs(model) or os.path.exists(model):
        base = os.path.basename(os.path.normpath(model))
        return os.path.splitext(base)[0] if base.endswith(".safetensors") else base
    return model


def provenance_record(
    layout: Layout, model: str, sampler: str, conditions: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The JSON stored under ``layout-diffusion``.

    ``conditions`` records the optional models that acted (depth ControlNet, IP-Adapter) and
    the reference pull's source, with their settings; the Layout's own conditioning fields
    are in ``layout``.
    """
    return {
        "engine": "layout-diffusion",
        "engine_version": __version__,
        "model": model,
        "sampler": sampler,
        "prompt": layout.prompt,
        "negative_prompt": layout.negative_prompt,
        "seed": layout.seed,
        "steps": layout.steps,
        "conditions": conditions or {"controlnet": None, "ip_adapter": None, "reference": None},
        "layout": layout.to_dict(),
    }


def _quote(value: str) -> str:
    """Quote a value the way AUTOMATIC1111 does when it would break the comma list."""
    if "," not in value and ":" not in value and "\n" not in value and '"' not in value:
        return value
    return json.dumps(value, ensure_ascii=False)


def a1111_parameters(
    layout: Layout, model: str, sampler: str, conditions: dict[str, Any] | None = None
) -> str:
    """The AUTOMATIC1111 ``parameters`` text for an image generated from ``layout``."""
    lines = [layout.prompt]
    if layout.negative_prompt:
        lines.append(f"Negative prompt: {layout.negative_prompt}")
    settings = [
        ("Steps", str(layout.steps)),
        ("Sampler", sampler),
        ("CFG scale", f"{layout.guidance_scale:g}"),
        ("Seed", str(layout.seed)),
        ("Size", f"{layout.width}x{layout.height}"),
        ("Model", model_label(model)),
        ("Regions", str(len(layout.regions))),
        ("Regional mode", layout.mode),
    ]
    controlnet = (conditions or {}).get("controlnet")
    if controlnet:
        settings += [
            ("ControlNet", model_label(controlnet["model"])),
            ("ControlNet condition", "depth"),
            ("ControlNet scale", f"{controlnet['scale']:g}"),
            ("ControlNet steps", f"{controlnet['start']:g}-{controlnet['end']:g}"),
        ]
    ip_adapter = (conditions or {}).get("ip_adapter")
    if ip_adapter:
        settings += [
            ("IP-Adapter", model_label(ip_adapter["model"])),
            ("IP-Adapter images", str(ip_adapter["images"])),
        ]
    reference = (conditions or {}).get("reference")
    if reference:
        source = reference["source"]
        if reference.get("model"):
            source += f" ({model_label(reference['model'])})"
        settings += [
            ("Reference", source),
            ("Reference scale", f"{reference['scale']:g}"),
            ("Reference fraction", f"{reference['fraction']:g}"),
        ]
    settings.append(("Version", f"layout-diffusion {__version__}"))
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in settings))
    return "\n".join(lines)


def png_info(
    layout: Layout, model: str, sampler: str, conditions: dict[str, Any] | None = None
) -> Any:
    """A ``PIL.PngImagePlugin.PngInfo`` holding both provenance chunks."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PARAMETERS_KEY, a1111_parameters(layout, model, sampler, conditions))
    record = provenance_record(layout, model, sampler, conditions)
    record = json.dumps(record, ensure_ascii=False)
    info.add_itxt(PROVENANCE_KEY, record)
    return info


def save_png(
    image: Any,
    path: str,
    layout: Layout,
    model: str,
    sampler: str,
    conditions: dict[str, Any] | None = None,
    make_folders: bool = True,
) -> str:
    """Write ``image`` to ``path`` as a PNG with provenance, atomically; returns the absolute path.

    With ``make_folders`` the folder is created if needed.
    """
    path = os.path.abspath(os.fspath(path))
    if make_folders:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_open(path, "wb") as handle:
        image.save(handle, format="PNG", pnginfo=png_info(layout, model, sampler, conditions))
    return path


def read_provenance(path: str) -> dict[str, Any]:
    """Both provenance chunks of a PNG: the decoded JSON record plus ``parameters`` text.

    Raises ValueError if the PNG carries no ``layout-diffusion`` record.
    """
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        text = dict(getattr(image, "text", {}))
    if PROVENANCE_KEY not in text:
        raise ValueError(f"{path} has no {PROVENANCE_KEY!r} chunk; it was not made by this engine")
    record = json.loads(text[PROVENANCE_KEY])
    record["parameters"] = text.get(PARAMETERS_KEY)
    return record


def layout_from_png(path: str) -> Layout:
    """The Layout an engine PNG was generated from (masks as absolute paths)."""
    return Layout.from_dict(read_provenance(path)["layout"])
