"""What an op's benchmark file declares: its cases (:class:`Case`), their contenders (:class:`Contender`), and the
run's configuration (:class:`BenchConfig`). :mod:`.runner` runs them; :mod:`.harness` re-exports everything."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

PASSES = ("forward", "backward", "train")
# multiples of the forward FLOPs: backward = grad of the input + grad of the weights, each as big as forward
PASS_FLOP_FACTOR = {"forward": 1.0, "backward": 2.0, "train": 3.0}
CONTENDER_KINDS = ("baseline", "fused", "compile", "other")
# "fp32": the tensors' dtype as given (on CUDA, cuDNN convolutions follow torch.backends.cudnn.allow_tf32, TF32 by
# PyTorch's default); "bf16" / "fp16": the same float32 tensors under torch.autocast to that dtype
PRECISIONS = ("fp32", "bf16", "fp16")
TIMERS = ("wall", "kernel")
MALLOC_MODES = ("pinned", "system")

# Largest max-abs-difference / max-abs of the baseline's output that a contender may show before its rows are
# error rows (no speed-up published): about 10-20x the error of PyTorch's own reference against float64 in that
# precision, measured here (`t3d_kernels.reference` on TTL1 (1,256,16,28,28) and T3D-121 eval logits
# at clip 1x3x32x112x112): float32 3e-7 / 5e-7 (the fused model vs eager: 5e-7); bf16 autocast 3e-3 / 6e-3 (fused
# vs eager bf16: 5e-3). TF32 and fp16 keep a 10-bit mantissa (~8x bf16's precision). A real bug is far beyond
# these (the batch >= 3 TTL bug of issue 11 was off by 15-86%).
TOLERANCE = {"float64": 1e-10, "float32": 1e-5, "tf32": 2e-2, "float16": 2e-2, "bfloat16": 5e-2}

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
    "measurements",
    "warmup_calls",
    "free_cores",
    "canary_gflops",
    "faults_per_call",
    "speedup",
    "speedup_lo",
    "speedup_hi",
    "gflops",
    "pct_roof",
    "roof_gflops",
    "clips_per_s",
    "saved_mb",
    "peak_mb",
    "max_batch",
    "max_rel_err",
    "tolerance",
    "first_call_ms",
    "flops",
    "batch",
    "device",
    "dtype",
    "precision",
    "timer",
    "threads",
]


class Skip(Exception):
    """Raised by an op file's ``cases`` (or a contender's build) to skip it with a reason."""


@dataclass
class BenchConfig:
    """What to run and how; built from the command line by :mod:`.cli`."""

    device: str = "cpu"
    dtype: str = "float32"
    passes: tuple[str, ...] = PASSES
    repeats: int = 9  # timed rounds (the speed-up's 95% CI of the median: from the 2nd to the 8th of 9 ratios)
    warmup: int = 1  # at least this many untimed calls after the first; more until the times are stable
    max_warmup: int = 20
    stable_tol: float = 0.1  # warm-up ends when the last 3 calls are within 10% of each other
    noise: float = 0.2  # a row is noisy when its IQR exceeds this fraction of its median ...
    ratio_noise: float = 0.05  # ... or a speed-up's 95% CI reaches further than this fraction from its median ...
    canary_drop: float = 0.15  # ... or (CPU) the machine ran this fraction below its best speed of the run ...
    remeasure: int = 2  # ... then the whole pass is measured again, at most this many times
    threads: int = 0  # 0: keep torch's default
    paper: bool = False
    batches: tuple[int, ...] = (1, 4)
    model_batches: tuple[int, ...] | None = None  # batch sizes of the whole-model cases (None: per device)
    backends: tuple[str, ...] | None = None  # fused backends to run (None: every available one for the device)
    compile: bool = True  # include torch.compile contenders
    compile_model_train: bool = False  # also compile whole models' training graph (minutes on a small CPU)
    # batch sizes whose cases keep their "compile" contenders (None: all); compiling is the slow part of the suite
    compile_batches: tuple[int, ...] | None = (1,)
    time_budget_s: float = 3.0  # per contender and pass: fewer repeats (>= 3) when one call is slow ...
    # ... and more, up to this many, when the calls are fast (a narrower CI of the speed-up; None: repeats)
    max_repeats: int | None = None
    check: bool = True  # compare each contender's forward output with the baseline's (max_rel_err)
    precision: str = "fp32"
    timer: str = "wall"  # "wall": perf_counter on CPU, CUDA events on GPU; "kernel": profiler's GPU kernel time
    profile: bool = False  # CUDA: record the fused contenders' top kernels per pass (row "kernels")
    seed: int = 0
    # "pinned": glibc malloc's thresholds fixed for the run (benchmarks.allocator.pin_malloc); "system": as is
    malloc: str = "pinned"

    def __post_init__(self) -> None:
        if self.malloc not in MALLOC_MODES:
            raise ValueError(f"malloc: expected one of {MALLOC_MODES}, got {self.malloc!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {self.precision!r}")
        if self.timer not in TIMERS:
            raise ValueError(f"timer: expected one of {TIMERS}, got {self.timer!r}")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype: expected a torch dtype name such as 'float32' or 'bfloat16', got {self.dtype!r}")
        return dtype

    @property
    def precision_label(self) -> str:
        """What the convolutions ran in: ``float32``, ``tf32`` (CUDA fp32 with cuDNN's TF32 on),
        ``bf16-autocast``, ``fp16-autocast``, or the tensors' dtype."""
        if self.precision != "fp32":
            return f"{self.precision}-autocast"
        if self.dtype == "float32" and self.torch_device.type == "cuda" and torch.backends.cudnn.allow_tf32:
            return "tf32"
        return self.dtype

    @property
    def tolerance(self) -> float:
        """The default :data:`TOLERANCE` of this run's precision."""
        key = {"bf16": "bfloat16", "fp16": "float16"}.get(self.precision, self.dtype)
        if self.precision == "fp32" and self.precision_label == "tf32":
            key = "tf32"
        return TOLERANCE.get(key, TOLERANCE["float32"])

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """``torch.autocast`` to the run's precision (nothing for fp32)."""
        if self.precision == "fp32":
            yield
            return
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        with torch.autocast(self.torch_device.type, dtype=dtype):
            yield


@dataclass
class Contender:
    """One implementation of a case.

    fn: ``fn(training) -> Tensor`` (or a tuple whose first item is the output); closes over the case's inputs.
    grad_tensors: tensors the backward computes gradients for (input and parameters; all requires_grad).
    kind: "baseline" (the eager reference, denominator of every ratio), "fused" (our kernels; checked by
        ``--fail-if-slower``), "compile" (torch.compile of the reference) or "other".
    passes: the passes this contender runs (None: all).
    flops: the forward FLOPs this implementation does (None: the case's, the reference's): the GFLOP/s and % roof
        columns count it, so an algorithm that skips work (the TTL's pool-first algebra) is judged by the work it
        does; the speed-up is a time ratio either way.
    """

    name: str
    fn: Callable[[bool], Any]
    grad_tensors: Sequence[torch.Tensor] = ()
    kind: str = "other"
    passes: tuple[str, ...] | None = None
    flops: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in CONTENDER_KINDS:
            raise ValueError(f"kind: expected one of {CONTENDER_KINDS}, got {self.kind!r}")


@dataclass
class Case:
    """One shape of one op.

    label: the shape as shown in tables and plots (short, unique within the op).
    flops: forward FLOPs of the *reference* (multiply-add = 2), used for the GFLOP/s of every contender that does
        not declare its own (:attr:`Contender.flops`).
    build: () -> list[Contender], called when the case runs; may raise :class:`Skip`.
    roof_gemm: (M, K, N) of the sgemm measured as this case's roof (a GEMM of similar size).
    roof_conv: (C_in, C_out, k, T, H, W) of a vendor conv3d (k x k x k, 'same', batch 2) also measured; the
        case's roof is then the faster of the two (:func:`benchmarks.roof.conv3d_gflops`).
    info: extra fields recorded in the JSON (the shape's parameters). Its "batch", or else the first size of its
        "input" (or "clip"), is the case's batch size.
    tolerance: largest relative error of a contender's forward output vs the baseline's (None: the run's
        precision's default, :data:`TOLERANCE`); a contender beyond it gets error rows, not a speed-up. ``math.inf``
        for cases whose contenders compute different outputs by design (no output check).
    compile: False drops the case's "compile" contenders (so do ``cfg.compile_batches`` without its batch).
    """

    op: str
    label: str
    flops: float
    build: Callable[[], list[Contender]]
    roof_gemm: tuple[int, int, int] = (2048, 2048, 256)
    roof_conv: tuple[int, int, int, int, int, int] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    tolerance: float | None = None
    compile: bool = True  # keep its "compile" contenders (the CLI compiles only the smallest batch by default)

    @property
    def batch(self) -> int:
        """The batch size: ``info["batch"]``, else the first size of ``info["input"]`` or ``info["clip"]``."""
        if "batch" in self.info:
            return int(self.info["batch"])
        sizes = self.info.get("input") or self.info.get("clip") or [1]
        return int(sizes[0])


def compiled(fn: Callable[..., Any], **kwargs: Any) -> Callable[..., Any]:
    """``torch.compile(fn)`` with this suite's settings. The first call of each pass compiles (recorded as the
    row's ``first_call_ms``); ``training`` and grad mode are guards, so each pass compiles once."""
    return torch.compile(fn, dynamic=False, **kwargs)


def fused_backends(op: str, cfg: BenchConfig) -> list[str]:
    """The fused backends of ``op`` to run on ``cfg.device``: those of ``cfg.backends`` the op declares (one that
    is not built gives error rows saying why), else every built one that runs natively there for the run's dtype
    (cpu / cuda / triton; Triton on CPU only runs interpreted, so it is left out), and "composite" when none is."""
    from t3d_kernels.backends import backends, declared, get

    if cfg.backends is not None:
        return [b for b in cfg.backends if b in declared(op)]
    device = cfg.torch_device
    built = backends(op)
    native = [
        b
        for b in ("cpu", "cuda", "triton")
        if b in built and not get(op, b).not_supported_reasons(device, cfg.torch_dtype)
    ]
    if device.type == "cpu":
        native = [b for b in native if b != "triton"]
    if not native and "composite" in built:
        native = ["composite"]
    return native


def clip_shapes(specs: list[str], op: str) -> list[tuple[str, tuple[int, ...]]]:
    """``--shape op:N,C,T,H,W`` strings -> (label, shape) pairs; a clear ValueError naming the spec otherwise."""
    shapes = []
    for spec in specs:
        shape = parse_ints(spec, f"--shape {op} N,C,T,H,W")
        if len(shape) != 5:
            raise ValueError(f"--shape: expected {op}:N,C,T,H,W, got {spec!r}")
        shapes.append((f"({','.join(map(str, shape))})", shape))
    return shapes


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    """``"1,256,16,28,28"`` -> (1, 256, 16, 28, 28); a clear ValueError naming ``what`` otherwise."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{what}: expected comma-separated positive integers, got {text!r}")
    return values
