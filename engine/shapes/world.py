"""Synthetic shapes-world scenes: images, captions and per-object boxes, seeded and fast.

A scene holds shapes (circle, square, triangle) in six colours on a plain or gradient neutral
background: 0 to 4 large ones, optionally overlapping in a depth order (a front shape hides part of
a back one), or many small ones on a larger canvas (crowded scenes). Shapes are rasterized with
numpy from signed distances, so their edges are anti-aliased. Captions follow one fixed grammar
that the model's word-level tokenizer covers: ``"a red circle"``, ``"a red circle and a blue
square"``, ``"a red circle, a blue square and a green triangle"``; an empty scene is
``"a plain background"``. Objects are kept in paint order (back to front); captions name them in
a random order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
BACKGROUND_CAPTION = "a plain background"
VOCABULARY = ("a", "and", ",", "plain", "background", *SHAPES, *COLOURS)
"""Every token a caption can contain (the comma is its own token)."""

COUNT_WEIGHTS = (0.10, 0.35, 0.25, 0.15, 0.15)
"""Probability of 0, 1, 2, 3, 4 objects in a training scene: single objects and empty scenes
are frequent so that each phrase is learned on its own and unnamed areas stay empty."""


@dataclass(frozen=True)
class ShapeObject:
    """One shape in a scene; ``box`` is normalized [x0, y0, x1, y1], origin top-left, y down."""

    colour: str
    shape: str
    box: tuple[float, float, float, float]

    @property
    def phrase(self) -> str:
        """The caption phrase for this object, e.g. ``"a red circle"``."""
        return f"a {self.colour} {self.shape}"


@dataclass
class Scene:
    """A rendered scene: HxWx3 uint8 image, its caption and its objects (in caption order)."""

    image: np.ndarray
    caption: str
    objects: list[ShapeObject]


def caption_for(objects: list[ShapeObject]) -> str:
    """The caption naming every object in order, with commas and a final "and"."""
    phrases = [o.phrase for o in objects]
    if not phrases:
        return BACKGROUND_CAPTION
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def sample_objects(
    rng: np.random.Generator,
    count: int,
    *,
    min_size: float | None = None,
    max_size: float | None = None,
    distinct_colours: bool = False,
    margin: float = 0.04,
    overlap: bool = False,
) -> list[ShapeObject]:
    """Draw ``count`` objects with square boxes inside the frame, in paint order.

    Sizes are fractions of the image side; the defaults shrink with the count so four objects
    still fit. ``distinct_colours`` gives every object its own colour (unambiguous scoring).
    Without ``overlap`` boxes keep ``margin`` apart; with it, each new box must overlap at
    least one earlier box while hiding at most 40% of any of them, so later (front) objects
    partly cover earlier (back) ones and every object stays recognisable.
    """
    if not 0 <= count <= 4:
        raise ValueError(f"a shapes-world scene holds 0 to 4 objects, got {count}")
    if min_size is None:
        min_size = 0.30 if count <= 2 else 0.24
    if max_size is None:
        max_size = (0.50, 0.50, 0.44, 0.36, 0.32)[count]
    colours = _colours(rng, count, distinct_colours)
    for _attempt in range(200):
        boxes: list[tuple[float, float, float, float]] = []
        for _ in range(count):
            for _try in range(100):
                size = float(rng.uniform(min_size, max_size))
                x0 = float(rng.uniform(0.02, 0.98 - size))
                y0 = float(rng.uniform(0.02, 0.98 - size))
                box = (x0, y0, x0 + size, y0 + size)
                if _fits(box, boxes, margin, overlap):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == count:
            shapes = rng.choice(SHAPES, size=count)
            return [
                ShapeObject(str(c), str(s), b)
                for c, s, b in zip(colours, shapes, boxes, strict=True)
            ]
        min_size, max_size = min_size * 0.95, max_size * 0.95
    raise RuntimeError(f"could not place {count} objects without overlap")


def crowded_objects(
    rng: np.random.Generator,
    count: int,
    *,
    min_size: float,
    max_size: float,
    distinct_colours: bool = False,
) -> list[ShapeObject]:
    """Draw ``count`` small non-overlapping objects, one per cell of a jittered grid.

    Sizes are fractions of the image side, clipped to the grid cell so any count fits; colours
    and shapes repeat once ``count`` passes the 18 colour-shape pairs.
    """
    if count < 0:
        raise ValueError(f"a scene holds 0 or more objects, got {count}")
    columns = max(1, math.ceil(math.sqrt(count)))
    rows = max(1, math.ceil(count / columns))
    cells = rng.permutation(rows * columns)[:count]
    cell_w, cell_h = 0.96 / columns, 0.96 / rows
    colours = _colours(rng, count, distinct_colours and count <= len(COLOURS))
    shapes = rng.choice(SHAPES, size=count)
    objects = []
    for colour, shape, cell in zip(colours, shapes, cells, strict=True):
        row, column = divmod(int(cell), columns)
        size = min(float(rng.uniform(min_size, max_size)), 0.9 * min(cell_w, cell_h))
        x0 = 0.02 + column * cell_w + float(rng.uniform(0, cell_w - size))
        y0 = 0.02 + row * cell_h + float(rng.uniform(0, cell_h - size))
        objects.append(ShapeObject(str(colour), str(shape), (x0, y0, x0 + size, y0 + size)))
    return objects


def _colours(rng: np.random.Generator, count: int, distinct: bool) -> list[str]:
    names = list(COLOURS)
    return list(rng.choice(names, size=count, replace=not distinct))


def _fits(box: tuple[float, ...], others: list[tuple[float, ...]], margin: float, overlap: bool):
    if not overlap:
        return all(not _overlaps(box, other, margin) for other in others)
    if not others:
        return True
    hidden = [_intersection(box, other) / _area(other) for other in others]
    return 0.08 < max(hidden) <= 0.4


def _intersection(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _area(box: tuple[float, ...]) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


def _overlaps(a: tuple[float, ...], b: tuple[float, ...], margin: float) -> bool:
    return not (
        a[2] + margin <= b[0]
        or b[2] + margin <= a[0]
        or a[3] + margin <= b[1]
        or b[3] + margin <= a[1]
    )


def render(
    objects: list[ShapeObject],
    size: int = 64,
    rng: np.random.Generator | None = None,
    background: np.ndarray | None = None,
) -> np.ndarray:
    """Rasterize objects over a neutral background; returns ``size`` x ``size`` x 3 uint8.

    With an ``rng``, the background (plain or gradient grey) and a small per-object colour
    jitter are random; without one, the background is a flat mid grey and colours are exact.
    """
    if background is None:
        background = random_background(rng, size) if rng is not None else _flat(size, 180.0)
    canvas = background.astype(np.float32)
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size * size  # pixel centres, in pixels
    ys, xs = np.meshgrid(centres, centres, indexing="ij")
    for obj in objects:
        colour = np.array(COLOURS[obj.colour], dtype=np.float32)
        if rng is not None:
            colour = np.clip(colour + rng.uniform(-12, 12, size=3), 0, 255)
        alpha = shape_coverage(obj.shape, obj.box, xs, ys, size)
        canvas = canvas * (1 - alpha[..., None]) + colour * alpha[..., None]
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def shape_coverage(
    shape: str, box: tuple[float, float, float, float], xs: np.ndarray, ys: np.ndarray, size: int
) -> np.ndarray:
    """Anti-aliased coverage (0..1) of a shape inscribed in ``box`` at pixel centres xs, ys."""
    x0, y0, x1, y1 = (v * size for v in box)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    hw, hh = (x1 - x0) / 2, (y1 - y0) / 2
    if shape == "circle":
        dist = np.hypot((xs - cx) / hw, (ys - cy) / hh) * min(hw, hh) - min(hw, hh)
    elif shape == "square":
        dist = np.maximum(np.abs(xs - cx) - hw, np.abs(ys - cy) - hh)
    elif shape == "triangle":
        # Apex at the top centre, base along the bottom edge: three half-planes.
        dist = np.maximum(ys - y1, _edge(xs, ys, (cx, y0), (x0, y1)))
        dist = np.maximum(dist, _edge(xs, ys, (x1, y1), (cx, y0)))
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")
    return np.clip(0.5 - dist, 0.0, 1.0)


def visible_masks(objects: list[ShapeObject], size: int) -> np.ndarray:
    """Occlusion-aware masks ``(len(objects), size, size)`` in 0..1, objects in paint order.

    Each object's silhouette minus what the objects painted after it cover: what the add-on's
    object-index render gives for proxies shaped like the objects.
    """
    centres = np.arange(size, dtype=np.float32) + 0.5
    ys, xs = np.meshgrid(centres, centres, indexing="ij")
    masks = np.zeros((len(objects), size, size), dtype=np.float32)
    uncovered = np.ones((size, size), dtype=np.float32)
    for i in range(len(objects) - 1, -1, -1):
        # Alpha compositing, as ``render`` paints: what each object shows through those after it.
        coverage = shape_coverage(objects[i].shape, objects[i].box, xs, ys, size)
        masks[i] = coverage * uncovered
        uncovered *= 1.0 - coverage
    return masks


def _edge(xs: np.ndarray, ys: np.ndarray, p: tuple[float, float], q: tuple[float, float]):
    """Signed distance to the line p->q, positive on its right-hand side (outside, y down)."""
    dx, dy = q[0] - p[0], q[1] - p[1]
    length = float(np.hypot(dx, dy))
    return ((xs - p[0]) * dy - (ys - p[1]) * dx) / length * -1.0


def _flat(size: int, level: float) -> np.ndarray:
    return np.full((size, size, 3), level, dtype=np.float32)


def random_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A plain or linear-gradient neutral grey background (float32, 0..255)."""
    tint = rng.uniform(-4, 4, size=3).astype(np.float32)
    low = float(rng.uniform(140, 235))
    if rng.random() < 0.5:
        return _flat(size, low) + tint
    high = float(np.clip(low + rng.uniform(-50, 50), 120, 245))
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    t = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None] + 0.5
    return (low + (high - low) * t)[..., None] + tint


def random_scene(
    rng: np.random.Generator, size: int = 64, count: int | None = None, **kwargs
) -> Scene:
    """One random scene; ``count`` defaults to a draw from ``COUNT_WEIGHTS``."""
    if count is None:
        count = int(rng.choice(len(COUNT_WEIGHTS), p=COUNT_WEIGHTS))
    objects = sample_objects(rng, count, **kwargs)
    return _scene(rng, objects, size)


def crowded_scene(rng: np.random.Generator, size: int, count: int, **kwargs) -> Scene:
    """One scene of ``count`` small objects (see ``crowded_objects``)."""
    return _scene(rng, crowded_objects(rng, count, **kwargs), size)


def _scene(rng: np.random.Generator, objects: list[ShapeObject], size: int) -> Scene:
    named = [objects[i] for i in rng.permutation(len(objects))]
    return Scene(render(objects, size, rng), caption_for(named), objects)


def scene_batch(
    rng: np.random.Generator,
    batch: int,
    size: int = 64,
    *,
    overlap: float = 0.0,
    crowd: tuple[int, int] | None = None,
) -> tuple[np.ndarray, list[str], list[list[ShapeObject]]]:
    """``batch`` random scenes stacked as an NxHxWx3 uint8 array, with captions and objects.

    ``overlap`` is the share of scenes whose objects overlap in depth order; ``crowd`` =
    (fewest, most) makes every scene a crowded one with that many small objects.
    """
    if crowd is not None:
        scenes = [
            crowded_scene(
                rng,
                size,
                int(rng.integers(crowd[0], crowd[1] + 1)),
                min_size=16 / size,
                max_size=40 / size,
            )
            for _ in range(batch)
        ]
    else:
        scenes = [
            random_scene(rng, size, overlap=bool(overlap and rng.random() < overlap))
            for _ in range(batch)
        ]
    return (
        np.stack([s.image for s in scenes]),
        [s.caption for s in scenes],
        [s.objects for s in scenes],
    )
