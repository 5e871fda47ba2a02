"""The fused stem (BN -> ReLU -> MaxPool3d) in PyTorch ops: the ``composite`` backend of ``t3d::bn_relu_maxpool`` and
the deterministic max-pool backward it shares with ``t3d.models.DeterministicMaxPool3d``.

Shapes: x (N, C, T, H, W); kernel/stride/padding 3 ints each (T, H, W); per-channel vectors (C,).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import bn

__all__ = ["forward", "backward", "max_pool3d_gather_backward"]


def forward(x, bn_weight, bn_bias, mean, var, kernel_size, stride, padding, eps):
    """max_pool3d(relu(x * scale + shift)) with BN folded from (mean, var)."""
    scale, shift, _ = bn.fold_bn(bn_weight, bn_bias, mean, var, eps)
    return F.max_pool3d(bn.bn_relu(x, scale, shift), kernel_size, stride, padding)


def max_pool3d_gather_backward(
    grad_out: torch.Tensor,
    indices: torch.Tensor,
    input_shape: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
) -> torch.Tensor:
    """Gradient of ``max_pool3d``'s input (N, C, T, H, W) from ``grad_out`` and ``indices`` (N, C, T', H', W'; flat
    in T*H*W), as a *gather*: deterministic on every device (no atomics), and equal bit for bit to PyTorch's CPU
    kernel (same order of additions).

    For a kernel offset k, input position p belongs to the window of output o = (p + pad - k) / stride when that is
    an integer: the positions with one residue mod the stride, a strided slice of the input, see a contiguous range
    of outputs. Visiting the offsets from the last to the first visits each position's outputs in increasing
    (t', h', w') order, the order of PyTorch's CPU kernel.
    """
    size = tuple(int(s) for s in input_shape[2:])
    grad_in = torch.zeros(tuple(input_shape), dtype=grad_out.dtype, device=grad_out.device)
    # outputs outside the grid read as "no gradient, no winner": pad by a kernel on each side
    pads = [int(k) for k in reversed(kernel) for _ in (0, 1)]
    g_pad = F.pad(grad_out, pads)
    i_pad = F.pad(indices, pads, value=-1)
    flat = torch.arange(size[0] * size[1] * size[2], device=grad_out.device).view(size)
    for offset in itertools.product(*(range(k - 1, -1, -1) for k in kernel)):
        starts, outs = [], []
        for d in range(3):
            first = (offset[d] - padding[d]) % stride[d]  # first input index whose window includes this offset
            count = len(range(first, size[d], stride[d]))
            if count == 0:
                break
            o_first = (first + padding[d] - offset[d]) // stride[d]
            starts.append(first)
            outs.append(slice(o_first + kernel[d], o_first + kernel[d] + count))
        else:
            slices = tuple(slice(s, None, st) for s, st in zip(starts, stride))
            won = i_pad[(..., *outs)] == flat[slices]
            grad_in[(..., *slices)] += torch.where(won, g_pad[(..., *outs)], 0)
    return grad_in


def backward(grad_y, x, bn_weight, bn_bias, mean, var, kernel_size, stride, padding, training, eps):
    """(grad_x, grad_bn_weight, grad_bn_bias): the argmax recomputed, the pool's gradient gathered (deterministic),
    ReLU's mask, then BN backward (batch statistics' share included when ``training``)."""
    scale, shift, invstd = bn.fold_bn(bn_weight, bn_bias, mean, var, eps)
    z = bn.bn_relu(x, scale, shift)
    y, idx = F.max_pool3d(z, kernel_size, stride, padding, return_indices=True)
    grad_z = max_pool3d_gather_backward(grad_y * (y > 0), idx, x.shape, kernel_size, stride, padding)
    return bn.bn_backward(grad_z, x, scale, mean, invstd, training)
