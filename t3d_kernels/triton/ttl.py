"""Triton kernels of the fused TTL (docs/design.md, "The pool-first algebra"): pool first through a box filter,
then stride-2 implicit GEMMs.

Forward, with z = relu(bn(x)) and zp its zero padding (temporal front/back of the deepest branch, spatial by
the largest kh/2, kw/2):

1. ``_bn_relu_box_kernel``: one pass over x writes src = box(zp) (the forward 2x2x2 window mean; zp itself
   with ``pool=False``) **channels-last** (N, Ts, Hs, Ws, C_in), so that a GEMM K-slice is contiguous.
2. ``_conv_fwd_kernel`` per branch: implicit GEMM, M = N*To*Ho*Wo output positions, N = C_i, K = taps*C_in,
   reading src at stride 2 from the branch's origin (the branches differ only by a temporal offset), writing
   its channel slice of the one output buffer (no concat). Split-K over taps (fp32 atomics) when the grid
   would otherwise leave most SMs idle (TTL 3 has M = 98 at batch 1).

Backward (src is recomputed, never saved):

3. ``_conv_wgrad_kernel`` per branch: grad W[tap, ci, co] = sum over positions of src * grad_y (split over M
   with atomics when the grid is small).
4. ``_conv_dgrad_kernel`` per branch: grad src, the stride-2 transposed conv in gather form, one parity class
   of src positions per grid slice (each class sees a fixed subset of taps, so no work is masked away);
   branches accumulate into one fp32 channels-last buffer, each position written by exactly one program.
5. ``_box_adjoint_bn_bwd_kernel``: the box filter's adjoint (backward 2-window sum), the ReLU mask and BN
   backward; in training a first pass accumulates the per-channel sums that BN's backward needs.

Accumulation is fp32 (fp64 for fp64 inputs); fp16/bf16 tensors feed ``tl.dot`` directly; fp32 uses TF32 when
``torch.backends.cudnn.allow_tf32`` is set, as cuDNN's own convolutions do (the contender it replaces).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..geometry import ttl_padding
from ._precision import precision as _precision

__all__ = ["forward", "backward"]

# Tests set this to force the split-K / split-M (atomic) paths on tiny shapes; None = heuristic.
_split_override: int | None = None


# --------------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _fold_bn(gamma_ptr, beta_ptr, mean_ptr, var_ptr, eps, offs_c, c_mask, ACC: tl.constexpr):
    # folded in the kernels rather than by torch ops on the host: each of those costs a launch
    gamma = tl.load(gamma_ptr + offs_c, mask=c_mask, other=0.0).to(ACC)
    beta = tl.load(beta_ptr + offs_c, mask=c_mask, other=0.0).to(ACC)
    mean = tl.load(mean_ptr + offs_c, mask=c_mask, other=0.0).to(ACC)
    var = tl.load(var_ptr + offs_c, mask=c_mask, other=1.0).to(ACC)
    invstd = 1.0 / tl.sqrt(var + eps)
    scale = gamma * invstd
    return scale, beta - mean * scale, mean, invstd


@triton.jit
def _bn_relu_box_kernel(
    x_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, eps, src_ptr,
    C, T, H, W, Ts, Hs, Ws, front, ph, pw,
    sxn, sxc, sxt, sxh, sxw,
    NTAPS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    n_src = Ts * Hs * Ws
    p_mask = offs_p < n_src
    c_mask = offs_c < C
    ws = offs_p % Ws
    hs = (offs_p // Ws) % Hs
    ts = offs_p // (Ws * Hs)
    scale, shift, _, _ = _fold_bn(gamma_ptr, beta_ptr, mean_ptr, var_ptr, eps, offs_c, c_mask, ACC)
    x_base = x_ptr + n * sxn + offs_c[None, :].to(tl.int64) * sxc
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    for a in tl.static_range(NTAPS):
        t = ts + (a // 4) - front
        h = hs + ((a // 2) % 2) - ph
        w = ws + (a % 2) - pw
        inside = p_mask & (t >= 0) & (t < T) & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        off = t.to(tl.int64) * sxt + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw
        mask = inside[:, None] & c_mask[None, :]
        xv = tl.load(x_base + off[:, None], mask=mask, other=0.0).to(ACC)
        # the zero padding is zero *after* BN-ReLU, hence the where (relu(shift) need not be 0)
        acc += tl.where(mask, tl.maximum(xv * scale[None, :] + shift[None, :], 0.0), 0.0)
    if NTAPS == 8:
        acc = acc * 0.125
    dst = src_ptr + (n * n_src + offs_p[:, None]) * C + offs_c[None, :]
    tl.store(dst, acc.to(src_ptr.dtype.element_ty), mask=p_mask[:, None] & c_mask[None, :])


@triton.jit
def _conv_fwd_kernel(
    src_ptr, w_ptr, y_ptr,
    M, C_in, C_br, C_total, c_off,
    To, Ho, Wo, Ts, Hs, Ws, t0, h0, w0,
    KH, KW, n_taps, taps_per_split,
    STRIDE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ATOMIC: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < C_br
    wo = offs_m % Wo
    ho = (offs_m // Wo) % Ho
    n_pos = To * Ho * Wo
    p = offs_m % n_pos
    to = p // (Wo * Ho)
    nb = (offs_m // n_pos).to(tl.int64)
    row = (((nb * Ts + t0 + STRIDE * to) * Hs + h0 + STRIDE * ho) * Ws + w0 + STRIDE * wo) * C_in
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    tap_lo = pid_k * taps_per_split
    tap_hi = tl.minimum(tap_lo + taps_per_split, n_taps)
    for tap in range(tap_lo, tap_hi):
        dw = tap % KW
        dh = (tap // KW) % KH
        dt = tap // (KW * KH)
        tap_off = ((dt * Hs + dh) * Ws + dw) * C_in
        for k0 in range(0, C_in, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < C_in
            a_mask = m_mask[:, None] & k_mask[None, :]
            a = tl.load(src_ptr + row[:, None] + tap_off + offs_k[None, :], mask=a_mask, other=0.0)
            b = tl.load(
                w_ptr + (tap * C_in + offs_k)[:, None] * C_br + offs_n[None, :],
                mask=k_mask[:, None] & n_mask[None, :],
                other=0.0,
            )
            acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
    dst = y_ptr + (nb[:, None] * C_total + c_off + offs_n[None, :]) * n_pos + p[:, None]
    mask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(dst, acc, mask=mask)
    else:
        tl.store(dst, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv_wgrad_kernel(
    src_ptr, gy_ptr, gw_ptr,
    M, C_in, C_br, C_total, c_off,
    To, Ho, Wo, Ts, Hs, Ws, t0, h0, w0,
    KH, KW, m_per_split,
    STRIDE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
    ATOMIC: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    ci_tiles = tl.cdiv(C_in, BLOCK_CI)
    pid0 = tl.program_id(0)
    tap = pid0 // ci_tiles
    offs_ci = (pid0 % ci_tiles) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    offs_co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    pid_s = tl.program_id(2)
    ci_mask = offs_ci < C_in
    co_mask = offs_co < C_br
    dw = tap % KW
    dh = (tap // KW) % KH
    dt = tap // (KW * KH)
    n_pos = To * Ho * Wo
    acc = tl.zeros([BLOCK_CI, BLOCK_CO], dtype=ACC)
    m_lo = pid_s * m_per_split
    m_hi = tl.minimum(m_lo + m_per_split, M)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_hi
        wo = offs_m % Wo
        ho = (offs_m // Wo) % Ho
        p = offs_m % n_pos
        to = p // (Wo * Ho)
        nb = (offs_m // n_pos).to(tl.int64)
        row = (((nb * Ts + t0 + STRIDE * to + dt) * Hs + h0 + STRIDE * ho + dh) * Ws + w0 + STRIDE * wo + dw) * C_in
        a_t = tl.load(src_ptr + row[None, :] + offs_ci[:, None], mask=ci_mask[:, None] & m_mask[None, :], other=0.0)
        g = tl.load(
            gy_ptr + (nb[:, None] * C_total + c_off + offs_co[None, :]) * n_pos + p[:, None],
            mask=m_mask[:, None] & co_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(a_t, g.to(a_t.dtype), acc, input_precision=PRECISION, out_dtype=ACC)
    dst = gw_ptr + (tap * C_in + offs_ci[:, None]) * C_br + offs_co[None, :]
    mask = ci_mask[:, None] & co_mask[None, :]
    if ATOMIC:
        tl.atomic_add(dst, acc, mask=mask)
    else:
        tl.store(dst, acc.to(gw_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv_dgrad_kernel(
    gy_ptr, wt_ptr, gsrc_ptr,
    M_q, C_in, C_br, C_total, c_off,
    To, Ho, Wo, Ts, Hs, Ws, t0, h0, w0,
    D, KH, KW, Qt, Qh, Qw, Lt, Lh, Lw,
    STRIDE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    # src position r = STRIDE*q + parity along each dim; r = STRIDE*o + tap, so the taps that reach it are
    # tap = parity + STRIDE*k with o = q - k: a stride-1 correlation per parity class.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    cls = tl.program_id(2)
    pt = cls // 4
    phh = (cls // 2) % 2
    pww = cls % 2
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < C_in
    qw = offs_m % Qw
    qh = (offs_m // Qw) % Qh
    qt = (offs_m // (Qw * Qh)) % Qt
    nb = (offs_m // (Qw * Qh * Qt)).to(tl.int64)
    rt = STRIDE * qt + pt
    rh = STRIDE * qh + phh
    rw = STRIDE * qw + pww
    row_ok = (offs_m < M_q) & (rt < Lt) & (rh < Lh) & (rw < Lw)
    n_kt = (D - pt + STRIDE - 1) // STRIDE
    n_kh = (KH - phh + STRIDE - 1) // STRIDE
    n_kw = (KW - pww + STRIDE - 1) // STRIDE
    n_pos = To * Ho * Wo
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for tap in range(0, n_kt * n_kh * n_kw):
        kw_ = tap % n_kw
        kh_ = (tap // n_kw) % n_kh
        kt_ = tap // (n_kw * n_kh)
        to = qt - kt_
        ho = qh - kh_
        wo = qw - kw_
        ok = row_ok & (to >= 0) & (to < To) & (ho >= 0) & (ho < Ho) & (wo >= 0) & (wo < Wo)
        gy_row = nb * C_total * n_pos + (to * Ho + ho) * Wo + wo
        w_tap = ((pt + STRIDE * kt_) * KH + phh + STRIDE * kh_) * KW + pww + STRIDE * kw_
        for k0 in range(0, C_br, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < C_br
            a = tl.load(
                gy_ptr + gy_row[:, None] + (c_off + offs_k[None, :]).to(tl.int64) * n_pos,
                mask=ok[:, None] & k_mask[None, :],
                other=0.0,
            )
            b = tl.load(
                wt_ptr + (w_tap * C_br + offs_k)[:, None] * C_in + offs_n[None, :],
                mask=k_mask[:, None] & n_mask[None, :],
                other=0.0,
            )
            acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
    dst = gsrc_ptr + (((nb * Ts + t0 + rt) * Hs + h0 + rh) * Ws + w0 + rw)[:, None] * C_in + offs_n[None, :]
    mask = row_ok[:, None] & n_mask[None, :]
    # earlier branches already wrote here; within this launch every position belongs to one program
    tl.store(dst, tl.load(dst, mask=mask, other=0.0) + acc, mask=mask)


@triton.jit
def _box_adjoint_bn_bwd_kernel(
    gsrc_ptr, x_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, eps, sums_ptr, gx_ptr,
    C, T, H, W, Ts, Hs, Ws, front, ph, pw, count,
    sxn, sxc, sxt, sxh, sxw,
    NTAPS: tl.constexpr, MODE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    # MODE 0: training pass 1, per-channel sums only; 1: training pass 2, grad_x from the sums;
    # 2: eval, grad_x and the sums in one pass. sums_ptr holds [sum grad_pre (C), sum grad_pre * xhat (C)].
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    n_in = T * H * W
    p_mask = offs_p < n_in
    c_mask = offs_c < C
    mask = p_mask[:, None] & c_mask[None, :]
    w = offs_p % W
    h = (offs_p // W) % H
    t = offs_p // (W * H)
    g = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    for a in tl.static_range(NTAPS):
        # adjoint of src[v] = mean zp[v + a]: zp[u] receives src[u - a]
        vt = t + front - (a // 4)
        vh = h + ph - ((a // 2) % 2)
        vw = w + pw - (a % 2)
        ok = p_mask & (vt >= 0) & (vh >= 0) & (vw >= 0)
        src_off = ((n * Ts + vt) * Hs + vh) * Ws + vw
        g += tl.load(gsrc_ptr + src_off[:, None] * C + offs_c[None, :], mask=ok[:, None] & c_mask[None, :], other=0.0)
    if NTAPS == 8:
        g = g * 0.125
    x_off = n * sxn + offs_c[None, :].to(tl.int64) * sxc + (t.to(tl.int64) * sxt + h * sxh + w * sxw)[:, None]
    xv = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(ACC)
    scale, shift, mean, invstd = _fold_bn(gamma_ptr, beta_ptr, mean_ptr, var_ptr, eps, offs_c, c_mask, ACC)
    g = tl.where(mask & (xv * scale[None, :] + shift[None, :] > 0.0), g, 0.0)
    xhat = (xv - mean[None, :]) * invstd[None, :]
    if MODE != 1:
        tl.atomic_add(sums_ptr + offs_c, tl.sum(g, axis=0), mask=c_mask)
        tl.atomic_add(sums_ptr + C + offs_c, tl.sum(g * xhat, axis=0), mask=c_mask)
    if MODE != 0:
        if MODE == 1:
            sum_g = tl.load(sums_ptr + offs_c, mask=c_mask, other=0.0)
            sum_gx = tl.load(sums_ptr + C + offs_c, mask=c_mask, other=0.0)
            gx = scale[None, :] * (g - sum_g[None, :] / count - xhat * (sum_gx[None, :] / count))
        else:
            gx = g * scale[None, :]
        dst = gx_ptr + (n * C + offs_c[None, :]) * n_in + offs_p[:, None]
        tl.store(dst, gx.to(gx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------------


def _interpreted(device: torch.device) -> bool:
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    # enough programs for two waves over the SMs; the interpreter runs them one by one, so one is plenty
    if _interpreted(device):
        return 1
    return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float64) else torch.float32


class _Geometry:
    """Shapes and offsets shared by all kernels; mirrors ``TtlGeometry`` in csrc/common/ttl_math.h."""

    def __init__(self, x: torch.Tensor, weights: Sequence[torch.Tensor], pool: bool):
        self.N, self.C, self.T, self.H, self.W = (int(s) for s in x.shape)
        pad = ttl_padding(weights)
        self.front, self.back, self.ph, self.pw = pad.front, pad.back, pad.h, pad.w
        self.Ts, self.Hs, self.Ws = self.T + self.front + self.back, self.H + 2 * self.ph, self.W + 2 * self.pw
        self.pool = pool
        self.stride = 2 if pool else 1
        self.To, self.Ho, self.Wo = (self.T // 2, self.H // 2, self.W // 2) if pool else (self.T, self.H, self.W)
        self.M = self.N * self.To * self.Ho * self.Wo
        self.c_total = sum(int(w.shape[0]) for w in weights)
        self.branches = []
        c_off = 0
        for w, (f, _) in zip(weights, pad.branches, strict=False):
            c_br, _, d, kh, kw = (int(s) for s in w.shape)
            origin = (self.front - f, self.ph - kh // 2, self.pw - kw // 2)
            self.branches.append((c_off, c_br, d, kh, kw, origin))
            c_off += c_br


def _box_source(x, bn, eps, g: _Geometry, dtype) -> torch.Tensor:
    """src = box(zero-padded relu(bn(x))) (or the padded z), channels-last (N, Ts, Hs, Ws, C_in)."""
    src = torch.empty((g.N, g.Ts, g.Hs, g.Ws, g.C), device=x.device, dtype=dtype)
    block_p, block_c = (64, _pow2(g.C, 16, 32)) if not _interpreted(x.device) else (64, _pow2(g.C, 16, 64))
    grid = (triton.cdiv(g.Ts * g.Hs * g.Ws, block_p), triton.cdiv(g.C, block_c), g.N)
    _bn_relu_box_kernel[grid](
        x, *bn, eps, src,
        g.C, g.T, g.H, g.W, g.Ts, g.Hs, g.Ws, g.front, g.ph, g.pw,
        *x.stride(),
        NTAPS=8 if g.pool else 1, BLOCK_P=block_p, BLOCK_C=block_c, ACC=_acc_dtype(dtype),
    )  # fmt: skip
    return src


def _fwd_config(g: _Geometry, c_br: int, dtype: torch.dtype, device: torch.device):
    if _interpreted(device):
        return dict(BLOCK_M=32, BLOCK_N=_pow2(c_br, 16, 64), BLOCK_K=_pow2(g.C, 16, 32), num_warps=4, num_stages=1)
    half = dtype in (torch.float16, torch.bfloat16)
    return dict(
        BLOCK_M=128 if g.M >= 1024 else 64,
        BLOCK_N=_pow2(c_br, 16, 128),
        BLOCK_K=min(64 if half else 32, _pow2(g.C, 16, 64)),
        num_warps=4,
        num_stages=3,
    )


def _wgrad_config(g: _Geometry, c_br: int, device: torch.device) -> tuple[int, int, int, int, int]:
    """BLOCK_M (positions reduced per step), BLOCK_CI, BLOCK_CO, num_warps, num_stages of the weight gradient."""
    if _interpreted(device):
        return 32, _pow2(g.C, 16, 32), _pow2(c_br, 16, 32), 4, 1
    return 64, _pow2(g.C, 16, 64), _pow2(c_br, 16, 64), 4, 3


def _dgrad_config(g: _Geometry, c_br: int, device: torch.device) -> tuple[int, int, int, int, int]:
    """BLOCK_M (src positions of a parity class), BLOCK_N (C_in), BLOCK_K (C_i), num_warps, num_stages."""
    if _interpreted(device):
        return 32, _pow2(g.C, 16, 64), _pow2(c_br, 16, 32), 4, 1
    return 64, _pow2(g.C, 16, 128), min(_pow2(c_br, 16, 64), 32), 4, 3


def _split(work_programs: int, max_split: int, device: torch.device) -> int:
    if _split_override is not None:
        return max(1, min(_split_override, max_split))
    return max(1, min(max_split, _target_programs(device) // max(work_programs, 1)))


def forward(
    x: torch.Tensor,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weights: Sequence[torch.Tensor],
    pool: bool,
    eps: float,
) -> torch.Tensor:
    """TTL forward with the given BN statistics (no running-stat update).

    x: (N, C_in, T, H, W) (any strides); bn_*, mean, var: (C_in,); weights[i]: (C_i, C_in, d_i, kh_i, kw_i).
    Returns (N, sum C_i, T//2, H//2, W//2) with ``pool``, else (N, sum C_i, T, H, W), in x's dtype.
    """
    g = _Geometry(x, weights, pool)
    dtype = _compute_dtype(x.dtype)
    acc = _acc_dtype(dtype)
    acc_torch = torch.float64 if dtype == torch.float64 else torch.float32
    y_shape = (g.N, g.c_total, g.To, g.Ho, g.Wo)
    if g.M == 0:
        return x.new_zeros(y_shape)
    bn = [t.contiguous() for t in (bn_weight, bn_bias, mean, var)]
    src = _box_source(x, bn, eps, g, dtype)
    plans = []
    for w, (c_off, c_br, d, kh, kw, origin) in zip(weights, g.branches, strict=False):
        cfg = _fwd_config(g, c_br, dtype, x.device)
        grid_mn = triton.cdiv(g.M, cfg["BLOCK_M"]) * triton.cdiv(c_br, cfg["BLOCK_N"])
        n_taps = d * kh * kw
        split = _split(grid_mn, n_taps, x.device)
        plans.append((w, c_off, c_br, d, kh, kw, origin, cfg, split))
    atomic = any(p[-1] > 1 for p in plans)
    # split-K partial sums meet in an accumulator-precision buffer
    y = torch.zeros(y_shape, device=x.device, dtype=acc_torch) if atomic else x.new_empty(y_shape)
    for w, c_off, c_br, d, kh, kw, (t0, h0, w0), cfg, split in plans:
        n_taps = d * kh * kw
        # (tap, ci, co): a K-slice of the GEMM's B operand is contiguous
        w_k = w.to(dtype).permute(2, 3, 4, 1, 0).contiguous()
        taps_per_split = triton.cdiv(n_taps, split)
        split = triton.cdiv(n_taps, taps_per_split)
        grid = (triton.cdiv(g.M, cfg["BLOCK_M"]), triton.cdiv(c_br, cfg["BLOCK_N"]), split)
        _conv_fwd_kernel[grid](
            src, w_k, y,
            g.M, g.C, c_br, g.c_total, c_off,
            g.To, g.Ho, g.Wo, g.Ts, g.Hs, g.Ws, t0, h0, w0,
            kh, kw, n_taps, taps_per_split,
            STRIDE=g.stride, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
            ATOMIC=atomic, PRECISION=_precision(dtype), ACC=acc,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )  # fmt: skip
    return y.to(x.dtype) if y.dtype != x.dtype else y


def backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weights: Sequence[torch.Tensor],
    pool: bool,
    training: bool,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Gradients of :func:`forward`: (grad_x, grad_bn_weight, grad_bn_bias, [grad_weights[i]]).

    grad_y: the output's shape; ``training`` says whether mean/var are x's batch statistics (BN backward then
    includes their dependence on x) or constants (eval).
    """
    g = _Geometry(x, weights, pool)
    dtype = _compute_dtype(x.dtype)
    acc = _acc_dtype(dtype)
    acc_torch = torch.float64 if dtype == torch.float64 else torch.float32
    precision = _precision(dtype)
    interp = _interpreted(x.device)
    bn = [t.contiguous() for t in (bn_weight, bn_bias, mean, var)]
    src = _box_source(x, bn, eps, g, dtype)
    gy = grad_y.to(dtype).contiguous()
    grad_src = torch.zeros((g.N, g.Ts, g.Hs, g.Ws, g.C), device=x.device, dtype=acc_torch)
    grad_weights = []
    for w, (c_off, c_br, d, kh, kw, (t0, h0, w0)) in zip(weights, g.branches, strict=False):
        n_taps = d * kh * kw
        # --- grad W: (tap, ci, co) = sum over positions src * grad_y
        block_m, block_ci, block_co, nw, ns = _wgrad_config(g, c_br, x.device)
        work = n_taps * triton.cdiv(g.C, block_ci) * triton.cdiv(c_br, block_co)
        split = _split(work, triton.cdiv(g.M, block_m), x.device)
        m_per_split = triton.cdiv(triton.cdiv(g.M, split), block_m) * block_m
        split = triton.cdiv(g.M, m_per_split) if g.M > 0 else 1
        atomic = split > 1
        gw = torch.zeros((n_taps, g.C, c_br), device=x.device, dtype=acc_torch if atomic else w.dtype)
        if g.M > 0:
            grid = (n_taps * triton.cdiv(g.C, block_ci), triton.cdiv(c_br, block_co), split)
            _conv_wgrad_kernel[grid](
                src, gy, gw,
                g.M, g.C, c_br, g.c_total, c_off,
                g.To, g.Ho, g.Wo, g.Ts, g.Hs, g.Ws, t0, h0, w0,
                kh, kw, m_per_split,
                STRIDE=g.stride, BLOCK_M=block_m, BLOCK_CI=block_ci, BLOCK_CO=block_co,
                ATOMIC=atomic, PRECISION=precision, ACC=acc, num_warps=nw, num_stages=ns,
            )  # fmt: skip
        grad_weights.append(gw.view(d, kh, kw, g.C, c_br).permute(4, 3, 0, 1, 2).contiguous().to(w.dtype))
        # --- grad src: the stride-s transposed conv, gathered per parity class
        if g.M == 0:
            continue
        s = g.stride
        lt, lh, lw = s * (g.To - 1) + d, s * (g.Ho - 1) + kh, s * (g.Wo - 1) + kw
        qt, qh, qw = triton.cdiv(lt, s), triton.cdiv(lh, s), triton.cdiv(lw, s)
        m_q = g.N * qt * qh * qw
        block_m, block_n, block_k, nw, ns = _dgrad_config(g, c_br, x.device)
        w_t = w.to(dtype).permute(2, 3, 4, 0, 1).contiguous()  # (tap, co, ci)
        grid = (triton.cdiv(m_q, block_m), triton.cdiv(g.C, block_n), 8 if s == 2 else 1)
        _conv_dgrad_kernel[grid](
            gy, w_t, grad_src,
            m_q, g.C, c_br, g.c_total, c_off,
            g.To, g.Ho, g.Wo, g.Ts, g.Hs, g.Ws, t0, h0, w0,
            d, kh, kw, qt, qh, qw, lt, lh, lw,
            STRIDE=s, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            PRECISION=precision, ACC=acc, num_warps=nw, num_stages=ns,
        )  # fmt: skip
    # --- box adjoint, ReLU mask, BN backward
    grad_x = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    sums = torch.zeros(2 * g.C, device=x.device, dtype=acc_torch)
    block_p, block_c = (64, _pow2(g.C, 16, 32)) if not interp else (64, _pow2(g.C, 16, 64))
    grid = (triton.cdiv(g.T * g.H * g.W, block_p), triton.cdiv(g.C, block_c), g.N)
    count = float(g.N * g.T * g.H * g.W)
    for mode in (0, 1) if training else (2,):
        _box_adjoint_bn_bwd_kernel[grid](
            grad_src, x, *bn, eps, sums, grad_x,
            g.C, g.T, g.H, g.W, g.Ts, g.Hs, g.Ws, g.front, g.ph, g.pw, count,
            *x.stride(),
            NTAPS=8 if pool else 1, MODE=mode, BLOCK_P=block_p, BLOCK_C=block_c, ACC=acc,
        )  # fmt: skip
    # copies: the op's outputs may not alias each other
    grad_bn_bias = sums[: g.C].to(bn_bias.dtype, copy=True)
    grad_bn_weight = sums[g.C :].to(bn_weight.dtype, copy=True)
    return grad_x, grad_bn_weight, grad_bn_bias, grad_weights
