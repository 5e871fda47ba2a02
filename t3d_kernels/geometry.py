"""Shapes and offsets of the fused ops, shared by every backend and by the reference (a leaf: torch only).

Temporal "same" padding of a TTL branch, the TTL's output shape and its padded source, and the channel layout of
the dense block's one buffer (docs/design.md, "Op contracts"). Kernels take their geometry from here, never from
:mod:`t3d_kernels.reference` (the ground truth they are checked against).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = [
    "TtlPadding",
    "dense_block_output_channels",
    "layer_channels",
    "same_padding",
    "temporal_padding",
    "ttl_output_shape",
    "ttl_padding",
]


def temporal_padding(depth: int) -> tuple[int, int]:
    """'Same' temporal padding (front, back) of a branch of temporal depth ``depth``.

    Front (d-1)//2, back d-1-(d-1)//2, so an even depth pads one more frame at the back
    (d=6 -> (2, 3), d=4 -> (1, 2)) and every branch keeps T frames.
    """
    if depth < 1:
        raise ValueError(f"depth: expected an integer >= 1, got {depth}")
    front = (depth - 1) // 2
    return front, depth - 1 - front


class TtlPadding(NamedTuple):
    """The zero padding of the TTL's shared source: per-branch temporal (front, back), and the maxima over the
    branches (the source is padded once, for the deepest and widest branch)."""

    branches: list[tuple[int, int]]
    front: int
    back: int
    h: int
    w: int


def ttl_padding(weights: Sequence[torch.Tensor]) -> TtlPadding:
    """Padding of the TTL source for branch weights (C_i, C_in, d_i, kh_i, kw_i); mirrors csrc/common/ttl_math.h."""
    pads = [temporal_padding(int(w.shape[2])) for w in weights]
    return TtlPadding(
        pads,
        max(p[0] for p in pads),
        max(p[1] for p in pads),
        max(int(w.shape[3]) // 2 for w in weights),
        max(int(w.shape[4]) // 2 for w in weights),
    )


def ttl_output_shape(x_shape: Sequence[int], weights: Sequence[torch.Tensor], pool: bool) -> list[int]:
    """(N, sum C_i, T//2, H//2, W//2) with ``pool``, else (N, sum C_i, T, H, W)."""
    n, _, t, h, w = x_shape
    c_out = sum(int(wt.shape[0]) for wt in weights)
    return [n, c_out, t // 2, h // 2, w // 2] if pool else [n, c_out, t, h, w]


def dense_block_output_channels(in_channels: int, conv2_weight: Sequence[torch.Tensor]) -> int:
    """C_0 + sum k_i: the channels of the dense block's buffer."""
    return in_channels + sum(int(w.shape[0]) for w in conv2_weight)


def layer_channels(c0: int, conv2_weight: Sequence[torch.Tensor]) -> list[int]:
    """C_i = C_0 + sum_{j<i} k_j, the input channels of every layer of a dense block."""
    out, c = [], c0
    for w in conv2_weight:
        out.append(c)
        c += int(w.shape[0])
    return out


def same_padding(w: torch.Tensor) -> tuple[int, int, int]:
    """'Same' padding of an odd-sized conv weight (C_out, C_in, kt, kh, kw)."""
    return int(w.shape[2]) // 2, int(w.shape[3]) // 2, int(w.shape[4]) // 2
