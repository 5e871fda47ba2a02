"""BatchNorm pieces shared by the fused ops: folding, statistics, BN(-ReLU) backward, running-statistics update.

Per-channel statistics and backward sums are computed in float64 whatever the input dtype (they are (C,) vectors:
the cost is nothing, and a float32 sum over N*T*H*W positions loses digits the reference keeps); elementwise work
stays in the input's dtype. Shapes: x (N, C, T, H, W); every per-channel vector (C,).

Under autocast x is float16/bfloat16 while the BN parameters and statistics stay float32: elementwise results are
computed in the wider dtype (PyTorch's type promotion) and stored in x's dtype, parameter gradients in theirs.
"""

from __future__ import annotations

import torch

__all__ = [
    "affine_correction",
    "apply_correction",
    "bn_backward",
    "bn_relu",
    "bn_relu_backward",
    "channel_stats",
    "channel_sums",
    "fold_bn",
    "update_running_stats",
]

_VIEW = (1, -1, 1, 1, 1)
_REDUCE = (0, 2, 3, 4)


def fold_bn(
    weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BN folded into ``relu(x * scale + shift)``: (scale, shift) in the parameters' dtype, and invstd.

    Computed in the wider of the statistics' and the parameters' dtypes (the dense block passes float64
    statistics; the TTL its input's dtype), invstd returned in that dtype."""
    acc = torch.promote_types(var.dtype, weight.dtype)
    invstd = torch.rsqrt(var.to(acc) + eps)
    scale = weight.to(acc) * invstd
    shift = bias.to(acc) - mean.to(acc) * scale
    return scale.to(weight.dtype), shift.to(weight.dtype), invstd


def bn_relu(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """relu(x * scale + shift) with per-channel (C,) scale and shift, in x's dtype."""
    return torch.relu(x * scale.view(_VIEW) + shift.view(_VIEW)).to(x.dtype)


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Biased batch mean and variance per channel of x, in float64: (N, C, T, H, W) -> (C,), (C,)."""
    var, mean = torch.var_mean(x.double(), dim=_REDUCE, unbiased=False)
    return mean, var


def channel_sums(
    grad_pre: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum dy, sum dy * xhat) per channel in float64, with dy = dL/d(BN output) and xhat = (x - mean) * invstd."""
    xhat = (x.double() - mean.double().view(_VIEW)) * invstd.double().view(_VIEW)
    return grad_pre.double().sum(_REDUCE), (grad_pre.double() * xhat).sum(_REDUCE)


def affine_correction(
    scale: torch.Tensor,
    invstd: torch.Tensor,
    mean: torch.Tensor,
    sum_g: torch.Tensor,
    sum_gx: torch.Tensor,
    count: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, beta), float64: training-mode BN backward is ``dL/dx = scale * dy + alpha + beta * x`` per channel,
    the batch statistics' share of the gradient (csrc/common/dense_block_math.h ``bn_backward_affine``)."""
    scale, invstd, mean = scale.double(), invstd.double(), mean.double()
    alpha = scale * (invstd * mean * sum_gx - sum_g) / count
    beta = -scale * invstd * sum_gx / count
    return alpha, beta


def bn_backward(
    grad_pre: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    training: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BN backward from dy = dL/d(BN output): (dL/dx in x's dtype, grad weight, grad bias in scale's dtype).

    ``training``: mean/var were x's batch statistics (their dependence on x joins the gradient), else constants.
    """
    sum_g, sum_gx = channel_sums(grad_pre, x, mean, invstd)
    grad_x = grad_pre * scale.view(_VIEW)
    if training:
        alpha, beta = affine_correction(scale, invstd, mean, sum_g, sum_gx, x.numel() // x.shape[1])
        grad_x = grad_x + (alpha.view(_VIEW) + beta.view(_VIEW) * x.double()).to(grad_x.dtype)
    return grad_x.to(x.dtype), sum_gx.to(scale.dtype), sum_g.to(scale.dtype)


def bn_relu_backward(
    grad_z: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    training: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of z = relu(bn(x)) from dL/dz, the ReLU mask recomputed from x: as :func:`bn_backward`."""
    grad_pre = grad_z * ((x * scale.view(_VIEW) + shift.view(_VIEW)) > 0)
    return bn_backward(grad_pre, x, scale, mean, invstd, training)


def apply_correction(
    grad_x: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    invstd: torch.Tensor,
    mean: torch.Tensor,
    sum_g: torch.Tensor,
    sum_gx: torch.Tensor,
    count: int,
) -> torch.Tensor:
    """grad_x + alpha + beta * x (:func:`affine_correction`): an eval-mode BN gradient (``scale * dy``) made the
    training-mode one from the sums and count of the whole batch (synchronised BN: of every process)."""
    alpha, beta = affine_correction(scale, invstd, mean, sum_g, sum_gx, count)
    return (grad_x + alpha.view(_VIEW) + beta.view(_VIEW) * x.double()).to(grad_x.dtype)


def update_running_stats(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    count: int,
    momentum: float,
) -> None:
    """running = (1 - momentum) * running + momentum * batch, with the unbiased batch variance, in place, as ATen's
    batch_norm writes it. ``mean``/``var``: the biased batch statistics (any float dtype: under autocast they may
    come in the compute dtype; the buffers keep theirs)."""
    with torch.no_grad():
        unbias = count / max(count - 1, 1)
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_((var.double() * unbias).to(running_var.dtype), alpha=momentum)
