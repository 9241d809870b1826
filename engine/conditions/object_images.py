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

Lifecycle. The IP-Adapter is loaded with diffusers' own ``load_ip_adapter``, and diffusers'
processors stay on the UNet between calls, so ``set_ip_adapter_scale``, ``ip_adapter_masks``
and ``unload_ip_adapter`` work as on a stock pipeline. Only while a Layout call runs does each
stand aside for a :class:`RegionalIPAdapterAttnProcessor` sharing its weights and reading its
scale (:func:`masked_ip_adapter`, installed by ``engine.regional.processors``).

Masks come from the same region masks as regional prompting, area-averaged to each attention
grid (``engine.regional.plan``), rather than diffusers' ``IPAdapterMaskProcessor`` resampling, which
guesses the grid from the aspect ratio and can miss odd latent sizes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
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

    Stands in for one of diffusers' IP-Adapter processors during a Layout call
    (:func:`masked_ip_adapter`): it uses that processor's ``to_k_ip`` / ``to_v_ip`` weights and
    reads its ``scale`` at every call, so ``pipe.set_ip_adapter_scale`` (one value, a value per
    layer, or a value per image) acts as on the stock processor. A Layout's object image is
    weighted by its region's ``image_scale`` times that scale. Without an active
    ObjectImageState (the call's own ``ip_adapter_image``) the image part is diffusers'
    unmasked one.
    """

    def __init__(
        self,
        context: RegionalContext,
        object_images: ObjectImageContext,
        ip_adapter: IPAdapterAttnProcessor2_0,
    ):
        torch.nn.Module.__init__(self)
        RegionalAttnProcessor.__init__(self, context)
        if len(ip_adapter.to_k_ip) != 1:
            raise ValueError(
                f"{len(ip_adapter.to_k_ip)} IP-Adapters are loaded, and a Layout call applies "
                "one; call pipe.unload_ip_adapter() and load a single one"
            )
        self.object_images = object_images
        self.ip_adapter = ip_adapter

    @property
    def to_k_ip(self) -> torch.nn.Module:
        """The image-token key projection of the adapter this processor stands in for."""
        return self.ip_adapter.to_k_ip[0]

    @property
    def to_v_ip(self) -> torch.nn.Module:
        """The image-token value projection of the adapter this processor stands in for."""
        return self.ip_adapter.to_v_ip[0]

    def layer_scales(self, count: int) -> list[float]:
        """The adapter's scale at this layer for each of ``count`` images."""
        scale = self.ip_adapter.scale[0]
        if not isinstance(scale, (list, tuple)):
            return [scale] * count
        if len(scale) != count:
            raise ValueError(
                f"set_ip_adapter_scale gave {len(scale)} per-image scales but the call has "
                f"{count} image(s); give one scale per image, or a single scale"
            )
        return list(scale)

    def split_encoder_states(self, encoder_hidden_states: Any) -> tuple[torch.Tensor | None, Any]:
        """The text states and the projected image tokens ``(batch, images, tokens, width)``;
        None for the images when no image contributes to this call."""
        if not isinstance(encoder_hidden_states, tuple):
            return encoder_hidden_states, None
        text, image_states = encoder_hidden_states
        images = image_states[0]
        state = self.object_images.state
        if state is None:
            scale = self.ip_adapter.scale[0]
            if isinstance(scale, (list, tuple)):
                raise ValueError(
                    "per-image IP-Adapter scales need per-image masks, which a Layout call gives "
                    "through its regions' 'image'; set a single scale with "
                    "pipe.set_ip_adapter_scale(value) for the call's ip_adapter_image"
                )
            return text, images if scale != 0 else None
        if images.shape[1] != state.count:
            raise ValueError(
                f"the IP-Adapter got {images.shape[1]} image(s) but the call's object images are "
                f"{state.count}; image embeddings must not be replaced during a Layout call"
            )
        scales = self.image_scales(state)
        if not any(scale != 0 for scale in scales):
            return text, None
        return text, images

    def image_scales(self, state: ObjectImageState) -> list[float]:
        """Each object image's weight at this layer: its ``image_scale`` times the adapter's."""
        layer = self.layer_scales(state.count)
        return [scale * factor for scale, factor in zip(state.scales, layer, strict=True)]

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
        regional ``state`` plays no part in the attention; it keeps the image tokens' keys and
        values for the call (a Layout call's image embeddings are the same at every step).
        """
        images = self.object_images.state
        if images is None:
            # diffusers' unmasked path: every image's tokens form one key sequence.
            flat = extra.reshape(extra.shape[0], -1, extra.shape[-1])
            return self.ip_adapter.scale[0] * self._attend(attn, query, flat)
        masks = images.masks_for_query(query.shape[1], query.dtype, query.device)
        total = None
        for i, scale in enumerate(self.image_scales(images)):
            if scale == 0:
                continue
            part = scale * (self._attend(attn, query, extra[:, i], state, i) * masks[i])
            total = part if total is None else total + part
        return total

    def _attend(
        self,
        attn: Attention,
        query: torch.Tensor,
        tokens: torch.Tensor,
        state: RegionalState | None = None,
        image: int = 0,
    ) -> torch.Tensor:
        def project() -> tuple[torch.Tensor, torch.Tensor]:
            return self.to_k_ip(tokens), self.to_v_ip(tokens)

        if state is None:
            key, value = project()
        else:
            described = ("image tokens", tuple(tokens.shape), tokens.dtype)
            key, value = state.kept(("image", attn, image), described, project)
        # diffusers' IP-Adapter attention applies no per-head norms to the image tokens.
        return multi_head_attention(attn, query, key, value)


# -- Installation and loading -------------------------------------------------------------------

IP_ADAPTER_PROCESSORS = (
    IPAdapterAttnProcessor,
    IPAdapterAttnProcessor2_0,
    IPAdapterXFormersAttnProcessor,
)
"""The processors diffusers' ``load_ip_adapter`` puts on cross-attention layers."""


def masked_ip_adapter(
    context: RegionalContext, object_images: ObjectImageContext
) -> Callable[[Any], RegionalIPAdapterAttnProcessor | None]:
    """A converter for :func:`engine.regional.processors.regional_processors`: each of
    diffusers' IP-Adapter processors becomes a :class:`RegionalIPAdapterAttnProcessor` standing
    in for it (same weights, same scale) for the duration of a Layout call."""

    def convert(processor: Any) -> RegionalIPAdapterAttnProcessor | None:
        if not isinstance(processor, IP_ADAPTER_PROCESSORS):
            return None
        return RegionalIPAdapterAttnProcessor(context, object_images, processor)

    return convert


def ip_adapter_loaded(pipe: RegionalSDXLPipeline) -> bool:
    """Whether an IP-Adapter is loaded into ``pipe``'s UNet (by the engine or by diffusers'
    ``load_ip_adapter``)."""
    unet = pipe.unet
    return (
        getattr(unet, "encoder_hid_proj", None) is not None
        # diffusers sets this as an attribute of the config, which ``get`` does not see.
        and getattr(unet.config, "encoder_hid_dim_type", None) == "ip_image_proj"
    )


@dataclass
class ObjectImageAdapter:
    """An IP-Adapter the engine attached to a pipeline: where it came from and the context its
    processors read during Layout calls."""

    location: ComponentLocation
    images: ObjectImageContext


# -- Per-call object images ------------------------------------------------------------------------


def images_unavailable(layout: Layout, pipe: RegionalSDXLPipeline) -> str | None:
    """Why object images will not act for this Layout (None: they will, or there are none)."""
    used = [i for i, r in enumerate(layout.regions) if r.image is not None and r.image_scale > 0]
    if used and not ip_adapter_loaded(pipe):
        return (
            f"'regions[{used[0]}].image' is an object image, but no IP-Adapter is loaded to "
            "apply it; start the engine with --ip-adapter (or send options.ip_adapter; in "
            "Python, pipe.load_ip_adapter(...)), or remove 'image'"
        )
    return None


@torch.no_grad()
def prepare_object_images(
    pipe: RegionalSDXLPipeline, layout: Layout, guided: bool, own_images: bool = False
) -> tuple[dict[str, Any], ObjectImageState | None]:
    """The pipeline arguments and object-image state for a Layout's object images.

    Returns ``({"ip_adapter_image_embeds": [...]}, state)``; with no IP-Adapter loaded,
    ``({}, None)``. With one loaded, every call needs image embeddings: a Layout without
    images gets a single zero image at scale 0, which no processor computes with, unless
    the call brings its own (``own_images``: ``ip_adapter_image`` or ``ip_adapter_image_embeds``
    given), which then act unmasked, as in diffusers. A Layout with object images refuses them.
    """
    used = [i for i, r in enumerate(layout.regions) if r.image is not None and r.image_scale > 0]
    if not ip_adapter_loaded(pipe):
        reason = images_unavailable(layout, pipe)
        if reason:
            raise LayoutError(reason, f"regions[{used[0]}].image")
        return {}, None
    if own_images:
        if used:
            raise TypeError(
                f"'regions[{used[0]}].image' gives the Layout its object images, so the call "
                "cannot take ip_adapter_image or ip_adapter_image_embeds too; pass the images "
                "as the regions' 'image', or remove them from the Layout"
            )
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
    pipe: RegionalSDXLPipeline, layout: Layout, guided: bool, own_images: bool = False
) -> Iterator[dict[str, Any]]:
    """During a ``with`` block, the Layout's object images act through the IP-Adapter.

    Yields the extra pipeline arguments (empty without an IP-Adapter, or when the call brings
    its own images: see :func:`prepare_object_images`).
    """
    arguments, state = prepare_object_images(pipe, layout, guided, own_images)
    if state is None:
        yield arguments
        return
    with pipe.object_image_context().active(state):
        yield arguments
