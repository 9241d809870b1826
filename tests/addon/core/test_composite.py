"""Object layers over the proxy render: fitting into boxes, alpha and masks, order, resampling."""

from __future__ import annotations

import numpy as np
import pytest

from blender_addon.core.composite import (
    Layer,
    composite_layers,
    fit_rect,
    resize,
)
from blender_addon.core.png import read_rgb_png, write_rgb_png

GREY = (128, 128, 128)
GREEN = (0, 200, 0)
RED = (220, 0, 0)
BLUE = (0, 0, 230)


def canvas(width: int = 8, height: int = 8, color=GREY) -> np.ndarray:
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = color
    return image


def rgba(color, alpha: int = 255) -> list[int]:
    return [*color, alpha]


def test_fit_keeps_the_aspect_ratio_and_centres_in_the_box():
    # A 2:1 image in a square box of 20x20 pixels at (10, 10): full width, centred rows.
    assert fit_rect((40, 20), (10 / 64, 10 / 64, 30 / 64, 30 / 64), 64, 64) == (10, 15, 30, 25)
    # A 1:3 image in a wide box fills its height and sits in the middle.
    assert fit_rect((10, 30), (0.0, 0.5, 1.0, 1.0), 100, 60) == (45, 30, 55, 60)
    # The box is normalized to the canvas, not to a square: 0.5 x 1.0 of 80x40 is 40x40.
    assert fit_rect((1, 1), (0.0, 0.0, 0.5, 1.0), 80, 40) == (0, 0, 40, 40)
    # However small, a layer covers a pixel.
    c0, r0, c1, r1 = fit_rect((1000, 1), (0.0, 0.0, 0.1, 0.1), 10, 10)
    assert (c1 - c0, r1 - r0) == (1, 1)
    with pytest.raises(ValueError, match="needs pixels"):
        fit_rect((0, 5), (0, 0, 1, 1), 8, 8)


def test_layer_lands_in_its_box_and_alpha_zero_shows_the_proxy_render():
    # 4x2 layer: left half opaque green, right half transparent red (which must not show).
    image = np.array([[rgba(GREEN), rgba(GREEN), rgba(RED, 0), rgba(RED, 0)]] * 2, np.uint8)
    # Box: pixels 2..6 both ways; the layer fits as 4x2, rows 3..5.
    out = composite_layers(canvas(), [Layer(image, (0.25, 0.25, 0.75, 0.75))])
    expected = canvas()
    expected[3:5, 2:4] = GREEN
    assert (out == expected).all()


def test_occluded_part_shows_what_covers_it():
    image = np.full((2, 4, 4), 255, dtype=np.uint8)
    image[..., :3] = GREEN
    background = canvas()
    background[:, 3] = BLUE  # an occluder in the proxy render
    mask = np.full((8, 8), 255, dtype=np.uint8)
    mask[:, 3] = 0  # ... which the object's visible mask leaves out
    out = composite_layers(background, [Layer(image, (0.25, 0.25, 0.75, 0.75), mask)])
    expected = background.copy()
    expected[3:5, [2, 4, 5]] = GREEN
    assert (out == expected).all()


def test_a_soft_mask_blends_and_a_full_mask_size_is_required():
    image = np.full((1, 1, 4), 255, dtype=np.uint8)
    image[..., :3] = (255, 255, 255)
    mask = np.zeros((2, 2), dtype=np.uint8)
    mask[0, 0] = 128  # about half visible
    out = composite_layers(canvas(2, 2, (0, 0, 0)), [Layer(image, (0, 0, 0.5, 0.5), mask)])
    assert tuple(out[0, 0]) == (128, 128, 128) and not out[1:, :].any() and not out[:, 1].any()
    with pytest.raises(ValueError, match="the mask is 3x2, the canvas 2x2"):
        composite_layers(canvas(2, 2), [Layer(image, (0, 0, 1, 1), np.zeros((2, 3), np.uint8))])
    with pytest.raises(ValueError, match=r"layer 0: the image must be \(h, w, 3\)"):
        composite_layers(canvas(2, 2), [Layer(np.zeros((2, 2)), (0, 0, 1, 1))])


def test_layers_go_back_to_front_whatever_order_they_are_listed_in():
    near = np.array([[rgba(RED)]], dtype=np.uint8)
    far = np.array([[rgba(BLUE)]], dtype=np.uint8)
    layers = [
        Layer(near, (0.0, 0.0, 0.75, 0.75), distance=2.0),
        Layer(far, (0.25, 0.25, 1.0, 1.0), distance=5.0),
    ]
    out = composite_layers(canvas(), layers)
    assert tuple(out[4, 4]) == RED, "the nearer object covers the farther one"
    assert tuple(out[7, 7]) == BLUE and tuple(out[0, 0]) == RED
    assert (composite_layers(canvas(), layers[::-1]) == out).all()
    # An RGB layer is opaque.
    out = composite_layers(canvas(), [Layer(np.full((1, 1, 3), 7, np.uint8), (0, 0, 1, 1))])
    assert (out == 7).all()


def test_shrinking_averages_and_keeps_edges_at_whole_factors():
    # 8x4 into a 4x2 place: green | red halves stay sharp, a checkerboard turns grey.
    halves = np.zeros((4, 8, 3))
    halves[:, :4], halves[:, 4:] = GREEN, RED
    small = resize(halves, 2, 4)
    assert (small[:, :2] == GREEN).all() and (small[:, 2:] == RED).all()
    checker = (np.indices((4, 8)).sum(axis=0) % 2 * 255.0)[..., None]
    assert np.allclose(resize(checker, 2, 4), 127.5)
    # A third: each output pixel averages 1.5 source pixels by overlap.
    row = np.array([[[0.0], [30.0], [60.0]]])
    assert np.allclose(resize(row, 1, 2)[0, :, 0], [10.0, 50.0])


def test_enlarging_interpolates_linearly_and_clamps_at_the_edges():
    row = np.array([[[0.0], [255.0]]])
    assert np.allclose(resize(row, 1, 4)[0, :, 0], [0.0, 63.75, 191.25, 255.0])


def test_transparent_pixels_do_not_bleed_their_colour_into_resampled_edges():
    # Opaque red beside transparent green, shrunk to one pixel over black: half red, no green.
    image = np.array([[rgba(RED), rgba(GREEN, 0)]], dtype=np.uint8)
    out = composite_layers(canvas(1, 1, (0, 0, 0)), [Layer(image, (0, 0, 1, 1))])
    assert tuple(out[0, 0]) == (110, 0, 0)


def test_proxy_render_png_reads_back(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    write_rgb_png(tmp_path / "reference.png", image)
    assert (read_rgb_png(str(tmp_path / "reference.png")) == image).all()
    (tmp_path / "not.png").write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match="is not a PNG file"):
        read_rgb_png(str(tmp_path / "not.png"))
