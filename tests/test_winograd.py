"""The CPU Winograd F(2x2x2, 3x3x3) convolution (csrc/cpu/winograd_conv3d.cpp) against float64 conv3d, alone and
inside the dense block's conv2 (forward and input gradient), with PyTorch's own float32 error as the yardstick."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _tolerance import EPS32, check_backend, fuzz_examples
from hypothesis import example, given, settings
from hypothesis import strategies as st

from t3d_kernels import testing

_C = pytest.importorskip("t3d_kernels._C")
pytestmark = pytest.mark.skipif(
    not hasattr(_C, "_winograd_conv3x3x3")
    or not _C._winograd_applies(torch.ones(1, 1, 1, 1, 1), torch.ones(1, 1, 3, 3, 3)),
    reason="the Winograd conv needs the compiled extension and an AVX-512 CPU",
)


def _check(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> None:
    exact = F.conv3d(x.double(), w.double(), padding=1)
    own = F.conv3d(x, w, padding=1).double()  # PyTorch's float32 error on the same values
    got = _C._winograd_conv3x3x3(x, w, out)
    if out is not None:
        assert got.data_ptr() == out.data_ptr()
    assert got.shape == exact.shape and got.dtype == torch.float32
    err = (got.double() - exact).abs().max().item()
    # beyond twice PyTorch's own error, one unit of rounding at the scale of Winograd's error bound,
    # max|x| * max_k sum|w[k]| (its transforms add and subtract every tap of a 4x4x4 patch before the output
    # transform cancels most of them: where the output cancels too, e.g. one input pixel, y = x * w[1, 1, 1] exact
    # for PyTorch, the error is that of the taps). Measured over 300 random shapes: at most 0.45 of it in all,
    # 0.02 beyond twice PyTorch's; a wrong tap or tile errs by O(1) of it.
    scale = x.abs().max().item() * w.abs().sum(dim=(1, 2, 3, 4)).max().item()
    bound = 2 * (own - exact).abs().max().item() + EPS32 * scale
    assert err <= bound, f"x {tuple(x.shape)} w {tuple(w.shape)}: max error {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize(
    "n,c,k,t,h,w",
    [
        (1, 1, 1, 1, 1, 1),  # one tile, all of it padding but the centre
        (1, 3, 2, 2, 2, 2),
        (2, 5, 7, 3, 4, 5),  # odd sizes: clipped tiles at every far edge
        (1, 33, 13, 4, 6, 7),  # a second pass of input channels (32 per pass); 12 + 1 output channels per tile
        (3, 17, 40, 5, 3, 9),  # blocks across samples and rows
        (1, 8, 16, 2, 5, 35),  # rows of more than 16 tiles (two pieces per row)
        (1, 70, 25, 3, 7, 33),
    ],
)
def test_matches_float64_conv3d(n, c, k, t, h, w):
    gen = torch.Generator().manual_seed(n * 1000 + c * 10 + k)
    _check(torch.randn(n, c, t, h, w, generator=gen), torch.randn(k, c, 3, 3, 3, generator=gen))


@settings(max_examples=fuzz_examples(20))
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 70),
    k=st.integers(1, 40),
    thw=st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 40)),
    seed=st.integers(0, 2**16),
)
@example(n=1, c=1, k=1, thw=(1, 1, 1), seed=0)
def test_fuzz_matches_float64_conv3d(n, c, k, thw, seed):
    gen = torch.Generator().manual_seed(seed)
    _check(torch.randn(n, c, *thw, generator=gen), torch.randn(k, c, 3, 3, 3, generator=gen))


def test_channel_slices_in_and_out():
    """Input and output samples at a stride (channel slices of bigger tensors: the dense block writes each layer's
    new channels straight into its concatenated output)."""
    gen = torch.Generator().manual_seed(1)
    big_x = torch.randn(2, 12, 3, 5, 6, generator=gen)
    w = torch.randn(4, 5, 3, 3, 3, generator=gen)
    big_y = torch.full((2, 9, 3, 5, 6), float("nan"))
    out = big_y.narrow(1, 2, 4)
    _check(big_x.narrow(1, 3, 5), w, out)
    assert torch.isnan(big_y[:, :2]).all() and torch.isnan(big_y[:, 6:]).all()  # nothing outside the slice


def test_what_it_takes_and_when_it_pays():
    w = torch.ones(4, 8, 3, 3, 3)
    assert _C._winograd_applies(torch.ones(1, 8, 2, 2, 2), w)
    assert not _C._winograd_applies(torch.ones(1, 8, 2, 2, 2, dtype=torch.float64), w.double())
    assert not _C._winograd_applies(torch.ones(1, 8, 2, 2, 2), torch.ones(4, 8, 1, 3, 3))
    assert not _C._winograd_applies(torch.ones(1, 8, 2, 2, 4).transpose(3, 4), w)
    avx512 = _C.cpu_isa() == "avx512"  # the thresholds were measured per instruction set (winograd_conv3d.cpp)
    assert not _C._winograd_pays(torch.ones(1, 8, 4, 7, 7), w)  # 32 tiles: oneDNN is faster
    assert _C._winograd_pays(torch.ones(1, 8, 16, 28, 28), w)  # 1,568 tiles
    assert _C._winograd_pays(torch.ones(2, 8, 8, 14, 14), w)  # 392 tiles in rows of 7
    assert _C._winograd_pays(torch.ones(1, 8, 8, 14, 14), w) == (not avx512)  # 196 tiles: AVX2 from 192
    assert not _C._winograd_pays(torch.ones(8, 8, 4, 7, 7), w)  # 256 tiles, but in rows of 4
    # the weight gradient: AVX-512 from 768 tiles where the forward pays, AVX2 from 64 tiles in rows of any length
    gw = w.narrow(0, 0, 4)

    def grad_weight_pays(shape):
        return _C._winograd_grad_weight_pays(torch.ones(shape), torch.ones(shape[0], 4, *shape[2:]), gw)

    assert grad_weight_pays((4, 8, 8, 14, 14))  # 784 tiles
    assert grad_weight_pays((2, 8, 8, 14, 14)) == (not avx512)  # 392
    assert grad_weight_pays((2, 8, 4, 7, 7)) == (not avx512)  # 64 tiles in rows of 4
    assert not grad_weight_pays((1, 8, 4, 7, 7))  # 32
    with pytest.raises(RuntimeError, match="out: expected a float32 tensor of shape"):
        _C._winograd_conv3x3x3(torch.ones(1, 8, 2, 2, 2), w, torch.empty(1, 4, 2, 2, 3))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(1, 4, 8, 32, 32), (2, 5, 6, 16, 33)], ids=["b1", "b2"])
def test_dense_block_through_winograd(shape, training):
    """The cpu dense block with enough output tiles for conv2 (forward and input gradient) to go through Winograd:
    output, every gradient and the running statistics against the float64 reference."""
    n, _, t, h, w = shape
    sample = testing.dense_block_input(shape, 2, 4, 2, training=training, seed=5)
    bott = 2 * 4
    assert _C._winograd_pays(torch.ones(n, bott, t, h, w), torch.ones(4, bott, 3, 3, 3))  # conv2 forward
    assert _C._winograd_pays(torch.ones(n, 4, t, h, w), torch.ones(bott, 4, 3, 3, 3))  # its input gradient
    assert _C._winograd_grad_weight_pays(  # and its weight gradient
        torch.ones(n, bott, t, h, w), torch.ones(n, 4, t, h, w), torch.ones(4, bott, 3, 3, 3)
    )
    failures = check_backend(sample, "cpu", "cpu", torch.float32, steps=2)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    "shape",
    [(1, 16, 8, 3, 5, 7), (2, 5, 3, 3, 5, 7), (1, 8, 17, 5, 9, 33), (3, 33, 40, 2, 2, 2), (1, 3, 1, 1, 1, 1)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_grad_weight_against_float64(shape):
    """The Winograd weight gradient (dense block conv2's, from kMinGradWeightTiles) against ATen's in float64: within
    twice PyTorch's own float32 error plus one ulp at max|x|*sum|grad_y| of each output channel's scale."""
    n, c, k, t, h, w = shape
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(n, c, t, h, w, generator=gen)
    gy = torch.randn(n, k, t, h, w, generator=gen)

    def aten_grad_weight(x, gy):
        weight = torch.zeros(k, c, 3, 3, 3, dtype=x.dtype)
        return torch.ops.aten.convolution_backward(
            gy, x, weight, None, [1] * 3, [1] * 3, [1] * 3, False, [0] * 3, 1, [False, True, False]
        )[1]

    exact = aten_grad_weight(x.double(), gy.double())
    torch_err = (aten_grad_weight(x, gy).double() - exact).abs().max().item()
    scale = x.abs().max().item() * gy.abs().sum(dim=(0, 2, 3, 4)).max().item()
    dw = _C._winograd_conv3x3x3_grad_weight(x, gy)
    assert dw.shape == (k, c, 3, 3, 3) and dw.dtype == torch.float32
    err = (dw.double() - exact).abs().max().item()
    assert err <= 2 * torch_err + scale * torch.finfo(torch.float32).eps, (err, torch_err, scale)


def test_grad_weight_of_channel_slices_and_bad_input():
    """Samples that are channel slices of bigger tensors (the dense block's buffers) give the same result as contiguous
    copies; a wrong grad_y shape is a clear error."""
    gen = torch.Generator().manual_seed(3)
    big_x = torch.randn(2, 12, 4, 6, 9, generator=gen)
    big_g = torch.randn(2, 10, 4, 6, 9, generator=gen)
    x, gy = big_x[:, 2:9], big_g[:, 3:8]
    torch.testing.assert_close(
        _C._winograd_conv3x3x3_grad_weight(x, gy), _C._winograd_conv3x3x3_grad_weight(x.contiguous(), gy.contiguous())
    )
    w = torch.ones(5, 7, 3, 3, 3)
    assert not _C._winograd_grad_weight_pays(x, gy, w)  # 2 x 2 x 3 x 5 tiles
    assert _C._winograd_grad_weight_pays(torch.ones(1, 7, 16, 28, 28), torch.ones(1, 5, 16, 28, 28), w)
    assert not _C._winograd_grad_weight_pays(torch.ones(1, 7, 16, 28, 28), torch.ones(1, 5, 16, 28, 27), w)
    with pytest.raises(RuntimeError, match="winograd_conv3x3x3_grad_weight: expected"):
        _C._winograd_conv3x3x3_grad_weight(x, big_g[:, :, :3])
