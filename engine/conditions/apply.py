"""The optional conditions of a Layout call: depth ControlNet and per-object images.

:func:`layout_conditions` is what a ``pipe(layout=...)`` call runs inside: it applies the
pipeline's depth ControlNet (:mod:`engine.conditions.depth`) and IP-Adapter
(:mod:`engine.conditions.object_images`) when they are attached and the Layout uses them, and
does nothing at all otherwise. :func:`check_conditions` refuses, before any work, a Layout
whose object images no IP-Adapter can apply.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from engine.conditions.depth import depth_control
from engine.conditions.object_images import (
    apply_object_images,
    images_unavailable,
    ip_adapter_loaded,
)
from engine.wire.layout import Layout, LayoutError

if TYPE_CHECKING:
    from engine.pipeline import RegionalSDXLPipeline


def check_conditions(layout: Layout, ip_adapter: str | None) -> None:
    """Raise LayoutError if the Layout's object images need an IP-Adapter and none is set.

    A depth map without a ControlNet is no error (the add-on always sends one): it is just not
    used, and the result's ``conditions`` say so.
    """
    used = [i for i, r in enumerate(layout.regions) if r.image is not None and r.image_scale > 0]
    if used and not ip_adapter:
        field = f"regions[{used[0]}].image"
        raise LayoutError(
            f"'{field}' is an object image, but no IP-Adapter is configured to apply it; "
            "start the engine with --ip-adapter (or send options.ip_adapter), or remove 'image'",
            field,
        )


@contextlib.contextmanager
def layout_conditions(
    pipe: RegionalSDXLPipeline, layout: Layout, own_images: bool = False
) -> Iterator[dict[str, Any]]:
    """Depth ControlNet and per-object images for one ``pipe(layout=...)`` call.

    Yields the extra keyword arguments the call needs (image embeddings for the IP-Adapter;
    none when the call brings its own, ``own_images``).
    Without a ControlNet or an IP-Adapter on ``pipe`` this does nothing at all.
    ``RegionalSDXLPipeline`` runs every Layout call inside this; wrapping a call in it again
    for the same Layout changes nothing (the inner one yields no arguments and adds no hook),
    so residuals are never added twice.
    """
    active = pipe.conditioned_layouts
    attached = pipe.depth_controlnet is not None or ip_adapter_loaded(pipe)
    if not attached or any(a is layout for a in active):
        reason = images_unavailable(layout, pipe)
        if reason:
            first = next(i for i, r in enumerate(layout.regions) if r.image and r.image_scale > 0)
            raise LayoutError(reason, f"regions[{first}].image")
        yield {}
        return
    # The pipeline's own test for classifier-free guidance: the image embeddings must match.
    guided = layout.guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None
    pipe.conditioned_layouts = (*active, layout)
    try:
        with (
            depth_control(pipe, layout),
            apply_object_images(pipe, layout, guided, own_images) as extra,
        ):
            yield extra
    finally:
        pipe.conditioned_layouts = active
