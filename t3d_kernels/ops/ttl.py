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
from ..backends import (
    ANY_FLOAT,
    HALF,
    Backend,
    autocast_dtype,
    declare,
    extension_reason,
    get,
    register_autocast,
    resolve,
    triton_reason,
    triton_reasons_on,
)
from ..composite import bn, sync
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
    return bn.channel_stats(x)


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

# Every backend but the reference synchronises BN over a process group: the op merges the statistics around the
# backend's kernels (forward) and turns the backend's eval-form BN gradient into the group's training-mode one.
declare(
    "ttl",
    [
        # plain PyTorch ops: autocast's own rules apply; the BN modules of a model are synchronised by the caller
        Backend("reference", impl={"direct": _reference}, autocast_dtypes=HALF),
        Backend("composite", impl=_COMPOSITE, autocast_dtypes=HALF, process_group=True),
        Backend(
            "cpu",
            ("cpu",),
            _FP,
            extension_reason("ttl_forward"),
            impl={**_COMPILED, "stats": _compiled_stats},
            process_group=True,
        ),
        # (its kernels take the BN parameters in x's dtype: under autocast it computes in float32)
        Backend(
            "cuda",
            ("cuda",),
            ANY_FLOAT,
            extension_reason("ttl_forward", cuda=True),
            impl=_COMPILED,
            process_group=True,
        ),
        Backend(
            "triton",
            ("cuda", "cpu"),
            ANY_FLOAT,
            triton_reason,
            triton_reasons_on,
            {"forward": _triton_forward, "backward": _triton_backward, "stats": _composite_stats},
            HALF,
            True,
        ),
    ],
    # from measurements (README "Performance"): on an H100 the Triton TTL beats cuDNN on every shape
    auto={
        "cpu": ("cpu", "composite", "reference"),
        "cuda": ("triton", "cuda", "composite", "reference"),
        "default": ("composite", "reference"),
    },
    # CPU autocast: bf16, and fp16 (torch 2.13 runs CPU fp16 autocast and GradScaler("cpu"): loss scaling is testable)
    autocast={"cpu": HALF, "cuda": HALF},
)


def _batch_stats(x, training, running_mean, running_var, backend, group):
    """The statistics that normalize x, in the running statistics' dtype (float32 under autocast)."""
    if not training:
        return running_mean.clone(), running_var.clone()
    mean, var = get("ttl", backend).impl["stats"](x)
    if group:
        mean, var = sync.merge_stats(mean, var, x.numel() // x.shape[1], group)
    return mean.to(running_mean.dtype), var.to(running_var.dtype)


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
    group: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mean, var = _batch_stats(x, training, running_mean, running_var, backend, group)
    y = get("ttl", backend).impl["forward"](x, bn_weight, bn_bias, mean, var, weights, pool, eps)
    return y, mean, var


@_ttl_op.register_fake
def _(x, bn_weight, bn_bias, running_mean, running_var, weights, pool, training, eps, backend, group):
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
    group: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    grad_y = grad_y.contiguous()
    synced = training and bool(group)
    grad_x, grad_bn_weight, grad_bn_bias, grad_weights = get("ttl", backend).impl["backward"](
        grad_y, x, bn_weight, bn_bias, mean, var, weights, pool, training and not synced, eps
    )
    if synced:  # eval form scale * dy, plus the batch statistics' share from the group's sums
        sum_g, sum_gx = sync.all_reduce_sums([grad_bn_bias, grad_bn_weight], group)
        scale, _, invstd = bn.fold_bn(bn_weight, bn_bias, mean, var, eps)
        count = sync.total_count(x.numel() // x.shape[1], x.device, group)
        grad_x = bn.apply_correction(grad_x, x, scale, invstd, mean, sum_g, sum_gx, count)
    return grad_x, grad_bn_weight, grad_bn_bias, list(grad_weights)


@_ttl_backward_op.register_fake
def _(grad_y, x, bn_weight, bn_bias, mean, var, weights, pool, training, eps, backend, group):
    return (
        torch.empty_like(x),
        torch.empty_like(bn_weight),
        torch.empty_like(bn_bias),
        [torch.empty_like(w) for w in weights],
    )


def _setup_context(ctx, inputs, output):
    x, bn_weight, bn_bias, _, _, weights, pool, training, eps, backend, group = inputs
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    # only the input and parameters are saved: box(z) is recomputed in backward
    ctx.save_for_backward(x, bn_weight, bn_bias, mean, var, *weights)
    ctx.pool, ctx.training, ctx.eps, ctx.backend, ctx.group = pool, training, eps, backend, group


def _backward(ctx, grad_y, grad_mean, grad_var):
    x, bn_weight, bn_bias, mean, var, *weights = ctx.saved_tensors
    grad_x, grad_w, grad_b, grad_weights = torch.ops.t3d.ttl_backward(
        grad_y, x, bn_weight, bn_bias, mean, var, weights, ctx.pool, ctx.training, ctx.eps, ctx.backend, ctx.group
    )
    return grad_x, grad_w, grad_b, None, None, grad_weights, None, None, None, None, None


_ttl_op.register_autograd(_backward, setup_context=_setup_context)
register_autocast("ttl", cast=(0, 5), backend_arg=9)  # x and the branch weights


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
    process_group: torch.distributed.ProcessGroup | None = None,
) -> torch.Tensor:
    """Fused TTL; same contract as :func:`t3d_kernels.reference.ttl`.

    x: (N, C_in, T, H, W); bn_*: (C_in,); weights[i]: (C_i, C_in, d_i, kh_i, kw_i), kh_i and kw_i odd.
    Returns (N, sum C_i, T//2, H//2, W//2) (``pool=True``) or (N, sum C_i, T, H, W). In training the batch
    statistics normalize x and the running statistics are updated in place, as ``F.batch_norm`` does.
    ``backend``: "auto", or one of :func:`t3d_kernels.backends` ("reference" runs the plain-PyTorch reference).
    ``process_group``: in training, synchronise the BN statistics over this group (``nn.SyncBatchNorm``'s numbers;
    docs/design.md, "Synchronised BatchNorm"); without an initialised process group it has no effect. Under
    autocast x and the weights compute in the autocast dtype, the BN statistics in float32.
    """
    autocast = autocast_dtype("ttl", x)
    check_ttl_args(x, bn_weight, bn_bias, running_mean, running_var, weights, autocast is not None)
    check_shape_for_mode(x, training, pool)
    group = sync.group_name(process_group) if training and process_group is not None else ""
    # under autocast the rule casts x (to the autocast dtype, or to float32: the declared fallback)
    dtype = x.dtype if autocast is None else None
    name = resolve("ttl", backend, x.device, dtype, autocast=autocast, group=bool(group))
    direct = get("ttl", name).impl.get("direct")
    if direct is not None:
        return direct(x, bn_weight, bn_bias, running_mean, running_var, weights, training, momentum, eps, pool)
    y, mean, var = torch.ops.t3d.ttl(
        x, bn_weight, bn_bias, running_mean, running_var, list(weights), pool, training, eps, name, group
    )
    if training:
        count = x.numel() // x.shape[1]
        count = sync.total_count(count, x.device, group) if group else count
        bn.update_running_stats(running_mean, running_var, mean, var, count, momentum)
    return y
