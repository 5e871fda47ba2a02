"""Argument checks shared by every backend: a clear error naming the argument, what was expected, what came."""

from __future__ import annotations

from collections.abc import Sequence

import torch

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _describe(t: torch.Tensor) -> str:
    return f"{t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"


def check_tensor(name: str, t, x: torch.Tensor, shape: Sequence[int] | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.device != x.device:
        raise ValueError(f"{name}: expected a tensor on {x.device} (the device of x), got {_describe(t)}")
    if t.dtype != x.dtype:
        raise TypeError(f"{name}: expected dtype {x.dtype} (the dtype of x), got {_describe(t)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {_describe(t)}")


def check_input(x, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(x).__name__}")
    if x.dim() != 5:
        raise ValueError(f"{name}: expected a 5-D tensor (N, C, T, H, W), got {_describe(x)}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name}: expected a floating-point tensor, got {_describe(x)}")
    if any(s == 0 for s in x.shape):
        raise ValueError(f"{name}: expected no empty dimension, got {_describe(x)}")


def check_shape_for_mode(x: torch.Tensor, training: bool, pool: bool = False) -> None:
    """What the reference refuses, refused with the argument named (the fused kernels would return a result: a
    normalized constant for one value per channel, an empty tensor for a pooled T, H or W of 1)."""
    if training and x.numel() // x.shape[1] < 2:
        raise ValueError(
            f"x: batch norm in training needs more than one value per channel (N*T*H*W >= 2), got {_describe(x)}"
        )
    if pool and min(x.shape[2:]) < 2:
        raise ValueError(f"x: pool=True (2x2x2 average pooling) needs T, H, W >= 2, got {_describe(x)}")


def check_bn(prefix: str, x: torch.Tensor, channels: int, *params) -> None:
    for pname, p in zip(("weight", "bias", "running_mean", "running_var"), params):
        check_tensor(f"{prefix}{pname}", p, x, (channels,))


def check_ttl_args(x, bn_weight, bn_bias, running_mean, running_var, weights) -> None:
    check_input(x)
    c_in = x.shape[1]
    check_bn("bn_", x, c_in, bn_weight, bn_bias, running_mean, running_var)
    if isinstance(weights, torch.Tensor) or len(weights) == 0:
        raise ValueError("weights: expected a non-empty list of 5-D branch weights (C_i, C_in, d_i, kh, kw)")
    for i, w in enumerate(weights):
        name = f"weights[{i}]"
        check_tensor(name, w, x)
        if w.dim() != 5:
            raise ValueError(f"{name}: expected a 5-D tensor (C_i, C_in, d_i, kh, kw), got {_describe(w)}")
        if w.shape[1] != c_in:
            raise ValueError(f"{name}: expected {c_in} input channels (x has C_in={c_in}), got {_describe(w)}")
        if w.shape[0] < 1 or w.shape[2] < 1:
            raise ValueError(f"{name}: expected C_i >= 1 and temporal depth d_i >= 1, got {_describe(w)}")
        if w.shape[3] % 2 == 0 or w.shape[4] % 2 == 0:
            raise ValueError(
                f"{name}: expected odd spatial kernel sizes (kh, kw) for 'same' padding, got {_describe(w)}"
            )
