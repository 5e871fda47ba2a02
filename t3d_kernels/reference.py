"""Plain-PyTorch reference of every op: the ground truth of the fused kernels.

Runs on any device and dtype; autograd is PyTorch's own. Layout is (N, C, T, H, W).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .geometry import temporal_padding, ttl_padding

__all__ = [
    "temporal_padding",
    "bn_relu",
    "ttl",
    "ttl_pool_first",
    "dense_layer",
    "dense_block",
    "bn_relu_maxpool",
]


def bn_relu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    training: bool,
    momentum: float,
    eps: float,
) -> torch.Tensor:
    """ReLU(BatchNorm(x)); updates the running stats in place when ``training``."""
    return F.relu(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps))


def ttl(
    x: torch.Tensor,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    bn_running_mean: torch.Tensor,
    bn_running_var: torch.Tensor,
    weights: Sequence[torch.Tensor],
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    pool: bool = True,
) -> torch.Tensor:
    """Temporal Transition Layer: shared BN-ReLU, parallel Conv3d branches, concat, AvgPool3d(2).

    x: (N, C_in, T, H, W); weights[i]: (C_i, C_in, d_i, kh_i, kw_i) with odd kh_i, kw_i.
    Branch i pads T with :func:`temporal_padding` (d_i) and H, W by kh_i//2, kw_i//2, so every branch keeps
    (T, H, W). Returns (N, sum C_i, T//2, H//2, W//2), or (N, sum C_i, T, H, W) with ``pool=False``.
    """
    z = bn_relu(x, bn_weight, bn_bias, bn_running_mean, bn_running_var, training, momentum, eps)
    outs = []
    for w in weights:
        depth, kh, kw = w.shape[2:]
        front, back = temporal_padding(depth)
        zp = F.pad(z, (0, 0, 0, 0, front, back))
        outs.append(F.conv3d(zp, w, padding=(0, kh // 2, kw // 2)))
    y = torch.cat(outs, dim=1)
    return F.avg_pool3d(y, 2) if pool else y


def ttl_pool_first(
    x: torch.Tensor,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    bn_running_mean: torch.Tensor,
    bn_running_var: torch.Tensor,
    weights: Sequence[torch.Tensor],
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """The pooled TTL by the pool-first algebra (docs/design.md, "The pool-first algebra"), in plain PyTorch ops.

    ``avgpool2(conv_W(z)) == conv_W(box(z), stride 2)`` where box is the forward 2x2x2 window mean of the
    zero-padded z. Exact; 8x fewer conv FLOPs. Used by the benchmark to show what the kernels add beyond
    the algebra, and by the tests as a second, independent formulation.
    """
    z = bn_relu(x, bn_weight, bn_bias, bn_running_mean, bn_running_var, training, momentum, eps)
    pads, front, back, sh, sw = ttl_padding(weights)
    # one extra zero at the end of every dim feeds the 2-window of the last position
    zp = F.pad(z, (sw, sw + 1, sh, sh + 1, front, back + 1))
    box = F.avg_pool3d(zp, 2, stride=1)
    t_out, h_out, w_out = x.shape[2] // 2, x.shape[3] // 2, x.shape[4] // 2
    outs = []
    for w, (f, _) in zip(weights, pads):
        depth, kh, kw = w.shape[2:]
        t0, h0, w0 = front - f, sh - kh // 2, sw - kw // 2
        view = box[
            :, :, t0 : t0 + 2 * (t_out - 1) + depth, h0 : h0 + 2 * (h_out - 1) + kh, w0 : w0 + 2 * (w_out - 1) + kw
        ]
        outs.append(F.conv3d(view, w, stride=2))
    return torch.cat(outs, dim=1)


def dense_layer(
    x: torch.Tensor,
    norm1: Sequence[torch.Tensor],
    conv1_weight: torch.Tensor,
    norm2: Sequence[torch.Tensor],
    conv2_weight: torch.Tensor,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """One DenseNet-3D layer: BN-ReLU-Conv1x1x1 (to bn_size*k), BN-ReLU-Conv3x3x3 (to k, padding 1).

    x: (N, C, T, H, W) (the concat of all earlier features); norm1/norm2: (weight, bias, running_mean,
    running_var); conv1_weight: (bn_size*k, C, 1, 1, 1); conv2_weight: (k, bn_size*k, 3, 3, 3).
    Returns the layer's new features (N, k, T, H, W).
    """
    h = F.conv3d(bn_relu(x, *norm1, training, momentum, eps), conv1_weight)
    k = conv2_weight.shape[2:]
    return F.conv3d(bn_relu(h, *norm2, training, momentum, eps), conv2_weight, padding=tuple(s // 2 for s in k))


def dense_block(
    x: torch.Tensor,
    layers: Sequence[tuple[Sequence[torch.Tensor], torch.Tensor, Sequence[torch.Tensor], torch.Tensor]],
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """DenseNet-3D block: ``cat([x, f_1, ..., f_L])`` with f_i = dense_layer(cat(x, f_1..f_{i-1})).

    layers[i] = (norm1, conv1_weight, norm2, conv2_weight) as for :func:`dense_layer`.
    Returns (N, C_0 + L*k, T, H, W).
    """
    features = [x]
    for norm1, w1, norm2, w2 in layers:
        features.append(dense_layer(torch.cat(features, 1), norm1, w1, norm2, w2, training, momentum, eps))
    return torch.cat(features, 1)


def bn_relu_maxpool(
    x: torch.Tensor,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    bn_running_mean: torch.Tensor,
    bn_running_var: torch.Tensor,
    kernel_size: Sequence[int] = (3, 3, 3),
    stride: Sequence[int] = (1, 2, 2),
    padding: Sequence[int] = (1, 1, 1),
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """The T3D stem after conv0: ``MaxPool3d(kernel_size, stride, padding)(ReLU(BatchNorm3d(x)))``.

    x: (N, C, T, H, W). Returns (N, C, To, Ho, Wo) with PyTorch's floor-mode pooling sizes.
    """
    z = bn_relu(x, bn_weight, bn_bias, bn_running_mean, bn_running_var, training, momentum, eps)
    return F.max_pool3d(z, kernel_size, stride, padding)
