"""The fused dense block op ``t3d::dense_block`` (docs/design.md, "Dense block"): concat-free, shared BN
statistics, recompute.

Layers (Liger-Kernel's pattern): backend kernels (C++ ``t3d_kernels._C``, Triton, CUDA) -> the registered custom
ops ``t3d::dense_block`` / ``t3d::dense_block_backward`` with fake implementations and registered autograd -> the
public :func:`dense_block` (argument checks, running-stat update) -> :class:`t3d_kernels.nn.DenseBlock3d`.

The algorithm (one buffer, shared batch statistics, nothing normalized saved) is written once, in PyTorch ops,
in :mod:`t3d_kernels.composite.dense_block`; every backend computes it.

The op is functional: it returns ``(y, mean1, var1, mean2, var2)``, the statistics every layer's BN1/BN2 used,
concatenated layer after layer (batch statistics, biased, in training; running statistics in eval), and the
Python caller updates the running statistics, so no op mutates its inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _ext
from ..backends import (
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
from ..composite import dense_block as composite_dense_block
from ..geometry import dense_block_output_channels, layer_channels
from ._checks import check_dense_block_args, check_shape_for_mode

__all__ = ["dense_block", "dense_block_output_channels"]


# --------------------------------------------------------------------------------------------------------
# backends: what each runs ("forward"/"backward" behind the custom op, "direct" the whole public function with
# PyTorch's autograd) and where
# --------------------------------------------------------------------------------------------------------


# With a process group the C++ kernels call back here once per set of channels whose statistics they write (forward)
# and once per BN of each layer (backward), and the collectives of composite.sync combine them over the group.
def _compiled_forward(*args, group=""):
    if not group:
        return _ext.load().dense_block_forward(*args)
    x = args[0]
    count = x.numel() // x.shape[1]
    return _ext.load().dense_block_forward(
        *args, merge_stats=lambda mean, var: sync.merge_stats(mean, var, count, group)
    )


def _compiled_backward(*args, group="", saved_h=None):
    if not group:
        return _ext.load().dense_block_backward(*args, saved_h=saved_h)
    y = args[1]
    total = sync.total_count(y.numel() // y.shape[1], y.device, group)
    return _ext.load().dense_block_backward(
        *args, reduce_sums=lambda sums: sync.all_reduce_sums([sums], group)[0], group_count=total, saved_h=saved_h
    )


def _triton_forward(*args, group=""):
    from ..triton import dense_block as triton_dense_block  # lazily: a missing Triton never breaks the import

    return triton_dense_block.forward(*args, group=group)


def _triton_backward(*args, group=""):
    from ..triton import dense_block as triton_dense_block

    return triton_dense_block.backward(*args, group=group)


def _reference(x, layers, training, momentum, eps):
    from .. import reference  # the reference backend: the ground truth, autograd by PyTorch

    return reference.dense_block(x, layers, training, momentum, eps)


# the C++/CUDA kernels take float32/float64; under "auto" other dtypes (fp16, bf16) run the same algorithm in torch
# ops (composite)
_FP = frozenset((torch.float32, torch.float64))
_COMPILED = {"forward": _compiled_forward, "backward": _compiled_backward}

declare(
    "dense_block",
    [
        # plain PyTorch ops: autocast's own rules apply; the BN modules of a model are synchronised by the caller
        Backend("reference", impl={"direct": _reference}, autocast_dtypes=HALF),
        Backend(
            "composite",
            impl={"forward": composite_dense_block.forward, "backward": composite_dense_block.backward},
            autocast_dtypes=HALF,
            process_group=True,
        ),
        Backend("cpu", ("cpu",), _FP, extension_reason("dense_block_forward"), impl=_COMPILED, process_group=True),
        Backend("cuda", ("cuda",), _FP, extension_reason("dense_block_forward", cuda=True), impl=_COMPILED),
        Backend(
            "triton",
            ("cuda", "cpu"),
            built=triton_reason,
            reasons=triton_reasons_on,
            impl={"forward": _triton_forward, "backward": _triton_backward},
            autocast_dtypes=HALF,
            process_group=True,
        ),
    ],
    # from measurements (README "Performance"): the fused dense block's GPU kernels are still slower than the cuDNN
    # block, so on CUDA it stays on the reference unless a fused backend is asked for (it saves memory)
    # (composite after it: the fused op where the reference cannot serve, a synchronised BN)
    auto={
        "cpu": ("cpu", "composite", "reference"),
        "cuda": ("reference", "composite"),
        "default": ("composite", "reference"),
    },
    # CPU autocast: bf16, and fp16 (torch 2.13 runs CPU fp16 autocast and GradScaler("cpu"): loss scaling is testable)
    autocast={"cpu": HALF, "cuda": HALF},
)


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
    group: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # the sixth output, saved_h, is what the backend keeps for backward besides y (the CPU kernel in training: the
    # bottleneck h before BN2 of the layers with C_i >= 2 B_i, flat; _saved_h_numel); empty for the others
    y, mean1, var1, mean2, var2, *saved = get("dense_block", backend).impl["forward"](
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
        group=group,
    )
    saved_h = saved[0] if saved and saved[0] is not None else x.new_empty(0)
    return y, mean1, var1, mean2, var2, saved_h


def _saved_h_numel(x, conv1_weight, conv2_weight, training: bool, backend: str) -> int:
    """Elements of the op's saved_h: in training the CPU kernel keeps the h of every layer with C_i >= 2 B_i
    (csrc/dense_block.h, keeps_h in csrc/cpu/dense_block_kernel.cpp)."""
    if not (training and backend == "cpu" and x.device.type == "cpu"):
        return 0
    n, c0, t, h, w = x.shape
    widths = [int(w1.shape[0]) for w1 in conv1_weight]
    kept = sum(b for c, b in zip(layer_channels(c0, conv2_weight), widths, strict=True) if c >= 2 * b)
    return n * t * h * w * kept


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
    group,
):
    n, c0, t, h, w = x.shape
    y = x.new_empty(n, dense_block_output_channels(c0, conv2_weight), t, h, w)
    len1 = sum(layer_channels(c0, conv2_weight))
    len2 = sum(int(w1.shape[0]) for w1 in conv1_weight)
    sdt = bn1_weight[0].dtype  # the statistics come in the BN parameters' dtype
    saved_h = x.new_empty(_saved_h_numel(x, conv1_weight, conv2_weight, training, backend))
    return y, *(x.new_empty(m, dtype=sdt) for m in (len1, len1, len2, len2)), saved_h


@torch.library.custom_op("t3d::dense_block_backward", mutates_args=())
def _dense_block_backward_op(
    grad_y: torch.Tensor,
    y: torch.Tensor,
    mean1: torch.Tensor,
    var1: torch.Tensor,
    mean2: torch.Tensor,
    var2: torch.Tensor,
    saved_h: torch.Tensor,
    bn1_weight: list[torch.Tensor],
    bn1_bias: list[torch.Tensor],
    conv1_weight: list[torch.Tensor],
    bn2_weight: list[torch.Tensor],
    bn2_bias: list[torch.Tensor],
    conv2_weight: list[torch.Tensor],
    training: bool,
    eps: float,
    backend: str,
    group: str,
) -> tuple[
    torch.Tensor,
    list[torch.Tensor],
    list[torch.Tensor],
    list[torch.Tensor],
    list[torch.Tensor],
    list[torch.Tensor],
    list[torch.Tensor],
]:
    # only a backend whose forward kept something takes saved_h
    kept = {"saved_h": saved_h} if saved_h.numel() else {}
    grads = get("dense_block", backend).impl["backward"](
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
        group=group,
        **kept,
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
    saved_h,
    bn1_weight,
    bn1_bias,
    conv1_weight,
    bn2_weight,
    bn2_bias,
    conv2_weight,
    training,
    eps,
    backend,
    group,
):
    c0 = int(y.shape[1]) - sum(int(w.shape[0]) for w in conv2_weight)
    grad_x = y.new_empty(y.shape[0], c0, *y.shape[2:])
    like = [[torch.empty_like(p) for p in ps] for ps in (bn1_weight, bn1_bias, conv1_weight, bn2_weight, bn2_bias)]
    return grad_x, *like, [torch.empty_like(w) for w in conv2_weight]


def _setup_context(ctx, inputs, output):
    (
        _,
        bn1_weight,
        bn1_bias,
        _,
        _,
        conv1_weight,
        bn2_weight,
        bn2_bias,
        _,
        _,
        conv2_weight,
        training,
        eps,
        backend,
        group,
    ) = inputs
    y, mean1, var1, mean2, var2, saved_h = output
    ctx.mark_non_differentiable(mean1, var1, mean2, var2, saved_h)
    # the output buffer (O(L) channels), the statistics, the parameters and what the backend kept (the CPU kernel:
    # every layer's h, O(L) too): nothing normalized
    ctx.save_for_backward(
        y,
        mean1,
        var1,
        mean2,
        var2,
        saved_h,
        *bn1_weight,
        *bn1_bias,
        *conv1_weight,
        *bn2_weight,
        *bn2_bias,
        *conv2_weight,
    )
    ctx.layers, ctx.training, ctx.eps, ctx.backend, ctx.group = len(conv1_weight), training, eps, backend, group


def _backward(ctx, grad_y, grad_mean1, grad_var1, grad_mean2, grad_var2, grad_saved_h):
    y, mean1, var1, mean2, var2, saved_h, *params = ctx.saved_tensors
    n = ctx.layers
    lists = [params[j * n : (j + 1) * n] for j in range(6)]
    grad_x, g_bn1_w, g_bn1_b, g_conv1, g_bn2_w, g_bn2_b, g_conv2 = torch.ops.t3d.dense_block_backward(
        grad_y, y, mean1, var1, mean2, var2, saved_h, *lists, ctx.training, ctx.eps, ctx.backend, ctx.group
    )
    none = [None] * n
    return grad_x, g_bn1_w, g_bn1_b, none, none, g_conv1, g_bn2_w, g_bn2_b, none, none, g_conv2, None, None, None, None


_dense_block_op.register_autograd(_backward, setup_context=_setup_context)
register_autocast("dense_block", cast=(0, 5, 10), backend_arg=13)  # x, conv1_weight, conv2_weight


# --------------------------------------------------------------------------------------------------------
# public function
# --------------------------------------------------------------------------------------------------------

_Norm = Sequence[torch.Tensor]


def dense_block(
    x: torch.Tensor,
    layers: Sequence[tuple[_Norm, torch.Tensor, _Norm, torch.Tensor]],
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    backend: str = "auto",
    process_group: torch.distributed.ProcessGroup | None = None,
) -> torch.Tensor:
    """Fused dense block; same contract as :func:`t3d_kernels.reference.dense_block`.

    x: (N, C_0, T, H, W); layers[i] = (norm1, conv1_weight, norm2, conv2_weight), norm = (weight, bias,
    running_mean, running_var), conv1_weight: (B, C_i, 1, 1, 1), conv2_weight: (k_i, B, kt, kh, kw) (odd sizes,
    'same' padding), C_i = C_0 + sum_{j<i} k_j. Returns (N, C_0 + sum k_i, T, H, W). In training the batch
    statistics normalize and every layer's running statistics are updated in place, as ``F.batch_norm`` does.
    ``backend``: "auto", or one of :func:`t3d_kernels.backends` ("reference" runs the plain-PyTorch reference).
    ``process_group``: in training, synchronise every BN's statistics over this group (``nn.SyncBatchNorm``'s
    numbers; docs/design.md, "Synchronised BatchNorm"); without an initialised process group it has no effect.
    Under autocast x and the conv weights compute in the autocast dtype, the BN statistics in float32.
    """
    autocast = autocast_dtype("dense_block", x)
    check_dense_block_args(x, layers, autocast is not None)
    check_shape_for_mode(x, training)
    group = sync.group_name(process_group) if training and process_group is not None else ""
    # under autocast the rule casts x (to the autocast dtype, or to float32: the declared fallback)
    dtype = x.dtype if autocast is None else None
    name = resolve("dense_block", backend, x.device, dtype, autocast=autocast, group=bool(group))
    direct = get("dense_block", name).impl.get("direct")
    if direct is not None:
        return direct(x, layers, training, momentum, eps)
    norm1 = [list(layer[0]) for layer in layers]
    norm2 = [list(layer[2]) for layer in layers]
    conv1 = [layer[1] for layer in layers]
    conv2 = [layer[3] for layer in layers]
    y, mean1, var1, mean2, var2, _ = torch.ops.t3d.dense_block(
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
        group,
    )
    if training:
        count = x.numel() // x.shape[1]
        _update_running_stats(
            sync.total_count(count, x.device, group) if group else count,
            norm1,
            norm2,
            mean1,
            var1,
            mean2,
            var2,
            momentum,
        )
    return y


def _update_running_stats(count, norm1, norm2, mean1, var1, mean2, var2, momentum) -> None:
    """Every BN's running statistics from the concatenated batch statistics the op returns (over ``count``
    elements per channel)."""
    for norms, mean, var in ((norm1, mean1, var1), (norm2, mean2, var2)):
        off = 0
        for _, _, running_mean, running_var in norms:
            c = running_mean.numel()
            bn.update_running_stats(running_mean, running_var, mean[off : off + c], var[off : off + c], count, momentum)
            off += c
