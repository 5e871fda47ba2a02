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

from .. import _ext
from ..backends import ANY_FLOAT, Backend, declare, extension_reason, get, resolve, triton_reason, triton_reasons_on
from ..composite import bn
from ..composite import ttl as composite_ttl
from ..geometry import ttl_output_shape
from ._checks import check_shape_for_mode, check_ttl_args

__all__ = ["ttl", "ttl_output_shape"]


# --------------------------------------------------------------------------------------------------------
# backends: what each runs ("forward"/"backward" behind the custom op, "stats" the batch statistics, "direct" the
# whole public function with PyTorch's autograd) and where
# --------------------------------------------------------------------------------------------------------


# the compiled extension (cpu and cuda backends): its entry points dispatch on the tensors' device
def _compiled_forward(x, bn_weight, bn_bias, mean, var, weights, pool, eps):
    return _ext.load().ttl_forward(x, bn_weight, bn_bias, mean, var, list(weights), pool, eps)


def _compiled_backward(grad_y, x, bn_weight, bn_bias, mean, var, weights, pool, training, eps):
    return _ext.load().ttl_backward(grad_y, x, bn_weight, bn_bias, mean, var, list(weights), pool, training, eps)


def _compiled_stats(x):
    # one vectorized pass (torch.var_mean over dims (0, 2, 3, 4) is several times slower)
    return _ext.load().batch_stats(x)


def _composite_stats(x):
    mean, var = bn.channel_stats(x)
    return mean.to(x.dtype), var.to(x.dtype)


def _triton_forward(*args):
    from ..triton import ttl as triton_ttl  # lazily: a missing Triton never breaks ``import t3d_kernels``

    return triton_ttl.forward(*args)


def _triton_backward(*args):
    from ..triton import ttl as triton_ttl

    return triton_ttl.backward(*args)


def _reference(x, bn_weight, bn_bias, running_mean, running_var, weights, training, momentum, eps, pool):
    from .. import reference  # the reference backend: the ground truth, autograd by PyTorch

    return reference.ttl(x, bn_weight, bn_bias, running_mean, running_var, weights, training, momentum, eps, pool)


_FP = frozenset((torch.float32, torch.float64))
_COMPOSITE = {"forward": composite_ttl.forward, "backward": composite_ttl.backward, "stats": _composite_stats}
_COMPILED = {"forward": _compiled_forward, "backward": _compiled_backward, "stats": _composite_stats}

declare(
    "ttl",
    [
        Backend("reference", impl={"direct": _reference}),
        Backend("composite", impl=_COMPOSITE),
        Backend(
            "cpu",
            ("cpu",),
            _FP,
            extension_reason("ttl_forward"),
            impl={**_COMPILED, "stats": _compiled_stats},
        ),
        Backend("cuda", ("cuda",), ANY_FLOAT, extension_reason("ttl_forward", cuda=True), impl=_COMPILED),
        Backend(
            "triton",
            ("cuda", "cpu"),
            ANY_FLOAT,
            triton_reason,
            triton_reasons_on,
            {"forward": _triton_forward, "backward": _triton_backward, "stats": _composite_stats},
        ),
    ],
    # from measurements (README "Performance"): on an H100 the Triton TTL beats cuDNN on every shape
    auto={
        "cpu": ("cpu", "composite", "reference"),
        "cuda": ("triton", "cuda", "composite", "reference"),
        "default": ("composite", "reference"),
    },
    autocast={"cpu": (torch.bfloat16,), "cuda": (torch.float16, torch.bfloat16)},
)


def _batch_stats(x, training, running_mean, running_var, backend):
    if training:
        return get("ttl", backend).impl["stats"](x)
    return running_mean.clone(), running_var.clone()


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
    y = get("ttl", backend).impl["forward"](x, bn_weight, bn_bias, mean, var, weights, pool, eps)
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
    grad_x, grad_bn_weight, grad_bn_bias, grad_weights = get("ttl", backend).impl["backward"](
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
    float32 through the casts. On CPU, and for a backend that does not declare the autocast dtype, it computes in
    the dtype of x."""

    def rule(x, bn_weight, bn_bias, running_mean, running_var, weights, pool, training, eps, backend):
        dtype = torch.get_autocast_dtype(device_type)
        keys = torch._C.DispatchKeySet(
            torch._C.DispatchKey.AutocastCUDA if device_type == "cuda" else torch._C.DispatchKey.AutocastCPU
        )
        with torch._C._ExcludeDispatchKeyGuard(keys):
            if device_type != "cuda" or dtype not in get("ttl", backend).dtypes or not x.is_floating_point():
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
    name = resolve("ttl", backend, x.device, x.dtype)
    direct = get("ttl", name).impl.get("direct")
    if direct is not None:
        return direct(x, bn_weight, bn_bias, running_mean, running_var, weights, training, momentum, eps, pool)
    y, mean, var = torch.ops.t3d.ttl(
        x, bn_weight, bn_bias, running_mean, running_var, list(weights), pool, training, eps, name
    )
    if training:
        bn.update_running_stats(running_mean, running_var, mean, var, x.numel() // x.shape[1], momentum)
    return y
