"""Triton kernels of the fused dense block (docs/design.md, "Dense block"); the orchestration is the composite
algorithm (:func:`t3d_kernels.composite.dense_block.algorithm_forward` / ``algorithm_backward``) with these kernels
plugged in.

- ``_channel_stats_kernel``: batch mean and M2 of a channel (two passes over the channel in the program), once per
  channel when it is written (buffer channels) or per layer (bottleneck).
- ``_bn_relu_conv1x1_kernel``: h = W1 @ relu(x * scale + shift), BN-ReLU applied to the x tile as it is loaded for
  ``tl.dot``: nothing normalized is written. x is the prefix of the shared buffer, read in place.
- ``_bn_relu_kernel``: z2 = relu(h * scale + shift) for cuDNN's 3x3x3 conv (forward and its backward are cuDNN's).
- ``_bn_relu_bwd_sums_kernel`` / ``_bn_relu_bwd_apply_kernel``: BN2-ReLU backward (two per-channel sums, then the
  elementwise formula; the ReLU mask is recomputed from h).
- ``_conv1x1_dgrad_kernel``: dL/dz = W1^T @ dL/dh with the BN1-ReLU backward's local part in the epilogue: the ReLU
  mask recomputed from x, ``grad_prefix += scale * gp`` (each element owned by one program: no atomics), and
  per-program partial sums of gp and gp * (x - mean) (reduced in float64 by the caller: deterministic).
- ``_conv1x1_wgrad_kernel``: dL/dW1 = dL/dh @ relu(x * scale + shift)^T, normalizing x on load again.

GEMM precision follows the contender (cuDNN's 1x1x1 convolution): float32 operands in TF32 when
``torch.backends.cudnn.allow_tf32`` is set, else IEEE float32; float16/bfloat16 operands (autocast) as they are;
accumulation float32, except float64 inputs: computed and accumulated in float64 (:mod:`._precision`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..composite.bn import affine_correction
from ..composite.dense_block import CompositeKernels, algorithm_backward, algorithm_forward
from ._precision import acc_dtype, dot_dtype, precision

__all__ = ["forward", "backward", "TritonKernels"]

_BLOCK_P = 64
_BLOCK_M = 32  # output-channel tile of the GEMMs
_BLOCK_K = 32  # reduction tile of the GEMMs
_BLOCK_STATS = 256

# Tests set this to force the split-K path of the conv1 weight gradient on tiny shapes; None = heuristic.
_split_override: int | None = None


@triton.jit
def _channel_stats_kernel(x_ptr, part_ptr, P, SPLIT, stride_n, stride_c, BLOCK: tl.constexpr, ACC: tl.constexpr):
    # one program per (channel, sample, slice of SPLIT positions): its count, mean and M2 (two passes over the
    # slice), merged by the caller (Chan et al.) in float64
    c, n, k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs = tl.arange(0, BLOCK)
    base = x_ptr + n * stride_n + c * stride_c
    p_begin = k * SPLIT
    p_end = tl.minimum(p_begin + SPLIT, P)
    acc = tl.zeros([BLOCK], dtype=ACC)
    for p0 in range(p_begin, p_end, BLOCK):
        v = tl.load(base + p0 + offs, mask=p0 + offs < p_end, other=0.0)
        acc += v.to(ACC)
    count = (p_end - p_begin).to(ACC)
    mean = tl.sum(acc, axis=0) / count
    acc2 = tl.zeros([BLOCK], dtype=ACC)
    for p0 in range(p_begin, p_end, BLOCK):
        m = p0 + offs < p_end
        d = tl.where(m, tl.load(base + p0 + offs, mask=m, other=0.0).to(ACC) - mean, 0.0)
        acc2 += d * d
    row = (c * tl.num_programs(1) + n) * tl.num_programs(2) + k
    tl.store(part_ptr + row * 3, count)
    tl.store(part_ptr + row * 3 + 1, mean)
    tl.store(part_ptr + row * 3 + 2, tl.sum(acc2, axis=0))


@triton.jit
def _bn_relu_conv1x1_kernel(
    x_ptr,
    scale_ptr,
    shift_ptr,
    w_ptr,
    out_ptr,
    C,
    B,
    P,
    stride_xn,
    stride_xc,
    stride_on,
    stride_oc,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT: tl.constexpr,
    ACC: tl.constexpr,
):
    pid_p, pid_b, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_b = pid_b * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    acc = tl.zeros([BLOCK_M, BLOCK_P], dtype=ACC)
    for c0 in range(0, C, BLOCK_K):
        offs_c = c0 + tl.arange(0, BLOCK_K)
        mc = offs_c < C
        w = tl.load(w_ptr + offs_b[:, None] * C + offs_c[None, :], mask=(offs_b[:, None] < B) & mc[None, :], other=0.0)
        m = mc[:, None] & (offs_p[None, :] < P)
        x = tl.load(x_ptr + n * stride_xn + offs_c[:, None] * stride_xc + offs_p[None, :], mask=m, other=0.0)
        s = tl.load(scale_ptr + offs_c, mask=mc, other=0.0)
        t = tl.load(shift_ptr + offs_c, mask=mc, other=0.0)
        z = tl.where(m, tl.maximum(x * s[:, None] + t[:, None], 0.0), 0.0)
        acc = tl.dot(w.to(DOT), z.to(DOT), acc, input_precision=PRECISION, out_dtype=ACC)
    mask = (offs_b[:, None] < B) & (offs_p[None, :] < P)
    ptrs = out_ptr + n * stride_on + offs_b[:, None] * stride_oc + offs_p[None, :]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_relu_kernel(h_ptr, scale_ptr, shift_ptr, out_ptr, C, P, BLOCK: tl.constexpr):
    row = tl.program_id(1)  # n * C + c
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < P
    c = row % C
    s = tl.load(scale_ptr + c)
    t = tl.load(shift_ptr + c)
    v = tl.load(h_ptr + row * P + offs, mask=m, other=0.0)
    tl.store(out_ptr + row * P + offs, tl.maximum(v * s + t, 0.0).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bn_relu_bwd_sums_kernel(
    g_ptr, h_ptr, scale_ptr, shift_ptr, mean_ptr, part_ptr, C, P, SPLIT, BLOCK: tl.constexpr, ACC: tl.constexpr
):
    # one program per (channel, sample, slice of SPLIT positions); partial sums reduced by the caller in float64
    c, n, k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    s = tl.load(scale_ptr + c)
    t = tl.load(shift_ptr + c)
    mu = tl.load(mean_ptr + c)
    offs = tl.arange(0, BLOCK)
    base = (n * C + c) * P
    p_end = tl.minimum(k * SPLIT + SPLIT, P)
    a1 = tl.zeros([BLOCK], dtype=ACC)
    a2 = tl.zeros([BLOCK], dtype=ACC)
    for p0 in range(k * SPLIT, p_end, BLOCK):
        m = p0 + offs < p_end
        h = tl.load(h_ptr + base + p0 + offs, mask=m, other=0.0)
        g = tl.load(g_ptr + base + p0 + offs, mask=m, other=0.0)
        gp = tl.where(m & (h * s + t > 0), g, 0.0).to(ACC)
        a1 += gp
        a2 += gp * (h.to(ACC) - mu)  # centered: sum gp * xhat with no cancelling subtraction
    row = (c * tl.num_programs(1) + n) * tl.num_programs(2) + k
    tl.store(part_ptr + row * 2, tl.sum(a1, axis=0))
    tl.store(part_ptr + row * 2 + 1, tl.sum(a2, axis=0))


@triton.jit
def _bn_relu_bwd_apply_kernel(
    g_ptr, h_ptr, scale_ptr, shift_ptr, alpha_ptr, beta_ptr, out_ptr, C, P, BLOCK: tl.constexpr
):
    row = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < P
    c = row % C
    s = tl.load(scale_ptr + c)
    t = tl.load(shift_ptr + c)
    a = tl.load(alpha_ptr + c)
    b = tl.load(beta_ptr + c)
    h = tl.load(h_ptr + row * P + offs, mask=m, other=0.0)
    g = tl.load(g_ptr + row * P + offs, mask=m, other=0.0)
    gp = tl.where(h * s + t > 0, g, 0.0)
    tl.store(out_ptr + row * P + offs, (s * gp + a + b * h).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _conv1x1_dgrad_kernel(
    gh_ptr,
    w_ptr,
    x_ptr,
    scale_ptr,
    shift_ptr,
    mean_ptr,
    gx_ptr,
    psum_ptr,
    C,
    B,
    P,
    stride_gn,
    stride_xn,
    stride_xc,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT: tl.constexpr,
    ACC: tl.constexpr,
):
    pid_p, pid_c, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_c = pid_c * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mc = offs_c < C
    mp = offs_p < P
    acc = tl.zeros([BLOCK_M, BLOCK_P], dtype=ACC)
    for b0 in range(0, B, BLOCK_K):
        offs_b = b0 + tl.arange(0, BLOCK_K)
        mb = offs_b < B
        # W1^T tile: (BLOCK_M channels, BLOCK_K bottleneck)
        wt = tl.load(w_ptr + offs_b[None, :] * C + offs_c[:, None], mask=mc[:, None] & mb[None, :], other=0.0)
        gh = tl.load(
            gh_ptr + n * stride_gn + offs_b[:, None] * P + offs_p[None, :], mask=mb[:, None] & mp[None, :], other=0.0
        )
        acc = tl.dot(wt.to(DOT), gh.to(DOT), acc, input_precision=PRECISION, out_dtype=ACC)
    m = mc[:, None] & mp[None, :]
    x = tl.load(x_ptr + n * stride_xn + offs_c[:, None] * stride_xc + offs_p[None, :], mask=m, other=0.0)
    s = tl.load(scale_ptr + offs_c, mask=mc, other=0.0)
    t = tl.load(shift_ptr + offs_c, mask=mc, other=0.0)
    gp = tl.where(m & (x * s[:, None] + t[:, None] > 0), acc, 0.0)
    gx_ptrs = gx_ptr + n * stride_xn + offs_c[:, None] * stride_xc + offs_p[None, :]
    prev = tl.load(gx_ptrs, mask=m, other=0.0)
    tl.store(gx_ptrs, (prev + s[:, None] * gp).to(gx_ptr.dtype.element_ty), mask=m)
    # partial sums of this program: row (n, pid_p), channels offs_c; [sum gp, sum gp * (x - mean)]
    prog = n * tl.num_programs(0) + pid_p
    tl.store(psum_ptr + (prog * 2) * C + offs_c, tl.sum(gp, axis=1), mask=mc)
    mu = tl.load(mean_ptr + offs_c, mask=mc, other=0.0)
    tl.store(psum_ptr + (prog * 2 + 1) * C + offs_c, tl.sum(gp * (x.to(ACC) - mu[:, None]), axis=1), mask=mc)


@triton.jit
def _conv1x1_wgrad_kernel(
    gh_ptr,
    x_ptr,
    scale_ptr,
    shift_ptr,
    out_ptr,
    N,
    C,
    B,
    P,
    STEPS_PER_SPLIT,
    stride_gn,
    stride_xn,
    stride_xc,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT: tl.constexpr,
    ACC: tl.constexpr,
):
    # split-K over the (sample, position block) steps: program k covers steps [k*S, (k+1)*S) and writes its own
    # partial (no atomics; the caller sums the partials in float64)
    pid_b, pid_c, k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    blocks_p = tl.cdiv(P, BLOCK_P)
    step_end = tl.minimum((k + 1) * STEPS_PER_SPLIT, N * blocks_p)
    offs_b = pid_b * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_K + tl.arange(0, BLOCK_K)
    mb = offs_b < B
    mc = offs_c < C
    s = tl.load(scale_ptr + offs_c, mask=mc, other=0.0)
    t = tl.load(shift_ptr + offs_c, mask=mc, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=ACC)
    for step in range(k * STEPS_PER_SPLIT, step_end):
        n = step // blocks_p
        offs_p = (step % blocks_p) * BLOCK_P + tl.arange(0, BLOCK_P)
        mp = offs_p < P
        gh = tl.load(
            gh_ptr + n * stride_gn + offs_b[:, None] * P + offs_p[None, :],
            mask=mb[:, None] & mp[None, :],
            other=0.0,
        )
        m = mp[:, None] & mc[None, :]
        x = tl.load(x_ptr + n * stride_xn + offs_c[None, :] * stride_xc + offs_p[:, None], mask=m, other=0.0)
        z = tl.where(m, tl.maximum(x * s[None, :] + t[None, :], 0.0), 0.0)
        acc = tl.dot(gh.to(DOT), z.to(DOT), acc, input_precision=PRECISION, out_dtype=ACC)
    out = out_ptr + k * B * C + offs_b[:, None] * C + offs_c[None, :]
    tl.store(out, acc, mask=mb[:, None] & mc[None, :])


def _split_positions(p: int) -> int:
    """Positions per program of the per-channel reductions: a multiple of the block, ~8 blocks at most."""
    return min(triton.cdiv(p, _BLOCK_STATS), 8) * _BLOCK_STATS


def _flat(v: torch.Tensor) -> tuple[int, int, int]:
    """(P, stride over N, stride over C) of a (N, C, T, H, W) view whose (T, H, W) block is contiguous."""
    p = v.shape[2] * v.shape[3] * v.shape[4]
    if v.stride(4) != 1 or v.stride(3) != v.shape[4] or v.stride(2) != v.shape[3] * v.shape[4]:
        raise ValueError(f"expected a view with contiguous (T, H, W), got strides {v.stride()}")
    return p, v.stride(0), v.stride(1)


class TritonKernels(CompositeKernels):
    """The per-piece kernels of the fused algorithm in Triton; the 3x3x3 conv stays cuDNN's (inherited)."""

    @staticmethod
    def channel_stats(v):
        n, c = v.shape[:2]
        p, sn, sc = _flat(v)
        split = _split_positions(p)
        slices = triton.cdiv(p, split)
        acc, acc_torch = acc_dtype(v.dtype)
        part = torch.empty(c, n * slices, 3, device=v.device, dtype=acc_torch)
        _channel_stats_kernel[(c, n, slices)](v, part, p, split, sn, sc, BLOCK=_BLOCK_STATS, ACC=acc)
        part = part.double()
        count, mean_i, m2_i = part[..., 0], part[..., 1], part[..., 2]
        total = count.sum(1)
        mean = (count * mean_i).sum(1) / total
        m2 = m2_i.sum(1) + (count * (mean_i - mean[:, None]) ** 2).sum(1)
        return mean, m2 / total

    @staticmethod
    def bn_relu_conv1x1(prefix, scale, shift, w1):
        n, c = prefix.shape[:2]
        b = w1.shape[0]
        p, sn, sc = _flat(prefix)
        out = prefix.new_empty(n, b, *prefix.shape[2:])
        grid = (triton.cdiv(p, _BLOCK_P), triton.cdiv(b, _BLOCK_M), n)
        _bn_relu_conv1x1_kernel[grid](
            prefix,
            scale.contiguous(),
            shift.contiguous(),
            w1.contiguous(),
            out,
            c,
            b,
            p,
            sn,
            sc,
            b * p,
            p,
            BLOCK_M=_BLOCK_M,
            BLOCK_K=_BLOCK_K,
            BLOCK_P=_BLOCK_P,
            PRECISION=precision(prefix.dtype),
            DOT=dot_dtype(prefix.dtype),
            ACC=acc_dtype(prefix.dtype)[0],
        )
        return out

    @staticmethod
    def bn_relu(h, scale, shift):
        n, c = h.shape[:2]
        p = h.numel() // (n * c)
        out = torch.empty_like(h)
        _bn_relu_kernel[(triton.cdiv(p, _BLOCK_STATS), n * c)](
            h, scale.contiguous(), shift.contiguous(), out, c, p, BLOCK=_BLOCK_STATS
        )
        return out

    @staticmethod
    def bn_relu_backward(grad_z, h, scale, shift, mean, invstd, training):
        grad_z = grad_z.contiguous()
        n, c = h.shape[:2]
        p = h.numel() // (n * c)
        scale, shift = scale.contiguous(), shift.contiguous()
        acc_tl, acc = acc_dtype(h.dtype)
        split = _split_positions(p)
        slices = triton.cdiv(p, split)
        part = torch.empty(c, n * slices, 2, device=h.device, dtype=acc)
        _bn_relu_bwd_sums_kernel[(c, n, slices)](
            grad_z, h, scale, shift, mean.to(acc).contiguous(), part, c, p, split, BLOCK=_BLOCK_STATS, ACC=acc_tl
        )
        sums = part.double().sum(1)
        sum_g = sums[:, 0]
        sum_gx = sums[:, 1] * invstd
        if training:
            alpha, beta = affine_correction(scale, invstd, mean, sum_g, sum_gx, n * p)
        else:
            alpha = beta = torch.zeros_like(sum_g)
        out = torch.empty_like(h)
        _bn_relu_bwd_apply_kernel[(triton.cdiv(p, _BLOCK_STATS), n * c)](
            grad_z, h, scale, shift, alpha.to(acc), beta.to(acc), out, c, p, BLOCK=_BLOCK_STATS
        )
        return out, sum_gx.to(scale.dtype), sum_g.to(scale.dtype)

    @staticmethod
    def conv1x1_bn_relu_backward(grad_h, prefix, scale, shift, mean, invstd, w1, grad_prefix):
        grad_h = grad_h.contiguous()
        n, c = prefix.shape[:2]
        b = w1.shape[0]
        p, sn, sc = _flat(prefix)
        if grad_prefix.stride() != prefix.stride():
            raise ValueError("grad_prefix: expected the layout of prefix")
        scale, shift, w1 = scale.contiguous(), shift.contiguous(), w1.contiguous()
        blocks_p = triton.cdiv(p, _BLOCK_P)
        acc_tl, acc = acc_dtype(prefix.dtype)
        psum = torch.zeros(n * blocks_p, 2, c, device=prefix.device, dtype=acc)
        _conv1x1_dgrad_kernel[(blocks_p, triton.cdiv(c, _BLOCK_M), n)](
            grad_h,
            w1,
            prefix,
            scale,
            shift,
            mean.to(acc).contiguous(),
            grad_prefix,
            psum,
            c,
            b,
            p,
            b * p,
            sn,
            sc,
            BLOCK_M=_BLOCK_M,
            BLOCK_K=_BLOCK_K,
            BLOCK_P=_BLOCK_P,
            PRECISION=precision(prefix.dtype),
            DOT=dot_dtype(prefix.dtype),
            ACC=acc_tl,
        )
        sums = psum.double().sum(0)
        sum_g = sums[0]
        sum_gx = sums[1] * invstd
        tiles = triton.cdiv(b, _BLOCK_M) * triton.cdiv(c, _BLOCK_K)
        steps = n * blocks_p
        # enough programs to fill a GPU (~4 per SM of an H100), at least 8 position blocks each
        splits = max(1, min(triton.cdiv(steps, 8), triton.cdiv(512, tiles)))
        if _split_override is not None:
            splits = max(1, min(_split_override, steps))
        per_split = triton.cdiv(steps, splits)
        splits = triton.cdiv(steps, per_split)
        partial = torch.empty(splits, b, c, device=prefix.device, dtype=acc)
        _conv1x1_wgrad_kernel[(triton.cdiv(b, _BLOCK_M), triton.cdiv(c, _BLOCK_K), splits)](
            grad_h,
            prefix,
            scale,
            shift,
            partial,
            n,
            c,
            b,
            p,
            per_split,
            b * p,
            sn,
            sc,
            BLOCK_M=_BLOCK_M,
            BLOCK_K=_BLOCK_K,
            BLOCK_P=_BLOCK_P,
            PRECISION=precision(prefix.dtype),
            DOT=dot_dtype(prefix.dtype),
            ACC=acc_tl,
        )
        grad_w1 = partial.double().sum(0) if splits > 1 else partial[0]
        return grad_w1.to(prefix.dtype), sum_g, sum_gx


def forward(*args, group=""):
    """Same arguments and results as the composite forward (:mod:`t3d_kernels.composite.dense_block`)."""
    return algorithm_forward(TritonKernels, *args, group=group)


def backward(*args, group=""):
    """Same arguments and results as the composite backward."""
    return algorithm_backward(TritonKernels, *args, group=group)
