"""The suite as pytest-benchmark benchmarks (``pytest benchmarks/ --benchmark-only``); see conftest.py."""

from __future__ import annotations

import torch

from .harness import PASS_FLOP_FACTOR, pass_runner


def test_bench(benchmark, t3d_case, t3d_pass, t3d_contender, t3d_cache, t3d_config) -> None:
    contender = t3d_cache.get(t3d_case, t3d_contender)
    setup, run = pass_runner(contender, t3d_pass, t3d_cache.grad_out)
    device = t3d_config.torch_device

    def synced(*args):
        out = run(*args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    benchmark.group = f"{t3d_case.op} {t3d_case.label} {t3d_pass}"
    # one untimed call first, as t3d-bench's first call: compiles, and runs the backward pass's forward
    synced(setup()) if setup is not None else synced()
    if setup is None:
        benchmark.pedantic(synced, rounds=t3d_config.repeats, warmup_rounds=t3d_config.warmup)
    else:
        benchmark.pedantic(
            synced, setup=lambda: ((setup(),), {}), rounds=t3d_config.repeats, warmup_rounds=t3d_config.warmup
        )
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: ran once, nothing timed
        return
    median = stats.stats.median
    key = (t3d_case.op, t3d_case.label, t3d_pass)
    flops = t3d_case.flops * PASS_FLOP_FACTOR[t3d_pass]
    benchmark.extra_info.update(kind=contender.kind, gflops=flops / median / 1e9, threads=torch.get_num_threads())
    if contender.kind == "baseline":
        t3d_cache.baseline_s[key] = median
    elif key in t3d_cache.baseline_s:
        benchmark.extra_info["speedup"] = t3d_cache.baseline_s[key] / median
