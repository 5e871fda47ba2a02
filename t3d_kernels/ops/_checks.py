"""Argument checks shared by every backend: a clear error naming the argument, what was expected, what came."""

from __future__ import annotations

from collections.abc import Sequence

import torch

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def triple(name: str, v: int | Sequence[int]) -> list[int]:
    """An int or 3 ints (T, H, W) -> 3 ints; a clear ValueError naming ``name`` otherwise."""
    vals = [int(v)] * 3 if isinstance(v, int) else [int(u) for u in v]
    if len(vals) != 3:
        raise ValueError(f"{name}: expected an int or 3 ints (T, H, W), got {v!r}")
    return vals


def _describe(t: torch.Tensor) -> str:
    return f"{t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"


def check_tensor(
    name: str, t, x: torch.Tensor, shape: Sequence[int] | None = None, bn: bool = False, cast: bool = False
) -> None:
    """``t`` is a tensor on x's device, of x's dtype (``bn``: a BN parameter or statistic, which may also be float32
    when x is float16/bfloat16, as under autocast; ``cast``: any floating dtype, the autocast rule casts it) and, if
    given, of ``shape``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.device != x.device:
        raise ValueError(f"{name}: expected a tensor on {x.device} (the device of x), got {_describe(t)}")
    mixed_bn = bn and x.dtype in (torch.float16, torch.bfloat16) and t.dtype == torch.float32
    if t.dtype != x.dtype and not mixed_bn and not (cast and t.is_floating_point()):
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
        check_tensor(f"{prefix}{pname}", p, x, (channels,), bn=True)


def check_ttl_args(x, bn_weight, bn_bias, running_mean, running_var, weights, autocast: bool = False) -> None:
    """``autocast``: an autocast rule casts x and the weights, so their dtypes may differ."""
    check_input(x)
    c_in = x.shape[1]
    check_bn("bn_", x, c_in, bn_weight, bn_bias, running_mean, running_var)
    if isinstance(weights, torch.Tensor) or len(weights) == 0:
        raise ValueError("weights: expected a non-empty list of 5-D branch weights (C_i, C_in, d_i, kh, kw)")
    for i, w in enumerate(weights):
        name = f"weights[{i}]"
        check_tensor(name, w, x, cast=autocast)
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


def check_dense_block_args(x, layers, autocast: bool = False) -> None:
    """The arguments of :func:`t3d_kernels.dense_block`; ``autocast``: the conv weights may differ in dtype."""
    check_input(x)
    if isinstance(layers, torch.Tensor) or len(layers) == 0:
        raise ValueError("layers: expected a non-empty sequence of (norm1, conv1_weight, norm2, conv2_weight)")
    c = int(x.shape[1])
    for i, layer in enumerate(layers):
        if len(layer) != 4:
            raise ValueError(
                f"layers[{i}]: expected (norm1, conv1_weight, norm2, conv2_weight), got {len(layer)} items"
            )
        norm1, w1, norm2, w2 = layer
        check_tensor(f"layers[{i}].conv1_weight", w1, x, cast=autocast)
        if w1.dim() != 5 or w1.shape[1] != c or tuple(w1.shape[2:]) != (1, 1, 1):
            raise ValueError(
                f"layers[{i}].conv1_weight: expected shape (B, {c}, 1, 1, 1) (layer {i} reads C_0 + sum of earlier "
                f"growths = {c} channels), got {_describe(w1)}"
            )
        bott = int(w1.shape[0])
        check_tensor(f"layers[{i}].conv2_weight", w2, x, cast=autocast)
        if w2.dim() != 5 or w2.shape[1] != bott or any(s % 2 == 0 for s in w2.shape[2:]) or w2.shape[0] < 1:
            raise ValueError(
                f"layers[{i}].conv2_weight: expected shape (k, {bott}, kt, kh, kw) with odd kernel sizes, got "
                f"{_describe(w2)}"
            )
        for name, norm, channels in (("norm1", norm1, c), ("norm2", norm2, bott)):
            if len(norm) != 4:
                raise ValueError(f"layers[{i}].{name}: expected (weight, bias, running_mean, running_var)")
            for pname, p in zip(("weight", "bias", "running_mean", "running_var"), norm, strict=True):
                check_tensor(f"layers[{i}].{name}.{pname}", p, x, (channels,), bn=True)
        c += int(w2.shape[0])
