"""Layout fidelity: does each object appear where its box says, with the right shape, for the
prompts users write?

Rows cover how the engine is used, at its default settings (printed with the table):

- *Scene-prompt forms* on N random shapes-world layouts per object count (fixed seeds,
  non-overlapping boxes, one colour per object): the scene prompt names every object (``all``),
  one object only (``one``), none (``none``: "a plain background") or is empty (``empty``),
  each through the regional modes asked for; the plain prompt without regions is the chance
  baseline. *placed*: the object's colour is where its box is (centroid inside or IoU >= 0.5);
  *shape*: of the placed objects that nothing hides, the share whose blob has the right shape
  (fill ratio and top-heaviness of its bounding box, ``engine.shapes.detect.classify_shape``).
- *Crowded* scenes (``--crowded 16@256 36@384 100@640``): many small objects whose colours
  repeat, scored box by box (the box holds its colour and that colour dominates it); their
  *bleed* is the share of the image's coloured pixels outside every box (shapes drawn where
  nothing was asked for, which box-by-box scores cannot see).
- *Occlusion* (``--occlusion N``): two overlapping objects, the front one partly hiding the back
  one, given as boxes or as occlusion-aware masks (what the add-on sends); *front* and *back*
  are the share of the front object's pixels and of the back object's visible pixels that have
  the object's colour.

Time and UNet work are measured side by side against the plain prompt of the same cases.
``--round-trip`` adds the ceiling rows: the ground truth drawn exactly (``truth``), and the same
through the model's VAE, encoded and decoded with no diffusion (``vae round trip``): no
generation can score above what its decoder can draw.

    python benchmarks/layout_fidelity.py --model shapes --n 50 --objects 2 4
    python benchmarks/layout_fidelity.py --model shapes --n 50 --objects 2 --forms all \
        --modes plain attention latent attention+ref attention+pass
    python benchmarks/layout_fidelity.py --model shapes --n 0 --crowded 36@384 --occlusion 20

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
    classify_shape,
    colour_labels,
    colour_mask,
    mean_average_precision,
    score_box,
    score_layout,
)
from engine.shapes.world import (  # noqa: E402
    BACKGROUND_CAPTION,
    COLOURS,
    SHAPES,
    ShapeObject,
    caption_for,
    crowded_objects,
    render,
    sample_objects,
    visible_masks,
)
from engine.wire.layout import MODES as ENGINE_MODES  # noqa: E402
from engine.wire.layout import Layout, Region  # noqa: E402

Box = tuple[float, float, float, float]


@dataclass
class BenchLayout:
    """One benchmark case: the full caption and its labelled boxes, back to front."""

    caption: str
    objects: list[tuple[str, Box]]
    seed: int
    kind: str = "standard"
    """``standard``, ``crowded`` (scored box by box) or ``occlusion`` (front/back shares)."""
    size: int | None = None
    """Canvas side for this case; None: the settings' size."""


FORMS = ("all", "one", "none", "empty")
"""Scene-prompt forms: naming every object, one object, none ("a plain background"), or empty."""


def scene_prompt(case: BenchLayout, form: str) -> str:
    """The case's scene prompt in one of the ``FORMS``."""
    if form == "all":
        return case.caption
    if form == "one":
        return case.objects[0][0] if case.objects else case.caption
    if form == "none":
        return BACKGROUND_CAPTION
    if form == "empty":
        return ""
    raise ValueError(f"unknown scene-prompt form {form!r}; choose from {FORMS}")


@dataclass
class Settings:
    """Generation settings shared by every mode; None takes the engine's Layout default."""

    size: int = 64
    steps: int = 20
    guidance_scale: float = 5.0
    base_ratio: float | None = None
    blend: str | None = None
    """How a region's pixels share attention among their blocks (the pipeline's
    ``regional_blend``: ``joint`` softmax or ``weighted`` sum); None: the pipeline's default."""

    def describe(self) -> str:
        """The settings as generated, defaults resolved."""
        base_ratio = Layout(prompt="").base_ratio if self.base_ratio is None else self.base_ratio
        blend = "the pipeline's default" if self.blend is None else self.blend
        return (
            f"{self.size} px unless a row says, {self.steps} steps, CFG {self.guidance_scale}, "
            f"base_ratio {base_ratio}, blend {blend}, other Layout fields at their defaults"
        )


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


def case_objects(case: BenchLayout) -> list[ShapeObject]:
    """The case's objects as shapes-world objects (labels like "a red circle"), back to front."""
    return shape_objects(case.objects)


def shape_objects(labelled: Sequence[tuple[str, Box]]) -> list[ShapeObject]:
    """Shapes-world objects for (label, box) pairs, in their order."""
    objects = []
    for label, box in labelled:
        words = label.split()
        colour = next((w for w in words if w in COLOURS), None)
        shape = next((w for w in words if w in SHAPES), None)
        if colour is None or shape is None:
            raise ValueError(f"{label!r} is not a shapes-world phrase ('a <colour> <shape>')")
        objects.append(ShapeObject(colour, shape, box))
    return objects


def mask_files(case: BenchLayout, size: int, folder: str) -> list[str]:
    """Occlusion-aware visible masks of the case's objects as PNG files (the add-on's masks)."""
    from PIL import Image

    paths = []
    for i, mask in enumerate(visible_masks(case_objects(case), size)):
        path = os.path.join(folder, f"mask-{case.seed}-{size}-{i}.png")
        Image.fromarray(np.clip(np.rint(mask * 255), 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


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
    case: BenchLayout,
    mode: Mode,
    settings: Settings,
    workdir: str | None = None,
    form: str = "all",
    masks: bool = False,
) -> Layout:
    """The Layout a mode generates for a case with its scene prompt in ``form`` (``workdir``
    holds reference images and masks; ``masks`` gives regions their visible masks)."""
    size = case.size or settings.size
    reference = None
    if (mode.reference_scale > 0 and mode.box_reference) or masks:
        workdir = workdir or tempfile.mkdtemp(prefix="fidelity-")
    if mode.reference_scale > 0 and mode.box_reference:
        reference = box_reference(case, size, os.path.join(workdir, f"reference-{case.seed}.png"))
    regions = []
    if mode.regional:
        paths = mask_files(case, size, workdir) if masks else [None] * len(case.objects)
        regions = [
            Region(prompt=label, box=box, mask=path)
            for (label, box), path in zip(case.objects, paths, strict=True)
        ]
    extra = {} if settings.base_ratio is None else {"base_ratio": settings.base_ratio}
    return Layout(
        prompt=scene_prompt(case, form if mode.regional else "all"),
        width=size,
        height=size,
        regions=regions,
        background_prompt=mode.background if mode.regional else None,
        seed=case.seed,
        **extra,
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


CAPTION_OBJECTS = 18
"""Objects a caption can name within the text encoders' 77-token window (4 tokens each)."""


def crowded_layouts(n: int, objects: int, size: int, seed: int = 0) -> list[BenchLayout]:
    """``n`` crowded cases of ``objects`` small objects on a ``size`` canvas (colours repeat).

    Their caption names as many objects as the prompt window holds (the engine refuses longer
    prompts rather than cutting them)."""
    cases = []
    for i in range(n):
        case_seed = seed * 100_003 + objects * 10_007 + size * 101 + i
        rng = np.random.default_rng(case_seed)
        objs = crowded_objects(rng, objects, min_size=16 / size, max_size=40 / size)
        cases.append(
            BenchLayout(
                caption_for(objs[:CAPTION_OBJECTS]),
                [(o.phrase, o.box) for o in objs],
                seed=case_seed,
                kind="crowded",
                size=size,
            )
        )
    return cases


def occlusion_layouts(n: int, seed: int = 0) -> list[BenchLayout]:
    """``n`` cases of two overlapping objects, the second in front (it hides part of the first)."""
    cases = []
    for i in range(n):
        case_seed = seed * 100_003 + 77_777 + i
        rng = np.random.default_rng(case_seed)
        objs = sample_objects(rng, 2, overlap=True, distinct_colours=True)
        cases.append(
            BenchLayout(
                caption_for(objs), [(o.phrase, o.box) for o in objs], case_seed, kind="occlusion"
            )
        )
    return cases


class RoundTrip:
    """Stands in for a pipeline: draws each region's phrase exactly in its box (regions come
    back to front), then with a ``vae`` encodes and decodes the picture. Scored like a
    generation, it is the ceiling of a model with that VAE."""

    def __init__(self, vae=None):
        self.vae = vae

    def __call__(self, layout: Layout, output_type: str = "np"):
        from types import SimpleNamespace

        objects = shape_objects([(r.prompt, r.box) for r in layout.regions])
        image = render(objects, layout.width).astype(np.float32) / 255.0
        if self.vae is not None:
            import torch

            vae = self.vae
            x = torch.from_numpy(image).permute(2, 0, 1)[None] * 2.0 - 1.0
            x = x.to(device=vae.device, dtype=vae.dtype)
            with torch.no_grad():
                decoded = vae.decode(vae.encode(x).latent_dist.mode()).sample
            image = ((decoded[0].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy()
        return SimpleNamespace(images=[image])


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
    """Scores of one row (mode, scene-prompt form, kind of case) over all its cases."""

    mode: str
    objects: int
    form: str = "all"
    kind: str = "standard"
    size: int = 64
    placed: list[bool] = field(default_factory=list)
    shape_ok: list[bool] = field(default_factory=list)
    """For each placed object (where a shape could be read): whether its shape is right."""
    front: list[float] = field(default_factory=list)
    back: list[float] = field(default_factory=list)
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
    def shape_rate(self) -> float:
        return float(np.mean(self.shape_ok)) if self.shape_ok else math.nan

    @property
    def group(self) -> tuple[str, int, int]:
        """Rows of one group share their cases: (kind, objects, size)."""
        return (self.kind, self.objects, self.size)

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
        pixel_labels = colour_labels(image)
        objects = case_objects(case)
        if case.kind == "crowded":
            h, w = pixel_labels.shape
            boxed = np.zeros((h, w), dtype=bool)
            for obj in objects:
                found = score_box(image, obj.colour, obj.box, pixel_labels)
                result.placed.append(found.placed)
                if found.shape is not None:
                    result.shape_ok.append(found.shape == obj.shape)
                x0, y0, x1, y1 = obj.box
                boxed[round(y0 * h) : round(y1 * h), round(x0 * w) : round(x1 * w)] = True
            coloured = pixel_labels >= 0
            result.bleed.append(float((coloured & ~boxed).sum() / max(1, coloured.sum())))
            return
        scores = score_layout(image, [(o.colour, o.box) for o in objects])
        result.placed += [s.placed for s in scores]
        result.coverage += [s.coverage for s in scores]
        result.bleed += [s.bleed for s in scores]
        visible = visible_masks(objects, image.shape[0])
        alone = [visible_masks([o], image.shape[0])[0].sum() for o in objects]
        for obj, found, seen, full in zip(objects, scores, visible, alone, strict=True):
            # A partly hidden object's blob is not its shape: only whole objects are judged.
            if found.placed and seen.sum() >= 0.95 * full:
                mask = colour_mask(image, obj.colour, pixel_labels)
                shape = classify_shape(mask, obj.box)
                if shape is not None:
                    result.shape_ok.append(shape == obj.shape)
        if case.kind == "occlusion":
            visible = visible > 0.5
            shares = [
                float(colour_mask(image, o.colour, pixel_labels)[v].mean()) if v.any() else 0.0
                for o, v in zip(objects, visible, strict=True)
            ]
            result.back.append(shares[0])
            result.front.append(shares[-1])
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
    forms: Sequence[str] = ("all",),
    progress: Callable[[ModeResult], None] | None = None,
) -> list[ModeResult]:
    """Generate every case in every mode and scene-prompt form through ``pipe`` and score it.

    The plain prompt has no regions, so it runs with the full caption only; occlusion cases
    run every regional mode with boxes and again with visible masks (``<mode>+masks``).
    """
    settings = settings or Settings()
    detector = detector or ColourDetector()
    if settings.blend is not None:
        pipe.regional_blend = settings.blend
    groups: dict[tuple[str, int, int], list[BenchLayout]] = {}
    for case in cases:
        key = (case.kind, len(case.objects), case.size or settings.size)
        groups.setdefault(key, []).append(case)
    results = []
    workdir = tempfile.mkdtemp(prefix="fidelity-")
    # Every UNet evaluation (latent mode's per-block calls, a first pass) goes through conv_in.
    processed = [0]

    def count_pixels(_module, args):
        processed[0] += args[0].shape[0] * args[0].shape[-2] * args[0].shape[-1]

    unet = getattr(pipe, "unet", None)
    hook = None if unet is None else unet.conv_in.register_forward_pre_hook(count_pixels)
    try:
        for (kind, count, size), subset in sorted(groups.items()):
            for name in modes:
                regional = MODES[name].regional
                for form in forms if regional else ("all",):
                    for masks in (False, True) if kind == "occlusion" and regional else (False,):
                        label = f"{name}+masks" if masks else name
                        result = ModeResult(label, count, form, kind, size)
                        for index, case in enumerate(subset):
                            layout = build_layout(
                                case, MODES[name], settings, workdir, form=form, masks=masks
                            )
                            processed[0] = 0
                            start = time.perf_counter()
                            image = pipe(layout=layout, output_type="np").images[0]
                            result.seconds.append(time.perf_counter() - start)
                            if hook is not None:
                                result.unet_pixels.append(processed[0])
                            pixels = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
                            score_image(pixels, case, detector, colour, result)
                            if save_dir:
                                image_name = f"{kind}-{count}obj-{index:03d}-{label}-{form}.png"
                                _save(pixels, save_dir, image_name)
                        results.append(result)
                        if progress is not None:
                            progress(result)
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

    ``time``: seconds per image over the plain prompt's on the same cases; ``time/attn``: over
    attention mode's with the same scene-prompt form; ``work``: UNet pixels processed per image
    over the plain prompt's (every UNet call counted, so latent mode's per-prompt calls and a
    first pass show; attention's extra tokens do not). ``front``/``back`` appear when occlusion
    rows do.
    """

    def base(mode: str, value: Callable[[ModeResult], float], by_form: bool) -> dict:
        return {(r.group, r.form if by_form else None): value(r) for r in results if r.mode == mode}

    plain = base("plain", lambda r: r.seconds_per_image, False)
    attention = base("attention", lambda r: r.seconds_per_image, True)
    plain_work = base("plain", lambda r: float(np.mean(r.unet_pixels or [math.nan])), False)
    occlusion = any(r.front for r in results)
    header = (
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
    ) + (("front", "back") if occlusion else ())
    rows = [header]

    def ratio(value: float, reference: float) -> str:
        if math.isnan(reference) or math.isnan(value):
            return "-"
        return f"{value / reference:.2f}x"

    def number(value: float, style: str = ".2f") -> str:
        return "-" if math.isnan(value) else format(value, style)

    for r in results:
        work = float(np.mean(r.unet_pixels or [math.nan]))
        row = (
            f"{r.objects}{'*' if r.kind == 'crowded' else ''}",
            str(r.size),
            r.form if r.mode != "plain" else "plain",
            r.mode,
            f"{r.placement:.0%}",
            number(r.shape_rate, ".0%"),
            number(r.mean_coverage),
            number(r.mean_bleed),
            number(r.map50),
            f"{r.seconds_per_image:.3f}",
            ratio(r.seconds_per_image, plain.get((r.group, None), math.nan)),
            ratio(r.seconds_per_image, attention.get((r.group, r.form), math.nan)),
            ratio(work, plain_work.get((r.group, None), math.nan)),
        )
        if occlusion:
            row += (
                number(float(np.mean(r.front)) if r.front else math.nan),
                number(float(np.mean(r.back)) if r.back else math.nan),
            )
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _crowded_spec(text: str) -> tuple[int, int]:
    objects, _, size = text.partition("@")
    try:
        return int(objects), int(size)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write OBJECTS@SIZE, e.g. 36@384") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes", help="model spec (alias, folder, file, repo id)")
    p.add_argument("--n", type=int, default=50, help="layouts per object count")
    p.add_argument(
        "--objects", type=int, nargs="+", default=[2, 4], help="objects per layout (1-4)"
    )
    p.add_argument(
        "--modes",
        nargs="+",
        default=["plain", "attention"],
        help=f"subset of {list(MODES)} ('all' for every one this engine has)",
    )
    p.add_argument(
        "--forms", nargs="+", default=list(FORMS), choices=FORMS, help="scene-prompt forms"
    )
    p.add_argument(
        "--crowded",
        type=_crowded_spec,
        nargs="*",
        default=[],
        metavar="OBJECTS@SIZE",
        help="crowded rows, e.g. 16@256 36@384 100@640 (scored box by box)",
    )
    p.add_argument("--crowded-n", type=int, default=2, help="layouts per crowded row")
    p.add_argument(
        "--crowded-forms", nargs="+", default=["none"], choices=FORMS, help="their scene prompts"
    )
    p.add_argument("--occlusion", type=int, default=0, help="overlapping two-object layouts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--base-ratio", type=float, default=None, help="default: the Layout's default")
    p.add_argument(
        "--blend",
        choices=["joint", "weighted"],
        default=None,
        help="how region pixels share attention among blocks (default: the pipeline's)",
    )
    p.add_argument(
        "--round-trip",
        action="store_true",
        help="add ceiling rows: the ground truth, and the same through the model's VAE",
    )
    p.add_argument("--layouts", help="COCO-style layout JSON instead of shapes-world layouts")
    p.add_argument("--detector", default="colour", help="'colour' or 'module:factory'")
    p.add_argument("--save-images", help="folder to write every generated image to")
    p.add_argument("--json", help="also write the results as JSON to this file")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[ModeResult]:
    """Run the benchmark from the command line and print the table."""
    args = parse_args(argv)
    from engine.loading.assemble import load_pipeline
    from engine.loading.locate import LoadOptions, resolve_model

    modes = available_modes() if args.modes == ["all"] else args.modes
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}; registered: {list(MODES)}")
    if args.layouts:
        cases = load_layouts(args.layouts)
    else:
        cases = [c for k in args.objects for c in shapes_layouts(args.n, k, args.seed)]
    crowded = [
        c
        for objects, size in args.crowded
        for c in crowded_layouts(args.crowded_n, objects, size, args.seed)
    ]
    occluded = occlusion_layouts(args.occlusion, args.seed)
    detector, colour = load_detector(args.detector)
    options = LoadOptions(device=args.device)
    pipe = load_pipeline(resolve_model(args.model, options), options)
    settings = Settings(args.size, args.steps, args.guidance, args.base_ratio, args.blend)

    def progress(result: ModeResult) -> None:
        print(
            f"  {result.kind} {result.objects} objects {result.size} px {result.form} "
            f"{result.mode}: placed {result.placement:.0%}",
            file=sys.stderr,
            flush=True,
        )

    runs = [(cases, args.forms), (crowded, args.crowded_forms), (occluded, ["none"])]
    results = []
    for subset, forms in runs:
        if subset:
            results += run_benchmark(
                pipe, subset, modes, detector, colour, settings, args.save_images, forms, progress
            )
        if subset and args.round_trip:
            for label, stand_in in (
                ("truth", RoundTrip()),
                ("vae round trip", RoundTrip(pipe.vae)),
            ):
                for result in run_benchmark(
                    stand_in, subset, ["attention"], detector, colour, settings, None, forms[:1]
                ):
                    if result.mode == "attention":  # the stand-in draws no masks: one row
                        result.mode = label
                        results.append(result)
    total = len(cases) + len(crowded) + len(occluded)
    print(f"model {args.model}, {total} layouts; {settings.describe()}")
    if crowded:
        print("(* crowded rows, scored box by box)")
    print(format_table(results))
    if args.json:
        rows = [
            {
                "objects": r.objects,
                "kind": r.kind,
                "size": r.size,
                "form": r.form,
                "mode": r.mode,
                "placement": r.placement,
                "shape": r.shape_rate,
                "front": float(np.mean(r.front)) if r.front else None,
                "back": float(np.mean(r.back)) if r.back else None,
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
