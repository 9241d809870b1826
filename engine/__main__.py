"""The engine's command line: ``python -m engine generate|serve|info``.

``generate`` turns a Layout file into a PNG (progress on stderr), ``serve`` speaks the JSON-lines
protocol of ``engine.service.serve`` on stdin/stdout, ``info`` (alias ``hello``) shows the device, the
precision and whether a model is present.
"""

from __future__ import annotations

import os

# Set before any Hugging Face library is imported: the engine never downloads.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402

from engine import __version__  # noqa: E402
from engine.errors import EngineError  # noqa: E402
from engine.loading.defaults import describe_model  # noqa: E402
from engine.loading.locate import LoadOptions, ModelLocation, default_model_spec  # noqa: E402
from engine.wire.layout import Layout, LayoutError  # noqa: E402
from engine.wire.protocol import DEFAULT_MAX_SECONDS  # noqa: E402


def _add_load_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model loading")
    group.add_argument(
        "--model",
        help="diffusers folder, .safetensors file, cached Hugging Face repo id, or alias "
        "(default: $LAYOUT_DIFFUSION_MODEL, else 'shapes')",
    )
    group.add_argument(
        "--config",
        help="diffusers folder or cached repo id with the configs and tokenizers a single-file "
        "checkpoint needs (default: the SDXL base repo from the local cache)",
    )
    group.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, ...")
    group.add_argument(
        "--dtype", default="auto", help="auto (float16 on GPU, float32 on CPU), float16, ..."
    )
    group.add_argument(
        "--cpu-offload",
        action="store_true",
        help="keep weights in RAM and move each part to the GPU only while it runs",
    )
    group.add_argument(
        "--vae-tiling", action="store_true", help="decode large images in tiles to save memory"
    )
    group.add_argument(
        "--kept-text-mib",
        type=_mebibytes,
        metavar="MIB",
        help="device memory a regional generate may spend keeping its prompts' attention keys "
        "and values for the whole call (default: up to 3 GiB and a quarter of free GPU memory; "
        "0 keeps none: 2.5 GiB less with 100 prompts, steps up to 1.3x slower)",
    )
    group.add_argument(
        "--controlnet",
        help="SDXL depth ControlNet (diffusers folder, cached repo id or .safetensors file), "
        "applied with the Layout's depth map",
    )
    group.add_argument(
        "--ip-adapter",
        help="SDXL IP-Adapter (weights file, folder or cached repo id such as h94/IP-Adapter) "
        "applying each region's object image inside its mask",
    )
    group.add_argument(
        "--gligen",
        help="GLIGEN text-box model (diffusers folder or cached repo id such as "
        "masterful/gligen-1-4-generation-text-box) making the layout reference from the "
        "regions' prompts and boxes when the reference pull has no reference file",
    )
    group.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow pickle checkpoints (.ckpt/.bin/.pt), which can run code: trusted files only",
    )


def _add_output_options(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--out-root",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder under which missing output folders may be created (repeatable; "
        f"allowed: {default}these)",
    )


def _mebibytes(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more MiB, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for ``python -m engine``."""
    parser = argparse.ArgumentParser(
        prog="python -m engine",
        description="Layout Diffusion engine: a Layout in, a regionally guided SDXL image out.",
    )
    parser.add_argument("--version", action="version", version=f"layout-diffusion {__version__}")
    parser.add_argument(
        "--log-level", default="WARNING", help="stderr log level (DEBUG, INFO, WARNING, ERROR)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="generate a PNG from a Layout file")
    generate.add_argument("layout", help="Layout JSON file")
    generate.add_argument(
        "--out", help="PNG to write (default: the Layout's path with .png)", default=None
    )
    generate.add_argument("--seed", type=int, help="override the Layout's seed")
    generate.add_argument("--steps", type=int, help="override the Layout's step count")
    generate.add_argument(
        "--allow-outside-inputs",
        action="store_true",
        help="let the Layout file name images outside its own folder (by default they must be "
        "inside it)",
    )
    _add_output_options(generate, "the current folder, the Layout file's folder and ")
    _add_load_options(generate)

    serve = commands.add_parser("serve", help="speak the JSON-lines protocol on stdin/stdout")
    _add_output_options(serve, "")
    serve.add_argument(
        "--max-seconds",
        type=float,
        default=DEFAULT_MAX_SECONDS,
        help="refuse a generate estimated to take longer than this on this device, or stop it "
        f"once its measured steps show it would (default {DEFAULT_MAX_SECONDS:.0f}; 0: no limit)",
    )
    _add_load_options(serve)

    info = commands.add_parser(
        "info", aliases=["hello"], help="show device, precision and model presence"
    )
    info.add_argument("--json", action="store_true", help="print the hello reply as JSON")
    _add_load_options(info)
    return parser


def _load_options(args: argparse.Namespace) -> LoadOptions:

    return LoadOptions(
        device=args.device,
        dtype=args.dtype,
        cpu_offload=args.cpu_offload,
        vae_tiling=args.vae_tiling,
        kept_text_mib=args.kept_text_mib,
        allow_pickle=args.allow_pickle,
        config=args.config,
        controlnet=args.controlnet,
        ip_adapter=args.ip_adapter,
        gligen=args.gligen,
    )


def _generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    # Imported here so that `--help` and `--version` answer without torch and diffusers.
    from engine.conditions.apply import check_conditions  # lazy: CLI start-up time
    from engine.loading.assemble import PipelineCache  # lazy: CLI start-up time
    from engine.service.generate import (  # lazy: CLI start-up time
        check_layout_files,
        check_output_path,
        run_generation,
    )

    layout = Layout.load(args.layout, allow_outside=args.allow_outside_inputs)
    overrides = {k: getattr(args, k) for k in ("seed", "steps") if getattr(args, k) is not None}
    if overrides:
        # Re-validate so overrides get the same range checks as the file's values.
        layout = Layout.from_dict({**layout.to_dict(), **overrides})
    check_layout_files(layout)
    out = os.path.abspath(args.out or os.path.splitext(args.layout)[0] + ".png")
    roots = [os.getcwd(), os.path.dirname(os.path.abspath(args.layout)), *args.out_root]
    out = check_output_path(out, roots, field="--out")
    model = args.model or default_model_spec()
    options = _load_options(args)
    check_conditions(layout, options.ip_adapter)

    def announce(location: ModelLocation) -> None:
        print(f"loading {model} from {location.path}", file=sys.stderr)

    pipe, load_seconds = PipelineCache().get(model, options, on_load=announce)
    with tqdm(total=layout.steps, desc="generating", unit="step", file=sys.stderr) as bar:

        def on_step(step: int, total: int) -> None:
            bar.total = total
            bar.update(step - bar.n)

        result = run_generation(pipe, layout, out, model, on_step=on_step)
    print(
        f"wrote {result.path} ({result.width}x{result.height}, seed {result.seed}, "
        f"{result.seconds:.1f} s + {load_seconds:.1f} s loading)",
        file=sys.stderr,
    )
    print(result.path)
    return 0


def _info(args: argparse.Namespace) -> int:
    from engine.service.serve import engine_info  # lazy: CLI start-up time

    options = _load_options(args)
    info = engine_info(options)
    info["model"] = describe_model(args.model, options)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    import diffusers
    import torch

    model = info["model"]
    print(f"layout-diffusion {info['engine_version']} (protocol {info['protocol']})")
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}")
    print(f"device: {info['device']}, dtype: {info['dtype']}")
    print(f"capabilities: {', '.join(info['capabilities'])}")
    for name, state in info["conditions"].items():
        status = "available" if state["available"] else "unavailable"
        print(f"{name}: {status}: {state['message']}")
    print(
        f"model {model['spec']}: {'found, ' if model['found'] else 'NOT FOUND: '}{model['message']}"
    )
    return 0 if model["found"] else 1


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 failed, 2 usage)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "serve":
            from engine.service.serve import serve  # lazy: CLI start-up time

            return serve(
                _load_options(args),
                args.model,
                out_roots=args.out_root,
                max_seconds=max(args.max_seconds, 0.0),
            )
        if args.command == "generate":
            return _generate(args)
        return _info(args)
    except LayoutError as exc:
        where = f" [{exc.field}]" if exc.field else ""
        print(f"error: bad Layout{where}: {exc}", file=sys.stderr)
        return 1
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
