"""GLIGEN as the reference source: its pass, how it guides SDXL, loading, CLI and serve."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from types import SimpleNamespace

import numpy as np
import pytest
from serve_client import EngineClient

from engine.__main__ import main
from engine.conditions.gligen import (
    MAX_BOXES,
    gligen_reference,
    gligen_size,
    grounded_beta,
    grounding,
)
from engine.errors import CancelledError, ModelNotFoundError, UnsupportedModelError
from engine.loading.assemble import PipelineCache
from engine.loading.locate import LoadOptions, resolve_gligen
from engine.service.generate import conditions_used
from engine.service.provenance import read_provenance
from engine.steering.reference_pull import reference_source
from engine.wire.layout import Layout, Region

CAR, TREE = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 0.5)


def layout(**overrides) -> Layout:
    settings = dict(
        prompt="a red car and a tree on grey",
        negative_prompt="blurry",
        width=64,
        height=64,
        steps=4,
        seed=3,
        guidance_scale=5.0,
        reference_scale=0.25,
        reference_fraction=0.5,
        regions=[Region("a red car", CAR), Region("a tree", TREE)],
    )
    settings.update(overrides)
    return Layout(**settings)


class Recorder:
    """Stands in for the GLIGEN pipeline: records each call's arguments, then runs it."""

    def __init__(self, pipe, fail: bool = False):
        self.pipe, self.fail, self.calls = pipe, fail, []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, **kwargs):
        if self.fail:
            raise AssertionError("GLIGEN must not run here")
        self.calls.append(kwargs)
        return self.pipe(**kwargs)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir, tiny_gligen_dir):
    """The tiny SDXL pipeline with the tiny GLIGEN attached, through the engine's loader."""
    pipe, _ = PipelineCache().get(tiny_model_dir, LoadOptions(device="cpu", gligen=tiny_gligen_dir))
    return pipe


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# -- The GLIGEN pass ----------------------------------------------------------------------------


def test_native_size_on_the_long_side_keeps_the_aspect_ratio():
    real = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(sample_size=64)))
    real.vae_scale_factor = 8
    assert gligen_size(real, 1024, 1024) == (512, 512)
    assert gligen_size(real, 1344, 768) == (512, 296)
    assert gligen_size(real, 512, 2048) == (128, 512)
    assert gligen_size(real, 256, 256) == (512, 512)
    assert gligen_size(real, 4096, 64) == (512, 8)


def test_short_runs_still_ground_their_first_step():
    # GLIGEN grounds int(beta * timesteps) steps; PNDM has one timestep more than steps.
    for steps in range(1, 60):
        beta = grounded_beta(steps)
        assert 0.3 <= beta <= 1.0
        assert int(beta * steps) >= 1 and int(beta * (steps + 1)) >= 1
    assert grounded_beta(30) == 0.3


def test_reference_has_one_phrase_and_box_per_active_region(pipe):
    recorder = Recorder(pipe.gligen_pipeline)
    lay = layout(regions=[*layout().regions, Region("a ghost", (0.2, 0.2, 0.4, 0.4), weight=0.0)])
    image = gligen_reference(recorder, lay)
    assert image.size == (64, 64)
    (call,) = recorder.calls
    assert call["gligen_phrases"] == ["a red car", "a tree"]
    assert call["gligen_boxes"] == [list(CAR), list(TREE)]
    assert (call["width"], call["height"]) == (32, 32), "the tiny GLIGEN's native size"
    assert call["prompt"] == lay.prompt and call["negative_prompt"] == "blurry"
    assert (call["num_inference_steps"], call["guidance_scale"]) == (4, 5.0)

    wide = gligen_reference(recorder, dataclasses.replace(lay, width=96))
    assert wide.size == (96, 64)
    assert (recorder.calls[-1]["width"], recorder.calls[-1]["height"]) == (32, 24)


def test_beyond_30_regions_the_largest_boxes_are_kept(caplog):
    regions = [Region(f"object {i}", (0.0, 0.0, 0.1 + 0.02 * i, 0.5)) for i in range(MAX_BOXES)]
    tiny = [Region("speck", (0.5, 0.5, 0.52, 0.52)), Region("dot", (0.6, 0.6, 0.61, 0.61))]
    lay = layout(regions=[tiny[0], *regions[:10], tiny[1], *regions[10:]])
    with caplog.at_level(logging.WARNING, logger="engine.conditions.gligen"):
        phrases, boxes = grounding(lay)
    assert phrases == [r.prompt for r in regions], "the two smallest go, the order stays"
    assert boxes == [list(r.box) for r in regions]
    assert "at most 30 boxes" in caplog.text and "32 regions" in caplog.text


def test_boxes_reach_gligen(pipe):
    gligen = pipe.gligen_pipeline
    lay = layout()
    first = pixels(gligen_reference(gligen, lay))
    again = pixels(gligen_reference(gligen, lay))
    moved = layout(regions=[Region("a red car", (0.5, 0.0, 1.0, 1.0)), Region("a tree", CAR)])
    elsewhere = pixels(gligen_reference(gligen, moved))
    assert np.array_equal(first, again), "same seed, same boxes: same image"
    assert np.abs(first - elsewhere).mean() > 0.5, "moving the boxes changes the image"


# -- Guiding SDXL ---------------------------------------------------------------------------------


def test_sdxl_is_guided_toward_the_gligen_image(pipe, tmp_path, monkeypatch):
    lay = layout()
    assert reference_source(pipe, lay) == "gligen"
    guided = pipe(layout=lay, output_type="np").images[0]

    reference = tmp_path / "gligen.png"
    gligen_reference(pipe.gligen_pipeline, lay).save(reference)
    with_file = dataclasses.replace(lay, reference=str(reference))
    assert reference_source(pipe, with_file) == "file"
    explicit = pipe(layout=with_file, output_type="np").images[0]
    assert np.array_equal(guided, explicit), "the GLIGEN image is what guided the run"

    monkeypatch.setattr(pipe, "gligen_pipeline", None)
    assert reference_source(pipe, lay) == "first_pass"
    first_pass = pipe(layout=lay, output_type="np").images[0]
    assert np.abs(guided - first_pass).max() > 1e-3


def test_conditions_say_where_the_reference_came_from(pipe, tiny_gligen_dir, tmp_path):
    used = conditions_used(pipe, layout())
    assert used["reference"] == {
        "source": "gligen",
        "scale": 0.25,
        "fraction": 0.5,
        "model": tiny_gligen_dir,
    }
    assert conditions_used(pipe, layout(reference_scale=0.0))["reference"] is None
    assert conditions_used(pipe, layout(reference=str(tmp_path / "r.png")))["reference"] == {
        "source": "file",
        "scale": 0.25,
        "fraction": 0.5,
    }
    # No active region: nothing for GLIGEN to ground, the model's own first pass makes it.
    off = [dataclasses.replace(r, weight=0.0) for r in layout().regions]
    assert conditions_used(pipe, layout(regions=off))["reference"]["source"] == "first_pass"


def test_gligen_runs_only_when_it_makes_the_reference(
    pipe, tmp_path, monkeypatch, condition_images
):
    monkeypatch.setattr(pipe, "gligen_pipeline", Recorder(pipe.gligen_pipeline, fail=True))
    pipe(layout=layout(reference_scale=0.0), output_type="latent")
    pipe(layout=layout(reference=condition_images["reference"]), output_type="latent")
    pipe(layout=layout(reference_fraction=0.0), output_type="latent")


def test_progress_and_cancel_reach_the_gligen_pass(pipe):
    seen = []

    def progress(caller, step, _timestep, tensors):
        seen.append((caller is pipe.gligen_pipeline, step, tuple(tensors["latents"].shape)))
        return {}

    expected = pipe(layout=layout(steps=3), output_type="np").images[0]
    pipe(layout=layout(steps=3), callback_on_step_end=progress, output_type="np")
    gligen_latents, sdxl_latents = (1, 4, 16, 16), (1, 4, 32, 32)
    assert seen == [(True, s, gligen_latents) for s in range(3)] + [
        (False, s, sdxl_latents) for s in range(3)
    ]

    steps = []

    def cancel(caller, step, _timestep, _tensors):
        steps.append((caller is pipe.gligen_pipeline, step))
        raise CancelledError(f"cancelled after step {step + 1}")

    with pytest.raises(CancelledError):
        pipe(layout=layout(steps=20), callback_on_step_end=cancel, output_type="np")
    assert steps == [(True, 0)], "stopped in the GLIGEN pass, after its first step"
    # Nothing of the stopped pass lingers in the next run.
    again = pipe(layout=layout(steps=3), output_type="np").images[0]
    assert np.array_equal(again, expected)


# -- Finding the model --------------------------------------------------------------------------


def test_missing_gligen_says_how_to_get_it(tmp_path, tiny_model_dir):
    missing = str(tmp_path / "no-such-gligen")
    with pytest.raises(ModelNotFoundError, match="hf download masterful/gligen") as info:
        resolve_gligen(missing)
    assert info.value.field == "gligen"
    with pytest.raises(ModelNotFoundError) as info:
        PipelineCache().get(tiny_model_dir, LoadOptions(device="cpu", gligen=missing))
    assert info.value.field == "gligen"
    # An SDXL folder is a pipeline, but not GLIGEN.
    with pytest.raises(UnsupportedModelError, match="StableDiffusionGLIGENPipeline") as info:
        resolve_gligen(tiny_model_dir)
    assert info.value.field == "gligen"


def test_command_line_takes_gligen(tmp_path, tiny_model_dir, tiny_gligen_dir, capsys):
    path = tmp_path / "scene.json"
    path.write_text(json.dumps(layout().to_dict()))
    missing = str(tmp_path / "no-such-gligen")
    common = ["--model", tiny_model_dir, "--device", "cpu"]
    out = str(tmp_path / "scene.png")
    assert main(["generate", str(path), "--out", out, *common, "--gligen", missing]) == 1
    assert "no-such-gligen" in capsys.readouterr().err and not os.path.exists(out)

    assert main(["info", "--json", *common, "--gligen", tiny_gligen_dir]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "gligen" in info["capabilities"] and info["conditions"]["gligen"]["available"]

    assert main(["generate", str(path), "--out", out, *common, "--gligen", tiny_gligen_dir]) == 0
    assert read_provenance(out)["conditions"]["reference"]["source"] == "gligen"


# -- Through serve ------------------------------------------------------------------------------


def test_serve_with_gligen(tmp_path, tiny_model_dir, tiny_gligen_dir):
    client = EngineClient(
        "--device", "cpu", "--gligen", tiny_gligen_dir, stderr_path=tmp_path / "stderr.log"
    )
    try:
        hello = client.request({"op": "hello", "id": "h"}, timeout=120)
        assert "gligen" in hello["capabilities"]
        assert hello["conditions"]["gligen"] == {
            "available": True,
            "spec": tiny_gligen_dir,
            "message": os.path.abspath(tiny_gligen_dir),
        }
        plain = client.request({"op": "hello", "id": "h2", "options": {"gligen": None}})
        assert "gligen" not in plain["capabilities"]
        assert "--gligen" in plain["conditions"]["gligen"]["message"]

        data = layout(steps=3).to_dict()
        out = str(tmp_path / "guided.png")
        request = {"op": "generate", "model": tiny_model_dir, "layout": data, "out": out}
        client.send({**request, "id": "g"})
        events = client.until("g", {"result", "error"}, timeout=300)
        assert events[-1]["event"] == "result", events
        progress = [(e["step"], e["total"]) for e in events if e["event"] == "progress"]
        assert progress == [(k, 6) for k in range(1, 7)], "the GLIGEN pass, then SDXL's"
        reference = events[-1]["conditions"]["reference"]
        assert reference["source"] == "gligen" and reference["model"] == tiny_gligen_dir
        record = read_provenance(out)
        assert record["conditions"]["reference"] == reference
        assert "Reference: gligen (tiny-gligen)" in record["parameters"]

        missing = {"gligen": str(tmp_path / "no-gligen")}
        refused = client.request({**request, "id": "m", "options": missing})
        assert (refused["code"], refused["field"]) == ("model_not_found", "gligen")

        # A cancel while GLIGEN makes the reference: no image, the model stays loaded.
        cancelled_out = str(tmp_path / "cancelled.png")
        long = {**request, "layout": layout(steps=200).to_dict(), "out": cancelled_out}
        client.send({**long, "id": "long"})
        first = client.until("long", {"progress", "error"}, timeout=300)
        assert first[-1]["event"] == "progress", first
        client.send({"op": "cancel", "id": "c"})
        assert client.until("c", {"ack"})[-1]["found"] is True
        after = client.until("long", {"cancelled", "result", "error"}, timeout=120)
        assert after[-1] == {"id": "long", "event": "cancelled"}
        steps = [e for e in first + after if e["event"] == "progress"]
        assert max(e["step"] for e in steps) < 200, "stopped within the GLIGEN pass"
        assert not os.path.exists(cancelled_out)
        again = client.request({**request, "id": "again", "out": out}, timeout=300)
        assert again["event"] == "result" and again["load_seconds"] == 0
    finally:
        client.close()
    assert client.stray_lines == []
