"""Score how well an image follows a shapes-world layout, by colour segmentation.

Each pixel that is saturated enough is given the palette colour with the nearest hue; the grey
backgrounds of the shapes world fall below the saturation floor. An object of colour ``c`` in box
``b`` counts as *placed* when enough ``c`` pixels exist and their centroid lies inside ``b`` or
their bounding box overlaps ``b`` with IoU >= 0.5. *Coverage* is the fraction of ``b`` covered by
``c``; *bleed* is the fraction of all ``c`` pixels lying outside ``b``.

The same module gives a generic detection interface (``Detection``, ``ColourDetector``) and
``mean_average_precision`` (VOC/COCO-style AP at IoU 0.5), so an object detector for real
images can stand in for the colour detector in the layout-fidelity benchmark.

Shapes are told apart from the colour blob (``classify_shape``): a square fills its bounding box,
a circle fills about pi/4 of it, and the world's triangles (apex up) fill half of it with only a
quarter of their pixels in the top half. Crowded scenes repeat colours, so they are scored box by
box (``score_box``): the box must hold enough of its colour and that colour must dominate it.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.shapes.world import COLOURS

Box = tuple[float, float, float, float]

MIN_SATURATION = 0.35
MIN_VALUE = 0.25
MAX_HUE_DISTANCE = 30.0
"""Degrees: a saturated pixel further than this from every palette hue gets no colour."""
MIN_AREA_FRACTION = 0.15
"""Pixels of the object's colour needed to count it present, as a fraction of its box area."""

_NAMES = list(COLOURS)
_HUES = np.array([colorsys.rgb_to_hsv(*(c / 255 for c in COLOURS[n]))[0] * 360 for n in _NAMES])


@dataclass
class ObjectScore:
    """How one requested object turned out."""

    colour: str
    box: Box
    placed: bool
    coverage: float
    bleed: float
    iou: float
    pixels: int


@dataclass
class BoxScore:
    """How one requested object turned out, judged inside its own box only."""

    colour: str
    box: Box
    placed: bool
    share: float
    """Fraction of the box's coloured pixels that are the object's colour."""
    shape: str | None


@dataclass
class Detection:
    """One detected object: its label, normalized box and confidence."""

    label: str
    box: Box
    score: float


def colour_labels(image: np.ndarray) -> np.ndarray:
    """Per-pixel palette index (into ``COLOURS``' order), or -1 for uncoloured pixels."""
    rgb = image[..., :3].astype(np.float32) / 255.0
    cmax, cmin = rgb.max(-1), rgb.min(-1)
    delta = cmax - cmin
    saturation = np.where(cmax > 0, delta / np.maximum(cmax, 1e-6), 0.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.maximum(delta, 1e-6)
    hue = (
        np.select(
            [cmax == r, cmax == g],
            [((g - b) / safe) % 6, (b - r) / safe + 2],
            (r - g) / safe + 4,
        )
        * 60.0
    )
    diff = np.abs(hue[..., None] - _HUES)
    diff = np.minimum(diff, 360 - diff)
    nearest = diff.argmin(-1)
    ok = (saturation >= MIN_SATURATION) & (cmax >= MIN_VALUE) & (diff.min(-1) <= MAX_HUE_DISTANCE)
    return np.where(ok, nearest, -1)


def colour_mask(image: np.ndarray, colour: str, labels: np.ndarray | None = None) -> np.ndarray:
    """Boolean HxW mask of the pixels classified as ``colour``."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; the shapes world has {_NAMES}")
    if labels is None:
        labels = colour_labels(image)
    return labels == _NAMES.index(colour)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two [x0, y0, x1, y1] boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def mask_box(mask: np.ndarray) -> Box | None:
    """Normalized bounding box of a mask's pixels, trimmed of the outer 1% stray pixels."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    h, w = mask.shape
    x0, x1 = np.percentile(xs, [1, 99])
    y0, y1 = np.percentile(ys, [1, 99])
    return (x0 / w, y0 / h, (x1 + 1) / w, (y1 + 1) / h)


def _pixel_box(box: Box, h: int, w: int) -> tuple[int, int, int, int]:
    return (
        int(round(box[0] * w)),
        int(round(box[1] * h)),
        int(round(box[2] * w)),
        int(round(box[3] * h)),
    )


def score_object(image: np.ndarray, colour: str, box: Box, labels: np.ndarray | None = None):
    """Score one requested object (``colour`` inside ``box``) on an HxWx3 uint8 image."""
    mask = colour_mask(image, colour, labels)
    h, w = mask.shape
    x0, y0, x1, y1 = _pixel_box(box, h, w)
    area = max(1, (x1 - x0) * (y1 - y0))
    inside = int(mask[y0:y1, x0:x1].sum())
    total = int(mask.sum())
    found = mask_box(mask)
    iou = box_iou(found, box) if found else 0.0
    placed = False
    if total >= max(4, MIN_AREA_FRACTION * area):
        ys, xs = np.nonzero(mask)
        cx, cy = (xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h
        centred = box[0] <= cx <= box[2] and box[1] <= cy <= box[3]
        placed = centred or iou >= 0.5
    return ObjectScore(
        colour=colour,
        box=tuple(box),
        placed=placed,
        coverage=inside / area,
        bleed=(total - inside) / total if total else 0.0,
        iou=iou,
        pixels=total,
    )


SQUARE_FILL = 0.88
"""A blob filling at least this much of its bounding box is a square (a circle fills 0.79)."""
TRIANGLE_FILL = 0.64
TRIANGLE_TOP = 0.38
"""An apex-up triangle fills half its bounding box and has a quarter of its pixels on top."""


def classify_shape(mask: np.ndarray, box: Box, margin: float = 0.15) -> str | None:
    """``"circle"``, ``"square"`` or ``"triangle"`` for the pixels of ``mask`` near ``box``.

    The blob is the mask inside ``box`` grown by ``margin`` of its size; None when it has too
    few pixels to tell (fewer than 12).
    """
    h, w = mask.shape
    grow_x, grow_y = margin * (box[2] - box[0]), margin * (box[3] - box[1])
    x0, y0, x1, y1 = _pixel_box(
        (box[0] - grow_x, box[1] - grow_y, box[2] + grow_x, box[3] + grow_y), h, w
    )
    blob = mask[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)]
    ys, xs = np.nonzero(blob)
    if len(xs) < 12:
        return None
    # Rows and columns with a stray pixel or two do not widen the blob (generated images).
    rows = np.nonzero(np.bincount(ys) > 1)[0]
    cols = np.nonzero(np.bincount(xs) > 1)[0]
    if not len(rows) or not len(cols):
        return None
    top, bottom, left, right = rows[0], rows[-1], cols[0], cols[-1]
    area = (bottom - top + 1) * (right - left + 1)
    fill = len(xs) / area
    upper = float(np.mean(ys < (top + bottom + 1) / 2))
    if upper < TRIANGLE_TOP or fill < TRIANGLE_FILL:
        return "triangle"
    return "square" if fill >= SQUARE_FILL else "circle"


def score_box(
    image: np.ndarray, colour: str, box: Box, labels: np.ndarray | None = None
) -> BoxScore:
    """Score one object by its box alone: placed when its colour covers at least
    ``MIN_AREA_FRACTION`` of the box and is the box's most frequent colour."""
    if labels is None:
        labels = colour_labels(image)
    h, w = labels.shape
    x0, y0, x1, y1 = _pixel_box(box, h, w)
    inside = labels[y0:y1, x0:x1]
    area = max(1, inside.size)
    counts = np.bincount(inside[inside >= 0], minlength=len(_NAMES))
    own = int(counts[_NAMES.index(colour)])
    placed = own >= max(4, MIN_AREA_FRACTION * area) and own == counts.max()
    shape = classify_shape(labels == _NAMES.index(colour), box, margin=0.0) if placed else None
    return BoxScore(colour, tuple(box), placed, own / max(1, int(counts.sum())), shape)


def score_layout(image: np.ndarray, objects: Sequence[tuple[str, Box]]) -> list[ObjectScore]:
    """Score every (colour, box) of a layout on one image."""
    labels = colour_labels(image)
    return [score_object(image, colour, box, labels) for colour, box in objects]


def phrase_colour(phrase: str) -> str:
    """The palette colour named in a phrase such as ``"a red circle"``."""
    for word in phrase.lower().replace(",", " ").split():
        if word in COLOURS:
            return word
    raise ValueError(f"{phrase!r} names none of the shapes-world colours {_NAMES}")


class ColourDetector:
    """A detector for the shapes world: one detection per requested label's colour.

    It follows the generic detector interface used by the benchmark:
    ``detector(image, labels) -> list[Detection]``.
    """

    def __call__(self, image: np.ndarray, labels: Sequence[str]) -> list[Detection]:
        pixel_labels = colour_labels(image)
        h, w = pixel_labels.shape
        detections = []
        for label in dict.fromkeys(labels):
            mask = colour_mask(image, phrase_colour(label), pixel_labels)
            box = mask_box(mask)
            if box is not None and mask.sum() >= 4:
                detections.append(Detection(label, box, float(mask.sum()) / (h * w)))
        return detections


def average_precision(
    detections: Sequence[tuple[int, Detection]],
    truths: Sequence[tuple[int, Box]],
    iou_threshold: float = 0.5,
) -> float:
    """All-point interpolated AP for one class; items are tagged with their image index."""
    if not truths:
        return float("nan")
    unmatched = {}
    for image_index, box in truths:
        unmatched.setdefault(image_index, []).append(box)
    hits = []
    for image_index, det in sorted(detections, key=lambda d: -d[1].score):
        candidates = unmatched.get(image_index, [])
        ious = [box_iou(det.box, box) for box in candidates]
        best = int(np.argmax(ious)) if ious else -1
        if best >= 0 and ious[best] >= iou_threshold:
            candidates.pop(best)
            hits.append(1.0)
        else:
            hits.append(0.0)
    if not hits:
        return 0.0
    tp = np.cumsum(hits)
    recall = tp / len(truths)
    precision = tp / np.arange(1, len(hits) + 1)
    # Precision envelope, then area under the step curve.
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    recall = np.concatenate([[0.0], recall])
    return float(np.sum((recall[1:] - recall[:-1]) * precision))


def mean_average_precision(
    detections: Sequence[Sequence[Detection]],
    truths: Sequence[Sequence[tuple[str, Box]]],
    iou_threshold: float = 0.5,
) -> float:
    """mAP at ``iou_threshold`` over the labels present in the ground truth of all images."""
    per_label_det: dict[str, list] = {}
    per_label_true: dict[str, list] = {}
    for index, (dets, gts) in enumerate(zip(detections, truths, strict=True)):
        for det in dets:
            per_label_det.setdefault(det.label, []).append((index, det))
        for label, box in gts:
            per_label_true.setdefault(label, []).append((index, box))
    aps = [
        average_precision(per_label_det.get(label, []), gts, iou_threshold)
        for label, gts in per_label_true.items()
    ]
    return float(np.mean(aps)) if aps else float("nan")
