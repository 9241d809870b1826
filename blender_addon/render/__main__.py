"""Render an animation headless, frame by frame, resumable: ``python -m blender_addon.render``.

    python -m blender_addon.render SCENE.blend --frames 1-48 --out DIR [--model shapes]
        [--engine-python PATH | --engine-command CMD] [--step N] [--seed-mode shot|frame]
        [--overwrite] [--init-previous STRENGTH] [--stall-seconds S]
        [--ray [ADDRESS] [--ray-workers N]]

Needs only the ``bpy`` wheel on the Blender side; the engine runs in its own Python as one
subprocess for the whole batch (:class:`~.batch.BatchRenderer`), so the model loads once; with
``--engine-command`` that subprocess is any command running ``engine serve`` elsewhere (``ssh
gpu-box .../python -m engine serve``), the frames' images sent with each request.
Running the same command again renders only the frames that are not complete, or whose Layout
or settings changed (stale) or whose files are damaged. Several machines may run the same
command on one shared folder: each frame is claimed and rendered once. With ``--ray`` the
frames are generated on a Ray cluster, one warm engine per GPU (:mod:`.ray_batch`), and
written here as the local batch writes them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import bpy

from .. import register
from ..blender.camera import render_resolution
from ..blender.frame_request import scene_init_previous, scene_seed_mode
from ..client import engine_session
from ..client.engine_client import EngineClient, parse_command
from ..core import frames
from ..core.errors import UserError
from ..core.projection import size_change
from .batch import SEED_MODES, BatchRenderer, FrameOutcome, Watchdog
from .ray_batch import RayBatchRenderer
from .ray_pool import RayPool

ENGINE_PYTHON_FIX = (
    "Pass --engine-python with the Python that has the engine: a checkout's .venv/bin/python "
    "(bash run.sh creates it), or the one the add-on's Set up engine created."
)
"""What a missing engine tells the batch command's user (not Blender's preferences)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m blender_addon.render",
        description=(
            "Render a Blender scene's animation through the Layout Diffusion engine, one PNG and "
            "one JSON sidecar per frame. Frames already complete in --out are skipped."
        ),
    )
    parser.add_argument("blend", help="the .blend file to render")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument(
        "--frames", help="frames to render, e.g. 1-48 or 1,5,10-12 (default: the scene's range)"
    )
    parser.add_argument(
        "--step", type=int, help="render every N-th frame (default: the scene's frame step)"
    )
    parser.add_argument("--scene", help="scene name (default: the file's active scene)")
    parser.add_argument("--model", help="model spec (default: the scene's Layout Diffusion model)")
    parser.add_argument(
        "--engine-python",
        help="Python interpreter with the engine installed (default: the checkout's .venv, "
        "else this interpreter)",
    )
    parser.add_argument(
        "--engine-command",
        metavar="CMD",
        help="a command line that starts the engine elsewhere and carries its input and output, "
        'instead of --engine-python, e.g. "ssh gpu-box /opt/ld/.venv/bin/python -m engine '
        "serve\" (split like a shell); each frame's images travel with its request and the PNG "
        "comes back the same way",
    )
    parser.add_argument(
        "--seed-mode",
        choices=SEED_MODES,
        help="'shot': the scene seed for every frame; 'frame': scene seed + frame number "
        "(default: the scene's setting, else shot)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="render every frame again, even complete ones"
    )
    parser.add_argument(
        "--init-previous",
        type=float,
        metavar="STRENGTH",
        help="start each frame from the previous frame's image (img2img): 0 keeps it, "
        "1 ignores it; steadier animations at around 0.5-0.7 (default: the scene's Start From "
        "Previous Frame with its Previous Frame Strength, else off)",
    )
    parser.add_argument(
        "--stall-seconds",
        type=float,
        default=Watchdog.stall_seconds,
        metavar="S",
        help="an engine silent for longer than this (and 10x its slowest step) counts as hung "
        f"and is replaced, the frame retried (default {Watchdog.stall_seconds:.0f}; "
        f"{Watchdog.load_seconds:.0f} while a model loads)",
    )
    parser.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="generate on a Ray cluster: one warm engine per GPU (ADDRESS: the cluster's, e.g. "
        "ray://head:10001 or auto; without it RAY_ADDRESS or a new local cluster). Needs "
        "pip install -e .[cluster]",
    )
    parser.add_argument(
        "--ray-workers",
        type=int,
        metavar="N",
        help="with --ray: N engine actors (default: one per GPU, or 1 on a cluster without GPUs)",
    )
    return parser


class _Progress:
    """A tqdm bar when tqdm is importable, plain lines otherwise."""

    def __init__(self, total: int, stream=None):
        self.stream = stream or sys.stderr
        self.detail: Callable[[], str] | None = None
        """Extra text for each frame's line, e.g. the rate of each Ray worker."""
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, unit="frame", file=self.stream, dynamic_ncols=True)

    def __call__(self, done: int, total: int, outcome: FrameOutcome) -> None:
        if outcome.status == "written":
            text = f"frame {outcome.frame} written in {outcome.seconds:.2f} s"
            if outcome.redo:
                text += f" (it was {outcome.redo})"
        elif outcome.status == "skipped":
            text = f"frame {outcome.frame} {outcome.message or 'already complete'}"
        else:
            text = f"frame {outcome.frame} FAILED: {outcome.message}"
        detail = self.detail() if self.detail is not None else ""
        if self.bar is None:
            extra = f" [{detail}]" if detail else ""
            print(f"[{done}/{total}] {text}{extra}", file=self.stream, flush=True)
            return
        if outcome.status == "failed":
            self.bar.write(text, file=self.stream)
        postfix = f"frame {outcome.frame}" + (f"; {detail}" if detail else "")
        self.bar.set_postfix_str(postfix, refresh=False)
        self.bar.update(1)

    def notice(self, text: str) -> None:
        """A line about what the batch did beyond rendering, above the bar."""
        if self.bar is None:
            print(text, file=self.stream, flush=True)
        else:
            self.bar.write(text, file=self.stream)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _open_scene(path: str, scene_name: str | None):
    if not os.path.isfile(path):
        raise UserError(f"no such .blend file: {path}")
    bpy.ops.wm.open_mainfile(filepath=os.path.abspath(path), load_ui=False)
    if scene_name is None:
        return bpy.context.scene
    scene = bpy.data.scenes.get(scene_name)
    if scene is None:
        names = ", ".join(s.name for s in bpy.data.scenes)
        raise UserError(f"{path} has no scene {scene_name!r}; its scenes: {names}")
    window = getattr(bpy.context, "window", None)
    if window is not None:
        window.scene = scene
    return scene


def _register_addon() -> None:
    if not hasattr(bpy.types.Scene, "layout_diffusion"):
        register()


def main(argv: list[str] | None = None) -> int:
    """Run the batch; exit status 0 when every requested frame is complete, 1 otherwise."""
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    if args.step is not None and args.step < 1:
        raise UserError(f"--step must be 1 or more, got {args.step}")
    if not args.stall_seconds > 0:
        raise UserError(f"--stall-seconds must be above 0, got {args.stall_seconds}")
    if not os.path.isfile(args.blend):
        raise UserError(f"no such .blend file: {args.blend}")
    _register_addon()
    scene = _open_scene(args.blend, args.scene)
    # The size generated at, and what rounding or the engine's limits changed.
    print(f"size: {size_change(*render_resolution(scene)).message}", file=sys.stderr)
    step = args.step or scene.frame_step
    # A frame list that cannot be read raises FrameSpecError, a UserError: exit status 2.
    if args.frames:
        frame_list = frames.parse_frames(args.frames, step)
    else:
        frame_list = list(range(scene.frame_start, scene.frame_end + 1, step))
    if not frame_list:
        raise UserError(f"scene {scene.name!r} has an empty frame range; pass --frames")
    python = args.engine_python or engine_session.default_python() or sys.executable
    python = engine_session.resolve_python(python)
    command = _engine_command(args)
    seed_mode = args.seed_mode or scene_seed_mode(scene)
    options = {
        "model": args.model,
        "seed_mode": seed_mode,
        "overwrite": args.overwrite,
        "init_previous": (
            args.init_previous if args.init_previous is not None else scene_init_previous(scene)
        ),
        "watchdog": Watchdog(stall_seconds=args.stall_seconds),
    }
    if args.ray is not None:
        client = _ray_pool(args, python, options["watchdog"])
        renderer = RayBatchRenderer(scene, args.out, client, **options)
    else:
        client = EngineClient(
            python, cwd=engine_session.checkout_root(), fix=ENGINE_PYTHON_FIX, command=command
        )
        renderer = BatchRenderer(scene, args.out, client, **options)
    progress = renderer.progress = _Progress(len(frame_list))
    renderer.notify = progress.notice
    if isinstance(renderer, RayBatchRenderer):
        progress.detail = renderer.rates
    try:
        summary = renderer.run(frame_list)
    except KeyboardInterrupt:
        print(
            "\ninterrupted: complete frames are kept; run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    finally:
        progress.close()
        client.close()
    written, skipped, failed = (summary.count(s) for s in ("written", "skipped", "failed"))
    stale, damaged = summary.redone("stale"), summary.redone("damaged")
    print(
        f"{written} written, {skipped} already complete, {failed} failed; "
        f"{stale} stale, {damaged} damaged re-rendered; in {summary.seconds:.1f} s -> "
        f"{renderer.out_dir}",
        file=sys.stderr,
    )
    if summary.stopped:
        print(
            f"error: {summary.stopped}\n"
            "Frames already written are kept; run the same command again to resume.",
            file=sys.stderr,
        )
        return 1
    if failed:
        names = ", ".join(str(o.frame) for o in summary.outcomes if o.status == "failed")
        print(f"error: frames not written: {names} (reasons above)", file=sys.stderr)
        return 1
    return 0


def _engine_command(args: argparse.Namespace) -> list[str]:
    """The ``--engine-command`` arguments (empty when not given); a UserError when it cannot be
    read or is combined with an option it excludes."""
    if args.engine_command is None:
        return []
    if args.ray is not None:
        raise UserError(
            "--engine-command and --ray exclude each other: Ray actors start their own engines "
            "(use --engine-python for the Python they run)"
        )
    if args.engine_python:
        raise UserError("pass either --engine-python or --engine-command, not both")
    try:
        command = parse_command(args.engine_command)
    except ValueError as exc:
        raise UserError(f"--engine-command: {exc}") from None
    if not command:
        raise UserError("--engine-command is empty: give the command line that starts the engine")
    return command


def _ray_pool(args: argparse.Namespace, python: str, watchdog: Watchdog) -> RayPool:
    """The Ray pool ``--ray`` asks for. Actors on a cluster of other machines use their own
    Python unless ``--engine-python`` names one; a local cluster's use this batch's engine."""
    if args.ray_workers is not None and args.ray_workers < 1:
        raise UserError(f"--ray-workers must be 1 or more, got {args.ray_workers}")
    local = not (args.ray or os.environ.get("RAY_ADDRESS"))
    return RayPool.connect(
        args.ray or None,
        args.ray_workers,
        engine_python=python if local or args.engine_python else None,
        stall_seconds=watchdog.stall_seconds,
        step_factor=watchdog.step_factor,
        load_seconds=watchdog.load_seconds,
    )


if __name__ == "__main__":
    sys.exit(main())
