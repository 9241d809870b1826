"""Layout fidelity: does each object appear where its box says, per regional-guidance mode?

N random layouts (fixed seeds; boxes from the shapes-world generator, non-overlapping, one colour
per object) are generated through the engine's RegionalSDXLPipeline in every registered mode,
and each image is scored by a detector. One table: mode, placement rate, mean box coverage,
colour bleed, mAP@0.5, seconds per image and cost relative to the plain prompt.

    python benchmarks/layout_fidelity.py --model shapes --n 50 --objects 2
    python benchmarks/layout_fidelity.py --model shapes --n 50 --objects 2 3 4 --modes plain attention

The default detector segments the shapes-world colours (``engine.shapes.detect``). For a real
SDXL model, pass ``--layouts FILE`` (COCO-style: a JSON list of {"caption", "objects": [{"label",
"box"}]}) and ``--detector module:factory``, a callable returning ``detector(image, labels) ->
list[Detection]``; placement is then a detection of the label with IoU >= 0.5, and the mAP@0.5
column is the figure LSReGen-style papers report.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.shapes.detect import (  # noqa: E402
    ColourDetector,
    Detection,
    box_iou,
    mean_average_precision,
    phrase_colour,
    score_layout,
)
from engine.shapes.world import (  # noqa: E402
    BACKGROUND_CAPTION,
    COLOURS,
    caption_for,
    sample_objects,
)
from engine.wire.layout import MODES as ENGINE_MODES  # noqa: E402
from engine.wire.layout import Layout, Region  # noqa: E402

Box = tuple[float, float, float, float]


@dataclass
class BenchLayout:
    """One benchmark case: the full caption and its labelled boxes."""

    caption: str
    objects: list[tuple[str, Box]]
    seed: int


@dataclass
class Settings:
    """Generation settings shared by every mode."""

    size: int = 64
    steps: int = 20
    guidance_scale: float = 5.0
    base_ratio: float = 0.2


@dataclass(frozen=True)
class Mode:
    """A way of turning a benchmark case into a Layout; ``engine_mode`` must be supported."""

    name: str
    engine_mode: str
    regional: bool
    background: str | None = None
    reference_scale: float = 0.0
    """Above 0: pull toward a flat-colour render of the boxes (LSReGen-style guidance)."""
    reference_fraction: float = 0.1
    box_reference: bool = True
    """False: no reference file; the engine makes the reference with a first pass."""


MODES: dict[str, Mode] = {}


def register_mode(mode: Mode) -> Mode:
    """Add a mode to the registry (later techniques register themselves the same way)."""
    MODES[mode.name] = mode
    return mode


register_mode(Mode("plain", "attention", regional=False))
register_mode(Mode("attention", "attention", regional=True))
register_mode(Mode("attention+bg", "attention", regional=True, background=BACKGROUND_CAPTION))
register_mode(Mode("latent", "latent", regional=True))
register_mode(Mode("latent+bg", "latent", regional=True, background=BACKGROUND_CAPTION))
register_mode(
    Mode("attention+ref", "attention", True, reference_scale=0.25, reference_fraction=0.4)
)
register_mode(
    Mode("attention+ref10", "attention", True, reference_scale=0.25, reference_fraction=0.1)
)
register_mode(Mode("latent+ref", "latent", True, reference_scale=0.25, reference_fraction=0.4))
register_mode(
    Mode(
        "attention+pass",
        "attention",
        True,
        reference_scale=0.25,
        reference_fraction=0.4,
        box_reference=False,
    )
)


def available_modes() -> list[str]:
    """Registered modes whose engine mode this engine's Layout schema accepts."""
    return [name for name, mode in MODES.items() if mode.engine_mode in ENGINE_MODES]


def box_reference(case: BenchLayout, size: int, path: str) -> str:
    """Write a flat-colour render of the case's boxes on grey: what the add-on's proxy render
    gives for box-shaped proxies. Objects without a known colour word stay grey."""
    from PIL import Image

    pixels = np.full((size, size, 3), 128, dtype=np.uint8)
    for label, (x0, y0, x1, y1) in case.objects:
        colour = next((COLOURS[w] for w in label.split() if w in COLOURS), None)
        if colour is not None:
            rows = slice(round(y0 * size), round(y1 * size))
            pixels[rows, round(x0 * size) : round(x1 * size)] = colour
    Image.fromarray(pixels).save(path)
    return path


def build_layout(
    case: BenchLayout, mode: Mode, settings: Settings, workdir: str | None = None
) -> Layout:
    """The Layout a mode generates for a case (``workdir`` holds reference images)."""
    reference = None
    if mode.reference_scale > 0 and mode.box_reference:
        workdir = workdir or tempfile.mkdtemp(prefix="fidelity-")
        reference = box_reference(
            case, settings.size, os.path.join(workdir, f"reference-{case.seed}.png")
        )
    regions = (
        [Region(prompt=label, box=box) for label, box in case.objects] if mode.regional else []
    )
    return Layout(
        prompt=case.caption,
        width=settings.size,
        height=settings.size,
        regions=regions,
        background_prompt=mode.background if mode.regional else None,
        base_ratio=settings.base_ratio,
        seed=case.seed,
        steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        mode=mode.engine_mode,
        reference=reference,
        reference_scale=mode.reference_scale,
        reference_fraction=mode.reference_fraction,
    )


def shapes_layouts(n: int, objects: int, seed: int = 0) -> list[BenchLayout]:
    """``n`` shapes-world cases of ``objects`` objects each, one fixed seed per case."""
    cases = []
    for i in range(n):
        case_seed = seed * 100_003 + objects * 10_007 + i
        rng = np.random.default_rng(case_seed)
        objs = sample_objects(rng, objects, distinct_colours=True)
        cases.append(
            BenchLayout(caption_for(objs), [(o.phrase, o.box) for o in objs], seed=case_seed)
        )
    return cases


def load_layouts(path: str) -> list[BenchLayout]:
    """COCO-style cases from JSON: [{"caption", "objects": [{"label", "box"}], "seed"?}]."""
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    return [
        BenchLayout(
            item["caption"],
            [(o["label"], tuple(float(v) for v in o["box"])) for o in item["objects"]],
            seed=int(item.get("seed", i)),
        )
        for i, item in enumerate(data)
    ]


def load_detector(spec: str) -> tuple[Callable, bool]:
    """The detector named by ``spec`` and whether it is the built-in colour segmentation.

    ``colour``: shapes-world colour segmentation (placement by centroid or IoU, coverage, bleed).
    ``module:factory``: ``factory()`` returns ``detector(image, labels) -> list[Detection]``.
    """
    if spec == "colour":
        return ColourDetector(), True
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise SystemExit(f"--detector {spec!r}: use 'colour' or 'module:factory'")
    factory = getattr(importlib.import_module(module_name), attr)
    return factory(), False


@dataclass
class ModeResult:
    """Scores of one mode over all cases."""

    mode: str
    objects: int
    placed: list[bool] = field(default_factory=list)
    coverage: list[float] = field(default_factory=list)
    bleed: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    unet_pixels: list[int] = field(default_factory=list)
    """Latent pixels (times batch) the UNet processed per image, every call counted."""
    detections: list[list[Detection]] = field(default_factory=list)
    truths: list[list[tuple[str, Box]]] = field(default_factory=list)

    @property
    def placement(self) -> float:
        return float(np.mean(self.placed)) if self.placed else math.nan

    @property
    def mean_coverage(self) -> float:
        return float(np.mean(self.coverage)) if self.coverage else math.nan

    @property
    def mean_bleed(self) -> float:
        return float(np.mean(self.bleed)) if self.bleed else math.nan

    @property
    def seconds_per_image(self) -> float:
        return float(np.median(self.seconds)) if self.seconds else math.nan

    @property
    def map50(self) -> float:
        return mean_average_precision(self.detections, self.truths, 0.5)


def score_image(
    image: np.ndarray,
    case: BenchLayout,
    detector: Callable,
    colour: bool,
    result: ModeResult,
) -> None:
    """Add one image's scores to ``result``."""
    labels = [label for label, _ in case.objects]
    detections = detector(image, labels)
    result.detections.append(detections)
    result.truths.append(list(case.objects))
    if colour:
        scores = score_layout(image, [(phrase_colour(label), box) for label, box in case.objects])
        result.placed += [s.placed for s in scores]
        result.coverage += [s.coverage for s in scores]
        result.bleed += [s.bleed for s in scores]
        return
    for label, box in case.objects:
        result.placed.append(
            any(d.label == label and box_iou(d.box, box) >= 0.5 for d in detections)
        )


def run_benchmark(
    pipe,
    cases: Sequence[BenchLayout],
    modes: Sequence[str],
    detector: Callable | None = None,
    colour: bool = True,
    settings: Settings | None = None,
    save_dir: str | None = None,
) -> list[ModeResult]:
    """Generate every case in every mode through ``pipe`` and score it."""
    settings = settings or Settings()
    detector = detector or ColourDetector()
    counts = sorted({len(c.objects) for c in cases})
    results = []
    workdir = tempfile.mkdtemp(prefix="fidelity-")
    # Every UNet evaluation (latent mode's per-block calls, a first pass) goes through conv_in.
    processed = [0]

    def count_pixels(_module, args):
        processed[0] += args[0].shape[0] * args[0].shape[-2] * args[0].shape[-1]

    unet = getattr(pipe, "unet", None)
    hook = None if unet is None else unet.conv_in.register_forward_pre_hook(count_pixels)
    try:
        for count in counts:
            subset = [c for c in cases if len(c.objects) == count]
            for name in modes:
                result = ModeResult(name, count)
                for index, case in enumerate(subset):
                    layout = build_layout(case, MODES[name], settings, workdir)
                    processed[0] = 0
                    start = time.perf_counter()
                    image = pipe(layout=layout, output_type="np").images[0]
                    result.seconds.append(time.perf_counter() - start)
                    if hook is not None:
                        result.unet_pixels.append(processed[0])
                    pixels = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
                    score_image(pixels, case, detector, colour, result)
                    if save_dir:
                        _save(pixels, save_dir, f"{count}obj-{index:03d}-{name}.png")
                results.append(result)
    finally:
        if hook is not None:
            hook.remove()
    return results


def _save(pixels: np.ndarray, folder: str, name: str) -> None:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    Image.fromarray(pixels).save(os.path.join(folder, name))


def format_table(results: Sequence[ModeResult]) -> str:
    """The results as one aligned text table.

    ``time``: seconds per image over the plain prompt's; ``time/attn``: over attention mode's;
    ``work``: UNet pixels processed per image over the plain prompt's (every UNet call counted,
    so latent mode's per-prompt calls and a first pass show; attention's extra tokens do not).
    """

    def per_count(mode: str, value: Callable[[ModeResult], float]) -> dict[int, float]:
        return {r.objects: value(r) for r in results if r.mode == mode}

    plain = per_count("plain", lambda r: r.seconds_per_image)
    attention = per_count("attention", lambda r: r.seconds_per_image)
    plain_work = per_count("plain", lambda r: float(np.mean(r.unet_pixels or [math.nan])))
    header = (
        "objects",
        "mode",
        "placed",
        "coverage",
        "bleed",
        "mAP@0.5",
        "s/image",
        "time",
        "time/attn",
        "work",
    )
    rows = [header]

    def ratio(value: float, base: float) -> str:
        return "-" if math.isnan(base) or math.isnan(value) else f"{value / base:.2f}x"

    for r in results:
        work = float(np.mean(r.unet_pixels or [math.nan]))
        rows.append(
            (
                str(r.objects),
                r.mode,
                f"{r.placement:.0%}",
                "-" if math.isnan(r.mean_coverage) else f"{r.mean_coverage:.2f}",
                "-" if math.isnan(r.mean_bleed) else f"{r.mean_bleed:.2f}",
                f"{r.map50:.2f}",
                f"{r.seconds_per_image:.3f}",
                ratio(r.seconds_per_image, plain.get(r.objects, math.nan)),
                ratio(r.seconds_per_image, attention.get(r.objects, math.nan)),
                ratio(work, plain_work.get(r.objects, math.nan)),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes", help="model spec (alias, folder, file, repo id)")
    p.add_argument("--n", type=int, default=50, help="layouts per object count")
    p.add_argument("--objects", type=int, nargs="+", default=[2], help="objects per layout (2-4)")
    p.add_argument("--modes", nargs="+", default=None, help=f"subset of {list(MODES)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--base-ratio", type=float, default=0.2)
    p.add_argument("--layouts", help="COCO-style layout JSON instead of shapes-world layouts")
    p.add_argument("--detector", default="colour", help="'colour' or 'module:factory'")
    p.add_argument("--save-images", help="folder to write every generated image to")
    p.add_argument("--json", help="also write the results as JSON to this file")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[ModeResult]:
    """Run the benchmark from the command line and print the table."""
    args = parse_args(argv)
    from engine.loading import LoadOptions, load_pipeline, resolve_model

    modes = args.modes or available_modes()
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}; registered: {list(MODES)}")
    if args.layouts:
        cases = load_layouts(args.layouts)
    else:
        cases = [c for k in args.objects for c in shapes_layouts(args.n, k, args.seed)]
    detector, colour = load_detector(args.detector)
    options = LoadOptions(device=args.device)
    pipe = load_pipeline(resolve_model(args.model, options), options)
    settings = Settings(args.size, args.steps, args.guidance, args.base_ratio)
    results = run_benchmark(pipe, cases, modes, detector, colour, settings, args.save_images)
    print(f"model {args.model}, {len(cases)} layouts, {settings}")
    print(format_table(results))
    if args.json:
        rows = [
            {
                "objects": r.objects,
                "mode": r.mode,
                "placement": r.placement,
                "coverage": r.mean_coverage,
                "bleed": r.mean_bleed,
                "map50": r.map50,
                "seconds_per_image": r.seconds_per_image,
            }
            for r in results
        ]
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
