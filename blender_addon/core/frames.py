"""Frame bookkeeping for animation renders: ranges, file names, atomic writes, sidecars, resume.

No bpy, so every rule about which frame is done and how a file reaches
its final name can be tested without Blender.

A frame is *complete* when its image and its sidecar JSON both exist and agree: the sidecar names
the image, the image's size in bytes and SHA-256 match what the sidecar recorded, and the image
decodes (every PNG chunk's CRC, the whole compressed stream, the pixel rows the header declares).
The image is always published before its sidecar, so the sidecar is the commit marker: a run
killed between the two leaves an image without a sidecar, which counts as not done and is
rendered again. A complete frame whose *fingerprint* (its Layout with the images' contents, seed,
model, engine options and settings) differs from the one a render would have now is *stale*.

Several renderers may share one output folder (farm machines on one range): a renderer *claims*
a frame before writing anything for it, with a claim file created atomically beside the frame
(``.frame_0001.claim``: host, process id, a random token) whose modification time is the
owner's heartbeat. A claim is taken over only when its owner is dead (same host, process gone)
or silent (no heartbeat for ``STALE_SECONDS``). Temporary files of a frame are removed only by
the renderer holding its claim, so no renderer touches another live renderer's files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import struct
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..wire.files import write_text_atomic
from ..wire.layout import IMAGE_FIELDS, REGION_IMAGE_FIELDS
from .errors import UserError
from .png import PNG_SIGNATURE, png_size

SIDECAR_FORMAT = "layout-diffusion-frame"
SIDECAR_VERSION = 1
DEFAULT_PATTERN = "frame_####"

_PARTIAL = ".partial-"
# Our own temporary names: ".<name>.partial-<pid><ext>" (images), the Layout module's
# ".<name>.<pid>.tmp" (JSON), a claim being written (".<name>.claim.<pid>.<hex>.tmp") and one
# moved aside while being taken over. Nothing else in an output folder is ever removed.
_TEMP_NAME = re.compile(
    r"^\..+(\.partial-\d+(\.[A-Za-z0-9]+)?|\.\d+\.tmp|\.claim\.(stale-[0-9a-f]+|\d+\.[0-9a-f]+\.tmp))$"
)

CLAIM_FORMAT = "layout-diffusion-claim"
HEARTBEAT_SECONDS = 5.0
"""How often a renderer refreshes the claims it holds."""
STALE_SECONDS = 60.0
"""A claim not refreshed for this long belongs to a silent renderer and may be taken over."""


class FrameSpecError(UserError, ValueError):
    """A frame list the user typed that cannot be read; the message shows the accepted forms."""


# -- Frame ranges -----------------------------------------------------------------------------


def parse_frames(spec: str, step: int = 1) -> list[int]:
    """Frames named by ``spec``: ``"7"``, ``"1-48"``, ``"1-10,20-30"``; sorted, without repeats.

    ``step`` keeps every step-th frame of each range, counted from the range's first frame
    (as Blender's Frame Step does).
    """
    if step < 1:
        raise FrameSpecError(f"frame step must be 1 or more, got {step}")
    frames: set[int] = set()
    parts = [p.strip() for p in spec.split(",")]
    if not spec.strip() or not all(parts):
        raise FrameSpecError(f"no frames in {spec!r}; write e.g. '1-48' or '1,5,10-12'")
    for part in parts:
        match = re.fullmatch(r"(-?\d+)(?:\s*(?:-|\.\.)\s*(-?\d+))?", part)
        if not match:
            raise FrameSpecError(
                f"cannot read frames {part!r} in {spec!r}; write e.g. '1-48' or '1,5,10-12'"
            )
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise FrameSpecError(f"frame range {part!r} runs backwards; write '{last}-{first}'")
        frames.update(range(first, last + 1, step))
    return sorted(frames)


# -- Names ------------------------------------------------------------------------------------


def frame_name(frame: int, pattern: str = DEFAULT_PATTERN) -> str:
    """A frame's file stem: the last run of ``#`` in ``pattern`` becomes the zero-padded number.

    Without any ``#`` four digits are appended, as Blender does for output paths.
    """
    runs = list(re.finditer(r"#+", pattern))
    if not runs:
        return f"{pattern}{frame:04d}"
    run = runs[-1]
    width = run.end() - run.start()
    number = f"-{abs(frame):0{width}d}" if frame < 0 else f"{frame:0{width}d}"
    return pattern[: run.start()] + number + pattern[run.end() :]


@dataclass(frozen=True)
class FramePaths:
    """Where one frame's files live inside an output folder."""

    frame: int
    image: str
    sidecar: str
    layout_dir: str
    """Folder for the frame's masks and depth map, which the sidecar's Layout points at."""


def frame_paths(out_dir: str, frame: int) -> FramePaths:
    """The image, sidecar and layout folder of ``frame`` in ``out_dir``."""
    stem = frame_name(frame)
    return FramePaths(
        frame=frame,
        image=os.path.join(out_dir, stem + ".png"),
        sidecar=os.path.join(out_dir, stem + ".json"),
        layout_dir=os.path.join(out_dir, "layout", stem),
    )


def temp_path(path: str) -> str:
    """A hidden temporary name next to ``path`` with the same extension, unique to this process.

    Files are produced under this name and renamed onto ``path`` with :func:`publish`, so a
    file with the final name is always whole.
    """
    folder, name = os.path.split(path)
    stem, ext = os.path.splitext(name)
    return os.path.join(folder, f".{stem}{_PARTIAL}{os.getpid()}{ext}")


def publish(tmp: str, path: str) -> None:
    """Flush ``tmp`` to disk and rename it onto ``path`` in one atomic step."""
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def is_temp_name(name: str) -> bool:
    """True for the temporary names this module and the Layout writer create."""
    return bool(_TEMP_NAME.match(name))


def sweep_temp_files(
    folder: str, owner: Owner | None = None, stale_seconds: float = STALE_SECONDS
) -> list[str]:
    """Delete temporary files killed runs left in ``folder``; return the paths removed.

    Each frame's files are removed under a claim on that frame (:func:`try_claim`), so the
    files of a frame another live renderer holds are never touched.
    """
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    stems = sorted({n.lstrip(".").split(".")[0] for n in names if is_temp_name(n)})
    owner = owner or Owner.current()
    removed = []
    for stem in stems:
        paths = FramePaths(
            frame=-1,
            image=os.path.join(folder, stem + ".png"),
            sidecar=os.path.join(folder, stem + ".json"),
            layout_dir=os.path.join(folder, "layout", stem),
        )
        claim = try_claim(paths, owner, stale_seconds)
        if claim is None:
            continue
        try:
            removed += sweep_frame(claim, paths)
        finally:
            release(claim)
    return removed


# -- Sidecars ---------------------------------------------------------------------------------


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def make_sidecar(
    paths: FramePaths,
    layout: Mapping[str, Any],
    *,
    seed: int,
    model: str,
    engine: Mapping[str, Any],
    settings: Mapping[str, Any],
    timings: Mapping[str, float],
    fingerprint: str | None = None,
) -> dict[str, Any]:
    """The sidecar record of a frame whose image is already at ``paths.image``.

    ``fingerprint`` (:func:`fingerprint`) is what resume compares to find stale frames.

    ``layout`` is the Layout as sent to the engine (absolute paths); paths inside the frame's
    output folder are stored relative to it, so the folder can be moved and
    ``Layout.from_dict(sidecar["layout"], base_dir=<sidecar folder>)`` still finds the masks.
    """
    folder = os.path.dirname(os.path.abspath(paths.sidecar))
    size = png_size(paths.image)
    if size is None:
        raise ValueError(f"{paths.image} is not a PNG file")
    width, height = size
    return {
        "format": SIDECAR_FORMAT,
        "format_version": SIDECAR_VERSION,
        "frame": paths.frame,
        "image": os.path.basename(paths.image),
        "image_bytes": os.path.getsize(paths.image),
        "image_sha256": file_sha256(paths.image),
        "image_size": [width, height],
        "seed": seed,
        "model": model,
        "engine": dict(engine),
        "settings": dict(settings),
        "timings": {k: round(float(v), 4) for k, v in timings.items()},
        "layout": relative_layout(layout, folder),
        "fingerprint": fingerprint,
    }


def relative_layout(layout: Mapping[str, Any], folder: str) -> dict[str, Any]:
    """A copy of a Layout dict with its image paths (masks, depth, ...) relative to ``folder``."""
    data = json.loads(json.dumps(layout))
    holders = [(data, key) for key in IMAGE_FIELDS]
    holders += [(region, key) for region in data.get("regions", []) for key in REGION_IMAGE_FIELDS]
    for holder, key in holders:
        value = holder.get(key)
        if value and os.path.isabs(value):
            # Another drive on Windows has no relative path: keep it absolute.
            with contextlib.suppress(ValueError):
                holder[key] = os.path.relpath(value, folder).replace(os.sep, "/")
    return data


def write_sidecar(path: str, record: Mapping[str, Any]) -> None:
    """Write a sidecar atomically (temporary name, then rename)."""
    write_text_atomic(path, json.dumps(record, indent=2, allow_nan=False) + "\n")


def read_sidecar(path: str) -> dict[str, Any] | None:
    """A sidecar's record, or None when it is missing, unreadable or not a frame sidecar."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
        return None
    return data


# -- Resume -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameState:
    """Whether a frame's files are complete, and if not, why.

    ``kind``: ``complete``; ``missing`` (nothing there); ``interrupted`` (an image without its
    sidecar); ``damaged`` (files there but wrong: unreadable, mismatched or not decoding);
    ``stale`` (complete but made from another Layout or other settings).
    """

    frame: int
    complete: bool
    reason: str
    record: dict[str, Any] | None = None
    kind: str = field(default="", compare=False)


def frame_state(paths: FramePaths, fingerprint: str | None = None) -> FrameState:
    """Check a frame's image and sidecar against each other (see the module docstring); with
    ``fingerprint``, also against what a render would produce now."""
    has_image = os.path.isfile(paths.image)
    record = read_sidecar(paths.sidecar)

    def bad(reason: str, kind: str = "damaged") -> FrameState:
        return FrameState(paths.frame, False, reason, record, kind)

    if not has_image and record is None:
        return bad("not rendered yet", "missing")
    if not has_image:
        return bad("sidecar without its image")
    if record is None:
        if os.path.exists(paths.sidecar):
            return bad("sidecar unreadable")
        return bad("image without a sidecar (interrupted run?)", "interrupted")
    if record.get("frame") != paths.frame or record.get("image") != os.path.basename(paths.image):
        return bad("sidecar belongs to another frame")
    if record.get("image_bytes") != os.path.getsize(paths.image):
        return bad("image size differs from its sidecar")
    if record.get("image_sha256") != file_sha256(paths.image):
        return bad("image content differs from its sidecar")
    problem = png_problem(paths.image)
    if problem is not None:
        return bad(f"image does not decode ({problem})")
    if fingerprint is not None and record.get("fingerprint") != fingerprint:
        why = (
            "another Layout or other settings" if record.get("fingerprint") else "an older version"
        )
        return bad(f"made from {why} (stale)", "stale")
    return FrameState(paths.frame, True, "complete", record, "complete")


def plan_frames(
    out_dir: str,
    frames: Iterable[int],
    *,
    overwrite: bool = False,
) -> tuple[list[FramePaths], list[FrameState]]:
    """Split ``frames`` into those to render and those already complete (kept unless overwrite).

    Returns ``(todo, done)``: the paths of frames to render, and the states of frames skipped.
    """
    todo: list[FramePaths] = []
    done: list[FrameState] = []
    for frame in frames:
        paths = frame_paths(out_dir, frame)
        if overwrite:
            todo.append(paths)
            continue
        state = frame_state(paths)
        if state.complete:
            done.append(state)
        else:
            todo.append(paths)
    return todo, done


def seed_for_frame(base_seed: int, frame: int, mode: str) -> int:
    """The seed of ``frame``: the base seed for every frame of a shot, or base + frame number.

    Seeds stay non-negative (the Layout's range), so negative frame numbers wrap around 2**63.
    """
    if mode == "shot":
        return base_seed
    if mode == "frame":
        return (base_seed + frame) % 2**63
    raise ValueError(f"unknown seed mode {mode!r}; use 'shot' or 'frame'")


# -- Decoding ---------------------------------------------------------------------------------

_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def png_problem(path: str) -> str | None:
    """Why a PNG file does not decode, or None when it does: every chunk's CRC, IHDR first, the
    whole zlib stream of the IDAT chunks, the row data the header declares, IEND. Standard
    library only (Blender's Python has no PIL); the pixels are inflated but not kept."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    if not data.startswith(PNG_SIGNATURE):
        return "not a PNG file"
    position, header, inflate, inflated, ended = len(PNG_SIGNATURE), None, None, 0, False
    while position < len(data):
        if position + 12 > len(data):
            return "truncated chunk"
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        end = position + 12 + length
        if end > len(data):
            return f"truncated {kind.decode('latin-1')} chunk"
        body = data[position + 4 : position + 8 + length]
        if zlib.crc32(body) & 0xFFFFFFFF != struct.unpack(">I", data[end - 4 : end])[0]:
            return f"{kind.decode('latin-1')} chunk fails its CRC"
        if header is None and kind != b"IHDR":
            return "IHDR is not the first chunk"
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body[4:17])
            inflate = zlib.decompressobj()
        elif kind == b"IDAT":
            try:
                inflated += len(inflate.decompress(body[4:]))
            except zlib.error as exc:
                return f"image data does not inflate ({exc})"
        elif kind == b"IEND":
            ended = True
            break
        position = end
    if header is None or not ended:
        return "no IEND chunk (truncated file)"
    if not inflate.eof:
        return "image data ends early"
    width, height, depth, colour, _, _, interlace = header
    if interlace == 0 and colour in _CHANNELS:
        row = (width * depth * _CHANNELS[colour] + 7) // 8
        if inflated != height * (row + 1):
            return f"{inflated} bytes of rows, {height * (row + 1)} expected"
    return None


# -- Fingerprints -----------------------------------------------------------------------------

FINGERPRINT_SETTINGS = ("seed_mode", "base_seed")
"""Sidecar settings in a fingerprint. The rest decide the image only through the Layout, which
is in it whole: size (resolution), camera and scene (the projection), the seed, the init image
and strength of ``--init-previous``; a setting that changes none of them changes no pixel."""


def fingerprint(
    layout: Mapping[str, Any],
    *,
    seed: int,
    model: str | None,
    options: Mapping[str, Any] | None,
    settings: Mapping[str, Any],
) -> str:
    """A hex digest of everything that decides a frame's image: the Layout with each image it
    names replaced by the SHA-256 of its contents (so moving the folder changes nothing, and a
    changed mask or init image does), the seed, the model, the engine options and the
    ``FINGERPRINT_SETTINGS``."""
    data = json.loads(json.dumps(layout))
    holders = [(data, key) for key in IMAGE_FIELDS]
    holders += [(region, key) for region in data.get("regions", []) for key in REGION_IMAGE_FIELDS]
    for holder, key in holders:
        value = holder.get(key)
        if value:
            try:
                holder[key] = "sha256:" + file_sha256(value)
            except OSError:
                holder[key] = "missing:" + os.path.basename(value)
    record = {
        "layout": data,
        "seed": seed,
        "model": model or "",
        "options": dict(options or {}),
        "settings": {key: settings.get(key) for key in FINGERPRINT_SETTINGS},
    }
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# -- Claims -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Owner:
    """One renderer: the host and process it runs in and a token no other renderer has."""

    host: str
    pid: int
    token: str

    @classmethod
    def current(cls) -> Owner:
        """A new owner for this process (each renderer in it gets its own token)."""
        return cls(socket.gethostname(), os.getpid(), uuid.uuid4().hex)


@dataclass(frozen=True)
class Claim:
    """A frame this renderer holds."""

    frame: int
    path: str
    owner: Owner


def claim_path(paths: FramePaths) -> str:
    """The claim file of a frame: hidden, beside its image."""
    folder, name = os.path.split(paths.image)
    return os.path.join(folder, "." + os.path.splitext(name)[0] + ".claim")


def read_claim(path: str) -> tuple[dict[str, Any] | None, float] | None:
    """A claim's record (None if unreadable) and its heartbeat (mtime); None if no claim."""
    try:
        heartbeat = os.stat(path).st_mtime
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        record = None
    else:
        if not isinstance(record, dict) or record.get("format") != CLAIM_FORMAT:
            record = None
    with contextlib.suppress(OSError):
        heartbeat = os.stat(path).st_mtime
    return record, heartbeat


def claim_is_live(
    record: dict[str, Any] | None, heartbeat: float, stale_seconds: float = STALE_SECONDS
) -> bool:
    """Whether a claim's owner may still be rendering: not known dead, and heard from within
    ``stale_seconds``."""
    if record is not None and _process_alive(record) is False:
        return False
    return time.time() - heartbeat < stale_seconds


def _process_alive(record: dict[str, Any]) -> bool | None:
    """Whether the claim's process runs; None when that cannot be told (another host)."""
    pid = record.get("pid")
    if record.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return None
    if sys.platform == "win32":
        return None  # os.kill(pid, 0) would terminate the process there
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    try:  # a killed process its parent has not reaped yet is a zombie: dead
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rpartition(")")[2].split()[:1] != ["Z"]
    except OSError:
        return True


def try_claim(
    paths: FramePaths, owner: Owner, stale_seconds: float = STALE_SECONDS
) -> Claim | None:
    """Claim a frame for ``owner``; None while another live renderer holds it.

    A claim whose owner is dead or silent is taken over: it is first renamed aside (only one
    renderer wins the rename), checked to be the claim that was judged (not a fresh one made
    meanwhile, which is put back), and removed; then a new claim is created with an exclusive
    hard link, which fails if anyone else was faster.
    """
    path = claim_path(paths)
    record = {
        "format": CLAIM_FORMAT,
        "frame": paths.frame,
        "host": owner.host,
        "pid": owner.pid,
        "token": owner.token,
        "claimed_at": time.time(),
    }
    for _ in range(4):
        if _create_exclusive(path, json.dumps(record) + "\n"):
            return Claim(paths.frame, path, owner)
        found = read_claim(path)
        if found is None:
            continue  # released meanwhile
        held, heartbeat = found
        if held is not None and held.get("token") == owner.token:
            return Claim(paths.frame, path, owner)
        if claim_is_live(held, heartbeat, stale_seconds):
            return None
        aside = f"{path}.stale-{owner.token}"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            continue
        moved = read_claim(aside)
        judged = held.get("token") if held else None
        moved_token = moved[0].get("token") if moved and moved[0] else None
        if moved_token != judged:
            # A fresh claim made after ours was judged: give it back.
            with contextlib.suppress(OSError):
                os.link(aside, path)
            _remove(aside)
            return None
        _remove(aside)
    return None


def _create_exclusive(path: str, text: str) -> bool:
    """Create ``path`` holding ``text`` only if nothing is there, atomically; False if taken."""
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(tmp, path)  # atomic and exclusive, also on network file systems
        return True
    except FileExistsError:
        return False
    except OSError:
        # File systems without hard links: exclusive creation, then the contents.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        return True
    finally:
        _remove(tmp)


def holds(claim: Claim) -> bool:
    """Whether ``claim`` is still this renderer's (not taken over as silent meanwhile)."""
    found = read_claim(claim.path)
    return bool(found and found[0] and found[0].get("token") == claim.owner.token)


def refresh(claim: Claim) -> bool:
    """Beat the claim's heartbeat; False when it is no longer held."""
    if not holds(claim):
        return False
    try:
        os.utime(claim.path)
    except OSError:
        return False
    return True


def release(claim: Claim) -> None:
    """Give a claim up (only if still held, so a claim taken over is never removed)."""
    if holds(claim):
        _remove(claim.path)


class HeldClaims:
    """The claims one renderer holds, their heartbeats beaten on a thread of their own (started
    with the first claim held) so that other renderers see them live."""

    def __init__(self, heartbeat_seconds: float = HEARTBEAT_SECONDS):
        self.heartbeat_seconds = heartbeat_seconds
        self._held: dict[int, Claim] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, claim: Claim) -> None:
        """Keep ``claim``'s heartbeat beating until it is let go."""
        with self._lock:
            self._held[claim.frame] = claim
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._beat, name="frame claims", daemon=True)
                self._thread.start()

    def forget(self, claim: Claim) -> None:
        """Stop beating ``claim`` without releasing it (another renderer took it over)."""
        with self._lock:
            self._held.pop(claim.frame, None)

    def let_go(self, claim: Claim) -> None:
        """Stop beating ``claim`` and release it."""
        self.forget(claim)
        release(claim)

    def let_go_all(self) -> None:
        """Release every claim held."""
        with self._lock:
            held = list(self._held.values())
            self._held.clear()
        for claim in held:
            release(claim)

    def stop(self, timeout: float | None = None) -> None:
        """End the heartbeat thread (a later :meth:`hold` starts another); a thread still
        running when Python ends crashes the bpy 4.2 module."""
        thread = self._thread
        if thread is not None:
            self._stop.set()
            thread.join(self.heartbeat_seconds + 1.0 if timeout is None else timeout)
            self._thread = None
            self._stop.clear()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            with self._lock:
                held = list(self._held.values())
            for claim in held:
                refresh(claim)


def frame_temp_files(paths: FramePaths) -> list[str]:
    """A frame's temporary files (image and sidecar temporaries, claims moved aside)."""
    folder = os.path.dirname(paths.image)
    stem = os.path.splitext(os.path.basename(paths.image))[0]
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return [
        os.path.join(folder, name)
        for name in sorted(names)
        if is_temp_name(name) and name.lstrip(".").startswith(stem + ".")
    ]


def sweep_frame(claim: Claim, paths: FramePaths) -> list[str]:
    """Remove the temporary files of a frame this renderer holds; the paths removed."""
    if not holds(claim):
        return []
    removed = []
    for path in frame_temp_files(paths):
        if os.path.isfile(path) and not path.endswith(f".stale-{claim.owner.token}"):
            _remove(path)
            removed.append(path)
    # A renderer builds a frame's Layout into a staging folder only while it holds the claim,
    # so another one's staging folder for this frame belongs to an owner whose claim was taken
    # over: it will never be moved into place.
    parent = os.path.dirname(paths.layout_dir)
    prefix = f".{os.path.basename(paths.layout_dir)}.staging-"
    ours = prefix + claim.owner.token[:12]
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir(parent)):
            if name.startswith(prefix) and not name.startswith(ours):
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
                removed.append(os.path.join(parent, name))
    return removed


def clear_dead_claims(
    frame_paths_list: Iterable[FramePaths], owner: Owner, stale_seconds: float = STALE_SECONDS
) -> list[int]:
    """Take over and give up the claims dead or silent renderers left on these frames, with
    their temporary files and staging folders; the frames cleared.

    A renderer killed while it held a frame that was already complete (it had claimed it only
    to compare it) leaves a claim nobody else waits for: the renderers still running clear such
    claims on their range when they finish, so the folder is left clean.
    """
    cleared = []
    for paths in frame_paths_list:
        found = read_claim(claim_path(paths))
        if found is None or claim_is_live(found[0], found[1], stale_seconds):
            continue
        claim = try_claim(paths, owner, stale_seconds)
        if claim is None:
            continue
        try:
            sweep_frame(claim, paths)
        finally:
            release(claim)
        cleared.append(paths.frame)
    return cleared


def replace_folder(staged: str, final: str) -> None:
    """Put the folder ``staged`` at ``final``, the old ``final`` (if any) removed."""
    if os.path.isdir(final):
        old = f"{staged}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.rename(staged, final)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
