"""Convolution gradients for the composite algorithms, with one declared fallback.

PyTorch 2.13's CPU (oneDNN) bfloat16 conv3d weight gradient returns garbage -- values of 1e30 and beyond, inf or NaN,
different on every call -- when the input has T = 2 frames and the kernel's temporal size is 3 with padding 1 (found
by T3D's last dense block at a 16-frame clip: ``t3d train --amp bf16`` gave NaN losses in 3 of 8 runs). The input
gradient and the forward are right, and float16 and float32 are right. So on CPU a bfloat16 weight gradient is
computed from the operands widened to float32 (exactly: every bfloat16 is a float32) and rounded back to bfloat16:
the same accumulation in float32 that oneDNN's bfloat16 kernels use, and on a CPU without bfloat16 matrix units no
slower. ``tests/test_regressions.py`` covers it (the dense block at T = 1-4, the TTL, a t3d_tiny training step).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["conv3d_backward", "widens_weight_grad"]


def widens_weight_grad(t: torch.Tensor) -> bool:
    """Whether a conv weight gradient over ``t`` takes the float32 fallback (bfloat16 on CPU)."""
    return t.device.type == "cpu" and t.dtype == torch.bfloat16


def conv3d_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    stride: Sequence[int] = (1, 1, 1),
    padding: Sequence[int] = (0, 0, 0),
    input_grad: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(grad_x or None, grad_w) of ``conv3d(x, w, stride, padding)`` (no bias, no dilation, one group) given the
    output gradient ``grad``; both in the operands' dtype."""
    one, zeros = [1, 1, 1], [0, 0, 0]
    stride, padding = list(stride), list(padding)
    if not widens_weight_grad(x):
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad, x, w, None, stride, padding, one, False, zeros, 1, [input_grad, True, False]
        )
        return grad_x, grad_w
    grad_x = None
    if input_grad:
        grad_x = torch.ops.aten.convolution_backward(
            grad, x, w, None, stride, padding, one, False, zeros, 1, [True, False, False]
        )[0]
    grad_w = torch.ops.aten.convolution_backward(
        grad.float(), x.float(), w.float(), None, stride, padding, one, False, zeros, 1, [False, True, False]
    )[1]
    return grad_x, grad_w.to(w.dtype)
