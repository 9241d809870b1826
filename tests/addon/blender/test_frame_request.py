"""The one frame-request builder: settings, conditions, reference and init images reach the Layout
sent.
"""

from __future__ import annotations

import os
import struct

import addon_guidance_scenarios
import numpy as np

# Fixtures: one scenario run checked by several test files.
guidance = addon_guidance_scenarios.guidance
rendered_init = addon_guidance_scenarios.rendered_init


def png_header(path: str) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) of a PNG file."""
    with open(path, "rb") as handle:
        head = handle.read(26)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", path
    return struct.unpack(">IIBB", head[16:26])


def test_settings_flow_into_the_layout_sent(guidance, tiny_controlnet_dir, tiny_ip_adapter_dir):
    sent = guidance["sent"]["layout"]
    assert sent["mode"] == "latent"
    assert (sent["reference_scale"], sent["reference_fraction"]) == (0.3, 0.2)
    assert (sent["depth_scale"], sent["depth_start"], sent["depth_end"]) == (0.8, 0.1, 0.9)
    assert sent["strength"] == 0.6 and sent["keep_outside"] is False
    regions = {r["name"]: r for r in sent["regions"]}
    assert (regions["red_box"]["strength"], regions["blue_ball"]["strength"]) == (0.25, 1.0)
    assert (regions["red_box"]["depth_scale"], regions["blue_ball"]["depth_scale"]) == (None, 0.4)
    assert regions["red_box"]["image_scale"] == 0.7 and regions["blue_ball"]["image"] is None
    assert guidance["sent"]["options"] == {
        "controlnet": tiny_controlnet_dir,
        "ip_adapter": tiny_ip_adapter_dir,
        "gligen": None,
    }
    # The Layout file next to the result says the same, paths relative to its folder.
    assert guidance["saved_matches_sent"] is True


def test_pull_toward_an_engine_pass_sends_no_proxy_render_and_gligen_makes_it(
    guidance, tiny_gligen_dir
):
    engine_pass = guidance["engine_pass"]
    assert engine_pass["operator"] == ["FINISHED"], engine_pass["reports"]
    assert engine_pass["reference"] is None and engine_pass["reference_scale"] == 0.3
    assert engine_pass["options"]["gligen"] == tiny_gligen_dir
    reference = engine_pass["conditions"]["reference"]
    assert (reference["source"], reference["model"]) == ("gligen", tiny_gligen_dir)


def test_proxy_render_is_an_rgb_png_of_the_layout_size(guidance):
    sent = guidance["sent"]["layout"]
    assert os.path.isfile(sent["reference"])
    assert png_header(sent["reference"]) == (sent["width"], sent["height"], 8, 2)
    pixels = addon_guidance_scenarios.read_rgb(sent["reference"])
    # "red box" is painted red where its mask is.
    red = next(r for r in sent["regions"] if r["name"] == "red_box")
    inside = addon_guidance_scenarios.read_rgb(red["mask"])[..., 0] > 127
    assert inside.any() and (pixels[inside] == [pixels[inside][0]]).all()
    assert pixels[inside][0][0] > 150 and pixels[inside][0][2] < 100


def test_blender_images_are_written_as_png(guidance):
    sent = guidance["sent"]["layout"]
    red = next(r for r in sent["regions"] if r["name"] == "red_box")
    # A PNG file loaded into Blender travels byte for byte.
    with open(red["image"], "rb") as sent_file, open(guidance["reference_source"], "rb") as src:
        assert sent_file.read() == src.read()
    # A generated (painted) image goes through its pixels, top row first.
    assert png_header(sent["init_image"]) == (96, 64, 8, 2)
    expected = np.asarray(guidance["init_pixels"], dtype=np.uint8)
    assert (addon_guidance_scenarios.read_rgb(sent["init_image"]) == expected).all()


def test_init_images_from_the_proxy_render_and_object_layers(rendered_init):
    from blender_addon.core.colors import BACKGROUND, COLOR_WORDS

    proxies, layers = rendered_init["proxies"], rendered_init["layers"]
    for run in (proxies, layers):
        assert run["operator"] == ["FINISHED"], run["reports"]
        sent = run["sent"]
        # Rendered to start from, not to pull toward: the pull stays off.
        assert sent["reference"] is None and sent["reference_scale"] == 0.0
        assert sent["strength"] == 0.5 and os.path.basename(sent["init_image"]) == "init.png"
        assert [r["strength"] for r in sent["regions"]] == [1.0, 1.0]
    regions = {r["name"]: r for r in proxies["sent"]["regions"]}
    red = addon_guidance_scenarios.read_rgb(regions["red_box"]["mask"])[..., 0] > 127
    blue = addon_guidance_scenarios.read_rgb(regions["blue_ball"]["mask"])[..., 0] > 127

    # Proxy Render: each object in its label's colour where its mask is, grey elsewhere.
    plain = addon_guidance_scenarios.read_rgb(proxies["init"])
    assert (plain[red] == COLOR_WORDS["red"]).all() and (plain[blue] == COLOR_WORDS["blue"]).all()
    assert (plain[~(red | blue)] == BACKGROUND).all()

    # Object Layers: the red box's 2:1 image (left half opaque green, right half transparent)
    # fitted to the box's width and centred; the rest of the box and image is the proxy render.
    composite = addon_guidance_scenarios.read_rgb(layers["init"])
    assert (composite[~red] == plain[~red]).all()
    green = (composite == [0, 200, 0]).all(axis=2)
    assert green.any() and not (green & ~red).any()
    x0, y0, x1, y1 = regions["red_box"]["box"]
    box_w, centre_y = (x1 - x0) * 96, (y0 + y1) / 2 * 64
    rows, cols = np.nonzero(green)
    # The rest of the box is red, but for the column where the image's opaque half ends
    # between two pixels: a blend of the two.
    others = red & ~green & ~(composite == COLOR_WORDS["red"]).all(axis=2)
    assert set(np.nonzero(others)[1]) <= {cols.max() + 1}
    assert abs(cols.min() - x0 * 96) <= 1 and abs(cols.max() + 1 - (x0 * 96 + box_w / 2)) <= 1
    assert abs(rows.max() + 1 - rows.min() - box_w / 2) <= 1, "the image keeps its aspect"
    assert abs((rows.min() + rows.max() + 1) / 2 - centre_y) <= 1
    # The layer image is not an IP-Adapter condition: there is none, and no error for it.
    assert [r["image"] for r in layers["sent"]["regions"]] == [None, None]

    # Batch and F12 renders make each frame's init image from its own proxy render.
    frame = rendered_init["frame"]
    assert frame["reference"] is None and frame["init_image"].endswith("/frame/init.png")
    assert (addon_guidance_scenarios.read_rgb(frame["init_image"]) == composite).all()


def test_init_from_render_refusals_and_hints(rendered_init):
    errors = rendered_init["errors"]
    assert errors["layers_without_images"].startswith(
        "Init Image is Object Layers, but no labeled object in the image has a Reference Image: "
    )
    assert "set Init Image to Proxy Render" in errors["layers_without_images"]
    assert errors["interactive_f12"].startswith(
        "Init Image is Object Layers, but this render sends boxes only"
    )
    assert "turn Lock Interface off" in errors["interactive_f12"]
    drawn = rendered_init["drawn"]
    assert drawn["errors"] == []
    assert "No labeled object has a Reference Image" in drawn["without_images"]
    assert "1 object layer over the proxy render" in drawn["with_image"]
