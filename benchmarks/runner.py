"""Runs the cases: one row per (case, pass, contender), measured so that a busy machine cannot make it lie.

For every case the harness first checks each contender's forward output against the baseline's (``max_rel_err``);
a contender beyond the case's tolerance gets error rows in every pass (its time would be the time of a wrong
answer). Then, per pass, every contender:

1. makes one first call (compiles, fills caches; recorded as ``first_call_ms``),
2. warms up until its times are stable (:func:`benchmarks.timing.warm_up`),
3. is timed in rounds *interleaved* with the other contenders of the pass, so a disturbance of the machine hits
   them all alike (:func:`benchmarks.timing.interleaved`).

A row's speed-up is the median over the rounds of baseline ms / contender ms *of the same round* (the two calls
ran back to back, so a slow drift of the machine cancels in each ratio), with a distribution-free 95% confidence
interval of that median (``speedup_lo``, ``speedup_hi``).

The whole pass is measured again (interleaved, all contenders), at most ``cfg.remeasure`` times, when

- a row's IQR is more than ``cfg.noise`` of its median,
- a speed-up's confidence interval reaches more than ``cfg.ratio_noise`` of it on either side,
- (CPU) other processes left fewer free cores than the run's threads while the pass was timed
  (:class:`benchmarks.timing.CpuContention`: a competing process that slows every call alike leaves the IQR
  small), or
- (CPU) the machine's speed before or after the pass (:class:`benchmarks.timing.SpeedCanary`, a small sgemm) was
  more than ``cfg.canary_drop`` below the best seen in the run: a neighbour ``/proc/stat`` cannot see.

A row that stays so is marked ``noisy``, and no speed-up is published from a noisy row or against a noisy baseline.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .api import COLUMNS, PASS_FLOP_FACTOR, BenchConfig, Case, Contender, Skip
from .roof import conv3d_gflops, sgemm_gflops
from .timing import (
    CpuContention,
    SpeedCanary,
    Timer,
    Timing,
    cuda_peak_mb,
    interleaved,
    make_timer,
    median_ci,
    paired_ratios,
    saved_tensor_bytes,
    top_kernels,
    warm_up,
)


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _row(case: Case, pass_: str, contender: Contender | None, cfg: BenchConfig, status: str) -> dict[str, Any]:
    row = {c: None for c in COLUMNS}
    row.update(
        op=case.op,
        shape=case.label,
        **{"pass": pass_},
        contender=contender.name if contender else None,
        kind=contender.kind if contender else None,
        status=status,
        flops=(case.flops if contender is None or contender.flops is None else contender.flops)
        * PASS_FLOP_FACTOR[pass_],
        batch=case.batch,
        device=cfg.device,
        dtype=cfg.dtype,
        precision=cfg.precision_label,
        timer=cfg.timer,
        threads=torch.get_num_threads(),
    )
    return row


def pass_runner(contender: Contender, pass_: str, grad_out: dict[str, torch.Tensor], cfg: BenchConfig | None = None):
    """(setup, run) callables of one pass: time ``run(setup())`` (``run()`` when setup is None); see
    :mod:`benchmarks.harness` for what each pass times. ``grad_out`` caches the output gradient shared by a case's
    contenders. The contender's forward runs under ``cfg.autocast()``; the backward outside it, as in training."""
    fn, tensors = contender.fn, list(contender.grad_tensors)
    cfg = cfg or BenchConfig()

    def forward(training: bool) -> torch.Tensor:
        with cfg.autocast():
            return _first(fn(training))

    def backward(y: torch.Tensor, retain_graph: bool = False) -> Any:
        dy = grad_out.get("dy")
        if dy is None or dy.shape != y.shape or dy.dtype != y.dtype:
            # one fixed output gradient per case, shared by all contenders
            gen = torch.Generator(device="cpu").manual_seed(1)
            dy = grad_out["dy"] = torch.randn(y.shape, generator=gen).to(y.device, y.dtype)
        return torch.autograd.grad(y, tensors, dy, retain_graph=retain_graph, allow_unused=True)

    if pass_ == "forward":

        def run_forward() -> Any:
            with torch.no_grad():
                return forward(False)

        return None, run_forward
    if pass_ == "backward" and contender.kind == "compile":
        # a compiled backward donates its buffers and refuses retain_graph: a fresh forward before every call,
        # outside the timed region
        return (lambda: forward(True)), backward
    if pass_ == "backward":
        # one forward (in the untimed first call), then the backward repeated over the retained graph: the
        # same work as a fresh graph's backward, without paying a forward per repeat
        graph: dict[str, torch.Tensor] = {}

        def backward_retained() -> Any:
            if "y" not in graph:
                # the other contenders' training forwards, interleaved with this one's backward, update the
                # running statistics they share in place: the graph keeps its own copy of such saved buffers
                with torch.autograd.graph.saved_tensors_hooks(_own_buffers, lambda t: t):
                    graph["y"] = forward(True)
            return backward(graph["y"], retain_graph=True)

        return None, backward_retained
    return None, (lambda: backward(forward(True)))


def _own_buffers(t: torch.Tensor) -> torch.Tensor:
    """A saved tensor as the graph keeps it: leaves without grad (running statistics, other buffers) copied."""
    return t.clone() if t.is_leaf and not t.requires_grad else t


def _describe(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 200 characters)."""
    message = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {message}"


def _status(exc: BaseException) -> str:
    return f"skipped: {exc}" if isinstance(exc, Skip) else f"error: {_describe(exc)}"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (inf when the shapes differ)."""
    if out.shape != ref.shape:
        return float("inf")
    diff = (out.double() - ref.double()).abs().max().item()
    return diff / max(ref.double().abs().max().item(), 1e-30)


@dataclass
class _Entry:
    """One contender in one pass while it is measured."""

    contender: Contender
    row: dict[str, Any]
    setup: Callable[[], Any] | None
    run: Callable[..., Any]
    first_ms: float = float("nan")
    warm: list[float] = field(default_factory=list)
    timing: Timing | None = None
    ratios: list[float] = field(default_factory=list)  # baseline ms / this ms, per round (not for the baseline)

    @property
    def speedup(self) -> tuple[float, float, float] | None:
        """(median, lo, hi) of the round ratios: the speed-up and its 95% confidence interval (None without
        ratios)."""
        if not self.ratios:
            return None
        return (statistics.median(self.ratios), *median_ci(self.ratios))

    @property
    def ratio_spread(self) -> float:
        """How far the speed-up's 95% confidence interval reaches from its median (a fraction of it; 0 without
        ratios)."""
        if self.speedup is None:
            return 0.0
        mid, lo, hi = self.speedup
        return max(mid - lo, hi - mid) / mid

    def fail(self, exc: BaseException) -> None:
        self.row["status"] = _status(exc)


def _check_outputs(
    contenders: Sequence[Contender], cfg: BenchConfig, timer: Timer, tolerance: float
) -> tuple[dict[str, float], dict[str, float], dict[str, str]]:
    """Each contender's forward once (timed: the forward pass's first call): (first-call ms, rel err vs the
    baseline, status of each contender that failed or is beyond ``tolerance``)."""
    first_ms: dict[str, float] = {}
    errors: dict[str, float] = {}
    dead: dict[str, str] = {}
    reference: torch.Tensor | None = None
    for contender in contenders:
        _, run = pass_runner(contender, "forward", {}, cfg)
        box: list[torch.Tensor] = []
        try:
            first_ms[contender.name] = timer(lambda run=run, box=box: box.append(_first(run()).detach()), None)
        except Exception as exc:  # noqa: BLE001 - one broken contender must not stop the suite
            dead[contender.name] = _status(exc)
            continue
        if contender.kind == "baseline":
            reference = box[0]
        elif reference is not None:
            err = errors[contender.name] = rel_err(box[0], reference)
            if not err <= tolerance:  # also NaN
                dead[contender.name] = (
                    f"error: rel err {err:.1e} vs the baseline's output exceeds the tolerance {tolerance:.0e}"
                )
    return first_ms, errors, dead


def _free_cores(probe: CpuContention | None) -> float | None:
    return None if probe is None else (os.cpu_count() or 1) - probe.stop()


def _contended(free: float | None) -> bool:
    """Fewer free cores than threads (10% slack) while the pass was timed."""
    return free is not None and free < 0.9 * torch.get_num_threads()


def _slowed(speed: float | None, canary: SpeedCanary | None, cfg: BenchConfig) -> bool:
    """The machine ran more than ``cfg.canary_drop`` below its best speed of the run."""
    return speed is not None and canary is not None and speed < (1.0 - cfg.canary_drop) * canary.best


def _measure_pass(
    entries: list[_Entry],
    cfg: BenchConfig,
    timer: Timer,
    first_ms: dict[str, float],
    probe: CpuContention | None,
    canary: SpeedCanary | None = None,
) -> None:
    """First call, warm-up until stable, interleaved timed rounds, re-measured while some row or speed-up is noisy
    or the machine was contended or slowed."""
    live = []
    for e in entries:
        try:
            e.first_ms = first_ms.get(e.contender.name, math.nan)
            if math.isnan(e.first_ms):
                e.first_ms = timer(e.run, e.setup)
            e.warm = warm_up(
                lambda e=e: timer(e.run, e.setup),
                cfg.warmup,
                cfg.max_warmup,
                cfg.stable_tol,
                cfg.time_budget_s * 1e3 if cfg.time_budget_s else None,
            )
            live.append(e)
        except Exception as exc:  # noqa: BLE001
            e.fail(exc)
    if not live:
        return
    repeats = cfg.repeats
    if cfg.time_budget_s:
        # the pass takes about time_budget_s per contender: a slow call gets fewer rounds (never below 3), fast
        # calls more, up to max_repeats (more paired ratios: a narrower confidence interval of the speed-up)
        round_ms = sum((e.warm[-1] if e.warm else e.first_ms) for e in live)
        if round_ms > 0:
            fit = int(cfg.time_budget_s * 1e3 * len(live) / round_ms)
            most = max(cfg.repeats, cfg.max_repeats or cfg.repeats)
            repeats = max(min(cfg.repeats, 3), min(most, fit))
    failed: dict[int, BaseException] = {}
    faults: list[list[int]] = []

    def timed(i: int) -> float:
        if i in failed:
            return math.nan
        try:
            ms = timer(live[i].run, live[i].setup)
        except Exception as exc:  # noqa: BLE001
            failed[i] = exc
            return math.nan
        calls_faults = getattr(timer, "last_faults", None)  # the wall timer on CPU counts them
        if calls_faults is not None:
            faults[i].append(calls_faults)
        return ms

    base = next((i for i, e in enumerate(live) if e.contender.kind == "baseline"), None)
    for attempt in range(1 + max(0, cfg.remeasure)):
        before = canary() if canary is not None else None
        if probe is not None:
            probe.start()
        faults[:] = [[] for _ in live]
        samples = interleaved([lambda i=i: timed(i) for i in range(len(live))], repeats)
        free = _free_cores(probe)
        speed = None if canary is None else min(before, canary())
        for i, e in enumerate(live):
            e.timing = Timing(samples[i], first_call_ms=e.first_ms) if i not in failed else None
            e.ratios = [] if base is None or i == base else paired_ratios(samples[base], samples[i])
            e.row.update(
                measurements=attempt + 1,
                free_cores=free,
                canary_gflops=speed,
                faults_per_call=statistics.median(faults[i]) if faults[i] else None,
            )
        noisy = any(
            e.timing is not None and (e.timing.iqr_fraction > cfg.noise or e.ratio_spread > cfg.ratio_noise)
            for e in live
        )
        if not noisy and not _contended(free) and not _slowed(speed, canary, cfg):
            break
    for i, e in enumerate(live):
        if i in failed:
            e.fail(failed[i])


def _roof(case: Case, roofs: dict[str, float], device: torch.device, dtype: torch.dtype) -> float:
    """The case's roof in GFLOP/s: its sgemm, or the faster of that and its vendor conv (``roof_conv``); each
    measured once per run and kept in ``roofs`` ("MxKxN", "conv:CinxCoutxk@TxHxW")."""
    m, k, n = case.roof_gemm
    keys = [f"{m}x{k}x{n}"]
    if keys[0] not in roofs:
        roofs[keys[0]] = sgemm_gflops(m, k, n, device, dtype)
    if case.roof_conv is not None:
        c_in, c_out, kc, t, h, w = case.roof_conv
        keys.append(f"conv:{c_in}x{c_out}x{kc}@{t}x{h}x{w}")
        if keys[1] not in roofs:
            roofs[keys[1]] = conv3d_gflops(c_in, c_out, kc, (t, h, w), device, dtype)
    return max(roofs[key] for key in keys)


def _fill(e: _Entry, cfg: BenchConfig, roof: float, canary: SpeedCanary | None = None) -> None:
    row, timing = e.row, e.timing
    if timing is None or row["status"] != "ok":
        return
    row.update(
        ms=timing.median,
        ms_q1=timing.q1,
        ms_q3=timing.q3,
        ms_iqr=timing.q3 - timing.q1,
        repeats=len(timing.samples_ms),
        warmup_calls=len(e.warm),
        first_call_ms=timing.first_call_ms,
        gflops=row["flops"] / (timing.median * 1e-3) / 1e9,
        roof_gflops=roof,
        clips_per_s=row["batch"] * 1e3 / timing.median,
    )
    row["pct_roof"] = 100.0 * row["gflops"] / roof
    if timing.iqr_fraction > cfg.noise:
        row["status"] = (
            f"noisy: IQR {100 * timing.iqr_fraction:.0f}% of the median (limit {100 * cfg.noise:.0f}%) "
            f"in each of {row['measurements']} measurements"
        )
    elif _contended(row["free_cores"]):
        row["status"] = (
            f"noisy: other processes left {row['free_cores']:.1f} of {os.cpu_count()} cores free for "
            f"{row['threads']} thread(s) in each of {row['measurements']} measurements"
        )
    elif _slowed(row["canary_gflops"], canary, cfg):
        row["status"] = (
            f"noisy: the machine ran at {100 * row['canary_gflops'] / canary.best:.0f}% of its best speed in this run "
            f"(sgemm canary {row['canary_gflops']:.0f} vs {canary.best:.0f} GFLOP/s; limit "
            f"{100 * (1 - cfg.canary_drop):.0f}%) in each of {row['measurements']} measurements"
        )
    elif e.ratio_spread > cfg.ratio_noise:
        _, lo, hi = e.speedup
        row["status"] = (
            f"noisy: the speed-up's 95% confidence interval [{lo:.2f}, {hi:.2f}] reaches "
            f"{100 * e.ratio_spread:.0f}% from its median (limit {100 * cfg.ratio_noise:.0f}%) in each of "
            f"{row['measurements']} measurements"
        )


def run_cases(
    cases: Sequence[Case],
    cfg: BenchConfig,
    progress: Callable[[str], None] | None = None,
    roofs: dict[str, float] | None = None,
    timer: Timer | None = None,
    probe: CpuContention | None = None,
    canary: SpeedCanary | None = None,
) -> list[dict[str, Any]]:
    """Run every case, pass and contender; return one row (dict with :data:`COLUMNS`) each.

    A contender that raises gets a row with ``status="error: ..."`` instead of stopping the suite; a case
    whose build raises :class:`Skip` gets one ``status="skipped: ..."`` row per pass. ``progress(msg)`` is called
    after every pass. ``roofs`` (optional) collects the sgemm GFLOP/s per "MxKxN". ``timer`` replaces the timer
    of ``cfg.timer``, ``probe`` the CPU-contention probe (default on CPU: :class:`CpuContention` where
    /proc/stat exists) and ``canary`` the machine-speed canary (default on CPU: a :class:`SpeedCanary`, warmed up
    here; pass one to share it, and its best speed, over several calls); with an injected timer neither unless given:
    tests inject fakes.
    """
    device, dtype = cfg.torch_device, cfg.torch_dtype
    if probe is None and timer is None and device.type == "cpu" and CpuContention.available():
        probe = CpuContention()
    if canary is None and timer is None and device.type == "cpu":
        canary = SpeedCanary(device)
        canary.warm_up()
    timer = timer or make_timer(cfg.timer, device)
    roofs = {} if roofs is None else roofs
    rows: list[dict[str, Any]] = []
    for case in cases:
        torch.manual_seed(cfg.seed)
        if "torch._dynamo" in sys.modules:
            # every case compiles its own functions; dynamo's caches (and its recompile limit, counted per code
            # object, which the closures of all cases share) must not carry over from the previous case
            torch._dynamo.reset()
        try:
            # the baseline first: the others' outputs are checked against its output
            contenders = sorted(case.build(), key=lambda c: c.kind != "baseline")
            if not case.compile or (cfg.compile_batches is not None and case.batch not in cfg.compile_batches):
                contenders = [c for c in contenders if c.kind != "compile"]
        except Exception as exc:  # noqa: BLE001 - a case that cannot be built must not stop the suite
            rows.extend(_row(case, pass_, None, cfg, _status(exc)) for pass_ in cfg.passes)
            if progress:
                progress(f"{case.op} {case.label}: {_status(exc)}")
            continue
        roof = _roof(case, roofs, device, dtype)
        tolerance = case.tolerance if case.tolerance is not None else cfg.tolerance
        first_fwd, errors, dead = _check_outputs(contenders, cfg, timer, tolerance) if cfg.check else ({}, {}, {})
        grad_out: dict[str, torch.Tensor] = {}
        for pass_ in cfg.passes:
            entries: list[_Entry] = []
            pass_rows = []
            for contender in contenders:
                if contender.passes is not None and pass_ not in contender.passes:
                    continue
                row = _row(case, pass_, contender, cfg, dead.get(contender.name, "ok"))
                row.update(max_rel_err=errors.get(contender.name), tolerance=tolerance if cfg.check else None)
                pass_rows.append(row)
                if contender.name not in dead:
                    setup, run = pass_runner(contender, pass_, grad_out, cfg)
                    entries.append(_Entry(contender, row, setup, run))
            _measure_pass(entries, cfg, timer, first_fwd if pass_ == "forward" else {}, probe, canary)
            for e in entries:
                _fill(e, cfg, roof, canary)
                _probe_memory(e, pass_, cfg)
            base = next((r for r in pass_rows if r["kind"] == "baseline"), None)
            for e in entries:
                r = e.row
                # a ratio only between rows measured cleanly: no error, not noisy, within the tolerance
                if base is None or base["status"] != "ok" or r["status"] != "ok":
                    continue
                if r is base:
                    r["speedup"] = 1.0
                elif e.speedup is not None:
                    r["speedup"], r["speedup_lo"], r["speedup_hi"] = e.speedup
            rows.extend(pass_rows)
            if progress:
                done = ", ".join(f"{r['contender']} {_short(r)}" for r in pass_rows)
                progress(f"{case.op} {case.label} {pass_}: {done}")
        del contenders, grad_out
    return rows


def _short(row: dict[str, Any]) -> str:
    return f"{row['ms']:.2f} ms" if row["ms"] is not None else row["status"].split(":", 1)[0]


def _probe_memory(e: _Entry, pass_: str, cfg: BenchConfig) -> None:
    """Saved activations (training passes) and, on CUDA, the pass's peak memory (and with ``cfg.profile`` the fused
    contenders' top kernels); a failure here only leaves the column empty."""
    if e.row["ms"] is None:
        return
    try:
        if pass_ != "forward":
            with cfg.autocast():
                saved = saved_tensor_bytes(lambda: e.contender.fn(True), exclude=e.contender.grad_tensors)
            e.row["saved_mb"] = saved / 2**20
        if cfg.torch_device.type == "cuda":
            run = (lambda: e.run(e.setup())) if e.setup is not None else e.run
            e.row["peak_mb"] = cuda_peak_mb(run, cfg.torch_device)
            if cfg.profile and e.contender.kind == "fused":
                e.row["kernels"] = top_kernels(run, cfg.torch_device)
    except Exception:  # noqa: BLE001 - e.g. out of memory in the probe after a successful timing
        pass


def check_fail_if_slower(rows: Iterable[dict[str, Any]], ratio: float) -> list[dict[str, Any]]:
    """The fused rows whose speed-up vs their baseline is below ``ratio`` (rows without a speed-up, e.g.
    skipped, failed or noisy, are not counted: they are reported separately)."""
    return [r for r in rows if r.get("kind") == "fused" and r.get("speedup") is not None and r["speedup"] < ratio]
