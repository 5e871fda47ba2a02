"""The shared benchmark harness: timing, memory, roof, machine info, and the JSON / CSV / PNG / table outputs.

An op's benchmark file (``benchmarks/bench_<op>.py``) only declares shapes and contenders; this module runs them.

The API of an op file (see ``bench_ttl.py`` for a complete example)::

    from benchmarks.harness import BenchConfig, Case, Contender, Skip

    OP = "my_op"                                  # the name used by ``--ops`` and ``--shape my_op:...``

    def cases(cfg: BenchConfig, specs: list[str] | None) -> list[Case]:
        # specs: the ``--shape`` strings given for this op (prefix "my_op:" removed), or None for the default
        # shapes (cfg.paper: the paper's 32x224x224 clip shapes). Raise Skip("why") to skip the whole op
        # (e.g. its module is missing); bad specs raise ValueError naming the spec.
        return [Case(op=OP, label="...", flops=..., build=lambda: [...contenders...], roof_gemm=(m, k, n))]

``Case.build()`` is called only when the case runs (so a case's tensors live only while it runs) and returns
the contenders, all closing over the *same* inputs. A :class:`Contender` is ``fn(training: bool) -> Tensor``
plus the tensors its gradients are taken for (``grad_tensors``: the input and the parameters). The harness
runs every pass of ``cfg.passes`` for every contender:

- ``forward``: ``fn(False)`` under ``torch.no_grad()`` (inference).
- ``backward``: ``y = fn(True)`` once, in the untimed first call, then ``torch.autograd.grad(y, grad_tensors,
  dy, retain_graph=True)`` timed alone, repeated over the retained graph ("compile" contenders, whose compiled
  backward refuses retain_graph: a fresh forward before every call, outside the timed region).
- ``train``: ``fn(True)`` then the same ``torch.autograd.grad``, timed together (a training step minus the
  optimizer).

Exactly one contender per case has ``kind="baseline"`` (the eager reference: oneDNN on CPU, cuDNN on GPU);
every row's ``speedup`` is baseline ms / contender ms of the same case and pass, measured in the same run.
Keep an op's default cases to about a minute on a 2-core CPU (``make bench`` runs every op's defaults and
must finish in ~10 minutes); heavier shapes go behind ``cfg.paper`` or ``--shape``.
``kind="fused"`` marks the contenders that ``--fail-if-slower`` checks. ``Case.flops`` is the *reference's*
forward FLOP count (backward = 2x, train = 3x): the effective GFLOP/s of every contender uses it, so a
contender that does less arithmetic (the pool-first algebra) can exceed the sgemm roof.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "PASSES",
    "PASS_FLOP_FACTOR",
    "BenchConfig",
    "Case",
    "Contender",
    "Skip",
    "Timing",
    "check_fail_if_slower",
    "compiled",
    "count_flops",
    "fused_backends",
    "machine_info",
    "markdown_table",
    "parse_ints",
    "pass_runner",
    "print_table",
    "run_cases",
    "saved_tensor_bytes",
    "sgemm_gflops",
    "time_callable",
    "write_csv",
    "write_json",
    "write_markdown",
    "write_plot",
]

PASSES = ("forward", "backward", "train")
# multiples of the forward FLOPs: backward = grad of the input + grad of the weights, each as big as forward
PASS_FLOP_FACTOR = {"forward": 1.0, "backward": 2.0, "train": 3.0}
WARMUP_SKIP_MS = 1000.0
CONTENDER_KINDS = ("baseline", "fused", "compile", "other")

# columns of the CSV (and of every JSON row), in order
COLUMNS = [
    "op",
    "shape",
    "pass",
    "contender",
    "kind",
    "status",
    "ms",
    "ms_q1",
    "ms_q3",
    "ms_iqr",
    "repeats",
    "speedup",
    "gflops",
    "pct_roof",
    "roof_gflops",
    "saved_mb",
    "peak_mb",
    "max_rel_err",
    "first_call_ms",
    "flops",
    "device",
    "dtype",
    "threads",
]


class Skip(Exception):
    """Raised by an op file's ``cases`` (or a contender's build) to skip it with a reason."""


@dataclass
class BenchConfig:
    """What to run and how; built from the command line by ``benchmarks.__main__``."""

    device: str = "cpu"
    dtype: str = "float32"
    passes: tuple[str, ...] = PASSES
    repeats: int = 5
    warmup: int = 1
    threads: int = 0  # 0: keep torch's default
    paper: bool = False
    batches: tuple[int, ...] = (1, 4)
    backends: tuple[str, ...] | None = None  # fused backends to run (None: every available one for the device)
    compile: bool = True  # include torch.compile contenders
    compile_model_train: bool = False  # also compile whole models' training graph (minutes on a small CPU)
    # batch sizes whose cases keep their "compile" contenders (None: all); compiling is the slow part of the suite
    compile_batches: tuple[int, ...] | None = (1,)
    time_budget_s: float = 3.0  # per row: fewer repeats (>= 3) when one iteration is slow
    check: bool = True  # compare each contender's forward output with the baseline's (max_rel_err)
    seed: int = 0

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype: expected a torch dtype name such as 'float32' or 'bfloat16', got {self.dtype!r}")
        return dtype


@dataclass
class Contender:
    """One implementation of a case.

    fn: ``fn(training) -> Tensor`` (or a tuple whose first item is the output); closes over the case's inputs.
    grad_tensors: tensors the backward computes gradients for (input and parameters; all requires_grad).
    kind: "baseline" (the eager reference, denominator of every ratio), "fused" (our kernels; checked by
        ``--fail-if-slower``), "compile" (torch.compile of the reference) or "other".
    passes: the passes this contender runs (None: all).
    """

    name: str
    fn: Callable[[bool], Any]
    grad_tensors: Sequence[torch.Tensor] = ()
    kind: str = "other"
    passes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in CONTENDER_KINDS:
            raise ValueError(f"kind: expected one of {CONTENDER_KINDS}, got {self.kind!r}")


@dataclass
class Case:
    """One shape of one op.

    label: the shape as shown in tables and plots (short, unique within the op).
    flops: forward FLOPs of the *reference* (multiply-add = 2), used for every contender's GFLOP/s.
    build: () -> list[Contender], called when the case runs; may raise :class:`Skip`.
    roof_gemm: (M, K, N) of the sgemm measured as this case's roof (a GEMM of similar size).
    info: extra fields recorded in the JSON (the shape's parameters). Its "batch", or else the first size of its
        "input" (or "clip"), is the case's batch size: "compile" contenders run only for ``cfg.compile_batches``.
    """

    op: str
    label: str
    flops: float
    build: Callable[[], list[Contender]]
    roof_gemm: tuple[int, int, int] = (2048, 2048, 256)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        """The batch size: ``info["batch"]``, else the first size of ``info["input"]`` or ``info["clip"]``."""
        if "batch" in self.info:
            return int(self.info["batch"])
        sizes = self.info.get("input") or self.info.get("clip") or [1]
        return int(sizes[0])


@dataclass
class Timing:
    """Per-repeat times (ms) of one contender and pass, and their summary."""

    samples_ms: list[float]
    first_call_ms: float = float("nan")

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def q1(self) -> float:
        return _quantile(self.samples_ms, 0.25)

    @property
    def q3(self) -> float:
        return _quantile(self.samples_ms, 0.75)


def _quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), defined for one sample too."""
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# --------------------------------------------------------------------------------------------------------
# timing, memory, roof
# --------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(
    run: Callable[[], Any],
    device: torch.device,
    repeats: int,
    warmup: int = 1,
    setup: Callable[[], Any] | None = None,
    time_budget_s: float | None = None,
    min_repeats: int = 3,
) -> Timing:
    """Time ``run(setup())`` (or ``run()`` without setup): one first call (compile, caches), ``warmup`` untimed
    calls, then ``repeats`` timed calls. ``setup`` runs before every call, outside the timed region.

    The warm-up calls are skipped when the first call took longer than :data:`WARMUP_SKIP_MS`.
    CPU: ``time.perf_counter`` around the call. CUDA: ``torch.cuda.Event`` pairs around the call, synchronised
    after it. With ``time_budget_s``, the repeats are cut (not below ``min_repeats``) so that they take about
    that long, judged by the warm-up calls.
    """
    cuda = device.type == "cuda"

    def once() -> float:
        arg = setup() if setup is not None else None
        _sync(device)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(arg) if setup is not None else run()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        t0 = time.perf_counter()
        run(arg) if setup is not None else run()
        return (time.perf_counter() - t0) * 1e3

    first = once()
    # a call of a second or more is past any cache or allocator warm-up: more warm-up calls only cost time
    warm = [once() for _ in range(max(0, warmup))] if first < WARMUP_SKIP_MS else []
    if time_budget_s is not None:
        estimate = min(warm) if warm else first
        if estimate > 0:
            repeats = max(min(repeats, min_repeats), min(repeats, int(time_budget_s * 1e3 / estimate)))
    return Timing([once() for _ in range(max(1, repeats))], first_call_ms=first)


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def saved_tensor_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn()`` runs, deduplicated by storage.

    Storages of ``exclude`` (the inputs and parameters, which exist anyway) are not counted. This is the
    activation memory a training step holds between forward and backward; tracemalloc cannot see torch's
    allocations, and on CPU there is no allocator peak counter.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # e.g. a tensor subclass without storage
            return t
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def sgemm_gflops(m: int, k: int, n: int, device: torch.device, dtype: torch.dtype, repeats: int = 7) -> float:
    """GFLOP/s of ``torch.mm`` of (m, k) @ (k, n) on this device, measured now: the roof of this run.

    The best of the repeats, not the median: a roof is what the machine can do, and on a shared machine the
    median mostly measures the neighbours."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device, dtype)
    b = torch.randn(k, n, generator=gen).to(device, dtype)
    timing = time_callable(lambda: torch.mm(a, b), device, repeats=repeats, warmup=1)
    return 2.0 * m * k * n / (min(timing.samples_ms) * 1e-3) / 1e9


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of ``fn()`` as counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions, matmuls;
    multiply-add = 2). Works on meta tensors, so an op file can count a big model's FLOPs without running it."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def _cuda_peak_mb(run: Callable[[], Any], device: torch.device) -> float:
    """Peak CUDA memory (MB) allocated by ``run()`` above what was allocated before it."""
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = run()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return peak / 2**20


# --------------------------------------------------------------------------------------------------------
# contender helpers for op files
# --------------------------------------------------------------------------------------------------------


def compiled(fn: Callable[..., Any], **kwargs: Any) -> Callable[..., Any]:
    """``torch.compile(fn)`` with this suite's settings. The first call of each pass compiles (recorded as the
    row's ``first_call_ms``); ``training`` and grad mode are guards, so each pass compiles once."""
    return torch.compile(fn, dynamic=False, **kwargs)


def fused_backends(op: str, cfg: BenchConfig) -> list[str]:
    """The fused backends of ``op`` to run on ``cfg.device``: ``cfg.backends`` if given, else every built one
    that runs natively there (cpu / cuda / triton; Triton on CPU only runs interpreted, so it is left out),
    and "composite" when none is."""
    from t3d_kernels.backends import backends, declared, get

    device = cfg.torch_device
    built = backends(op)
    if cfg.backends is not None:
        return [b for b in cfg.backends if b in declared(op)]
    native = [b for b in ("cpu", "cuda", "triton") if b in built and not get(op, b).not_supported_reasons(device)]
    if device.type == "cpu":
        native = [b for b in native if b != "triton"]
    if not native and "composite" in built:
        native = ["composite"]
    return native


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    """``"1,256,16,28,28"`` -> (1, 256, 16, 28, 28); a clear ValueError naming ``what`` otherwise."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{what}: expected comma-separated positive integers, got {text!r}")
    return values


# --------------------------------------------------------------------------------------------------------
# the runner
# --------------------------------------------------------------------------------------------------------


def _row(case: Case, pass_: str, contender: Contender | None, cfg: BenchConfig, status: str) -> dict[str, Any]:
    row = {c: None for c in COLUMNS}
    row.update(
        op=case.op,
        shape=case.label,
        **{"pass": pass_},
        contender=contender.name if contender else None,
        kind=contender.kind if contender else None,
        status=status,
        flops=case.flops * PASS_FLOP_FACTOR[pass_],
        device=cfg.device,
        dtype=cfg.dtype,
        threads=torch.get_num_threads(),
    )
    return row


def pass_runner(contender: Contender, pass_: str, grad_out: dict[str, torch.Tensor]):
    """(setup, run) callables of one pass: time ``run(setup())`` (``run()`` when setup is None); see the module
    docstring for what each pass times. ``grad_out`` caches the output gradient shared by a case's contenders."""
    fn, tensors = contender.fn, list(contender.grad_tensors)

    def backward(y: torch.Tensor, retain_graph: bool = False) -> Any:
        dy = grad_out.get("dy")
        if dy is None or dy.shape != y.shape:
            # one fixed output gradient per case, shared by all contenders
            gen = torch.Generator(device="cpu").manual_seed(1)
            dy = grad_out["dy"] = torch.randn(y.shape, generator=gen).to(y.device, y.dtype)
        return torch.autograd.grad(y, tensors, dy, retain_graph=retain_graph, allow_unused=True)

    if pass_ == "forward":

        def run_forward() -> Any:
            with torch.no_grad():
                return fn(False)

        return None, run_forward
    if pass_ == "backward" and contender.kind == "compile":
        # a compiled backward donates its buffers and refuses retain_graph: a fresh forward before every call,
        # outside the timed region
        return (lambda: _first(fn(True))), backward
    if pass_ == "backward":
        # one forward (in the untimed first call), then the backward repeated over the retained graph: the
        # same work as a fresh graph's backward, without paying a forward per repeat
        graph: dict[str, torch.Tensor] = {}

        def backward_retained() -> Any:
            if "y" not in graph:
                graph["y"] = _first(fn(True))
            return backward(graph["y"], retain_graph=True)

        return None, backward_retained
    return None, (lambda: backward(_first(fn(True))))


def _describe(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 200 characters)."""
    message = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {message}"


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.shape != ref.shape:
        return float("inf")
    diff = (out.double() - ref.double()).abs().max().item()
    return diff / max(ref.double().abs().max().item(), 1e-30)


def run_cases(
    cases: Sequence[Case],
    cfg: BenchConfig,
    progress: Callable[[str], None] | None = None,
    roofs: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Run every case, pass and contender; return one row (dict with :data:`COLUMNS`) each.

    A contender that raises gets a row with ``status="error: ..."`` instead of stopping the suite; a case
    whose build raises :class:`Skip` gets one ``status="skipped: ..."`` row. ``progress(msg)`` is called
    after every row. ``roofs`` (optional) collects the sgemm GFLOP/s per "MxKxN".
    """
    device, dtype = cfg.torch_device, cfg.torch_dtype
    roofs = {} if roofs is None else roofs
    rows: list[dict[str, Any]] = []
    for case in cases:
        torch.manual_seed(cfg.seed)
        if "torch._dynamo" in sys.modules:
            # every case compiles its own functions; dynamo's caches (and its recompile limit, counted per code
            # object, which the closures of all cases share) must not carry over from the previous case
            torch._dynamo.reset()
        try:
            # the baseline runs first in every pass: the others' errors are measured against its output
            contenders = sorted(case.build(), key=lambda c: c.kind != "baseline")
            if cfg.compile_batches is not None and case.batch not in cfg.compile_batches:
                contenders = [c for c in contenders if c.kind != "compile"]
        except Exception as exc:  # noqa: BLE001 - a case that cannot be built must not stop the suite
            status = f"skipped: {exc}" if isinstance(exc, Skip) else f"error: {_describe(exc)}"
            rows.extend(_row(case, pass_, None, cfg, status) for pass_ in cfg.passes)
            if progress:
                progress(f"{case.op} {case.label}: {status}")
            continue
        m, k, n = case.roof_gemm
        roof_key = f"{m}x{k}x{n}"
        if roof_key not in roofs:
            roofs[roof_key] = sgemm_gflops(m, k, n, device, dtype)
        roof = roofs[roof_key]
        saved_cache: dict[str, float] = {}
        reference_out: torch.Tensor | None = None
        grad_out: dict[str, torch.Tensor] = {}
        for pass_ in cfg.passes:
            pass_rows = []
            for contender in contenders:
                if contender.passes is not None and pass_ not in contender.passes:
                    continue
                row = _row(case, pass_, contender, cfg, "ok")
                try:
                    setup, run = pass_runner(contender, pass_, grad_out)
                    timing = time_callable(
                        run, device, cfg.repeats, cfg.warmup, setup=setup, time_budget_s=cfg.time_budget_s
                    )
                    if cfg.check and pass_ == "forward":
                        # after the timing, so that a compile contender's first call is its recorded compile
                        out = _first(run()).detach()
                        if contender.kind == "baseline":
                            reference_out = out
                        elif reference_out is not None:
                            row["max_rel_err"] = _rel_err(out, reference_out)
                        del out
                    if pass_ != "forward" and contender.name not in saved_cache:
                        saved_cache[contender.name] = (
                            saved_tensor_bytes(lambda c=contender: c.fn(True), exclude=contender.grad_tensors) / 2**20
                        )
                    if device.type == "cuda":
                        row["peak_mb"] = _cuda_peak_mb(
                            (lambda s=setup, r=run: r(s())) if setup is not None else run, device
                        )
                except Skip as exc:
                    row["status"] = f"skipped: {exc}"
                    timing = None
                except Exception as exc:  # noqa: BLE001 - one broken contender must not stop the suite
                    row["status"] = f"error: {_describe(exc)}"
                    timing = None
                if timing is not None:
                    row.update(
                        ms=timing.median,
                        ms_q1=timing.q1,
                        ms_q3=timing.q3,
                        ms_iqr=timing.q3 - timing.q1,
                        repeats=len(timing.samples_ms),
                        first_call_ms=timing.first_call_ms,
                        gflops=row["flops"] / (timing.median * 1e-3) / 1e9,
                        roof_gflops=roof,
                        saved_mb=saved_cache.get(contender.name),
                    )
                    row["pct_roof"] = 100.0 * row["gflops"] / roof
                pass_rows.append(row)
                rows.append(row)
                if progress:
                    progress(f"{case.op} {case.label} {pass_} {contender.name}: {row['status']}")
            base = [r for r in pass_rows if r["kind"] == "baseline" and r["ms"]]
            for r in pass_rows:
                if base and r["ms"]:
                    r["speedup"] = base[0]["ms"] / r["ms"]
        del contenders, reference_out, grad_out
    return rows


def check_fail_if_slower(rows: Iterable[dict[str, Any]], ratio: float) -> list[dict[str, Any]]:
    """The fused rows whose speed-up vs their baseline is below ``ratio`` (rows without a speed-up, e.g.
    skipped or failed, are not counted: they are reported separately)."""
    return [r for r in rows if r.get("kind") == "fused" and r.get("speedup") is not None and r["speedup"] < ratio]


# --------------------------------------------------------------------------------------------------------
# machine info and outputs
# --------------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Machine, versions and threads of this run (recorded in the JSON)."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "device": str(device),
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import t3d_kernels

        info["t3d_kernels"] = t3d_kernels.__version__
        info["backends_ttl"] = t3d_kernels.backends("ttl")
    except Exception as exc:  # noqa: BLE001 - the harness also works without the package built
        info["t3d_kernels"] = f"unavailable: {exc}"
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["cudnn_benchmark"] = torch.backends.cudnn.benchmark
        info["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        info["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return info


def write_json(path: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=_json_default) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return list(value)
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return str(value)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in COLUMNS})
    return path


def markdown_table(rows: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> str:
    """The result as a Markdown table (for docs/benchmarks.md), headed by the machine and the command."""
    lines = []
    machine = (meta or {}).get("machine", {})
    if machine:
        where = machine.get("gpu") or machine.get("cpu")
        lines.append(
            f"Measured {machine.get('date_utc', '?')} on {where} ({machine.get('cpu_count')} cores), "
            f"{machine.get('threads')} thread(s), torch {machine.get('torch')}; load average before the run "
            f"{', '.join(f'{v:.1f}' for v in machine.get('load_avg') or [])}."
        )
    if meta and meta.get("command"):
        lines.append(f"Command: `{meta['command']}`")
    if lines:
        lines.append("")
    with_peak = any(r.get("peak_mb") is not None for r in rows)
    header = ["op", "shape", "pass", "contender", "ms", "IQR", "speed-up", "GFLOP/s", "% roof", "saved MB"]
    header += ["peak MB"] if with_peak else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * 4 + "--:|" * (len(header) - 4)]
    for r in rows:
        if r["status"] != "ok":
            cells = [r["op"], r["shape"], r["pass"], r["contender"] or "-", r["status"]] + [""] * (len(header) - 5)
        else:
            speed = "1 (base)" if r["kind"] == "baseline" else _fmt(r["speedup"], ".2f") + "x"
            cells = [
                r["op"],
                r["shape"],
                r["pass"],
                r["contender"],
                _fmt(r["ms"], ".1f"),
                _fmt(r["ms_iqr"], ".1f"),
                speed,
                _fmt(r["gflops"], ".0f"),
                _fmt(r["pct_roof"], ".0f"),
                _fmt(r["saved_mb"], ".3g"),
            ]
            cells += [_fmt(r["peak_mb"], ".1f")] if with_peak else []
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, rows: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown_table(rows, meta))
    return path


def write_plot(path: Path, rows: list[dict[str, Any]], title: str = "") -> Path | None:
    """Bar chart of the speed-up vs the baseline per shape (x), one panel per pass, one bar per contender.

    Returns None when there is nothing to plot (no timed non-baseline row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r.get("speedup") is not None and r["kind"] != "baseline"]
    if not timed:
        return None
    passes = [p for p in PASSES if any(r["pass"] == p for r in timed)]
    contenders = list(dict.fromkeys(r["contender"] for r in timed))
    shapes = list(dict.fromkeys(f"{r['op']}\n{r['shape']}" for r in timed))
    fig, axes = plt.subplots(
        len(passes),
        1,
        figsize=(max(6.0, 0.9 * len(shapes) * max(1, len(contenders)) * 0.45 + 2), 3.2 * len(passes)),
        squeeze=False,
    )
    width = 0.8 / max(1, len(contenders))
    for ax, pass_ in zip(axes[:, 0], passes, strict=True):
        for j, name in enumerate(contenders):
            xs, ys = [], []
            for i, shape in enumerate(shapes):
                for r in timed:
                    if r["pass"] == pass_ and r["contender"] == name and f"{r['op']}\n{r['shape']}" == shape:
                        xs.append(i + (j - (len(contenders) - 1) / 2) * width)
                        ys.append(r["speedup"])
            if xs:
                bars = ax.bar(xs, ys, width, label=name)
                ax.bar_label(bars, fmt="%.1f", fontsize=6)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(shapes)), shapes, fontsize=6)
        ax.set_ylabel("speed-up vs eager")
        ax.set_title(f"{pass_}", fontsize=9)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.12)  # room for the bar labels
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def print_table(rows: list[dict[str, Any]], console: Any = None) -> None:
    """The terminal table (rich): one line per op and shape, pass and contender; the peak-memory column only
    when some row has one (CUDA)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    with_peak = any(r.get("peak_mb") is not None for r in rows)
    table = Table(header_style="bold", pad_edge=False)
    columns = ["case", "pass", "contender", "ms", "IQR", "speed-up", "GFLOP/s", "% roof", "saved MB"]
    columns += ["peak MB"] if with_peak else []
    columns += ["rel err"]
    for name in columns:
        table.add_column(name, justify="left" if name in ("case", "pass", "contender") else "right")
    previous = None
    notes: list[str] = []  # the full status of every row that did not run, printed under the table
    for r in rows:
        key = (r["op"], r["shape"], r["pass"])
        if previous is not None and key != previous:
            table.add_section()
        previous = key
        case = f"{r['op']} {r['shape']}" if r["shape"] != "-" else r["op"]
        if r["status"] != "ok":
            notes.append(f"[{len(notes) + 1}] {case} {r['pass']} {r['contender'] or ''}: {r['status']}")
            kind = r["status"].split(":", 1)[0]
            table.add_row(escape(case), r["pass"], escape(r["contender"] or "-"), f"[yellow]{kind} [{len(notes)}][/]")
            continue
        speed = "base" if r["kind"] == "baseline" else _fmt(r["speedup"], ".2f") + "x"
        cells = [
            case,
            r["pass"],
            r["contender"],
            _fmt(r["ms"], ".2f"),
            _fmt(r["ms_iqr"], ".2f"),
            speed,
            _fmt(r["gflops"], ".0f"),
            _fmt(r["pct_roof"], ".0f"),
            _fmt(r["saved_mb"], ".3g"),
        ]
        cells += [_fmt(r["peak_mb"], ".1f")] if with_peak else []
        cells += [_fmt(r["max_rel_err"], ".0e")]
        table.add_row(*(escape(c) for c in cells))
    console.print(table)
    for note in notes:
        console.print(note, style="yellow", markup=False, highlight=False)
