"""What a generation will cost, before it runs: ``hello``'s ``cost``.

The client multiplies it out for any size and step count without asking again:

- ``native_size``: the side the model composes at in one pass (1024 for SDXL, the side it was
  trained at; 640 for the shapes model, which declares it); far above it a model repeats and
  smears objects, and every step costs much more.
- ``unet_flops`` and ``vae_flops``: ``[c, a, b]`` with ``flops(p) = c + a * p + b * p**2`` for
  ``p`` latent pixels (``latent_factor`` image pixels per latent pixel along a side), one
  guided UNet step and one VAE decode (see :func:`engine.service.limits.fitted_flops`).
- ``seconds_per_flop``: measured on this engine's last generation with this UNet on this device
  (``source: "measured"``), else the device's matrix-multiply speed (``source: "device_speed"``,
  a lower bound: convolutions and attention rarely reach it). ``step_seconds`` is what one step
  at the native size then takes.

:func:`engine.wire.cost.estimate_seconds` is the formula both sides use.
"""

from __future__ import annotations

import logging
from typing import Any

from engine.loading.defaults import ModelDefaultsError, model_configs, native_size, vae_scale
from engine.loading.device import dtype_name, pick_device, pick_dtype
from engine.loading.locate import LoadOptions, ModelLocation
from engine.service.limits import config_key, device_flops_per_second, fitted_flops, measured_rate
from engine.wire.cost import estimate_seconds

log = logging.getLogger(__name__)


def model_cost(location: ModelLocation, options: LoadOptions | None = None) -> dict[str, Any]:
    """The ``cost`` of generating with the model at ``location`` on the device ``options``
    choose (see the module); ``{"available": False, "message": ...}`` when it cannot be told."""
    options = options or LoadOptions()
    configs = model_configs(location)
    if configs is None:
        return {
            "available": False,
            "message": f"the model's UNet and VAE configs are not readable at {location.path}",
        }
    unet_config, vae_config = configs
    device = pick_device(options.device)
    dtype = dtype_name(pick_dtype(device, options.dtype))
    try:
        unet = fitted_flops("unet", config_key(unet_config))
        vae = fitted_flops("vae", config_key(vae_config))
        rate = measured_rate(unet_config, device, dtype)
        source = "measured"
        if rate is None:
            rate, source = 1.0 / device_flops_per_second(device, dtype), "device_speed"
    except Exception as exc:  # an unusual architecture: no estimate, generating still works
        log.warning("no cost estimate for %s", location.path, exc_info=True)
        return {"available": False, "message": f"cannot count the model's operations: {exc}"}
    try:
        native = native_size(location)
    except ModelDefaultsError as exc:
        return {"available": False, "message": str(exc)}
    cost = {
        "available": True,
        "native_size": native,
        "latent_factor": vae_scale(vae_config),
        "unet_flops": list(unet),
        "vae_flops": list(vae),
        "seconds_per_flop": rate,
        "source": source,
        "device": device,
        "dtype": dtype,
    }
    cost["step_seconds"] = estimate_seconds(cost, native, native, 1, decode=False)
    return cost
