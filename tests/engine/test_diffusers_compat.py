"""RegionalSDXLPipeline as a drop-in for diffusers' StableDiffusionXLPipeline, on tiny models.

After any Layout call the pipeline must behave as the stock one does for diffusers' own tools:
the call's signature, processors (default, slicing, fusion, LoRA), ``from_pipe`` and the
AutoPipelines, saving and loading, IP-Adapter scale / masks / unloading, and attached models
following ``to()`` and CPU offload.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os

import numpy as np
import pytest
import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForText2Image,
    DiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.models.attention_processor import (
    AttnProcessor,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
    IPAdapterAttnProcessor2_0,
    SlicedAttnProcessor,
)

from engine.conditions.object_images import RegionalIPAdapterAttnProcessor
from engine.loading.assemble import PipelineCache, attach_controlnet
from engine.loading.locate import LoadOptions, resolve_controlnet
from engine.pipeline import RegionalSDXLPipeline
from engine.regional.attention import RegionalAttnProcessor
from engine.wire.layout import Layout, LayoutError, Region

LEFT = (0.0, 0.0, 0.5, 1.0)


def make_layout(**overrides) -> Layout:
    settings = dict(
        prompt="a red car and a tree on a road",
        background_prompt="a road",
        steps=2,
        seed=5,
        width=64,
        height=64,
        regions=[Region("a red car", LEFT), Region("a tree", (0.5, 0.0, 1.0, 1.0))],
    )
    settings.update(overrides)
    return Layout(**settings)


def plain(pipe, prompt: str = "a red car on a road", **kwargs) -> np.ndarray:
    return pipe(
        prompt=prompt,
        num_inference_steps=2,
        guidance_scale=6.0,
        width=64,
        height=64,
        generator=torch.Generator("cpu").manual_seed(3),
        output_type="np",
        **kwargs,
    ).images[0]


def regional(pipe, layout: Layout | None = None, **kwargs) -> np.ndarray:
    return pipe(layout=layout or make_layout(), output_type="np", **kwargs).images[0]


def load(cls, folder: str):
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe(tiny_model_dir):
    """A fresh pipeline per test: these tests change processors, adapters and dtypes."""
    return load(RegionalSDXLPipeline, tiny_model_dir)


@pytest.fixture(scope="module")
def stock(tiny_model_dir):
    return load(StableDiffusionXLPipeline, tiny_model_dir)


def cross_attention(model) -> dict:
    return {n: p for n, p in model.attn_processors.items() if "attn2" in n}


def processors_during_call(pipe, model=None, **call) -> list:
    """Every cross-attention processor of ``model`` (the UNet) seen at the steps of a Layout
    call, which runs with ``call`` as its arguments."""
    seen: list = []

    def record(_pipe, _step, _t, _tensors):
        seen.extend(cross_attention(model or pipe.unet).values())
        return {}

    pipe(output_type="latent", callback_on_step_end=record, **call)
    return seen


# -- The call's signature ---------------------------------------------------------------------


def test_call_signature_is_diffusers_own_plus_keyword_only_layout():
    ours = inspect.signature(RegionalSDXLPipeline.__call__).parameters
    theirs = inspect.signature(StableDiffusionXLPipeline.__call__).parameters
    named = [n for n, p in ours.items() if p.kind is not p.KEYWORD_ONLY]
    assert named == list(theirs), "diffusers' parameters, in diffusers' order"
    for name, parameter in theirs.items():
        assert ours[name].kind == parameter.kind, name
        assert ours[name].default == parameter.default, name
    assert ours["layout"].kind is inspect.Parameter.KEYWORD_ONLY
    assert ours["layout"].default is None
    for name in ("callback_on_step_end_tensor_inputs", "guidance_scale", "num_images_per_prompt"):
        assert (
            name in inspect.signature(RegionalSDXLPipeline(**_no_components()).__call__).parameters
        )
    doc = inspect.getdoc(RegionalSDXLPipeline.__call__)
    assert "layout (`Layout`" in doc
    assert "guidance_rescale (`float`" in doc, "diffusers' own argument documentation follows"


def _no_components() -> dict:
    """Constructor arguments for a pipeline whose call is only inspected."""
    return dict.fromkeys(
        ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")
    )


def test_positional_calls_are_stock_bit_for_bit_and_layout_refuses_them(pipe, stock):
    def positional(p):
        # prompt, prompt_2, height, width, num_inference_steps, timesteps, sigmas,
        # denoising_end, guidance_scale, negative_prompt
        return p(
            "a red car", None, 64, 64, 2, None, None, None, 6.0, "blurry",
            generator=torch.Generator("cpu").manual_seed(1), output_type="np",
        ).images[0]  # fmt: skip

    assert np.array_equal(positional(pipe), positional(stock))
    with pytest.raises(TypeError, match=r"\['prompt'\] come from the Layout"):
        pipe("a red car", layout=make_layout())
    with pytest.raises(TypeError, match=r"\['guidance_scale'\]"):
        pipe(layout=make_layout(), guidance_scale=7.0)


# -- Processors between calls -------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout",
    [
        make_layout(),
        make_layout(mode="latent"),
        # A first pass making the layout reference: a Layout call inside the Layout call.
        make_layout(reference_scale=0.5, reference_fraction=0.5, width=128),
    ],
    ids=["attention", "latent", "first-pass"],
)
def test_the_callers_processors_come_back_after_a_layout_call(pipe, stock, layout):
    pipe.unet.set_attn_processor(AttnProcessor())
    before = dict(pipe.unet.attn_processors)
    during = processors_during_call(pipe, layout=layout)
    if layout.mode == "attention":
        assert during and all(isinstance(p, RegionalAttnProcessor) for p in during)
    after = pipe.unet.attn_processors
    assert all(after[name] is processor for name, processor in before.items())
    pipe.unet.set_default_attn_processor()  # diffusers checks the classes exactly
    stock.unet.set_default_attn_processor()
    try:
        assert np.array_equal(plain(pipe), plain(stock))
    finally:
        stock.unet.set_attn_processor(AttnProcessor2_0())


@pytest.mark.parametrize("mode", ["attention", "latent"])
def test_processors_come_back_when_the_call_is_cancelled(pipe, mode):
    before = dict(pipe.unet.attn_processors)

    def cancel(_pipe, _step, _t, _tensors):
        raise InterruptedError("cancelled")

    with pytest.raises(InterruptedError):
        pipe(layout=make_layout(mode=mode), callback_on_step_end=cancel)
    assert all(pipe.unet.attn_processors[n] is p for n, p in before.items())
    assert pipe.regional_context().state is None


def test_a_cross_attention_processor_of_the_callers_own_is_refused_and_kept(pipe):
    class Scaled(AttnProcessor2_0):
        """Something more than plain attention, which a Layout call cannot stand in for."""

    name = next(iter(cross_attention(pipe.unet)))
    pipe.unet.set_attn_processor({**pipe.unet.attn_processors, name: Scaled()})
    before = dict(pipe.unet.attn_processors)
    with pytest.raises(ValueError, match=rf"{name} \(Scaled\).*set_attn_processor"):
        pipe(layout=make_layout())
    assert all(pipe.unet.attn_processors[n] is p for n, p in before.items())


def test_attention_slicing_and_fused_qkv_around_layout_calls(pipe):
    reference = regional(pipe)
    pipe.enable_attention_slicing(1)
    assert all(type(p) is SlicedAttnProcessor for p in pipe.unet.attn_processors.values())
    np.testing.assert_allclose(regional(pipe), reference, atol=1e-5)
    assert all(type(p) is SlicedAttnProcessor for p in pipe.unet.attn_processors.values())
    pipe.disable_attention_slicing()

    pipe.fuse_qkv_projections()
    assert all(type(p) is FusedAttnProcessor2_0 for p in pipe.unet.attn_processors.values())
    np.testing.assert_allclose(regional(pipe), reference, atol=1e-5)
    assert all(type(p) is FusedAttnProcessor2_0 for p in pipe.unet.attn_processors.values())
    pipe.unfuse_qkv_projections()
    assert all(type(p) is AttnProcessor2_0 for p in pipe.unet.attn_processors.values())
    assert np.array_equal(regional(pipe), reference)


# -- Sharing components: from_pipe and the AutoPipelines ----------------------------------------


def test_from_pipe_both_ways_and_the_auto_pipelines_after_a_layout_call(pipe, stock):
    layout_image = regional(pipe)
    expected = plain(stock)

    shared = StableDiffusionXLPipeline.from_pipe(pipe)
    assert type(shared) is StableDiffusionXLPipeline and shared.unet is pipe.unet
    assert np.array_equal(plain(shared), expected)

    text2image = AutoPipelineForText2Image.from_pipe(pipe)
    assert type(text2image) is StableDiffusionXLPipeline and text2image.unet is pipe.unet
    image2image = AutoPipelineForImage2Image.from_pipe(pipe)
    assert type(image2image) is StableDiffusionXLImg2ImgPipeline
    assert image2image.unet is pipe.unet
    image2image.set_progress_bar_config(disable=True)
    start = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    out = image2image(
        "a red car", image=start, num_inference_steps=4, strength=0.5, output_type="np"
    )
    assert np.isfinite(out.images).all()

    back = RegionalSDXLPipeline.from_pipe(stock)
    back.set_progress_bar_config(disable=True)
    assert back.unet is stock.unet and back.depth_controlnet is None
    assert np.array_equal(regional(back), layout_image)
    assert np.array_equal(plain(stock), expected), "the stock pipeline's UNet is left as it was"


# -- Saving and loading ---------------------------------------------------------------------


def test_a_saved_pipeline_loads_as_stock_sdxl_and_as_itself(pipe, stock, tmp_path):
    layout_image = regional(pipe)
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert "depth_controlnet" not in index, "an unset component of ours is not recorded"

    loaded = load(DiffusionPipeline, str(tmp_path / "saved"))
    assert type(loaded) is StableDiffusionXLPipeline
    assert np.array_equal(plain(loaded), plain(stock))
    again = load(RegionalSDXLPipeline, str(tmp_path / "saved"))
    assert np.array_equal(regional(again), layout_image)


def test_the_depth_controlnet_is_a_component_saved_and_shared(
    tiny_model_dir, tiny_controlnet_dir, condition_images, tmp_path
):
    pipe, _ = PipelineCache().get(
        tiny_model_dir, LoadOptions(device="cpu", controlnet=tiny_controlnet_dir)
    )
    assert pipe.components["depth_controlnet"] is pipe.depth_controlnet
    layout = make_layout(depth=condition_images["depth"])
    controlled = regional(pipe, layout)
    pipe.save_pretrained(tmp_path / "saved")
    assert os.path.isdir(tmp_path / "saved" / "depth_controlnet")

    stock = load(DiffusionPipeline, str(tmp_path / "saved"))
    assert type(stock) is StableDiffusionXLPipeline and not hasattr(stock, "depth_controlnet")
    again = load(RegionalSDXLPipeline, str(tmp_path / "saved"))
    assert again.depth_controlnet is not None
    assert np.array_equal(regional(again, layout), controlled)
    shared = RegionalSDXLPipeline.from_pipe(pipe)
    assert shared.depth_controlnet is pipe.depth_controlnet
    # The engine's loader keeps a ControlNet saved with the model only when asked for it.
    served, _ = PipelineCache().get(str(tmp_path / "saved"), LoadOptions(device="cpu"))
    assert served.depth_controlnet is None


# -- LoRA ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lora_dir(tmp_path_factory) -> str:
    """A random rank-4 LoRA on the tiny UNet's attention projections, in diffusers' format."""
    pytest.importorskip("peft")
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from tiny import tiny_unet

    unet = tiny_unet()
    torch.manual_seed(11)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    folder = str(tmp_path_factory.mktemp("lora"))
    StableDiffusionXLPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True
    )
    return folder


def test_lora_loads_fuses_and_unloads_as_on_the_stock_pipeline(pipe, tiny_model_dir, tiny_lora_dir):
    stock = load(StableDiffusionXLPipeline, tiny_model_dir)
    without = regional(pipe)
    plain_without = plain(stock)
    for p in (pipe, stock):
        p.load_lora_weights(tiny_lora_dir)
    assert np.array_equal(plain(pipe), plain(stock))
    with_lora = regional(pipe)
    assert np.abs(with_lora - without).max() > 1e-3, "the LoRA acts in Layout calls"
    assert np.array_equal(plain(pipe), plain(stock))

    for p in (pipe, stock):
        p.fuse_lora()
    np.testing.assert_allclose(plain(pipe), plain(stock), atol=1e-6)
    np.testing.assert_allclose(regional(pipe), with_lora, atol=1e-4)
    for p in (pipe, stock):
        p.unfuse_lora()
        p.unload_lora_weights()
    np.testing.assert_allclose(plain(pipe), plain_without, atol=1e-5)
    np.testing.assert_allclose(regional(pipe), without, atol=1e-5)
    assert all(type(p) is AttnProcessor2_0 for p in pipe.unet.attn_processors.values())


# -- IP-Adapter -------------------------------------------------------------------------------


@pytest.fixture
def ip_pipe(tiny_model_dir, tiny_ip_adapter_dir):
    pipe, _ = PipelineCache().get(
        tiny_model_dir, LoadOptions(device="cpu", ip_adapter=tiny_ip_adapter_dir)
    )
    return pipe


def image_layout(reference: str, **overrides) -> Layout:
    car, tree = make_layout().regions
    return make_layout(regions=[dataclasses.replace(car, image=reference), tree], **overrides)


def test_ip_adapter_processors_are_diffusers_between_calls_and_masked_during_them(
    ip_pipe, condition_images
):
    during = processors_during_call(ip_pipe, layout=image_layout(condition_images["reference"]))
    assert during and all(type(p) is RegionalIPAdapterAttnProcessor for p in during)
    assert all(type(p) is IPAdapterAttnProcessor2_0 for p in cross_attention(ip_pipe.unet).values())


def test_set_ip_adapter_scale_acts_on_layout_object_images(ip_pipe, condition_images):
    layout = image_layout(condition_images["reference"])
    without = regional(ip_pipe, make_layout())
    full = regional(ip_pipe, layout)
    ip_pipe.set_ip_adapter_scale(0.0)
    assert np.array_equal(regional(ip_pipe, layout), without)
    ip_pipe.set_ip_adapter_scale(0.5)
    half = regional(ip_pipe, layout)
    # A region's image_scale and the adapter's scale multiply.
    assert np.array_equal(regional(ip_pipe, image_layout(condition_images["reference"])), half)
    ip_pipe.set_ip_adapter_scale(1.0)
    car, tree = layout.regions
    halved_car = dataclasses.replace(car, image_scale=car.image_scale * 0.5)
    halved = dataclasses.replace(layout, regions=[halved_car, tree])
    np.testing.assert_allclose(regional(ip_pipe, halved), half, atol=1e-6)
    assert np.abs(half - full).max() > 1e-4 and np.abs(half - without).max() > 1e-4


def test_set_ip_adapter_scale_per_layer_reaches_each_masked_processor(ip_pipe, condition_images):
    layout = image_layout(condition_images["reference"])
    without = regional(ip_pipe, make_layout())
    full = regional(ip_pipe, layout)
    # InstantStyle's form: the image acts in the second attention of the first up block only.
    ip_pipe.set_ip_adapter_scale({"up": {"block_0": [0.0, 1.0]}})
    scales = {n: p.scale[0] for n, p in cross_attention(ip_pipe.unet).items()}
    assert sorted(set(scales.values())) == [0.0, 1.0]
    during = processors_during_call(ip_pipe, layout=layout)
    seen = {p.layer_scales(1)[0] for p in during}
    assert seen == {0.0, 1.0}
    one_layer = regional(ip_pipe, layout)
    assert np.abs(one_layer - without).max() > 1e-5 and np.abs(one_layer - full).max() > 1e-5


def test_ip_adapter_masks_work_without_a_layout_and_are_refused_with_one(ip_pipe, condition_images):
    from PIL import Image

    reference = Image.open(condition_images["reference"])
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :32] = 1.0
    unmasked = plain(ip_pipe, ip_adapter_image=reference)
    masked = plain(
        ip_pipe,
        ip_adapter_image=reference,
        cross_attention_kwargs={"ip_adapter_masks": [mask]},
    )
    assert np.abs(masked - unmasked).max() > 1e-4, "diffusers' masks act between Layout calls"
    with pytest.raises(ValueError, match="ip_adapter_masks.*region of the Layout its 'image'"):
        ip_pipe(layout=make_layout(), cross_attention_kwargs={"ip_adapter_masks": [mask]})


def test_the_calls_own_ip_adapter_image_acts_in_a_layout_without_object_images(
    ip_pipe, condition_images
):
    from PIL import Image

    reference = Image.open(condition_images["reference"])
    without = regional(ip_pipe)
    with_image = regional(ip_pipe, ip_adapter_image=reference)
    assert np.abs(with_image - without).max() > 1e-4
    ip_pipe.set_ip_adapter_scale(0.0)
    assert np.array_equal(regional(ip_pipe, ip_adapter_image=reference), without)
    with pytest.raises(TypeError, match="regions\\[0\\].image"):
        ip_pipe(layout=image_layout(condition_images["reference"]), ip_adapter_image=reference)


def test_unload_ip_adapter_after_layout_calls_and_with_none_loaded(ip_pipe, pipe, condition_images):
    regional(ip_pipe, image_layout(condition_images["reference"]))
    ip_pipe.unload_ip_adapter()
    assert ip_pipe.object_image_adapter is None and ip_pipe.image_encoder is None
    assert all(type(p) is AttnProcessor2_0 for p in ip_pipe.unet.attn_processors.values())
    with pytest.raises(LayoutError, match="load_ip_adapter"):
        ip_pipe(layout=image_layout(condition_images["reference"]))
    regional(pipe)
    pipe.unload_ip_adapter()  # nothing loaded: diffusers rebuilds the processors, no error
    assert all(type(p) is AttnProcessor2_0 for p in pipe.unet.attn_processors.values())


def test_an_ip_adapter_loaded_by_diffusers_applies_layout_object_images(
    pipe, tiny_ip_adapter_dir, condition_images
):
    from safetensors.torch import load_file
    from tiny import IP_ADAPTER_WEIGHTS
    from transformers import CLIPVisionModelWithProjection

    encoder = CLIPVisionModelWithProjection.from_pretrained(
        os.path.join(tiny_ip_adapter_dir, "image_encoder")
    )
    pipe.register_modules(image_encoder=encoder)
    state: dict = {"image_proj": {}, "ip_adapter": {}}
    for key, tensor in load_file(os.path.join(tiny_ip_adapter_dir, IP_ADAPTER_WEIGHTS)).items():
        group, _, rest = key.partition(".")
        state[group][rest] = tensor
    pipe.load_ip_adapter(state, subfolder="", weight_name="", image_encoder_folder=None)
    assert pipe.object_image_adapter is None, "not attached by the engine"
    without = regional(pipe, make_layout())
    with_image = regional(pipe, image_layout(condition_images["reference"]))
    assert np.abs(with_image - without).max() > 1e-4


# -- Attached models follow the pipeline ---------------------------------------------------------


@pytest.fixture
def attached(tiny_model_dir, tiny_controlnet_dir, tiny_ip_adapter_dir, tiny_gligen_dir):
    options = LoadOptions(
        device="cpu",
        controlnet=tiny_controlnet_dir,
        ip_adapter=tiny_ip_adapter_dir,
        gligen=tiny_gligen_dir,
    )
    pipe, _ = PipelineCache().get(tiny_model_dir, options)
    return pipe


def attached_models(pipe) -> dict[str, torch.nn.Module]:
    return {
        "controlnet": pipe.depth_controlnet,
        "image_encoder": pipe.image_encoder,
        "gligen_unet": pipe.gligen_pipeline.unet,
        "gligen_text_encoder": pipe.gligen_pipeline.text_encoder,
    }


def test_attached_models_follow_dtype_changes(attached):
    attached.to(torch.bfloat16)
    assert {n: m.dtype for n, m in attached_models(attached).items()} == dict.fromkeys(
        attached_models(attached), torch.bfloat16
    )
    attached.to(dtype=torch.float32)
    assert all(m.dtype == torch.float32 for m in attached_models(attached).values())


def test_attached_models_are_cpu_offloaded_with_the_pipeline(attached, condition_images):
    from accelerate.hooks import CpuOffload

    layout = image_layout(
        condition_images["reference"],
        depth=condition_images["depth"],
        reference_scale=0.5,
        reference_fraction=0.5,
    )
    expected = regional(attached, layout)
    attached.enable_model_cpu_offload(device="cpu")
    for name, model in attached_models(attached).items():
        assert isinstance(getattr(model, "_hf_hook", None), CpuOffload), name
    np.testing.assert_allclose(regional(attached, layout), expected, atol=1e-5)
    attached.remove_all_hooks()
    assert not any(hasattr(m, "_hf_hook") for m in attached_models(attached).values())


def test_a_controlnet_attached_after_offloading_is_offloaded_too(
    tiny_model_dir, tiny_controlnet_dir
):
    from accelerate.hooks import CpuOffload

    pipe = load(RegionalSDXLPipeline, tiny_model_dir)
    pipe.enable_model_cpu_offload(device="cpu")
    attach_controlnet(pipe, resolve_controlnet(tiny_controlnet_dir))
    assert isinstance(getattr(pipe.depth_controlnet, "_hf_hook", None), CpuOffload)
    assert isinstance(getattr(pipe.unet, "_hf_hook", None), CpuOffload)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_attached_models_move_and_offload_with_the_pipeline(attached, condition_images):
    layout = image_layout(
        condition_images["reference"],
        depth=condition_images["depth"],
        reference_scale=0.5,
        reference_fraction=0.5,
    )
    attached.to("cuda")
    assert all(m.device.type == "cuda" for m in attached_models(attached).values())
    on_gpu = regional(attached, layout, generator=torch.Generator("cpu").manual_seed(5))
    attached.to("cpu")
    attached.enable_model_cpu_offload(device="cuda")
    assert all(m.device.type == "cpu" for m in attached_models(attached).values())
    offloaded = regional(attached, layout, generator=torch.Generator("cpu").manual_seed(5))
    np.testing.assert_allclose(offloaded, on_gpu, atol=1e-4)
    assert attached.depth_controlnet.device.type == "cpu", "back on the CPU after the call"
