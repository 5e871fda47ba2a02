"""The stem convolution op ``t3d::stem_conv3d``: ``F.conv3d`` of a clip with few channels (T3D's conv0: 3 -> 64,
kernel (3, 7, 7), stride 2, padding (1, 3, 3)) whose input gradient has its own kernel.

Forward and weight gradient are ATen's (oneDNN: fast for this shape). The input gradient, needed when the clip itself
requires grad (saliency, adversarial training, a stem that is not the first layer, or the benchmark suite's training
step), is ``t3d::conv3d_input_grad``: oneDNN's backward-data for 3 input channels ran at ~55 GFLOP/s here (51 ms for
T3D-121's conv0 at 1x3x32x112x112, 2 threads, against 8 ms for its forward); the cpu kernel
(csrc/cpu/conv3d_input_grad.cpp) takes 1-4 input channels, a W stride of 2, any T/H stride, kernel and padding.
Elsewhere (other shapes, devices, dtypes) both ops run ATen's ``convolution_backward``: a declared fallback.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import _ext
from ..backends import Backend, declare, extension_reason, get, resolve
from ._checks import triple

__all__ = ["conv3d_input_grad_applies", "stem_conv3d"]


def _aten_input_grad(grad_y, weight, input_size, stride, padding):
    x = grad_y.new_empty(input_size)  # only its shape and dtype are read
    return torch.ops.aten.convolution_backward(
        grad_y, x, weight, None, stride, padding, [1, 1, 1], False, [0, 0, 0], 1, [True, False, False]
    )[0]


def _kernel_pays(dtype: torch.dtype) -> bool:
    """The float32 kernel has AVX-512 and AVX2 forms (conv0's 1x3x32x112x112 on an AVX2 Zen 3, 2 threads: 88 ms
    against oneDNN's 131 ms); without either its scalar loops are slower than ATen's, so float32 stays on ATen there
    (float64 has no faster path than the scalar loops to lose to)."""
    return dtype != torch.float32 or _ext.load().cpu_isa() in ("avx512", "avx2")


def _compiled_input_grad(grad_y, weight, input_size, stride, padding):
    return _ext.load().conv3d_input_grad(grad_y, weight, input_size, stride, padding)


def conv3d_input_grad_applies(input_size: Sequence[int], weight: torch.Tensor, stride: Sequence[int]) -> bool:
    """Whether the cpu kernel takes this conv: 1-4 input channels, W stride 2, kernel sizes of at most 16."""
    return (
        len(input_size) == 5
        and 1 <= int(input_size[1]) <= 4
        and weight.dim() == 5
        and max(weight.shape[2:]) <= 16
        and len(stride) == 3
        and int(stride[2]) == 2
    )


declare(
    "stem_conv3d",
    [
        Backend("reference", impl={"input_grad": _aten_input_grad}),
        Backend(
            "cpu",
            ("cpu",),
            frozenset((torch.float32, torch.float64)),
            extension_reason("conv3d_input_grad"),
            impl={"input_grad": _compiled_input_grad},
        ),
    ],
    auto={"cpu": ("cpu", "reference"), "default": ("reference",)},
)


# --------------------------------------------------------------------------------------------------------
# registered ops
# --------------------------------------------------------------------------------------------------------


@torch.library.custom_op("t3d::conv3d_input_grad", mutates_args=())
def _input_grad_op(
    grad_y: torch.Tensor,
    weight: torch.Tensor,
    input_size: list[int],
    stride: list[int],
    padding: list[int],
    backend: str,
) -> torch.Tensor:
    """dL/dx of ``conv3d(x, weight, stride=stride, padding=padding)`` for an x of ``input_size``; the cpu kernel where
    it applies, else ATen's."""
    if backend == "cpu" and conv3d_input_grad_applies(input_size, weight, stride) and _kernel_pays(weight.dtype):
        return get("stem_conv3d", "cpu").impl["input_grad"](grad_y, weight, input_size, stride, padding)
    return _aten_input_grad(grad_y, weight, input_size, stride, padding)


@_input_grad_op.register_fake
def _(grad_y, weight, input_size, stride, padding, backend):
    return grad_y.new_empty(input_size)


@torch.library.custom_op("t3d::stem_conv3d", mutates_args=())
def _op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    backend: str,
) -> torch.Tensor:
    return F.conv3d(x, weight, bias, stride, padding)


@_op.register_fake
def _(x, weight, bias, stride, padding, backend):
    n, _, *dims = x.shape
    out = [(d + 2 * p - k) // s + 1 for d, k, s, p in zip(dims, weight.shape[2:], stride, padding)]
    return x.new_empty([n, weight.shape[0], *out])


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, backend = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    ctx.args = (stride, padding, backend)


def _backward(ctx, grad_y):
    x, weight = ctx.saved_tensors
    stride, padding, backend = ctx.args
    grad_y = grad_y.contiguous()
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.t3d.conv3d_input_grad(grad_y, weight, list(x.shape), stride, padding, backend)
    if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
        _, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_y,
            x,
            weight,
            [weight.shape[0]] if ctx.has_bias else None,
            stride,
            padding,
            [1, 1, 1],
            False,
            [0, 0, 0],
            1,
            [False, ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]],
        )
    return grad_x, grad_w, grad_b, None, None, None


_op.register_autograd(_backward, setup_context=_setup_context)


def stem_conv3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """``F.conv3d(x, weight, bias, stride, padding)`` (groups 1, dilation 1) with the input gradient of
    :func:`conv3d_input_grad_applies` convs from the cpu kernel; the same values and gradients as ``F.conv3d`` up to
    float rounding. x: (N, C_in, T, H, W); weight: (C_out, C_in, kT, kH, kW)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        raise ValueError(f"x: expected a 5-D tensor (N, C, T, H, W), got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 5 or weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"weight: expected a 5-D tensor (C_out, {x.shape[1]}, kT, kH, kW), got {getattr(weight, 'shape', None)}"
        )
    stride, padding = triple("stride", stride), triple("padding", padding)
    if min(stride) < 1 or min(padding) < 0:
        raise ValueError(f"stride, padding: expected stride >= 1 and padding >= 0, got {stride}, {padding}")
    name = resolve("stem_conv3d", backend, x.device, x.dtype)
    if (
        name == "reference"
        or not (torch.is_grad_enabled() and x.requires_grad)
        or torch.is_autocast_enabled(x.device.type)
    ):
        # no input gradient to compute (or autocast's own conv rule applies): ATen end to end
        return F.conv3d(x, weight, bias, stride, padding)
    return torch.ops.t3d.stem_conv3d(x, weight, bias, stride, padding, name)
