"""The mixed-precision policy: which autocast dtype (and whether a GradScaler) a run gets on a device. Whether the
model's fused ops run under autocast is ``t3d_kernels``' answer (:func:`t3d_kernels.autocast_support`)."""

from __future__ import annotations

import torch
from torch import nn

from t3d_kernels import autocast_support

__all__ = ["amp_settings", "autocast_refusals", "fused_ops_support_autocast"]


def autocast_refusals(model: nn.Module | None, device_type: str, dtype: torch.dtype) -> list[str]:
    """Why ``model``'s fused ops cannot run under ``torch.autocast(device_type, dtype)``; empty when they can (and
    for no model, or a model without fused ops)."""
    if model is None:
        return []
    return autocast_support(model, device_type, dtype)[1]


def fused_ops_support_autocast(model: nn.Module | None, device_type: str, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether ``model`` can run under autocast in ``dtype`` on ``device_type`` (see :func:`autocast_refusals`)."""
    return not autocast_refusals(model, device_type, dtype)


def amp_settings(
    amp: str, device: torch.device, model: nn.Module | None = None
) -> tuple[bool, torch.dtype | None, bool]:
    """(autocast enabled, dtype, use GradScaler) for ``amp`` on ``device``.

    "auto": bf16 on CUDA where the GPU has it, else fp16 with a GradScaler; off on CPU, and off when ``model``'s
    fused ops refuse that dtype. An explicit "bf16" or "fp16" (any device; fp16 always with a GradScaler, which
    ``torch.amp.GradScaler("cpu")`` is on a CPU) that the model's fused ops refuse is a ValueError giving their
    reasons.
    """
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return False, None, False
    if amp == "auto":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    refusals = autocast_refusals(model, device.type, dtype)
    if refusals:
        if amp == "auto":
            return False, None, False
        raise ValueError(
            f"--amp: {amp} autocast is not supported by this model's fused ops ({'; '.join(refusals)}); use --amp off"
        )
    return True, dtype, dtype == torch.float16
