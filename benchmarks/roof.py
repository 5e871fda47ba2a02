"""The machine's roof measured in the run (an sgemm of a case's size, and for convolution-heavy cases the
vendor's conv3d of its main convolution) and FLOP counting."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .timing import time_callable


def sgemm_gflops(m: int, k: int, n: int, device: torch.device, dtype: torch.dtype, repeats: int = 7) -> float:
    """GFLOP/s of ``torch.mm`` of (m, k) @ (k, n) on this device, measured now: the roof of this run.

    The best of the repeats, not the median: a roof is what the machine can do, and on a shared machine the
    median mostly measures the neighbours."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device, dtype)
    b = torch.randn(k, n, generator=gen).to(device, dtype)
    timing = time_callable(lambda: torch.mm(a, b), device, repeats=repeats, warmup=1)
    return 2.0 * m * k * n / (min(timing.samples_ms) * 1e-3) / 1e9


def conv3d_gflops(
    c_in: int, c_out: int, k: int, thw: tuple[int, int, int], device: torch.device, dtype: torch.dtype, repeats: int = 7
) -> float:
    """GFLOP/s of the vendor's ``k x k x k`` 'same' conv3d (oneDNN on CPU, cuDNN on GPU) of (2, c_in, *thw) to
    c_out channels, measured now, best of the repeats. Batch 2: at batch 1 ATen sends some CPU shapes to its
    im2col path instead of oneDNN. On CPUs where the BLAS sgemm is slower than oneDNN's convolutions (MKL on AMD),
    an sgemm roof sits below what the vendor's own convolution does; a case whose work is such convolutions
    declares this one too (:attr:`benchmarks.api.Case.roof_conv`) and its roof is the larger of the two."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, c_in, *thw, generator=gen).to(device, dtype)
    w = torch.randn(c_out, c_in, k, k, k, generator=gen).to(device, dtype)
    with torch.no_grad():
        timing = time_callable(lambda: torch.nn.functional.conv3d(x, w, padding=k // 2), device, repeats, warmup=1)
    t, h, ww = thw
    return 2.0 * 2 * c_out * c_in * k**3 * t * h * ww / (min(timing.samples_ms) * 1e-3) / 1e9


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of ``fn()`` as counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions, matmuls;
    multiply-add = 2). Works on meta tensors, so an op file can count a big model's FLOPs without running it."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())
