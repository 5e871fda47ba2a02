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

from .allocator import pin_malloc
from .api import COLUMNS, BenchConfig, Case, Skip
from .machine import machine_info
from .options import OP_MODULES, build_parser, compile_smallest_batch, config_from_args
from .output import kernel_lines, markdown_table, print_table, write_csv, write_json, write_markdown, write_plot
from .runner import check_fail_if_slower, run_cases
from .timing import SpeedCanary


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
    # before anything is allocated for the run: the allocator's rules must be the same in every process
    malloc = pin_malloc() if cfg.malloc == "pinned" else {"mode": "system"}
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
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if cfg.torch_device.type == "cpu" and load > (os.cpu_count() or 1):
        console.print(
            f"note: the machine is busy (load average {load:.1f} on {os.cpu_count()} cores): rows may be re-measured "
            "or marked noisy; with several threads each parallel region waits for the busy cores (--threads 1 "
            "measures the kernels rather than the scheduler)"
        )
    argv = sys.argv[1:] if args.argv is None else args.argv
    meta = {
        "machine": machine_info(cfg.device),
        "config": vars(cfg) | {"ops": list(ops), "shapes": args.shape, "precisions": list(args.precision)},
        "command": " ".join(["t3d-bench", *argv]),
        "malloc": malloc,
    }
    roofs: dict[str, float] = {}
    rows: list[dict[str, Any]] = list(skipped)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out: Path = args.out
    meta["complete"] = False
    configs = [dataclasses.replace(cfg, precision=p) for p in args.precision]
    canary = None
    if cfg.torch_device.type == "cpu":
        # one canary for the run: each pass is judged against the best speed the run has seen; warmed up first, so
        # that the first row does not pay for a fresh process (thread pool, clocks, allocator)
        canary = SpeedCanary(cfg.torch_device)
        meta["canary_warmup_gflops"] = canary.warm_up()
    try:
        with _progress(console, len(cases) * len(configs)) as (update, advance):
            for case in cases:
                for run_cfg in configs:
                    update(f"{case.op} {case.label} {run_cfg.precision}")
                    rows.extend(run_cases([case], run_cfg, progress=update, roofs=roofs, canary=canary))
                    advance()
                    # the rows so far, so that an interrupted run keeps them ("complete": false in its meta)
                    write_json(out / f"bench-{stamp}.json", rows, meta | {"roofs_gflops": roofs})
            for extra in extra_rows:
                update(extra.__doc__.splitlines()[0] if extra.__doc__ else "extra rows")
                rows.extend(extra(cfg))
        meta["complete"] = True
    except KeyboardInterrupt:
        # Ctrl-C, or `timeout --signal=INT` of a time-boxed run (benchmarks/gpu_check.sh): the rows so far are
        # still a result
        console.print("interrupted: writing the rows measured so far")
    meta["roofs_gflops"] = roofs
    meta["canary_best_gflops"] = canary.best if canary is not None else None
    meta["load_avg_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None

    if not args.no_table:
        print_table(rows, console)
    for line in kernel_lines(rows):
        console.print(line, markup=False, highlight=False)
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
