"""``t3d-bench`` / ``python -m benchmarks``: run the benchmark suite, print the table, write JSON/CSV/PNG.

Examples::

    t3d-bench                                   # the default suite (T3D-121 shapes at clip 1x3x32x112x112)
    t3d-bench --ops ttl --passes forward --repeats 3
    t3d-bench --shape ttl:1,256,16,28,28:1,3,6:128 --no-plot
    t3d-bench --paper --ops ttl                 # the paper's 32x224x224 clip (heavy on CPU)
    t3d-bench --fail-if-slower 1.0              # exit 1 when a fused contender is slower than its baseline

Exit status: 0 ok; 1 when ``--fail-if-slower`` found a fused contender below the ratio; 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import (
    PASSES,
    BenchConfig,
    Case,
    Skip,
    check_fail_if_slower,
    machine_info,
    markdown_table,
    print_table,
    run_cases,
    write_csv,
    write_json,
    write_markdown,
    write_plot,
)

# op name -> the module declaring its cases (see benchmarks/harness.py for the API)
OP_MODULES = {
    "ttl": "benchmarks.bench_ttl",
    "dense_block": "benchmarks.bench_dense_block",
    "model": "benchmarks.bench_model",
    "data": "benchmarks.bench_data",
    "export": "benchmarks.bench_export",
}
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _csv_list(text: str, what: str, allowed: tuple[str, ...] | None = None) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"{what}: expected a comma-separated list, got {text!r}")
    if allowed is not None:
        bad = [v for v in values if v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{what}: expected values from {list(allowed)}, got {bad}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="t3d-bench",
        description="Benchmark the fused T3D ops against the eager reference (oneDNN/cuDNN) and torch.compile.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--ops",
        type=lambda s: _csv_list(s, "--ops", tuple(OP_MODULES)),
        default=tuple(OP_MODULES),
        help="comma-separated ops to run",
    )
    p.add_argument(
        "--passes",
        type=lambda s: _csv_list(s, "--passes", PASSES),
        default=PASSES,
        help="forward (inference, no grad), backward (backward alone), train (forward+backward)",
    )
    p.add_argument("--dtype", default="float32", help="tensor dtype (float32, bfloat16, float16, float64)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:i]")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per row (median and IQR over them)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after the first (compiling) call")
    p.add_argument(
        "--time-budget", type=float, default=3.0, help="seconds per row: slow rows use fewer repeats (never below 3)"
    )
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument(
        "--batches",
        type=lambda s: tuple(int(v) for v in _csv_list(s, "--batches")),
        default=(1, 4),
        help="batch sizes of the default shapes",
    )
    p.add_argument("--paper", action="store_true", help="the paper's 32x224x224 clip shapes instead of 32x112x112")
    p.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="OP:SPEC",
        help="run this shape instead of the op's defaults, e.g. ttl:1,256,16,28,28:1,3,6:128 "
        "or model:1,32,112,112 (repeatable)",
    )
    p.add_argument(
        "--backends",
        type=lambda s: _csv_list(s, "--backends"),
        default=None,
        help="fused backends to run (default: every one built for the device)",
    )
    p.add_argument("--no-compile", dest="compile", action="store_false", help="leave out torch.compile contenders")
    p.add_argument(
        "--compile-batches",
        type=lambda s: "all" if s == "all" else tuple(int(v) for v in _csv_list(s, "--compile-batches")),
        default=None,
        help="batch sizes whose shapes get torch.compile contenders ('all': every shape; default: 1 for the default "
        "shapes, all for --shape); compiling is the slow part of the suite",
    )
    p.add_argument(
        "--compile-model-train",
        action="store_true",
        help="torch.compile the whole model's training step too (minutes of compiling on a small CPU)",
    )
    p.add_argument(
        "--no-check",
        dest="check",
        action="store_false",
        help="do not compare each contender's output with the baseline's",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory of the JSON/CSV/PNG results")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument("--no-table", action="store_true", help="do not print the table")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument(
        "--from-json",
        type=Path,
        default=None,
        metavar="PATH",
        help="run nothing: print the table of an earlier result (and apply --fail-if-slower to it)",
    )
    p.add_argument(
        "--markdown", action="store_true", help="with --from-json: print the result as a Markdown table instead"
    )
    p.add_argument(
        "--fail-if-slower",
        type=float,
        default=None,
        metavar="RATIO",
        help="exit 1 when a fused contender's speed-up vs its baseline is below RATIO",
    )
    return p


def _compile_batches(args: argparse.Namespace) -> tuple[int, ...] | None:
    """``--compile-batches``: None (every shape) for "all", and by default when shapes are given explicitly."""
    if args.compile_batches is None:
        return None if args.shape else (1,)
    return None if args.compile_batches == "all" else args.compile_batches


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    if args.repeats < 1:
        raise ValueError(f"--repeats: expected an integer >= 1, got {args.repeats}")
    if args.threads < 0:
        raise ValueError(f"--threads: expected an integer >= 0, got {args.threads}")
    cfg = BenchConfig(
        device=args.device,
        dtype=args.dtype,
        passes=tuple(args.passes),
        repeats=args.repeats,
        warmup=args.warmup,
        threads=args.threads,
        paper=args.paper,
        batches=tuple(args.batches),
        backends=tuple(args.backends) if args.backends else None,
        compile=args.compile,
        compile_model_train=args.compile_model_train,
        compile_batches=_compile_batches(args),
        time_budget_s=args.time_budget,
        check=args.check,
    )
    cfg.torch_dtype  # validates the dtype name  # noqa: B018
    if cfg.torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: expected a device available here, got {args.device!r} (no CUDA)")
    return cfg


def shapes_by_op(shape_args: list[str]) -> dict[str, list[str]]:
    """``["ttl:1,2,...", ...]`` -> {"ttl": ["1,2,..."], ...}."""
    result: dict[str, list[str]] = {}
    for spec in shape_args:
        op, sep, rest = spec.partition(":")
        if not sep or op not in OP_MODULES:
            raise ValueError(f"--shape: expected OP:SPEC with OP one of {list(OP_MODULES)}, got {spec!r}")
        result.setdefault(op, []).append(rest)
    return result


def collect_cases(cfg: BenchConfig, ops: tuple[str, ...], specs: dict[str, list[str]]) -> tuple[list[Case], list[dict]]:
    """The cases of every op, and a skip row for each op whose module is missing or raised :class:`Skip`."""
    cases: list[Case] = []
    skipped: list[dict[str, Any]] = []
    for op in ops:
        module_name = OP_MODULES[op]
        try:
            module = importlib.import_module(module_name)
            cases.extend(module.cases(cfg, specs.get(op)))
        except ModuleNotFoundError as exc:
            why = f"{module_name} is not present" if exc.name == module_name else f"missing module {exc.name}"
            skipped.append(_skip_row(op, why, cfg))
        except Skip as exc:
            skipped.append(_skip_row(op, str(exc), cfg))
    return cases, skipped


def _skip_row(op: str, why: str, cfg: BenchConfig) -> dict[str, Any]:
    from benchmarks.harness import COLUMNS

    row = {c: None for c in COLUMNS}
    row.update(op=op, shape="-", status=f"skipped: {why}", device=cfg.device, dtype=cfg.dtype)
    row["pass"] = "-"
    return row


def fail_if_slower(rows: list[dict[str, Any]], ratio: float | None, console: Any) -> int:
    """Exit status of ``--fail-if-slower``: 1 (and the offending rows printed) when a fused row is below ratio."""
    if ratio is None:
        return 0
    slow = check_fail_if_slower(rows, ratio)
    for r in slow:
        console.print(
            f"slower than {ratio}x: {r['op']} {r['shape']} {r['pass']} {r['contender']}: {r['speedup']:.2f}x",
            style="red",
            markup=False,
        )
    return 1 if slow else 0


def _console() -> Any:
    from rich.console import Console

    # a file or pipe (make bench | tee) gets a table wide enough not to wrap; a terminal keeps its width
    return Console() if sys.stdout.isatty() else Console(width=150)


def replay(args: argparse.Namespace) -> int:
    """``--from-json``: the table of an earlier run, and the ``--fail-if-slower`` verdict on it."""
    try:
        data = json.loads(Path(args.from_json).read_text())
        rows = data["rows"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"--from-json: expected a t3d-bench JSON result, got {str(args.from_json)!r} ({exc})"
        ) from None
    console = _console()
    if args.markdown:
        print(markdown_table(rows, data.get("meta")), end="")
    elif not args.no_table:
        print_table(rows, console)
    return fail_if_slower(rows, args.fail_if_slower, console)


def run(args: argparse.Namespace) -> int:
    if args.from_json is not None:
        return replay(args)
    cfg = config_from_args(args)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.torch_device.type == "cuda":
        # the baseline at its best: cuDNN picks the fastest algorithm per shape (during the untimed first call)
        torch.backends.cudnn.benchmark = True
    specs = shapes_by_op(args.shape)
    ops = tuple(op for op in args.ops if not specs or op in specs)
    cases, skipped = collect_cases(cfg, ops, specs)
    if args.list:
        for case in cases:
            print(f"{case.op:12s} {case.label:32s} {case.flops / 1e9:8.2f} GFLOP (forward, reference)")
        for row in skipped:
            print(f"{row['op']:12s} {row['status']}")
        return 0

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = _console()
    argv = sys.argv[1:] if args.argv is None else args.argv
    meta = {
        "machine": machine_info(cfg.device),
        "config": vars(cfg) | {"ops": list(ops), "shapes": args.shape},
        "command": " ".join(["t3d-bench", *argv]),
    }
    roofs: dict[str, float] = {}
    rows: list[dict[str, Any]] = list(skipped)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out: Path = args.out
    meta["complete"] = False
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("benchmarks", total=len(cases))
        for case in cases:
            progress.update(task, description=f"{case.op} {case.label}")
            rows.extend(
                run_cases([case], cfg, progress=lambda msg: progress.update(task, description=msg), roofs=roofs)
            )
            progress.advance(task)
            # the rows so far, so that an interrupted run keeps them ("complete": false in its meta)
            write_json(out / f"bench-{stamp}.json", rows, meta | {"roofs_gflops": roofs})
    meta["roofs_gflops"] = roofs
    meta["complete"] = True
    meta["load_avg_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None

    if not args.no_table:
        print_table(rows, console)
    written = [
        write_json(out / f"bench-{stamp}.json", rows, meta),
        write_csv(out / f"bench-{stamp}.csv", rows),
        write_markdown(out / f"bench-{stamp}.md", rows, meta),
    ]
    if not args.no_plot:
        title = (
            f"{meta['machine']['cpu'] if cfg.device == 'cpu' else meta['machine'].get('gpu')}, "
            f"{torch.get_num_threads()} threads, {cfg.dtype}"
        )
        png = write_plot(out / f"bench-{stamp}.png", rows, title=title)
        if png is not None:
            written.append(png)
    for path in list(written):
        latest = path.with_name("latest" + path.suffix)
        shutil.copyfile(path, latest)
    console.print("wrote " + ", ".join(str(p) for p in written) + f" (and latest.* in {out})")

    return fail_if_slower(rows, args.fail_if_slower, console)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return run(args)
    except ValueError as exc:
        print(f"t3d-bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
