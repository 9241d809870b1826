"""The shapes world: seeded scenes, caption grammar, boxes that match pixels, and the detector."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest

from engine.shapes.detect import (
    ColourDetector,
    Detection,
    average_precision,
    colour_labels,
    mean_average_precision,
    score_layout,
)
from engine.shapes.world import (
    BACKGROUND_CAPTION,
    COLOURS,
    SHAPES,
    VOCABULARY,
    ShapeObject,
    caption_for,
    crowded_objects,
    random_scene,
    render,
    sample_objects,
    scene_batch,
    visible_masks,
)

PHRASE = rf"a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
GRAMMAR = re.compile(
    rf"^(a plain background|{PHRASE}|{PHRASE} and {PHRASE}|{PHRASE}(, {PHRASE}){{1,2}} and {PHRASE})$"
)


def test_same_seed_same_scenes_other_seed_other_scenes():
    a = scene_batch(np.random.default_rng(7), 6)
    b = scene_batch(np.random.default_rng(7), 6)
    c = scene_batch(np.random.default_rng(8), 6)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == (6, 64, 64, 3) and a[0].dtype == np.uint8


def test_captions_follow_the_grammar_and_name_every_object():
    rng = np.random.default_rng(0)
    counts = set()
    for _ in range(300):
        scene = random_scene(rng)
        counts.add(len(scene.objects))
        assert GRAMMAR.match(scene.caption), scene.caption
        assert set(scene.caption.replace(",", " , ").split()) <= set(VOCABULARY)
        named = re.findall(PHRASE, scene.caption)
        # Objects are in paint order; the caption names them in a random order.
        assert sorted(f"a {c} {s}" for c, s in named) == sorted(o.phrase for o in scene.objects)
    assert counts == {0, 1, 2, 3, 4}


def test_overlapping_scenes_hide_part_of_each_back_object_and_paint_front_last():
    rng = np.random.default_rng(4)
    for _ in range(40):
        objects = sample_objects(rng, 3, overlap=True, distinct_colours=True)
        masks = visible_masks(objects, 64)
        full = visible_masks(objects[:1], 64)[0]
        # The back object keeps most of itself; something of it is hidden.
        assert 0.3 < masks[0].sum() / full.sum() < 1.0
        assert masks[-1].sum() == pytest.approx(visible_masks(objects[-1:], 64)[0].sum())
        image = render(objects, 64)
        front = masks[-1] > 0.99
        colour = np.array(COLOURS[objects[-1].colour])
        assert (np.abs(image[front].astype(int) - colour).max(axis=-1) <= 1).all()
        # Visible masks never overlap: each pixel belongs to at most one object in full.
        assert masks.sum(axis=0).max() <= 1.0 + 1e-5


@pytest.mark.parametrize(("count", "size"), [(16, 256), (36, 384), (100, 640)])
def test_crowded_scenes_place_every_object_apart_inside_the_frame(count, size):
    rng = np.random.default_rng(count)
    objects = crowded_objects(rng, count, min_size=16 / size, max_size=40 / size)
    assert len(objects) == count
    for i, a in enumerate(objects):
        assert 0 <= a.box[0] < a.box[2] <= 1 and 0 <= a.box[1] < a.box[3] <= 1
        assert (a.box[2] - a.box[0]) * size >= 8
        assert all(not _boxes_overlap(a.box, b.box) for b in objects[i + 1 :])
    pixels, captions, scenes = scene_batch(rng, 2, 128, crowd=(5, 16))
    assert pixels.shape == (2, 128, 128, 3) and all(5 <= len(o) <= 16 for o in scenes)


def _boxes_overlap(a, b) -> bool:
    return not (a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1])


def test_caption_joins():
    objs = [ShapeObject(c, s, (0, 0, 1, 1)) for c, s in [("red", "circle"), ("blue", "square")]]
    assert caption_for([]) == BACKGROUND_CAPTION
    assert caption_for(objs[:1]) == "a red circle"
    assert caption_for(objs) == "a red circle and a blue square"
    three = [*objs, ShapeObject("green", "triangle", (0, 0, 1, 1))]
    assert caption_for(three) == "a red circle, a blue square and a green triangle"


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_boxes_are_inside_disjoint_and_match_the_drawn_pixels(count):
    rng = np.random.default_rng(count)
    for _ in range(10):
        objs = sample_objects(rng, count)
        for i, obj in enumerate(objs):
            assert 0 <= obj.box[0] < obj.box[2] <= 1 and 0 <= obj.box[1] < obj.box[3] <= 1
            for other in objs[i + 1 :]:
                assert (
                    obj.box[2] <= other.box[0]
                    or other.box[2] <= obj.box[0]
                    or (obj.box[3] <= other.box[1] or other.box[3] <= obj.box[1])
                )
            # Drawn alone on the flat default background: every touched pixel is the shape's.
            image = render([obj], 64).astype(int)
            touched = np.abs(image - render([], 64).astype(int)).sum(-1) > 0
            ys, xs = np.nonzero(touched)
            found = (xs.min() / 64, ys.min() / 64, (xs.max() + 1) / 64, (ys.max() + 1) / 64)
            # The shape reaches its box on every side; anti-aliasing may touch one more pixel
            # (a bit more at a triangle's sharp apex).
            assert np.allclose(found, obj.box, atol=1.5 / 64), (obj, found)


def test_shapes_fill_their_boxes_as_geometry_says():
    box = (0.25, 0.25, 0.75, 0.75)
    fills = {}
    for shape in SHAPES:
        image = render([ShapeObject("blue", shape, box)], 128)
        fills[shape] = (colour_labels(image) >= 0).sum() / (64 * 64)
    assert fills["square"] == pytest.approx(1.0, abs=0.03)
    assert fills["circle"] == pytest.approx(np.pi / 4, abs=0.03)
    assert fills["triangle"] == pytest.approx(0.5, abs=0.03)


def test_detector_places_ground_truth_and_rejects_shuffled_boxes():
    rng = np.random.default_rng(11)
    placed, shuffled, coverage, bleed = [], [], [], []
    for _ in range(60):
        objs = sample_objects(rng, int(rng.integers(2, 5)), distinct_colours=True)
        image = render(objs, 64, rng)
        scores = score_layout(image, [(o.colour, o.box) for o in objs])
        placed += [s.placed for s in scores]
        coverage += [s.coverage for s in scores]
        bleed += [s.bleed for s in scores]
        rolled = [(o.colour, objs[(i + 1) % len(objs)].box) for i, o in enumerate(objs)]
        shuffled += [s.placed for s in score_layout(image, rolled)]
    assert np.mean(placed) == 1.0
    assert np.mean(shuffled) <= 0.05
    assert 0.6 < np.mean(coverage) < 0.9  # a mix of squares, circles and triangles
    assert np.mean(bleed) < 0.03


def test_detector_needs_enough_pixels_and_ignores_grey():
    grey = render([], 64)
    assert (colour_labels(grey) == -1).all()
    tiny = render([ShapeObject("red", "square", (0.5, 0.5, 0.53, 0.53))], 64)
    [score] = score_layout(tiny, [("red", (0.4, 0.4, 0.8, 0.8))])
    assert not score.placed and score.pixels > 0


def test_each_palette_colour_is_recognised_as_itself():
    for colour in COLOURS:
        image = render([ShapeObject(colour, "square", (0.2, 0.2, 0.8, 0.8))], 64)
        others = [c for c in COLOURS if c != colour]
        box = (0.2, 0.2, 0.8, 0.8)
        assert score_layout(image, [(colour, box)])[0].placed
        assert not any(s.placed for s in score_layout(image, [(c, box) for c in others]))


def test_average_precision_exact_values():
    truths = [(0, (0.0, 0.0, 0.5, 0.5)), (1, (0.5, 0.5, 1.0, 1.0))]
    hit0 = (0, Detection("x", (0.0, 0.0, 0.5, 0.5), 0.9))
    miss = (1, Detection("x", (0.0, 0.0, 0.2, 0.2), 0.8))
    hit1 = (1, Detection("x", (0.5, 0.5, 1.0, 1.0), 0.7))
    assert average_precision([hit0, hit1], truths) == pytest.approx(1.0)
    # Ranked hit, miss, hit: precision 1 up to recall 0.5, then 2/3 up to recall 1.
    assert average_precision([hit0, miss, hit1], truths) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert average_precision([miss], truths) == 0.0


def test_colour_detector_map_on_ground_truth_and_shuffled_boxes():
    rng = np.random.default_rng(5)
    detector = ColourDetector()
    dets, truths, wrong = [], [], []
    for _ in range(20):
        objs = sample_objects(rng, 3, distinct_colours=True)
        image = render(objs, 64, rng)
        dets.append(detector(image, [o.phrase for o in objs]))
        truths.append([(o.phrase, o.box) for o in objs])
        wrong.append([(o.phrase, objs[(i + 1) % 3].box) for i, o in enumerate(objs)])
    assert mean_average_precision(dets, truths) > 0.95
    assert mean_average_precision(dets, wrong) < 0.1


def _benchmark_module():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "layout_fidelity.py")
    spec = importlib.util.spec_from_file_location("layout_fidelity", path)
    module = importlib.util.module_from_spec(spec)
    # Dataclasses look their module up in sys.modules while the module runs.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class _ShiftedPipe:
    """Draws each phrase down and right of its box by the box's size."""

    def __init__(self, bench):
        self.draw = bench.RoundTrip()

    def __call__(self, layout, output_type="np"):
        import dataclasses

        def shifted(region):
            x0, y0, x1, y1 = region.box
            w, h = x1 - x0, y1 - y0
            return dataclasses.replace(region, box=(x0 + w, y0 + h, x1 + w, y1 + h))

        regions = [shifted(r) for r in layout.regions]
        return self.draw(dataclasses.replace(layout, regions=regions), output_type)


@pytest.mark.parametrize("detector", ["colour", "engine.shapes.detect:ColourDetector"])
def test_benchmark_scores_an_oracle_perfectly_with_either_detector_path(detector, capsys):
    bench = _benchmark_module()
    cases = bench.shapes_layouts(4, 3, seed=2)
    assert [c.seed for c in cases] == [c.seed for c in bench.shapes_layouts(4, 3, seed=2)]
    assert all(len({phrase.split()[1] for phrase, _ in c.objects}) == 3 for c in cases)
    found, colour = bench.load_detector(detector)
    assert colour == (detector == "colour")
    results = bench.run_benchmark(bench.RoundTrip(), cases, ["plain", "attention"], found, colour)
    by_mode = {r.mode: r for r in results}
    assert by_mode["attention"].placement == 1.0 and by_mode["plain"].placement == 0.0
    assert by_mode["attention"].map50 > 0.95 and by_mode["plain"].map50 == 0.0
    if colour:
        assert by_mode["attention"].mean_coverage > 0.6 and by_mode["attention"].mean_bleed < 0.05
    else:
        assert np.isnan(by_mode["attention"].mean_coverage)
    if colour:
        assert by_mode["attention"].shape_rate == 1.0
    table = bench.format_table(results)
    assert table.splitlines()[0].split() == [
        "objects",
        "size",
        "form",
        "mode",
        "placed",
        "shape",
        "coverage",
        "bleed",
        "mAP@0.5",
        "s/image",
        "time",
        "time/attn",
        "work",
    ]
    assert "100%" in table.splitlines()[2]


def test_benchmark_writes_each_scene_prompt_form_and_keeps_plain_as_the_full_caption():
    bench = _benchmark_module()
    case = bench.shapes_layouts(1, 3, seed=1)[0]
    settings = bench.Settings(size=64)
    prompts = {
        form: bench.build_layout(case, bench.MODES["attention"], settings, form=form).prompt
        for form in bench.FORMS
    }
    assert prompts == {
        "all": case.caption,
        "one": case.objects[0][0],
        "none": BACKGROUND_CAPTION,
        "empty": "",
    }
    plain = bench.build_layout(case, bench.MODES["plain"], settings, form="empty")
    assert plain.prompt == case.caption and plain.regions == []
    # Settings left at None take the engine's own Layout defaults.
    from engine.wire.layout import Layout

    layout = bench.build_layout(case, bench.MODES["attention"], settings)
    assert layout.base_ratio == Layout(prompt="").base_ratio
    assert f"base_ratio {layout.base_ratio}" in settings.describe()
    pipe_results = bench.run_benchmark(
        bench.RoundTrip(), [case], ["plain", "attention"], forms=["none", "empty"]
    )
    assert [(r.mode, r.form) for r in pipe_results] == [
        ("plain", "all"),
        ("attention", "none"),
        ("attention", "empty"),
    ]


def test_benchmark_command_line_reaches_every_setting():
    bench = _benchmark_module()
    args = bench.parse_args(
        ["--base-ratio", "0", "--blend", "weighted", "--crowded", "16@256", "--occlusion", "3"]
    )
    settings = bench.Settings(args.size, args.steps, args.guidance, args.base_ratio, args.blend)
    assert "base_ratio 0.0, blend weighted" in settings.describe()
    assert args.crowded == [(16, 256)] and args.occlusion == 3
    assert args.modes == ["plain", "attention"] and args.forms == list(bench.FORMS)


def test_benchmark_scores_crowded_scenes_box_by_box_and_occlusion_by_visible_pixels(tmp_path):
    bench = _benchmark_module()
    crowded = bench.crowded_layouts(1, 36, 384, seed=3)
    assert crowded[0].kind == "crowded" and len(crowded[0].objects) == 36
    occluded = bench.occlusion_layouts(3, seed=3)
    results = bench.run_benchmark(
        bench.RoundTrip(), crowded + occluded, ["plain", "attention"], forms=["none"]
    )
    by_row = {(r.kind, r.mode): r for r in results}
    assert by_row[("crowded", "attention")].placement == 1.0
    assert by_row[("crowded", "attention")].shape_rate >= 0.95
    assert by_row[("crowded", "attention")].mean_bleed < 0.01
    # Shapes drawn beside their boxes: bleed sees the colour outside every box.
    shifted = bench.run_benchmark(_ShiftedPipe(bench), crowded, ["attention"], forms=["none"])
    assert shifted[0].mean_bleed > 0.2
    assert by_row[("crowded", "plain")].placement == 0.0
    for mode in ("attention", "attention+masks"):
        row = by_row[("occlusion", mode)]
        assert min(row.front) > 0.95 and min(row.back) > 0.95
    assert by_row[("occlusion", "plain")].front == [0.0] * 3
    # The masked rows send each region's visible mask: the back one lacks the front's pixels.
    layout = bench.build_layout(
        occluded[0], bench.MODES["attention"], bench.Settings(), str(tmp_path), masks=True
    )
    from PIL import Image

    back = np.asarray(Image.open(layout.regions[0].mask)) / 255
    x0, y0, x1, y1 = (round(v * 64) for v in occluded[0].objects[0][1])
    assert 0 < back.sum() < (x1 - x0) * (y1 - y0)
    table = bench.format_table(results)
    assert table.splitlines()[0].split()[-2:] == ["front", "back"]
    assert "36*" in table


def test_benchmark_builds_each_mode_layout():
    bench = _benchmark_module()
    case = bench.shapes_layouts(1, 2)[0]
    settings = bench.Settings(size=64, steps=7)
    plain = bench.build_layout(case, bench.MODES["plain"], settings)
    assert plain.regions == [] and plain.prompt == case.caption and plain.steps == 7
    bg = bench.build_layout(case, bench.MODES["attention+bg"], settings)
    assert [r.prompt for r in bg.regions] == [label for label, _ in case.objects]
    assert bg.background_prompt == BACKGROUND_CAPTION and bg.mode == "attention"
    default = bench.build_layout(case, bench.MODES["attention"], settings)
    assert default.background_prompt is None
    assert "latent" not in bench.available_modes() or bench.MODES["latent"].engine_mode == "latent"


def test_benchmark_counts_every_unet_pixel_a_mode_processes(tiny_model_dir):
    from engine.pipeline import RegionalSDXLPipeline
    from engine.regional.latent import plan_latent_regions

    bench = _benchmark_module()
    pipe = RegionalSDXLPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    cases = bench.shapes_layouts(1, 2, seed=4)
    # 128 px: the first pass runs at 64 px (it never goes below 64).
    settings = bench.Settings(size=128, steps=2)
    modes = ["plain", "attention", "attention+pass", "latent"]
    results = {r.mode: r for r in bench.run_benchmark(pipe, cases, modes, settings=settings)}
    latent = (128 // pipe.vae_scale_factor) ** 2
    # Two steps of a guided (batch 2) call over the whole latent canvas.
    assert results["plain"].unet_pixels == [2 * 2 * latent]
    assert results["attention"].unet_pixels == [2 * 2 * latent]
    # The first pass runs the same steps at half the side: a quarter of the pixels.
    assert results["attention+pass"].unet_pixels == [2 * 2 * latent + 2 * 2 * latent // 4]
    # Latent mode: the negative prompt plus each block of its plan, on a crop or the canvas.
    layout = bench.build_layout(cases[0], bench.MODES["latent"], settings)
    side = 128 // pipe.vae_scale_factor
    plan = plan_latent_regions(layout, (side, side), 2, pipe.latent_crops)
    assert len(plan.blocks) >= 3
    assert results["latent"].unet_pixels == [round(2 * 2 * latent * plan.relative_cost())]
    work = {
        line.split()[3]: line.split()[-1]
        for line in bench.format_table(list(results.values())).splitlines()[1:]
    }
    assert work == {
        "plain": "1.00x",
        "attention": "1.00x",
        "attention+pass": "1.25x",
        "latent": "2.50x",
    }


def test_round_trip_rows_score_the_ground_truth_and_the_models_vae(capsys):
    bench = _benchmark_module()
    argv = ["--model", "shapes", "--n", "2", "--objects", "2", "--forms", "none"]
    results = bench.main([*argv, "--modes", "attention", "--occlusion", "2", "--round-trip"])
    rows = {(r.kind, r.mode): r for r in results}
    truth = rows[("standard", "truth")]
    assert truth.placement == 1.0 and truth.shape_rate == 1.0 and truth.mean_bleed < 0.05
    assert min(rows[("occlusion", "truth")].back) > 0.95
    through = rows[("standard", "vae round trip")]
    # The decoder blurs edges: more coloured pixels beyond the boxes than the exact drawing.
    assert through.placement == 1.0 and through.mean_bleed > truth.mean_bleed
    assert ("occlusion", "attention+masks") in rows
    assert not any(mode.startswith(("truth+", "vae round trip+")) for _, mode in rows)
    assert "vae round trip" in capsys.readouterr().out
