"""Finding models on this machine, offline only: base models and conditioning models.

A model spec is one of:

- an alias: ``shapes``, the small model shipped in ``engine/models/shapes`` (the default);
- a diffusers folder (holding ``model_index.json``);
- a Hugging Face repo id already in the local cache (``stabilityai/stable-diffusion-xl-base-1.0``);
  nothing is ever downloaded, the cache is only read;
- a single ``.safetensors`` checkpoint in the original SDXL key layout (as shared on model sites).
  Building the pipeline around it needs the component configs and tokenizers of a diffusers
  folder: the one given as ``config``, else the repo its tensor names point to (read from the
  file's header: SDXL base for most fine-tunes) from the local cache.

Pickle checkpoints (``.ckpt``, ``.bin``, ``.pt``, ``.pth``) can run code when loaded; they are
refused unless ``allow_pickle`` is set. In a diffusers folder every component (``unet``,
``text_encoder``, ...) must have ``.safetensors`` weights on its own.

Resolving a spec (:func:`resolve_model`) and the optional conditioning models (ControlNet,
IP-Adapter, GLIGEN) only looks at the file system; :mod:`engine.loading.assemble` loads them.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import (
    ModelNotFoundError,
    UnsafeCheckpointError,
    UnsupportedModelError,
)

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
ALIASES: dict[str, Path] = {"shapes": MODELS_DIR / "shapes"}
"""Short names for models shipped with the engine."""

DEFAULT_MODEL = "shapes"
MODEL_ENV = "LAYOUT_DIFFUSION_MODEL"
"""Environment variable naming the default model spec (otherwise ``shapes``)."""

SDXL_BASE_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
SAFE_SUFFIXES = (".safetensors",)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelLocation:
    """Where a model spec points on this machine."""

    spec: str
    kind: str
    """``folder`` (a diffusers folder) or ``single_file`` (one checkpoint file)."""
    path: str
    config: str | None = None
    """For single files: the diffusers folder supplying configs and tokenizers."""


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model: device, precision and memory savers."""

    device: str = "auto"
    dtype: str = "auto"
    cpu_offload: bool = False
    vae_tiling: bool = False
    kept_text_mib: int | None = None
    """Device memory (MiB) a regional call may spend keeping its prompts' attention keys and
    values; None: the pipeline's default budget, 0: keep none (less memory, slower steps)."""
    allow_pickle: bool = False
    config: str | None = None
    """Diffusers folder or cached repo id with the configs a single-file checkpoint needs."""
    controlnet: str | None = None
    """SDXL depth ControlNet: diffusers folder, cached repo id or single .safetensors file."""
    ip_adapter: str | None = None
    """SDXL IP-Adapter: weights file, folder holding one, or cached repo id (h94/IP-Adapter)."""
    gligen: str | None = None
    """GLIGEN text-box model making layout references: diffusers folder or cached repo id."""


@dataclass(frozen=True)
class ComponentLocation:
    """Where an optional conditioning model (ControlNet, IP-Adapter, GLIGEN) is here."""

    spec: str
    kind: str
    """``folder`` or ``single_file`` (ControlNet, GLIGEN: folder only); ``ip_adapter``
    (weights file + encoder)."""
    path: str
    encoder: str | None = None
    """IP-Adapter only: the folder of its CLIP image encoder."""


# -- Resolving specs -----------------------------------------------------------------------------


def default_model_spec() -> str:
    """The model used when a request names none: ``$LAYOUT_DIFFUSION_MODEL`` or ``shapes``."""
    return os.environ.get(MODEL_ENV) or DEFAULT_MODEL


def hub_cache_dir() -> str:
    """The Hugging Face hub cache folder, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return os.environ["HUGGINGFACE_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "huggingface",
    )
    return os.path.join(home, "hub")


def cached_repo_snapshot(repo_id: str) -> str | None:
    """The local snapshot folder of a cached Hugging Face repo, or None. Never downloads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id, cache_dir=hub_cache_dir(), local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None
    return folder if isinstance(folder, str) and os.path.isdir(folder) else None


def resolve_model(spec: str | None = None, options: LoadOptions | None = None) -> ModelLocation:
    """Find what ``spec`` names, without loading it.

    Raises ModelNotFoundError naming every place looked at and how to get the model, and
    UnsafeCheckpointError for pickle weights without ``allow_pickle``.
    """
    options = options or LoadOptions()
    spec = (spec or default_model_spec()).strip()
    if not spec:
        raise ModelNotFoundError("the model spec is empty; name a folder, file, repo id or alias")
    if spec in ALIASES:
        folder = ALIASES[spec]
        if not (folder / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"the bundled model {spec!r} is missing: expected a diffusers folder at "
                f"{folder}. Reinstall the engine from a complete checkout, or pass another "
                "model (a diffusers folder, a cached repo id or a .safetensors file)"
            )
        return _folder_location(spec, str(folder), options)

    path = os.path.abspath(os.path.expanduser(spec))
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise ModelNotFoundError(
                f"{path} is a folder but not a diffusers model (no model_index.json). Pass the "
                "folder that holds model_index.json, or a single .safetensors checkpoint"
            )
        return _folder_location(spec, path, options)
    if os.path.isfile(path):
        return _file_location(spec, path, options)

    if _REPO_ID.match(spec) and not spec.lower().endswith(SAFE_SUFFIXES + PICKLE_SUFFIXES):
        snapshot = cached_repo_snapshot(spec)
        if snapshot and os.path.isfile(os.path.join(snapshot, "model_index.json")):
            return _folder_location(spec, snapshot, options)
        where = "was found" if snapshot else "is not"
        raise ModelNotFoundError(
            f"model {spec!r} not found: no folder {path}, and the repo {where} in the Hugging "
            f"Face cache {hub_cache_dir()}"
            + (" but its snapshot has no model_index.json" if snapshot else "")
            + ". The engine works offline and never downloads; get it "
            f"on a machine with network: `hf download {spec}`, then copy the cache folder here "
            "or point HF_HOME at it"
        )
    raise ModelNotFoundError(
        f"model {spec!r} not found: no file or folder {path}. Pass a diffusers folder, a "
        ".safetensors checkpoint, a repo id in the local Hugging Face cache, or one of "
        f"{sorted(ALIASES)}"
    )


def _weight_files(folder: str) -> dict[str, list[str]]:
    """Weight files of a diffusers folder by component (``""`` for the top level, else the
    subfolder's name), one level down. Linked component folders count (a VAE shared by
    several model folders), as diffusers loads through them."""
    found: dict[str, list[str]] = {}
    for root, dirs, files in os.walk(folder, followlinks=True):
        if root != folder:
            dirs.clear()
        weights = [f for f in files if f.endswith(SAFE_SUFFIXES + PICKLE_SUFFIXES)]
        if weights:
            found[os.path.relpath(root, folder) if root != folder else ""] = weights
    return found


def pickle_only_components(weights: dict[str, list[str]]) -> list[str]:
    """The components whose weights exist only as pickle files: loading them could run code.

    Every component is checked on its own: safetensors for the UNet do not make a text
    encoder's ``.bin`` safe.
    """
    return sorted(
        component or "."
        for component, names in weights.items()
        if not any(name.endswith(SAFE_SUFFIXES) for name in names)
    )


def _folder_location(spec: str, folder: str, options: LoadOptions) -> ModelLocation:
    weights = _weight_files(folder)
    if not weights:
        raise ModelNotFoundError(
            f"{folder} has a model_index.json but no weight files (.safetensors): a partial "
            "download? Download the complete model, or use it as --config for a single-file "
            "checkpoint"
        )
    unsafe = pickle_only_components(weights)
    if not options.allow_pickle and unsafe:
        examples = ", ".join(f"{c}/{sorted(weights[c if c != '.' else ''])[0]}" for c in unsafe)
        raise UnsafeCheckpointError(
            f"{folder} holds pickle weights only for {', '.join(unsafe)} ({examples}), which "
            "can run code when loaded. Convert them to .safetensors, or start the engine with "
            "--allow-pickle if you trust their source"
        )
    return ModelLocation(spec=spec, kind="folder", path=folder)


def _file_location(spec: str, path: str, options: LoadOptions) -> ModelLocation:
    lower = path.lower()
    if lower.endswith(PICKLE_SUFFIXES):
        if not options.allow_pickle:
            raise UnsafeCheckpointError(
                f"{path} is a pickle checkpoint, which can run code when loaded. Use a "
                ".safetensors version of it, or pass --allow-pickle (request field allow_pickle) "
                "if you trust its source"
            )
    elif not lower.endswith(SAFE_SUFFIXES):
        raise ModelNotFoundError(
            f"{path} is not a model: expected a .safetensors checkpoint or a diffusers folder"
        )
    return ModelLocation(
        spec=spec, kind="single_file", path=path, config=_config_folder(path, options)
    )


SDXL_MODEL_TYPES = ("xl_base", "playground-v2-5")
"""diffusers' names for single-file model types with the SDXL text-to-image architecture."""


class _TensorInfo:
    """A tensor's shape as read from a safetensors header; no data is loaded."""

    def __init__(self, shape: list[int]):
        self.shape = tuple(shape)


def safetensors_shapes(path: str) -> dict[str, _TensorInfo]:
    """Tensor names and shapes of a .safetensors file, read from its JSON header only."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        if not 2 <= size <= 100_000_000:
            raise ModelNotFoundError(f"{path} is not a valid .safetensors file (bad header size)")
        try:
            header = json.loads(handle.read(size))
        except ValueError:
            raise ModelNotFoundError(f"{path} is not a valid .safetensors file") from None
    return {k: _TensorInfo(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def checkpoint_config_repo(path: str) -> str:
    """The diffusers repo whose configs fit a single-file checkpoint, told by its tensor names.

    Raises UnsupportedModelError for checkpoints that are not SDXL text-to-image models.
    """
    from diffusers.loaders.single_file_utils import (
        DIFFUSERS_DEFAULT_PIPELINE_PATHS,
        infer_diffusers_model_type,
    )

    model_type = infer_diffusers_model_type(safetensors_shapes(path))
    if model_type not in SDXL_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{path} looks like a {model_type!r} checkpoint, not an SDXL text-to-image model; "
            "use an SDXL base or fine-tune. If it does have the SDXL architecture, pass --config "
            "with a diffusers folder describing it"
        )
    return DIFFUSERS_DEFAULT_PIPELINE_PATHS[model_type]["pretrained_model_name_or_path"]


def _config_folder(path: str, options: LoadOptions) -> str:
    """The diffusers folder whose configs and tokenizers a single-file checkpoint is built with.

    An explicit ``config`` wins; otherwise the checkpoint's tensor names say which repo it
    belongs to (SDXL base for most fine-tunes), and that repo must be in the local cache.
    """
    if options.config:
        path = os.path.abspath(os.path.expanduser(options.config))
        if os.path.isfile(os.path.join(path, "model_index.json")):
            return path
        snapshot = cached_repo_snapshot(options.config) if _REPO_ID.match(options.config) else None
        if snapshot and os.path.isfile(os.path.join(snapshot, "model_index.json")):
            return snapshot
        raise ModelNotFoundError(
            f"config {options.config!r} is neither a diffusers folder with model_index.json nor "
            f"a repo in the Hugging Face cache {hub_cache_dir()}",
            "config",
        )
    repo = checkpoint_config_repo(path) if path.lower().endswith(SAFE_SUFFIXES) else SDXL_BASE_REPO
    snapshot = cached_repo_snapshot(repo)
    if snapshot and os.path.isfile(os.path.join(snapshot, "model_index.json")):
        return snapshot
    raise ModelNotFoundError(
        f"{path} is a single-file checkpoint; building it needs the component configs and "
        f"tokenizers of {repo}, which is not in the Hugging Face cache {hub_cache_dir()}. Pass "
        "--config with a diffusers folder of the same architecture, or get the configs (a few "
        f"MB) on a machine with network: `hf download {repo} --include '*.json' '*.txt'`",
        "config",
    )


# -- Conditioning models ----------------------------------------------------------------------

CONTROLNET_HELP = (
    "The engine works offline; get an SDXL depth ControlNet on a machine with network "
    "(`hf download diffusers/controlnet-depth-sdxl-1.0`) and pass its folder, or its repo id "
    "once it is in the Hugging Face cache here"
)
IP_ADAPTER_HELP = (
    "The engine works offline; get the SDXL IP-Adapter on a machine with network "
    "(`hf download h94/IP-Adapter --include 'sdxl_models/*'`) and pass its repo id once it is "
    "in the Hugging Face cache here, or a folder holding ip-adapter_sdxl.safetensors and "
    "image_encoder/"
)

GLIGEN_PIPELINE_CLASS = "StableDiffusionGLIGENPipeline"
"""diffusers' class name in a GLIGEN folder's ``model_index.json``."""
GLIGEN_HELP = (
    "The engine works offline; get the GLIGEN text-box generation model on a machine with "
    "network (`hf download masterful/gligen-1-4-generation-text-box`) and pass its folder, or "
    "its repo id once it is in the Hugging Face cache here"
)


def find_component(spec: str, label: str, field: str, help_text: str) -> str:
    """The existing file or folder an optional model's ``spec`` names: a path, or a repo id
    in the local Hugging Face cache (its snapshot folder). Raises ModelNotFoundError (for
    ``field``) ending with ``help_text`` when it names nothing here."""
    spec = (spec or "").strip()
    if not spec:
        raise ModelNotFoundError(f"the {label} spec is empty; {help_text}", field)
    path = os.path.abspath(os.path.expanduser(spec))
    if os.path.exists(path):
        return path
    if _REPO_ID.match(spec) and (snapshot := cached_repo_snapshot(spec)):
        return snapshot
    raise ModelNotFoundError(
        f"{label} {spec!r} not found: no file or folder {path}, and no such repo in the "
        f"Hugging Face cache {hub_cache_dir()}. {help_text}",
        field,
    )


def check_folder_weights(
    folder: str, weights: list[str], label: str, field: str, help_text: str, allow_pickle: bool
) -> None:
    """Refuse a model folder with no weight files (a partial download) or, unless
    ``allow_pickle``, only pickle ones."""
    if not weights:
        raise ModelNotFoundError(
            f"{label} folder {folder} has a config but no weights: a partial download? "
            + help_text,
            field,
        )
    if not allow_pickle and not any(w.endswith(SAFE_SUFFIXES) for w in weights):
        raise UnsafeCheckpointError(
            f"{label} folder {folder} holds only pickle weights, which can run code when "
            "loaded. Convert them to .safetensors, or pass --allow-pickle if you trust them",
            field,
        )


def resolve_controlnet(spec: str, options: LoadOptions | None = None) -> ComponentLocation:
    """Find a ControlNet spec (folder, single file, cached repo id) without loading it."""
    options = options or LoadOptions()
    path = find_component(spec, "ControlNet", "controlnet", CONTROLNET_HELP)
    spec = spec.strip()
    if os.path.isdir(path):
        return _controlnet_folder(spec, path, options)
    if path.lower().endswith(PICKLE_SUFFIXES) and not options.allow_pickle:
        raise UnsafeCheckpointError(
            f"ControlNet {path} is a pickle checkpoint, which can run code when loaded. Use a "
            ".safetensors version, or pass --allow-pickle if you trust its source",
            "controlnet",
        )
    if not path.lower().endswith(SAFE_SUFFIXES + PICKLE_SUFFIXES):
        raise ModelNotFoundError(
            f"ControlNet {path} is not a model: expected a .safetensors file or a diffusers "
            "folder with config.json",
            "controlnet",
        )
    return ComponentLocation(spec=spec, kind="single_file", path=path)


def _controlnet_folder(spec: str, folder: str, options: LoadOptions) -> ComponentLocation:
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ModelNotFoundError(
            f"{folder} is not a diffusers ControlNet (no config.json). Pass the folder that holds "
            "config.json and diffusion_pytorch_model.safetensors, or a single .safetensors file",
            "controlnet",
        )
    weights = [f for f in os.listdir(folder) if f.endswith(SAFE_SUFFIXES + PICKLE_SUFFIXES)]
    check_folder_weights(
        folder, weights, "ControlNet", "controlnet", CONTROLNET_HELP, options.allow_pickle
    )
    return ComponentLocation(spec=spec, kind="folder", path=folder)


def resolve_ip_adapter(spec: str, options: LoadOptions | None = None) -> ComponentLocation:
    """Find an IP-Adapter spec and its image encoder without loading them.

    ``spec`` is a ``.safetensors`` weights file, a folder holding one (directly or in
    ``sdxl_models/``, the ``h94/IP-Adapter`` layout), or a cached repo id with that layout.
    The image encoder is the ``image_encoder`` folder next to the weights (for ``vit-h``
    weights in that layout: ``models/image_encoder``).
    """
    path = find_component(spec, "IP-Adapter", "ip_adapter", IP_ADAPTER_HELP)
    spec = spec.strip()
    weights = _ip_adapter_weights(path) if os.path.isdir(path) else path
    if not weights.lower().endswith(SAFE_SUFFIXES):
        raise UnsafeCheckpointError(
            f"IP-Adapter weights {weights} are not .safetensors; pickle weights can run code "
            "when loaded. Use the .safetensors file of the same adapter",
            "ip_adapter",
        )
    folder = os.path.dirname(weights)
    candidates = [os.path.join(folder, "image_encoder")]
    if "vit-h" in os.path.basename(weights).lower():
        candidates.insert(0, os.path.join(os.path.dirname(folder), "models", "image_encoder"))
    for encoder in candidates:
        if os.path.isfile(os.path.join(encoder, "config.json")):
            return ComponentLocation(spec=spec, kind="ip_adapter", path=weights, encoder=encoder)
    raise ModelNotFoundError(
        f"IP-Adapter {weights} has no image encoder: expected a CLIP vision model folder at "
        f"{' or '.join(candidates)}. {IP_ADAPTER_HELP}",
        "ip_adapter",
    )


def _ip_adapter_weights(folder: str) -> str:
    """The one IP-Adapter weights file in ``folder`` or its ``sdxl_models`` subfolder."""
    found = []
    for where in (folder, os.path.join(folder, "sdxl_models")):
        if os.path.isdir(where):
            found += [
                os.path.join(where, name)
                for name in sorted(os.listdir(where))
                if name.lower().endswith(SAFE_SUFFIXES) and "ip-adapter" in name.lower()
            ]
    preferred = [f for f in found if os.path.basename(f) == "ip-adapter_sdxl.safetensors"]
    if preferred:
        return preferred[0]
    if len(found) == 1:
        return found[0]
    if not found:
        raise ModelNotFoundError(
            f"{folder} holds no IP-Adapter weights (ip-adapter*.safetensors). {IP_ADAPTER_HELP}",
            "ip_adapter",
        )
    names = ", ".join(os.path.relpath(f, folder) for f in found[:4])
    raise ModelNotFoundError(
        f"{folder} holds several IP-Adapters ({names}); pass the path of the one to use",
        "ip_adapter",
    )


def weights_variant(folder: str) -> str | None:
    """``fp16`` when the UNet exists only as fp16 variant files (a common partial download)."""
    unet = os.path.join(folder, "unet")
    if not os.path.isdir(unet):
        return None
    names = os.listdir(unet)
    plain = any(n.startswith("diffusion_pytorch_model") and ".fp16." not in n for n in names)
    return "fp16" if not plain and any(".fp16." in n for n in names) else None


def resolve_gligen(spec: str, options: LoadOptions | None = None) -> ComponentLocation:
    """Find a GLIGEN spec (diffusers folder or cached repo id) without loading it.

    Raises ModelNotFoundError (field ``gligen``) saying how to get the model,
    UnsupportedModelError for a folder holding another pipeline, and UnsafeCheckpointError for
    pickle-only weights without ``allow_pickle``.
    """
    options = options or LoadOptions()
    path = find_component(spec, "GLIGEN", "gligen", GLIGEN_HELP)
    if not os.path.isdir(path):
        raise ModelNotFoundError(
            f"GLIGEN {path} is a single file; GLIGEN is loaded from a diffusers folder "
            "(model_index.json, unet/, text_encoder/, vae/, ...). " + GLIGEN_HELP,
            "gligen",
        )
    return _gligen_folder(spec.strip(), path, options)


def _gligen_folder(spec: str, folder: str, options: LoadOptions) -> ComponentLocation:
    index = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index):
        raise ModelNotFoundError(
            f"{folder} is not a diffusers pipeline (no model_index.json). Pass the GLIGEN "
            "folder that holds model_index.json. " + GLIGEN_HELP,
            "gligen",
        )
    try:
        with open(index, encoding="utf-8") as handle:
            name = json.load(handle).get("_class_name")
    except (OSError, ValueError, AttributeError):
        name = None
    if name != GLIGEN_PIPELINE_CLASS:
        raise UnsupportedModelError(
            f"{folder} holds a {name or 'unknown'} pipeline, not GLIGEN ({GLIGEN_PIPELINE_CLASS}); "
            "pass the text-box generation model, such as "
            "masterful/gligen-1-4-generation-text-box",
            "gligen",
        )
    weights = _weight_files(folder)
    check_folder_weights(
        folder,
        [name for names in weights.values() for name in names],
        "GLIGEN",
        "gligen",
        GLIGEN_HELP,
        options.allow_pickle,
    )
    unsafe = pickle_only_components(weights)
    if unsafe and not options.allow_pickle:
        raise UnsafeCheckpointError(
            f"GLIGEN folder {folder} holds pickle weights only for {', '.join(unsafe)}, which "
            "can run code when loaded. Convert them to .safetensors, or pass --allow-pickle if "
            "you trust them",
            "gligen",
        )
    return ComponentLocation(spec=spec, kind="folder", path=folder)


def describe_conditions(options: LoadOptions | None = None) -> dict[str, dict[str, Any]]:
    """For each optional condition, whether it is available here and why not; never loads."""
    options = options or LoadOptions()
    checks = (
        ("controlnet", options.controlnet, resolve_controlnet, "depth ControlNet"),
        ("ip_adapter", options.ip_adapter, resolve_ip_adapter, "IP-Adapter"),
        ("gligen", options.gligen, resolve_gligen, "GLIGEN model"),
    )
    report = {}
    for name, spec, resolve, label in checks:
        if not spec:
            flag = name.replace("_", "-")
            report[name] = {
                "available": False,
                "spec": None,
                "message": f"no {label} configured; start the engine with --{flag} or send "
                f"options.{name} with a request",
            }
            continue
        try:
            location = resolve(spec, options)
        except (ModelNotFoundError, UnsafeCheckpointError, UnsupportedModelError) as exc:
            report[name] = {"available": False, "spec": spec, "message": str(exc)}
        else:
            report[name] = {"available": True, "spec": spec, "message": location.path}
    return report
