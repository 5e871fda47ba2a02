"""The fused stem op ``t3d::bn_relu_maxpool``: ``max_pool3d(relu(batch_norm(x)), kernel, stride, padding)``.

T3D's stem runs ``conv0 -> norm0 -> relu0 -> pool0``; in eager PyTorch the last three are three memory-bound passes
that save the BN output, the ReLU output and int64 pool indices for backward. The fused op reads x once in forward
and saves only x; backward recomputes the argmax and reduces the BN-backward sums without a dense gradient, then
writes grad_x in one pass. Backward is deterministic on every backend (no atomics): the ``composite`` backend
gathers (:func:`max_pool3d_gather_backward`), which also gives CUDA a deterministic pool backward.

Like ``t3d::ttl`` the op is functional: it returns ``(y, mean, var)`` (batch statistics in training, the running
statistics in eval) and :func:`bn_relu_maxpool` updates the running statistics as ``F.batch_norm`` does.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import _ext
from ..backends import resolve
from ._checks import check_bn, check_input
from .ttl import _batch_stats, _bn_backward, _fold_bn

__all__ = ["bn_relu_maxpool", "max_pool3d_gather_backward", "pool_output_shape"]


def _triple(name: str, v: int | Sequence[int]) -> list[int]:
    vals = [int(v)] * 3 if isinstance(v, int) else [int(u) for u in v]
    if len(vals) != 3:
        raise ValueError(f"{name}: expected an int or 3 ints (T, H, W), got {v!r}")
    return vals


def pool_output_shape(x_shape: Sequence[int], kernel_size, stride, padding) -> list[int]:
    n, c, *dims = x_shape
    return [n, c] + [(d + 2 * p - k) // s + 1 for d, k, s, p in zip(dims, kernel_size, stride, padding)]


# --------------------------------------------------------------------------------------------------------
# composite backend (any device): the executable spec of the fused kernels
# --------------------------------------------------------------------------------------------------------


def _z(x, bn_weight, bn_bias, mean, var, eps):
    scale, shift, invstd = _fold_bn(bn_weight, bn_bias, mean, var, eps)
    view = (1, -1, 1, 1, 1)
    return torch.relu(x * scale.view(view) + shift.view(view)), invstd


def _composite_forward(x, bn_weight, bn_bias, mean, var, kernel_size, stride, padding, eps):
    z, _ = _z(x, bn_weight, bn_bias, mean, var, eps)
    return F.max_pool3d(z, kernel_size, stride, padding)


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


def _composite_backward(grad_y, x, bn_weight, bn_bias, mean, var, kernel_size, stride, padding, training, eps):
    z, invstd = _z(x, bn_weight, bn_bias, mean, var, eps)
    y, idx = F.max_pool3d(z, kernel_size, stride, padding, return_indices=True)
    grad_z = max_pool3d_gather_backward(grad_y * (y > 0), idx, x.shape, kernel_size, stride, padding)
    return _bn_backward(grad_z, x, bn_weight, mean, invstd, training)


def _compiled_forward(
    x, bn_weight, bn_bias, running_mean, running_var, kernel_size, stride, padding, training, eps, save_indices
):
    return _ext.load().bn_relu_maxpool_forward(
        x, bn_weight, bn_bias, running_mean, running_var, kernel_size, stride, padding, training, eps, save_indices
    )


def _compiled_backward(
    grad_y, x, bn_weight, bn_bias, mean, var, y, indices, kernel_size, stride, padding, training, eps
):
    return _ext.load().bn_relu_maxpool_backward(
        grad_y, x, bn_weight, bn_bias, mean, var, y, indices, kernel_size, stride, padding, training, eps
    )


def _indices_shape(x_shape, kernel_size, stride, padding, save_indices, backend) -> list[int]:
    # only the compiled kernel saves the indices of the maxima; the composite backward recomputes them
    return pool_output_shape(x_shape, kernel_size, stride, padding) if save_indices and backend == "cpu" else [0]


# --------------------------------------------------------------------------------------------------------
# registered ops
# --------------------------------------------------------------------------------------------------------


@torch.library.custom_op("t3d::bn_relu_maxpool", mutates_args=())
def _op(
    x: torch.Tensor,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    training: bool,
    eps: float,
    save_indices: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, var, indices): the batch statistics in training (the running ones in eval); int32 indices of the
    maxima in each (T, H, W) volume where the backend's backward uses them, else an empty tensor."""
    if backend == "cpu":
        return _compiled_forward(
            x, bn_weight, bn_bias, running_mean, running_var, kernel_size, stride, padding, training, eps, save_indices
        )
    mean, var = _batch_stats(x, training, running_mean, running_var, backend)
    y = _composite_forward(x, bn_weight, bn_bias, mean, var, kernel_size, stride, padding, eps)
    return y, mean, var, x.new_empty(0, dtype=torch.int32)


@_op.register_fake
def _(
    x, bn_weight, bn_bias, running_mean, running_var, kernel_size, stride, padding, training, eps, save_indices, backend
):
    y = x.new_empty(pool_output_shape(x.shape, kernel_size, stride, padding))
    indices = x.new_empty(
        _indices_shape(x.shape, kernel_size, stride, padding, save_indices, backend), dtype=torch.int32
    )
    return y, running_mean.new_empty(running_mean.shape), running_var.new_empty(running_var.shape), indices


@torch.library.custom_op("t3d::bn_relu_maxpool_backward", mutates_args=())
def _backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    y: torch.Tensor,
    indices: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    training: bool,
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_y = grad_y.contiguous()
    if backend == "cpu":
        grad_x, grad_w, grad_b = _compiled_backward(
            grad_y, x, bn_weight, bn_bias, mean, var, y, indices, kernel_size, stride, padding, training, eps
        )
    else:
        grad_x, grad_w, grad_b = _composite_backward(
            grad_y, x, bn_weight, bn_bias, mean, var, kernel_size, stride, padding, training, eps
        )
    return grad_x, grad_w, grad_b


@_backward_op.register_fake
def _(grad_y, x, bn_weight, bn_bias, mean, var, y, indices, kernel_size, stride, padding, training, eps, backend):
    return torch.empty_like(x), torch.empty_like(bn_weight), torch.empty_like(bn_bias)


def _setup_context(ctx, inputs, output):
    x, bn_weight, bn_bias, _, _, kernel_size, stride, padding, training, eps, _, backend = inputs
    y, mean, var, indices = output
    ctx.mark_non_differentiable(mean, var, indices)
    ctx.save_for_backward(x, bn_weight, bn_bias, mean, var, y, indices)
    ctx.args = (kernel_size, stride, padding, training, eps, backend)


def _backward(ctx, grad_y, grad_mean, grad_var, grad_indices):
    grad_x, grad_w, grad_b = torch.ops.t3d.bn_relu_maxpool_backward(grad_y, *ctx.saved_tensors, *ctx.args)
    return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None, None


_op.register_autograd(_backward, setup_context=_setup_context)


def bn_relu_maxpool(
    x: torch.Tensor,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    kernel_size: int | Sequence[int] = 3,
    stride: int | Sequence[int] = (1, 2, 2),
    padding: int | Sequence[int] = 1,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    backend: str = "auto",
) -> torch.Tensor:
    """``max_pool3d(relu(batch_norm(x)), kernel_size, stride, padding)`` in one fused op; same contract as
    :func:`t3d_kernels.reference.bn_relu_maxpool`.

    x: (N, C, T, H, W); bn_*: (C,). Returns (N, C, To, Ho, Wo) with PyTorch's pooling sizes (floor mode). In
    training the batch statistics normalize x and the running statistics are updated in place.
    """
    check_input(x)
    check_bn("bn_", x, x.shape[1], bn_weight, bn_bias, running_mean, running_var)
    kernel_size, stride, padding = (
        _triple("kernel_size", kernel_size),
        _triple("stride", stride),
        _triple("padding", padding),
    )
    if min(kernel_size) < 1 or min(stride) < 1:
        raise ValueError(f"kernel_size, stride: expected values >= 1, got {kernel_size}, {stride}")
    if any(p < 0 or 2 * p > k for p, k in zip(padding, kernel_size)):
        raise ValueError(f"padding: expected 0 <= padding <= kernel_size / 2, got {padding} for {kernel_size}")
    out = pool_output_shape(x.shape, kernel_size, stride, padding)
    if min(out[2:]) < 1:
        raise ValueError(f"x: spatial size {tuple(x.shape[2:])} is too small for kernel_size {kernel_size}")
    if training and x.numel() == x.shape[1]:
        raise ValueError(f"x: expected more than 1 value per channel when training, got shape {tuple(x.shape)}")
    name = resolve("bn_relu_maxpool", backend, x.device)
    if name == "reference":
        from .. import reference

        return reference.bn_relu_maxpool(
            x, bn_weight, bn_bias, running_mean, running_var, kernel_size, stride, padding, training, momentum, eps
        )
    save_indices = torch.is_grad_enabled() and any(t.requires_grad for t in (x, bn_weight, bn_bias))
    y, mean, var, _ = torch.ops.t3d.bn_relu_maxpool(
        x,
        bn_weight,
        bn_bias,
        running_mean,
        running_var,
        kernel_size,
        stride,
        padding,
        training,
        eps,
        save_indices,
        name,
    )
    if training:
        with torch.no_grad():
            count = x.numel() // x.shape[1]
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_(var.to(running_var.dtype) * (count / max(count - 1, 1)), momentum)
    return y
