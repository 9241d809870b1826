"""The "Layout Diffusion" render engine: F12, Ctrl-F12 and ``blender -b -E LAYOUT_DIFFUSION``.

Each render projects the labeled objects into a Layout at the frame being rendered, sends it to
the engine process and puts the generated image into the Combined pass, so Blender's own
machinery does the rest: frame ranges and steps, output paths and formats, Overwrite and
Placeholders (on farms with the frame claims of :mod:`.farm`, so a crashed machine's frames are
rendered again), the compositor, multilayer EXR. Three more passes carry the layout itself:

- ``Layout Region`` (1 channel): the 1-based index of the Layout region seen at each pixel (its
  object's mask), 0 elsewhere; the frame's sidecar lists the regions in that order;
- ``Layout Color`` (RGBA): each region in its own flat colour, transparent elsewhere;
- ``Layout Depth`` (1 channel): the depth map sent to the engine, 1 at the nearest surface, 0 on
  the background.

The engine process is the add-on's shared one (:mod:`..client.engine_session`): it starts with the
first frame and stays loaded for every following one. Each frame's PNG, sidecar and masks are
kept under the Output path, in the folder ``layout_diffusion`` beside Blender's own frames
(:func:`..blender.outputs.render_dir`), so any frame can be reproduced. Esc cancels the running
generation; the model stays loaded.

The generated image is display-referred (sRGB). It is stored linear in Combined; with the
Standard view transform a saved PNG gives back the engine's pixels. Any other view warns once
and offers Use Standard View (Color Management panel, the sidebar's Render View panel).

Masks, depth and the proxy render come from a nested Cycles render, which only the main thread
may start. Background renders (``blender -b``) run on the main thread; an interactive F12 or
Ctrl-F12 renders in a worker thread, which hands the frame's request to the main thread and
waits (:mod:`..blender.main_thread`), so it sends what Generate sends. With Render > Lock
Interface on, the main thread runs nothing during a render: frames then go out with boxes only,
and the render says so.
"""

from __future__ import annotations

import contextlib
import os
import queue
import time
import traceback

import bpy
import numpy as np
from bl_ui import properties_output, properties_render

from ..blender import main_thread
from ..blender.camera import render_resolution
from ..blender.frame_request import (
    build_request,
    previous_frame_init,
    scene_init_previous,
    scene_seed_mode,
)
from ..blender.images import read_image_rgb
from ..blender.models import model_spec
from ..blender.outputs import render_dir
from ..blender.view import view_changes
from ..client import cost, engine_session
from ..client.engine_client import EngineError
from ..client.high_res import HighResJob, start_generate
from ..core import frames, places
from ..core.errors import UserError
from ..core.masks import box_pixels, resample_nearest
from ..core.png import read_gray_png
from ..core.request import addon_words
from ..ui import preferences
from ..wire.cost import HIGH_RES_STRENGTH
from ..wire.layout import Layout
from . import farm
from .publish import (
    engine_details,
    first_pass_path,
    high_res_settings,
    publish_frame,
    render_settings,
)

ENGINE_ID = "LAYOUT_DIFFUSION"
PASS_REGION = "Layout Region"
PASS_COLOR = "Layout Color"
PASS_DEPTH = "Layout Depth"
CANCEL_GRACE = 30.0
"""Seconds a cancelled generation may take to stop before the engine process is killed."""

# Distinct, saturated colours for the colour pass; regions beyond the list cycle through it.
PALETTE = np.array(
    [
        (0.90, 0.10, 0.10),
        (0.10, 0.35, 0.95),
        (0.95, 0.80, 0.05),
        (0.10, 0.70, 0.20),
        (0.60, 0.20, 0.80),
        (0.95, 0.50, 0.05),
        (0.05, 0.75, 0.80),
        (0.90, 0.30, 0.65),
    ],
    dtype=np.float32,
)

_hello: dict[int, dict] = {}
"""``hello`` replies by engine process id: asked once per process, not once per frame."""

_native: dict[tuple, int | None] = {}
"""Models' native sides by engine process id and model spec, when no cost is known."""

_warned: set[tuple] = set()
"""Warnings already given this session (by scene and what they said): once, not every frame."""


class RenderCancelled(Exception):
    """Esc was pressed during a render."""


# -- Pixels ---------------------------------------------------------------------------------------


def srgb_to_linear(values: np.ndarray) -> np.ndarray:
    """The sRGB transfer function inverted: display-referred [0, 1] to linear."""
    values = np.asarray(values, dtype=np.float32)
    return np.where(values <= 0.04045, values / 12.92, ((values + 0.055) / 1.055) ** 2.4)


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of an (H, W, C) float array (pixel centres aligned, edges clamped)."""
    if image.shape[:2] == (height, width):
        return image

    def axis(size_in: int, size_out: int):
        pos = np.clip((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0, size_in - 1)
        low = np.floor(pos).astype(int)
        high = np.minimum(low + 1, size_in - 1)
        return low, high, (pos - low).astype(np.float32)

    r0, r1, fr = axis(image.shape[0], height)
    c0, c1, fc = axis(image.shape[1], width)
    top = image[r0][:, c0] * (1 - fc)[None, :, None] + image[r0][:, c1] * fc[None, :, None]
    bottom = image[r1][:, c0] * (1 - fc)[None, :, None] + image[r1][:, c1] * fc[None, :, None]
    return top * (1 - fr)[:, None, None] + bottom * fr[:, None, None]


def region_ids(layout, height: int, width: int) -> np.ndarray:
    """(H, W) float32: 1-based region index per pixel from the masks (boxes without masks)."""
    ids = np.zeros((height, width), dtype=np.float32)
    for index, region in enumerate(layout.regions, start=1):
        if region.mask:
            inside = resample_nearest(read_gray_png(region.mask), height, width) > 127
        else:
            c0, r0, c1, r1 = box_pixels(np.asarray(region.box), width, height)
            inside = np.zeros((height, width), dtype=bool)
            inside[r0:r1, c0:c1] = True
        ids[inside] = index
    return ids


def layout_passes(layout, height: int, width: int) -> dict[str, np.ndarray]:
    """The three layout passes as (H, W, C) float32 arrays, row 0 at the top."""
    ids = region_ids(layout, height, width)
    colour = np.zeros((height, width, 4), dtype=np.float32)
    inside = ids > 0
    colour[inside, :3] = PALETTE[(ids[inside].astype(int) - 1) % len(PALETTE)]
    colour[inside, 3] = 1.0
    depth = np.zeros((height, width), dtype=np.float32)
    if layout.depth:
        depth = resample_nearest(read_gray_png(layout.depth), height, width) / 65535.0
    return {
        PASS_REGION: ids[:, :, None],
        PASS_COLOR: colour,
        PASS_DEPTH: depth.astype(np.float32)[:, :, None],
    }


def _to_rect(image: np.ndarray) -> np.ndarray:
    """(H, W, C) top-first to Blender's (H*W, C) rows bottom-first."""
    flipped = np.ascontiguousarray(image[::-1], dtype=np.float32)
    return flipped.reshape(-1, image.shape[2])


# -- The engine -----------------------------------------------------------------------------------


class LayoutDiffusionRenderEngine(bpy.types.RenderEngine):
    """Renders the camera view by generating it from the labeled objects' Layout."""

    bl_idname = ENGINE_ID
    bl_label = "Layout Diffusion"
    bl_use_preview = False
    bl_use_postprocess = True

    def update_render_passes(self, scene=None, renderlayer=None) -> None:
        """Tell the compositor and file outputs which passes this engine writes."""
        self.register_pass(scene, renderlayer, "Combined", 4, "RGBA", "COLOR")
        self.register_pass(scene, renderlayer, PASS_REGION, 1, "X", "VALUE")
        self.register_pass(scene, renderlayer, PASS_COLOR, 4, "RGBA", "COLOR")
        self.register_pass(scene, renderlayer, PASS_DEPTH, 1, "X", "VALUE")

    def render(self, depsgraph) -> None:
        """Generate the frame the depsgraph is evaluated at and fill the render result."""
        scene = depsgraph.scene
        try:
            self._render(scene, depsgraph)
        except RenderCancelled:
            self.update_stats("", "Layout Diffusion: cancelled")
        except Exception as exc:  # any failure must stop the render, not leave an empty frame
            # The engine's messages name its own flags (--config); the artist sets fields.
            message = addon_words(str(exc)) if isinstance(exc, EngineError) else str(exc)
            if isinstance(exc, EngineError) and exc.code == "out_of_memory":
                message += " (lower the render resolution)"
            elif not isinstance(exc, (UserError, ValueError, EngineError, OSError, RuntimeError)):
                # An unexpected error: its type says more than its message alone.
                traceback.print_exc()
                message = f"internal error ({type(exc).__name__}: {exc}); please report it"
            # An error report stops an animation render instead of writing an empty frame.
            self.report({"ERROR"}, f"Layout Diffusion: {message}")
            self.update_stats("", f"Layout Diffusion: {message}")

    def _render(self, scene, depsgraph) -> None:
        width, height = render_resolution(scene)
        frame = scene.frame_current
        seed_mode = scene_seed_mode(depsgraph.scene_eval)
        paths = frames.frame_paths(render_dir(scene), frame)
        started = time.perf_counter()
        # Farms running Blender on one range: the frame is held from here until its file is
        # written (see farm.py).
        try:
            waited_since = farm.claim_output(
                scene, frame, self.is_animation, self.test_break, paths
            )
        except farm.WaitCancelled:
            raise RenderCancelled from None
        if waited_since is not None:
            record = farm.made_elsewhere(paths, waited_since)
            if record is not None:
                base = os.path.dirname(paths.sidecar)
                self._write_result(
                    paths.image, Layout.from_dict(record["layout"], base_dir=base), width, height
                )
                self.update_stats("", f"Layout Diffusion: frame {frame} made by another renderer")
                return
        self.update_stats("", f"Layout Diffusion: frame {frame}, building the layout")
        init, strength = self._previous_frame(scene, frame)
        made = self._build(scene, depsgraph, paths.layout_dir, frame, seed_mode, init, strength)
        layout_seconds = time.perf_counter() - started
        if self.test_break():
            raise RenderCancelled
        changes = view_changes(scene)
        if changes:
            self._warn_once(
                scene,
                "Layout Diffusion: Color Management changes the generated image ("
                + ", ".join(changes)
                + "): press Use Standard View (Render properties > Color Management, or "
                f"{places.sidebar('Render View')}) to see and save the engine's pixels",
            )

        client = engine_session.get_client(
            preferences.engine_python(), preferences.engine_command()
        )
        if client.pid not in _hello:
            _hello[client.pid] = engine_details(client.hello())
        layout = made.layout.to_dict()
        tmp = frames.temp_path(paths.image)
        ld = scene.layout_diffusion
        event = self._generate(
            client,
            layout,
            tmp,
            made,
            frame,
            native=_native_size(client, made.model or model_spec(ld)),
            high_res=ld.use_high_res_fix,
            strength=ld.high_res_strength,
            first_out=first_pass_path(paths),
        )
        settings = render_settings(scene, seed_mode)
        settings["skipped"] = made.skipped
        # As the batch records --init-previous (the option; the Layout has what this frame used).
        settings["init_previous"] = scene_init_previous(scene) if self.is_animation else None
        settings["renderer"] = {"host": farm.owner().host, "pid": farm.owner().pid}
        settings.update(high_res_settings(scene))  # as the batch records it
        publish_frame(
            paths,
            tmp,
            event,
            layout,
            engine=_hello.get(client.pid, {}),
            settings=settings,
            layout_seconds=layout_seconds,
            started=started,
        )
        self._write_result(paths.image, made.layout, width, height)
        seconds = event.get("seconds") or 0.0
        self.update_stats("", f"Layout Diffusion: frame {frame} generated in {seconds:.1f} s")

    def _previous_frame(self, scene, frame: int) -> tuple[str | None, float | None]:
        """Start From Previous Frame in an animation render: the image of the frame before and
        the strength to start from it, as the batch's ``--init-previous``; ``(None, None)``
        otherwise. A frame whose predecessor is not in the render folder starts from the
        scene's Init Image, and the render says so once."""
        if not self.is_animation:
            return None, None
        init, strength = previous_frame_init(scene, frame, render_dir(scene))
        if init is None and scene.layout_diffusion.use_init_previous and frame > scene.frame_start:
            self._warn_once(
                scene,
                f"Layout Diffusion: frame {frame} cannot start from the previous frame (not "
                "rendered into this Output path yet); it starts as the first frame does",
            )
        return init, strength

    def _build(
        self,
        scene,
        depsgraph,
        folder: str,
        frame: int,
        seed_mode: str,
        init: str | None = None,
        strength: float | None = None,
    ):
        """The frame's request with masks, depth and proxy render, as Generate builds it;
        ``init`` (with ``strength``) replaces the scene's init image (the previous frame).

        Their id render is a nested render that only the main thread may start: a render in a
        worker thread (interactive F12) hands the whole build to the main thread and waits.
        """

        def build(masks: bool = True):
            return build_request(
                scene,
                depsgraph,
                folder,
                frame=frame,
                seed_mode=seed_mode,
                masks=masks,
                init=init,
                strength=strength,
            )

        if main_thread.on_main_thread():
            return build()
        why = None
        if scene.render.use_lock_interface:
            # A locked interface refuses the main thread's render operator during a render.
            why = "Render > Lock Interface is on (turn it off to send them)"
        else:
            try:
                return main_thread.call(build, self.test_break)
            except main_thread.Cancelled:
                raise RenderCancelled from None
            except main_thread.MainThreadBusy as exc:
                why = str(exc)
        self._warn_once(
            scene,
            "Layout Diffusion: frames go out with boxes only, without object masks, depth "
            f"and proxy render: {why}",
        )
        return build(masks=False)

    def _warn_once(self, scene, message: str) -> None:
        """Report ``message`` as a warning the first time this session, not on every frame."""
        key = (scene.name, message)
        if key not in _warned:
            _warned.add(key)
            self.report({"WARNING"}, message)

    def _generate(
        self,
        client,
        layout: dict,
        tmp: str,
        made,
        frame: int,
        native: int | None = None,
        high_res: bool = False,
        strength: float = HIGH_RES_STRENGTH,
        first_out: str | None = None,
    ) -> dict:
        """Run the frame's generation, showing progress and honouring Esc: far above the
        model's ``native`` size with ``high_res`` (the scene's High-res Fix) in two passes, as
        Generate and the batch do (the first pass at ``first_out``, removed afterwards)."""
        job = start_generate(
            client,
            layout,
            tmp,
            made.model,
            made.options,
            native=native,
            high_res=high_res,
            strength=strength,
            first_out=first_out,
        )
        try:
            return self._follow(client, job, tmp, frame)
        finally:
            if isinstance(job, HighResJob):
                _remove(job.first_out)  # the second pass has read it

    def _follow(self, client, job, tmp: str, frame: int) -> dict:
        """The job's final event; progress shown, Esc honoured."""
        cancelled_at = None
        while True:
            try:
                event = job.events.get(timeout=0.1)
            except queue.Empty:
                event = None
            if cancelled_at is None and self.test_break():
                job.cancel()
                cancelled_at = time.monotonic()
            if cancelled_at is not None and time.monotonic() - cancelled_at > CANCEL_GRACE:
                client.kill()
            if event is None:
                continue
            if event is job.final:
                break
            kind = event.get("event")
            if kind == "loading":
                self.update_stats("", f"Layout Diffusion: frame {frame}, loading the model")
            elif kind == "progress":
                step, total = int(event.get("step", 0)), int(event.get("total", 0)) or 1
                self.update_progress(step / total)
                full = " (High-res Fix: full size)" if event.get("pass") == 2 else ""
                self.update_stats("", f"Layout Diffusion: frame {frame}, step {step}/{total}{full}")
        if event.get("event") == "result":
            return event
        if os.path.exists(tmp):
            os.remove(tmp)
        if event.get("event") == "cancelled" or cancelled_at is not None:
            raise RenderCancelled
        raise EngineError(
            str(event.get("code") or "internal"),
            str(event.get("message") or "the engine failed without a message"),
        )

    def _write_result(self, image_path: str, layout, width: int, height: int) -> None:
        pixels = srgb_to_linear(resize_bilinear(read_image_rgb(image_path), height, width))
        combined = np.concatenate([pixels, np.ones((height, width, 1), np.float32)], axis=2)
        passes = layout_passes(layout, height, width)
        result = self.begin_result(0, 0, width, height)
        try:
            layer = result.layers[0]
            layer.passes["Combined"].rect = _to_rect(combined)
            for name, image in passes.items():
                render_pass = layer.passes.get(name)
                if render_pass is not None:
                    render_pass.rect = _to_rect(image)
        finally:
            self.end_result(result)


def _native_size(client, spec: str) -> int | None:
    """The model's native side (for the High-res Fix): the cost known for it, else asked of the
    engine once per engine process and model; None when the engine cannot tell."""
    native = cost.native_size(spec)
    if native is not None:
        return native
    key = (client.pid, spec)
    if key not in _native:
        model = client.hello(model=spec or None).get("model")
        found = model.get("native_size") if isinstance(model, dict) else None
        _native[key] = found if isinstance(found, int) else None
    return _native[key]


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


# -- Registration ---------------------------------------------------------------------------------


def _compatible_panels() -> list:
    """Blender's output and colour-management panels, which list the engines they appear for."""
    panels = [
        cls
        for module in (properties_output, properties_render)
        for cls in vars(module).values()
        if isinstance(cls, type) and hasattr(cls, "COMPAT_ENGINES")
    ]
    return [
        cls
        for cls in panels
        if cls.__module__.endswith("properties_output")
        or cls.__name__.startswith("RENDER_PT_color_management")
    ]


def register() -> None:
    bpy.utils.register_class(LayoutDiffusionRenderEngine)
    for panel in _compatible_panels():
        panel.COMPAT_ENGINES.add(ENGINE_ID)
    farm.register()
    main_thread.register()


def unregister() -> None:
    main_thread.unregister()
    farm.unregister()
    for panel in _compatible_panels():
        panel.COMPAT_ENGINES.discard(ENGINE_ID)
    bpy.utils.unregister_class(LayoutDiffusionRenderEngine)
    _hello.clear()
    _native.clear()
    _warned.clear()
