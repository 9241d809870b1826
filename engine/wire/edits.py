"""Layout edits both sides make: the same change, written once."""

from __future__ import annotations

import dataclasses

from .layout import Layout, LayoutError


def regenerate_layout(layout: Layout, region: int | str, previous_image: str, seed: int) -> Layout:
    """A Layout re-generating one region of ``previous_image`` (an absolute path) with a new
    ``seed``: that region at strength 1, everything else kept, pixels outside it exact.

    ``region`` is the region's index or its ``name``.
    """
    if isinstance(region, str):
        found = [i for i, r in enumerate(layout.regions) if r.name == region]
        if len(found) != 1:
            names = [r.name for r in layout.regions]
            raise LayoutError(
                f"{'no' if not found else 'more than one'} region is named {region!r} "
                f"(names: {names}); pass the region's index instead",
                "regions",
            )
        index = found[0]
    else:
        index = region
        if not 0 <= index < len(layout.regions):
            raise LayoutError(
                f"no region {index}: the Layout has {len(layout.regions)} regions", "regions"
            )
    regions = [
        dataclasses.replace(r, strength=1.0 if i == index else None)
        for i, r in enumerate(layout.regions)
    ]
    changed = dataclasses.replace(
        layout,
        regions=regions,
        init_image=previous_image,
        strength=0.0,
        keep_outside=True,
        seed=seed,
    )
    return Layout.from_dict(changed.to_dict())
