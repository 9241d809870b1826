"""Layout edits both sides make: the same change, written once."""

from __future__ import annotations

import dataclasses

from .layout import MIN_SIZE, SIZE_MULTIPLE, Layout, LayoutError

FIRST_PASS_FACTOR = 0.5
"""Side length of the two-pass mode's first pass, relative to the Layout's."""


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


def first_pass_layout(layout: Layout, factor: float = FIRST_PASS_FACTOR) -> Layout:
    """The Layout of the two-pass mode's first pass: ``factor`` times smaller (sides kept
    multiples of 8, at least 64), in attention mode (the cheapest), with no reference pull
    and no init image."""

    def side(value: int) -> int:
        scaled = round(value * factor / SIZE_MULTIPLE) * SIZE_MULTIPLE
        return min(value, max(MIN_SIZE, scaled))

    return dataclasses.replace(
        layout,
        width=side(layout.width),
        height=side(layout.height),
        mode="attention",
        reference=None,
        reference_scale=0.0,
        init_image=None,
        strength=1.0,
        keep_outside=False,
        regions=[dataclasses.replace(region, strength=None) for region in layout.regions],
    )
