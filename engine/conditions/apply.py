"""The optional conditions of a Layout call: depth ControlNet and per-region reference images.

:func:`layout_conditions` is what a ``pipe(layout=...)`` call runs inside: it applies the
pipeline's depth ControlNet (``engine.controlnet``) and IP-Adapter (``engine.ip_adapter``) when
they are attached and the Layout uses them, and does nothing at all otherwise.
:func:`conditions_used` says which acted, for results and provenance; :func:`check_conditions`
refuses, before any work, a Layout whose region images no IP-Adapter can apply.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from engine.wire.layout import Layout, LayoutError


def check_conditions(layout: Layout, ip_adapter: str | None) -> None:
    """Raise LayoutError if the Layout's region images need an IP-Adapter and none is set.

    A depth map without a ControlNet is no error (the add-on always sends one): it is just not
    used, and the result's ``conditions`` say so.
    """
    used = [i for i, r in enumerate(layout.regions) if r.image is not None and r.image_scale > 0]
    if used and not ip_adapter:
        field = f"regions[{used[0]}].image"
        raise LayoutError(
            f"'{field}' is a reference image, but no IP-Adapter is configured to apply it; "
            "start the engine with --ip-adapter (or send options.ip_adapter), or remove 'image'",
            field,
        )


def conditions_used(pipe: Any, layout: Layout) -> dict[str, Any]:
    """Which optional conditions act on ``layout`` with ``pipe``, for results and provenance.

    ``controlnet``: the depth ControlNet's spec and settings, or None; ``ip_adapter``: the
    IP-Adapter's spec and how many region images it applies, or None; ``reference``: where
    the reference guidance's image comes from (``source``: ``file``, ``gligen`` with the GLIGEN
    ``model``, or ``first_pass``) and its settings, or None.
    """
    from engine.controlnet import depth_unavailable
    from engine.guidance import reference_source
    from engine.ip_adapter import images_unavailable

    used: dict[str, Any] = {"controlnet": None, "ip_adapter": None, "reference": None}
    controlnet = getattr(pipe, "depth_controlnet", None)
    if depth_unavailable(layout, controlnet) is None:
        used["controlnet"] = {
            "model": pipe.depth_controlnet_location.spec,
            "scale": layout.depth_scale,
            "start": layout.depth_start,
            "end": layout.depth_end,
            "region_scales": [r.depth_scale for r in layout.regions],
        }
    adapter = getattr(pipe, "reference_adapter", None)
    images = [r for r in layout.regions if r.image is not None and r.image_scale > 0]
    if adapter is not None and images and images_unavailable(layout, pipe) is None:
        used["ip_adapter"] = {"model": adapter.location.spec, "images": len(images)}
    source = reference_source(pipe, layout)
    if source is not None:
        used["reference"] = {
            "source": source,
            "scale": layout.reference_scale,
            "fraction": layout.reference_fraction,
        }
        if source == "gligen":
            used["reference"]["model"] = pipe.gligen_location.spec
    return used


@contextlib.contextmanager
def layout_conditions(pipe: Any, layout: Layout) -> Iterator[dict[str, Any]]:
    """Depth ControlNet and per-region reference images for one ``pipe(layout=...)`` call.

    Yields the extra keyword arguments the call needs (image embeddings for the IP-Adapter).
    Without a ControlNet or an IP-Adapter on ``pipe`` this does nothing at all.
    ``RegionalSDXLPipeline`` runs every Layout call inside this; wrapping a call in it again
    for the same Layout changes nothing (the inner one yields no arguments and adds no hook),
    so residuals are never added twice.
    """
    from engine.controlnet import depth_control
    from engine.ip_adapter import images_unavailable, reference_images

    active: list[Layout] = pipe.__dict__.setdefault("_conditioned_layouts", [])
    attached = (getattr(pipe, name, None) for name in ("depth_controlnet", "reference_adapter"))
    if all(model is None for model in attached) or any(a is layout for a in active):
        reason = images_unavailable(layout, pipe)
        if reason:
            first = next(i for i, r in enumerate(layout.regions) if r.image and r.image_scale > 0)
            raise LayoutError(reason, f"regions[{first}].image")
        yield {}
        return
    # The pipeline's own test for classifier-free guidance: the image embeddings must match.
    guided = layout.guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None
    active.append(layout)
    try:
        with depth_control(pipe, layout), reference_images(pipe, layout, guided) as extra:
            yield extra
    finally:
        del active[next(i for i, a in enumerate(active) if a is layout)]
