"""The TTL: reference vs an independent computation, and every fused backend vs the reference.

Tolerances follow STYLE.md: a backend's float32 error against the float64 reference may be at most ~2x the error of
PyTorch's own float32 reference against it (plus a couple of ulp of the result's magnitude, so a lucky-zero error
of the reference does not make the bound vanish).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import t3d_kernels as tk
from t3d_kernels import _ext, reference
from t3d_kernels.backends import BackendError

FUSED = [b for b in ("composite", "cpu") if b in tk.backends()]
EPS32 = torch.finfo(torch.float32).eps


def ttl_loop_reference(x, gamma, beta, mean, var, weights, eps, pool):
    """Independent float64 computation: explicit normalisation, per-branch F.pad + conv, explicit mean pooling."""
    x = x.double()
    z = (x - mean.double().view(1, -1, 1, 1, 1)) / torch.sqrt(var.double().view(1, -1, 1, 1, 1) + eps)
    z = torch.clamp(z * gamma.double().view(1, -1, 1, 1, 1) + beta.double().view(1, -1, 1, 1, 1), min=0)
    outs = []
    for w in weights:
        d, kh, kw = w.shape[2:]
        front = (d - 1) // 2
        zp = F.pad(z, (kw // 2, kw // 2, kh // 2, kh // 2, front, d - 1 - front))
        outs.append(F.conv3d(zp, w.double()))
    y = torch.cat(outs, 1)
    if not pool:
        return y
    n, c, t, h, w_ = y.shape
    y = y[:, :, : t // 2 * 2, : h // 2 * 2, : w_ // 2 * 2]
    return y.reshape(n, c, t // 2, 2, h // 2, 2, w_ // 2, 2).mean((3, 5, 7))


def make_case(n, c, t, h, w, specs, dtype=torch.float64, seed=0):
    """specs: [(out_channels, depth, spatial_kernel)]"""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, t, h, w, generator=g, dtype=dtype)
    weights = [torch.randn(o, c, d, k, k, generator=g, dtype=dtype) / (c * d * k * k) ** 0.5 for o, d, k in specs]
    gamma = torch.rand(c, generator=g, dtype=dtype) + 0.5
    beta = torch.randn(c, generator=g, dtype=dtype) * 0.5
    mean = torch.randn(c, generator=g, dtype=dtype) * 0.1
    var = torch.rand(c, generator=g, dtype=dtype) + 0.5
    return x, gamma, beta, mean, var, weights


def run(backend, x, gamma, beta, mean, var, weights, training, pool, grad_seed=1):
    """Forward + backward; returns (y, [grad_x, grad_gamma, grad_beta, *grad_weights], running_mean, running_var)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, gamma, beta, *weights)]
    rm, rv = mean.clone(), var.clone()
    y = tk.ttl(leaves[0], leaves[1], leaves[2], rm, rv, leaves[3:], training=training, pool=pool, backend=backend)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=y.dtype)
    grads = torch.autograd.grad(y, leaves, gy)
    return y.detach(), list(grads), rm, rv


def assert_close_to_float64(name, got32, ref32, ref64):
    err = (got32.double() - ref64).abs().max().item()
    bound = 2 * (ref32.double() - ref64).abs().max().item() + 2 * EPS32 * ref64.abs().max().item()
    assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e}"


# ------------------------------------------------------------------------------------------------------------
# the reference itself
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", range(1, 8))
@pytest.mark.parametrize("training", [False, True])
def test_reference_matches_independent_loop(depth, training):
    x, gamma, beta, mean, var, weights = make_case(1, 3, 5, 7, 6, [(2, 1, 1), (3, depth, 3)])
    rm, rv = mean.clone(), var.clone()
    y = reference.ttl(x, gamma, beta, rm, rv, weights, training=training, eps=1e-5)
    if training:  # the batch statistics normalise x
        var_b, mean_b = torch.var_mean(x, dim=(0, 2, 3, 4), unbiased=False)
        expected = ttl_loop_reference(x, gamma, beta, mean_b, var_b, weights, 1e-5, True)
        n = x.numel() // x.shape[1]
        torch.testing.assert_close(rm, 0.9 * mean + 0.1 * mean_b)
        torch.testing.assert_close(rv, 0.9 * var + 0.1 * var_b * n / (n - 1))
    else:
        expected = ttl_loop_reference(x, gamma, beta, mean, var, weights, 1e-5, True)
    assert y.shape == (1, 5, 2, 3, 3)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 4, 7, 9, 5), (1, 3, 2, 3, 3), (1, 5, 16, 8, 8)])
def test_pool_first_algebra_equals_reference(shape):
    x, gamma, beta, mean, var, weights = make_case(*shape, [(2, 1, 1), (3, 3, 3), (2, 6, 3), (1, 4, 5)])
    a = reference.ttl(x, gamma, beta, mean, var, weights)
    b = reference.ttl_pool_first(x, gamma, beta, mean, var, weights)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_temporal_padding():
    assert [reference.temporal_padding(d) for d in (1, 2, 3, 4, 6)] == [(0, 0), (0, 1), (1, 1), (1, 2), (2, 3)]
    with pytest.raises(ValueError, match="depth"):
        reference.temporal_padding(0)


# ------------------------------------------------------------------------------------------------------------
# fused backends vs the reference
# ------------------------------------------------------------------------------------------------------------

CASES = [
    # (n, c, t, h, w), branch specs, pool
    ((2, 5, 7, 9, 5), [(3, 1, 1), (4, 3, 3), (2, 6, 3)], True),  # odd T/H/W, T3D's depths
    ((1, 3, 3, 4, 6), [(3, 1, 1), (2, 4, 3), (1, 7, 5), (2, 2, 1)], True),  # T < depth, even depths, batch 1
    ((1, 20, 5, 6, 7), [(50, 1, 1), (17, 5, 3)], True),  # more channels than one vector block
    ((2, 6, 4, 5, 5), [(3, 1, 1), (4, 3, 3)], False),  # un-pooled concat
    ((1, 9, 2, 2, 3), [(1, 1, 1), (2, 3, 3)], True),  # the smallest poolable clip
    ((2, 7, 4, 4, 5), [(8, 1, 1), (9, 3, 3), (8, 4, 3)], True),  # few positions, many channels: the cpu GEMM path
    ((1, 5, 3, 3, 3), [(4, 1, 1), (5, 3, 3)], False),  # GEMM path without pooling
]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("training", [True, False])
def test_backend_matches_reference_float64(backend, case, training):
    shape, specs, pool = CASES[case]
    args = make_case(*shape, specs)
    y0, g0, m0, v0 = run("reference", *args, training, pool)
    y1, g1, m1, v1 = run(backend, *args, training, pool)
    torch.testing.assert_close(y1, y0, rtol=1e-9, atol=1e-11)
    names = ["grad_x", "grad_bn_weight", "grad_bn_bias"] + [f"grad_weights[{i}]" for i in range(len(specs))]
    for name, a, b in zip(names, g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(m1, m0)
    torch.testing.assert_close(v1, v0)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d", "non_contiguous"])
@pytest.mark.parametrize("training", [True, False])
def test_backend_float32_within_torch_error(backend, layout, training):
    specs = [(5, 1, 1), (6, 3, 3), (5, 6, 3)]
    x64, *params = make_case(2, 19, 9, 11, 7, specs, seed=3)
    gamma, beta, mean, var, weights = params[0], params[1], params[2], params[3], params[4]

    def as32(t):
        return t.float()

    x32 = as32(x64)
    if layout == "channels_last_3d":
        x32 = x32.contiguous(memory_format=torch.channels_last_3d)
    elif layout == "non_contiguous":  # a strided view: every other channel of a wider tensor
        wide = torch.zeros(2, 38, 9, 11, 7)
        wide[:, ::2] = x32
        x32 = wide[:, ::2]
        assert not x32.is_contiguous()
    p32 = [as32(t) for t in (gamma, beta, mean, var)]
    w32 = [as32(w) for w in weights]
    y64, g64, m64, v64 = run("reference", x64, gamma, beta, mean, var, weights, training, True)
    y_r, g_r, _, _ = run("reference", x32, *p32, w32, training, True)
    y_b, g_b, m_b, v_b = run(backend, x32, *p32, w32, training, True)
    assert_close_to_float64("y", y_b, y_r, y64)
    names = ["grad_x", "grad_bn_weight", "grad_bn_bias"] + [f"grad_weights[{i}]" for i in range(len(specs))]
    for name, a, r, e in zip(names, g_b, g_r, g64):
        assert_close_to_float64(name, a, r, e)
    torch.testing.assert_close(m_b.double(), m64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v_b.double(), v64, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", FUSED)
def test_running_stats_after_several_steps(backend):
    torch.manual_seed(0)
    a = tk.TemporalTransition(6, 9, (1, 3, 4), backend="reference").double()
    b = tk.TemporalTransition(6, 9, (1, 3, 4), backend=backend).double()
    b.load_state_dict(a.state_dict())
    for step in range(4):
        x = torch.randn(2, 6, 5, 6, 6, dtype=torch.float64) * (step + 1) + step
        a(x).sum().backward()
        b(x).sum().backward()
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, msg=lambda m, key=key: f"{key}: {m}")
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, msg=lambda m, name=name: f"{name}.grad: {m}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_float64(backend, training):
    x, gamma, beta, mean, var, weights = make_case(1, 3, 4, 3, 5, [(2, 1, 1), (2, 3, 3), (1, 4, 3)], seed=5)
    inputs = [t.clone().requires_grad_() for t in (x, gamma, beta, *weights)]

    def f(x, gamma, beta, *ws):
        return tk.ttl(x, gamma, beta, mean.clone(), var.clone(), ws, training=training, backend=backend)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("training", [True, False])
def test_opcheck(backend, training):
    x, gamma, beta, mean, var, weights = make_case(2, 3, 4, 5, 3, [(2, 1, 1), (3, 3, 3)], dtype=torch.float32)
    x.requires_grad_()
    weights = [w.requires_grad_() for w in weights]
    args = (x, gamma.requires_grad_(), beta.requires_grad_(), mean, var, weights, True, training, 1e-5, backend, "")
    torch.library.opcheck(torch.ops.t3d.ttl.default, args)
    y, m, v = torch.ops.t3d.ttl(*args)
    grad_args = (
        torch.randn_like(y),
        x.detach(),
        gamma.detach(),
        beta.detach(),
        m,
        v,
        [w.detach() for w in weights],
        True,
        training,
        1e-5,
        backend,
        "",  # no process group
    )
    torch.library.opcheck(torch.ops.t3d.ttl_backward.default, grad_args)


def test_meta_tensors():
    with torch.device("meta"):
        m = tk.TemporalTransition(256, 128, (1, 3, 6), backend="composite")
        y = m(torch.empty(4, 256, 16, 28, 28))
    assert y.shape == (4, 128, 8, 14, 14) and y.device.type == "meta"


@pytest.mark.slow
def test_torch_compile_fullgraph():
    backend = "cpu" if "cpu" in FUSED else "composite"
    m = tk.TemporalTransition(4, 6, (1, 3), backend=backend)
    x = torch.randn(1, 4, 4, 6, 6, requires_grad=True)
    eager = m(x)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager)
    (g_c,) = torch.autograd.grad(compiled.sum(), x)
    (g_e,) = torch.autograd.grad(m(x).sum(), x)
    torch.testing.assert_close(g_c, g_e)


@pytest.mark.parametrize("backend", FUSED)
def test_fused_model_same_logits_and_gradients(backend):
    from t3d.models import t3d_tiny

    torch.manual_seed(0)
    ref = t3d_tiny(num_classes=5, backend="reference").double()
    fused = t3d_tiny(num_classes=5, backend="reference").double()
    fused.load_state_dict(ref.state_dict())
    tk.fuse(fused, backend)
    assert all(m.backend == backend for m in fused.modules() if isinstance(m, tk.TemporalTransition))
    x = torch.randn(2, 3, 16, 32, 32, dtype=torch.float64)
    for train in (True, False):
        ref.train(train)
        fused.train(train)
        a, b = ref(x), fused(x)
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)
        ga = torch.autograd.grad(a.sum(), list(ref.parameters()))
        gb = torch.autograd.grad(b.sum(), list(fused.parameters()))
        for (name, _), u, v in zip(ref.named_parameters(), gb, ga):
            torch.testing.assert_close(u, v, rtol=1e-8, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


def test_module_split_and_state_dict_keys():
    m = tk.TemporalTransition(256, 128, (1, 3, 6))
    assert [b.weight.shape for b in m.branches] == [(43, 256, 1, 1, 1), (43, 256, 3, 3, 3), (42, 256, 6, 3, 3)]
    keys = set(tk.TemporalTransition(8, 6, backend="reference").state_dict())
    for backend in tk.backends():
        assert set(tk.TemporalTransition(8, 6, backend=backend).state_dict()) == keys
    assert tk.TemporalTransition(8, depths=(1, 3), branch_channels=128).out_channels == 256


def test_auto_backend_picks_compiled_kernel_on_cpu():
    from t3d_kernels.backends import resolve

    expected = "cpu" if "cpu" in tk.backends() else "composite"
    assert resolve("ttl", "auto", torch.device("cpu")) == expected


# ------------------------------------------------------------------------------------------------------------
# bad input: a clear error naming the argument, from every backend
# ------------------------------------------------------------------------------------------------------------

ALL = ["reference", *FUSED]


def _good():
    x, gamma, beta, mean, var, weights = make_case(1, 4, 4, 4, 4, [(2, 1, 1), (2, 3, 3)], dtype=torch.float32)
    return dict(x=x, bn_weight=gamma, bn_bias=beta, running_mean=mean, running_var=var, weights=weights)


BAD = {
    "channels": (
        lambda a: a["weights"].__setitem__(1, torch.randn(2, 5, 3, 3, 3)),
        ValueError,
        r"weights\[1\].*input channels",
    ),
    "depth0": (lambda a: a["weights"].__setitem__(0, torch.randn(2, 4, 0, 1, 1)), ValueError, r"weights\[0\].*depth"),
    "even_kernel": (
        lambda a: a["weights"].__setitem__(1, torch.randn(2, 4, 3, 2, 3)),
        ValueError,
        r"weights\[1\].*odd",
    ),
    "dtype_mix": (
        lambda a: a["weights"].__setitem__(0, torch.randn(2, 4, 1, 1, 1, dtype=torch.float64)),
        TypeError,
        r"weights\[0\].*dtype",
    ),
    "device_mix": (
        lambda a: a.__setitem__("bn_weight", torch.empty(4, device="meta")),
        ValueError,
        "bn_weight.*device",
    ),
    "int_x": (
        lambda a: a.__setitem__("x", torch.ones(1, 4, 4, 4, 4, dtype=torch.int64)),
        TypeError,
        "x: expected a floating",
    ),
    "rank": (lambda a: a.__setitem__("x", torch.randn(4, 4, 4, 4)), ValueError, "x: expected a 5-D"),
    "bn_shape": (lambda a: a.__setitem__("running_var", torch.ones(3)), ValueError, r"bn_running_var.*shape \(4,\)"),
    "no_weights": (lambda a: a.__setitem__("weights", []), ValueError, "weights: expected a non-empty"),
}


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("bad", sorted(BAD))
def test_bad_input_clear_error(backend, bad):
    mutate, exc, pattern = BAD[bad]
    args = _good()
    mutate(args)
    with pytest.raises(exc, match=pattern):
        tk.ttl(**args, backend=backend)


@pytest.mark.skipif("cpu" not in FUSED, reason="C++ extension not built")
def test_cpp_kernel_checks_its_arguments():
    """The compiled kernel checks too (for callers that bypass the Python op)."""
    mod = _ext.load()
    a = _good()
    bad_w = [a["weights"][0], torch.randn(2, 5, 3, 3, 3)]
    with pytest.raises(RuntimeError, match=r"weights\[1\]: expected 4 input channels"):
        mod.ttl_forward(a["x"], a["bn_weight"], a["bn_bias"], a["running_mean"], a["running_var"], bad_w, True, 1e-5)
    with pytest.raises(RuntimeError, match="x: the cpu backend of ttl expects float32 or float64"):
        h = [t.half() for t in (a["x"], a["bn_weight"], a["bn_bias"], a["running_mean"], a["running_var"])]
        mod.ttl_forward(*h, [w.half() for w in a["weights"]], True, 1e-5)
    y = mod.ttl_forward(
        a["x"], a["bn_weight"], a["bn_bias"], a["running_mean"], a["running_var"], a["weights"], True, 1e-5
    )
    with pytest.raises(RuntimeError, match="grad_y: expected shape"):
        mod.ttl_backward(
            y[:, :1],
            a["x"],
            a["bn_weight"],
            a["bn_bias"],
            a["running_mean"],
            a["running_var"],
            a["weights"],
            True,
            True,
            1e-5,
        )


def test_unknown_or_unbuilt_backend():
    with pytest.raises(BackendError, match="unknown backend 'nope'.*built here"):
        tk.ttl(**_good(), backend="nope")
    with pytest.raises(BackendError, match="backend"):
        tk.TemporalTransition(4, 4, backend="nope")
    if "cuda" not in tk.backends():
        with pytest.raises(BackendError, match="'cuda' for op 'ttl' is not built"):
            tk.ttl(**_good(), backend="cuda")


@pytest.mark.parametrize("depths", list(itertools.combinations(range(1, 8), 2))[:6])
def test_module_rejects_bad_configuration(depths):
    with pytest.raises(ValueError, match="depths"):
        tk.TemporalTransition(4, 4, depths=(0, *depths))
    with pytest.raises(ValueError, match="kernel_size"):
        tk.TemporalTransition(4, 4, depths=depths, kernel_size=2)


@pytest.mark.parametrize("backend", FUSED)
def test_autocast_rules(backend):
    """An autocast rule is registered on CPU and CUDA; on CPU a backend that declares bf16 autocast computes in
    bf16 (tests/test_amp.py checks its error), the others in float32 (their declared fallback)."""
    from t3d_kernels.backends import get

    for key in ("AutocastCPU", "AutocastCUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key("t3d::ttl", key)
    m = tk.TemporalTransition(8, 6, (1, 3), backend=backend)
    x = torch.randn(2, 8, 4, 6, 6)
    expected = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    if torch.bfloat16 in get("ttl", backend).autocast_dtypes:
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), expected, atol=0.05, rtol=0.05)
    else:
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, expected)
    assert m.norm.running_mean.dtype == torch.float32


def test_auto_order_per_op_on_cuda():
    """On GPUs auto takes the Triton TTL (fastest measured) but keeps the dense block on cuDNN (its fused GPU kernels
    were slower); no GPU is needed to check the choice, only that triton is installed."""
    from t3d_kernels.backends import resolve

    if "triton" in tk.backends():
        assert resolve("ttl", "auto", torch.device("cuda")) == "triton"
    assert resolve("dense_block", "auto", torch.device("cuda")) == "reference"
