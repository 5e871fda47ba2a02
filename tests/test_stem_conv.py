"""t3d::stem_conv3d / t3d::conv3d_input_grad (the stem conv's input gradient, csrc/cpu/conv3d_input_grad.cpp) vs
ATen's conv3d and its autograd.

The input gradient of the cpu kernel against float64 ATen: float32 within twice PyTorch's own float32 error plus
two units of rounding, float64 (the kernel's scalar form) tight; T3D's conv0 geometry, odd widths and heights,
1-4 channels, T/H strides 1-3, kernels up to 16 wide, 1 and 2 threads; a property-based search of the configuration
space; every gradient of the module (input, weight, bias) against nn.Conv3d; gradcheck; opcheck of both ops;
fuse() swaps conv0 keeping parameters and state_dict; clear errors.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import t3d_kernels as tk
from t3d.models import t3d_tiny
from t3d_kernels import _ext
from t3d_kernels.nn import StemConv3d
from t3d_kernels.ops.stem_conv import conv3d_input_grad_applies, stem_conv3d

EPS32 = torch.finfo(torch.float32).eps
THOROUGH = os.environ.get("T3D_FUZZ") == "thorough"
HAVE_KERNEL = _ext.load() is not None and hasattr(_ext.load(), "conv3d_input_grad")
needs_kernel = pytest.mark.skipif(not HAVE_KERNEL, reason="the compiled extension has no conv3d_input_grad")


def case(n, c, t, h, w, o, k, s, p, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, t, h, w, generator=g, dtype=dtype)
    weight = torch.randn(o, c, *k, generator=g, dtype=dtype) / (c * k[0] * k[1] * k[2]) ** 0.5
    y = F.conv3d(x, weight, None, s, p)
    gy = torch.randn(y.shape, generator=g, dtype=dtype)
    return x, weight, gy


def aten_input_grad(x, weight, gy, s, p):
    return torch.ops.aten.convolution_backward(
        gy, x, weight, None, s, p, [1, 1, 1], False, [0, 0, 0], 1, [True, False, False]
    )[0]


def kernel(gy, weight, shape, s, p):
    return _ext.load().conv3d_input_grad(gy, weight, list(shape), list(s), list(p))


def check_float32(n, c, t, h, w, o, k, s, p, seed=0, threads=None):
    """The float32 kernel within twice ATen's own float32 error against float64, plus two units of rounding."""
    x64, w64, g64 = case(n, c, t, h, w, o, k, s, p, seed)
    want = aten_input_grad(x64, w64, g64, s, p)
    x32, w32, g32 = x64.float(), w64.float(), g64.float()
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        got = kernel(g32, w32, x32.shape, s, p)
        aten32 = aten_input_grad(x32, w32, g32, s, p)
    finally:
        torch.set_num_threads(before)
    assert got.shape == want.shape and got.dtype == torch.float32
    err = (got.double() - want).abs().max().item()
    bound = 2 * (aten32.double() - want).abs().max().item() + 2 * EPS32 * want.abs().max().item()
    assert err <= bound, f"error {err:.3e} > bound {bound:.3e} for {(n, c, t, h, w, o, k, s, p)}"


T3D_STEM = dict(k=(3, 7, 7), s=(2, 2, 2), p=(1, 3, 3))


@needs_kernel
@pytest.mark.parametrize(
    "shape",
    [
        (1, 3, 8, 32, 32, 16),  # conv0's geometry on a small clip
        (2, 3, 5, 19, 37, 24),  # odd T, H, W: the last phase column and the last vector are partial
        (1, 3, 4, 9, 130, 8),  # W > 128: more than one 64-column block per phase
        (1, 1, 3, 7, 6, 5),
        (1, 2, 4, 8, 9, 17),
        (1, 4, 2, 6, 11, 3),
    ],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_t3d_stem_geometry_float32(shape, threads):
    check_float32(*shape, **T3D_STEM, seed=sum(shape), threads=threads)


@needs_kernel
@pytest.mark.parametrize(
    "geometry",
    [
        dict(k=(1, 1, 1), s=(1, 1, 2), p=(0, 0, 0)),
        dict(k=(3, 3, 3), s=(1, 1, 2), p=(1, 1, 1)),
        dict(k=(2, 5, 4), s=(3, 2, 2), p=(0, 2, 1)),
        dict(k=(1, 3, 16), s=(1, 3, 2), p=(0, 1, 8)),  # the widest kernel the kernel takes
        dict(k=(3, 7, 7), s=(2, 2, 2), p=(0, 0, 0)),
    ],
)
def test_other_geometries_float32(geometry):
    check_float32(2, 3, 6, 13, 35, 7, **geometry, seed=3)


@needs_kernel
def test_float64_matches_aten():
    """The scalar form (float64, and float32 without AVX-512): the same taps, so float64 agrees to ~1e-15."""
    for shape, geo in [
        ((2, 3, 5, 11, 13, 6), T3D_STEM),
        ((1, 2, 4, 7, 9, 4), dict(k=(2, 3, 4), s=(1, 2, 2), p=(1, 0, 2))),
    ]:
        x, weight, gy = case(*shape, **geo, seed=7)
        torch.testing.assert_close(
            kernel(gy, weight, x.shape, geo["s"], geo["p"]),
            aten_input_grad(x, weight, gy, geo["s"], geo["p"]),
            rtol=1e-12,
            atol=1e-13,
        )


@needs_kernel
def test_the_result_does_not_depend_on_the_thread_count():
    x, weight, gy = case(2, 3, 6, 20, 40, 16, **T3D_STEM, seed=11, dtype=torch.float32)
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(kernel(gy, weight, x.shape, T3D_STEM["s"], T3D_STEM["p"]))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(runs[0], runs[1])


@needs_kernel
@settings(
    max_examples=300 if THOROUGH else 30,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)
@given(
    data=st.data(),
    n=st.integers(1, 8),
    c=st.integers(1, 4),
    o=st.integers(1, 20),
    dims=st.tuples(st.integers(1, 7), st.integers(1, 9), st.integers(1, 70)),
    threads=st.sampled_from([1, 2]),
)
def test_fuzz_against_aten(data, n, c, o, dims, threads):
    """Kernels 1-7 (W up to 9), T/H strides 1-3, W stride 2, paddings up to the kernel size: float32 against float64."""
    k = [data.draw(st.integers(1, 7 if i < 2 else 9), label=f"k{i}") for i in range(3)]
    s = [data.draw(st.integers(1, 3), label="st"), data.draw(st.integers(1, 3), label="sh"), 2]
    p = [data.draw(st.integers(0, kk), label=f"p{i}") for i, kk in enumerate(k)]
    if any(d + 2 * pp < kk for d, pp, kk in zip(dims, p, k)):
        return  # no output position (test_bad_input)
    check_float32(n, c, *dims, o, k, s, p, seed=n + 7 * c + o, threads=threads)


def module_pair(c=3, o=8, bias=True, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv3d(c, o, (3, 7, 7), (2, 2, 2), (1, 3, 3), bias=bias).double()
    twin = nn.Conv3d(c, o, (3, 7, 7), (2, 2, 2), (1, 3, 3), bias=bias).double()
    twin.load_state_dict(conv.state_dict())
    return conv, StemConv3d.from_conv(twin)


@pytest.mark.parametrize("bias", [True, False])
def test_module_gradients_match_conv3d(bias):
    conv, stem = module_pair(bias=bias)
    x = torch.randn(2, 3, 5, 17, 23, dtype=torch.float64)
    outs = []
    for m in (conv, stem):
        xi = x.clone().requires_grad_()
        y = m(xi)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
        params = [xi, *m.parameters()]
        outs.append([y.detach(), *torch.autograd.grad(y, params, gy)])
    assert len(outs[0]) == (4 if bias else 3)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_gradcheck():
    _, stem = module_pair(o=4)
    x = torch.randn(1, 3, 3, 6, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: stem_conv3d(x, w, b, (2, 2, 2), (1, 3, 3)), (x, stem.weight, stem.bias)
    )


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_opcheck(backend):
    x, weight, gy = case(2, 3, 4, 10, 12, 5, **T3D_STEM, seed=2, dtype=torch.float32)
    bias = torch.randn(5)
    s, p = list(T3D_STEM["s"]), list(T3D_STEM["p"])
    args = (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), s, p, backend)
    torch.library.opcheck(torch.ops.t3d.stem_conv3d.default, args)
    torch.library.opcheck(torch.ops.t3d.conv3d_input_grad.default, (gy, weight.detach(), list(x.shape), s, p, backend))


def test_no_input_gradient_is_plain_conv3d():
    """A clip that needs no gradient (training) or a conv the kernel does not take: ATen's conv3d, no custom op."""
    _, stem = module_pair()
    x = torch.randn(1, 3, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(stem(x), F.conv3d(x, stem.weight, stem.bias, stem.stride, stem.padding))
    assert not conv3d_input_grad_applies([1, 3, 4, 4, 4], stem.weight, [1, 1, 1])
    assert not conv3d_input_grad_applies([1, 5, 4, 4, 4], torch.ones(2, 5, 1, 1, 1), [1, 1, 2])


def test_fuse_swaps_conv0_and_keeps_the_state():
    model = t3d_tiny(num_classes=4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model.features.conv0.weight
    tk.fuse(model)
    conv0 = model.features.conv0
    assert isinstance(conv0, StemConv3d) and conv0.weight is weight
    assert model.state_dict().keys() == state.keys()
    # the convs inside the fused modules and every other conv stay nn.Conv3d
    assert sum(isinstance(m, StemConv3d) for m in model.modules()) == 1
    x = torch.randn(1, 3, 16, 32, 32, requires_grad=True)
    model.eval()
    reference = t3d_tiny(num_classes=4).eval()
    reference.load_state_dict(state)
    xr = x.detach().clone().requires_grad_()
    y, yr = model(x), reference(xr)
    torch.testing.assert_close(y, yr, rtol=1e-4, atol=1e-5)
    (g,) = torch.autograd.grad(y.sum(), x)
    (gr,) = torch.autograd.grad(yr.sum(), xr)
    torch.testing.assert_close(g, gr, rtol=1e-4, atol=1e-5)


@needs_kernel
def test_bad_input():
    w = torch.randn(4, 3, 3, 7, 7)
    gy = torch.randn(1, 4, 2, 4, 4)
    with pytest.raises(RuntimeError, match="W stride of 2"):
        kernel(gy, w, (1, 3, 4, 8, 8), (2, 2, 1), (1, 3, 3))
    with pytest.raises(RuntimeError, match="1 to 4 input channels"):
        kernel(torch.randn(1, 4, 2, 4, 4), torch.randn(4, 5, 3, 7, 7), (1, 5, 4, 8, 8), (2, 2, 2), (1, 3, 3))
    with pytest.raises(RuntimeError, match="grad_y: expected size"):
        kernel(torch.randn(1, 4, 3, 4, 4), w, (1, 3, 4, 8, 8), (2, 2, 2), (1, 3, 3))
    with pytest.raises(RuntimeError, match="weight: expected 3 input channels"):
        kernel(gy, torch.randn(4, 2, 3, 7, 7), (1, 3, 4, 8, 8), (2, 2, 2), (1, 3, 3))
    with pytest.raises(RuntimeError, match="dtype"):
        kernel(gy.double(), w, (1, 3, 4, 8, 8), (2, 2, 2), (1, 3, 3))
    with pytest.raises(ValueError, match="x: expected a 5-D tensor"):
        stem_conv3d(torch.randn(3, 8, 8), w)
    with pytest.raises(ValueError, match="weight: expected a 5-D tensor"):
        stem_conv3d(torch.randn(1, 2, 4, 8, 8), w)
    with pytest.raises(ValueError, match="conv: expected an nn.Conv3d with 1-4 input channels"):
        StemConv3d.from_conv(nn.Conv3d(8, 4, 3, stride=2))
