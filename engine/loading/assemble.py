"""Building a pipeline and attaching its conditioning models, and keeping it loaded.

:func:`load_pipeline` builds a :class:`~engine.pipeline.RegionalSDXLPipeline` from a location
:mod:`engine.loading.locate` found, on the device and in the precision
:mod:`engine.loading.device` chooses. :func:`attach_conditions` gives it the depth ControlNet
(the component ``pipe.depth_controlnet``), the IP-Adapter for object images (loaded with
diffusers' ``load_ip_adapter``, recorded as ``pipe.object_image_adapter``) and the GLIGEN
pipeline making layout references (``pipe.gligen_pipeline``) the options name, each placed
like the pipeline: on its device, or CPU-offloaded with it.
:class:`PipelineCache` keeps one pipeline for the next request.
"""

from __future__ import annotations

import gc
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from accelerate.hooks import CpuOffload
from diffusers import ControlNetModel, StableDiffusionGLIGENPipeline
from safetensors.torch import load_file
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from engine.conditions.object_images import ObjectImageAdapter
from engine.errors import DeviceError, ModelNotFoundError, UnsupportedModelError
from engine.loading.device import dtype_name, pick_device, pick_dtype
from engine.loading.locate import (
    ComponentLocation,
    LoadOptions,
    ModelLocation,
    hub_cache_dir,
    resolve_controlnet,
    resolve_gligen,
    resolve_ip_adapter,
    resolve_model,
    weights_variant,
)
from engine.pipeline import RegionalSDXLPipeline

# -- The base pipeline ---------------------------------------------------------------------------


def load_pipeline(location: ModelLocation, options: LoadOptions) -> RegionalSDXLPipeline:
    """Build a RegionalSDXLPipeline from a resolved location, placed on the chosen device."""
    device = pick_device(options.device)
    dtype = pick_dtype(device, options.dtype)
    if options.cpu_offload and device == "cpu":
        raise DeviceError(
            "--cpu-offload moves weights between the CPU and a GPU, but the device is the CPU; "
            "drop --cpu-offload or choose a GPU device",
            "cpu_offload",
        )
    common = {"torch_dtype": dtype, "local_files_only": True}
    with warnings.catch_warnings():
        # Newer diffusers rename torch_dtype to dtype; the old name works in every version.
        warnings.filterwarnings("ignore", ".*torch_dtype.*", FutureWarning)
        if location.kind == "single_file":
            pipe = RegionalSDXLPipeline.from_single_file(
                location.path, config=location.config, **common
            )
        else:
            # use_safetensors=True makes diffusers refuse pickle weights; None lets it fall back.
            pipe = RegionalSDXLPipeline.from_pretrained(
                location.path,
                use_safetensors=None if options.allow_pickle else True,
                variant=weights_variant(location.path),
                **common,
            )
    if pipe.depth_controlnet is not None:
        # Saved with the model (RegionalSDXLPipeline.save_pretrained): a folder of its own.
        folder = os.path.join(location.path, "depth_controlnet")
        pipe.depth_controlnet_location = ComponentLocation(folder, "folder", folder)
    if options.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if options.vae_tiling:
        pipe.vae.enable_tiling()
    # Callers report progress themselves (tqdm on the command line, events in serve).
    pipe.set_progress_bar_config(disable=True)
    return pipe


Conditions = tuple[ComponentLocation | None, ComponentLocation | None, ComponentLocation | None]
"""The resolved ControlNet, IP-Adapter and GLIGEN (None where not configured)."""


def resolve_conditions(options: LoadOptions) -> Conditions:
    """The ControlNet, IP-Adapter and GLIGEN ``options`` name, resolved (None where not
    configured)."""
    controlnet = resolve_controlnet(options.controlnet, options) if options.controlnet else None
    ip_adapter = resolve_ip_adapter(options.ip_adapter, options) if options.ip_adapter else None
    gligen = resolve_gligen(options.gligen, options) if options.gligen else None
    return controlnet, ip_adapter, gligen


def attach_conditions(
    pipe: RegionalSDXLPipeline, options: LoadOptions, conditions: Conditions | None = None
) -> bool:
    """Give ``pipe`` the ControlNet, IP-Adapter and GLIGEN ``options`` name, dropping others.

    Kept when unchanged; True if anything was loaded or unloaded. The ControlNet is placed on
    the UNet's device and dtype (with ``cpu_offload`` it stays on the GPU for the whole call);
    GLIGEN on the same device and dtype, offloaded like the pipeline with ``cpu_offload``.
    """
    controlnet, ip_adapter, gligen = conditions or resolve_conditions(options)
    changed = attach_controlnet(pipe, controlnet, options.allow_pickle)
    changed = attach_ip_adapter(pipe, ip_adapter) or changed
    return attach_gligen(pipe, gligen, options) or changed


def model_offloaded(pipe: RegionalSDXLPipeline) -> bool:
    """Whether ``pipe`` runs with diffusers' model CPU offload."""
    return isinstance(getattr(pipe.unet, "_hf_hook", None), CpuOffload)


def place_components(pipe: RegionalSDXLPipeline, *modules: torch.nn.Module) -> None:
    """Put components registered after loading where the pipeline's are: with model CPU
    offload, offloading is set up again so that they get their hooks; else on its device."""
    if model_offloaded(pipe):
        pipe.enable_model_cpu_offload(device=pipe._offload_device)
        return
    for module in modules:
        module.to(pipe._execution_device)


# -- Depth ControlNet -----------------------------------------------------------------------


def attach_controlnet(
    pipe: RegionalSDXLPipeline, location: ComponentLocation | None, allow_pickle: bool = False
) -> bool:
    """Load the ControlNet at ``location`` as the component ``pipe.depth_controlnet`` (None:
    drop it).

    Kept if already attached; True if anything changed. Raises UnsupportedModelError for a
    ControlNet built for another base model than the pipeline's UNet.
    """
    if pipe.depth_controlnet_location == location:
        return False
    pipe.register_modules(depth_controlnet=None)
    pipe.depth_controlnet_location = None
    if location is None:
        return True
    unet = pipe.unet
    controlnet = load_controlnet(location.path, location.kind, unet.dtype, allow_pickle)
    for key in ("cross_attention_dim", "addition_embed_type", "in_channels"):
        ours, theirs = unet.config.get(key), controlnet.config.get(key)
        if ours != theirs:
            raise UnsupportedModelError(
                f"ControlNet {location.spec!r} does not fit this model: its {key} is {theirs!r}, "
                f"the model's is {ours!r} (a ControlNet for another base model, such as SD 1.5?). "
                "Use an SDXL depth ControlNet",
                "controlnet",
            )
    controlnet.requires_grad_(False).eval()
    pipe.register_modules(depth_controlnet=controlnet)
    place_components(pipe, controlnet)
    pipe.depth_controlnet_location = location
    return True


def load_controlnet(
    path: str, kind: str, dtype: Any, allow_pickle: bool = False
) -> ControlNetModel:
    """A ControlNetModel from a diffusers folder or a single checkpoint file, offline."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*torch_dtype.*", FutureWarning)
        warnings.filterwarnings("ignore", ".*local_dir_use_symlinks.*", UserWarning)
        if kind == "single_file":
            # A config.json beside the file describes it; else diffusers infers the
            # architecture and reads that repo's config from the local cache.
            folder = os.path.dirname(path)
            config = folder if os.path.isfile(os.path.join(folder, "config.json")) else None
            try:
                return ControlNetModel.from_single_file(
                    path,
                    config=config,
                    torch_dtype=dtype,
                    local_files_only=True,
                    cache_dir=hub_cache_dir(),
                )
            except OSError as exc:
                raise ModelNotFoundError(
                    f"ControlNet {path} is a single file, and building it needs its diffusers "
                    f"config, which is not here ({exc}). Put the ControlNet's config.json next "
                    "to the file, or pass the ControlNet as a diffusers folder",
                    "controlnet",
                ) from exc
        return ControlNetModel.from_pretrained(
            path,
            torch_dtype=dtype,
            local_files_only=True,
            use_safetensors=None if allow_pickle else True,
        )


# -- IP-Adapter for object images ----------------------------------------------------------


def detach_ip_adapter(pipe: RegionalSDXLPipeline) -> None:
    """Remove the IP-Adapter, its image encoder and its processors from ``pipe``."""
    pipe.unload_ip_adapter()


def attach_ip_adapter(pipe: RegionalSDXLPipeline, location: ComponentLocation | None) -> bool:
    """Load the IP-Adapter at ``location`` into ``pipe`` (None: remove it). True if changed.

    The CLIP image encoder is loaded from ``location.encoder`` and registered as the
    pipeline's ``image_encoder``, the weights through diffusers' ``load_ip_adapter`` (offline).
    diffusers' processors stay; Layout calls apply the regions' images through them, masked.
    """
    current = pipe.object_image_adapter
    if (current.location if current else None) == location:
        return False
    if current is not None:
        detach_ip_adapter(pipe)
    if location is None:
        return True
    dtype = pipe.unet.dtype
    encoder = CLIPVisionModelWithProjection.from_pretrained(
        location.encoder, torch_dtype=dtype, local_files_only=True
    )
    size = encoder.config.image_size
    pipe.register_modules(
        image_encoder=encoder,
        feature_extractor=CLIPImageProcessor(size=size, crop_size=size),
    )
    state: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, tensor in load_file(location.path).items():
        group, _, rest = key.partition(".")
        if group in state:
            state[group][rest] = tensor
    if not state["image_proj"] or not state["ip_adapter"]:
        raise UnsupportedModelError(
            f"{location.path} is not an IP-Adapter (no image_proj / ip_adapter weights); "
            "pass an SDXL IP-Adapter .safetensors file",
            "ip_adapter",
        )
    pipe.load_ip_adapter(state, subfolder="", weight_name="", image_encoder_folder=None)
    place_components(pipe, encoder)
    pipe.object_image_adapter = ObjectImageAdapter(location, pipe.object_image_context())
    return True


# -- GLIGEN for layout references ------------------------------------------------------------


def load_gligen(
    location: ComponentLocation, dtype: Any, allow_pickle: bool = False
) -> StableDiffusionGLIGENPipeline:
    """A ``StableDiffusionGLIGENPipeline`` from a resolved folder, offline, on the CPU.

    Raises UnsupportedModelError for GLIGEN models that do not generate from text and boxes
    alone (the inpainting and text-image variants).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*torch_dtype.*", FutureWarning)
        gligen = StableDiffusionGLIGENPipeline.from_pretrained(
            location.path,
            torch_dtype=dtype,
            local_files_only=True,
            use_safetensors=None if allow_pickle else True,
            variant=weights_variant(location.path),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    config = gligen.unet.config
    if config.get("attention_type") != "gated" or config.get("in_channels") != 4:
        raise UnsupportedModelError(
            f"GLIGEN {location.spec!r} is not the text-box generation model (its UNet has "
            f"attention_type {config.get('attention_type')!r} and {config.get('in_channels')} "
            "input channels, the inpainting or text-image variant?); pass "
            "masterful/gligen-1-4-generation-text-box or a model of that kind",
            "gligen",
        )
    gligen.set_progress_bar_config(disable=True)
    return gligen


def attach_gligen(
    pipe: RegionalSDXLPipeline, location: ComponentLocation | None, options: LoadOptions
) -> bool:
    """Load the GLIGEN pipeline at ``location`` as ``pipe.gligen_pipeline`` (None: drop it).

    Kept if already attached; True if anything changed. It gets the SDXL UNet's dtype and
    device; with ``cpu_offload`` its parts, too, move to the GPU only while they run.
    """
    if pipe.gligen_location == location:
        return False
    pipe.gligen_pipeline = pipe.gligen_location = None
    if location is None:
        return True
    gligen = load_gligen(location, pipe.unet.dtype, options.allow_pickle)
    if options.cpu_offload:
        gligen.enable_model_cpu_offload(device=pipe._execution_device)
    else:
        gligen.to(pipe._execution_device)
    pipe.gligen_pipeline = gligen
    pipe.gligen_location = location
    return True


# -- Keeping a pipeline loaded ---------------------------------------------------------------


class PipelineCache:
    """Keeps one loaded pipeline, keyed by (resolved path, device, dtype, options).

    Asking for the same model again returns it with no load; asking for another one frees the
    first before loading, so two models never share the device's memory.
    """

    def __init__(self) -> None:
        self.pipe: RegionalSDXLPipeline | None = None
        self.key: tuple | None = None
        self.location: ModelLocation | None = None

    def get(
        self,
        spec: str | None,
        options: LoadOptions,
        on_load: Callable[[ModelLocation], None] | None = None,
    ) -> tuple[RegionalSDXLPipeline, float]:
        """The pipeline for ``spec`` and the seconds spent loading (0 if kept).

        ``on_load`` is called just before a load starts, so callers can tell their users.
        """
        location = resolve_model(spec, options)
        # Resolved first, so a missing ControlNet fails before minutes of loading the base.
        conditions = resolve_conditions(options)
        device = pick_device(options.device)
        key = (
            location.path,
            location.config,
            device,
            dtype_name(pick_dtype(device, options.dtype)),
            options.cpu_offload,
            options.vae_tiling,
        )
        start = time.perf_counter()
        loaded = False
        if self.pipe is None or key != self.key:
            self.release()
            if on_load is not None:
                on_load(location)
            self.pipe = load_pipeline(location, options)
            self.key, self.location = key, location
            loaded = True
        # A change of ControlNet, IP-Adapter or GLIGEN alone keeps the base model loaded.
        loaded = attach_conditions(self.pipe, options, conditions) or loaded
        # Read when a call starts, so it needs no reload.
        self.pipe.regional_kept_bytes = (
            None if options.kept_text_mib is None else options.kept_text_mib * 2**20
        )
        return self.pipe, time.perf_counter() - start if loaded else 0.0

    def release(self) -> bool:
        """Drop the kept pipeline and return device memory; True if one was loaded."""
        if self.pipe is None:
            return False
        device = self.key[2] if self.key else "cpu"
        self.pipe = self.key = self.location = None
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        elif device == "mps":
            torch.mps.empty_cache()
        return True
