"""The fused dense block in PyTorch ops (docs/design.md, "Dense block"): the ``composite`` backend of
``t3d::dense_block``, the executable specification of what the C++/CUDA kernels do, and the orchestration the Triton
backend reuses with its own per-piece kernels (:class:`CompositeKernels` is the seam).

- **One buffer** y of C_0 + sum k_i channels is the block's output; layer i reads its prefix y[:, :C_i] in place and
  writes its k_i channels into its slice (no concat).
- **Shared batch statistics**: in training a channel's batch mean/var are computed once, when it is written, and
  every later layer's BN1 uses them (same data, same statistics).
- **Nothing normalized is saved**: only y and the statistics; backward recomputes BN1-ReLU, conv1 and BN2-ReLU.
- **Backward** sweeps the layers in reverse, accumulating dL/dy in one buffer. BN1's backward of layer i is split
  into a local term (scale * gp, added at once) and a per-channel correction affine in y (its coefficients need the
  whole reduction); the corrections of all layers that read a channel are summed and applied once, when the
  channel's gradient is needed (csrc/common/dense_block_math.h).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..geometry import dense_block_output_channels, layer_channels, same_padding
from . import bn, sync
from .conv import conv3d_backward

__all__ = ["CompositeKernels", "algorithm_backward", "algorithm_forward", "backward", "forward"]

_VIEW = (1, -1, 1, 1, 1)


class CompositeKernels:
    """The per-piece kernels of the algorithm in PyTorch ops; the Triton backend overrides them."""

    @staticmethod
    def channel_stats(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Biased batch mean and variance per channel of v: (N, C, T, H, W) -> (C,), (C,) in float64."""
        return bn.channel_stats(v)

    @staticmethod
    def bn_relu_conv1x1(
        prefix: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, w1: torch.Tensor
    ) -> torch.Tensor:
        """h = W1 @ relu(prefix * scale + shift). prefix: (N, C, T, H, W); w1: (B, C) -> h: (N, B, T, H, W)."""
        return torch.einsum("bc,ncthw->nbthw", w1, bn.bn_relu(prefix, scale, shift))

    @staticmethod
    def bn_relu(h: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return bn.bn_relu(h, scale, shift)

    @staticmethod
    def bn_relu_backward(grad_z, h, scale, shift, mean, invstd, training):
        """BN-ReLU backward of one layer's BN2 in full: (dL/dh, grad gamma, grad beta)."""
        return bn.bn_relu_backward(grad_z, h, scale, shift, mean, invstd, training)

    @staticmethod
    def conv1x1_bn_relu_backward(grad_h, prefix, scale, shift, mean, invstd, w1, grad_prefix):
        """Backward of h = W1 @ relu(prefix * scale + shift) up to BN's local term.

        Adds scale * gp to ``grad_prefix`` (in place; gp = dL/d(pre-ReLU)) and returns (grad W1 (B, C),
        sum gp (C,), sum gp * xhat (C,)), the sums in float64.
        """
        z = bn.bn_relu(prefix, scale, shift)
        grad_w1 = torch.einsum("nbthw,ncthw->bc", grad_h, z)
        gp = torch.einsum("bc,nbthw->ncthw", w1, grad_h) * (z > 0)
        grad_prefix.add_(gp * scale.view(_VIEW))
        return (grad_w1, *bn.channel_sums(gp, prefix, mean, invstd))

    @staticmethod
    def conv_same(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.conv3d(z, w, padding=same_padding(w))

    @staticmethod
    def conv_same_backward(grad: torch.Tensor, z: torch.Tensor, w: torch.Tensor):
        return conv3d_backward(grad, z, w, padding=same_padding(w))


def _running(stats: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([s.detach().reshape(-1).double() for s in stats])


def algorithm_forward(
    kern,
    x,
    bn1_weight,
    bn1_bias,
    bn1_mean,
    bn1_var,
    conv1_weight,
    bn2_weight,
    bn2_bias,
    bn2_mean,
    bn2_var,
    conv2_weight,
    training,
    eps,
    group="",
):
    """The fused forward over ``kern``'s kernels; returns (y, mean1, var1, mean2, var2) as the op does. With a
    ``group`` (:mod:`.sync`), each channel's statistics are merged over it once, when the channel is written."""
    n, c0, t, h_, w_ = x.shape
    cins = layer_channels(c0, conv2_weight)
    y = x.new_empty(n, dense_block_output_channels(c0, conv2_weight), t, h_, w_)
    y[:, :c0] = x
    count = n * t * h_ * w_

    def channel_stats(v):
        mean, var = kern.channel_stats(v)
        return sync.merge_stats(mean, var, count, group) if group else (mean, var)

    if training:
        chan_mean, chan_var = channel_stats(y[:, :c0])
        mean1, var1, mean2, var2 = [], [], [], []
    else:
        mean1, var1, mean2, var2 = _running(bn1_mean), _running(bn1_var), _running(bn2_mean), _running(bn2_var)
    off1 = off2 = 0
    for i, (cin, w1, w2) in enumerate(zip(cins, conv1_weight, conv2_weight, strict=True)):
        bott, k = int(w1.shape[0]), int(w2.shape[0])
        if training:
            m1, v1 = chan_mean[:cin], chan_var[:cin]
            mean1.append(m1)
            var1.append(v1)
        else:
            m1, v1 = mean1[off1 : off1 + cin], var1[off1 : off1 + cin]
        scale1, shift1, _ = bn.fold_bn(bn1_weight[i], bn1_bias[i], m1, v1, eps)
        h = kern.bn_relu_conv1x1(y[:, :cin], scale1, shift1, w1.reshape(bott, cin))
        if training:
            m2, v2 = channel_stats(h)
            mean2.append(m2)
            var2.append(v2)
        else:
            m2, v2 = mean2[off2 : off2 + bott], var2[off2 : off2 + bott]
        scale2, shift2, _ = bn.fold_bn(bn2_weight[i], bn2_bias[i], m2, v2, eps)
        y[:, cin : cin + k] = kern.conv_same(kern.bn_relu(h, scale2, shift2), w2)
        if training:
            new_mean, new_var = channel_stats(y[:, cin : cin + k])
            chan_mean = torch.cat([chan_mean, new_mean])
            chan_var = torch.cat([chan_var, new_var])
        off1, off2 = off1 + cin, off2 + bott
    if training:
        mean1, var1, mean2, var2 = torch.cat(mean1), torch.cat(var1), torch.cat(mean2), torch.cat(var2)
    # statistics in the BN parameters' dtype (float32 under autocast, where x is float16/bfloat16)
    sdt = bn1_weight[0].dtype
    return y, mean1.to(sdt), var1.to(sdt), mean2.to(sdt), var2.to(sdt)


def algorithm_backward(
    kern,
    grad_y,
    y,
    mean1,
    var1,
    mean2,
    var2,
    bn1_weight,
    bn1_bias,
    conv1_weight,
    bn2_weight,
    bn2_bias,
    conv2_weight,
    training,
    eps,
    group="",
):
    """The fused backward over ``kern``'s kernels; returns the grads as the op does. With a ``group``, the two sums
    of every BN's backward are summed over it before use (the parameter gradients stay local)."""
    c0 = int(y.shape[1]) - sum(int(w.shape[0]) for w in conv2_weight)
    cins = layer_channels(c0, conv2_weight)
    count = y.numel() // y.shape[1]
    synced = training and bool(group)
    if synced:
        count = sync.total_count(count, y.device, group)
    # gradients of the buffer accumulate in float32 or wider (float16/bfloat16 y under autocast)
    acc = torch.promote_types(y.dtype, torch.float32)
    grad_buf = grad_y.to(acc, memory_format=torch.contiguous_format, copy=True)
    corr_a = torch.zeros(y.shape[1], dtype=torch.float64, device=y.device)
    corr_b = torch.zeros_like(corr_a)
    offs1 = [sum(cins[:i]) for i in range(len(cins))]
    offs2 = [sum(int(w.shape[0]) for w in conv1_weight[:i]) for i in range(len(cins))]
    n_layers = len(cins)
    grads = [[None] * n_layers for _ in range(6)]
    for i in reversed(range(n_layers)):
        cin, w1, w2 = cins[i], conv1_weight[i], conv2_weight[i]
        bott, k = int(w1.shape[0]), int(w2.shape[0])
        sl = slice(cin, cin + k)
        gout = grad_buf[:, sl] + (corr_a[sl].view(_VIEW) + corr_b[sl].view(_VIEW) * y[:, sl].double()).to(acc)
        m1, v1 = mean1[offs1[i] : offs1[i] + cin].double(), var1[offs1[i] : offs1[i] + cin].double()
        m2, v2 = mean2[offs2[i] : offs2[i] + bott].double(), var2[offs2[i] : offs2[i] + bott].double()
        scale1, shift1, invstd1 = bn.fold_bn(bn1_weight[i], bn1_bias[i], m1, v1, eps)
        scale2, shift2, invstd2 = bn.fold_bn(bn2_weight[i], bn2_bias[i], m2, v2, eps)
        w1m = w1.reshape(bott, cin)
        prefix = y[:, :cin]
        h = kern.bn_relu_conv1x1(prefix, scale1, shift1, w1m)
        z2 = kern.bn_relu(h, scale2, shift2)
        grad_z2, grads[5][i] = kern.conv_same_backward(gout.to(y.dtype).contiguous(), z2, w2)
        del z2
        grad_h, grads[3][i], grads[4][i] = kern.bn_relu_backward(
            grad_z2, h, scale2, shift2, m2, invstd2, training and not synced
        )
        if synced:  # the local (eval-form) gradient made the group's training-mode one
            sum_gx2, sum_g2 = sync.all_reduce_sums([grads[3][i], grads[4][i]], group)
            grad_h = bn.apply_correction(grad_h, h, scale2, invstd2, m2, sum_g2, sum_gx2, count)
        del h, grad_z2
        grad_w1, sum_g, sum_gx = kern.conv1x1_bn_relu_backward(
            grad_h, prefix, scale1, shift1, m1, invstd1, w1m, grad_buf[:, :cin]
        )
        grads[2][i] = grad_w1.reshape(w1.shape).to(w1.dtype)
        grads[0][i], grads[1][i] = sum_gx.to(bn1_weight[i].dtype), sum_g.to(bn1_weight[i].dtype)
        if synced:
            sum_g, sum_gx = sync.all_reduce_sums([sum_g, sum_gx], group)
        if training:
            alpha, beta = bn.affine_correction(scale1, invstd1, m1, sum_g, sum_gx, count)
            corr_a[:cin] += alpha
            corr_b[:cin] += beta
    grad_x = grad_buf[:, :c0] + (corr_a[:c0].view(_VIEW) + corr_b[:c0].view(_VIEW) * y[:, :c0].double()).to(acc)
    return (grad_x.to(y.dtype), *grads)


def forward(*args, group=""):
    """The ``composite`` backend's forward: :func:`algorithm_forward` over :class:`CompositeKernels`."""
    return algorithm_forward(CompositeKernels, *args, group=group)


def backward(*args, group=""):
    """The ``composite`` backend's backward: :func:`algorithm_backward` over :class:`CompositeKernels`."""
    return algorithm_backward(CompositeKernels, *args, group=group)
