"""GPU timing of the fused TTL: Triton and CUDA backends vs cuDNN (the eager reference), torch.compile of it and
the pool-first algebra in plain PyTorch ops; all in one run, same inputs.

    python benchmarks/bench_ttl_gpu.py [--dtype float32|float16|bfloat16] [--paper] [--no-compile] [--json PATH]

Shapes: the T3D-121 TTLs at the 32x112x112 clip (batch 1 and 4); ``--paper`` adds the 32x224x224 clip.
Modes: ``fwd`` (eval, no grad), ``bwd`` (training, backward alone through a retained graph), ``train``
(training forward + backward). Timing: CUDA events, warm-up, median and IQR of repeats; once as called from
Python (at these sizes mostly launch and Python overhead on a GPU) and once as the sum of the call's kernel times
from the profiler (GPU time alone, what a CUDA-graph-captured training step would pay). GFLOP/s counts the
pool-first FLOPs (what the fused op computes; the eager reference performs 8x more), backward 2x forward.
fp32 runs use whatever ``torch.backends.cudnn.allow_tf32`` says (PyTorch's default: TF32 convs); the fused
kernels follow the same flag, so the comparison is like for like.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch._functorch.config

from t3d_kernels import backends, reference
from t3d_kernels.ops.ttl import ttl as fused_ttl

# name, input shape at the 32x112x112 clip (batch 1), depths, output channels
TTL_SHAPES = [
    ("TTL1", (256, 16, 28, 28), (1, 3, 6), 128),
    ("TTL2", (512, 8, 14, 14), (1, 3, 4), 256),
    ("TTL3", (1024, 4, 7, 7), (1, 3, 4), 512),
]


def split_channels(total: int, branches: int) -> list[int]:
    base, extra = divmod(total, branches)
    return [base + (1 if i < extra else 0) for i in range(branches)]


def make_inputs(c_in, t, h, w, batch, depths, c_out, dtype, device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, c_in, t, h, w, generator=gen).to(device, dtype)
    bn = [torch.rand(c_in, generator=gen) + 0.5, 0.1 * torch.randn(c_in, generator=gen)]
    bn = [v.to(device, dtype).requires_grad_() for v in bn]
    stats = [torch.zeros(c_in, device=device, dtype=dtype), torch.ones(c_in, device=device, dtype=dtype)]
    ws = []
    for c_i, d in zip(split_channels(c_out, len(depths)), depths, strict=False):
        k = 1 if d == 1 else 3
        ws.append((torch.randn(c_i, c_in, d, k, k, generator=gen) / (c_in * d * k * k) ** 0.5).to(device, dtype))
    return x, bn, stats, [w.requires_grad_() for w in ws]


def pool_first_flops(c_in, t, h, w, batch, weights) -> float:
    positions = batch * (t // 2) * (h // 2) * (w // 2)
    return sum(2.0 * positions * wt.shape[0] * c_in * wt.shape[2] * wt.shape[3] * wt.shape[4] for wt in weights)


def time_cuda(fn, warmup: int = 5, repeats: int = 30) -> tuple[float, float]:
    """Median and IQR in ms of ``fn()`` by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    q = statistics.quantiles(times, n=4)
    return statistics.median(times), q[2] - q[0]


def gpu_time(fn, iters: int = 5) -> float:
    """Kernel time in ms per call of ``fn``, summed over its CUDA kernels by the profiler: GPU time without the
    Python/launch gaps between kernels (what a CUDA-graph-captured or compiled step would pay)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    total_us = sum(getattr(e, "self_device_time_total", 0.0) for e in prof.key_averages())
    return total_us / 1000.0 / iters


def contenders(use_compile: bool) -> dict:
    def eager(x, bn, stats, ws, training):
        return reference.ttl(x, bn[0], bn[1], stats[0], stats[1], ws, training=training)

    def pool_first(x, bn, stats, ws, training):
        return reference.ttl_pool_first(x, bn[0], bn[1], stats[0], stats[1], ws, training=training)

    table = {"cudnn (eager)": eager, "pool-first (torch ops)": pool_first}
    if use_compile:
        # backward through a retained graph is timed, which donated buffers forbid
        torch._functorch.config.donated_buffer = False
        torch._dynamo.config.recompile_limit = 256
        table["torch.compile"] = torch.compile(eager)
    for name in ("triton", "cuda"):
        if name in backends("ttl"):

            def fused(x, bn, stats, ws, training, _name=name):
                return fused_ttl(x, bn[0], bn[1], stats[0], stats[1], ws, training=training, backend=_name)

            table[name] = fused
    return table


def time_contender(fn, x, bn, stats, ws, repeats: int, gpu: bool) -> dict:
    """fwd / bwd / train timings (ms) of one contender on one set of inputs."""
    row = {}
    inputs = [x, *bn, *ws]

    def fwd_nograd():
        with torch.no_grad():
            fn(x, bn, stats, ws, False)

    row["fwd_ms"], row["fwd_iqr"] = time_cuda(fwd_nograd, repeats=repeats)
    out = fn(x, bn, stats, ws, True)
    gy = torch.randn_like(out)

    def backward_only():
        torch.autograd.grad(out, inputs, gy, retain_graph=True)

    row["bwd_ms"], row["bwd_iqr"] = time_cuda(backward_only, repeats=repeats)

    def train_step():
        torch.autograd.grad(fn(x, bn, stats, ws, True), inputs, gy)

    torch.cuda.reset_peak_memory_stats()
    row["train_ms"], row["train_iqr"] = time_cuda(train_step, repeats=repeats)
    row["train_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if gpu:
        row["gpu_fwd_ms"] = gpu_time(fwd_nograd)
        row["gpu_train_ms"] = gpu_time(train_step)
    return row


def bench_shape(label, shape, depths, c_out, batch, dtype, table, repeats, gpu):
    c_in, t, h, w = shape
    x, bn, stats, ws = make_inputs(c_in, t, h, w, batch, depths, c_out, dtype, "cuda")
    x.requires_grad_()
    flops = pool_first_flops(c_in, t, h, w, batch, ws)
    rows = []
    for name, fn in table.items():
        row = {"shape": label, "batch": batch, "contender": name, "gflop": flops / 1e9}
        try:
            row.update(time_contender(fn, x, bn, stats, ws, repeats, gpu))
        except Exception as exc:  # a contender that fails is reported, not fatal to the others
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        print(f"  {label} N={batch} {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.endswith("_ms")))
        print(f"    {row['error']}" if "error" in row else "", end="")
        rows.append(row)
    return rows


def print_gpu_rows(rows):
    base = {(r["shape"], r["batch"]): r for r in rows if r["contender"] == "cudnn (eager)"}
    print("\nGPU kernel time by the profiler (no Python or launch overhead):")
    print(
        f"{'shape':6s} {'N':>2s} {'contender':24s} {'fwd ms':>8s} {'x cudnn':>7s} {'TFLOP/s':>7s} {'train ms':>8s} "
        f"{'x cudnn':>7s} {'TFLOP/s':>7s}"
    )
    for r in rows:
        if "gpu_fwd_ms" not in r:
            continue
        b = base.get((r["shape"], r["batch"]), {})
        rf = b.get("gpu_fwd_ms", float("nan")) / r["gpu_fwd_ms"]
        rt = b.get("gpu_train_ms", float("nan")) / r["gpu_train_ms"]
        print(
            f"{r['shape']:6s} {r['batch']:2d} {r['contender']:24s} {r['gpu_fwd_ms']:8.3f} {rf:7.2f} "
            f"{r['gflop'] / r['gpu_fwd_ms']:7.1f} {r['gpu_train_ms']:8.3f} {rt:7.2f} "
            f"{3 * r['gflop'] / r['gpu_train_ms']:7.1f}"
        )


def profile_fused(table, dtype):
    """Per-kernel GPU time of the fused contenders on TTL1 at batch 1 and 4 (train step)."""
    from torch.profiler import ProfilerActivity, profile

    for name in [n for n in ("triton", "cuda") if n in table]:
        for batch in (1, 4):
            label, shape, depths, c_out = TTL_SHAPES[0]
            x, bn, stats, ws = make_inputs(*shape, batch, depths, c_out, dtype, "cuda")
            inputs = [x.requires_grad_(), *bn, *ws]
            fn = table[name]
            y = fn(x, bn, stats, ws, True)
            gy = torch.randn_like(y)
            for _ in range(3):
                torch.autograd.grad(fn(x, bn, stats, ws, True), inputs, gy)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    torch.autograd.grad(fn(x, bn, stats, ws, True), inputs, gy)
                torch.cuda.synchronize()
            print(f"\n== {name} {label} batch {batch}, train step x5")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


def print_rows(rows):
    base = {(r["shape"], r["batch"]): r for r in rows if r["contender"] == "cudnn (eager)"}
    comp = {(r["shape"], r["batch"]): r for r in rows if r["contender"] == "torch.compile"}
    print(
        f"{'shape':6s} {'N':>2s} {'contender':24s} {'fwd ms':>8s} {'x cudnn':>7s} {'x comp':>6s} {'TFLOP/s':>7s} "
        f"{'bwd ms':>8s} {'x cudnn':>7s} {'train ms':>8s} {'x cudnn':>7s} {'x comp':>6s} {'peak MiB':>8s}"
    )
    for r in rows:
        key = (r["shape"], r["batch"])
        if "error" in r:
            print(f"{r['shape']:6s} {r['batch']:2d} {r['contender']:24s} ERROR {r['error']}")
            continue
        b, c = base.get(key, r), comp.get(key)
        ratio = lambda m, ref, r=r: ref[m] / r[m] if ref and m in ref else float("nan")  # noqa: E731
        print(
            f"{r['shape']:6s} {r['batch']:2d} {r['contender']:24s} {r['fwd_ms']:8.3f} {ratio('fwd_ms', b):7.2f} "
            f"{ratio('fwd_ms', c):6.2f} {r['gflop'] / r['fwd_ms']:7.1f} {r['bwd_ms']:8.3f} {ratio('bwd_ms', b):7.2f} "
            f"{r['train_ms']:8.3f} {ratio('train_ms', b):7.2f} {ratio('train_ms', c):6.2f} {r['train_peak_mib']:8.0f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--paper", action="store_true", help="add the 32x224x224 clip shapes")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (its compile time is long)")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--only", default="", help="comma-separated shape labels to run (e.g. TTL1,TTL1@224)")
    parser.add_argument("--json", default="benchmarks/results/ttl_gpu.json")
    parser.add_argument("--no-gpu-time", action="store_true", help="skip the profiler (GPU kernel time) measurements")
    parser.add_argument("--profile", action="store_true", help="print per-kernel GPU times of the fused backends")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to time")
        return 0
    dtype = getattr(torch, args.dtype)
    table = contenders(not args.no_compile)
    shapes = [
        (label, shape, depths, c_out, batch)
        for label, shape, depths, c_out in TTL_SHAPES
        for batch in map(int, args.batches.split(","))
    ]
    if args.paper:
        shapes += [
            (label + "@224", (c, t, 2 * h, 2 * w), depths, c_out, 1)
            for label, (c, t, h, w), depths, c_out in TTL_SHAPES
        ]
    if args.only:
        keep = set(args.only.split(","))
        shapes = [s for s in shapes if s[0] in keep]
    print(
        f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, dtype {args.dtype}, "
        f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, contenders {list(table)}"
    )
    rows = []
    for label, shape, depths, c_out, batch in shapes:
        rows += bench_shape(label, shape, depths, c_out, batch, dtype, table, args.repeats, not args.no_gpu_time)
    print_rows(rows)
    print_gpu_rows(rows)
    if args.profile:
        profile_fused(table, dtype)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "dtype": args.dtype, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
