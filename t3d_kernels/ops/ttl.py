"""The fused TTL op ``t3d::ttl``: multi-depth temporal convolution, pooled by the pool-first algebra.

Layers (Liger-Kernel's pattern): backend kernels (C++ ``t3d_kernels._C``, Triton, CUDA) -> the registered
custom ops ``t3d::ttl`` / ``t3d::ttl_backward`` with fake implementations and registered autograd -> the
public :func:`ttl` (argument checks, running-stat update) -> :class:`t3d_kernels.nn.TemporalTransition`.

The op is functional: it returns ``(y, batch_mean, batch_var)`` (the batch statistics in training, the
running statistics in eval) and the caller updates the running statistics, so no op mutates its inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import _ext
from ..backends import resolve
from ..reference import temporal_padding
from ._checks import check_shape_for_mode, check_ttl_args

__all__ = ["ttl", "ttl_output_shape"]


def ttl_output_shape(x_shape: Sequence[int], weights: Sequence[torch.Tensor], pool: bool) -> list[int]:
    n, _, t, h, w = x_shape
    c_out = sum(int(wt.shape[0]) for wt in weights)
    return [n, c_out, t // 2, h // 2, w // 2] if pool else [n, c_out, t, h, w]


# --------------------------------------------------------------------------------------------------------
# "composite" backend: the fused algorithm in PyTorch ops (any device). It is also the executable
# specification of the backward algebra that the C++/CUDA/Triton kernels implement.
# --------------------------------------------------------------------------------------------------------


def _geometry(weights: Sequence[torch.Tensor]):
    pads = [temporal_padding(int(w.shape[2])) for w in weights]
    front = max(p[0] for p in pads)
    back = max(p[1] for p in pads)
    sh = max(int(w.shape[3]) // 2 for w in weights)
    sw = max(int(w.shape[4]) // 2 for w in weights)
    return pads, front, back, sh, sw


def _bn_relu_folded(x, scale, shift):
    view = (1, -1, 1, 1, 1)
    return torch.relu(x * scale.view(view) + shift.view(view))


def _padded_input(x, scale, shift, weights, pool):
    """box(zero-padded relu(bn(x))) when pooling, else the zero-padded z; and where each branch starts."""
    pads, front, back, sh, sw = _geometry(weights)
    z = _bn_relu_folded(x, scale, shift)
    extra = 1 if pool else 0
    zp = F.pad(z, (sw, sw + extra, sh, sh + extra, front, back + extra))
    src = F.avg_pool3d(zp, 2, stride=1) if pool else zp
    t_out, h_out, w_out = ttl_output_shape(x.shape, weights, pool)[2:]
    stride = 2 if pool else 1
    views = []
    for w, (f, _) in zip(weights, pads):
        depth, kh, kw = w.shape[2:]
        t0, h0, w0 = front - f, sh - kh // 2, sw - kw // 2
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
    return z, src, views, stride, (front, back, sh, sw)


def _fold_bn(weight, bias, mean, var, eps):
    invstd = torch.rsqrt(var + eps)
    scale = weight * invstd
    return scale, bias - mean * scale, invstd


def _batch_stats(x, training, running_mean, running_var, backend):
    if training:
        if backend == "cpu":  # one vectorized pass (torch.var_mean over dims (0, 2, 3, 4) is several times slower)
            return _ext.load().batch_stats(x)
        var, mean = torch.var_mean(x, dim=(0, 2, 3, 4), unbiased=False)
        return mean, var
    return running_mean.clone(), running_var.clone()


def _composite_forward(x, bn_weight, bn_bias, mean, var, weights, pool, eps):
    scale, shift, _ = _fold_bn(bn_weight, bn_bias, mean, var, eps)
    _, src, views, stride, _ = _padded_input(x, scale, shift, weights, pool)
    outs = [
        F.conv3d(src[:, :, t0:t1, h0:h1, w0:w1], w, stride=stride)
        for w, (t0, h0, w0, t1, h1, w1) in zip(weights, views)
    ]
    return torch.cat(outs, 1)


def _composite_backward(grad_y, x, bn_weight, bn_bias, mean, var, weights, pool, training, eps):
    scale, shift, invstd = _fold_bn(bn_weight, bn_bias, mean, var, eps)
    z, src, views, stride, (front, _, sh, sw) = _padded_input(x, scale, shift, weights, pool)
    grad_src = torch.zeros_like(src)
    grad_weights = []
    c0 = 0
    for w, (t0, h0, w0, t1, h1, w1) in zip(weights, views):
        gy = grad_y[:, c0 : c0 + w.shape[0]]
        c0 += w.shape[0]
        view = src[:, :, t0:t1, h0:h1, w0:w1]
        # stride-2 weight-gradient conv and stride-2 transposed conv over the shared box-filtered tensor
        grad_weights.append(torch.nn.grad.conv3d_weight(view, w.shape, gy, stride=stride))
        grad_src[:, :, t0:t1, h0:h1, w0:w1] += torch.nn.grad.conv3d_input(view.shape, w, gy, stride=stride)
    if pool:
        # adjoint of the forward 2-window mean: the backward 2-window mean
        grad_src = F.avg_pool3d(F.pad(grad_src, (1, 1, 1, 1, 1, 1)), 2, stride=1)
    t, h, w_ = x.shape[2:]
    grad_z = grad_src[:, :, front : front + t, sh : sh + h, sw : sw + w_]
    grad_pre = grad_z * (z > 0)
    grad_x, grad_bn_weight, grad_bn_bias = _bn_backward(grad_pre, x, bn_weight, mean, invstd, training)
    return grad_x, grad_bn_weight, grad_bn_bias, grad_weights


def _bn_backward(grad_pre, x, bn_weight, mean, invstd, training):
    view = (1, -1, 1, 1, 1)
    xhat = (x - mean.view(view)) * invstd.view(view)
    grad_bias = grad_pre.sum((0, 2, 3, 4))
    grad_weight = (grad_pre * xhat).sum((0, 2, 3, 4))
    scale = (bn_weight * invstd).view(view)
    if training:
        count = x.numel() // x.shape[1]
        grad_x = scale * (grad_pre - (grad_bias / count).view(view) - xhat * (grad_weight / count).view(view))
    else:
        grad_x = grad_pre * scale
    return grad_x, grad_weight, grad_bias


# --------------------------------------------------------------------------------------------------------
# backend table
# --------------------------------------------------------------------------------------------------------


# the compiled extension (cpu and cuda backends): its entry points dispatch on the tensors' device
def _compiled_forward(x, bn_weight, bn_bias, mean, var, weights, pool, eps):
    return _ext.load().ttl_forward(x, bn_weight, bn_bias, mean, var, list(weights), pool, eps)


def _compiled_backward(grad_y, x, bn_weight, bn_bias, mean, var, weights, pool, training, eps):
    return _ext.load().ttl_backward(grad_y, x, bn_weight, bn_bias, mean, var, list(weights), pool, training, eps)


def _triton_forward(*args):
    from ..triton import ttl as triton_ttl

    return triton_ttl.forward(*args)


def _triton_backward(*args):
    from ..triton import ttl as triton_ttl

    return triton_ttl.backward(*args)


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


@torch.library.custom_op("t3d::ttl", mutates_args=())
def _ttl_op(
    x: torch.Tensor,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weights: list[torch.Tensor],
    pool: bool,
    training: bool,
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mean, var = _batch_stats(x, training, running_mean, running_var, backend)
    y = _FORWARD[backend](x, bn_weight, bn_bias, mean, var, weights, pool, eps)
    return y, mean, var


@_ttl_op.register_fake
def _(x, bn_weight, bn_bias, running_mean, running_var, weights, pool, training, eps, backend):
    y = x.new_empty(ttl_output_shape(x.shape, weights, pool))
    return y, running_mean.new_empty(running_mean.shape), running_var.new_empty(running_var.shape)


@torch.library.custom_op("t3d::ttl_backward", mutates_args=())
def _ttl_backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weights: list[torch.Tensor],
    pool: bool,
    training: bool,
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    grad_y = grad_y.contiguous()
    grad_x, grad_bn_weight, grad_bn_bias, grad_weights = _BACKWARD[backend](
        grad_y, x, bn_weight, bn_bias, mean, var, weights, pool, training, eps
    )
    return grad_x, grad_bn_weight, grad_bn_bias, list(grad_weights)


@_ttl_backward_op.register_fake
def _(grad_y, x, bn_weight, bn_bias, mean, var, weights, pool, training, eps, backend):
    return (
        torch.empty_like(x),
        torch.empty_like(bn_weight),
        torch.empty_like(bn_bias),
        [torch.empty_like(w) for w in weights],
    )


def _setup_context(ctx, inputs, output):
    x, bn_weight, bn_bias, _, _, weights, pool, training, eps, backend = inputs
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    # only the input and parameters are saved: box(z) is recomputed in backward
    ctx.save_for_backward(x, bn_weight, bn_bias, mean, var, *weights)
    ctx.pool, ctx.training, ctx.eps, ctx.backend = pool, training, eps, backend


def _backward(ctx, grad_y, grad_mean, grad_var):
    x, bn_weight, bn_bias, mean, var, *weights = ctx.saved_tensors
    grad_x, grad_w, grad_b, grad_weights = torch.ops.t3d.ttl_backward(
        grad_y, x, bn_weight, bn_bias, mean, var, weights, ctx.pool, ctx.training, ctx.eps, ctx.backend
    )
    return grad_x, grad_w, grad_b, None, None, grad_weights, None, None, None, None


_ttl_op.register_autograd(_backward, setup_context=_setup_context)


def _autocast_rule(device_type: str):
    """Autocast for ``t3d::ttl``. On CUDA the op runs in the autocast dtype (x, weights and the BN vectors alike: the
    kernels take one dtype), as autocast does for convolutions; the gradients of float32 parameters come back in
    float32 through the casts. On CPU it computes in float32 (the cpu kernels are float32/float64 only)."""

    def rule(x, bn_weight, bn_bias, running_mean, running_var, weights, pool, training, eps, backend):
        dtype = torch.get_autocast_dtype(device_type)
        keys = torch._C.DispatchKeySet(
            torch._C.DispatchKey.AutocastCUDA if device_type == "cuda" else torch._C.DispatchKey.AutocastCPU
        )
        with torch._C._ExcludeDispatchKeyGuard(keys):
            if device_type != "cuda" or backend == "cpu" or not x.is_floating_point():
                return torch.ops.t3d.ttl(
                    x, bn_weight, bn_bias, running_mean, running_var, weights, pool, training, eps, backend
                )

            def cast(t):
                return t.to(dtype) if t.is_floating_point() else t

            return torch.ops.t3d.ttl(
                cast(x),
                cast(bn_weight),
                cast(bn_bias),
                cast(running_mean),
                cast(running_var),
                [cast(w) for w in weights],
                pool,
                training,
                eps,
                backend,
            )

    return rule


for _device_type, _key in (("cuda", "AutocastCUDA"), ("cpu", "AutocastCPU")):
    torch.library.impl("t3d::ttl", _key)(_autocast_rule(_device_type))


def ttl(
    x: torch.Tensor,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weights: Sequence[torch.Tensor],
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    pool: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused TTL; same contract as :func:`t3d_kernels.reference.ttl`.

    x: (N, C_in, T, H, W); bn_*: (C_in,); weights[i]: (C_i, C_in, d_i, kh_i, kw_i), kh_i and kw_i odd.
    Returns (N, sum C_i, T//2, H//2, W//2) (``pool=True``) or (N, sum C_i, T, H, W). In training the batch
    statistics normalize x and the running statistics are updated in place, as ``F.batch_norm`` does.
    ``backend``: "auto", or one of :func:`t3d_kernels.backends` ("reference" runs the plain-PyTorch reference).
    """
    check_ttl_args(x, bn_weight, bn_bias, running_mean, running_var, weights)
    check_shape_for_mode(x, training, pool)
    name = resolve("ttl", backend, x.device)
    if name == "reference":
        from .. import reference

        return reference.ttl(x, bn_weight, bn_bias, running_mean, running_var, weights, training, momentum, eps, pool)
    y, mean, var = torch.ops.t3d.ttl(
        x, bn_weight, bn_bias, running_mean, running_var, list(weights), pool, training, eps, name
    )
    if training:
        with torch.no_grad():
            count = x.numel() // x.shape[1]
            # under autocast the statistics come back in the compute dtype; the buffers keep theirs
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_(var.to(running_var.dtype) * (count / max(count - 1, 1)), momentum)
    return y
