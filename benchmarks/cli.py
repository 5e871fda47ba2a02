"""``t3d-bench`` / ``python -m benchmarks``: run the benchmark suite, print the table, write JSON/CSV/Markdown/PNG.

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
import contextlib
import dataclasses
import datetime as _dt
import importlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from .api import COLUMNS, PASSES, PRECISIONS, TIMERS, BenchConfig, Case, Skip
from .machine import machine_info
from .output import markdown_table, print_table, write_csv, write_json, write_markdown, write_plot
from .runner import check_fail_if_slower, run_cases

# op name -> the module declaring its cases, relative to this package (see harness.py for the API); the package
# is ``benchmarks`` in a checkout and ``t3d_benchmarks`` when installed
OP_MODULES = {
    "ttl": ".bench_ttl",
    "dense_block": ".bench_dense_block",
    "model": ".bench_model",
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
    p.add_argument(
        "--max-warmup", type=int, default=20, help="most untimed calls while waiting for the times to be stable"
    )
    p.add_argument(
        "--noise",
        type=float,
        default=0.2,
        help="a row whose IQR exceeds this fraction of its median is measured again, then marked noisy",
    )
    p.add_argument("--remeasure", type=int, default=2, help="how many times a noisy pass is measured again")
    p.add_argument(
        "--precision",
        type=lambda s: _csv_list(s, "--precision", PRECISIONS),
        default=("fp32",),
        help="fp32 (the dtype as given; on CUDA cuDNN's TF32 default), bf16 / fp16 (autocast); comma-separated: "
        "each case runs in each",
    )
    p.add_argument(
        "--timer",
        choices=TIMERS,
        default="wall",
        help="wall: perf_counter on CPU, CUDA events on GPU; kernel: the GPU kernels' time from torch.profiler",
    )
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument(
        "--batches",
        type=lambda s: tuple(int(v) for v in _csv_list(s, "--batches")),
        default=(1, 4),
        help="batch sizes of the default op shapes",
    )
    p.add_argument(
        "--model-batches",
        type=lambda s: tuple(int(v) for v in _csv_list(s, "--model-batches")),
        default=None,
        help="batch sizes of the default whole-model shapes (default: 1 on CPU; 8,16,32 at two clips on CUDA)",
    )
    p.add_argument(
        "--max-batch",
        action="store_true",
        help="with the model op on CUDA: also search the largest training batch that fits, eager vs fused",
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
        help="batch sizes whose shapes get torch.compile contenders ('all': every shape; default: the smallest batch "
        "of each op's default shapes, all for --shape); compiling is the slow part of the suite",
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
    """``--compile-batches``: the batches given, or None (no filter) for "all" and by default (the default
    shapes then compile their smallest batch only, see :func:`compile_smallest_batch`)."""
    if args.compile_batches is None or args.compile_batches == "all":
        return None
    return args.compile_batches


def compile_smallest_batch(cases: list[Case]) -> None:
    """Keep the "compile" contenders of each op's smallest batch only (the default for the default shapes)."""
    smallest: dict[str, int] = {}
    for case in cases:
        smallest[case.op] = min(smallest.get(case.op, case.batch), case.batch)
    for case in cases:
        case.compile = case.batch == smallest[case.op]


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    if args.repeats < 1:
        raise ValueError(f"--repeats: expected an integer >= 1, got {args.repeats}")
    if args.threads < 0:
        raise ValueError(f"--threads: expected an integer >= 0, got {args.threads}")
    if not args.noise > 0 or args.remeasure < 0:
        raise ValueError(f"--noise / --remeasure: expected > 0 / >= 0, got {args.noise} / {args.remeasure}")
    cfg = BenchConfig(
        device=args.device,
        dtype=args.dtype,
        passes=tuple(args.passes),
        repeats=args.repeats,
        warmup=args.warmup,
        threads=args.threads,
        paper=args.paper,
        batches=tuple(args.batches),
        model_batches=args.model_batches,
        backends=tuple(args.backends) if args.backends else None,
        compile=args.compile,
        compile_model_train=args.compile_model_train,
        compile_batches=_compile_batches(args),
        time_budget_s=args.time_budget,
        check=args.check,
        max_warmup=args.max_warmup,
        noise=args.noise,
        remeasure=args.remeasure,
        precision=args.precision[0],
        timer=args.timer,
    )
    cfg.torch_dtype  # validates the dtype name  # noqa: B018
    if cfg.torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: expected a device available here, got {args.device!r} (no CUDA)")
    if cfg.timer == "kernel" and cfg.torch_device.type != "cuda":
        raise ValueError(f"--timer: 'kernel' times GPU kernels and needs --device cuda, got {args.device!r}")
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
            module = importlib.import_module(module_name, __package__)
            cases.extend(module.cases(cfg, specs.get(op)))
        except ModuleNotFoundError as exc:
            full = importlib.util.resolve_name(module_name, __package__)
            why = f"{full} is not present" if exc.name == full else f"missing module {exc.name}"
            skipped.append(_skip_row(op, why, cfg))
        except Skip as exc:
            skipped.append(_skip_row(op, str(exc), cfg))
    return cases, skipped


def _skip_row(op: str, why: str, cfg: BenchConfig) -> dict[str, Any]:
    row = {c: None for c in COLUMNS}
    row.update(op=op, shape="-", status=f"skipped: {why}", device=cfg.device, dtype=cfg.dtype)
    row["pass"] = "-"
    return row


def extra_measurements(args: argparse.Namespace, cases: list[Case]) -> list[Any]:
    """Measurements after the timed rows, each ``fn(cfg) -> rows``: ``--max-batch`` (the model op's largest
    training batch that fits, eager vs fused)."""
    if not args.max_batch or not any(c.op == "model" for c in cases):
        return []
    bench_model = importlib.import_module(OP_MODULES["model"], __package__)

    def largest_training_batch(cfg: BenchConfig) -> list[dict[str, Any]]:
        """largest training batch that fits"""
        return bench_model.max_batch_rows(cfg, [c for c in cases if c.op == "model"])

    return [largest_training_batch]


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


class _PlainConsole:
    """What the CLI needs of rich's Console, in plain print() (rich is an optional dependency)."""

    def print(self, text: Any = "", **_: Any) -> None:
        print(text, flush=True)


def _console() -> Any:
    try:
        from rich.console import Console
    except ImportError:
        return _PlainConsole()
    # a file or pipe (make bench | tee) gets a table wide enough not to wrap; a terminal keeps its width
    return Console() if sys.stdout.isatty() else Console(width=170)


@contextlib.contextmanager
def _progress(console: Any, total: int):
    """``update(description)`` and ``advance()`` of a progress bar (rich), or lines on stderr without rich."""
    try:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        done = [0]

        def update(description: str) -> None:
            print(f"[{done[0]}/{total}] {description}", file=sys.stderr, flush=True)

        def advance() -> None:
            done[0] += 1

        yield update, advance
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("benchmarks", total=total)
        yield (lambda d: progress.update(task, description=d)), (lambda: progress.advance(task))


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
    if args.compile_batches is None and not specs:
        compile_smallest_batch(cases)
    extra_rows = extra_measurements(args, cases)
    if args.list:
        for case in cases:
            print(f"{case.op:12s} {case.label:32s} {case.flops / 1e9:8.2f} GFLOP (forward, reference)")
        for row in skipped:
            print(f"{row['op']:12s} {row['status']}")
        return 0

    console = _console()
    argv = sys.argv[1:] if args.argv is None else args.argv
    meta = {
        "machine": machine_info(cfg.device),
        "config": vars(cfg) | {"ops": list(ops), "shapes": args.shape, "precisions": list(args.precision)},
        "command": " ".join(["t3d-bench", *argv]),
    }
    roofs: dict[str, float] = {}
    rows: list[dict[str, Any]] = list(skipped)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out: Path = args.out
    meta["complete"] = False
    configs = [dataclasses.replace(cfg, precision=p) for p in args.precision]
    with _progress(console, len(cases) * len(configs)) as (update, advance):
        for case in cases:
            for run_cfg in configs:
                update(f"{case.op} {case.label} {run_cfg.precision}")
                rows.extend(run_cases([case], run_cfg, progress=update, roofs=roofs))
                advance()
                # the rows so far, so that an interrupted run keeps them ("complete": false in its meta)
                write_json(out / f"bench-{stamp}.json", rows, meta | {"roofs_gflops": roofs})
        for extra in extra_rows:
            update(extra.__doc__.splitlines()[0] if extra.__doc__ else "extra rows")
            rows.extend(extra(cfg))
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
            f"{torch.get_num_threads()} threads, {'/'.join(c.precision_label for c in configs)}"
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
