"""Reference image per object: the masked IP-Adapter processor, loading, and generation."""

from __future__ import annotations

import contextlib
import dataclasses
import os

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
from tiny import IP_ADAPTER_WEIGHTS

from engine.conditions.apply import check_conditions
from engine.conditions.object_images import ObjectImageState, RegionalIPAdapterAttnProcessor
from engine.errors import ModelNotFoundError
from engine.loading.assemble import PipelineCache
from engine.loading.locate import LoadOptions, resolve_ip_adapter
from engine.regional.attention import RegionalAttnProcessor
from engine.regional.masks import box_coverage
from engine.regional.plan import RegionalState, downsample_mask, plan_regions
from engine.wire.layout import Layout, LayoutError

LAYER = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
LEFT = [0.0, 0.0, 0.5, 1.0]


@pytest.fixture(scope="module")
def pipe(tiny_model_dir, tiny_ip_adapter_dir):
    pipe, _ = PipelineCache().get(
        tiny_model_dir, LoadOptions(device="cpu", ip_adapter=tiny_ip_adapter_dir)
    )
    return pipe


def layer(pipe):
    """The test layer and the masked processor a Layout call puts in place of diffusers' one."""
    attn = pipe.unet.get_submodule(LAYER)
    stock = attn.processor
    assert type(stock) is IPAdapterAttnProcessor2_0, "diffusers' processor between calls"
    ours = RegionalIPAdapterAttnProcessor(
        pipe.regional_context(), pipe.object_image_context(), stock
    )
    return attn, ours


def inputs(seed: int = 0, text_tokens: int = 77, count: int = 1):
    """Hidden states on the 16x16 grid of a 64 px image (latent 32), text and image tokens."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 16 * 16, 64, generator=generator)
    text = torch.randn(2, text_tokens, 64, generator=generator)
    images = torch.randn(2, count, 4, 64, generator=generator)
    return hidden, text, images


@contextlib.contextmanager
def counting_calls(*modules):
    """Yields a list holding, per module, how often its forward ran inside the block."""
    counts = [0] * len(modules)
    hooks = []
    for i, module in enumerate(modules):

        def count(*_, i=i):
            counts[i] += 1

        hooks.append(module.register_forward_hook(count))
    try:
        yield counts
    finally:
        for hook in hooks:
            hook.remove()


def diffusers_processor(ours, scale) -> IPAdapterAttnProcessor2_0:
    """diffusers' IP-Adapter processor with ``ours``' image projections."""
    reference = IPAdapterAttnProcessor2_0(64, 64, num_tokens=(4,), scale=scale)
    reference.to_k_ip[0].load_state_dict(ours.to_k_ip.state_dict())
    reference.to_v_ip[0].load_state_dict(ours.to_v_ip.state_dict())
    return reference


@torch.no_grad()
def test_without_masks_the_processor_is_diffusers_ip_adapter(pipe):
    attn, ours = layer(pipe)
    reference = diffusers_processor(ours, 0.7)
    hidden, text, images = inputs()
    pipe.set_ip_adapter_scale(0.7)
    try:
        with counting_calls(attn.to_q, attn.to_out[0]) as calls:
            got = ours(attn, hidden, (text, [images]))
    finally:
        pipe.set_ip_adapter_scale(1.0)
    assert calls == [1, 1], "text and image attention share one query and one output projection"
    expected = reference(attn, hidden, (text, [images]))
    plain = AttnProcessor2_0()(attn, hidden, text)
    # The same operations in the same order as diffusers: equal, not merely close.
    assert torch.equal(got, expected)
    assert (got - plain).abs().max() > 1e-2, "the image tokens must matter"


@torch.no_grad()
def test_masked_images_match_diffusers_given_the_same_masks(pipe):
    """Two images with fractional masks: diffusers' masked processor, given our masks on the
    attention grid (where its resampling changes nothing), computes the same."""
    attn, ours = layer(pipe)
    masks = [
        box_coverage((0.0, 0.1, 0.55, 0.8), 32, 32),
        box_coverage((0.3, 0.0, 1.0, 0.5), 32, 32),
    ]
    grid = torch.stack([downsample_mask(mask, (16, 16)) for mask in masks])[None]
    assert ((grid > 0) & (grid < 1)).any(), "box edges fall inside attention cells"
    scales = [0.7, 0.4]
    reference = diffusers_processor(ours, [scales])
    hidden, text, images = inputs(3, count=2)
    with ours.object_images.active(ObjectImageState(masks, scales, (32, 32))):
        got = ours(attn, hidden, (text, [images]))
    expected = reference(attn, hidden, (text, [images]), ip_adapter_masks=[grid])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    one_image = diffusers_processor(ours, [[0.7, 0.0]])(
        attn, hidden, (text, [images]), ip_adapter_masks=[grid]
    )
    assert (got - one_image).abs().max() > 1e-3, "the second image must matter"


@torch.no_grad()
def test_reference_changes_attention_only_inside_its_region(pipe):
    attn, ours = layer(pipe)
    mask = box_coverage(tuple(LEFT), 32, 32)
    hidden, text, images = inputs(1)
    outputs = []
    for scale in (0.0, 0.8):
        with ours.object_images.active(ObjectImageState([mask], [scale], (32, 32))):
            outputs.append(ours(attn, hidden, (text, [images])))
    change = (outputs[1] - outputs[0]).reshape(2, 16, 16, -1).abs()
    assert change[:, :, 8:].max() == 0, "no change right of the region"
    assert change[:, :, :8].amax(dim=-1).min() > 1e-4, "every pixel of the region changes"


@torch.no_grad()
def test_reference_and_regional_prompts_combine_at_one_layer(pipe):
    """With regional prompts active, the image part is still added inside its region only,
    and the text part is exactly the regional processor's."""
    attn, ours = layer(pipe)
    layout = Layout.from_dict(
        {
            "prompt": "a car and a tree",
            "width": 64,
            "height": 64,
            "regions": [
                {"prompt": "a car", "box": LEFT},
                {"prompt": "a tree", "box": [0.5, 0, 1, 1]},
            ],
        }
    )
    plan = plan_regions(layout, (32, 32))
    state = RegionalState(plan, block_tokens=77, guided=True)
    hidden, text, images = inputs(2, text_tokens=77 * len(plan.prompts))
    text_only = RegionalAttnProcessor(ours.context)
    mask = box_coverage(tuple(LEFT), 32, 32)
    with ours.context.active(state):
        regional = text_only(attn, hidden, text)
        references = ObjectImageState([mask], [1.0], (32, 32))
        with ours.object_images.active(references), counting_calls(attn.to_q) as calls:
            combined = ours(attn, hidden, (text, [images]))
    assert calls == [1], "the image attention reuses the regional attention's query"
    change = (combined - regional).reshape(2, 16, 16, -1).abs()
    assert change[:, :, 8:].max() == 0
    assert change[:, :, :8].max() > 1e-3


def make_layout(image: str | None, scale: float = 1.0) -> Layout:
    return Layout.from_dict(
        {
            "prompt": "a red car on grey",
            "width": 64,
            "height": 64,
            "steps": 3,
            "seed": 2,
            "regions": [{"prompt": "a red car", "box": LEFT, "image": image, "image_scale": scale}],
        }
    )


def test_reference_image_changes_the_image_and_scale_zero_changes_nothing(pipe, condition_images):
    def run(layout):
        return pipe(layout=layout, output_type="np").images[0]

    without = run(make_layout(None))
    with_image = run(make_layout(condition_images["reference"]))
    scale_zero = run(make_layout(condition_images["reference"], scale=0.0))
    assert np.array_equal(scale_zero, without)
    assert np.abs(with_image - without).max() > 1e-3


def test_region_image_without_ip_adapter_names_the_field(condition_images):
    layout = make_layout(condition_images["reference"])
    with pytest.raises(LayoutError, match="--ip-adapter") as info:
        check_conditions(layout, None)
    assert info.value.field == "regions[0].image"
    check_conditions(make_layout(condition_images["reference"], scale=0.0), None)


def test_switching_the_ip_adapter_off_restores_plain_attention(
    tiny_model_dir, tiny_ip_adapter_dir, condition_images
):
    cache = PipelineCache()
    options = LoadOptions(device="cpu", ip_adapter=tiny_ip_adapter_dir)
    pipe, _ = cache.get(tiny_model_dir, options)
    same, _ = cache.get(tiny_model_dir, dataclasses.replace(options, ip_adapter=None))
    assert same is pipe and pipe.object_image_adapter is None
    assert pipe.unet.encoder_hid_proj is None and pipe.image_encoder is None
    cross = [p for n, p in pipe.unet.attn_processors.items() if n.endswith("attn2.processor")]
    assert not any(isinstance(p, RegionalIPAdapterAttnProcessor) for p in cross)
    layout = make_layout(None)
    assert pipe(layout=layout, output_type="np").images[0].shape == (64, 64, 3)


# -- Finding IP-Adapters ------------------------------------------------------------------------


def test_ip_adapter_folder_resolves_to_weights_and_encoder(tiny_ip_adapter_dir):
    location = resolve_ip_adapter(tiny_ip_adapter_dir)
    assert location.path == os.path.join(tiny_ip_adapter_dir, IP_ADAPTER_WEIGHTS)
    assert location.encoder == os.path.join(tiny_ip_adapter_dir, "image_encoder")


def test_ip_adapter_without_image_encoder_says_where_it_looked(tmp_path):
    (tmp_path / "ip-adapter_sdxl.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="image_encoder") as info:
        resolve_ip_adapter(str(tmp_path))
    assert info.value.field == "ip_adapter"


def test_missing_ip_adapter_says_how_to_get_one(tmp_path):
    with pytest.raises(ModelNotFoundError, match="hf download h94/IP-Adapter"):
        resolve_ip_adapter(str(tmp_path / "nothing-here"))
    with pytest.raises(ModelNotFoundError, match="no IP-Adapter weights"):
        resolve_ip_adapter(str(tmp_path))


@pytest.mark.parametrize("mode", ["attention", "latent"])
def test_depth_and_images_act_in_a_first_pass_and_in_both_modes(
    mode, tiny_model_dir, tiny_controlnet_dir, tiny_ip_adapter_dir, condition_images
):
    """A Layout asking for a reference pull runs a low-resolution first pass inside its call;
    that pass gets its own depth and reference images, and nothing is left behind."""
    options = LoadOptions(
        device="cpu", controlnet=tiny_controlnet_dir, ip_adapter=tiny_ip_adapter_dir
    )
    pipe, _ = PipelineCache().get(tiny_model_dir, options)
    layout = dataclasses.replace(
        make_layout(condition_images["reference"]),
        mode=mode,
        width=128,
        depth=condition_images["depth"],
        reference_scale=0.5,
        reference_fraction=0.5,
    )
    sizes = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[-1]))
    try:
        with_all = pipe(layout=layout, output_type="np").images[0]
    finally:
        hook.remove()
    assert len(set(sizes)) == 2, "a first pass at its own size, then the full-size pass"
    assert not pipe.unet._forward_pre_hooks, "the depth hooks are removed after the call"
    assert pipe.object_image_adapter.images.state is None
    plain = pipe(layout=dataclasses.replace(layout, depth=None), output_type="np").images[0]
    assert np.abs(with_all - plain).max() > 1e-3


def test_object_images_with_sparse_regional_attention_equal_dense(pipe, condition_images):
    """The IP-Adapter's extra attention rides on the regional processor: sparse and dense
    text attention give the same image, and the image tokens' keys and values are projected
    once per call."""
    layout = dataclasses.replace(
        make_layout(condition_images["reference"]),
        regions=[
            *make_layout(condition_images["reference"]).regions,
            Layout.from_dict(
                {"prompt": "x", "regions": [{"prompt": "a tree", "box": [0.5, 0, 1, 1]}]}
            ).regions[0],
        ],
    )
    to_k_ip = pipe.unet.get_submodule(LAYER).processor.to_k_ip[0]
    projected = []
    hook = to_k_ip.register_forward_hook(lambda *_: projected.append(1))
    latents = {}
    try:
        for attention in ("dense", "sparse"):
            pipe.regional_attention = attention
            latents[attention] = pipe(layout=layout, output_type="latent").images
    finally:
        hook.remove()
        pipe.__dict__.pop("regional_attention", None)
    torch.testing.assert_close(latents["sparse"], latents["dense"], rtol=1e-4, atol=1e-4)
    assert len(projected) == 2, "once per call (3 steps each)"
