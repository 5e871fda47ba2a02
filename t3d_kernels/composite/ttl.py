"""The pool-first TTL in PyTorch ops (docs/design.md, "The pool-first algebra"): the ``composite`` backend of
``t3d::ttl`` and the executable specification of the backward algebra the C++/CUDA/Triton kernels implement.

``avgpool2(conv_W(z)) == conv_W(box(z), stride 2)``: one box-filtered, zero-padded source serves every branch (the
branches differ only by an offset into it), each branch is one stride-2 conv, nothing of the input's size but the
source is written. Backward recomputes the source.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..geometry import ttl_output_shape, ttl_padding
from .bn import bn_backward, bn_relu, fold_bn
from .conv import conv3d_backward

__all__ = ["backward", "forward"]


def _source(x, scale, shift, weights, pool):
    """(z, src, views, stride): z = relu(bn(x)); src = box(zero-padded z) when pooling, else the padded z; views
    are the (t0, h0, w0, t1, h1, w1) window of src that each branch's conv reads."""
    pad = ttl_padding(weights)
    z = bn_relu(x, scale, shift)
    extra = 1 if pool else 0  # one more zero at the end of every dim feeds the 2-window of the last position
    zp = F.pad(z, (pad.w, pad.w + extra, pad.h, pad.h + extra, pad.front, pad.back + extra))
    # the box filter's mean in float32 or wider (no bfloat16 avg_pool3d on CPU), stored in z's dtype
    src = F.avg_pool3d(zp.to(torch.promote_types(zp.dtype, torch.float32)), 2, stride=1).to(zp.dtype) if pool else zp
    t_out, h_out, w_out = ttl_output_shape(x.shape, weights, pool)[2:]
    stride = 2 if pool else 1
    views = []
    for w, (f, _) in zip(weights, pad.branches):
        depth, kh, kw = w.shape[2:]
        t0, h0, w0 = pad.front - f, pad.h - kh // 2, pad.w - kw // 2
        views.append(
            (
                t0,
                h0,
                w0,
                t0 + stride * (t_out - 1) + depth,
                h0 + stride * (h_out - 1) + kh,
                w0 + stride * (w_out - 1) + kw,
            )
        )
    return z, src, views, stride


def forward(
    x: torch.Tensor,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weights: Sequence[torch.Tensor],
    pool: bool,
    eps: float,
) -> torch.Tensor:
    """TTL forward with the given BN statistics (C_in,): x (N, C_in, T, H, W) -> (N, sum C_i, T', H', W')."""
    scale, shift, _ = fold_bn(bn_weight, bn_bias, mean, var, eps)
    _, src, views, stride = _source(x, scale, shift, weights, pool)
    outs = [
        F.conv3d(src[:, :, t0:t1, h0:h1, w0:w1], w, stride=stride)
        for w, (t0, h0, w0, t1, h1, w1) in zip(weights, views)
    ]
    return torch.cat(outs, 1)


def backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weights: Sequence[torch.Tensor],
    pool: bool,
    training: bool,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Gradients of :func:`forward`: (grad_x, grad_bn_weight, grad_bn_bias, [grad_weights[i]]).

    ``training``: mean/var are x's batch statistics (BN backward includes their dependence on x), else constants.
    """
    scale, shift, invstd = fold_bn(bn_weight, bn_bias, mean, var, eps)
    z, src, views, stride = _source(x, scale, shift, weights, pool)
    pad = ttl_padding(weights)
    # the branches' contributions meet in float32 or wider (float16/bfloat16 inputs under autocast)
    grad_src = torch.zeros_like(src, dtype=torch.promote_types(src.dtype, torch.float32))
    grad_weights = []
    c0 = 0
    for w, (t0, h0, w0, t1, h1, w1) in zip(weights, views):
        gy = grad_y[:, c0 : c0 + w.shape[0]]
        c0 += w.shape[0]
        view = src[:, :, t0:t1, h0:h1, w0:w1]
        # stride-2 weight-gradient conv and stride-2 transposed conv over the shared box-filtered tensor
        grad_view, grad_w = conv3d_backward(gy.to(view.dtype), view, w.to(view.dtype), stride=(stride,) * 3)
        grad_weights.append(grad_w)
        grad_src[:, :, t0:t1, h0:h1, w0:w1] += grad_view
    if pool:
        # adjoint of the forward 2-window mean: the backward 2-window mean
        grad_src = F.avg_pool3d(F.pad(grad_src, (1, 1, 1, 1, 1, 1)), 2, stride=1)
    t, h, w_ = x.shape[2:]
    grad_z = grad_src[:, :, pad.front : pad.front + t, pad.h : pad.h + h, pad.w : pad.w + w_]
    grad_x, grad_bn_weight, grad_bn_bias = bn_backward(grad_z * (z > 0), x, scale, mean, invstd, training)
    return grad_x, grad_bn_weight, grad_bn_bias, grad_weights
