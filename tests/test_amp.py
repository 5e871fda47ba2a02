"""Autocast inside the fused ops (docs/design.md, "Precision"): under ``torch.autocast`` the input and conv weights
compute in the autocast dtype while the BN parameters, statistics, accumulation and running statistics stay float32.

Tolerance (as everywhere): against the float64 reference, a fused op under autocast may err at most twice as much as
PyTorch's own reference computed under the same autocast does, plus two units of rounding of that dtype at the
result's magnitude. Output and gradient dtypes: the op's output is in the autocast dtype (as a convolution's), every
gradient in its parameter's dtype, the running statistics float32.
"""

from __future__ import annotations

import os

import pytest
import torch

import t3d_kernels as tk
from t3d_kernels import reference

BF16 = torch.finfo(torch.bfloat16).eps


def _ttl_case(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 6, 4, 5, 6, generator=g, dtype=dtype)
    weights = [torch.randn(c, 6, d, k, k, generator=g, dtype=dtype) / (6 * d * k * k) ** 0.5 for c, d, k in
               ((3, 1, 1), (2, 3, 3))]  # fmt: skip
    gamma = torch.rand(6, generator=g, dtype=dtype) + 0.5
    beta = torch.randn(6, generator=g, dtype=dtype) * 0.3
    mean = torch.randn(6, generator=g, dtype=dtype) * 0.1
    var = torch.rand(6, generator=g, dtype=dtype) + 0.5
    return x, gamma, beta, mean, var, weights


def _run_ttl(fn, case, training, autocast, gy):
    x, gamma, beta, mean, var, weights = case
    leaves = [t.detach().clone().requires_grad_() for t in (x, gamma, beta, *weights)]
    rm, rv = mean.clone(), var.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = fn(leaves[0], leaves[1], leaves[2], rm, rv, leaves[3:], training=training)
    grads = torch.autograd.grad(y, leaves, gy.to(y.dtype))
    return y, grads, rm, rv


def _check(name, got, torch_ac, ref64):
    err = (got.double() - ref64).abs().max().item()
    bound = 2 * (torch_ac.double() - ref64).abs().max().item() + 2 * BF16 * ref64.abs().max().item()
    assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e}"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", ["composite", "auto"])
def test_ttl_bf16_autocast_cpu(backend, training):
    case = _ttl_case()
    gy = torch.randn(2, 5, 2, 2, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y64, g64, rm64, rv64 = _run_ttl(reference.ttl, [t.double() if torch.is_tensor(t) else [w.double() for w in t]
                                                     for t in case], training, False, gy)  # fmt: skip
    y_t, g_t, rm_t, rv_t = _run_ttl(reference.ttl, case, training, True, gy)
    fused = lambda *a, **k: tk.ttl(*a, **k, backend=backend)  # noqa: E731
    y, grads, rm, rv = _run_ttl(fused, case, training, True, gy)
    assert y.dtype == torch.bfloat16
    assert [g.dtype for g in grads] == [torch.float32] * len(grads)
    assert rm.dtype == rv.dtype == torch.float32
    _check("y", y, y_t, y64)
    for i, (g, gt, gr) in enumerate(zip(grads, g_t, g64, strict=True)):
        _check(f"grad[{i}]", g, gt, gr)
    _check("running_mean", rm, rm_t, rm64)
    _check("running_var", rv, rv_t, rv64)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_dense_block_bf16_autocast_cpu(training):
    torch.manual_seed(0)
    block = tk.DenseBlock3d(2, 5, 3, 2, backend="reference").train(training)
    twin64 = tk.DenseBlock3d(2, 5, 3, 2, backend="reference").train(training).double()
    twin64.load_state_dict(block.state_dict())
    fused = tk.DenseBlock3d(2, 5, 3, 2).train(training)  # auto: the cpu backend declares no bf16 -> composite
    fused.load_state_dict(block.state_dict())
    x = torch.randn(2, 5, 3, 4, 5)
    gy = torch.randn(2, 11, 3, 4, 5, dtype=torch.float64)

    def run(m, dtype, autocast):
        xi = x.to(dtype).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = m(xi)
        params = [p for _, p in sorted(m.named_parameters())]
        grads = torch.autograd.grad(y, [xi, *params], gy.to(y.dtype))
        return y, grads

    y64, g64 = run(twin64, torch.float64, False)
    y_t, g_t = run(block, torch.float32, True)
    y, grads = run(fused, torch.float32, True)
    assert y.dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in grads)
    _check("y", y, y_t, y64)
    for i, (g, gt, gr) in enumerate(zip(grads, g_t, g64, strict=True)):
        _check(f"grad[{i}]", g, gt, gr)
    for (name, b), (_, b64), (_, bt) in zip(
        sorted(fused.named_buffers()), sorted(twin64.named_buffers()), sorted(block.named_buffers()), strict=True
    ):
        if "running" in name:
            assert b.dtype == torch.float32
            _check(name, b, bt, b64)


def test_autocast_declarations_and_fallback():
    """auto takes a backend that computes in the autocast dtype; an explicit one that does not (cpu) computes in
    float32 under autocast (its declared fallback), never crashes."""
    from t3d_kernels.backends import resolve

    cpu = torch.device("cpu")
    assert resolve("ttl", "auto", cpu, torch.float32, autocast=torch.bfloat16) == "composite"
    assert resolve("dense_block", "auto", cpu, torch.float32, autocast=torch.bfloat16) == "composite"
    if "cpu" in tk.backends("ttl"):
        m = tk.TemporalTransition(6, 4, (1, 3), backend="cpu").train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(torch.randn(2, 6, 4, 4, 4))
        assert y.dtype == torch.float32
    assert tk.autocast_support(["ttl", "dense_block"], "cpu", torch.bfloat16) == (True, [])
    assert tk.autocast_support(["ttl", "dense_block"], "cuda", torch.float16) == (True, [])


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU needs TRITON_INTERPRET=1")
def test_triton_fp16_interpreted():
    pytest.importorskip("triton")
    case = _ttl_case()
    x, gamma, beta, mean, var, weights = case
    y = tk.ttl(x.half(), gamma, beta, mean.clone(), var.clone(), [w.half() for w in weights], backend="triton")
    ref = reference.ttl(x.double(), gamma.double(), beta.double(), mean.double(), var.double(),
                        [w.double() for w in weights])  # fmt: skip
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.double(), ref, atol=4e-3, rtol=4e-3)
    # the dense block's Triton GEMMs take float16 operands (float32 BN parameters and accumulation)
    torch.manual_seed(0)
    block = tk.DenseBlock3d(2, 5, 3, 2, backend="reference").eval()
    xb = torch.randn(2, 5, 3, 4, 5)
    ref = block.double()(xb.double())
    layers = [(tuple(t.float() for t in (m.norm1.weight, m.norm1.bias, m.norm1.running_mean, m.norm1.running_var)),
               m.conv1.weight.half(),
               tuple(t.float() for t in (m.norm2.weight, m.norm2.bias, m.norm2.running_mean, m.norm2.running_var)),
               m.conv2.weight.half()) for m in block.layers()]  # fmt: skip
    y = tk.dense_block(xb.half(), layers, backend="triton")
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.double(), ref, atol=1e-2, rtol=1e-2)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU needs TRITON_INTERPRET=1")
def test_triton_fp16_training_gradients_interpreted():
    """Training step of the Triton TTL in float16 (float32 BN parameters and statistics): every gradient within a
    few float16 roundings of the float64 reference, relative to its largest entry; running statistics float32."""
    pytest.importorskip("triton")
    x, gamma, beta, _, _, weights = _ttl_case()

    def run(dtype, bn_dtype, fn, **kw):
        leaves = [t.to(dtype).detach().requires_grad_() for t in (x, *weights)]
        bn = [t.to(bn_dtype).detach().requires_grad_() for t in (gamma, beta)]
        rm, rv = torch.zeros(6, dtype=bn_dtype), torch.ones(6, dtype=bn_dtype)
        y = fn(leaves[0], bn[0], bn[1], rm, rv, leaves[1:], training=True, **kw)
        gy = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape)
        return y, torch.autograd.grad(y, leaves + bn, gy.to(y.dtype)), rm

    y64, g64, rm64 = run(torch.float64, torch.float64, reference.ttl)
    y, grads, rm = run(torch.float16, torch.float32, tk.ttl, backend="triton")
    eps16 = torch.finfo(torch.float16).eps
    assert y.dtype == torch.float16 and rm.dtype == torch.float32
    assert (y.double() - y64).abs().max() <= 8 * eps16 * y64.abs().max()
    assert [g.dtype for g in grads] == [torch.float16] * 3 + [torch.float32] * 2
    for g, r in zip(grads, g64, strict=True):
        assert (g.double() - r).abs().max() <= 8 * eps16 * r.abs().max()


# ------------------------------------------------------------------------------------------------------------
# fp16 training with loss scaling (CPU autocast runs fp16 and torch.amp.GradScaler("cpu") scales, as on CUDA)
# ------------------------------------------------------------------------------------------------------------

FP16_STEPS = 6


def _fp16_training(model, x, target, fused_type):
    """FP16_STEPS SGD steps on one batch under fp16 autocast with a GradScaler; checks every step's dtypes.

    Returns (losses, scales, steps taken). ``fused_type``: the module class whose outputs must be float16 (the fused
    op computed in the autocast dtype, not in a silent float32 fallback), or None to skip that check."""
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    scaler = torch.amp.GradScaler(x.device.type)
    dtypes = []
    hooks = [m.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype)) for m in model.modules()
             if fused_type is not None and isinstance(m, fused_type)]  # fmt: skip
    losses, scales, taken = [], [], 0
    for _ in range(FP16_STEPS):
        with torch.autocast(x.device.type, dtype=torch.float16):
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits, target)
        assert logits.dtype == torch.float16
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        taken += any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
        losses.append(loss.item())
        scales.append(scaler.get_scale())
    for h in hooks:
        h.remove()
    assert dtypes and set(dtypes) == {torch.float16} or fused_type is None, dtypes
    return losses, scales, taken


def _check_fp16_run(model, losses, scales, taken):
    assert all(torch.isfinite(torch.tensor(losses))), losses
    # the scaler halves its scale on each overflowing step and skips it (from its initial 2^16 the first steps may
    # overflow): most steps must go through, the scale stays a power of two in [1, 2^16]
    assert taken >= FP16_STEPS - 3, (taken, scales)
    assert all(1.0 <= s <= 2.0**16 and s == 2.0 ** round(torch.log2(torch.tensor(s)).item()) for s in scales), scales
    # one fixed batch, a few steps: the loss falls (it would not if the fp16 gradients underflowed or the scaler
    # skipped everything)
    assert losses[-1] < losses[0], losses
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.isfinite(p).all(), name
    for name, b in model.named_buffers():
        if "running" in name:
            assert b.dtype == torch.float32 and torch.isfinite(b).all(), name


@pytest.mark.parametrize("backend", ["auto", "composite", "cpu"])
def test_fp16_training_with_loss_scaling_t3d_tiny(backend):
    """t3d_tiny with fuse(model, backend) trained a few steps under CPU fp16 autocast with a GradScaler: finite,
    falling loss, a sane scale, fp32 parameters, gradients and running statistics. "auto" and "composite" compute
    the fused ops in fp16; "cpu" (kernels of float32/float64) computes them in float32, its declared fallback."""
    from t3d.models import t3d_tiny

    if backend != "auto" and backend not in tk.backends("dense_block"):
        pytest.skip(f"backend {backend!r} is not built here")
    torch.manual_seed(0)
    model = tk.fuse(t3d_tiny(num_classes=3), backend).train()
    assert tk.autocast_support(model, "cpu", torch.float16) == (True, [])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 32, 32, generator=g)
    target = torch.tensor([0, 2])
    fused = None if backend == "cpu" else tk.DenseBlock3d
    _check_fp16_run(model, *_fp16_training(model, x, target, fused))


@pytest.mark.triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU needs TRITON_INTERPRET=1")
def test_fp16_training_with_loss_scaling_triton_interpreted():
    """The Triton dense block and TTL (interpreted, tiny shapes) trained a few steps under fp16 autocast with a
    GradScaler: their ops compute in fp16 (outputs float16), the rest as for t3d_tiny above."""
    pytest.importorskip("triton")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        tk.DenseBlock3d(2, 4, growth_rate=3, bn_size=2, backend="triton"),
        tk.TemporalTransition(10, 6, depths=(1, 3), backend="triton"),
        torch.nn.AdaptiveAvgPool3d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(6, 3),
    ).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 4, 4, 4, generator=g)
    target = torch.tensor([1, 2])
    _check_fp16_run(model, *_fp16_training(model, x, target, (tk.DenseBlock3d, tk.TemporalTransition)))


def test_fp16_train_cli_on_cpu(tmp_path):
    """`t3d train --amp fp16` on a CPU runs with loss scaling: the GradScaler's state is in the checkpoint."""
    from _synthetic_fixtures import CLIP, make_dataset

    from t3d.checkpoint import load_checkpoint
    from t3d.cli import main as cli_main

    data = make_dataset(str(tmp_path / "syn"))
    out = tmp_path / "fp16"
    argv = ["train", data, "--out", str(out), "--model", "t3d_tiny", "--clip", CLIP, "--batch-size", "4",
            "--threads", "1", "--no-progress", "--amp", "fp16", "--max-steps", "2", "--workers", "0"]  # fmt: skip
    assert cli_main(argv) == 0
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["scaler"] and ckpt["scaler"]["scale"] > 0, ckpt.get("scaler")
    assert {v.dtype for v in ckpt["model"].values() if v.is_floating_point()} == {torch.float32}
