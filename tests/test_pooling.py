"""The stem's deterministic max pool (``--deterministic`` on GPUs): its gather backward equals PyTorch's
``max_pool3d`` gradient bit for bit on the CPU (same forward, same indices, same order of the float sums)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from t3d.models import t3d_tiny
from t3d.models.pooling import DeterministicMaxPool3d, max_pool3d_deterministic

GEOMETRIES = [
    ((2, 3, 5, 9, 11), 3, (1, 2, 2), 1),  # T3D's stem pool, odd H and W
    ((1, 2, 4, 7, 6), 2, 2, 0),  # no overlap
    ((2, 2, 6, 8, 8), 3, (2, 1, 2), (1, 0, 1)),  # overlap along H only, uneven padding
    ((1, 1, 3, 3, 3), 3, 1, 1),  # every position in 27 windows
    ((3, 2, 1, 5, 5), (1, 3, 3), (1, 2, 2), (0, 1, 1)),  # a single frame
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,kernel,stride,padding", GEOMETRIES)
def test_gather_backward_equals_max_pool3d_exactly(shape, kernel, stride, padding, dtype):
    torch.manual_seed(0)
    # rounded values: many ties inside windows, so the argmax choice matters too
    x = torch.randn(shape, dtype=dtype).round(decimals=1).requires_grad_()
    expected = F.max_pool3d(x, kernel, stride, padding)
    grad_out = torch.randn_like(expected)
    (expected_grad,) = torch.autograd.grad(expected, x, grad_out)
    y = max_pool3d_deterministic(x, kernel, stride, padding)
    (grad,) = torch.autograd.grad(y, x, grad_out)
    assert torch.equal(y, expected)
    assert grad.dtype == dtype and torch.equal(grad, expected_grad)


def test_module_is_a_max_pool_and_the_stem_uses_it():
    pool = DeterministicMaxPool3d(3, stride=(1, 2, 2), padding=1)
    assert isinstance(pool, nn.MaxPool3d) and not list(pool.state_dict())
    x = torch.randn(1, 2, 4, 6, 6)
    assert torch.equal(pool(x), nn.MaxPool3d(3, stride=(1, 2, 2), padding=1)(x))
    assert isinstance(t3d_tiny().features.pool0, DeterministicMaxPool3d)
    with pytest.raises(ValueError, match=r"x: expected \(N, C, T, H, W\)"):
        max_pool3d_deterministic(torch.randn(2, 4, 4, 4), 3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_backward_is_deterministic_and_equals_the_cpu_gradient():
    torch.manual_seed(0)
    x_cpu = torch.randn(4, 16, 8, 56, 56).round(decimals=1).requires_grad_()
    pool = DeterministicMaxPool3d(3, stride=(1, 2, 2), padding=1)
    grad_out = torch.randn_like(pool(x_cpu))
    (expected,) = torch.autograd.grad(pool(x_cpu), x_cpu, grad_out)
    x = x_cpu.detach().cuda().requires_grad_()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        grads = [torch.autograd.grad(pool(x), x, grad_out.cuda())[0] for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(previous)
    assert all(torch.equal(g, grads[0]) for g in grads)
    assert torch.equal(grads[0].cpu(), expected)
