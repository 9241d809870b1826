"""An image per object: IP-Adapter applied inside each region's mask only.

A region may carry an ``image`` (a photo of the object, a product shot). With SDXL IP-Adapter
weights and their CLIP image encoder on this machine, each image is encoded once per call and
attended to by the UNet's cross-attention layers, but its contribution is kept to its region:
multiplied by the region's mask on each attention grid and by the region's ``image_scale``.

Coexisting with regional prompts. diffusers' ``IPAdapterAttnProcessor2_0`` adds, to the text
attention's output (before the output projection), ``scale * attention(query, image tokens)``,
times a mask when ``ip_adapter_masks`` are given. Regional prompting replaces the text part.
:class:`RegionalIPAdapterAttnProcessor` does both: it *is* a ``RegionalAttnProcessor`` (text
part, plain or regional), keeps the IP-Adapter's ``to_k_ip`` / ``to_v_ip`` projections, and
returns the image part from the regional processor's ``extra_attention`` hook, which hands over
the query the text part projected and adds the image part before the one output projection,
as diffusers does. The result equals diffusers' processor up to float rounding, the regional
code is reused, not copied, and an image costs only its attention over a few tokens.

Masks come from the same region masks as regional prompting, area-averaged to each attention
grid (``engine.regional.plan``), rather than diffusers' ``IPAdapterMaskProcessor`` resampling, which
guesses the grid from the aspect ratio and can miss odd latent sizes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from diffusers.models.attention_processor import (
    Attention,
    IPAdapterAttnProcessor,
    IPAdapterAttnProcessor2_0,
    IPAdapterXFormersAttnProcessor,
)
from diffusers.models.embeddings import ImageProjection

from engine.images import load_rgb
from engine.loading.locate import ComponentLocation
from engine.regional.attention import RegionalAttnProcessor, RegionalContext, multi_head_attention
from engine.regional.masks import region_mask
from engine.regional.plan import RegionalState, attention_grids, downsample_mask, grid_for_query
from engine.wire.layout import Layout, LayoutError

if TYPE_CHECKING:
    from engine.pipeline import RegionalSDXLPipeline


class ObjectImageState:
    """The object images of one call: per image, its mask on every grid and its scale."""

    def __init__(self, masks: list[torch.Tensor], scales: list[float], latent_size: tuple):
        """``masks``: one ``(height, width)`` mask per image at the latent size."""
        self.scales = list(scales)
        self.latent_size = tuple(latent_size)
        self.grids = attention_grids(self.latent_size)
        self._masks = masks
        self._cache: dict[tuple, torch.Tensor] = {}

    @property
    def count(self) -> int:
        """How many images the call carries."""
        return len(self.scales)

    def masks_for_query(self, query_len: int, dtype: torch.dtype, device: Any) -> torch.Tensor:
        """``(images, query_len, 1)`` masks on the grid of ``query_len`` positions."""
        key = (query_len, dtype, device)
        if key not in self._cache:
            grid = grid_for_query(query_len, self.latent_size)
            stacked = [downsample_mask(mask, grid).reshape(-1, 1) for mask in self._masks]
            self._cache[key] = torch.stack(stacked).to(device=device, dtype=dtype)
        return self._cache[key]


class ObjectImageContext:
    """The object-image state the IP-Adapter processors of one UNet read; None between calls."""

    def __init__(self) -> None:
        self.state: ObjectImageState | None = None

    @contextlib.contextmanager
    def active(self, state: ObjectImageState) -> Iterator[ObjectImageState]:
        """Make ``state`` visible to the processors during a ``with`` block.

        Nested calls (a low-resolution first pass inside a Layout call) restore the outer
        call's state on the way out.
        """
        outer, self.state = self.state, state
        try:
            yield state
        finally:
            self.state = outer


class RegionalIPAdapterAttnProcessor(RegionalAttnProcessor, torch.nn.Module):
    """Regional text cross-attention plus IP-Adapter image attention, masked per image.

    Without an active ObjectImageState (a plain diffusers call with ``ip_adapter_image``) the
    image part is diffusers' unmasked one at ``scale``.
    """

    def __init__(
        self,
        context: RegionalContext,
        object_images: ObjectImageContext,
        to_k_ip: torch.nn.Linear,
        to_v_ip: torch.nn.Linear,
        scale: float = 1.0,
    ):
        torch.nn.Module.__init__(self)
        RegionalAttnProcessor.__init__(self, context)
        self.object_images = object_images
        self.to_k_ip = to_k_ip
        self.to_v_ip = to_v_ip
        self.scale = scale

    def split_encoder_states(self, encoder_hidden_states: Any) -> tuple[torch.Tensor | None, Any]:
        """The text states and the projected image tokens ``(batch, images, tokens, width)``;
        None for the images when no image contributes to this call."""
        if not isinstance(encoder_hidden_states, tuple):
            return encoder_hidden_states, None
        text, image_states = encoder_hidden_states
        images = image_states[0]
        state = self.object_images.state
        if state is None:
            return text, images if self.scale != 0 else None
        if not any(scale != 0 for scale in state.scales):
            return text, None
        if images.shape[1] != state.count:
            raise ValueError(
                f"the IP-Adapter got {images.shape[1]} image(s) but the call's object images are "
                f"{state.count}; image embeddings must not be replaced during a Layout call"
            )
        return text, images

    def extra_attention(
        self,
        attn: Attention,
        query: torch.Tensor,
        extra: torch.Tensor,
        state: RegionalState | None,
    ) -> torch.Tensor | None:
        """The summed, masked, scaled image attention ``(batch, queries, inner)``.

        ``extra`` are the image tokens from :meth:`split_encoder_states`. Every row attends to
        its own image tokens (the negative rows to the negative image embeddings), so the
        regional ``state`` plays no part.
        """
        images = self.object_images.state
        if images is None:
            # diffusers' unmasked path: every image's tokens form one key sequence.
            flat = extra.reshape(extra.shape[0], -1, extra.shape[-1])
            return self.scale * self._attend(attn, query, flat)
        masks = images.masks_for_query(query.shape[1], query.dtype, query.device)
        total = None
        for i, scale in enumerate(images.scales):
            if scale == 0:
                continue
            part = scale * (self._attend(attn, query, extra[:, i]) * masks[i])
            total = part if total is None else total + part
        return total

    def _attend(self, attn: Attention, query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        # diffusers' IP-Adapter attention applies no per-head norms to the image tokens.
        return multi_head_attention(attn, query, self.to_k_ip(tokens), self.to_v_ip(tokens))


# -- Installation and loading -------------------------------------------------------------------


def install_masked_ip_adapter(
    unet: torch.nn.Module, context: RegionalContext
) -> ObjectImageContext:
    """Replace the IP-Adapter processors diffusers installed with regional, masked ones.

    Each takes over its layer's ``to_k_ip`` / ``to_v_ip`` weights (one adapter only). Returns
    the ObjectImageContext they read.
    """
    kinds = (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0, IPAdapterXFormersAttnProcessor)
    context_images = ObjectImageContext()
    processors = dict(unet.attn_processors)
    for name, processor in processors.items():
        if isinstance(processor, kinds):
            if len(processor.to_k_ip) != 1:
                raise ValueError("only one IP-Adapter at a time can be applied per region")
            processors[name] = RegionalIPAdapterAttnProcessor(
                context, context_images, processor.to_k_ip[0], processor.to_v_ip[0]
            )
    unet.set_attn_processor(processors)
    return context_images


@dataclass
class ObjectImageAdapter:
    """An IP-Adapter attached to a pipeline: where it came from and the context it reads."""

    location: ComponentLocation
    images: ObjectImageContext


# -- Per-call object images ------------------------------------------------------------------------


def images_unavailable(layout: Layout, pipe: RegionalSDXLPipeline) -> str | None:
    """Why object images will not act for this Layout (None: they will, or there are none)."""
    used = [i for i, r in enumerate(layout.regions) if r.image is not None and r.image_scale > 0]
    if used and pipe.object_image_adapter is None:
        return (
            f"'regions[{used[0]}].image' is an object image, but no IP-Adapter is loaded to "
            "apply it; start the engine with --ip-adapter (or send options.ip_adapter), or "
            "remove 'image'"
        )
    return None


@torch.no_grad()
def prepare_object_images(
    pipe: RegionalSDXLPipeline, layout: Layout, guided: bool
) -> tuple[dict[str, Any], ObjectImageState | None]:
    """The pipeline arguments and object-image state for a Layout's object images.

    Returns ``({"ip_adapter_image_embeds": [...]}, state)``; with no IP-Adapter attached,
    ``({}, None)``. With one attached, every call needs image embeddings: a Layout without
    images gets a single zero image at scale 0, which no processor computes with.
    """
    adapter = pipe.object_image_adapter
    if adapter is None:
        reason = images_unavailable(layout, pipe)
        if reason:
            first = next(i for i, r in enumerate(layout.regions) if r.image and r.image_scale > 0)
            raise LayoutError(reason, f"regions[{first}].image")
        return {}, None
    scale = pipe.vae_scale_factor
    latent_size = (layout.height // scale, layout.width // scale)
    image_size = (layout.height, layout.width)
    images, masks, scales = [], [], []
    for index, region in enumerate(layout.regions):
        if region.image is None or region.image_scale <= 0:
            continue
        mask = region_mask(region, index, image_size, latent_size)
        if not mask.any():
            continue
        images.append(load_rgb(region.image, f"regions[{index}].image"))
        masks.append(mask)
        scales.append(region.image_scale)
    device = pipe._execution_device
    projection = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    hidden_states = not isinstance(projection, ImageProjection)
    if images:
        embeds, negative = pipe.encode_image(images, device, 1, hidden_states)
    else:
        encoder = pipe.image_encoder.config
        if hidden_states:
            tokens = (encoder.image_size // encoder.patch_size) ** 2 + 1
            shape = (1, tokens, encoder.hidden_size)
        else:
            shape = (1, encoder.projection_dim)
        embeds = negative = torch.zeros(shape, device=device, dtype=pipe.image_encoder.dtype)
        masks, scales = [torch.zeros(latent_size)], [0.0]
    stacked = torch.cat([negative[None], embeds[None]]) if guided else embeds[None]
    state = ObjectImageState(masks, scales, latent_size)
    return {"ip_adapter_image_embeds": [stacked]}, state


@contextlib.contextmanager
def apply_object_images(
    pipe: RegionalSDXLPipeline, layout: Layout, guided: bool
) -> Iterator[dict[str, Any]]:
    """During a ``with`` block, the Layout's object images act through the IP-Adapter.

    Yields the extra pipeline arguments (empty without an IP-Adapter).
    """
    arguments, state = prepare_object_images(pipe, layout, guided)
    if state is None:
        yield arguments
        return
    with pipe.object_image_adapter.images.active(state):
        yield arguments
