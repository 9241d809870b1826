"""Frame ranges, names, atomic publishing, sidecars and resume decisions (no Blender needed)."""

from __future__ import annotations

import os
import struct
import zlib

import pytest

from blender_addon.core import frames
from blender_addon.core.frames import FrameSpecError
from blender_addon.core.png import png_size
from engine.wire.layout import Layout


def write_png(path: str, width: int, height: int, value: int = 0) -> None:
    """A valid 8-bit grey PNG of one flat value."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(b"\x00" + bytes([value]) * width for _ in range(height))
    with open(path, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n")
        handle.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)))
        handle.write(chunk(b"IDAT", zlib.compress(rows)))
        handle.write(chunk(b"IEND", b""))


def open_bytes(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


# -- Frame ranges -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "step", "expected"),
    [
        ("7", 1, [7]),
        ("1-5", 1, [1, 2, 3, 4, 5]),
        ("1..3", 1, [1, 2, 3]),
        ("1-10", 3, [1, 4, 7, 10]),
        ("5-6, 1-2, 2", 1, [1, 2, 5, 6]),
        ("-2-1", 1, [-2, -1, 0, 1]),
        ("1-4,10-13", 2, [1, 3, 10, 12]),
    ],
)
def test_parse_frames(spec, step, expected):
    assert frames.parse_frames(spec, step) == expected


@pytest.mark.parametrize(
    ("spec", "step", "message"),
    [
        ("", 1, "no frames"),
        ("1,,3", 1, "no frames"),
        ("a-b", 1, "cannot read frames 'a-b'"),
        ("10-1", 1, "runs backwards; write '1-10'"),
        ("1-3", 0, "step must be 1 or more"),
    ],
)
def test_parse_frames_errors_name_the_problem(spec, step, message):
    with pytest.raises(FrameSpecError, match=message):
        frames.parse_frames(spec, step)


# -- Names ------------------------------------------------------------------------------------


def test_frame_name_pads_the_last_hash_run():
    assert frames.frame_name(7) == "frame_0007"
    assert frames.frame_name(12345) == "frame_12345"
    assert frames.frame_name(3, "shot##_v2_###") == "shot##_v2_003"
    assert frames.frame_name(-3, "f_###") == "f_-003"
    assert frames.frame_name(42, "render_") == "render_0042"


def test_frame_paths(tmp_path):
    paths = frames.frame_paths(str(tmp_path), 12)
    assert paths.image == str(tmp_path / "frame_0012.png")
    assert paths.sidecar == str(tmp_path / "frame_0012.json")
    assert paths.layout_dir == str(tmp_path / "layout" / "frame_0012")


# -- Atomic publishing ------------------------------------------------------------------------


def test_temp_path_is_hidden_beside_the_target_with_its_extension(tmp_path):
    target = str(tmp_path / "frame_0001.png")
    tmp = frames.temp_path(target)
    assert os.path.dirname(tmp) == str(tmp_path)
    assert os.path.basename(tmp) == f".frame_0001.partial-{os.getpid()}.png"
    assert frames.is_temp_name(os.path.basename(tmp))


def test_publish_replaces_the_target_in_one_step(tmp_path):
    target = tmp_path / "frame_0001.png"
    target.write_bytes(b"old")
    tmp = frames.temp_path(str(target))
    with open(tmp, "wb") as handle:
        handle.write(b"new")
    frames.publish(tmp, str(target))
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["frame_0001.png"]


def test_sweep_removes_only_temporary_files(tmp_path):
    keep = ["frame_0001.png", "frame_0001.json", ".hidden", "notes.tmp", "a.partial-x.png"]
    # Ours, the Layout writer's, and the engine's own PNG temporary (pid and thread id).
    stale = [
        ".frame_0002.partial-991.png",
        ".frame_0002.json.991.tmp",
        "..frame_0003.partial-991.png.992.140234.tmp",
    ]
    for name in keep + stale:
        (tmp_path / name).write_bytes(b"x")
    removed = frames.sweep_temp_files(str(tmp_path))
    assert sorted(os.path.basename(p) for p in removed) == sorted(stale)
    assert sorted(os.listdir(tmp_path)) == sorted(keep)
    assert frames.sweep_temp_files(str(tmp_path / "missing")) == []


# -- Sidecars and resume ----------------------------------------------------------------------


def finished_frame(folder, frame: int, value: int = 0) -> frames.FramePaths:
    """Write a frame's image, a mask and its sidecar the way a render does."""
    paths = frames.frame_paths(str(folder), frame)
    os.makedirs(paths.layout_dir, exist_ok=True)
    mask = os.path.join(paths.layout_dir, "mask_0.png")
    write_png(mask, 64, 64, 255)
    write_png(paths.image, 64, 72, value)
    plate = os.path.join(str(folder), "plate.png")
    write_png(plate, 64, 72, 128)
    layout = Layout.from_dict(
        {
            "prompt": "a red circle",
            "width": 64,
            "height": 72,
            "seed": 5,
            "init_image": plate,
            "strength": 0.5,
            "regions": [{"prompt": "a red circle", "box": [0.1, 0.2, 0.5, 0.6], "mask": mask}],
        }
    )
    record = frames.make_sidecar(
        paths,
        layout.to_dict(),
        seed=5,
        model="shapes",
        engine={"version": "0.1.0", "protocol": 1},
        settings={"seed_mode": "shot"},
        timings={"generate_seconds": 0.123456},
    )
    frames.write_sidecar(paths.sidecar, record)
    return paths


def test_sidecar_records_the_image_and_a_movable_layout(tmp_path):
    paths = finished_frame(tmp_path, 3)
    record = frames.read_sidecar(paths.sidecar)
    assert record["frame"] == 3
    assert record["image"] == "frame_0003.png"
    assert record["image_size"] == [64, 72]
    assert record["image_bytes"] == os.path.getsize(paths.image)
    assert record["timings"] == {"generate_seconds": 0.1235}
    assert record["layout"]["regions"][0]["mask"] == "layout/frame_0003/mask_0.png"
    assert record["layout"]["init_image"] == "plate.png"
    # The whole folder moves; the Layout still resolves against the sidecar's new folder.
    moved = tmp_path.parent / (tmp_path.name + "_moved")
    os.rename(tmp_path, moved)
    record = frames.read_sidecar(str(moved / "frame_0003.json"))
    layout = Layout.from_dict(record["layout"], base_dir=str(moved))
    assert layout.regions[0].mask == str(moved / "layout" / "frame_0003" / "mask_0.png")
    assert os.path.isfile(layout.regions[0].mask)
    assert layout.init_image == str(moved / "plate.png")
    assert layout.seed == 5


def test_complete_frame_is_skipped_and_others_say_why(tmp_path):
    done = finished_frame(tmp_path, 1)
    assert frames.frame_state(done) == frames.FrameState(
        1, True, "complete", frames.read_sidecar(done.sidecar)
    )

    no_sidecar = finished_frame(tmp_path, 2)
    os.remove(no_sidecar.sidecar)
    assert frames.frame_state(no_sidecar).reason == "image without a sidecar (interrupted run?)"

    no_image = finished_frame(tmp_path, 3)
    os.remove(no_image.image)
    assert frames.frame_state(no_image).reason == "sidecar without its image"

    changed = finished_frame(tmp_path, 4)
    data = bytearray(open_bytes(changed.image))
    data[-20] ^= 0xFF  # same size in bytes, different content
    with open(changed.image, "wb") as handle:
        handle.write(data)
    assert frames.frame_state(changed).reason == "image content differs from its sidecar"

    truncated = finished_frame(tmp_path, 5)
    with open(truncated.image, "r+b") as handle:
        handle.truncate(20)
    assert frames.frame_state(truncated).reason == "image size differs from its sidecar"

    garbled = finished_frame(tmp_path, 6)
    with open(garbled.sidecar, "w") as handle:
        handle.write('{"format": "layout-diffusion-fr')
    assert frames.frame_state(garbled).reason == "sidecar unreadable"

    swapped = finished_frame(tmp_path, 7)
    record = frames.read_sidecar(swapped.sidecar)
    record["frame"] = 8
    frames.write_sidecar(swapped.sidecar, record)
    assert frames.frame_state(swapped).reason == "sidecar belongs to another frame"

    missing = frames.frame_paths(str(tmp_path), 9)
    assert frames.frame_state(missing).reason == "not rendered yet"

    todo, skipped = frames.plan_frames(str(tmp_path), range(1, 10))
    assert [p.frame for p in todo] == [2, 3, 4, 5, 6, 7, 8, 9]
    assert [s.frame for s in skipped] == [1]
    todo, skipped = frames.plan_frames(str(tmp_path), [1, 2], overwrite=True)
    assert [p.frame for p in todo] == [1, 2] and skipped == []


def test_png_size_rejects_other_files(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"GIF89a" + bytes(30))
    assert png_size(str(path)) is None
    assert png_size(str(tmp_path / "missing.png")) is None


def test_seed_for_frame():
    assert frames.seed_for_frame(100, 7, "shot") == 100
    assert frames.seed_for_frame(100, 7, "frame") == 107
    assert frames.seed_for_frame(0, -1, "frame") == 2**63 - 1
    with pytest.raises(ValueError, match="use 'shot' or 'frame'"):
        frames.seed_for_frame(0, 1, "clip")
