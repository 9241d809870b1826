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
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ControlNetModel, StableDiffusionGLIGENPipeline, StableDiffusionXLPipeline

from engine.conditions.apply import layout_conditions
from engine.conditions.object_images import ObjectImageAdapter
from engine.loading.locate import ComponentLocation
from engine.regional.attention import RegionalContext, install_regional_attention
from engine.regional.latent import (
    DEFAULT_CROPS,
    CropPolicy,
    latent_regions,
    plan_latent_regions,
)
from engine.regional.plan import RegionalState, plan_regions
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


class RegionalSDXLPipeline(StableDiffusionXLPipeline):
    """SDXL text-to-image; ``pipe(layout=...)`` generates a Layout with regional prompts.

    Loading is inherited (``from_pretrained``, ``from_single_file``). The regional processors
    are installed on the first Layout call and stay; with no Layout active they compute exactly
    what diffusers' ``AttnProcessor2_0`` does.
    """

    latent_crops: CropPolicy | None = DEFAULT_CROPS
    """When latent mode runs small regions on crops of the latents; None: never."""

    # Attached by engine.loading.assemble; None while not configured.
    depth_controlnet: ControlNetModel | None = None
    """The depth ControlNet (``engine.conditions.depth``)."""
    depth_controlnet_location: ComponentLocation | None = None
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

    def __call__(self, *args: Any, layout: Layout | None = None, **kwargs: Any):
        """Generate. Without ``layout``: the stock SDXL call, same arguments, same output.

        With ``layout``: every setting in it is used and must not be passed again; ``generator``
        (default: a CPU generator seeded with ``layout.seed``), ``latents``, ``output_type``,
        ``callback_on_step_end`` and the other diffusers arguments still apply. The Layout's
        reference pull and per-object strengths run as step-end hooks before
        ``callback_on_step_end`` (which also sees the steps of a first pass making a layout
        reference); ``keep_outside`` needs ``output_type='pil'``. Fields the Layout leaves to
        the model (null) take the model's recommended values (``engine.loading.defaults``).
        """
        if layout is None:
            return super().__call__(*args, **kwargs)
        if args:
            raise TypeError("with layout=, pass the other pipeline arguments by keyword")
        clashing = sorted(set(kwargs) & set(_LAYOUT_OWNED))
        if clashing:
            raise TypeError(
                f"{clashing} come from the Layout when layout= is given; set them in the Layout"
            )
        if layout.mode not in _MODES:
            raise LayoutError(
                f"mode {layout.mode!r} is not supported by this engine; use one of {list(_MODES)}",
                "mode",
            )
        if kwargs.get("generator") is None:
            kwargs["generator"] = torch.Generator("cpu").manual_seed(layout.seed)
        hooks = self._step_hooks(layout, kwargs)
        # Depth ControlNet and object images, when attached (a no-op inside a caller's own
        # layout_conditions for the same Layout).
        with layout_conditions(self, layout) as extra:
            output = self._generate(layout, {**kwargs, **extra})
        return hooks.finish_output(output)

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
        if layout.mode == "latent":
            return self._call_latent(layout, guided, settings, kwargs)
        scale = self.vae_scale_factor
        plan = plan_regions(layout, (layout.height // scale, layout.width // scale))
        embeds = self._encode_layout_prompts(layout, plan.prompts, guided, kwargs)
        settings.update(embeds, **kwargs)
        if len(plan.prompts) == 1:
            # One prompt for every pixel: plain attention is exactly the regional result.
            return super().__call__(**settings)
        context = self.regional_context()
        state = RegionalState(
            plan, block_tokens=embeds["prompt_embeds"].shape[1] // len(plan.prompts), guided=guided
        )
        with context.active(state):
            return super().__call__(**settings)

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
        """The context the UNet's regional processors read, installing them if needed."""
        if self._layout_context is None:
            self._layout_context = RegionalContext()
        install_regional_attention(self.unet, self._layout_context)
        return self._layout_context

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
        encoded as one batch with the call's LoRA scale and clip skip."""
        encoded, _, pooled, _ = self.encode_prompt(
            prompt=texts,
            device=self._execution_device,
            do_classifier_free_guidance=False,
            lora_scale=(kwargs.get("cross_attention_kwargs") or {}).get("scale"),
            clip_skip=kwargs.get("clip_skip"),
        )
        return encoded, pooled

    @torch.no_grad()
    def _encode_negative(
        self, layout: Layout, encoded: torch.Tensor, pooled: torch.Tensor, kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The negative prompt's embedding ``(1, tokens, dim)`` and pooled ``(1, dim)``."""
        negative = layout.negative_prompt
        if not negative.strip() and self.config.force_zeros_for_empty_prompt:
            # What the stock pipeline does when no negative prompt is given.
            return torch.zeros_like(encoded[:1]), torch.zeros_like(pooled[:1])
        # The stock negative path reads the penultimate layer whatever clip_skip says.
        neg, _, neg_pooled, _ = self.encode_prompt(
            prompt=negative,
            device=self._execution_device,
            do_classifier_free_guidance=False,
            lora_scale=(kwargs.get("cross_attention_kwargs") or {}).get("scale"),
        )
        return neg, neg_pooled
