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
from _tolerance import check_backend, exact_float32

import t3d_kernels as tk
from t3d_kernels import _ext, reference, testing
from t3d_kernels.backends import BackendError

# every (backend, device) pair this machine runs the op on: cpu, composite, triton (interpreted on a CPU-only
# machine, see conftest.py) and, on a GPU machine, triton/cuda/composite on "cuda"
PAIRS = testing.backend_device_pairs("ttl")
PAIR_IDS = [f"{b}-{d}" for b, d in PAIRS]
# Triton's interpreter runs a kernel program by program in numpy: tiny shapes only
INTERPRETED = {("triton", "cpu")}


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


def make_case(n, c, t, h, w, specs, dtype=torch.float64, seed=0, device="cpu"):
    """(x, gamma, beta, running_mean, running_var, weights) of testing.ttl_input; specs: [(C_i, depth, k)]."""
    return testing.ttl_input((n, c, t, h, w), specs, dtype=dtype, seed=seed, device=device, requires_grad=False).args


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


def _samples(backend, device):
    return list(testing.sample_inputs("ttl", tiny=(backend, device) in INTERPRETED))


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", range(len(_samples("reference", "cpu"))))
def test_backend_matches_reference(backend, device, dtype, case):
    """Output, every gradient and the running statistics after two steps, on every sample input (all layouts, both
    modes, pool on/off), within the float64 reference's tolerance (tests/_tolerance.py)."""
    samples = _samples(backend, device)
    if case >= len(samples):
        pytest.skip("a larger sample than the Triton interpreter runs")
    if (backend, device) in INTERPRETED and dtype == torch.float64 and not samples[case].kwargs["training"]:
        pytest.skip("the Triton interpreter runs float64 in training only (time)")
    failures = check_backend(samples[case], backend, device, dtype)
    assert not failures, "\n".join(failures)


# Long reductions, where the order of a float32 sum shows: K = 256 * 6*3*3 = 13824 terms per output (the 6x3x3 branch
# of TTL1 of T3D-121), and a weight gradient over 4 * 8*16*16 = 8192 positions. The hand-picked and fuzzed shapes
# are too small for that: a kernel summing in one long float32 chain passed them but erred 37 ulp of max|y| here
# where PyTorch errs 2 (tests/_tolerance.py).
LONG_REDUCTIONS = [
    ((1, 256, 4, 8, 8), [(5, 1, 1), (7, 6, 3)]),  # long K
    ((4, 8, 16, 32, 32), [(6, 1, 1), (5, 3, 3)]),  # many positions
]


@pytest.mark.parametrize("backend,device", [p for p in PAIRS if p not in INTERPRETED],
                         ids=[i for p, i in zip(PAIRS, PAIR_IDS) if p not in INTERPRETED])  # fmt: skip
@pytest.mark.parametrize("shape,branches", LONG_REDUCTIONS, ids=["long-K", "many-positions"])
def test_long_reductions_within_tolerance(backend, device, shape, branches):
    sample = testing.ttl_input(shape, branches, training=True)
    failures = check_backend(sample, backend, device, torch.float32, steps=1)
    assert not failures, "\n".join(failures)


# The cpu backend packs the weights in tiles of a few input channels (pack_tile_len: 9 at 3x3x3, 7 at 4x3x3, 16 at
# 1x1x1 in float32) and blocks of NR = 48 output channels: C = 20 leaves a partial channel tile in every branch and
# 50 output channels a second, almost empty output block.
@pytest.mark.skipif("cpu" not in tk.backends("ttl"), reason="C++ extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_cpu_weight_packing_tails(dtype):
    sample = testing.ttl_input((1, 20, 4, 6, 6), [(50, 1, 1), (5, 3, 3), (3, 4, 3)], training=True)
    failures = check_backend(sample, "cpu", "cpu", dtype, steps=1)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_running_stats_after_several_steps(backend, device):
    torch.manual_seed(0)
    a = tk.TemporalTransition(6, 9, (1, 3, 4), backend="reference").double()
    b = tk.TemporalTransition(6, 9, (1, 3, 4), backend=backend).double().to(device)
    b.load_state_dict(a.state_dict())
    for step in range(4):
        x = torch.randn(2, 6, 4, 4, 5, dtype=torch.float64) * (step + 1) + step
        a(x).sum().backward()
        b(x.to(device)).sum().backward()
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key].cpu(), value, msg=lambda m, key=key: f"{key}: {m}")
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad.cpu(), pa.grad, msg=lambda m, name=name: f"{name}.grad: {m}")


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_float64(backend, device, training):
    x, gamma, beta, mean, var, weights = make_case(1, 3, 4, 3, 5, [(2, 1, 1), (2, 3, 3), (1, 4, 3)], seed=5)
    inputs = [t.to(device).requires_grad_() for t in (x, gamma, beta, *weights)]
    mean, var = mean.to(device), var.to(device)

    def f(x, gamma, beta, *ws):
        return tk.ttl(x, gamma, beta, mean.clone(), var.clone(), ws, training=training, backend=backend)

    fast = (backend, device) in INTERPRETED
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, fast_mode=fast)


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("training", [True, False])
def test_opcheck(backend, device, training):
    x, gamma, beta, mean, var, weights = make_case(2, 3, 4, 5, 3, [(2, 1, 1), (3, 3, 3)], torch.float32, device=device)
    x.requires_grad_()
    weights = [w.requires_grad_() for w in weights]
    args = (x, gamma.requires_grad_(), beta.requires_grad_(), mean, var, weights, True, training, 1e-5, backend, "")
    with exact_float32():
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


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_torch_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    m = tk.TemporalTransition(4, 6, (1, 3), backend=backend).to(device)
    x = torch.randn(1, 4, 4, 6, 6, requires_grad=True, device=device)
    eager = m(x)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager)
    (g_c,) = torch.autograd.grad(compiled.sum(), x)
    (g_e,) = torch.autograd.grad(m(x).sum(), x)
    torch.testing.assert_close(g_c, g_e)


@pytest.mark.parametrize("backend,device", [p for p in PAIRS if p not in INTERPRETED])
def test_fused_model_same_logits_and_gradients(backend, device):
    from t3d.models import t3d_tiny

    torch.manual_seed(0)
    ref = t3d_tiny(num_classes=5, backend="reference").double()
    fused = t3d_tiny(num_classes=5, backend="reference").double().to(device)
    fused.load_state_dict(ref.state_dict())
    tk.fuse(fused, backend)
    assert all(m.backend == backend for m in fused.modules() if isinstance(m, tk.TemporalTransition))
    x = torch.randn(2, 3, 16, 32, 32, dtype=torch.float64)
    for train in (True, False):
        ref.train(train)
        fused.train(train)
        a, b = ref(x), fused(x.to(device))
        torch.testing.assert_close(b.cpu(), a, rtol=1e-9, atol=1e-10)
        ga = torch.autograd.grad(a.sum(), list(ref.parameters()))
        gb = torch.autograd.grad(b.sum(), list(fused.parameters()))
        for (name, _), u, v in zip(ref.named_parameters(), gb, ga):
            torch.testing.assert_close(u.cpu(), v, rtol=1e-8, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


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

ALL = [("reference", "cpu"), *PAIRS]


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


@pytest.mark.parametrize("backend,device", ALL, ids=[f"{b}-{d}" for b, d in ALL])
@pytest.mark.parametrize("bad", sorted(BAD))
def test_bad_input_clear_error(backend, device, bad):
    mutate, exc, pattern = BAD[bad]
    args = _good()
    mutate(args)
    on = lambda t: t.to(device) if t.device.type == "cpu" else t  # noqa: E731  (the meta tensor of device_mix stays)
    args = {k: [on(w) for w in v] if isinstance(v, list) else on(v) for k, v in args.items()}
    with pytest.raises(exc, match=pattern):
        tk.ttl(**args, backend=backend)


@pytest.mark.parametrize("backend,device", ALL, ids=[f"{b}-{d}" for b, d in ALL])
def test_what_the_reference_refuses_is_a_clear_error(backend, device):
    """Found by the fuzz suite: the fused kernels returned a result where the reference raises (a constant for one
    value per channel in training, an empty tensor for a pooled T/H/W of 1); now every backend names x."""
    args = _good()
    args = {k: [w.to(device) for w in v] if isinstance(v, list) else v.to(device) for k, v in args.items()}
    with pytest.raises(ValueError, match="x: batch norm in training needs more than one value per channel"):
        tk.ttl(**{**args, "x": args["x"][:, :, :1, :1, :1]}, training=True, pool=False, backend=backend)
    for x in (args["x"][:, :, :1], args["x"][:, :, :, :1], args["x"][..., :1]):
        with pytest.raises(ValueError, match=r"x: pool=True \(2x2x2 average pooling\) needs T, H, W >= 2"):
            tk.ttl(**{**args, "x": x}, pool=True, backend=backend)
    tk.ttl(**{**args, "x": args["x"][:, :, :1, :1, :1]}, training=False, pool=False, backend=backend)


@pytest.mark.skipif("cpu" not in tk.backends("ttl"), reason="C++ extension not built")
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


@pytest.mark.parametrize("backend", [b for b, d in PAIRS if d == "cpu" and (b, d) not in INTERPRETED])
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
