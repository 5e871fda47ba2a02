"""The fused dense block op ``t3d::dense_block`` (DESIGN.md 2.2): concat-free, shared BN statistics, recompute.

Layers (Liger-Kernel's pattern): backend kernels (C++ ``t3d_kernels._C``, Triton, CUDA) -> the registered custom
ops ``t3d::dense_block`` / ``t3d::dense_block_backward`` with fake implementations and registered autograd -> the
public :func:`dense_block` (argument checks, running-stat update) -> :class:`t3d_kernels.nn.DenseBlock3d`.

Algorithm (every backend):

- **One buffer** y of C_0 + sum k_i channels is the block's output; layer i reads its prefix y[:, :C_i] in place and
  writes its k_i channels into its slice (no concat).
- **Shared batch statistics**: in training a channel's batch mean/var are computed once, when it is written, and
  every later layer's BN1 uses them (same data, same statistics); each layer keeps its own affine and running
  statistics, so the results and the state_dict equal the reference's.
- **BN1-ReLU fused into the 1x1x1 conv's input load**; **nothing normalized is saved**: only y and the statistics
  (O(L) memory, against O(L^2) for the naive block); backward recomputes BN1-ReLU, conv1 and BN2-ReLU.
- **Backward** sweeps the layers in reverse, accumulating dL/dy in one buffer. BN1's backward of layer i is split
  into a local term (scale * gp, added at once) and a per-channel correction affine in y (its coefficients need
  the whole reduction); corrections of all layers that read a channel are summed and applied once, when the
  channel's gradient is needed (csrc/common/dense_block_math.h).

The op is functional: it returns ``(y, mean1, var1, mean2, var2)``, the statistics every layer's BN1/BN2 used,
concatenated layer after layer (batch statistics, biased, in training; running statistics in eval), and the
Python caller updates the running statistics, so no op mutates its inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import _ext
from ..backends import resolve
from ._checks import _describe, check_input, check_shape_for_mode, check_tensor

__all__ = ["dense_block", "dense_block_output_channels"]

_VIEW = (1, -1, 1, 1, 1)


def dense_block_output_channels(in_channels: int, conv2_weight: Sequence[torch.Tensor]) -> int:
    """C_0 + sum k_i."""
    return in_channels + sum(int(w.shape[0]) for w in conv2_weight)


def _layer_channels(c0: int, conv2_weight: Sequence[torch.Tensor]) -> list[int]:
    """C_i, the input channels of every layer."""
    out, c = [], c0
    for w in conv2_weight:
        out.append(c)
        c += int(w.shape[0])
    return out


def _same_padding(w: torch.Tensor) -> tuple[int, int, int]:
    return int(w.shape[2]) // 2, int(w.shape[3]) // 2, int(w.shape[4]) // 2


def _fold(weight, bias, mean, var, eps):
    """BN folded into scale/shift (in float64 for the statistics' sake, returned in the parameters' dtype)."""
    invstd = torch.rsqrt(var.double() + eps)
    scale = weight.double() * invstd
    shift = bias.double() - mean.double() * scale
    return scale.to(weight.dtype), shift.to(weight.dtype), invstd


# --------------------------------------------------------------------------------------------------------
# "composite" backend: the fused algorithm in PyTorch ops (any device). The executable specification of what
# the C++/CUDA kernels do, and the orchestration the Triton backend reuses with its own kernels.
# --------------------------------------------------------------------------------------------------------


class CompositeKernels:
    """The per-piece kernels of the algorithm in PyTorch ops; the Triton backend overrides them."""

    @staticmethod
    def channel_stats(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Biased batch mean and variance per channel of v: (N, C, T, H, W) -> (C,), (C,) in float64."""
        var, mean = torch.var_mean(v.double(), dim=(0, 2, 3, 4), unbiased=False)
        return mean, var

    @staticmethod
    def bn_relu_conv1x1(
        prefix: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, w1: torch.Tensor
    ) -> torch.Tensor:
        """h = W1 @ relu(prefix * scale + shift). prefix: (N, C, T, H, W); w1: (B, C) -> h: (N, B, T, H, W)."""
        z = torch.relu(prefix * scale.view(_VIEW) + shift.view(_VIEW))
        return torch.einsum("bc,ncthw->nbthw", w1, z)

    @staticmethod
    def bn_relu(h: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return torch.relu(h * scale.view(_VIEW) + shift.view(_VIEW))

    @staticmethod
    def bn_relu_backward(grad_z, h, scale, shift, mean, invstd, training):
        """BN-ReLU backward of one layer's BN2 in full: (dL/dh, grad gamma, grad beta)."""
        gp = grad_z * ((h * scale.view(_VIEW) + shift.view(_VIEW)) > 0)
        xhat = (h.double() - mean.view(_VIEW)) * invstd.view(_VIEW)
        sum_g = gp.double().sum((0, 2, 3, 4))
        sum_gx = (gp.double() * xhat).sum((0, 2, 3, 4))
        grad_h = gp * scale.view(_VIEW)
        if training:
            alpha, beta = _affine_correction(scale, invstd, mean, sum_g, sum_gx, h.numel() // h.shape[1])
            grad_h = grad_h + (alpha.view(_VIEW) + beta.view(_VIEW) * h.double()).to(h.dtype)
        return grad_h, sum_gx.to(h.dtype), sum_g.to(h.dtype)

    @staticmethod
    def conv1x1_bn_relu_backward(grad_h, prefix, scale, shift, mean, invstd, w1, grad_prefix):
        """Backward of h = W1 @ relu(prefix * scale + shift) up to BN's local term.

        Adds scale * gp to ``grad_prefix`` (in place; gp = dL/d(pre-ReLU)) and returns (grad W1 (B, C),
        sum gp (C,), sum gp * xhat (C,)), the sums in float64.
        """
        z = torch.relu(prefix * scale.view(_VIEW) + shift.view(_VIEW))
        grad_w1 = torch.einsum("nbthw,ncthw->bc", grad_h, z)
        gp = torch.einsum("bc,nbthw->ncthw", w1, grad_h) * (z > 0)
        grad_prefix.add_(gp * scale.view(_VIEW))
        xhat = (prefix.double() - mean.view(_VIEW)) * invstd.view(_VIEW)
        return grad_w1, gp.double().sum((0, 2, 3, 4)), (gp.double() * xhat).sum((0, 2, 3, 4))

    @staticmethod
    def conv_same(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.conv3d(z, w, padding=_same_padding(w))

    @staticmethod
    def conv_same_backward(grad: torch.Tensor, z: torch.Tensor, w: torch.Tensor):
        one = [1, 1, 1]
        grad_z, grad_w, _ = torch.ops.aten.convolution_backward(
            grad, z, w, None, one, list(_same_padding(w)), one, False, [0, 0, 0], 1, [True, True, False]
        )
        return grad_z, grad_w


def _affine_correction(scale, invstd, mean, sum_g, sum_gx, count):
    """(alpha, beta) of the affine BN-backward correction dL/dx += alpha + beta * x (dense_block_math.h)."""
    scale = scale.double()
    alpha = scale * (invstd * mean * sum_gx - sum_g) / count
    beta = -scale * invstd * sum_gx / count
    return alpha, beta


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
):
    """The fused forward over ``kern``'s kernels; returns (y, mean1, var1, mean2, var2) as the op does."""
    n, c0, t, h_, w_ = x.shape
    cins = _layer_channels(c0, conv2_weight)
    y = x.new_empty(n, dense_block_output_channels(c0, conv2_weight), t, h_, w_)
    y[:, :c0] = x
    if training:
        chan_mean, chan_var = kern.channel_stats(y[:, :c0])
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
        scale1, shift1, _ = _fold(bn1_weight[i], bn1_bias[i], m1, v1, eps)
        h = kern.bn_relu_conv1x1(y[:, :cin], scale1, shift1, w1.reshape(bott, cin))
        if training:
            m2, v2 = kern.channel_stats(h)
            mean2.append(m2)
            var2.append(v2)
        else:
            m2, v2 = mean2[off2 : off2 + bott], var2[off2 : off2 + bott]
        scale2, shift2, _ = _fold(bn2_weight[i], bn2_bias[i], m2, v2, eps)
        y[:, cin : cin + k] = kern.conv_same(kern.bn_relu(h, scale2, shift2), w2)
        if training:
            new_mean, new_var = kern.channel_stats(y[:, cin : cin + k])
            chan_mean = torch.cat([chan_mean, new_mean])
            chan_var = torch.cat([chan_var, new_var])
        off1, off2 = off1 + cin, off2 + bott
    if training:
        mean1, var1, mean2, var2 = torch.cat(mean1), torch.cat(var1), torch.cat(mean2), torch.cat(var2)
    return y, mean1.to(x.dtype), var1.to(x.dtype), mean2.to(x.dtype), var2.to(x.dtype)


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
):
    """The fused backward over ``kern``'s kernels; returns the grads as the op does."""
    c0 = int(y.shape[1]) - sum(int(w.shape[0]) for w in conv2_weight)
    cins = _layer_channels(c0, conv2_weight)
    count = y.numel() // y.shape[1]
    grad_buf = grad_y.clone(memory_format=torch.contiguous_format)
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
        gout = grad_buf[:, sl] + (corr_a[sl].view(_VIEW) + corr_b[sl].view(_VIEW) * y[:, sl].double()).to(y.dtype)
        m1, v1 = mean1[offs1[i] : offs1[i] + cin].double(), var1[offs1[i] : offs1[i] + cin].double()
        m2, v2 = mean2[offs2[i] : offs2[i] + bott].double(), var2[offs2[i] : offs2[i] + bott].double()
        scale1, shift1, invstd1 = _fold(bn1_weight[i], bn1_bias[i], m1, v1, eps)
        scale2, shift2, invstd2 = _fold(bn2_weight[i], bn2_bias[i], m2, v2, eps)
        w1m = w1.reshape(bott, cin)
        prefix = y[:, :cin]
        h = kern.bn_relu_conv1x1(prefix, scale1, shift1, w1m)
        grad_z2, grads[5][i] = kern.conv_same_backward(gout.contiguous(), kern.bn_relu(h, scale2, shift2), w2)
        grad_h, grads[3][i], grads[4][i] = kern.bn_relu_backward(grad_z2, h, scale2, shift2, m2, invstd2, training)
        del h, grad_z2
        grad_w1, sum_g, sum_gx = kern.conv1x1_bn_relu_backward(
            grad_h, prefix, scale1, shift1, m1, invstd1, w1m, grad_buf[:, :cin]
        )
        grads[2][i] = grad_w1.reshape(w1.shape).to(w1.dtype)
        grads[0][i], grads[1][i] = sum_gx.to(y.dtype), sum_g.to(y.dtype)
        if training:
            alpha, beta = _affine_correction(scale1, invstd1, m1, sum_g, sum_gx, count)
            corr_a[:cin] += alpha
            corr_b[:cin] += beta
    grad_x = grad_buf[:, :c0] + (corr_a[:c0].view(_VIEW) + corr_b[:c0].view(_VIEW) * y[:, :c0].double()).to(y.dtype)
    return (grad_x, *grads)


# --------------------------------------------------------------------------------------------------------
# backend table
# --------------------------------------------------------------------------------------------------------


def _composite_forward(*args):
    return algorithm_forward(CompositeKernels, *args)


def _composite_backward(*args):
    return algorithm_backward(CompositeKernels, *args)


def _compiled_forward(*args):
    return _ext.load().dense_block_forward(*args)


def _compiled_backward(*args):
    return _ext.load().dense_block_backward(*args)


def _triton_forward(*args):
    from ..triton import dense_block as triton_dense_block

    return triton_dense_block.forward(*args)


def _triton_backward(*args):
    from ..triton import dense_block as triton_dense_block

    return triton_dense_block.backward(*args)


_FORWARD = {
    "composite": _composite_forward,
    "cpu": _compiled_forward,
    "cuda": _compiled_forward,
    "triton": _triton_forward,
}
_BACKWARD = {
    "composite": _composite_backward,
    "cpu": _compiled_backward,
    "cuda": _compiled_backward,
    "triton": _triton_backward,
}


# --------------------------------------------------------------------------------------------------------
# registered ops
# --------------------------------------------------------------------------------------------------------


@torch.library.custom_op("t3d::dense_block", mutates_args=())
def _dense_block_op(
    x: torch.Tensor,
    bn1_weight: list[torch.Tensor],
    bn1_bias: list[torch.Tensor],
    bn1_mean: list[torch.Tensor],
    bn1_var: list[torch.Tensor],
    conv1_weight: list[torch.Tensor],
    bn2_weight: list[torch.Tensor],
    bn2_bias: list[torch.Tensor],
    bn2_mean: list[torch.Tensor],
    bn2_var: list[torch.Tensor],
    conv2_weight: list[torch.Tensor],
    training: bool,
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, mean1, var1, mean2, var2 = _FORWARD[backend](
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
    )
    return y, mean1, var1, mean2, var2


@_dense_block_op.register_fake
def _(
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
    backend,
):
    n, c0, t, h, w = x.shape
    y = x.new_empty(n, dense_block_output_channels(c0, conv2_weight), t, h, w)
    len1 = sum(_layer_channels(c0, conv2_weight))
    len2 = sum(int(w1.shape[0]) for w1 in conv1_weight)
    return y, x.new_empty(len1), x.new_empty(len1), x.new_empty(len2), x.new_empty(len2)


@torch.library.custom_op("t3d::dense_block_backward", mutates_args=())
def _dense_block_backward_op(
    grad_y: torch.Tensor,
    y: torch.Tensor,
    mean1: torch.Tensor,
    var1: torch.Tensor,
    mean2: torch.Tensor,
    var2: torch.Tensor,
    bn1_weight: list[torch.Tensor],
    bn1_bias: list[torch.Tensor],
    conv1_weight: list[torch.Tensor],
    bn2_weight: list[torch.Tensor],
    bn2_bias: list[torch.Tensor],
    conv2_weight: list[torch.Tensor],
    training: bool,
    eps: float,
    backend: str,
) -> tuple[
    torch.Tensor,
    list[torch.Tensor],
    list[torch.Tensor],
    list[torch.Tensor],
    list[torch.Tensor],
    list[torch.Tensor],
    list[torch.Tensor],
]:
    grads = _BACKWARD[backend](
        grad_y.contiguous(),
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
    )
    return grads[0], *[list(g) for g in grads[1:]]


@_dense_block_backward_op.register_fake
def _(
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
    backend,
):
    c0 = int(y.shape[1]) - sum(int(w.shape[0]) for w in conv2_weight)
    grad_x = y.new_empty(y.shape[0], c0, *y.shape[2:])
    like = [[torch.empty_like(p) for p in ps] for ps in (bn1_weight, bn1_bias, conv1_weight, bn2_weight, bn2_bias)]
    return grad_x, *like, [torch.empty_like(w) for w in conv2_weight]


def _setup_context(ctx, inputs, output):
    (_, bn1_weight, bn1_bias, _, _, conv1_weight, bn2_weight, bn2_bias, _, _, conv2_weight, training, eps, backend) = (
        inputs
    )
    y, mean1, var1, mean2, var2 = output
    ctx.mark_non_differentiable(mean1, var1, mean2, var2)
    # only the output buffer (O(L) channels), the statistics and the parameters: nothing normalized
    ctx.save_for_backward(
        y, mean1, var1, mean2, var2, *bn1_weight, *bn1_bias, *conv1_weight, *bn2_weight, *bn2_bias, *conv2_weight
    )
    ctx.layers, ctx.training, ctx.eps, ctx.backend = len(conv1_weight), training, eps, backend


def _backward(ctx, grad_y, grad_mean1, grad_var1, grad_mean2, grad_var2):
    y, mean1, var1, mean2, var2, *params = ctx.saved_tensors
    n = ctx.layers
    lists = [params[j * n : (j + 1) * n] for j in range(6)]
    grad_x, g_bn1_w, g_bn1_b, g_conv1, g_bn2_w, g_bn2_b, g_conv2 = torch.ops.t3d.dense_block_backward(
        grad_y, y, mean1, var1, mean2, var2, *lists, ctx.training, ctx.eps, ctx.backend
    )
    none = [None] * n
    return grad_x, g_bn1_w, g_bn1_b, none, none, g_conv1, g_bn2_w, g_bn2_b, none, none, g_conv2, None, None, None


_dense_block_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------------
# public function
# --------------------------------------------------------------------------------------------------------

_Norm = Sequence[torch.Tensor]


def _check_args(x, layers) -> None:
    check_input(x)
    if isinstance(layers, torch.Tensor) or len(layers) == 0:
        raise ValueError("layers: expected a non-empty sequence of (norm1, conv1_weight, norm2, conv2_weight)")
    c = int(x.shape[1])
    for i, layer in enumerate(layers):
        if len(layer) != 4:
            raise ValueError(
                f"layers[{i}]: expected (norm1, conv1_weight, norm2, conv2_weight), got {len(layer)} items"
            )
        norm1, w1, norm2, w2 = layer
        check_tensor(f"layers[{i}].conv1_weight", w1, x)
        if w1.dim() != 5 or w1.shape[1] != c or tuple(w1.shape[2:]) != (1, 1, 1):
            raise ValueError(
                f"layers[{i}].conv1_weight: expected shape (B, {c}, 1, 1, 1) (layer {i} reads C_0 + sum of earlier "
                f"growths = {c} channels), got {_describe(w1)}"
            )
        bott = int(w1.shape[0])
        check_tensor(f"layers[{i}].conv2_weight", w2, x)
        if w2.dim() != 5 or w2.shape[1] != bott or any(s % 2 == 0 for s in w2.shape[2:]) or w2.shape[0] < 1:
            raise ValueError(
                f"layers[{i}].conv2_weight: expected shape (k, {bott}, kt, kh, kw) with odd kernel sizes, got "
                f"{_describe(w2)}"
            )
        for name, norm, channels in (("norm1", norm1, c), ("norm2", norm2, bott)):
            if len(norm) != 4:
                raise ValueError(f"layers[{i}].{name}: expected (weight, bias, running_mean, running_var)")
            for pname, p in zip(("weight", "bias", "running_mean", "running_var"), norm, strict=True):
                check_tensor(f"layers[{i}].{name}.{pname}", p, x, (channels,))
        c += int(w2.shape[0])


def dense_block(
    x: torch.Tensor,
    layers: Sequence[tuple[_Norm, torch.Tensor, _Norm, torch.Tensor]],
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused dense block; same contract as :func:`t3d_kernels.reference.dense_block`.

    x: (N, C_0, T, H, W); layers[i] = (norm1, conv1_weight, norm2, conv2_weight), norm = (weight, bias,
    running_mean, running_var), conv1_weight: (B, C_i, 1, 1, 1), conv2_weight: (k_i, B, kt, kh, kw) (odd sizes,
    'same' padding), C_i = C_0 + sum_{j<i} k_j. Returns (N, C_0 + sum k_i, T, H, W). In training the batch
    statistics normalize and every layer's running statistics are updated in place, as ``F.batch_norm`` does.
    ``backend``: "auto", or one of :func:`t3d_kernels.backends` ("reference" runs the plain-PyTorch reference).
    """
    _check_args(x, layers)
    check_shape_for_mode(x, training)
    name = resolve("dense_block", backend, x.device)
    if backend == "auto" and name in ("cpu", "cuda") and x.dtype not in (torch.float32, torch.float64):
        # the C++/CUDA kernels take float32/float64; other dtypes (fp16, bf16) run the same algorithm in torch ops
        name = "composite"
    if name == "triton" and x.dtype == torch.float64:
        # its kernels accumulate in float32: a float64 result of float32 accuracy would be a silent loss
        raise TypeError(
            "x: the triton backend of dense_block computes in float32 (float16, bfloat16), got float64; "
            "use backend='composite' or 'cpu' for float64"
        )
    if name == "reference":
        from .. import reference

        return reference.dense_block(x, layers, training, momentum, eps)
    norm1 = [list(layer[0]) for layer in layers]
    norm2 = [list(layer[2]) for layer in layers]
    conv1 = [layer[1] for layer in layers]
    conv2 = [layer[3] for layer in layers]
    y, mean1, var1, mean2, var2 = torch.ops.t3d.dense_block(
        x,
        [p[0] for p in norm1],
        [p[1] for p in norm1],
        [p[2] for p in norm1],
        [p[3] for p in norm1],
        conv1,
        [p[0] for p in norm2],
        [p[1] for p in norm2],
        [p[2] for p in norm2],
        [p[3] for p in norm2],
        conv2,
        training,
        eps,
        name,
    )
    if training:
        _update_running_stats(x, norm1, norm2, mean1, var1, mean2, var2, momentum)
    return y


def _update_running_stats(x, norm1, norm2, mean1, var1, mean2, var2, momentum) -> None:
    """running = (1 - momentum) * running + momentum * batch (unbiased var), as ATen's batch_norm writes it."""
    count = x.numel() // x.shape[1]
    unbias = count / max(count - 1, 1)
    with torch.no_grad():
        for norms, mean, var in ((norm1, mean1, var1), (norm2, mean2, var2)):
            off = 0
            for _, _, running_mean, running_var in norms:
                c = running_mean.numel()
                running_mean.mul_(1 - momentum).add_(mean[off : off + c], alpha=momentum)
                running_var.mul_(1 - momentum).add_(var[off : off + c] * unbias, alpha=momentum)
                off += c
