"""The high-res fix end to end: the add-on's client against a real ``engine serve`` running the
shipped shapes model (native 64 px) on the CPU."""

from __future__ import annotations

import os
import struct
import sys

import numpy as np
import pytest
from blender_scenario import ROOT

from blender_addon.client.engine_client import EngineClient
from blender_addon.client.high_res import HighResJob, start_generate, uses_high_res
from blender_addon.core.png import write_gray_png
from engine.service.provenance import layout_from_png

REGIONS = [
    {"prompt": "a red circle", "box": [0.05, 0.1, 0.45, 0.9], "name": "Circle"},
    {"prompt": "a blue square", "box": [0.55, 0.1, 0.95, 0.9], "name": "Square"},
]


def layout(width: int, height: int, steps: int = 6) -> dict:
    return {
        "prompt": "a red circle and a blue square",
        "width": width,
        "height": height,
        "steps": steps,
        "seed": 11,
        "regions": REGIONS,
    }


def png_size(path: str) -> tuple[int, int]:
    with open(path, "rb") as handle:
        return struct.unpack(">II", handle.read(24)[16:24])


@pytest.fixture(scope="module")
def client():
    engine = EngineClient(sys.executable, cwd=ROOT)
    engine.start()
    yield engine
    engine.close()


def with_masks(data: dict, folder) -> dict:
    """``data`` with a full-size mask for each region (its box filled)."""
    regions = []
    for region in data["regions"]:
        mask = np.zeros((data["height"], data["width"]), dtype=np.uint8)
        x0, y0, x1, y1 = region["box"]
        mask[round(y0 * data["height"]) : round(y1 * data["height"]),
             round(x0 * data["width"]) : round(x1 * data["width"])] = 255  # fmt: skip
        path = str(folder / f"{region['name']}.png")
        write_gray_png(path, mask)
        regions.append({**region, "mask": path})
    return {**data, "regions": regions}


def test_far_above_native_runs_two_passes_the_second_from_the_first(client, tmp_path):
    out = str(tmp_path / "result.png")
    # Full-size masks fit the first pass too: its aspect is kept within the engine's tolerance.
    sent = with_masks(layout(160, 96), tmp_path)
    job = start_generate(client, sent, out, "shapes", native=64, high_res=True, strength=0.5)
    assert isinstance(job, HighResJob)
    final = job.wait(600)
    assert final["event"] == "result", final
    events = [e for e in job.poll() if e is not final]

    first, second = job.requests
    # The first pass: the same Layout at about the native area, the aspect kept.
    assert (first["width"], first["height"]) == (120, 72)
    assert first["regions"] == second["regions"] and first["seed"] == second["seed"]
    keys = ("prompt", "box", "mask", "name")
    assert [{k: r[k] for k in keys} for r in second["regions"]] == sent["regions"]
    assert first["init_image"] is None and first["strength"] == 1.0
    # The second pass: full size, from the first pass's image at the chosen strength.
    assert (second["width"], second["height"]) == (160, 96)
    assert second["init_image"] == job.first_out and second["strength"] == 0.5
    assert second["steps"] == 3
    assert png_size(job.first_out) == (120, 72)

    # What the engine received, from the final image's provenance.
    assert png_size(out) == (160, 96) and final["path"] == out
    received = layout_from_png(out)
    assert received.init_image == job.first_out and received.strength == 0.5
    assert [(r.prompt, list(r.box), r.mask) for r in received.regions] == [
        (r["prompt"], r["box"], r["mask"]) for r in sent["regions"]
    ]
    assert final["high_res"]["first_pass"]["path"] == job.first_out
    assert (final["high_res"]["first_pass"]["width"], final["width"]) == (120, 160)
    assert final["seconds"] >= final["high_res"]["first_pass"]["seconds"]

    # Progress counts over both passes, one total throughout.
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["step"] for e in progress] == list(range(1, 10))
    assert {e["total"] for e in progress} == {9}
    assert [e["pass"] for e in progress] == [1] * 6 + [2] * 3


def test_near_native_or_turned_off_is_one_plain_generate(client, tmp_path):
    assert not uses_high_res(72, 64, 64, True)
    assert not uses_high_res(160, 96, 64, False)
    assert not uses_high_res(160, 96, None, True)
    out = str(tmp_path / "plain.png")
    job = start_generate(client, layout(160, 96, steps=2), out, "shapes", native=64)
    assert not isinstance(job, HighResJob)
    assert job.wait(300)["event"] == "result"
    assert png_size(out) == (160, 96)
    assert not os.path.exists(str(tmp_path / "plain_first_pass.png"))


def test_cancel_during_the_second_pass_ends_cancelled(client, tmp_path):
    out = str(tmp_path / "cancelled.png")
    job = start_generate(client, layout(160, 96, steps=8), out, "shapes", native=64, high_res=True)
    for event in job:
        if event.get("pass") == 2 and event["event"] == "progress":
            job.cancel()
            break
    assert job.wait(300)["event"] == "cancelled"
    assert not os.path.exists(out)
