"""The ``t3d`` command: ``t3d <subcommand> ...`` (also ``python -m t3d``).

Each subcommand lives in its own module exposing ``add_parser(subparsers)``, which registers the parser and
sets ``func`` (called with the parsed args, returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# modules providing subcommands; a module that is absent (e.g. a missing optional dependency) is skipped
SUBCOMMAND_MODULES = [
    "t3d.info",
    "t3d.inflate",
    "t3d.synthetic",
    "t3d.train",
    "t3d.evaluate",
    "t3d.transfer",
    "t3d.predict",
    "t3d.export",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t3d", description="T3D: Temporal 3D ConvNets with fused kernels")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


# optional dependencies a subcommand may import when it runs, and the extra of t3d-kernels that installs them
OPTIONAL = {
    "av": "video",
    "tqdm": "video",
    "rich": "video",
    "matplotlib": "video",
    "onnx": "export",
    "onnxscript": "export",
    "onnxruntime": "export",
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"t3d {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        top = (exc.name or "").partition(".")[0]
        if top not in OPTIONAL:
            raise
        extra = OPTIONAL[top]
        print(
            f"t3d {args.command}: error: this command needs the optional package {top!r}, which is not installed "
            f"here; install it with: pip install 't3d-kernels[{extra}]' (or pip install {top})",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
