"""GEMM precision of the Triton kernels: it follows the contender they replace (docs/design.md, "Precision").

cuDNN runs float32 convolutions in TF32 when ``torch.backends.cudnn.allow_tf32`` is set (PyTorch's default), so a
fused float32 kernel does too; float16/bfloat16 operands (autocast) feed ``tl.dot`` as they are; accumulation is
float32 (float64 inputs: see each kernel).
"""

from __future__ import annotations

import torch
import triton.language as tl

__all__ = ["dot_dtype", "precision"]


def precision(dtype: torch.dtype) -> str:
    """``input_precision`` of ``tl.dot`` for operands of ``dtype``."""
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def dot_dtype(dtype: torch.dtype):
    """The Triton dtype the GEMM operands are fed in: the half dtype itself, else float32."""
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(dtype, tl.float32)
