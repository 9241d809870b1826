"""The Ray pool without Blender: files as bytes, PNG provenance, actors on a local cluster.

Actors run the bundled shapes model at 64 px through their own ``engine serve`` children; their
frames are compared with a local engine's, byte for byte.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import pytest

from blender_addon.client.engine_client import EngineClient
from blender_addon.core.errors import UserError
from blender_addon.render import ray_pool
from blender_addon.render.ray_pool import (
    FrameTask,
    RayPool,
    import_ray,
    pack_layout,
    restore_paths,
    unpack_layout,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def shapes_layout(seed: int, steps: int = 4) -> dict:
    with open(os.path.join(ROOT, "samples", "two_shapes.json"), encoding="utf-8") as handle:
        layout = json.load(handle)
    layout.update(width=64, height=64, steps=steps, seed=seed)
    for region in layout["regions"]:
        if region.get("mask"):
            region["mask"] = os.path.join(ROOT, "samples", region["mask"])
    return layout


def test_layout_files_travel_as_bytes_and_land_in_the_workers_folder(tmp_path):
    mask, depth = tmp_path / "a" / "mask.png", tmp_path / "a" / "depth.png"
    mask.parent.mkdir()
    mask.write_bytes(b"mask bytes")
    depth.write_bytes(b"depth bytes")
    layout = {
        "depth": str(depth),
        "reference": None,
        "init_image": None,
        "regions": [
            {"mask": str(mask), "image": None, "prompt": "a"},
            {"mask": str(mask), "image": None, "prompt": "b"},
        ],
    }
    packed, files, origins = pack_layout(layout)
    assert layout["depth"] == str(depth), "the renderer's Layout is left as it was"
    assert sorted(files.values()) == [b"depth bytes", b"mask bytes"], "one copy per file"
    assert packed["regions"][0]["mask"] == packed["regions"][1]["mask"]
    assert not any(os.sep in name for name in files)
    assert {origins[packed["depth"]], origins[packed["regions"][0]["mask"]]} == {
        str(depth),
        str(mask),
    }

    worker = tmp_path / "worker"
    worker.mkdir()
    unpacked = unpack_layout(packed, files, str(worker))
    assert os.path.dirname(unpacked["depth"]) == str(worker)
    with open(unpacked["regions"][1]["mask"], "rb") as handle:
        assert handle.read() == b"mask bytes"
    assert unpacked["reference"] is None and unpacked["regions"][0]["image"] is None

    with pytest.raises(ValueError, match="plain name"):
        unpack_layout(packed, {"../escape.png": b"x"}, str(worker))
    with pytest.raises(ValueError, match="was not sent"):
        unpack_layout(packed, {}, str(worker))


def test_restored_provenance_is_the_png_a_local_engine_writes(tmp_path):
    from PIL import Image

    from engine.service.provenance import png_info, read_provenance
    from engine.wire.layout import Layout

    masks = {}
    for place in ("renderer", "worker"):
        folder = tmp_path / place
        folder.mkdir()
        masks[place] = str(folder / "mask ü.png")
        Image.new("L", (64, 64), 255).save(masks[place])
    image = Image.new("RGB", (64, 64), (10, 20, 30))

    def saved(place: str) -> bytes:
        layout = shapes_layout(3)
        layout["regions"][0]["mask"] = masks[place]
        path = tmp_path / f"{place}.png"
        image.save(path, format="PNG", pnginfo=png_info(Layout.from_dict(layout), "shapes", "E"))
        return path.read_bytes()

    local, remote = saved("renderer"), saved("worker")
    assert local != remote
    restored = restore_paths(remote, {masks["worker"]: masks["renderer"]})
    assert restored == local
    (tmp_path / "restored.png").write_bytes(restored)
    record = read_provenance(str(tmp_path / "restored.png"))
    assert record["layout"]["regions"][0]["mask"] == masks["renderer"]
    assert restore_paths(remote, {}) == remote
    assert restore_paths(b"not a png", {"a": "b"}) == b"not a png"


def test_without_ray_the_pool_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(UserError, match=r"pip install -e \.\[cluster\]"):
        import_ray()
    with pytest.raises(UserError, match=r"pip install -e \.\[cluster\]"):
        RayPool.connect(None, 2)


class FakeRay:
    """Enough of ``ray`` for sizing a pool: a cluster of ``resources``, actors that answer
    ``hello`` at once, and the options each actor was created with."""

    class exceptions:  # noqa: N801 - mirrors ray.exceptions
        RayError = RuntimeError
        RayActorError = RuntimeError

    def __init__(self, resources: dict):
        self.resources = resources
        self.created: list[dict] = []

    def is_initialized(self) -> bool:
        return True

    def cluster_resources(self) -> dict:
        return self.resources

    def remote(self, cls):
        fake = self

        class Ref:
            value = {"event": "hello", "device": "cuda", "protocol": 1}

        class Method:
            def remote(self, *args):
                return Ref()

        class Handle:
            hello = close = Method()

        class ActorClass:
            def options(self, **options):
                fake.created.append(options)
                return self

            def remote(self, *args):
                return Handle()

        return ActorClass()

    def wait(self, refs, num_returns=1, timeout=None):
        return list(refs), []

    def get(self, ref):
        return ref.value

    def kill(self, handle):
        pass


def test_the_pool_has_one_actor_per_gpu_and_cpu_actors_only_without_gpus(monkeypatch):
    fake = FakeRay({"CPU": 64.0, "GPU": 8.0})
    monkeypatch.setitem(sys.modules, "ray", fake)
    pool = RayPool.connect("ray://head:10001")
    assert pool.start("shapes")["device"] == "cuda"
    assert fake.created == [{"num_cpus": 1, "max_restarts": 0, "num_gpus": 1}] * 8
    assert pool.capacity == 9
    (notice,) = pool.take_notices()
    assert notice == "Ray cluster: 64 CPUs, 8 GPUs; rendering on 8 GPU worker(s)"

    pool = RayPool.connect("auto", 10)
    assert pool.size == 10
    assert "2 of the 10 workers wait for a GPU" in pool.take_notices()[1]

    fake = FakeRay({"CPU": 2.0})
    monkeypatch.setitem(sys.modules, "ray", fake)
    for workers, expected in ((None, 1), (2, 2)):
        pool = RayPool.connect(None, workers)
        pool.start("shapes")
        assert not pool.gpus and pool.size == expected
        assert "CPU worker(s) (no GPUs)" in pool.take_notices()[0]
    assert fake.created == [{"num_cpus": 1, "max_restarts": 0}] * 3


def test_two_actors_match_a_local_engine_and_a_killed_actor_loses_no_frame(ray_cluster, tmp_path):
    """Six frames on two actors; frame 3 is slow and its actor is killed while it renders it.
    Every frame comes back once, frame 3 from another actor after one retry, and every PNG is
    byte for byte what a local engine writes for the same Layout."""
    pool = RayPool(ray_cluster.ray, 2, gpus=False, engine_python=sys.executable)
    layouts = {frame: shapes_layout(frame, steps=60 if frame == 3 else 4) for frame in range(1, 7)}
    killed: list[str] = []

    def kill_frame_3() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                busy = pool.busy()
            except RuntimeError:  # the pool changed while it was read
                continue
            for worker, frame, seconds, handle in busy:
                if frame == 3 and seconds > 1.0:
                    killed.append(worker)
                    ray_cluster.ray.kill(handle)
                    return
            time.sleep(0.02)

    try:
        hello = pool.start("shapes")
        assert hello["device"] == "cpu" and hello["protocol"] >= 1
        killer = threading.Thread(target=kill_frame_3, daemon=True)
        killer.start()
        for frame, layout in layouts.items():
            pool.submit(FrameTask(frame, *pack_layout(layout), model="shapes"))
        results = []
        while pool.pending:
            results.append(pool.next_result())
        killer.join(5)
        notices = pool.take_notices()
        rates = pool.rates()
    finally:
        pool.close()

    assert sorted(r.frame for r in results) == list(range(1, 7)), "every frame exactly once"
    assert all(r.ok for r in results), [r.event for r in results]
    (victim,) = killed
    retried = {r.frame: r for r in results if r.retries}
    assert list(retried) == [3] and retried[3].worker != victim
    assert any(
        text.startswith(f"Ray worker {victim} stopped during frame 3")
        and "frame 3 goes to the next free worker (retry 1 of 2)" in text
        for text in notices
    ), notices
    assert victim not in [name for name, _, _ in rates], "the dead actor is gone"
    assert sum(done for _, done, _ in rates) >= 1

    client = EngineClient(sys.executable)
    try:
        for result in results:
            if result.frame not in (1, 3, 6):
                continue
            out = str(tmp_path / f"local-{result.frame}.png")
            event = client.generate(layouts[result.frame], out, "shapes").wait(300)
            assert event["event"] == "result", event
            with open(out, "rb") as handle:
                assert handle.read() == result.image, f"frame {result.frame} differs"
    finally:
        client.close()


def test_an_engine_that_cannot_start_stops_the_pool_with_its_reason(ray_cluster, tmp_path):
    pool = RayPool(ray_cluster.ray, 1, gpus=False, engine_python=str(tmp_path / "no-python"))
    try:
        with pytest.raises(ray_pool.EngineError) as caught:
            pool.start("shapes")
    finally:
        pool.close()
    assert caught.value.code == "not_installed"
    assert "Install the engine on every Ray node" in caught.value.message


def test_an_engine_that_dies_inside_a_live_actor_is_restarted_and_its_frame_retried(ray_cluster):
    import signal

    pool = RayPool(ray_cluster.ray, 1, gpus=False, engine_python=sys.executable)
    try:
        pool.start("shapes")
        pool.submit(FrameTask(1, *pack_layout(shapes_layout(1)), model="shapes"))
        first = pool.next_result()
        assert first.ok and first.engine_pid
        pool.submit(FrameTask(2, *pack_layout(shapes_layout(2, steps=60)), model="shapes"))
        deadline = time.monotonic() + 120
        while not any(seconds > 1.0 for _, _, seconds, _ in pool.busy()):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(first.engine_pid, signal.SIGKILL)
        second = pool.next_result()
        notices = pool.take_notices()
    finally:
        pool.close()
    assert second.frame == 2 and second.ok and second.retries == 1
    assert second.engine_pid != first.engine_pid and second.worker == first.worker
    assert any(
        text.startswith("frame 2: The engine stopped unexpectedly")
        and "its engine restarts and the frame is sent again (retry 1 of 2)" in text
        for text in notices
    ), notices
