"""RegionalSDXLPipeline: diffusers' SDXL pipeline that also generates from a Layout.

``pipe(layout=layout)`` takes prompt, negative prompt, size, steps, guidance and seed from the
Layout and steers each region's prompt into its mask through regional cross-attention (see
``engine.regions`` and ``engine.attention``). Without ``layout`` the call is diffusers' own,
untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline

from engine.attention import RegionalContext, install_regional_attention
from engine.layout import Layout, LayoutError
from engine.regions import RegionalState, plan_regions

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
    """SDXL text-to-image; ``pipe(layout=...)`` generates a Layout with regional guidance.

    Loading is inherited (``from_pretrained``, ``from_single_file``). The regional processors
    are installed on the first Layout call and stay; with no Layout active they compute exactly
    what diffusers' ``AttnProcessor2_0`` does.
    """

    def __call__(self, *args: Any, layout: Layout | None = None, **kwargs: Any):
        """Generate. Without ``layout``: the stock SDXL call, same arguments, same output.

        With ``layout``: every setting in it is used and must not be passed again; ``generator``
        (default: a CPU generator seeded with ``layout.seed``), ``latents``, ``output_type``,
        ``callback_on_step_end`` and the other diffusers arguments still apply.
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
        if layout.mode != "attention":
            raise LayoutError(
                f"mode {layout.mode!r} is not supported by this engine; use 'attention'", "mode"
            )
        if kwargs.get("generator") is None:
            kwargs["generator"] = torch.Generator("cpu").manual_seed(layout.seed)
        guided = layout.guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None
        scale = self.vae_scale_factor
        plan = plan_regions(layout, (layout.height // scale, layout.width // scale))
        embeds = self._encode_layout_prompts(layout, plan.prompts, guided, kwargs)
        settings = dict(
            width=layout.width,
            height=layout.height,
            num_inference_steps=layout.steps,
            guidance_scale=layout.guidance_scale,
            **embeds,
            **kwargs,
        )
        if len(plan.prompts) == 1:
            # One prompt for every pixel: plain attention is exactly the regional result.
            return super().__call__(**settings)
        context = self._regional_context()
        state = RegionalState(
            plan, block_tokens=embeds["prompt_embeds"].shape[1] // len(plan.prompts), guided=guided
        )
        with context.active(state):
            return super().__call__(**settings)

    def _regional_context(self) -> RegionalContext:
        """The context the UNet's regional processors read, installing them if needed."""
        context = getattr(self, "_layout_context", None)
        if context is None:
            context = self._layout_context = RegionalContext()
        install_regional_attention(self.unet, context)
        return context

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
        lora = (kwargs.get("cross_attention_kwargs") or {}).get("scale")
        clip_skip = kwargs.get("clip_skip")
        encoded, _, pooled, _ = self.encode_prompt(
            prompt=texts,
            device=self._execution_device,
            do_classifier_free_guidance=False,
            lora_scale=lora,
            clip_skip=clip_skip,
        )
        blocks = len(prompts)
        scene_row = texts.index(scene)
        embeds = {
            "prompt_embeds": encoded[:blocks].reshape(1, -1, encoded.shape[-1]),
            "pooled_prompt_embeds": pooled[scene_row : scene_row + 1],
        }
        if not guided:
            return embeds
        negative = layout.negative_prompt
        if not negative.strip() and self.config.force_zeros_for_empty_prompt:
            # What the stock pipeline does when no negative prompt is given.
            neg, neg_pooled = torch.zeros_like(encoded[:1]), torch.zeros_like(pooled[:1])
        else:
            # The stock negative path reads the penultimate layer whatever clip_skip says.
            neg, _, neg_pooled, _ = self.encode_prompt(
                prompt=negative,
                device=self._execution_device,
                do_classifier_free_guidance=False,
                lora_scale=lora,
            )
        embeds["negative_prompt_embeds"] = neg.repeat(1, blocks, 1)
        embeds["negative_pooled_prompt_embeds"] = neg_pooled
        return embeds
