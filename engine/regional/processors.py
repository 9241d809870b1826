"""Regional processors for the duration of one call, the model's own processors at all other times.

A Layout call needs ``RegionalAttnProcessor`` on the cross-attention (``attn2``) layers of the
UNet (and of a depth ControlNet). diffusers' own methods (``set_default_attn_processor``,
attention slicing, QKV fusion, ``unload_ip_adapter``, saving, ``from_pipe``) check processor
classes exactly or rebuild processors without arguments, so regional processors left on a model
would break them. :func:`regional_processors` therefore installs them on the way into a call and
puts back exactly the processors that were there (the caller's own included) on the way out,
also when the call raises or is cancelled.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from diffusers.models.attention_processor import (
    AttnProcessor,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
    SlicedAttnProcessor,
    XFormersAttnProcessor,
)

from engine.regional.attention import (
    CROSS_ATTENTION_SUFFIX,
    RegionalAttnProcessor,
    RegionalContext,
)

REPLACEABLE_PROCESSORS = (
    AttnProcessor,
    AttnProcessor2_0,
    XFormersAttnProcessor,
    SlicedAttnProcessor,
    FusedAttnProcessor2_0,
    RegionalAttnProcessor,
)
"""Processors that compute plain attention and nothing else, from ``to_q`` / ``to_k`` /
``to_v`` (fused layers keep those too): a regional processor computes what they do, so it may
stand in for them during a call. Sliced attention saves memory mainly on self-attention, which
keeps its processor."""

Converter = Callable[[Any], Any]
"""Turns a processor that does more than plain attention (an IP-Adapter's) into a regional one
doing the same, or returns None when it cannot."""


@contextlib.contextmanager
def regional_processors(
    model: torch.nn.Module, context: RegionalContext, convert: Converter | None = None
) -> Iterator[None]:
    """During a ``with`` block, the cross-attention layers of ``model`` read ``context``.

    Plain processors become ``RegionalAttnProcessor``; others go through ``convert`` (an
    IP-Adapter's become regional ones applying the same images). Self-attention keeps its
    processors. Regional processors already reading ``context`` stay (a call nested inside
    another Layout call, such as a first pass making a layout reference). On the way out every
    layer gets back the processor it had, also when the block raises.

    Raises ValueError naming the layers whose processors can be neither replaced nor
    converted, before changing anything.
    """
    saved = dict(model.attn_processors)
    processors = dict(saved)
    foreign = []
    changed = False
    for name, processor in saved.items():
        if not name.endswith(CROSS_ATTENTION_SUFFIX):
            continue
        if isinstance(processor, RegionalAttnProcessor) and processor.context is context:
            continue
        replacement = convert(processor) if convert is not None else None
        if replacement is None and type(processor) in REPLACEABLE_PROCESSORS:
            replacement = RegionalAttnProcessor(context)
        if replacement is None:
            foreign.append(f"{name} ({type(processor).__name__})")
            continue
        processors[name] = replacement
        changed = True
    if foreign:
        raise ValueError(
            "a Layout call runs its own cross-attention (attn2) processors and cannot combine "
            f"with these: {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}; put "
            "standard processors back for the Layout call (for instance "
            "pipe.unet.set_attn_processor(AttnProcessor2_0())) or call without layout="
        )
    if not changed:
        yield
        return
    model.set_attn_processor(processors)
    try:
        yield
    finally:
        model.set_attn_processor(saved)
