"""Synchronised BatchNorm inside the fused ops (docs/design.md, "Synchronised BatchNorm"): 2 gloo processes x batch
4 with a process group give what 1 process x batch 8 gives — the op's output (each process its slice), every
gradient (the input's slice; the parameters' summed over the processes, as DDP's all-reduce would), and the running
statistics — for each fused backend that runs on the CPU. Float32 rounding: the sums meet in another order."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import t3d_kernels as tk

WORLD = 2
BATCH = 8


def _modules(seed=0):
    torch.manual_seed(seed)
    ttl = tk.TemporalTransition(6, 4, (1, 3))
    block = tk.DenseBlock3d(2, 5, 3, 2)
    stem = tk.BatchNormReLUMaxPool3d(6)
    with torch.no_grad():  # non-trivial affine parameters: every term of the BN backward counts
        for m in (ttl, block, stem):
            for name, p in m.named_parameters():
                if "norm" in name or m is stem:
                    p.copy_(torch.rand(p.shape) + 0.5 if name.endswith("weight") else torch.randn(p.shape) * 0.2)
    return {
        "ttl": (ttl, (BATCH, 6, 4, 4, 5)),
        "dense_block": (block, (BATCH, 5, 3, 4, 4)),
        "bn_relu_maxpool": (stem, (BATCH, 6, 4, 6, 5)),
    }


def _step(module, x, gy):
    """Two training steps (the second sees updated running statistics); returns y, grads, buffers of the last."""
    for _ in range(2):
        module.zero_grad()
        xi = x.clone().requires_grad_()
        y = module(xi)
        y.backward(gy)
    grads = [xi.grad] + [p.grad.clone() for _, p in sorted(module.named_parameters())]
    buffers = [b.clone() for n, b in sorted(module.named_buffers()) if "running" in n]
    return y.detach(), grads, buffers


def _inputs(shape, out_shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(out_shape, generator=g)


def _out_shape(op, module, shape):
    with torch.no_grad():
        return module.eval()(torch.zeros(shape)).shape


def _worker(rank, init, backends, results):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        out = {}
        for op, backend in backends:
            module, shape = _modules()[op]
            oshape = _out_shape(op, module, shape)
            x, gy = _inputs(shape, oshape)
            tk.convert_sync_batchnorm(module.train())
            tk.fuse(module, backend)
            sl = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
            y, grads, buffers = _step(module, x[sl], gy[sl])
            for g in grads[1:]:  # parameter grads: summed over the processes (DDP averages the same sums)
                dist.all_reduce(g)
            out[(op, backend)] = (y, grads, buffers)
        results[rank] = out
    finally:
        dist.destroy_process_group()


CASES = [
    ("ttl", "composite"),
    ("ttl", "cpu"),
    ("ttl", "auto"),
    ("dense_block", "composite"),
    ("dense_block", "cpu"),
    ("dense_block", "auto"),
    ("bn_relu_maxpool", "composite"),
    ("bn_relu_maxpool", "cpu"),
]


def test_two_processes_equal_one_large_batch():
    cases = [c for c in CASES if c[1] in ("auto", *tk.backends(c[0]))]
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        results = manager.dict()
        mp.spawn(_worker, args=(f"file://{os.path.join(tmp, 'rdv')}", cases, results), nprocs=WORLD, join=True)
        results = dict(results)
    for op, backend in cases:
        module, shape = _modules()[op]
        oshape = _out_shape(op, module, shape)
        x, gy = _inputs(shape, oshape)
        y, grads, buffers = _step(tk.fuse(module.train(), "reference"), x, gy)
        per_rank = [results[r][(op, backend)] for r in range(WORLD)]
        tol = dict(atol=2e-5, rtol=2e-5)
        what = f"{op}/{backend}"
        torch.testing.assert_close(torch.cat([p[0] for p in per_rank]), y, **tol, msg=f"{what}: output")
        torch.testing.assert_close(torch.cat([p[1][0] for p in per_rank]), grads[0], **tol, msg=f"{what}: grad x")
        for i, g in enumerate(grads[1:], 1):
            torch.testing.assert_close(per_rank[0][1][i], g, **tol, msg=f"{what}: grad {i}")
        for i, b in enumerate(buffers):
            for p in per_rank:
                torch.testing.assert_close(p[2][i], b, **tol, msg=f"{what}: running stats {i}")


def test_group_refused_by_backends_that_cannot_sync():
    """Every fused CPU backend built synchronises, so auto keeps the compiled kernels under a process group; the
    reference backend (plain BN modules, synchronised by the caller) refuses one."""
    from t3d_kernels.backends import BackendError, resolve

    cpu = torch.device("cpu")
    for op in ("dense_block", "ttl"):
        expected = "cpu" if "cpu" in tk.backends(op) else "composite"
        assert resolve(op, "auto", cpu, torch.float32, group=True) == expected
    with pytest.raises(BackendError, match="no process-group"):
        resolve("dense_block", "reference", cpu, torch.float32, group=True)
    with pytest.raises(BackendError, match="no process-group"):
        resolve("ttl", "reference", cpu, torch.float32, group=True)


def test_convert_sync_batchnorm_keeps_fused_bn_and_converts_the_rest():
    model = torch.nn.Sequential(torch.nn.BatchNorm3d(6), tk.TemporalTransition(6, 4, (1, 3)))
    keys = set(model.state_dict())
    tk.convert_sync_batchnorm(model)
    assert isinstance(model[0], torch.nn.SyncBatchNorm)
    assert type(model[1].norm) is torch.nn.BatchNorm3d and model[1].sync_bn
    assert set(model.state_dict()) == keys
