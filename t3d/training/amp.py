"""The mixed-precision policy: which autocast dtype (and whether a GradScaler) a run gets on a device, and
whether the model's fused ops can run under autocast at all."""

from __future__ import annotations

import torch
from torch import nn

from t3d_kernels import DenseBlock3d, TemporalTransition

__all__ = ["amp_settings", "fused_ops_support_autocast"]


FUSED_OPS = ("t3d::ttl", "t3d::dense_block")


def fused_ops_support_autocast(model: nn.Module | None, device_type: str) -> bool:
    """Whether ``model`` can run under autocast on ``device_type``: True when it has no t3d_kernels module, or when
    every fused op it may call has an autocast rule registered (``torch.library.register_autocast``).

    The fused ops check that BN parameters have the dtype of ``x``; without an autocast rule, a bf16 activation
    meets fp32 BN weights and the op refuses it.
    """
    if model is None:
        return True
    if not any(isinstance(m, (TemporalTransition, DenseBlock3d)) for m in model.modules()):
        return True
    key = "AutocastCUDA" if device_type == "cuda" else "AutocastCPU"
    for op in FUSED_OPS:
        try:
            if not torch._C._dispatch_has_kernel_for_dispatch_key(op, key):
                return False
        except RuntimeError:  # op not registered on this install: modules fall back to plain PyTorch
            continue
    return True


def amp_settings(
    amp: str, device: torch.device, model: nn.Module | None = None
) -> tuple[bool, torch.dtype | None, bool]:
    """(autocast enabled, dtype, use GradScaler) for ``amp`` on ``device``.

    "auto": bf16 on CUDA where supported (else fp16 + GradScaler), off on CPU, and off when ``model``'s fused ops
    have no autocast rule yet (see :func:`fused_ops_support_autocast`); an explicit "bf16"/"fp16" for such a model
    is a ValueError.
    """
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return False, None, False
    supported = fused_ops_support_autocast(model, device.type)
    if amp == "auto":
        if not supported:
            return False, None, False
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        if not supported:
            raise ValueError(
                f"--amp: {amp} autocast is not supported by this model's fused ops ({', '.join(FUSED_OPS)} have no "
                "autocast rule registered yet); use --amp off"
            )
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    if dtype == torch.float16 and device.type != "cuda":
        raise ValueError(f"--amp: fp16 autocast needs a CUDA device, got {device}; use bf16 or off")
    return True, dtype, dtype == torch.float16
