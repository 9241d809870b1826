"""RegionalSDXLPipeline: diffusers' SDXL pipeline that also generates from a Layout.

``pipe(layout=layout)`` takes prompt, negative prompt, size, steps, guidance and seed from the
Layout and steers each region's prompt into its mask, by the Layout's ``mode``:

- ``attention`` (about the cost of a plain image): regional cross-attention, every prompt block
  in one UNet call (``engine.regional.plan``, ``engine.regional.attention``);
- ``latent`` (about ``(blocks + 1) / 2`` times the cost, less with crops): one UNet call per
  distinct prompt, predictions blended by feathered masks (``engine.regional.latent``).

In both modes the Layout's reference pull and per-object strength from an init image
(``engine.steering``) run as step-end hooks before the caller's ``callback_on_step_end``, and
an attached depth ControlNet and IP-Adapter act through ``engine.conditions.apply``.
The models attached by ``engine.loading.assemble`` are declared below as attributes.
Without ``layout`` the call is diffusers' own, untouched.

Extension points, for conditions that act on every UNet call:

- *Forward pre-hooks on* ``pipe.unet`` (``register_forward_pre_hook(..., with_kwargs=True)``)
  see exactly one call per denoising step over the whole canvas, in both modes, and may add
  ``down_block_additional_residuals`` / ``mid_block_additional_residual`` (a ControlNet,
  ``engine.conditions.depth``). In latent mode the per-block calls run inside that call's forward
  and receive the residuals cut to their crop.
- *Cross-attention processors* that add to the text attention (an IP-Adapter,
  ``engine.conditions.object_images``) subclass ``engine.regional.attention.RegionalAttnProcessor``, read
  ``pipe.regional_context()`` and add their term through its ``split_encoder_states`` /
  ``extra_attention`` hook, which hands over the projected query (no second ``to_q``, one
  output projection); attention mode's text part then stays regional. Latent mode
  runs every block uncropped when the call carries IP-Adapter images, so masks on the latent
  grid stay valid.

A drop-in for diffusers. The call's signature is ``StableDiffusionXLPipeline.__call__``'s plus
``layout``. Regional processors sit on the UNet (and the depth ControlNet) only while a Layout
call runs (``engine.regional.processors``); at all other times the models hold exactly the
processors diffusers or the caller put there, so ``set_default_attn_processor``, attention
slicing, QKV fusion, LoRA, IP-Adapter scale and unloading, ``from_pipe`` and saving behave as
on the stock pipeline. The depth ControlNet is the registered, optional component
``depth_controlnet``; GLIGEN follows ``to()`` and CPU offload. A saved folder names
``StableDiffusionXLPipeline``, so ``DiffusionPipeline.from_pretrained`` loads it as stock SDXL,
and ``AutoPipelineForText2Image`` / ``AutoPipelineForImage2Image.from_pipe`` give the stock SDXL
pipelines sharing this one's components.
"""

# No ``from __future__ import annotations``: diffusers reads the component types of
# ``__init__`` at run time (``from_pipe``), and older versions cannot resolve string annotations.

import contextlib
import inspect
import json
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    StableDiffusionGLIGENPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from engine.conditions.apply import layout_conditions
from engine.conditions.object_images import (
    ObjectImageAdapter,
    ObjectImageContext,
    masked_ip_adapter,
)
from engine.loading.locate import ComponentLocation
from engine.prompt_cache import PromptCache, encoder_identity
from engine.prompt_length import check_prompt_tokens
from engine.regional.attention import RegionalContext
from engine.regional.latent import (
    DEFAULT_CROPS,
    CropPolicy,
    latent_regions,
    plan_latent_regions,
)
from engine.regional.plan import (
    RegionalState,
    cross_attention_grids,
    kept_bytes_budget,
    plan_regions,
)
from engine.regional.processors import regional_processors
from engine.steering.hooks import StepHooks, prepare_step_hooks
from engine.wire.layout import Layout, LayoutError

# The Layout modes this pipeline generates.
_MODES = ("attention", "latent")

# Arguments that carry IP-Adapter images into the call.
_IMAGE_ARGUMENTS = ("ip_adapter_image", "ip_adapter_image_embeds")

# Settings a Layout owns: passing them next to ``layout=`` would be ambiguous.
_LAYOUT_OWNED = (
    "prompt",
    "prompt_2",
    "negative_prompt",
    "negative_prompt_2",
    "prompt_embeds",
    "negative_prompt_embeds",
    "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
    "width",
    "height",
    "num_inference_steps",
    "guidance_scale",
)


# Optional components of this pipeline that stock SDXL does not have.
_OWN_COMPONENTS = ("depth_controlnet",)


class RegionalSDXLPipeline(StableDiffusionXLPipeline):
    """SDXL text-to-image; ``pipe(layout=...)`` generates a Layout with regional prompts.

    Loading is inherited (``from_pretrained``, ``from_single_file``, ``from_pipe``). Regional
    processors are on the UNet only while a Layout call runs; between calls the pipeline is
    diffusers' own in every respect (see the module docstring).
    """

    _optional_components = [*StableDiffusionXLPipeline._optional_components, *_OWN_COMPONENTS]

    latent_crops: CropPolicy | None = DEFAULT_CROPS
    """When latent mode runs small regions on crops of the latents; None: never."""

    regional_attention: str = "sparse"
    """How attention mode computes the regional cross-attention: ``"sparse"`` (each prompt
    block over the pixels it weighs only, merged exactly; the default) or ``"dense"`` (every
    pixel over every block with an additive log-weight bias: the reference, same result)."""
    regional_blend: str = "joint"
    """How a pixel combines the prompt blocks it listens to in attention mode: ``"joint"`` (one
    softmax over all their tokens, each block's scores raised by the log of its weight; the
    default) or ``"weighted"`` (each block's attention output averaged by the pixel's
    normalised block weights: Regional Prompter's way of sharing the scene prompt inside a
    region). Set it on the pipeline, e.g. ``pipe.regional_blend = "weighted"``."""
    regional_kept_bytes: int | None = None
    """Device memory a Layout call may spend keeping the text keys and values of its
    cross-attention layers between steps (SDXL in half precision: 0.26 GiB at 8 prompts, 2.5
    GiB at 100); layers beyond it project their text at every step. 0 keeps none; None: 3 GiB,
    and on a GPU at most a quarter of the memory free when the call starts."""
    regional_last_kept_bytes: int = 0
    """The text keys and values the last regional Layout call kept at most (0 for a call with
    one prompt block, which runs as plain SDXL)."""

    # Attached by engine.loading.assemble; None while not configured.
    depth_controlnet_location: ComponentLocation | None = None
    """Where the depth ControlNet (the component ``depth_controlnet``) was loaded from."""
    object_image_adapter: ObjectImageAdapter | None = None
    """The IP-Adapter applying object images (``engine.conditions.object_images``)."""
    gligen_pipeline: StableDiffusionGLIGENPipeline | None = None
    """The GLIGEN pipeline making layout references (``engine.conditions.gligen``)."""
    gligen_location: ComponentLocation | None = None

    model_defaults: dict[str, float] | None = None
    """The model's values for Layout fields left null, read once (``engine.loading.defaults``)."""
    conditioned_layouts: tuple[Layout, ...] = ()
    """The Layouts whose conditions are applied now (``engine.conditions.apply``)."""
    _layout_context: RegionalContext | None = None
    _object_image_context: ObjectImageContext | None = None
    _prompt_cache: PromptCache | None = None

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: CLIPVisionModelWithProjection = None,
        feature_extractor: CLIPImageProcessor = None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
        depth_controlnet: ControlNetModel = None,
    ):
        """SDXL's components, plus an optional depth ControlNet (``engine.conditions.depth``)
        that Layouts with a ``depth`` map use."""
        super().__init__(
            vae,
            text_encoder,
            text_encoder_2,
            tokenizer,
            tokenizer_2,
            unet,
            scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
        )
        self.register_modules(depth_controlnet=depth_controlnet)

    def __call__(
        self,
        prompt: str | list[str] = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] = None,
        sigmas: list[float] = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[int, int], None]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        # diffusers' own default; never mutated here.
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006
        *,
        layout: Layout | None = None,
        **kwargs: Any,
    ):
        """Generate: diffusers' SDXL text-to-image call, or an image from a Layout.

        Args:
            layout (`Layout`, *optional*):
                Without it the call is ``StableDiffusionXLPipeline.__call__``: the same
                arguments (positional ones too) and the same output, bit for bit. With it, the
                Layout gives the prompts, negative prompt, size, steps, guidance scale and seed,
                and steers each region's prompt into its mask (``layout.mode``). The arguments
                it owns (``prompt``, ``prompt_2``, ``negative_prompt``, ``negative_prompt_2``,
                the four ``*prompt_embeds``, ``height``, ``width``, ``num_inference_steps``,
                ``guidance_scale``) must then stay at their defaults. ``generator`` (default: a
                CPU generator seeded with ``layout.seed``), ``latents``, ``output_type``,
                ``callback_on_step_end`` and the other arguments still apply. The Layout's
                reference pull and per-object strengths run as step-end hooks before
                ``callback_on_step_end`` (which also sees the steps of a first pass making a
                layout reference); ``keep_outside`` needs ``output_type='pil'``. Fields the
                Layout leaves to the model (null) take the model's recommended values
                (``engine.loading.defaults``). An IP-Adapter applies the regions' ``image``
                inside their masks; ``ip_adapter_image`` works with a Layout without object
                images, ``cross_attention_kwargs["ip_adapter_masks"]`` does not combine with a
                Layout (the regions' ``image`` replaces it).

        Every other argument is ``StableDiffusionXLPipeline.__call__``'s, documented below.
        """
        arguments = {name: value for name, value in locals().items() if name in _CALL_DEFAULTS}
        if layout is None:
            return super().__call__(**arguments, **kwargs)
        return self._call_layout(layout, arguments, kwargs)

    if StableDiffusionXLPipeline.__call__.__doc__:
        __call__.__doc__ += StableDiffusionXLPipeline.__call__.__doc__

    def _call_layout(self, layout: Layout, arguments: dict[str, Any], extra: dict[str, Any]):
        """``pipe(layout=...)``: ``arguments`` are the named call arguments, ``extra`` the rest."""
        clashing = [name for name in _LAYOUT_OWNED if _given(name, arguments[name])]
        if clashing:
            raise TypeError(
                f"{clashing} come from the Layout when layout= is given; set them in the Layout "
                "(or call without layout=)"
            )
        if layout.mode not in _MODES:
            raise LayoutError(
                f"mode {layout.mode!r} is not supported by this engine; use one of {list(_MODES)}",
                "mode",
            )
        # The text encoders would cut a prompt past their window with only a log line.
        check_prompt_tokens(self, layout)
        kwargs = {k: v for k, v in arguments.items() if k not in _LAYOUT_OWNED}
        kwargs.update(extra)
        if (kwargs.get("cross_attention_kwargs") or {}).get("ip_adapter_masks") is not None:
            raise ValueError(
                "cross_attention_kwargs['ip_adapter_masks'] does not combine with layout=: give "
                "each region of the Layout its 'image' (applied inside that region's mask, "
                "scaled by its 'image_scale'), or call without layout="
            )
        if kwargs.get("generator") is None:
            kwargs["generator"] = torch.Generator("cpu").manual_seed(layout.seed)
        own_images = any(kwargs.get(k) is not None for k in _IMAGE_ARGUMENTS)
        with self._layout_processors():
            hooks = self._step_hooks(layout, kwargs)
            # Depth ControlNet and object images, when attached (a no-op inside a caller's own
            # layout_conditions for the same Layout).
            with layout_conditions(self, layout, own_images) as conditions:
                output = self._generate(layout, {**kwargs, **conditions})
        return hooks.finish_output(output)

    @contextlib.contextmanager
    def _layout_processors(self) -> Iterator[None]:
        """Regional processors on the UNet for one Layout call (diffusers' IP-Adapter ones
        stand aside for masked regional ones); the UNet's own processors come back after it."""
        context = self.regional_context()
        convert = masked_ip_adapter(context, self.object_image_context())
        with regional_processors(self.unet, context, convert):
            yield

    def _step_hooks(self, layout: Layout, kwargs: dict[str, Any]) -> StepHooks:
        """Prepare the Layout's reference pull and per-object strength and put their
        starting latents and step-end hooks (before the caller's callback) into ``kwargs``."""
        user = kwargs.get("callback_on_step_end")
        hooks = prepare_step_hooks(
            self,
            layout,
            kwargs["generator"],
            batch_size=kwargs.get("num_images_per_prompt") or 1,
            latents=kwargs.get("latents"),
            # A first pass making the layout reference reports progress and can be cancelled too.
            first_pass_kwargs={} if user is None else {"callback_on_step_end": user},
        )
        if hooks.latents is not None:
            kwargs["latents"] = hooks.latents
        if hooks.hooks:
            kwargs["callback_on_step_end"] = hooks.callback(user)
            inputs = kwargs.get("callback_on_step_end_tensor_inputs")
            if inputs is not None and "latents" not in inputs:
                kwargs["callback_on_step_end_tensor_inputs"] = [*inputs, "latents"]
        return hooks

    def _generate(self, layout: Layout, kwargs: dict[str, Any]):
        """The diffusers call for the Layout's mode."""
        guided = layout.guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None
        settings = dict(
            width=layout.width,
            height=layout.height,
            num_inference_steps=layout.steps,
            guidance_scale=layout.guidance_scale,
        )
        self.regional_last_kept_bytes = 0
        if layout.mode == "latent":
            return self._call_latent(layout, guided, settings, kwargs)
        scale = self.vae_scale_factor
        latent_size = (layout.height // scale, layout.width // scale)
        plan = plan_regions(layout, latent_size, grids=self._attention_grids(latent_size))
        embeds = self._encode_layout_prompts(layout, plan.prompts, guided, kwargs)
        settings.update(embeds, **kwargs)
        if len(plan.prompts) == 1:
            # One prompt for every pixel: plain attention is exactly the regional result.
            return super().__call__(**settings)
        context = self.regional_context()
        state = RegionalState(
            plan,
            block_tokens=embeds["prompt_embeds"].shape[1] // len(plan.prompts),
            guided=guided,
            attention=self.regional_attention,
            blend=self.regional_blend,
            kept_bytes=(
                kept_bytes_budget(self._execution_device)
                if self.regional_kept_bytes is None
                else self.regional_kept_bytes
            ),
        )
        try:
            with context.active(state):
                return super().__call__(**settings)
        finally:
            self.regional_last_kept_bytes = state.peak_kept_bytes

    def _attention_grids(self, latent_size: tuple[int, int]) -> list[tuple[int, int]]:
        """The grids the regional processors attend on: the UNet's and a depth ControlNet's."""
        grids = cross_attention_grids(self.unet.config, latent_size)
        controlnet = getattr(self, "depth_controlnet", None)
        if controlnet is not None:
            extra = cross_attention_grids(controlnet.config, latent_size)
            grids += [grid for grid in extra if grid not in grids]
        return grids

    def _call_latent(
        self, layout: Layout, guided: bool, settings: dict[str, Any], kwargs: dict[str, Any]
    ):
        """Latent mode: the UNet's forward replaced by per-block calls for this call only."""
        scale = self.vae_scale_factor
        latent_size = (layout.height // scale, layout.width // scale)
        # An IP-Adapter masks its images on the whole latent grid: crops would misplace them.
        with_images = any(kwargs.get(k) is not None for k in _IMAGE_ARGUMENTS)
        crops = None if with_images else self.latent_crops
        multiple = 2 ** (len(self.unet.config.block_out_channels) - 1)
        plan = plan_latent_regions(layout, latent_size, multiple, crops)
        scene = layout.prompt.strip()
        texts = plan.prompts if scene in plan.prompts else [*plan.prompts, scene]
        encoded, pooled = self._encode_texts(texts, kwargs)
        row = texts.index(scene)
        # The call's own text is the scene prompt: what hooks on the UNet (a ControlNet) see.
        settings.update(
            prompt_embeds=encoded[row : row + 1], pooled_prompt_embeds=pooled[row : row + 1]
        )
        if guided:
            negative, negative_pooled = self._encode_negative(layout, encoded, pooled, kwargs)
            settings.update(
                negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled
            )
        blocks = len(plan.prompts)
        with latent_regions(self.unet, plan, encoded[:blocks], pooled[:blocks], guided):
            return super().__call__(**settings, **kwargs)

    def regional_context(self) -> RegionalContext:
        """The context the regional processors of this pipeline's Layout calls read."""
        if self._layout_context is None:
            self._layout_context = RegionalContext()
        return self._layout_context

    def object_image_context(self) -> ObjectImageContext:
        """The context the masked IP-Adapter processors of this pipeline's Layout calls read."""
        if self._object_image_context is None:
            self._object_image_context = ObjectImageContext()
        return self._object_image_context

    # -- diffusers' pipeline methods that must know the attachments -------------------------------

    def unload_ip_adapter(self) -> None:
        """diffusers' ``unload_ip_adapter``; the engine's record of the adapter goes with it."""
        super().unload_ip_adapter()
        self.object_image_adapter = None

    def to(self, *args: Any, **kwargs: Any):
        """diffusers' ``to``; the attached GLIGEN pipeline moves and converts with it (the
        depth ControlNet and the image encoder are components and move anyway)."""
        super().to(*args, **kwargs)
        if self.gligen_pipeline is not None:
            self.gligen_pipeline.to(*args, **kwargs)
        return self

    def enable_model_cpu_offload(
        self, gpu_id: int | None = None, device: torch.device | str | None = None
    ) -> None:
        """diffusers' model offload, for the attached GLIGEN pipeline too. The depth ControlNet
        is offloaded like diffusers' ControlNet pipelines do theirs: on the accelerator while a
        call runs, back on the CPU after it."""
        super().enable_model_cpu_offload(gpu_id=gpu_id, device=device)
        if self.gligen_pipeline is not None:
            self.gligen_pipeline.enable_model_cpu_offload(gpu_id=gpu_id, device=device)

    def enable_sequential_cpu_offload(
        self, gpu_id: int | None = None, device: torch.device | str | None = None
    ) -> None:
        """diffusers' sequential offload, for the attached GLIGEN pipeline too."""
        super().enable_sequential_cpu_offload(gpu_id=gpu_id, device=device)
        if self.gligen_pipeline is not None:
            self.gligen_pipeline.enable_sequential_cpu_offload(gpu_id=gpu_id, device=device)

    def remove_all_hooks(self) -> None:
        """diffusers' ``remove_all_hooks``, for the attached GLIGEN pipeline too."""
        super().remove_all_hooks()
        if self.gligen_pipeline is not None:
            self.gligen_pipeline.remove_all_hooks()

    def to_json_string(self) -> str:
        """The pipeline's ``model_index.json``, naming ``StableDiffusionXLPipeline``.

        A saved folder then loads with ``DiffusionPipeline.from_pretrained`` (and the
        AutoPipelines) as stock SDXL; ``RegionalSDXLPipeline.from_pretrained`` loads it as this
        pipeline, the depth ControlNet included. Components of ours that are not set are left
        out, so stock SDXL finds nothing it does not know.
        """
        config = json.loads(super().to_json_string())
        config["_class_name"] = StableDiffusionXLPipeline.__name__
        for name in _OWN_COMPONENTS:
            if config.get(name, [None, None]) == [None, None]:
                config.pop(name, None)
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    @torch.no_grad()
    def _encode_layout_prompts(
        self, layout: Layout, prompts: list[str], guided: bool, kwargs: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        """Encode every block prompt once and concatenate the blocks along the token axis.

        The pooled embedding (and so the added conditioning) is the scene prompt's. The
        negative prompt is tiled once per block so both halves of the guidance batch have the
        same token length.
        """
        scene = layout.prompt.strip()
        # The scene prompt is encoded for its pooled embedding even when no pixel uses its block.
        texts = list(prompts) if scene in prompts else [*prompts, scene]
        encoded, pooled = self._encode_texts(texts, kwargs)
        blocks = len(prompts)
        scene_row = texts.index(scene)
        embeds = {
            "prompt_embeds": encoded[:blocks].reshape(1, -1, encoded.shape[-1]),
            "pooled_prompt_embeds": pooled[scene_row : scene_row + 1],
        }
        if not guided:
            return embeds
        neg, neg_pooled = self._encode_negative(layout, encoded, pooled, kwargs)
        embeds["negative_prompt_embeds"] = neg.repeat(1, blocks, 1)
        embeds["negative_pooled_prompt_embeds"] = neg_pooled
        return embeds

    @torch.no_grad()
    def _encode_texts(
        self, texts: list[str], kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text embeddings ``(len(texts), tokens, dim)`` and pooled ``(len(texts), dim)``,
        encoded as one batch with the call's LoRA scale and clip skip; texts encoded by an
        earlier call with the same settings come from :attr:`prompt_cache`."""
        lora_scale = (kwargs.get("cross_attention_kwargs") or {}).get("scale")
        clip_skip = kwargs.get("clip_skip")

        def encode(missing: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            encoded, _, pooled, _ = self.encode_prompt(
                prompt=missing,
                device=self._execution_device,
                do_classifier_free_guidance=False,
                lora_scale=lora_scale,
                clip_skip=clip_skip,
            )
            return encoded, pooled

        variant = ("prompt", lora_scale, clip_skip)
        return self.prompt_cache.encode(texts, variant, self._prompt_owner(), encode)

    @torch.no_grad()
    def _encode_negative(
        self, layout: Layout, encoded: torch.Tensor, pooled: torch.Tensor, kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The negative prompt's embedding ``(1, tokens, dim)`` and pooled ``(1, dim)``."""
        negative = layout.negative_prompt
        if not negative.strip() and self.config.force_zeros_for_empty_prompt:
            # What the stock pipeline does when no negative prompt is given.
            return torch.zeros_like(encoded[:1]), torch.zeros_like(pooled[:1])
        lora_scale = (kwargs.get("cross_attention_kwargs") or {}).get("scale")

        def encode(missing: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            # The stock negative path reads the penultimate layer whatever clip_skip says.
            neg, _, neg_pooled, _ = self.encode_prompt(
                prompt=missing,
                device=self._execution_device,
                do_classifier_free_guidance=False,
                lora_scale=lora_scale,
            )
            return neg, neg_pooled

        variant = ("negative", lora_scale)
        return self.prompt_cache.encode([negative], variant, self._prompt_owner(), encode)

    @property
    def prompt_cache(self) -> PromptCache:
        """Encoded prompts kept across this pipeline's Layout calls (``engine.prompt_cache``):
        a repeated request skips the text encoders. Bounded by ``prompt_cache.max_bytes``."""
        if self._prompt_cache is None:
            self._prompt_cache = PromptCache()
        return self._prompt_cache

    def _prompt_owner(self) -> tuple:
        """What the kept prompts depend on besides their text: the encoders and the device."""
        encoders = encoder_identity(self.text_encoder, self.text_encoder_2)
        return (*encoders, str(self._execution_device))


# -- The call's arguments -------------------------------------------------------------------------

_CALL_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(RegionalSDXLPipeline.__call__).parameters.items()
    if name != "self" and parameter.kind is parameter.POSITIONAL_OR_KEYWORD
}
"""diffusers' named call arguments (``layout`` and the catch-all ``kwargs`` aside), with their
defaults."""


def _given(name: str, value: Any) -> bool:
    """Whether the call argument ``name`` was given a value other than its default."""
    default = _CALL_DEFAULTS[name]
    if value is default:
        return False
    if value is None or default is None or torch.is_tensor(value):
        return True
    return value != default


# -- AutoPipelines ------------------------------------------------------------------------------


def _register_with_auto_pipelines() -> None:
    """Let ``AutoPipelineFor*.from_pipe`` treat this pipeline as SDXL.

    The AutoPipelines find a pipeline's family by its class name in their task tables; a table
    of its own, appended once, maps this class to ``stable-diffusion-xl`` and leaves every
    existing lookup as it was.
    """
    from diffusers.pipelines import auto_pipeline

    tables = auto_pipeline.SUPPORTED_TASKS_MAPPINGS
    if not any(RegionalSDXLPipeline in table.values() for table in tables):
        tables.append(OrderedDict([("stable-diffusion-xl", RegionalSDXLPipeline)]))


_register_with_auto_pipelines()
