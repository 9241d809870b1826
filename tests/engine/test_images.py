"""Reading a Layout's image files: alpha masks, aspect ratios, pixel limits, broken files."""

from __future__ import annotations

import numpy as np
import pytest
from hostile import png_header_only
from PIL import Image

from engine.images import image_size, load_rgb, read_mask
from engine.regional.masks import region_mask
from engine.wire.layout import MAX_INPUT_PIXELS, LayoutError, LimitError, Region


def test_a_region_painted_only_in_alpha_is_read_from_alpha(tmp_path):
    # A black shape on a transparent background: its gray values are 0 everywhere.
    pixels = np.zeros((32, 32, 4), dtype=np.uint8)
    pixels[:, :16, 3] = 255
    Image.fromarray(pixels, "RGBA").save(tmp_path / "alpha.png")
    mask = read_mask(str(tmp_path / "alpha.png"), "regions[0].mask", (32, 32))
    assert mask[:, :16].min() == 1.0 and mask[:, 16:].max() == 0.0

    # Opaque everywhere: the alpha says nothing, the gray values are the mask.
    pixels = np.full((32, 32, 4), 255, dtype=np.uint8)
    pixels[:, 16:, :3] = 0
    Image.fromarray(pixels, "RGBA").save(tmp_path / "opaque.png")
    mask = read_mask(str(tmp_path / "opaque.png"), "regions[0].mask", (32, 32))
    assert mask[:, :16].min() == 1.0 and mask[:, 16:].max() == 0.0

    region = Region("a cat", (0, 0, 1, 1), mask=str(tmp_path / "alpha.png"))
    latent = region_mask(region, 0, (32, 32), (8, 8))
    assert latent[:, :4].min() == 1.0 and latent[:, 4:].max() == 0.0


def test_masks_of_another_aspect_ratio_are_refused_same_aspect_is_resized(tmp_path):
    Image.new("L", (64, 32), 255).save(tmp_path / "wide.png")
    region = Region("a cat", (0, 0, 1, 1), mask=str(tmp_path / "wide.png"))
    with pytest.raises(LayoutError, match="aspect ratio differs") as info:
        region_mask(region, 3, (64, 64), (8, 8))
    assert info.value.field == "regions[3].mask"
    assert read_mask(str(tmp_path / "wide.png"), "m", (16, 32)).shape == (16, 32)
    # Sides rounded to multiples of 8 keep nearly the same ratio: accepted.
    Image.new("L", (1000, 563), 255).save(tmp_path / "render.png")
    assert read_mask(str(tmp_path / "render.png"), "m", (560, 1000)).shape == (560, 1000)


def test_oversized_declared_images_are_refused_before_decoding(tmp_path):

    bomb = tmp_path / "bomb.png"
    png_header_only(bomb, 13000, 13000)
    assert bomb.stat().st_size < 200_000
    for read in (
        lambda: image_size(str(bomb), "reference"),
        lambda: load_rgb(str(bomb), "reference"),
        lambda: read_mask(str(bomb), "reference", (64, 64)),
    ):
        with pytest.raises(LimitError) as info:
            read()
        assert (info.value.limit, info.value.maximum) == ("input_pixels", MAX_INPUT_PIXELS)
        assert info.value.field == "reference"


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not an image at all",
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,
        "truncated",
    ],
)
def test_broken_files_are_layout_errors_naming_the_field(tmp_path, content):
    path = tmp_path / "broken.png"
    if content == "truncated":
        noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(noise).save(path)
        path.write_bytes(path.read_bytes()[:2000])
    else:
        path.write_bytes(content)
    with pytest.raises(LayoutError, match="is not a readable image") as info:
        load_rgb(str(path), "init_image")
    assert info.value.field == "init_image"
    with pytest.raises(LayoutError, match="not a readable image"):
        read_mask(str(path), "regions[0].mask", (64, 64))
    with pytest.raises(LayoutError, match="does not exist"):
        load_rgb(str(tmp_path / "missing.png"), "init_image")
