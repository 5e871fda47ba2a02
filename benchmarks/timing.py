"""Timers, warm-up until stable, interleaved measurement, and memory probes.

A *timer* is ``timer(run, setup) -> ms``: it calls ``run(setup())`` (``run()`` when setup is None) once, setup
outside the timed region, and returns how long the call took. The runner only ever times through a timer, so a
test can inject a fake one (scripted times, no clock) and check what the harness publishes.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .allocator import minor_faults

Timer = Callable[[Callable[..., Any], Callable[[], Any] | None], float]
STABLE_WINDOW = 3  # warm-up calls compared for stability


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
        return quantile(self.samples_ms, 0.25)

    @property
    def q3(self) -> float:
        return quantile(self.samples_ms, 0.75)

    @property
    def iqr_fraction(self) -> float:
        """IQR / median: how much of the median the middle half of the repeats spreads over."""
        return (self.q3 - self.q1) / self.median if self.median > 0 else 0.0


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), defined for one sample too."""
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _call(run: Callable[..., Any], setup: Callable[[], Any] | None) -> Any:
    return run(setup()) if setup is not None else run()


class WallTimer:
    """CPU: ``time.perf_counter`` around the call. CUDA: a ``torch.cuda.Event`` pair around it, synchronised
    after it (the call as seen from Python: launches and gaps between kernels included). On CPU it also counts the
    call's minor page faults (:attr:`last_faults`): a call that touches fresh memory pays for it in its time."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.last_faults: int | None = None

    def __call__(self, run: Callable[..., Any], setup: Callable[[], Any] | None = None) -> float:
        arg = setup() if setup is not None else None
        sync(self.device)
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(arg) if setup is not None else run()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        faults = minor_faults()
        t0 = time.perf_counter()
        run(arg) if setup is not None else run()
        ms = (time.perf_counter() - t0) * 1e3
        self.last_faults = minor_faults() - faults
        return ms


def wall_timer(device: torch.device) -> Timer:
    """A :class:`WallTimer` for ``device``."""
    return WallTimer(device)


def kernel_timer(device: torch.device) -> Timer:
    """The sum of the call's GPU kernel times, from ``torch.profiler``: GPU time without the Python and launch
    gaps between kernels (what a CUDA-graph-captured or compiled step would pay). CUDA only."""
    if device.type != "cuda":
        raise ValueError(f"timer: 'kernel' times GPU kernels and needs a CUDA device, got device {device}")
    from torch.profiler import ProfilerActivity, profile

    def timer(run: Callable[..., Any], setup: Callable[[], Any] | None = None) -> float:
        arg = setup() if setup is not None else None
        sync(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run(arg) if setup is not None else run()
            sync(device)
        # with only CUDA activity recorded, each event's self device time is one kernel's (or memcpy's) time
        return sum(getattr(e, "self_device_time_total", 0.0) for e in prof.key_averages()) / 1e3

    return timer


def top_kernels(run: Callable[[], Any], device: torch.device, top: int = 12) -> list[list[Any]]:
    """[kernel name, GPU ms per call, calls] of the ``top`` kernels of one call of ``run`` by GPU time (CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        sync(device)
    events = sorted(prof.key_averages(), key=lambda e: -getattr(e, "self_device_time_total", 0.0))
    return [[e.key, getattr(e, "self_device_time_total", 0.0) / 1e3, e.count] for e in events[:top]]


def make_timer(kind: str, device: torch.device) -> Timer:
    """The timer named ``kind`` ("wall" or "kernel", see :data:`benchmarks.api.TIMERS`) for ``device``."""
    if kind == "wall":
        return wall_timer(device)
    if kind == "kernel":
        return kernel_timer(device)
    raise ValueError(f"timer: expected 'wall' or 'kernel', got {kind!r}")


class CpuContention:
    """How many cores' worth of CPU other processes (and the hypervisor's steal) used while a measurement ran,
    from Linux's ``/proc/stat`` minus this process's own CPU time: a competing process is seen directly, even
    when it slows every call alike (which leaves the IQR small). ``start()``, then ``stop() -> cores``."""

    def __init__(self) -> None:
        self._t0 = self._busy0 = self._own0 = 0.0

    @staticmethod
    def available() -> bool:
        return os.path.exists("/proc/stat")

    @staticmethod
    def _busy_s() -> float:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal [guest guest_nice: already counted in user/nice]
        busy = fields[0] + fields[1] + fields[2] + sum(fields[5:8])
        return busy / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_s() -> float:
        t = os.times()
        return t.user + t.system

    def start(self) -> None:
        self._t0, self._busy0, self._own0 = time.perf_counter(), self._busy_s(), self._own_s()

    def stop(self) -> float:
        wall = time.perf_counter() - self._t0
        others = (self._busy_s() - self._busy0) - (self._own_s() - self._own0)
        return max(0.0, others / wall) if wall > 0 else 0.0


def median_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval of the median of ``values``: the order statistics (k, n+1-k) with
    the largest k such that P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2 (k >= 1: with few values, the smallest
    and the largest, whose coverage is 1 - 2^(1-n))."""
    s = sorted(v for v in values if not math.isnan(v))
    if not s:
        return math.nan, math.nan
    n, alpha, k, tail = len(s), (1.0 - confidence) / 2, 1, 0.0
    while True:  # tail = P(B <= k - 1)
        tail += math.comb(n, k - 1) / 2**n
        if k + 1 > (n + 1) // 2 or tail + math.comb(n, k) / 2**n > alpha:
            break
        k += 1
    return s[k - 1], s[n - k]


def paired_ratios(base: Sequence[float], other: Sequence[float]) -> list[float]:
    """``base[r] / other[r]`` of every round ``r`` where both were timed: the speed-up as each round saw it. The
    two calls of a round ran back to back, so a slow drift of the machine cancels in each ratio."""
    return [b / o for b, o in zip(base, other, strict=True) if b > 0 and o > 0 and not math.isnan(b + o)]


class SpeedCanary:
    """The machine's compute speed now: the best GFLOP/s of a few small sgemms on the run's threads (about 10 ms
    each on a 2-core AVX-512 machine). Measured before and after every timed pass and compared with the best seen in
    the run, it sees what ``/proc/stat`` cannot: a neighbour outside this machine's view (another VM on the same
    physical cores, the host's throttling) that slows every call alike. ``warm_up()`` once at the start of a run:
    the thread pool, the clocks and the allocator of a fresh process settle before the first row is timed."""

    def __init__(self, device: torch.device | None = None, size: int = 768, calls: int = 3) -> None:
        self.device = device or torch.device("cpu")
        gen = torch.Generator(device="cpu").manual_seed(0)
        self._a = torch.randn(size, size, generator=gen).to(self.device)
        self._b = torch.randn(size, size, generator=gen).to(self.device)
        self._flops = 2.0 * size**3
        self._timer = wall_timer(self.device)
        self.calls = calls
        self.best = 0.0

    def __call__(self) -> float:
        """GFLOP/s now (the best of ``calls`` sgemms); updates :attr:`best`."""
        best_ms = min(self._timer(lambda: torch.mm(self._a, self._b)) for _ in range(self.calls))
        gflops = self._flops / (best_ms * 1e-3) / 1e9
        self.best = max(self.best, gflops)
        return gflops

    def warm_up(self, seconds: float = 1.0, tol: float = 0.05, max_seconds: float = 5.0) -> list[float]:
        """Measure for at least ``seconds`` and until the last :data:`STABLE_WINDOW` speeds are within ``tol``
        (at most ``max_seconds``). Returns the speeds."""
        speeds: list[float] = []
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < max_seconds:
            speeds.append(self())
            if time.perf_counter() - t0 >= seconds and stable(speeds, tol):
                break
        return speeds


def stable(times: Sequence[float], tol: float, window: int = STABLE_WINDOW) -> bool:
    """True when the last ``window`` times are within ``tol`` (a fraction) of each other."""
    last = list(times[-window:])
    return len(last) == window and min(last) > 0 and max(last) / min(last) - 1.0 <= tol


def warm_up(
    call: Callable[[], float], min_calls: int, max_calls: int, tol: float, budget_ms: float | None = None
) -> list[float]:
    """Untimed calls until the times are stable: at least ``min_calls``, then until the last
    :data:`STABLE_WINDOW` are within ``tol`` of each other, at most ``max_calls`` or ``budget_ms`` of calls (a
    slow call is past any cache or allocator warm-up after a call or two). Returns the warm-up times."""
    times: list[float] = []
    while len(times) < max(min_calls, max_calls):
        if len(times) >= min_calls and (stable(times, tol) or (budget_ms is not None and sum(times) >= budget_ms)):
            break
        times.append(call())
    return times


def interleaved(calls: Sequence[Callable[[], float]], repeats: int) -> list[list[float]]:
    """``repeats`` rounds over every call, each round in a rotated order (no call always follows the same
    one), so a disturbance of the machine hits every contender alike. Returns the times per call."""
    samples: list[list[float]] = [[] for _ in calls]
    for r in range(repeats):
        for j in range(len(calls)):
            i = (j + r) % len(calls)
            samples[i].append(calls[i]())
    return samples


def time_callable(
    run: Callable[..., Any],
    device: torch.device,
    repeats: int,
    warmup: int = 1,
    setup: Callable[[], Any] | None = None,
    timer: Timer | None = None,
) -> Timing:
    """Time one callable alone: a first call, ``warmup`` untimed calls, then ``repeats`` timed ones (for the
    sgemm roof and quick one-off timings; the suite's rows go through :func:`benchmarks.runner.run_cases`)."""
    timer = timer or wall_timer(device)
    first = timer(run, setup)
    for _ in range(max(0, warmup)):
        timer(run, setup)
    return Timing([timer(run, setup) for _ in range(max(1, repeats))], first_call_ms=first)


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


def cuda_peak_mb(run: Callable[[], Any], device: torch.device) -> float:
    """Peak CUDA memory (MB) allocated by ``run()`` above what was allocated before it."""
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = run()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return peak / 2**20
