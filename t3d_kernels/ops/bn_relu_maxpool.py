"""The fused stem op ``t3d::bn_relu_maxpool``: ``max_pool3d(relu(batch_norm(x)), kernel, stride, padding)``.

T3D's stem runs ``conv0 -> norm0 -> relu0 -> pool0``; in eager PyTorch the last three are three memory-bound passes
that save the ReLU output and int64 pool indices for backward. The cpu kernel reads x once in forward (BN-ReLU is
monotone per channel, so it pools x itself and sums the batch statistics in the same pass, then applies BN-ReLU to
the pooled tensor, 4x smaller at the stem's stride (1, 2, 2)), saves y and int32 indices, and writes grad_x once in
backward (csrc/cpu/bn_relu_maxpool_kernel.cpp). Backward is deterministic on every backend (no atomics); the
``composite`` backend gathers (:func:`t3d_kernels.composite.pool.max_pool3d_gather_backward`), which also gives CUDA
a deterministic pool backward: under ``torch.use_deterministic_algorithms(True)`` the reference backend (ATen's
pool, atomic adds on CUDA) refuses CUDA tensors and ``auto`` picks ``composite``.

Like ``t3d::ttl`` the op is functional: it returns ``(y, mean, var, indices)`` (batch statistics in training, the
running statistics in eval) and :func:`bn_relu_maxpool` updates the running statistics as ``F.batch_norm`` does.
Under autocast the op computes in the dtype of its BN parameters (float32): it is memory-bound, and the convolution
after it casts to the autocast dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _ext
from ..backends import Backend, declare, extension_reason, get, resolve
from ..composite import bn, sync
from ..composite import pool as composite_pool
from ._checks import check_bn, check_input, triple

__all__ = ["bn_relu_maxpool", "pool_output_shape"]


def pool_output_shape(x_shape: Sequence[int], kernel_size, stride, padding) -> list[int]:
    n, c, *dims = x_shape
    return [n, c] + [(d + 2 * p - k) // s + 1 for d, k, s, p in zip(dims, kernel_size, stride, padding)]


# --------------------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------------------


def _composite_forward(
    x, bn_weight, bn_bias, running_mean, running_var, kernel_size, stride, padding, training, eps, save_indices
):
    if training:
        mean, var = bn.channel_stats(x)
        mean, var = mean.to(x.dtype), var.to(x.dtype)
    else:
        mean, var = running_mean.clone(), running_var.clone()
    y = composite_pool.forward(x, bn_weight, bn_bias, mean, var, kernel_size, stride, padding, eps)
    return y, mean, var, x.new_empty(0, dtype=torch.int32)  # the composite backward recomputes the argmax


def _composite_backward(
    grad_y, x, bn_weight, bn_bias, mean, var, y, indices, kernel_size, stride, padding, training, eps
):
    return composite_pool.backward(
        grad_y, x, bn_weight, bn_bias, mean, var, kernel_size, stride, padding, training, eps
    )


def _compiled_forward(*args):
    return _ext.load().bn_relu_maxpool_forward(*args)


def _compiled_backward(*args):
    return _ext.load().bn_relu_maxpool_backward(*args)


def _reference(x, bn_weight, bn_bias, running_mean, running_var, kernel_size, stride, padding, training, momentum, eps):
    from .. import reference  # the reference backend: the ground truth, autograd by PyTorch

    return reference.bn_relu_maxpool(
        x, bn_weight, bn_bias, running_mean, running_var, kernel_size, stride, padding, training, momentum, eps
    )


def _reference_reasons(device: torch.device, dtype: torch.dtype | None) -> list[str]:
    if device.type != "cpu" and torch.are_deterministic_algorithms_enabled():
        return [f"max_pool3d's {device.type} backward adds with atomics (not deterministic)"]
    return []


declare(
    "bn_relu_maxpool",
    [
        Backend("reference", reasons=_reference_reasons, impl={"direct": _reference}),
        Backend("composite", impl={"forward": _composite_forward, "backward": _composite_backward}, process_group=True),
        Backend(
            "cpu",
            ("cpu",),
            frozenset((torch.float32, torch.float64)),
            extension_reason("bn_relu_maxpool_forward"),
            impl={"forward": _compiled_forward, "backward": _compiled_backward},
            process_group=True,
        ),
    ],
    # on CUDA ATen's pool (reference) until a GPU kernel is measured; composite where determinism is asked for
    auto={"cpu": ("cpu", "composite", "reference"), "default": ("reference", "composite")},
    autocast={"cpu": (torch.float16, torch.bfloat16), "cuda": (torch.float16, torch.bfloat16)},
)


def _indices_shape(x_shape, kernel_size, stride, padding, save_indices, backend) -> list[int]:
    # only the compiled kernel saves the indices of the maxima
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
    group: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, var, indices): the batch statistics in training (the group's with ``group``, the running ones in
    eval); int32 indices of the maxima in each (T, H, W) volume where the backend's backward uses them, else an
    empty tensor."""
    forward = get("bn_relu_maxpool", backend).impl["forward"]
    if training and group:  # the group's statistics, then the kernel's eval form over them
        mean, var = bn.channel_stats(x)
        mean, var = sync.merge_stats(mean, var, x.numel() // x.shape[1], group)
        mean, var = mean.to(running_mean.dtype), var.to(running_var.dtype)
        y, _, _, indices = forward(
            x, bn_weight, bn_bias, mean, var, kernel_size, stride, padding, False, eps, save_indices
        )
        return y, mean, var, indices
    return forward(
        x, bn_weight, bn_bias, running_mean, running_var, kernel_size, stride, padding, training, eps, save_indices
    )


@_op.register_fake
def _(
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
    backend,
    group,
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
    group: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    synced = training and bool(group)
    grad_x, grad_w, grad_b = get("bn_relu_maxpool", backend).impl["backward"](
        grad_y.contiguous(),
        x,
        bn_weight,
        bn_bias,
        mean,
        var,
        y,
        indices,
        kernel_size,
        stride,
        padding,
        training and not synced,
        eps,
    )
    if synced:  # eval form scale * dy, plus the batch statistics' share from the group's sums
        sum_g, sum_gx = sync.all_reduce_sums([grad_b, grad_w], group)
        scale, _, invstd = bn.fold_bn(bn_weight, bn_bias, mean, var, eps)
        count = sync.total_count(x.numel() // x.shape[1], x.device, group)
        grad_x = bn.apply_correction(grad_x, x, scale, invstd, mean, sum_g, sum_gx, count)
    return grad_x, grad_w, grad_b


@_backward_op.register_fake
def _(
    grad_y, x, bn_weight, bn_bias, mean, var, y, indices, kernel_size, stride, padding, training, eps, backend, group
):
    return torch.empty_like(x), torch.empty_like(bn_weight), torch.empty_like(bn_bias)


def _setup_context(ctx, inputs, output):
    x, bn_weight, bn_bias, _, _, kernel_size, stride, padding, training, eps, _, backend, group = inputs
    y, mean, var, indices = output
    ctx.mark_non_differentiable(mean, var, indices)
    ctx.save_for_backward(x, bn_weight, bn_bias, mean, var, y, indices)
    ctx.args = (kernel_size, stride, padding, training, eps, backend, group)


def _backward(ctx, grad_y, grad_mean, grad_var, grad_indices):
    grad_x, grad_w, grad_b = torch.ops.t3d.bn_relu_maxpool_backward(grad_y, *ctx.saved_tensors, *ctx.args)
    return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None, None, None


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
    process_group: torch.distributed.ProcessGroup | None = None,
) -> torch.Tensor:
    """``max_pool3d(relu(batch_norm(x)), kernel_size, stride, padding)`` in one fused op; same contract as
    :func:`t3d_kernels.reference.bn_relu_maxpool`.

    x: (N, C, T, H, W); bn_*: (C,). Returns (N, C, To, Ho, Wo) with PyTorch's pooling sizes (floor mode). In
    training the batch statistics normalize x and the running statistics are updated in place. ``process_group``: in
    training, synchronise the BN statistics over this group (``nn.SyncBatchNorm``'s numbers).
    """
    check_input(x)
    if torch.is_autocast_enabled(x.device.type) and isinstance(bn_weight, torch.Tensor) and x.dtype != bn_weight.dtype:
        x = x.to(bn_weight.dtype)  # see the module docstring: computed in the parameters' dtype under autocast
    check_bn("bn_", x, x.shape[1], bn_weight, bn_bias, running_mean, running_var)
    kernel_size, stride, padding = (
        triple("kernel_size", kernel_size),
        triple("stride", stride),
        triple("padding", padding),
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
    group = sync.group_name(process_group) if training and process_group is not None else ""
    name = resolve("bn_relu_maxpool", backend, x.device, x.dtype, group=bool(group))
    direct = get("bn_relu_maxpool", name).impl.get("direct")
    if direct is not None:
        return direct(
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
        group,
    )
    if training:
        count = x.numel() // x.shape[1]
        count = sync.total_count(count, x.device, group) if group else count
        bn.update_running_stats(running_mean, running_var, mean, var, count, momentum)
    return y
