"""The ``t3d-bench`` command line: its options and the :class:`~benchmarks.api.BenchConfig` they make."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .api import MALLOC_MODES, PASSES, PRECISIONS, TIMERS, BenchConfig, Case

# op name -> the module declaring its cases, relative to this package (see harness.py for the API); the package
# is ``benchmarks`` in a checkout and ``t3d_benchmarks`` when installed
OP_MODULES = {
    "ttl": ".bench_ttl",
    "dense_block": ".bench_dense_block",
    "bn_relu_maxpool": ".bench_bn_relu_maxpool",
    "stem_conv3d": ".bench_stem_conv",
    "model": ".bench_model",
    "data": ".bench_data",
    "export": ".bench_export",
}
# the default suite: the ops and the model; decoding (data) and the ONNX export (export) are asked for by name
DEFAULT_OPS = ("ttl", "dense_block", "bn_relu_maxpool", "model")
_HERE = Path(__file__).resolve().parent
# in a checkout, benchmarks/results/ (the layout the docs show); installed, a folder in the working directory
DEFAULT_OUT = _HERE / "results" if (_HERE.parent / "pyproject.toml").exists() else Path("t3d-bench-results")


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
        default=DEFAULT_OPS,
        help=f"comma-separated ops to run, of {','.join(OP_MODULES)}",
    )
    p.add_argument(
        "--passes",
        type=lambda s: _csv_list(s, "--passes", PASSES),
        default=PASSES,
        help="forward (inference, no grad), backward (backward alone), train (forward+backward)",
    )
    p.add_argument("--dtype", default="float32", help="tensor dtype (float32, bfloat16, float16, float64)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:i]")
    p.add_argument(
        "--repeats", type=int, default=9, help="timed rounds per row (median, IQR and the speed-up's 95%% CI over them)"
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after the first (compiling) call")
    p.add_argument(
        "--time-budget",
        type=float,
        default=3.0,
        help="seconds per row: slow rows use fewer repeats (never below 3), fast rows more (up to --max-repeats)",
    )
    p.add_argument(
        "--max-repeats",
        type=int,
        default=None,
        help="most timed rounds of a fast row within --time-budget (default 3 x --repeats): more paired ratios, "
        "a narrower confidence interval of the speed-up",
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
    p.add_argument(
        "--ratio-noise",
        type=float,
        default=0.05,
        help="a speed-up whose 95%% confidence interval reaches further than this fraction from its median is "
        "measured again, then marked noisy",
    )
    p.add_argument(
        "--canary-drop",
        type=float,
        default=0.15,
        help="CPU: a pass during which the machine's speed (a small sgemm before and after it) was more than this "
        "fraction below the run's best is measured again, then marked noisy",
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
    p.add_argument(
        "--profile",
        action="store_true",
        help="CUDA: print the top GPU kernels of every fused contender and pass (JSON: the rows' kernels)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument(
        "--malloc",
        choices=MALLOC_MODES,
        default="pinned",
        help="pinned: fix glibc malloc's mmap/trim thresholds for the run, so that whether a big tensor is fresh "
        "(page faults) does not depend on the process; system: leave the allocator as it is",
    )
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
    max_repeats = 3 * args.repeats if args.max_repeats is None else args.max_repeats
    if max_repeats < args.repeats:
        raise ValueError(f"--max-repeats: expected an integer >= --repeats ({args.repeats}), got {max_repeats}")
    if args.threads < 0:
        raise ValueError(f"--threads: expected an integer >= 0, got {args.threads}")
    if not args.noise > 0 or args.remeasure < 0:
        raise ValueError(f"--noise / --remeasure: expected > 0 / >= 0, got {args.noise} / {args.remeasure}")
    if not args.ratio_noise > 0 or not 0 < args.canary_drop < 1:
        raise ValueError(
            f"--ratio-noise / --canary-drop: expected > 0 / in (0, 1), got {args.ratio_noise} / {args.canary_drop}"
        )
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
        max_repeats=max_repeats,
        check=args.check,
        max_warmup=args.max_warmup,
        noise=args.noise,
        ratio_noise=args.ratio_noise,
        canary_drop=args.canary_drop,
        remeasure=args.remeasure,
        precision=args.precision[0],
        timer=args.timer,
        profile=args.profile,
        malloc=args.malloc,
    )
    cfg.torch_dtype  # validates the dtype name  # noqa: B018
    if cfg.torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: expected a device available here, got {args.device!r} (no CUDA)")
    if cfg.timer == "kernel" and cfg.torch_device.type != "cuda":
        raise ValueError(f"--timer: 'kernel' times GPU kernels and needs --device cuda, got {args.device!r}")
    if cfg.profile and cfg.torch_device.type != "cuda":
        raise ValueError(f"--profile: lists GPU kernels and needs --device cuda, got {args.device!r}")
    return cfg
