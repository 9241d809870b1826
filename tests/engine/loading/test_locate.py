"""Model specs resolve offline to the right place; loading is cached; devices are picked sanely."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from engine.errors import (
    DeviceError,
    ModelNotFoundError,
    UnsafeCheckpointError,
    UnsupportedModelError,
)
from engine.loading import locate
from engine.loading.assemble import PipelineCache
from engine.loading.defaults import describe_model
from engine.loading.device import pick_device, pick_dtype
from engine.loading.locate import LoadOptions, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def fake_hub(tmp_path, monkeypatch, tiny_model_dir):
    """An HF cache holding acme/tiny-sdxl laid out like the real one (refs -> snapshot)."""
    cache = tmp_path / "hf-home" / "hub"
    repo = cache / "models--acme--tiny-sdxl"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    return cache


def test_folder_resolves_and_loads_once(tiny_model_dir):
    location = resolve_model(tiny_model_dir)
    assert (location.kind, location.path) == ("folder", os.path.abspath(tiny_model_dir))

    cache = PipelineCache()
    seen = []
    pipe, seconds = cache.get(tiny_model_dir, LoadOptions(device="cpu"), on_load=seen.append)
    from engine.pipeline import RegionalSDXLPipeline

    assert isinstance(pipe, RegionalSDXLPipeline)
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"
    assert seconds > 0 and [s.path for s in seen] == [location.path]

    again, seconds = cache.get(tiny_model_dir, LoadOptions(device="cpu"), on_load=seen.append)
    assert again is pipe and seconds == 0.0 and len(seen) == 1

    # Other options are another pipeline: the first is dropped, not kept alongside.
    tiled, seconds = cache.get(tiny_model_dir, LoadOptions(device="cpu", vae_tiling=True))
    assert tiled is not pipe and seconds > 0 and tiled.vae.use_tiling
    assert cache.release() is True and cache.pipe is None and cache.release() is False


def test_alias_and_default_model(monkeypatch, tiny_model_dir, tmp_path):
    from pathlib import Path

    monkeypatch.setitem(locate.ALIASES, "shapes", Path(tiny_model_dir))
    monkeypatch.delenv(locate.MODEL_ENV, raising=False)
    assert resolve_model(None).path == str(Path(tiny_model_dir))
    assert resolve_model("shapes").spec == "shapes"

    monkeypatch.setenv(locate.MODEL_ENV, "/elsewhere/model")
    assert locate.default_model_spec() == "/elsewhere/model"

    monkeypatch.setitem(locate.ALIASES, "shapes", tmp_path / "models" / "shapes")
    with pytest.raises(ModelNotFoundError) as error:
        resolve_model("shapes")
    assert "bundled model 'shapes' is missing" in str(error.value)
    assert str(tmp_path / "models" / "shapes") in str(error.value)


def test_missing_model_says_where_it_looked_and_how_to_get_it(fake_hub, tmp_path):
    with pytest.raises(ModelNotFoundError) as error:
        resolve_model(str(tmp_path / "nothing-here"))
    assert f"no file or folder {tmp_path / 'nothing-here'}" in str(error.value)

    with pytest.raises(ModelNotFoundError) as error:
        resolve_model("stabilityai/stable-diffusion-xl-base-1.0")
    message = str(error.value)
    assert str(fake_hub) in message
    assert "never downloads" in message
    assert "hf download stabilityai/stable-diffusion-xl-base-1.0" in message

    report = describe_model("acme/unknown")
    assert report["found"] is False and "acme/unknown" in report["message"]

    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(ModelNotFoundError, match="no model_index.json"):
        resolve_model(str(tmp_path / "not-a-model"))


def test_repo_id_resolves_from_the_local_cache_only(fake_hub, tiny_model_dir):
    location = resolve_model("acme/tiny-sdxl")
    assert location.kind == "folder"
    assert location.path == str(fake_hub / "models--acme--tiny-sdxl" / "snapshots" / COMMIT)
    assert describe_model("acme/tiny-sdxl")["found"] is True
    pipe, _ = PipelineCache().get("acme/tiny-sdxl", LoadOptions(device="cpu"))
    assert pipe.unet.config.cross_attention_dim == 64


def test_pickle_checkpoints_are_refused_unless_allowed(tmp_path, tiny_model_dir):
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"not really a pickle")
    with pytest.raises(UnsafeCheckpointError) as error:
        resolve_model(str(checkpoint))
    assert "--allow-pickle" in str(error.value) and str(checkpoint) in str(error.value)
    allowed = resolve_model(str(checkpoint), LoadOptions(allow_pickle=True, config=tiny_model_dir))
    assert (allowed.kind, allowed.config) == ("single_file", tiny_model_dir)

    folder = tmp_path / "bin-only"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UnsafeCheckpointError, match="pickle weights only for unet"):
        resolve_model(str(folder))
    assert resolve_model(str(folder), LoadOptions(allow_pickle=True)).kind == "folder"
    assert describe_model(str(folder))["found"] is False


def test_every_component_of_a_folder_must_be_safetensors(tmp_path):
    folder = tmp_path / "mixed"
    for component, name in [
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "pytorch_model.bin"),
        ("text_encoder_2", "model.safetensors"),
        ("vae", "diffusion_pytorch_model.bin"),
        ("vae", "diffusion_pytorch_model.safetensors"),
    ]:
        (folder / component).mkdir(parents=True, exist_ok=True)
        (folder / component / name).write_bytes(b"")
    (folder / "model_index.json").write_text("{}")
    # The UNet's safetensors do not vouch for the text encoder's pickle; the VAE has both.
    with pytest.raises(UnsafeCheckpointError) as error:
        resolve_model(str(folder))
    assert "only for text_encoder (text_encoder/pytorch_model.bin)" in str(error.value)
    assert error.value.code == "unsafe_checkpoint"
    assert resolve_model(str(folder), LoadOptions(allow_pickle=True)).kind == "folder"


def fake_checkpoint(path, shapes: dict[str, tuple[int, ...]]) -> str:
    """A .safetensors file whose tensor names and shapes mimic a real checkpoint's."""
    from safetensors.torch import save_file

    save_file({name: torch.zeros(shape) for name, shape in shapes.items()}, str(path))
    return str(path)


XL_KEY = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"
UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"


def test_single_file_configs_come_from_the_cache_or_config(tmp_path, fake_hub, tiny_model_dir):
    checkpoint = fake_checkpoint(tmp_path / "sdxl.safetensors", {XL_KEY: (4,), UNET_IN: (8, 4)})
    with pytest.raises(ModelNotFoundError) as error:
        resolve_model(checkpoint)
    message = str(error.value)
    assert "stabilityai/stable-diffusion-xl-base-1.0" in message and str(fake_hub) in message
    assert "--config" in message and error.value.field == "config"

    # Once the SDXL base configs are cached, the checkpoint resolves to them by itself.
    base = fake_hub / "models--stabilityai--stable-diffusion-xl-base-1.0"
    shutil.copytree(tiny_model_dir, base / "snapshots" / COMMIT)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(COMMIT)
    assert resolve_model(checkpoint).config == str(base / "snapshots" / COMMIT)

    by_folder = resolve_model(checkpoint, LoadOptions(config=tiny_model_dir))
    assert by_folder.config == os.path.abspath(tiny_model_dir)
    by_repo = resolve_model(checkpoint, LoadOptions(config="acme/tiny-sdxl"))
    assert by_repo.config == str(fake_hub / "models--acme--tiny-sdxl" / "snapshots" / COMMIT)

    (tmp_path / "weights.onnx").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="expected a .safetensors"):
        resolve_model(str(tmp_path / "weights.onnx"))
    (tmp_path / "broken.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ModelNotFoundError, match="not a valid .safetensors"):
        resolve_model(str(tmp_path / "broken.safetensors"))


@pytest.mark.parametrize(
    "shapes, kind",
    [
        ({UNET_IN: (320, 4, 3, 3)}, "'v1'"),
        ({XL_KEY: (4,), UNET_IN: (320, 9, 3, 3)}, "'xl_inpaint'"),
    ],
)
def test_single_file_that_is_not_sdxl_text_to_image_is_refused(tmp_path, shapes, kind):
    checkpoint = fake_checkpoint(tmp_path / "other.safetensors", shapes)
    with pytest.raises(UnsupportedModelError) as error:
        resolve_model(checkpoint)
    assert kind in str(error.value) and "not an SDXL text-to-image model" in str(error.value)
    assert error.value.code == "unsupported_model"
    assert describe_model(checkpoint)["found"] is False


@pytest.mark.parametrize(
    "cuda, mps, device, dtype",
    [
        (True, True, "cuda", torch.float16),
        (False, True, "mps", torch.float16),
        (False, False, "cpu", torch.float32),
    ],
)
def test_auto_device_prefers_cuda_then_mps(monkeypatch, cuda, mps, device, dtype):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert pick_device("auto") == device
    assert pick_dtype(device, "auto") == dtype


def test_explicit_device_and_dtype_are_checked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device("cpu") == "cpu"
    with pytest.raises(DeviceError, match="'cuda' is not available here"):
        pick_device("cuda")
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        pick_device("tpu")
    assert pick_dtype("cpu", "bf16") == torch.bfloat16
    assert pick_dtype("cuda", "fp32") == torch.float32
    with pytest.raises(DeviceError, match="unknown dtype 'int8'"):
        pick_dtype("cpu", "int8")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("cuda:0") == "cuda:0"
    with pytest.raises(DeviceError, match="1 CUDA device"):
        pick_device("cuda:3")


def test_cpu_offload_on_the_cpu_is_refused_before_loading(tiny_model_dir):
    with pytest.raises(DeviceError, match="drop --cpu-offload"):
        PipelineCache().get(tiny_model_dir, LoadOptions(device="cpu", cpu_offload=True))


def test_single_file_checkpoint_loads_offline_with_local_configs(tmp_path):
    from original_sdxl_checkpoint import (
        save_original_sdxl_checkpoint,
        tiny_pipeline_for_single_file,
    )

    reference = tiny_pipeline_for_single_file(seed=3)
    reference.save_pretrained(tmp_path / "configs")
    checkpoint = save_original_sdxl_checkpoint(reference, str(tmp_path / "tiny.safetensors"))
    from safetensors import safe_open

    with safe_open(checkpoint, "pt") as handle:
        keys = set(handle.keys())
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys  # the original layout
    assert "conditioner.embedders.1.model.positional_embedding" in keys

    options = LoadOptions(device="cpu", config=str(tmp_path / "configs"))
    cache = PipelineCache()
    pipe, _ = cache.get(checkpoint, options)
    location = cache.location
    assert (location.kind, location.path) == ("single_file", checkpoint)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        expected = getattr(reference, name).state_dict()
        loaded = getattr(pipe, name).state_dict()
        assert loaded.keys() == expected.keys(), name
        for key, value in expected.items():
            assert torch.equal(loaded[key].reshape(value.shape), value), f"{name}.{key}"


def test_fp16_variant_only_download_loads_and_config_only_is_reported(tmp_path, tiny_model_dir):
    variant = tmp_path / "fp16-only"
    shutil.copytree(tiny_model_dir, variant)
    for weights in variant.glob("*/*.safetensors"):
        weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    pipe, _ = PipelineCache().get(str(variant), LoadOptions(device="cpu"))
    assert pipe.unet.config.cross_attention_dim == 64

    configs = tmp_path / "configs-only"
    shutil.copytree(tiny_model_dir, configs, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(ModelNotFoundError, match="no weight files"):
        resolve_model(str(configs))


def test_a_folder_of_linked_components_loads(tmp_path, tiny_model_dir):
    """Component folders linked from elsewhere (a VAE shared by several models) are weights."""
    linked = tmp_path / "linked"
    linked.mkdir()
    for entry in os.listdir(tiny_model_dir):
        os.symlink(os.path.join(tiny_model_dir, entry), linked / entry)
    assert resolve_model(str(linked)).path == str(linked)
    pipe, _ = PipelineCache().get(str(linked), LoadOptions(device="cpu"))
    assert pipe.unet.config.cross_attention_dim == 64
