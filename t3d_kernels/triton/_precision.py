"""GEMM precision of the Triton kernels: it follows the contender they replace (docs/design.md, "Precision").

cuDNN runs float32 convolutions in TF32 when ``torch.backends.cudnn.allow_tf32`` is set (PyTorch's default), so a
fused float32 kernel does too; float16/bfloat16 operands (autocast) feed ``tl.dot`` as they are; accumulation is
float32, and float64 inputs are computed and accumulated in float64 (the reference's precision: a float64 caller asked
for it, and a float32 accumulator would silently cost it 9 digits).
"""

from __future__ import annotations

import torch
import triton.language as tl

__all__ = ["acc_dtype", "dot_dtype", "precision"]


def precision(dtype: torch.dtype) -> str:
    """``input_precision`` of ``tl.dot`` for operands of ``dtype``."""
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def dot_dtype(dtype: torch.dtype):
    """The Triton dtype the GEMM operands are fed in: the half dtype itself or float64, else float32."""
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float64: tl.float64}.get(dtype, tl.float32)


def acc_dtype(dtype: torch.dtype) -> tuple[object, torch.dtype]:
    """(Triton, torch) dtype of the accumulators and partial sums for inputs of ``dtype``: float64 for float64,
    else float32."""
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)
