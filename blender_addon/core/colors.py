"""Flat colours for the reference render: from a label's colour words, or a linear RGB colour.

The reference render paints every object in one flat sRGB colour; a label that names a colour
("a red vintage car") gets that colour, so the reference agrees with the prompt.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

Rgb = tuple[int, int, int]

BACKGROUND: Rgb = (128, 128, 128)
"""Where no object is: neutral mid grey."""
UNCOLORED: Rgb = (170, 170, 170)
"""An object with no colour word, material colour or viewport colour: a lighter grey, so its
silhouette still stands out from the background."""

COLOR_WORDS: dict[str, Rgb] = {
    "red": (200, 30, 30),
    "crimson": (180, 20, 50),
    "maroon": (120, 20, 30),
    "orange": (235, 120, 20),
    "yellow": (235, 210, 40),
    "gold": (212, 170, 50),
    "golden": (212, 170, 50),
    "green": (40, 160, 50),
    "lime": (140, 220, 40),
    "olive": (110, 120, 40),
    "teal": (20, 128, 128),
    "cyan": (40, 200, 220),
    "turquoise": (60, 200, 190),
    "blue": (40, 70, 200),
    "navy": (20, 30, 100),
    "purple": (120, 50, 160),
    "violet": (140, 80, 200),
    "magenta": (210, 40, 170),
    "pink": (240, 140, 180),
    "brown": (120, 75, 40),
    "beige": (220, 200, 160),
    "tan": (200, 165, 120),
    "white": (240, 240, 240),
    "silver": (190, 190, 195),
    "grey": (110, 110, 110),
    "gray": (110, 110, 110),
    "black": (25, 25, 25),
}
"""sRGB colours for colour words in labels (whole words, case-insensitive)."""

SHADES = {"light": 0.5, "pale": 0.5, "dark": -0.45, "deep": -0.3}
"""Words before a colour that lighten (toward white) or darken (toward black) it."""

_WORD = re.compile(r"[a-z]+")


def prompt_color(prompt: str, words: Mapping[str, Rgb] = COLOR_WORDS) -> Rgb | None:
    """The colour the first colour word of ``prompt`` names (with a shade word before it
    applied), or None when it names none. ``"a car with light blue doors"`` -> light blue."""
    tokens = _WORD.findall(prompt.lower())
    for position, token in enumerate(tokens):
        if token in words:
            color = np.asarray(words[token], dtype=np.float64)
            shade = SHADES.get(tokens[position - 1], 0.0) if position else 0.0
            if shade > 0:
                color = color + (255.0 - color) * shade
            elif shade < 0:
                color = color * (1.0 + shade)
            return tuple(int(v) for v in np.rint(color))
    return None


def linear_to_srgb8(color: Sequence[float]) -> Rgb:
    """A scene-linear RGB colour (Blender's material and object colours) as 8-bit sRGB."""
    linear = np.clip(np.asarray(color[:3], dtype=np.float64), 0.0, 1.0)
    srgb = np.where(linear <= 0.0031308, linear * 12.92, 1.055 * np.power(linear, 1 / 2.4) - 0.055)
    return tuple(int(v) for v in np.rint(srgb * 255.0))


def paint_ids(ids: np.ndarray, colors: Mapping[int, Rgb], default: Rgb = UNCOLORED) -> np.ndarray:
    """An (H, W, 3) uint8 image: each pixel in the colour of its id in ``ids`` (H, W).

    Id 0 is the background (:data:`BACKGROUND` unless ``colors`` says otherwise); ids missing
    from ``colors`` get ``default``.
    """
    top = int(max(ids.max(initial=0), max(colors, default=0)))
    palette = np.empty((top + 1, 3), dtype=np.uint8)
    palette[:] = default
    palette[0] = BACKGROUND
    for index, color in colors.items():
        palette[index] = color
    return palette[ids]
