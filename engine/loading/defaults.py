"""Settings a Layout leaves to the model: per-model recommended values for null Layout fields.

Some Layout settings are best chosen per model family (LSReGen's 10% of guided steps is an SDXL
figure; the shipped shapes model measures best at 40%). A Layout that leaves such a field null
gets the model's value: from ``layout_defaults.json`` in the model's folder when there is one,
else the family default below. The file is a JSON object of field values, plus an optional
``"note"`` saying where they come from::

    {"reference_fraction": 0.4, "note": "benchmarks/layout_fidelity.py, 2 and 4 objects"}

The file may also say the model's ``native_size``: the side up to which it composes a picture
in one pass, where the high-res fix starts and its first pass is sized. By default that is the
side it was trained at; a model that composes well above it (the shapes model, trained at 64 px
on crowded 128 px scenes too, places 100 objects at 640 px) declares more.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING, Any

from engine.errors import ModelNotFoundError, UnsafeCheckpointError, UnsupportedModelError
from engine.loading.locate import LoadOptions, ModelLocation, default_model_spec, resolve_model
from engine.wire.layout import Layout

if TYPE_CHECKING:
    from engine.pipeline import RegionalSDXLPipeline

DEFAULTS_FILE = "layout_defaults.json"
"""File in a model's folder holding its recommended values."""

SDXL_DEFAULTS: dict[str, float] = {"reference_fraction": 0.1}
"""Values for models without their own file: LSReGen's settings for SDXL."""

_RANGES = {"reference_fraction": (0.0, 1.0)}


class ModelDefaultsError(UnsupportedModelError):
    """A model folder's ``layout_defaults.json`` that cannot be used."""


NATIVE_SIZE_KEY = "native_size"
"""The key of ``layout_defaults.json`` that declares the side a model composes natively."""

_NATIVE_RANGE = (64, 8192)


def _defaults_file(folder: str | None) -> tuple[str, dict[str, Any]] | None:
    """The path and JSON object of ``folder``'s ``layout_defaults.json``; None when ``folder``
    is None, a file (a single-file checkpoint) or has no such file."""
    if not folder or not os.path.isdir(folder):
        return None
    path = os.path.join(folder, DEFAULTS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:
        raise ModelDefaultsError(
            f"cannot read {path}: {exc}; fix or delete the file", "model"
        ) from None
    if not isinstance(data, dict):
        raise ModelDefaultsError(f"{path} must hold a JSON object of Layout field values")
    return path, data


def declared_native_size(folder: str | None) -> int | None:
    """The ``native_size`` the model in ``folder`` declares, or None when it declares none."""
    found = _defaults_file(folder)
    return None if found is None else _native_size_in(*found)


def _native_size_in(path: str, data: dict[str, Any]) -> int | None:
    """The checked ``native_size`` of a defaults file's ``data`` read from ``path``."""
    if NATIVE_SIZE_KEY not in data:
        return None
    value = data[NATIVE_SIZE_KEY]
    low, high = _NATIVE_RANGE
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not low <= value <= high
        or value % 8
    ):
        raise ModelDefaultsError(
            f"{path}: {NATIVE_SIZE_KEY!r} must be a whole number of pixels in [{low}, {high}], "
            "a multiple of 8"
        )
    return value


def read_model_defaults(folder: str | None) -> dict[str, float]:
    """The recommended values for the model in ``folder``: the family defaults, overridden by
    its ``layout_defaults.json``. ``folder`` None or a file (a single-file checkpoint): the
    family defaults."""
    values = dict(SDXL_DEFAULTS)
    found = _defaults_file(folder)
    if found is None:
        return values
    path, data = found
    _native_size_in(path, data)  # a bad declaration fails here too, when the model loads
    for name, value in data.items():
        if name in ("note", NATIVE_SIZE_KEY):
            continue
        if name not in _RANGES:
            raise ModelDefaultsError(
                f"{path}: {name!r} is not a setting a model can choose; known: {sorted(_RANGES)}"
            )
        low, high = _RANGES[name]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high
        ):
            raise ModelDefaultsError(f"{path}: {name!r} must be a number in [{low}, {high}]")
        values[name] = float(value)
    return values


def pipeline_defaults(pipe: RegionalSDXLPipeline) -> dict[str, float]:
    """The recommended values for the model ``pipe`` was loaded from (read once per pipeline)."""
    if pipe.model_defaults is None:
        pipe.model_defaults = read_model_defaults(pipe.name_or_path)
    return pipe.model_defaults


def resolve_for(pipe: RegionalSDXLPipeline, layout: Layout) -> Layout:
    """``layout`` with the fields it leaves to the model filled in for ``pipe``'s model."""
    return with_model_defaults(layout, pipeline_defaults(pipe))


def with_model_defaults(layout: Layout, defaults: dict[str, float]) -> Layout:
    """``layout`` with its null model-chosen fields filled from ``defaults`` (itself if none)."""
    missing = {name: value for name, value in defaults.items() if getattr(layout, name, 0) is None}
    return dataclasses.replace(layout, **missing) if missing else layout


SDXL_NATIVE_SIZE = 1024
"""The side SDXL models are trained at: the native size when a model's configs cannot be read."""


def model_configs(location: ModelLocation) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The UNet's and the VAE's config of a located model, read from its folder (a single file:
    its config folder) without loading weights; None when they cannot be read."""
    folder = location.config if location.kind == "single_file" else location.path
    if not folder:
        return None
    configs = []
    for part in ("unet", "vae"):
        try:
            with open(os.path.join(folder, part, "config.json"), encoding="utf-8") as handle:
                config = json.load(handle)
        except (OSError, ValueError):
            return None
        if not isinstance(config, dict):
            return None
        configs.append(config)
    return configs[0], configs[1]


def vae_scale(vae_config: dict[str, Any]) -> int:
    """Image pixels per latent pixel along a side (8 for SDXL)."""
    return 2 ** (len(vae_config.get("block_out_channels") or [0, 0, 0, 0]) - 1)


def native_size(location: ModelLocation) -> int:
    """The side up to which the model composes in one pass: what its ``layout_defaults.json``
    declares (640 for the shipped shapes model), else the side it was trained at, its UNet's
    sample size in image pixels (1024 for SDXL)."""
    declared = declared_native_size(location.path)  # None for a single file: no folder
    if declared is not None:
        return declared
    configs = model_configs(location)
    if configs is None:
        return SDXL_NATIVE_SIZE
    unet, vae = configs
    sample = unet.get("sample_size")
    if isinstance(sample, list | tuple):
        sample = max(sample) if sample else None
    if not isinstance(sample, int) or isinstance(sample, bool) or sample <= 0:
        return SDXL_NATIVE_SIZE
    return sample * vae_scale(vae)


def describe_model(spec: str | None = None, options: LoadOptions | None = None) -> dict[str, Any]:
    """Whether a model spec is usable here, for health checks: never loads it.

    A usable model also says the values it chooses for Layout fields left null
    (``layout_defaults``, see :func:`read_model_defaults`) and its ``native_size``, the side
    it composes natively (see :func:`native_size`).
    """
    spec = spec or default_model_spec()
    try:
        location = resolve_model(spec, options)
        defaults = read_model_defaults(location.path)
    except (ModelNotFoundError, UnsafeCheckpointError, UnsupportedModelError) as exc:
        return {"spec": spec, "found": False, "path": None, "message": str(exc)}
    message = f"{location.kind.replace('_', ' ')} at {location.path}"
    if location.config:
        message += f" (configs from {location.config})"
    return {
        "spec": spec,
        "found": True,
        "path": location.path,
        "message": message,
        "layout_defaults": defaults,
        "native_size": native_size(location),
    }
