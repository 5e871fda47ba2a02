"""t3d::bn_relu_maxpool (the fused T3D stem: BN -> ReLU -> MaxPool3d) vs the plain-PyTorch reference.

Output, every gradient and the running statistics on every backend that runs here, float64 (tight) and float32
(within twice PyTorch's own float32 error against float64, plus two units of rounding), odd shapes, layouts, train
and eval; property-based search of the configuration space; gradcheck; opcheck; fuse() on the model's stem keeps
the state_dict and the logits; clear errors.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import t3d_kernels as tk
from t3d.models import t3d_tiny
from t3d_kernels import reference
from t3d_kernels.backends import BackendError, resolve
from t3d_kernels.nn import BatchNormReLUMaxPool3d
from t3d_kernels.ops.bn_relu_maxpool import bn_relu_maxpool
from t3d_kernels.testing import backend_device_pairs

EPS32 = torch.finfo(torch.float32).eps
THOROUGH = os.environ.get("T3D_FUZZ") == "thorough"


BACKENDS = [name for name, device in backend_device_pairs("bn_relu_maxpool") if device == "cpu"]


def make_case(n, c, t, h, w, dtype=torch.float64, seed=0, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, t, h, w, generator=g, dtype=dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last_3d)
    elif layout == "sliced":
        x = torch.randn(n, c + 2, t, h, w + 1, generator=g, dtype=dtype)[:, 1 : c + 1, :, :, :w]
    gamma = torch.rand(c, generator=g, dtype=dtype) + 0.5
    gamma[::3] *= -1  # a negative scale turns the max of z into the min of x: the kernels must pool z, not x
    beta = torch.randn(c, generator=g, dtype=dtype) * 0.5
    mean = torch.randn(c, generator=g, dtype=dtype) * 0.1
    var = torch.rand(c, generator=g, dtype=dtype) + 0.5
    return x, gamma, beta, mean, var


def run(backend, x, gamma, beta, mean, var, k, s, p, training):
    leaves = [v.detach().clone().requires_grad_() for v in (x, gamma, beta)]
    rm, rv = mean.clone(), var.clone()
    if backend == "reference":
        y = reference.bn_relu_maxpool(*leaves, rm, rv, k, s, p, training)
    else:
        y = bn_relu_maxpool(*leaves, rm, rv, k, s, p, training=training, backend=backend)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype)
    return [y.detach(), *torch.autograd.grad(y, leaves, gy), rm, rv]


NAMES = ["y", "grad_x", "grad_gamma", "grad_beta", "running_mean", "running_var"]

CASES = [
    # (N, C, T, H, W, kernel, stride, padding): the stem's pool, odd sizes, batch 1, T smaller than the kernel
    (2, 5, 6, 9, 7, (3, 3, 3), (1, 2, 2), (1, 1, 1)),
    (1, 3, 2, 5, 5, (3, 3, 3), (1, 2, 2), (1, 1, 1)),
    (3, 4, 5, 6, 8, (2, 2, 2), (2, 2, 2), (0, 0, 0)),
    (2, 2, 4, 7, 5, (3, 1, 3), (2, 1, 1), (1, 0, 1)),
    (2, 1, 1, 1, 1, (1, 1, 1), (1, 1, 1), (0, 0, 0)),
]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_float64(backend, training, layout):
    for i, (n, c, t, h, w, k, s, p) in enumerate(CASES):
        case = make_case(n, c, t, h, w, seed=i, layout=layout)
        want = run("reference", *case, k, s, p, training)
        got = run(backend, *case, k, s, p, training)
        for name, a, b in zip(NAMES, got, want):
            torch.testing.assert_close(
                a, b, rtol=1e-10, atol=1e-12, msg=lambda m, name=name, i=i: f"case {i} {name}: {m}"
            )


# float32 runs the cpu backend's vector kernels (AVX-512 where the CPU has it): the stem geometry at widths that
# give one, two and a cut third 16-output step of the W pass (odd and even), and integer inputs (ties everywhere:
# the first maximum must be chosen as ATen chooses it)
F32_SHAPES = [(2, 6, 8, 14, 12, False), (1, 3, 3, 7, 33, False), (2, 2, 4, 5, 64, False), (1, 4, 5, 9, 69, True)]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", F32_SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + ("-ties" if s[5] else ""))
def test_float32_within_torch_error(backend, training, shape):
    *dims, ties = shape
    k, s, p = (3, 3, 3), (1, 2, 2), (1, 1, 1)
    case64 = make_case(*dims, seed=3)
    if ties:
        case64 = (case64[0].mul(2).round(), *case64[1:])
    case32 = [v.float() for v in case64]
    ref64 = run("reference", *case64, k, s, p, training)
    ref32 = run("reference", *case32, k, s, p, training)
    got32 = run(backend, *case32, k, s, p, training)
    for name, a, b, r in zip(NAMES, got32, ref32, ref64):
        err = (a.double() - r).abs().max().item()
        bound = 2 * (b.double() - r).abs().max().item() + 2 * EPS32 * r.abs().max().item()
        assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e}"


@settings(
    max_examples=300 if THOROUGH else 30,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)
@given(
    data=st.data(),
    backend=st.sampled_from(BACKENDS),
    n=st.integers(1, 5),
    c=st.integers(1, 9),
    dims=st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9)),
    training=st.booleans(),
    layout=st.sampled_from(["contiguous", "channels_last", "sliced"]),
    threads=st.sampled_from([1, 2]),
)
def test_fuzz_against_reference(data, backend, n, c, dims, training, layout, threads):
    """Kernel 1-3, stride 1-2, padding 0..k//2 per dim, every size that leaves an output; float64."""
    k = [data.draw(st.integers(1, min(3, d + 2)), label=f"k{i}") for i, d in enumerate(dims)]
    p = [data.draw(st.integers(0, kk // 2), label=f"p{i}") for i, kk in enumerate(k)]
    s = [data.draw(st.integers(1, 2), label=f"s{i}") for i in range(3)]
    if any(d + 2 * pp < kk for d, pp, kk in zip(dims, p, k)) or (training and n * dims[0] * dims[1] * dims[2] == 1):
        return  # no output position, or one value per channel in training: rejected (test_bad_input)
    case = make_case(n, c, *dims, seed=n * 31 + c, layout=layout)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        want = run("reference", *case, k, s, p, training)
        got = run(backend, *case, k, s, p, training)
    finally:
        torch.set_num_threads(before)
    for name, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend, training):
    x, gamma, beta, mean, var = make_case(2, 3, 3, 5, 4, seed=9)

    def f(x, gamma, beta):
        return bn_relu_maxpool(
            x, gamma, beta, mean.clone(), var.clone(), 3, (1, 2, 2), 1, training=training, backend=backend
        )

    inputs = [v.clone().requires_grad_() for v in (x, gamma, beta)]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, training):
    x, gamma, beta, mean, var = make_case(2, 3, 4, 6, 5, dtype=torch.float32, seed=2)
    geometry = ([3, 3, 3], [1, 2, 2], [1, 1, 1])
    args = (
        x.requires_grad_(),
        gamma.requires_grad_(),
        beta.requires_grad_(),
        mean,
        var,
        *geometry,
        training,
        1e-5,
        True,
        backend,
        "",
    )
    torch.library.opcheck(torch.ops.t3d.bn_relu_maxpool.default, args)
    with torch.no_grad():
        y, m, v, indices = torch.ops.t3d.bn_relu_maxpool(*args)
    gy = torch.randn(y.shape)
    bargs = (gy, x.detach(), gamma.detach(), beta.detach(), m, v, y, indices, *geometry, training, 1e-5, backend, "")
    torch.library.opcheck(torch.ops.t3d.bn_relu_maxpool_backward.default, bargs)


def test_backward_is_deterministic():
    """The composite backward (the one CUDA can use under --deterministic) adds through strided slices: the same
    inputs give bitwise the same gradient, with ties between window positions broken as ATen breaks them."""
    x, gamma, beta, mean, var = make_case(2, 4, 6, 9, 9, seed=4)
    x = x.round()  # many exact ties inside windows
    runs = [run("composite", x, gamma, beta, mean, var, (3, 3, 3), (1, 2, 2), (1, 1, 1), True) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    want = run("reference", x, gamma, beta, mean, var, (3, 3, 3), (1, 2, 2), (1, 1, 1), True)
    for name, a, b in zip(NAMES, runs[0], want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_fuse_covers_the_stem(backend):
    """fuse() turns norm0/relu0/pool0 into one fused module: state_dict keys unchanged, same logits and gradients,
    the BN is still found by freezing helpers."""
    torch.manual_seed(0)
    eager = t3d_tiny(num_classes=3).double().train()
    fused = t3d_tiny(num_classes=3).double().train()
    fused.load_state_dict(eager.state_dict())
    tk.fuse(fused, backend)
    assert isinstance(fused.features.norm0, BatchNormReLUMaxPool3d)
    assert list(fused.state_dict()) == list(eager.state_dict())
    x = torch.randn(2, 3, 16, 32, 32, dtype=torch.float64)
    ya, yb = eager(x), fused(x)
    torch.testing.assert_close(yb, ya, rtol=1e-9, atol=1e-10)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (name, a), b in zip(eager.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-8, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")
    for (name, a), b in zip(eager.named_buffers(), fused.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
    n_bn = sum(isinstance(m, torch.nn.BatchNorm3d) for m in fused.modules())
    assert n_bn == sum(isinstance(m, torch.nn.BatchNorm3d) for m in eager.modules())


def test_fuse_keeps_the_optimizer_parameters():
    model = t3d_tiny(num_classes=3)
    params = {id(p) for p in model.parameters()}
    tk.fuse(model)
    assert {id(p) for p in model.parameters()} == params


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(x=torch.randn(2, 3, 4, 4)), "x: expected a 5-D tensor"),
        (dict(x=torch.randint(0, 3, (1, 3, 4, 4, 4))), "x: expected a floating-point tensor"),
        (dict(bn_weight=torch.ones(4)), r"bn_weight: expected shape \(3,\)"),
        (dict(bn_bias=torch.ones(3, dtype=torch.float64)), "bn_bias: expected dtype torch.float32"),
        (dict(kernel_size=(3, 3)), "kernel_size: expected an int or 3 ints"),
        (dict(stride=0), "stride: expected values >= 1"),
        (dict(padding=2), "padding: expected 0 <= padding <= kernel_size / 2"),
        (dict(x=torch.randn(1, 3, 1, 1, 1), padding=0), "too small for kernel_size"),
        (dict(x=torch.randn(1, 3, 1, 1, 1), kernel_size=1, padding=0), "more than 1 value per channel"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend, bad, match):
    args = dict(
        x=torch.randn(1, 3, 4, 4, 4),
        bn_weight=torch.ones(3),
        bn_bias=torch.zeros(3),
        running_mean=torch.zeros(3),
        running_var=torch.ones(3),
        kernel_size=3,
        stride=(1, 2, 2),
        padding=1,
    )
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        bn_relu_maxpool(**args, training=True, backend=backend)


def test_cpp_kernel_checks_its_arguments():
    ext = tk._ext.load()
    x = torch.randn(1, 3, 4, 4, 4)
    one, zero = torch.ones(3), torch.zeros(3)
    geometry = ([3, 3, 3], [1, 2, 2], [1, 1, 1])
    with pytest.raises(RuntimeError, match="bn_weight: expected shape"):
        ext.bn_relu_maxpool_forward(x, torch.ones(2), zero, zero, one, *geometry, True, 1e-5, True)
    y, m, v, indices = ext.bn_relu_maxpool_forward(x, one, zero, zero, one, *geometry, True, 1e-5, True)
    with pytest.raises(RuntimeError, match="grad_y: expected shape"):
        ext.bn_relu_maxpool_backward(torch.randn(1, 3, 4, 4, 4), x, one, zero, m, v, y, indices, *geometry, True, 1e-5)
    with pytest.raises(RuntimeError, match="indices: expected the int32 indices"):
        ext.bn_relu_maxpool_backward(torch.randn(y.shape), x, one, zero, m, v, y, indices.long(), *geometry, True, 1e-5)


def test_saves_less_than_eager():
    """Saved for backward besides x: y and int32 indices (eager: the ReLU output, which the pool also saves, and
    int64 indices)."""
    from torch.autograd.graph import saved_tensors_hooks

    def saved_bytes(fn):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        x = torch.randn(2, 8, 8, 16, 16, requires_grad=True)
        gamma, beta = torch.ones(8, requires_grad=True), torch.zeros(8, requires_grad=True)
        with saved_tensors_hooks(pack, lambda t: t):
            fn(x, gamma, beta, torch.zeros(8), torch.ones(8))
        return sum(seen.values()) - x.untyped_storage().nbytes()  # x is saved by both (and by the conv before)

    eager = saved_bytes(lambda *a: reference.bn_relu_maxpool(*a, (3, 3, 3), (1, 2, 2), (1, 1, 1), True))
    fused = saved_bytes(lambda *a: bn_relu_maxpool(*a, 3, (1, 2, 2), 1, training=True, backend="cpu"))
    x_bytes = 2 * 8 * 8 * 16 * 16 * 4
    assert eager >= 1.5 * x_bytes  # ReLU output (x's size) and int64 indices (1/2 of it at this pool)
    assert fused <= 0.51 * x_bytes  # y and int32 indices (1/4 of x each) and the per-channel statistics


def test_deterministic_mode_picks_the_gather_backward_on_gpus():
    """Under torch.use_deterministic_algorithms the reference (ATen's pool: atomic adds on CUDA) refuses CUDA, so
    auto picks the composite backend, whose backward is the gather; on CPU nothing changes."""
    cuda = torch.device("cuda")
    assert resolve("bn_relu_maxpool", "auto", cuda) == "reference"
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert resolve("bn_relu_maxpool", "auto", cuda) == "composite"
        assert resolve("bn_relu_maxpool", "auto", torch.device("cpu")) in BACKENDS
        with pytest.raises(BackendError, match="atomics"):
            resolve("bn_relu_maxpool", "reference", cuda)
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_bf16_on_cpu(backend):
    """Under CPU bf16 autocast a bf16 input is computed in the parameters' float32 (declared fallback): the result
    equals the float32 op on the same (bf16-rounded) input, running stats stay float32."""
    x, gamma, beta, mean, var = make_case(2, 4, 5, 8, 8, dtype=torch.float32, seed=6)
    xb = x.bfloat16()
    rm, rv = mean.clone(), var.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bn_relu_maxpool(xb, gamma, beta, rm, rv, training=True, backend=backend)
    rm32, rv32 = mean.clone(), var.clone()
    want = reference.bn_relu_maxpool(xb.float(), gamma, beta, rm32, rv32, (3, 3, 3), (1, 2, 2), (1, 1, 1), True)
    assert y.dtype == torch.float32 and rm.dtype == torch.float32
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rm, rm32, rtol=1e-5, atol=1e-6)
