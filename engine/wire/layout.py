"""The Layout: the project's wire schema, shared by the engine and the Blender add-on.

A Layout says what to generate and where: a scene prompt, generation settings and a list of
regions, each with its own prompt, a normalized box and an optional mask image. It travels as
JSON (a file for ``python -m engine generate``, an inline object in ``engine serve`` requests).

This module is the single owner of the schema and its validation. Like all of ``engine.wire`` it
uses the standard library only, so the add-on ships the same package inside Blender.

Coordinates: ``box`` is ``[x0, y0, x1, y1]`` normalized to the image, origin at the top-left,
x to the right, y down. Boxes that stick out of the frame are clipped to it; boxes with no area
inside the frame are rejected.

Limits (``LIMITS``; ``engine serve`` reports them in ``hello``): a Layout exceeding one is
refused with a :class:`LimitError` naming the limit and its value, never cut. Text must be valid
Unicode (no unpaired surrogates). Image paths in a Layout *file* must stay inside the file's
folder unless the reader allows other places (``allow_outside``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .files import write_text_atomic
from .phrases import strip_phrases

SCHEMA_VERSION = 1
"""Version of the Layout JSON. Bumped only for changes an older reader cannot ignore."""

MIN_SIZE = 64
MAX_SIZE = 4096
SIZE_MULTIPLE = 8
"""Image sides must be multiples of the VAE's downsampling factor (8 for SDXL)."""

MAX_REGIONS = 1024
MAX_STEPS = 1000
MAX_PROMPT_CHARS = 4096
"""Characters per prompt; the model's token limit (``prompt_tokens``) is checked on top."""
MAX_PATH_CHARS = 4096
MAX_NAME_CHARS = 1024
MAX_LAYOUT_CHARS = 16 * 1024 * 1024
"""Characters of a Layout file or JSON text."""
MAX_JSON_DEPTH = 32
"""Nesting of JSON arrays and objects; a Layout needs 4."""
MAX_INPUT_PIXELS = 8192 * 8192
"""Pixels of any image a Layout names (mask, depth, reference, init image, object image),
read from the file's header before it is decoded."""
MAX_PROMPT_TOKENS = 77
"""Tokens per prompt, start and end tokens included: SDXL's CLIP window. Longer prompts are
refused, never cut (the engine checks with the model's own tokenizers)."""

LIMITS: dict[str, int] = {
    "image_side": MAX_SIZE,
    "regions": MAX_REGIONS,
    "steps": MAX_STEPS,
    "prompt_chars": MAX_PROMPT_CHARS,
    "path_chars": MAX_PATH_CHARS,
    "name_chars": MAX_NAME_CHARS,
    "layout_chars": MAX_LAYOUT_CHARS,
    "json_depth": MAX_JSON_DEPTH,
    "input_pixels": MAX_INPUT_PIXELS,
    "prompt_tokens": MAX_PROMPT_TOKENS,
}
"""The Layout's documented limits, by the name errors and ``hello`` use."""

IMAGE_FIELDS = ("depth", "reference", "init_image")
"""Layout fields holding image paths, resolved, checked and saved like region masks."""

REGION_IMAGE_FIELDS = ("mask", "image")
"""Region fields holding image paths."""

MODES = ("attention", "latent")
"""Regional prompting modes this schema knows. ``attention`` masks cross-attention per region
(about the cost of a plain image); ``latent`` denoises each distinct prompt with its own UNet
call and blends the predictions by feathered masks: about ``(R + 3) / 2`` times the cost for
``R`` distinct region prompts (``(R + 2) / 2`` with ``base_ratio`` 0), less where small
regions run on crops."""


class LayoutError(ValueError):
    """A Layout that cannot be used. The message says which field is wrong and how to fix it."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field

    def for_field(self, field: str) -> LayoutError:
        """The same error said of ``field`` (a file read once for several fields)."""
        renamed = self.__class__.__new__(self.__class__)
        Exception.__init__(renamed, str(self).replace(f"'{self.field}'", f"'{field}'", 1))
        renamed.__dict__.update(self.__dict__)
        renamed.field = field
        return renamed


class LimitError(LayoutError):
    """A documented limit exceeded: ``limit`` names it (a key of ``LIMITS`` or of the engine's
    ``hello`` limits) and ``maximum`` is its value."""

    code = "limit_exceeded"

    def __init__(self, message: str, field: str | None, limit: str, maximum: float):
        super().__init__(message, field)
        self.limit = limit
        self.maximum = maximum


@dataclass
class Region:
    """One labeled area of the image: its prompt appears inside ``box`` (and ``mask``, if given)."""

    prompt: str
    box: tuple[float, float, float, float]
    mask: str | None = None
    """Grayscale PNG, white where the region is. Relative paths resolve against the Layout's folder."""
    weight: float = 1.0
    """Strength of the region's prompt inside its mask; 0 turns the region off."""
    name: str = ""
    """Free label (the Blender object's name); carried through for reports and provenance."""
    strength: float | None = None
    """How freely the region is regenerated from the Layout's ``init_image``: 0 keeps it, 1
    ignores it. ``None``: the Layout's ``strength``. Needs ``init_image``."""
    depth_scale: float | None = None
    """Depth ControlNet strength inside the region (0: its shape is free to leave the proxy's).
    ``None``: the Layout's ``depth_scale``."""
    image: str | None = None
    """Reference image of the object (IP-Adapter), applied inside the region's mask only;
    resolved like ``mask``."""
    image_scale: float = 0.5
    """Strength of ``image`` inside the region; 0 ignores the image."""


@dataclass
class Layout:
    """A complete generation request: scene prompt, settings and regions."""

    prompt: str
    width: int = 1024
    height: int = 1024
    negative_prompt: str = ""
    background_prompt: str | None = None
    """What pixels outside every region see. ``None``: the scene prompt with region phrases removed."""
    base_ratio: float = 0.2
    """How much of the scene prompt is blended into a region's pixels (0 = region prompt only)."""
    seed: int = 0
    steps: int = 30
    guidance_scale: float = 6.0
    mode: str = "attention"
    regions: list[Region] = field(default_factory=list)
    depth: str | None = None
    """Camera depth map (16-bit grayscale PNG, near = white), resolved like region masks."""
    depth_scale: float = 1.0
    """Conditioning scale of the depth map for a depth ControlNet (when the engine has one)
    outside the regions that set their own; 0 turns depth conditioning off."""
    depth_start: float = 0.0
    """Fraction of the steps after which the depth ControlNet starts acting."""
    depth_end: float = 1.0
    """Fraction of the steps after which the depth ControlNet stops acting."""
    reference: str | None = None
    """RGB image (e.g. the add-on's flat-colour render of the proxies) whose layout the first
    steps are pulled toward inside the regions; resolved like region masks. ``None`` with
    ``reference_scale`` above 0: the engine makes one first, with GLIGEN when it has a GLIGEN
    model, else with a low-resolution regional pass."""
    reference_scale: float = 0.0
    """Strength of the pull toward ``reference`` (gamma); 0 turns the reference pull off. Each
    guided step moves a region's latents ``2 * gamma`` of the way to the reference's (more for
    small regions, never past it): 0.25 goes halfway, 0.5 all the way."""
    reference_fraction: float | None = None
    """Fraction of the steps, from the first, during which the reference pulls. ``None``: the
    model's recommended fraction (0.1, LSReGen's for SDXL, unless the model folder says
    otherwise; see ``engine.loading.defaults``)."""
    init_image: str | None = None
    """Image to start from (a previous result, a painted plate), resolved like region masks.
    Each region keeps it according to its ``strength``; the background according to the
    Layout's ``strength``."""
    strength: float = 1.0
    """With ``init_image``: how freely pixels outside every region (and regions without their
    own strength) are regenerated. 0 keeps the init image, 1 ignores it."""
    keep_outside: bool = False
    """With ``init_image``: copy the init image's pixels exactly wherever no region with
    strength above 0 is (beyond a narrow feathered band), so only those regions change.
    Needs ``strength`` 0."""
    version: int = SCHEMA_VERSION

    # -- JSON ---------------------------------------------------------------------------------

    @classmethod
    def from_dict(
        cls, data: Any, base_dir: str | None = None, allow_outside: bool = True
    ) -> Layout:
        """Validate a decoded JSON object and build a Layout.

        ``base_dir`` is the folder relative mask paths resolve against (the Layout file's folder).
        Without it (an inline Layout), mask paths must be absolute. With ``base_dir`` and
        ``allow_outside`` False, every image path must lie inside ``base_dir`` (symlinks
        resolved).
        """
        return _parse_layout(data, base_dir, None if allow_outside else base_dir)

    @classmethod
    def from_json(
        cls, text: str, base_dir: str | None = None, allow_outside: bool = True
    ) -> Layout:
        """Parse and validate a Layout from JSON text (at most ``MAX_LAYOUT_CHARS``)."""
        if len(text) > MAX_LAYOUT_CHARS:
            raise LimitError(
                f"the Layout is {len(text)} characters long; the limit is {MAX_LAYOUT_CHARS}",
                None,
                "layout_chars",
                MAX_LAYOUT_CHARS,
            )
        data = parse_json(text, "Layout")
        return cls.from_dict(data, base_dir, allow_outside)

    @classmethod
    def load(cls, path: str | os.PathLike[str], allow_outside: bool = False) -> Layout:
        """Read a Layout file; image paths in it are relative to its folder and, unless
        ``allow_outside``, must stay inside it."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read(MAX_LAYOUT_CHARS + 1)
        except OSError as exc:
            raise LayoutError(f"cannot read Layout file {path!r}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise LayoutError(
                f"Layout file {path!r} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                "save it as UTF-8 JSON"
            ) from None
        folder = os.path.dirname(os.path.abspath(path))
        return cls.from_json(text, base_dir=folder, allow_outside=allow_outside)

    def to_dict(self) -> dict[str, Any]:
        """The Layout as a JSON-ready dict (mask paths as stored: absolute after loading)."""
        data = asdict(self)
        for region in data["regions"]:
            region["box"] = list(region["box"])
        return data

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the Layout as JSON, mask paths made relative to the file's folder where possible.

        The file is written under a temporary name and renamed, so readers never see half a file.
        """
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        data = self.to_dict()
        images = [(data, key) for key in IMAGE_FIELDS]
        images += [(r, key) for r in data["regions"] for key in REGION_IMAGE_FIELDS]
        for holder, key in images:
            if holder[key] and os.path.isabs(holder[key]):
                # Another drive on Windows has no relative path: keep it absolute.
                with contextlib.suppress(ValueError):
                    holder[key] = os.path.relpath(holder[key], folder).replace(os.sep, "/")
        write_text_atomic(path, json.dumps(data, indent=2, allow_nan=False) + "\n")

    # -- Derived values -----------------------------------------------------------------------

    def effective_background_prompt(self) -> str:
        """The prompt seen outside every region.

        When the scene prompt also names the regions' objects, showing it outside the boxes invites
        those objects there and region control vanishes; so by default each region's phrase is cut
        out of the scene prompt for the outside area.
        """
        if self.background_prompt is not None:
            return self.background_prompt
        return strip_phrases(self.prompt, [r.prompt for r in self.regions])


# -- Validation ---------------------------------------------------------------------------------

_LAYOUT_FIELDS = {f.name for f in fields(Layout)}
_REGION_FIELDS = {f.name for f in fields(Region)}


def _reject_constant(name: str) -> float:
    raise LayoutError(f"Layout JSON contains {name}; use finite numbers only")


def parse_json(text: str, what: str) -> Any:
    """Decode JSON text that must hold finite numbers and nest at most ``MAX_JSON_DEPTH`` deep.

    Raises LayoutError (LimitError for the depth) saying what is wrong with ``what``.
    """
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        data = None
    except ValueError as exc:
        raise LayoutError(f"{what} is not valid JSON: {exc}") from None
    else:
        if json_depth(data, MAX_JSON_DEPTH) <= MAX_JSON_DEPTH:
            return data
    raise LimitError(
        f"{what} nests arrays or objects more than {MAX_JSON_DEPTH} deep",
        None,
        "json_depth",
        MAX_JSON_DEPTH,
    )


def json_depth(value: Any, stop: int) -> int:
    """How deep arrays and objects nest in decoded JSON (a scalar is 0), counted iteratively up
    to ``stop + 1`` so no input can exhaust the stack."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > stop:
                return deepest
            stack.extend((child, depth + 1) for child in children)
    return deepest


def invalid_unicode(text: str) -> bool:
    """True when ``text`` holds unpaired surrogates (JSON ``"\\ud800"``), which no encoder,
    tokenizer or file system accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def short(value: Any, chars: int = 80) -> str:
    """``repr(value)`` cut to ``chars`` for messages: inputs may be megabytes long."""
    text = repr(value) if not isinstance(value, (list, dict)) else _short_container(value)
    return text if len(text) <= chars else text[: chars - 3] + "..."


def _short_container(value: Any) -> str:
    # repr of a deeply nested or huge container is itself unbounded: show its kind and size.
    kind = "list" if isinstance(value, list) else "object"
    if json_depth(value, 3) <= 2 and len(value) <= 8:
        with contextlib.suppress(RecursionError):
            return repr(value)
    return f"<{kind} of {len(value)} items>"


def _parse_layout(data: Any, base_dir: str | None, root: str | None = None) -> Layout:
    if not isinstance(data, dict):
        raise LayoutError(f"a Layout is a JSON object, got {type(data).__name__}")
    unknown = sorted(str(key) for key in set(data) - _LAYOUT_FIELDS)
    if unknown:
        raise LayoutError(
            f"unknown Layout field(s) {short(unknown)}; known fields are {sorted(_LAYOUT_FIELDS)}",
            _field_name(unknown[0]),
        )
    version = _int(data, "version", SCHEMA_VERSION, 1, 1_000_000)
    if version > SCHEMA_VERSION:
        raise LayoutError(
            f"Layout version {version} is newer than this engine understands ({SCHEMA_VERSION}); "
            "update the engine",
            "version",
        )
    if "prompt" not in data:
        raise LayoutError("Layout needs a 'prompt' describing the whole scene", "prompt")
    width = _int(data, "width", 1024, MIN_SIZE, MAX_SIZE)
    height = _int(data, "height", 1024, MIN_SIZE, MAX_SIZE)
    for name, value in (("width", width), ("height", height)):
        if value % SIZE_MULTIPLE:
            raise LayoutError(
                f"'{name}' must be a multiple of {SIZE_MULTIPLE}, got {value} "
                f"(nearest: {round(value / SIZE_MULTIPLE) * SIZE_MULTIPLE})",
                name,
            )
    mode = _str(data, "mode", "attention")
    if mode not in MODES:
        raise LayoutError(f"unknown mode {short(mode)}; choose one of {list(MODES)}", "mode")
    background = data.get("background_prompt")
    if background is not None and not isinstance(background, str):
        raise LayoutError("'background_prompt' must be a string or null", "background_prompt")
    if background is not None:
        _check_text(background, "background_prompt", MAX_PROMPT_CHARS, "prompt_chars")
    regions_data = data.get("regions", [])
    if not isinstance(regions_data, list):
        raise LayoutError("'regions' must be a list of region objects", "regions")
    if len(regions_data) > MAX_REGIONS:
        raise LimitError(
            f"the Layout has {len(regions_data)} regions; the limit is {MAX_REGIONS}. Label "
            "fewer objects, or merge objects that share a prompt into one region mask",
            "regions",
            "regions",
            MAX_REGIONS,
        )
    regions = [_parse_region(item, i, base_dir, root) for i, item in enumerate(regions_data)]
    depth = _path(data.get("depth"), "depth", base_dir, root)
    depth_start = _float(data, "depth_start", 0.0, 0.0, 1.0)
    depth_end = _float(data, "depth_end", 1.0, 0.0, 1.0)
    if depth_end <= depth_start:
        raise LayoutError(
            f"'depth_end' ({depth_end:g}) must be after 'depth_start' ({depth_start:g}): they are "
            "the fractions of the steps between which depth conditioning acts",
            "depth_end",
        )
    init_image = _path(data.get("init_image"), "init_image", base_dir, root)
    strength = _float(data, "strength", 1.0, 0.0, 1.0)
    keep_outside = _bool(data, "keep_outside", False)
    _check_init_image(init_image, strength, keep_outside, regions)
    return Layout(
        prompt=_str(data, "prompt", ""),
        width=width,
        height=height,
        negative_prompt=_str(data, "negative_prompt", ""),
        background_prompt=background,
        base_ratio=_float(data, "base_ratio", 0.2, 0.0, 1.0),
        seed=_int(data, "seed", 0, 0, 2**63 - 1),
        steps=_int(data, "steps", 30, 1, MAX_STEPS),
        guidance_scale=_float(data, "guidance_scale", 6.0, 0.0, 100.0),
        mode=mode,
        regions=regions,
        depth=depth,
        depth_scale=_float(data, "depth_scale", 1.0, 0.0, 5.0),
        depth_start=depth_start,
        depth_end=depth_end,
        reference=_path(data.get("reference"), "reference", base_dir, root),
        reference_scale=_float(data, "reference_scale", 0.0, 0.0, 10.0),
        reference_fraction=_optional_float(data, "reference_fraction", 0.0, 1.0),
        init_image=init_image,
        strength=strength,
        keep_outside=keep_outside,
        version=version,
    )


def _check_init_image(
    init_image: str | None, strength: float, keep_outside: bool, regions: list[Region]
) -> None:
    """Strengths and ``keep_outside`` say how much of ``init_image`` to keep: they need one."""
    if init_image is None:
        used = [("strength", strength != 1.0), ("keep_outside", keep_outside)]
        used += [(f"regions[{i}].strength", r.strength is not None) for i, r in enumerate(regions)]
        for name, is_set in used:
            if is_set:
                raise LayoutError(
                    f"'{name}' says how much of 'init_image' to keep, but there is no "
                    "'init_image'; give the image to start from or remove it",
                    name,
                )
    if keep_outside and strength > 0.0:
        raise LayoutError(
            f"'keep_outside' keeps every pixel outside the regenerated regions, but the "
            f"background 'strength' is {strength:g}; set 'strength' to 0 (and a region's "
            "'strength' above 0 for what should change)",
            "strength",
        )


def _parse_region(data: Any, index: int, base_dir: str | None, root: str | None) -> Region:
    where = f"regions[{index}]"
    if not isinstance(data, dict):
        raise LayoutError(f"{where} must be an object with 'prompt' and 'box'", where)
    unknown = sorted(str(key) for key in set(data) - _REGION_FIELDS)
    if unknown:
        raise LayoutError(
            f"{where}: unknown field(s) {short(unknown)}; known fields are "
            f"{sorted(_REGION_FIELDS)}",
            f"{where}.{_field_name(unknown[0])}",
        )
    prompt = _str(data, "prompt", None, where)
    if not prompt.strip():
        raise LayoutError(f"{where}.prompt is empty; say what should appear in the box", where)
    box = _box(data.get("box"), where)
    return Region(
        prompt=prompt,
        box=box,
        mask=_path(data.get("mask"), f"{where}.mask", base_dir, root),
        weight=_float(data, "weight", 1.0, 0.0, 10.0, where),
        name=_str(data, "name", "", where),
        strength=_optional_float(data, "strength", 0.0, 1.0, where),
        depth_scale=_optional_float(data, "depth_scale", 0.0, 5.0, where),
        image=_path(data.get("image"), f"{where}.image", base_dir, root),
        image_scale=_float(data, "image_scale", 0.5, 0.0, 5.0, where),
    )


def _path(value: Any, name: str, base_dir: str | None, root: str | None = None) -> str | None:
    """An optional image path, made absolute against ``base_dir``; with ``root``, it must
    resolve (symlinks followed) inside ``root``."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise LayoutError(f"'{name}' must be a PNG path or null", name)
    _check_text(value, name, MAX_PATH_CHARS, "path_chars")
    if "\x00" in value:
        raise LayoutError(f"'{name}' {short(value)} contains a NUL character; fix the path", name)
    if os.path.isabs(value):
        path = os.path.normpath(value)
    elif base_dir is None:
        raise LayoutError(
            f"'{name}' {short(value)} is relative, but this Layout has no folder to resolve it "
            "against; send absolute paths with inline Layouts",
            name,
        )
    else:
        path = os.path.normpath(os.path.join(base_dir, value))
    if root is not None and not _inside(path, root):
        raise LayoutError(
            f"'{name}' {short(value)} lies outside the Layout file's folder {root!r}; keep the "
            "Layout's images inside its folder, or allow other places (engine generate "
            "--allow-outside-inputs)",
            name,
        )
    return path


def _inside(path: str, root: str) -> bool:
    """Whether ``path`` resolves (symlinks followed) to ``root`` or a place under it."""
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    try:
        return os.path.commonpath([real, real_root]) == real_root
    except ValueError:  # another drive on Windows
        return False


def _check_text(value: str, name: str, limit: int, limit_name: str) -> None:
    """Refuse text over ``limit`` characters or holding invalid Unicode."""
    if len(value) > limit:
        raise LimitError(
            f"'{name}' is {len(value)} characters long; the limit is {limit}",
            name,
            limit_name,
            limit,
        )
    if invalid_unicode(value):
        raise LayoutError(
            f"'{name}' is not valid Unicode (it holds an unpaired surrogate such as \\ud800); "
            "send UTF-8 text",
            name,
        )


def _field_name(key: str) -> str:
    """A client's unknown key as a field name: short and always encodable."""
    key = key[:64]
    return key if not invalid_unicode(key) else key.encode("utf-8", "replace").decode()


def _box(value: Any, where: str) -> tuple[float, float, float, float]:
    name = f"{where}.box"
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise LayoutError(f"{name} must be [x0, y0, x1, y1] in 0..1, got {short(value)}", name)
    numbers = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise LayoutError(f"{name} must hold four finite numbers, got {short(value)}", name)
        numbers.append(float(v))
    x0, y0, x1, y1 = numbers
    if x1 <= x0 or y1 <= y0:
        raise LayoutError(
            f"{name} {value!r} has no area: need x0 < x1 and y0 < y1 (origin top-left)",
            name,
        )
    clipped = (max(x0, 0.0), max(y0, 0.0), min(x1, 1.0), min(y1, 1.0))
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        raise LayoutError(f"{name} {value!r} lies entirely outside the image [0, 1]", name)
    return clipped


def _suffix(where: str | None, key: str) -> str:
    return f"{where}.{key}" if where else key


def _str(data: dict, key: str, default: str | None, where: str | None = None) -> str:
    name = _suffix(where, key)
    if key not in data:
        if default is None:
            raise LayoutError(f"'{name}' is required", name)
        return default
    value = data[key]
    if not isinstance(value, str):
        raise LayoutError(f"'{name}' must be a string, got {type(value).__name__}", name)
    if key == "name":
        _check_text(value, name, MAX_NAME_CHARS, "name_chars")
    else:
        _check_text(value, name, MAX_PROMPT_CHARS, "prompt_chars")
    return value


def _int(data: dict, key: str, default: int, low: int, high: int, where: str | None = None) -> int:
    name = _suffix(where, key)
    value = data.get(key, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise LayoutError(f"'{name}' must be an integer, got {short(value)}", name)
    if not low <= value <= high:
        raise LayoutError(f"'{name}' must be between {low} and {high}, got {short(value)}", name)
    return value


def _bool(data: dict, key: str, default: bool) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise LayoutError(f"'{key}' must be true or false, got {short(value)}", key)
    return value


def _optional_float(
    data: dict, key: str, low: float, high: float, where: str | None = None
) -> float | None:
    if data.get(key) is None:
        return None
    return _float(data, key, 0.0, low, high, where)


def _float(
    data: dict,
    key: str,
    default: float,
    low: float,
    high: float,
    where: str | None = None,
) -> float:
    name = _suffix(where, key)
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LayoutError(f"'{name}' must be a finite number, got {short(value)}", name)
    if not low <= value <= high:
        raise LayoutError(f"'{name}' must be between {low} and {high}, got {short(value)}", name)
    return float(value)
