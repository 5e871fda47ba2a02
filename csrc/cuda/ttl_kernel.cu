// CUDA kernels of the fused TTL (docs/design.md, "The pool-first algebra"), the same algorithm as t3d_kernels/triton/ttl.py:
//   forward:  src = box(zero-padded relu(bn(x))) written channels-last (N, Ts, Hs, Ws, C_in) in one pass, then one
//             stride-2 implicit GEMM per branch over src (M = output positions, N = C_i, K = taps * C_in) writing
//             its channel slice of y; split-K over taps (atomics into an accumulator buffer) when the grid is small.
//   backward: src recomputed; per branch the weight gradient (reduction over positions, split with atomics when
//             the grid is small) and the gradient of src as a transposed conv in gather form, one parity class
//             of src positions per grid slice; then the box filter's adjoint, the ReLU mask and BN backward.
// GEMM tiles: 64 x 64 outputs per block of 256 threads, K in steps of 16 through shared memory, accumulation in float
// (double for double). The products run on tensor cores (WMMA, TF32 inputs, fp32 accumulators; 8 warps x two 16x16
// fragments) for half and bfloat16 (exact: their mantissas fit TF32's) and for float when torch allows TF32 for cuDNN
// (torch.backends.cudnn.allow_tf32, PyTorch's default: the convolutions this op replaces use TF32 then too); else on
// the CUDA cores, 4 x 4 outputs per thread. Per-element math and geometry come from common/ttl_math.h.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
// Only c10/core headers: a CPU build of torch (where CI compile-checks this file) ships no c10/cuda or ATen/cuda
// configuration headers. The current stream comes through the CUDA device-guard implementation torch registers.
#include <c10/core/DeviceGuard.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <type_traits>

#include "common/cuda_launch.h"
#include "common/ttl_math.h"
#include "ttl.h"

namespace t3d {
namespace {

constexpr int kTile = 64;    // output tile edge (rows and columns)
constexpr int kTileK = 16;   // reduction step held in shared memory
constexpr int kThreads = 256;
constexpr int kLd = kTile + 4;  // padded row of the shared tiles: a multiple of 4 floats, as WMMA needs

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define T3D_TENSOR_CORES 1
#else
#define T3D_TENSOR_CORES 0
#endif

// A 64 x 64 output tile on tensor cores: warp w owns rows 16 (w % 4) and columns 32 (w / 4) + {0, 16}. A(m, k) is
// read column-major (a[k * lda + m]), B(k, n) row-major (b[k * ldb + n]), both float in shared memory.
struct TensorCoreTile {
#if T3D_TENSOR_CORES
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 8, float> c[2];
#endif
  __device__ void zero() {
#if T3D_TENSOR_CORES
    nvcuda::wmma::fill_fragment(c[0], 0.0f);
    nvcuda::wmma::fill_fragment(c[1], 0.0f);
#endif
  }
  __device__ void step(const float* a, int lda, const float* b, int ldb) {
#if T3D_TENSOR_CORES
    using namespace nvcuda;
    const int warp = threadIdx.x / 32, rb = warp % 4, cb = (warp / 4) * 2;
#pragma unroll
    for (int k0 = 0; k0 < kTileK; k0 += 8) {
      wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::col_major> fa;
      wmma::load_matrix_sync(fa, a + k0 * lda + rb * 16, lda);
#pragma unroll
      for (int t = 0; t < fa.num_elements; ++t) fa.x[t] = wmma::__float_to_tf32(fa.x[t]);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, b + k0 * ldb + (cb + j) * 16, ldb);
#pragma unroll
        for (int t = 0; t < fb.num_elements; ++t) fb.x[t] = wmma::__float_to_tf32(fb.x[t]);
        wmma::mma_sync(c[j], fa, fb, c[j]);
      }
    }
#endif
  }
  // into the thread-per-element layout of the epilogue: acc[i][j] = C(tx + 16 i, ty + 16 j)
  template <typename acc_t>
  __device__ void unpack(float* cs, acc_t (&acc)[4][4]) {
#if T3D_TENSOR_CORES
    const int warp = threadIdx.x / 32, rb = warp % 4, cb = (warp / 4) * 2;
    for (int j = 0; j < 2; ++j)
      nvcuda::wmma::store_matrix_sync(cs + rb * 16 * kLd + (cb + j) * 16, c[j], kLd, nvcuda::wmma::mem_row_major);
    __syncthreads();
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = cs[(tx + 16 * i) * kLd + ty + 16 * j];
#endif
  }
};

// acc[i][j] += A(tx + 16 i, k) B(k, ty + 16 j) over the 16 k of the shared tiles, on the CUDA cores
template <typename acc_t>
__device__ __forceinline__ void simt_step(const acc_t* a, int lda, const acc_t* b, int ldb, acc_t (&acc)[4][4]) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int k = 0; k < kTileK; ++k) {
    acc_t av[4], bv[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) av[i] = a[k * lda + tx + 16 * i];
#pragma unroll
    for (int j = 0; j < 4; ++j) bv[j] = b[k * ldb + ty + 16 * j];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
  }
}

template <typename acc_t, bool kTC>
struct Mma {
#if T3D_TENSOR_CORES
  static constexpr bool kTensor = kTC && std::is_same<acc_t, float>::value;
#else
  // code for an architecture without TF32 MMA (e.g. PTX of an older target JIT-compiled on a newer GPU, where the
  // host chose tensor cores): the CUDA cores, never an empty product
  static constexpr bool kTensor = false;
#endif
  TensorCoreTile tile;
  __device__ void zero() {
    if constexpr (kTensor) tile.zero();
  }
  __device__ void step(const acc_t* a, int lda, const acc_t* b, int ldb, acc_t (&acc)[4][4]) {
    if constexpr (kTensor)
      tile.step(reinterpret_cast<const float*>(a), lda, reinterpret_cast<const float*>(b), ldb);
    else
      simt_step(a, lda, b, ldb, acc);
  }
  __device__ void finish(float* cs, acc_t (&acc)[4][4]) {
    if constexpr (kTensor) tile.unpack(cs, acc);
  }
};

struct ConvArgs {
  int64_t M;                   // rows of the GEMM: N*To*Ho*Wo (forward, wgrad) or N*Qt*Qh*Qw (dgrad)
  int64_t C_in, C_br, C_total, c_off;
  int64_t To, Ho, Wo, Ts, Hs, Ws;
  int64_t t0, h0, w0;          // branch origin in src
  int64_t D, KH, KW, stride;
  int64_t Qt, Qh, Qw, Lt, Lh, Lw;  // dgrad: parity-class extents and the branch's view of src
};

// Per-channel BN fold from the shared header: scale, shift and invstd of channel c.
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ void channel_bn(const scalar_t* gamma, const scalar_t* beta, const scalar_t* mean,
                                           const scalar_t* var, acc_t eps, int64_t c, acc_t& scale, acc_t& shift,
                                           acc_t& invstd) {
  invstd = acc_t(1) / sqrt(static_cast<acc_t>(var[c]) + eps);
  fold_bn<acc_t>(static_cast<acc_t>(gamma[c]), static_cast<acc_t>(beta[c]), static_cast<acc_t>(mean[c]), invstd, scale,
                 shift);
}

template <typename T>
__device__ __forceinline__ T block_sum(T v, T* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  T total = 0;
  if (threadIdx.x == 0)
    for (int w = 0; w < (int)(blockDim.x / 32); ++w) total += shared[w];
  return total;  // valid in thread 0
}

// ---- 1. BN-ReLU + zero padding + box filter -> channels-last src. Block: 32 src positions x 32 channels, read
// with positions fast (x is N, C, T, H, W), transposed through shared memory, written with channels fast.
template <typename scalar_t, typename acc_t>
__global__ void bn_relu_box_kernel(const scalar_t* __restrict__ x, const scalar_t* gamma, const scalar_t* beta,
                                   const scalar_t* mean, const scalar_t* var, acc_t eps, scalar_t* __restrict__ src,
                                   TtlGeometry g, int64_t C) {
  __shared__ acc_t tile[32][33];
  const int64_t n_src = g.Ts * g.Hs * g.Ws;
  const int64_t n = blockIdx.z, p0 = (int64_t)blockIdx.x * 32, c0 = (int64_t)blockIdx.y * 32;
  const int64_t p = p0 + threadIdx.x;
  const int64_t ts = p / (g.Hs * g.Ws), hs = (p / g.Ws) % g.Hs, ws = p % g.Ws;
  const int ntaps = g.pool ? 8 : 1;
  for (int cy = threadIdx.y; cy < 32; cy += blockDim.y) {
    const int64_t c = c0 + cy;
    acc_t v = 0;
    if (p < n_src && c < C) {
      acc_t scale, shift, invstd;
      channel_bn(gamma, beta, mean, var, eps, c, scale, shift, invstd);
      const scalar_t* xc = x + (n * C + c) * g.T * g.H * g.W;
      for (int a = 0; a < ntaps; ++a) {
        int64_t t, h, w;
        // zp[v + a] is z at input (v + a - pad), or zero padding (zero after BN-ReLU, hence the branch)
        if (source_to_input(g, ts + (a >> 2), hs + ((a >> 1) & 1), ws + (a & 1), t, h, w))
          v += bn_relu<acc_t>(static_cast<acc_t>(xc[(t * g.H + h) * g.W + w]), scale, shift);
      }
      if (g.pool) v *= box_weight<acc_t>();
    }
    tile[cy][threadIdx.x] = v;
  }
  __syncthreads();
  for (int py = threadIdx.y; py < 32; py += blockDim.y) {
    const int64_t pp = p0 + py, c = c0 + threadIdx.x;
    if (pp < n_src && c < C) src[(n * n_src + pp) * C + c] = static_cast<scalar_t>(tile[threadIdx.x][py]);
  }
}

// ---- 2. forward implicit GEMM of one branch. Thread (tx, ty) owns rows m0 + tx + 16 i and columns n0 + ty + 16 j,
// so the stores to y (positions contiguous per channel) coalesce over tx.
template <typename scalar_t, typename acc_t, bool kAtomic, bool kTC>
__global__ void __launch_bounds__(kThreads) conv_fwd_kernel(const scalar_t* __restrict__ src,
                                                             const scalar_t* __restrict__ wk, scalar_t* y,
                                                             acc_t* y_acc, ConvArgs a, int64_t taps_per_split) {
  __shared__ __align__(32) acc_t As[kTileK][kLd];
  __shared__ __align__(32) acc_t Bs[kTileK][kLd];
  __shared__ __align__(32) float Cs[kTC ? kTile * kLd : 1];
  Mma<acc_t, kTC> mma;
  mma.zero();
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t m0 = (int64_t)blockIdx.x * kTile, n0 = (int64_t)blockIdx.y * kTile;
  const int64_t P = a.To * a.Ho * a.Wo;
  // A loads: element (k = tid % 16, row = tid / 16 + 16 j): consecutive threads read consecutive input channels
  const int ka = tid % kTileK;
  int64_t rows[4];
  bool row_ok[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t m = m0 + tid / kTileK + 16 * j;
    row_ok[j] = m < a.M;
    const int64_t mm = row_ok[j] ? m : 0;
    const int64_t wo = mm % a.Wo, ho = (mm / a.Wo) % a.Ho, to = (mm / (a.Wo * a.Ho)) % a.To, nb = mm / P;
    rows[j] = (((nb * a.Ts + a.t0 + a.stride * to) * a.Hs + a.h0 + a.stride * ho) * a.Ws + a.w0 + a.stride * wo) *
              a.C_in;
  }
  acc_t acc[4][4] = {};
  const int64_t n_taps = a.D * a.KH * a.KW;
  const int64_t tap_lo = blockIdx.z * taps_per_split, tap_hi = tap_lo + taps_per_split < n_taps ? tap_lo + taps_per_split : n_taps;
  for (int64_t tap = tap_lo; tap < tap_hi; ++tap) {
    const int64_t dw = tap % a.KW, dh = (tap / a.KW) % a.KH, dt = tap / (a.KW * a.KH);
    const int64_t tap_off = ((dt * a.Hs + dh) * a.Ws + dw) * a.C_in;
    for (int64_t ci0 = 0; ci0 < a.C_in; ci0 += kTileK) {
      const int64_t ci = ci0 + ka;
#pragma unroll
      for (int j = 0; j < 4; ++j)
        As[ka][tid / kTileK + 16 * j] =
            (row_ok[j] && ci < a.C_in) ? static_cast<acc_t>(src[rows[j] + tap_off + ci]) : acc_t(0);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int k = tid / kTile + 4 * j;
        const int64_t co = n0 + tid % kTile;
        Bs[k][tid % kTile] = (ci0 + k < a.C_in && co < a.C_br)
                                 ? static_cast<acc_t>(wk[(tap * a.C_in + ci0 + k) * a.C_br + co])
                                 : acc_t(0);
      }
      __syncthreads();
      mma.step(&As[0][0], kLd, &Bs[0][0], kLd, acc);
      __syncthreads();
    }
  }
  mma.finish(Cs, acc);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + tx + 16 * i;
    if (m >= a.M) continue;
    const int64_t nb = m / P, p = m % P;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t co = n0 + ty + 16 * j;
      if (co >= a.C_br) continue;
      const int64_t off = (nb * a.C_total + a.c_off + co) * P + p;
      if (kAtomic)
        atomicAdd(y_acc + off, acc[i][j]);
      else
        y[off] = static_cast<scalar_t>(acc[i][j]);
    }
  }
}

// ---- 3. weight gradient of one branch: gw[tap][ci][co] = sum_m src[m, tap, ci] * gy[m, co]. Block: one tap, 64 ci
// x 64 co; the reduction over positions runs in steps of 16, a slice of positions per blockIdx.z.
template <typename scalar_t, typename acc_t, bool kAtomic, bool kTC>
__global__ void __launch_bounds__(kThreads) conv_wgrad_kernel(const scalar_t* __restrict__ src,
                                                               const scalar_t* __restrict__ gy, scalar_t* gw,
                                                               acc_t* gw_acc, ConvArgs a, int64_t m_per_split) {
  __shared__ __align__(32) acc_t As[kTileK][kLd];  // [m][ci]
  __shared__ __align__(32) acc_t Bs[kTileK][kLd];  // [m][co]
  __shared__ __align__(32) float Cs[kTC ? kTile * kLd : 1];
  Mma<acc_t, kTC> mma;
  mma.zero();
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t ci_tiles = (a.C_in + kTile - 1) / kTile;
  const int64_t tap = blockIdx.x / ci_tiles, ci0 = (blockIdx.x % ci_tiles) * kTile, co0 = (int64_t)blockIdx.y * kTile;
  const int64_t dw = tap % a.KW, dh = (tap / a.KW) % a.KH, dt = tap / (a.KW * a.KH);
  const int64_t P = a.To * a.Ho * a.Wo;
  const int64_t m_lo = blockIdx.z * m_per_split, m_hi = m_lo + m_per_split < a.M ? m_lo + m_per_split : a.M;
  acc_t acc[4][4] = {};
  for (int64_t mb = m_lo; mb < m_hi; mb += kTileK) {
    // src: channels fast (element ci = tid % 64 of row tid / 64 + 4 j)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int k = tid / kTile + 4 * j;
      const int64_t m = mb + k, ci = ci0 + tid % kTile;
      acc_t v = 0;
      if (m < m_hi && ci < a.C_in) {
        const int64_t wo = m % a.Wo, ho = (m / a.Wo) % a.Ho, to = (m / (a.Wo * a.Ho)) % a.To, nb = m / P;
        v = static_cast<acc_t>(src[(((nb * a.Ts + a.t0 + a.stride * to + dt) * a.Hs + a.h0 + a.stride * ho + dh) * a.Ws +
                                    a.w0 + a.stride * wo + dw) * a.C_in + ci]);
      }
      As[k][tid % kTile] = v;
    }
    // grad_y: positions fast (element m = tid % 16 of channel tid / 16 + 16 j)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int k = tid % kTileK;
      const int64_t m = mb + k, co = co0 + tid / kTileK + 16 * j;
      acc_t v = 0;
      if (m < m_hi && co < a.C_br) v = static_cast<acc_t>(gy[((m / P) * a.C_total + a.c_off + co) * P + m % P]);
      Bs[k][tid / kTileK + 16 * j] = v;
    }
    __syncthreads();
    mma.step(&As[0][0], kLd, &Bs[0][0], kLd, acc);
    __syncthreads();
  }
  mma.finish(Cs, acc);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t ci = ci0 + tx + 16 * i;
    if (ci >= a.C_in) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t co = co0 + ty + 16 * j;
      if (co >= a.C_br) continue;
      const int64_t off = (tap * a.C_in + ci) * a.C_br + co;
      if (kAtomic)
        atomicAdd(gw_acc + off, acc[i][j]);
      else
        gw[off] = static_cast<scalar_t>(acc[i][j]);
    }
  }
}

// ---- 4. gradient of src of one branch: the transposed stride-s conv in gather form. A src position at view offset
// r = s*q + parity (per dim) is reached by the taps parity + s*k from output o = q - k: per parity class a stride-1
// correlation, so no tap is visited in vain. blockIdx.z = parity class; each src position belongs to one block.
template <typename scalar_t, typename acc_t, bool kTC>
__global__ void __launch_bounds__(kThreads) conv_dgrad_kernel(const scalar_t* __restrict__ gy,
                                                               const scalar_t* __restrict__ wt, acc_t* gsrc,
                                                               ConvArgs a) {
  __shared__ __align__(32) acc_t As[kTileK][kLd];  // [co][row]
  __shared__ __align__(32) acc_t Bs[kTileK][kLd];  // [co][ci]
  __shared__ __align__(32) float Cs[kTC ? kTile * kLd : 1];
  Mma<acc_t, kTC> mma;
  mma.zero();
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t s = a.stride;
  const int64_t pt = blockIdx.z / 4, phh = (blockIdx.z / 2) % 2, pww = blockIdx.z % 2;
  const int64_t m0 = (int64_t)blockIdx.x * kTile, ci0 = (int64_t)blockIdx.y * kTile;
  const int64_t P = a.To * a.Ho * a.Wo;
  // A loads: row m0 + tid % 64 (fixed per thread), co = tid / 64 + 4 j
  const int64_t ma = m0 + tid % kTile;
  const int64_t qw = ma % a.Qw, qh = (ma / a.Qw) % a.Qh, qt = (ma / (a.Qw * a.Qh)) % a.Qt, nb = ma / (a.Qw * a.Qh * a.Qt);
  const bool row_ok = ma < a.M && s * qt + pt < a.Lt && s * qh + phh < a.Lh && s * qw + pww < a.Lw;
  const int64_t n_kt = (a.D - pt + s - 1) / s, n_kh = (a.KH - phh + s - 1) / s, n_kw = (a.KW - pww + s - 1) / s;
  acc_t acc[4][4] = {};
  for (int64_t tap = 0; tap < n_kt * n_kh * n_kw; ++tap) {
    const int64_t kw_ = tap % n_kw, kh_ = (tap / n_kw) % n_kh, kt_ = tap / (n_kw * n_kh);
    const int64_t to = qt - kt_, ho = qh - kh_, wo = qw - kw_;
    const bool ok = row_ok && to >= 0 && to < a.To && ho >= 0 && ho < a.Ho && wo >= 0 && wo < a.Wo;
    const int64_t gy_row = nb * a.C_total * P + (to * a.Ho + ho) * a.Wo + wo;
    const int64_t w_tap = ((pt + s * kt_) * a.KH + phh + s * kh_) * a.KW + pww + s * kw_;
    for (int64_t co0 = 0; co0 < a.C_br; co0 += kTileK) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int k = tid / kTile + 4 * j;
        const int64_t co = co0 + k;
        As[k][tid % kTile] = (ok && co < a.C_br) ? static_cast<acc_t>(gy[gy_row + (a.c_off + co) * P]) : acc_t(0);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int k = tid / kTile + 4 * j;
        const int64_t co = co0 + k, ci = ci0 + tid % kTile;
        Bs[k][tid % kTile] =
            (co < a.C_br && ci < a.C_in) ? static_cast<acc_t>(wt[(w_tap * a.C_br + co) * a.C_in + ci]) : acc_t(0);
      }
      __syncthreads();
      mma.step(&As[0][0], kLd, &Bs[0][0], kLd, acc);
      __syncthreads();
    }
  }
  mma.finish(Cs, acc);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + tx + 16 * i;
    const int64_t w_ = m % a.Qw, h_ = (m / a.Qw) % a.Qh, t_ = (m / (a.Qw * a.Qh)) % a.Qt, n_ = m / (a.Qw * a.Qh * a.Qt);
    const int64_t rt = s * t_ + pt, rh = s * h_ + phh, rw = s * w_ + pww;
    if (m >= a.M || rt >= a.Lt || rh >= a.Lh || rw >= a.Lw) continue;
    const int64_t base = (((n_ * a.Ts + a.t0 + rt) * a.Hs + a.h0 + rh) * a.Ws + a.w0 + rw) * a.C_in;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t ci = ci0 + ty + 16 * j;
      // earlier branches wrote here before this launch; within it this block alone owns the position
      if (ci < a.C_in) gsrc[base + ci] += acc[i][j];
    }
  }
}

// ---- 5. box adjoint + ReLU mask + BN backward. Block: 256 positions of one (n, c) plane, so the per-channel sums
// reduce in the block. kMode 0: training, sums only; 1: training, grad_x from the sums; 2: eval, both.
template <typename scalar_t, typename acc_t, int kMode>
__global__ void __launch_bounds__(kThreads) box_adjoint_bn_bwd_kernel(
    const acc_t* __restrict__ gsrc, const scalar_t* __restrict__ x, const scalar_t* gamma, const scalar_t* beta,
    const scalar_t* mean, const scalar_t* var, acc_t eps, acc_t* sums, scalar_t* grad_x, TtlGeometry g, int64_t C,
    acc_t count) {
  __shared__ acc_t red[kThreads / 32];
  const int64_t plane = blockIdx.y, c = plane % C, n = plane / C;
  const int64_t n_in = g.T * g.H * g.W;
  const int64_t p = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  acc_t scale, shift, invstd;
  channel_bn(gamma, beta, mean, var, eps, c, scale, shift, invstd);
  acc_t gpre = 0, xhat = 0;
  if (p < n_in) {
    const int64_t t = p / (g.H * g.W), h = (p / g.W) % g.H, w = p % g.W;
    acc_t gz = 0;
    const int ntaps = g.pool ? 8 : 1;
    for (int a = 0; a < ntaps; ++a) {
      // adjoint of src[v] = mean_a zp[v + a]: zp[u] collects src[u - a]
      const int64_t vt = t + g.front - (a >> 2), vh = h + g.ph - ((a >> 1) & 1), vw = w + g.pw - (a & 1);
      if (vt >= 0 && vh >= 0 && vw >= 0) gz += gsrc[(((n * g.Ts + vt) * g.Hs + vh) * g.Ws + vw) * C + c];
    }
    if (g.pool) gz *= box_weight<acc_t>();
    const acc_t xv = static_cast<acc_t>(x[plane * n_in + p]);
    gpre = xv * scale + shift > acc_t(0) ? gz : acc_t(0);
    xhat = (xv - static_cast<acc_t>(mean[c])) * invstd;
    if (kMode == 1) {
      grad_x[plane * n_in + p] =
          static_cast<scalar_t>(scale * (gpre - sums[c] / count - xhat * (sums[C + c] / count)));
    } else if (kMode == 2) {
      grad_x[plane * n_in + p] = static_cast<scalar_t>(gpre * scale);
    }
  }
  if (kMode != 1) {
    const acc_t s0 = block_sum(gpre, red);
    __syncthreads();
    const acc_t s1 = block_sum(gpre * xhat, red);
    if (threadIdx.x == 0) {
      atomicAdd(sums + c, s0);
      atomicAdd(sums + C + c, s1);
    }
  }
}

// ------------------------------------------------------------------------------------------------------------------
// host side
// ------------------------------------------------------------------------------------------------------------------

struct Branch {
  int64_t c_off, c_br, d, kh, kw, t0, h0, w0;
};

TtlGeometry geometry_of(const at::Tensor& x, const std::vector<at::Tensor>& weights, bool pool,
                        std::vector<Branch>& branches) {
  TtlGeometry g = geometry_from_weights(x.size(2), x.size(3), x.size(4), weights, pool);
  int64_t c_off = 0;
  for (const auto& w : weights) {
    Branch b{c_off, w.size(0), w.size(2), w.size(3), w.size(4), 0, 0, 0};
    branch_origin(g, b.d, b.kh, b.kw, b.t0, b.h0, b.w0);
    branches.push_back(b);
    c_off += b.c_br;
  }
  return g;
}

ConvArgs conv_args(const TtlGeometry& g, const Branch& b, int64_t N, int64_t C_in, int64_t C_total) {
  ConvArgs a{};
  a.M = N * g.To * g.Ho * g.Wo;
  a.C_in = C_in; a.C_br = b.c_br; a.C_total = C_total; a.c_off = b.c_off;
  a.To = g.To; a.Ho = g.Ho; a.Wo = g.Wo; a.Ts = g.Ts; a.Hs = g.Hs; a.Ws = g.Ws;
  a.t0 = b.t0; a.h0 = b.h0; a.w0 = b.w0;
  a.D = b.d; a.KH = b.kh; a.KW = b.kw; a.stride = g.stride;
  return a;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Splits that bring a grid of `programs` blocks to about two waves over the SMs, at most `max_split`.
int64_t split_for(int64_t programs, int64_t max_split) {
  int device = 0, sms = 0;
  cuda_check(cudaGetDevice(&device));
  cuda_check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return std::max<int64_t>(1, std::min<int64_t>(max_split, (2 * static_cast<int64_t>(sms)) / std::max<int64_t>(programs, 1)));
}

void check_cuda_inputs(const at::Tensor& x, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                       const at::Tensor& mean, const at::Tensor& var, const std::vector<at::Tensor>& weights) {
  check_ttl_inputs(x, bn_weight, bn_bias, mean, var, weights);
  TORCH_CHECK(x.is_cuda(), "x: expected a CUDA tensor for the cuda backend, got a tensor on ", x.device());
}

at::Tensor box_source(const at::Tensor& x, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                      const at::Tensor& mean, const at::Tensor& var, const TtlGeometry& g, double eps) {
  const int64_t N = x.size(0), C = x.size(1);
  auto src = at::empty({N, g.Ts, g.Hs, g.Ws, C}, x.options());
  const dim3 block(32, 8), grid(ceil_div(g.Ts * g.Hs * g.Ws, 32), ceil_div(C, 32), N);
  auto stream = current_stream(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ttl_box_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    bn_relu_box_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), bn_weight.const_data_ptr<scalar_t>(), bn_bias.const_data_ptr<scalar_t>(),
        mean.const_data_ptr<scalar_t>(), var.const_data_ptr<scalar_t>(), static_cast<acc_t>(eps),
        src.mutable_data_ptr<scalar_t>(), g, C);
    check_launch();
  });
  return src;
}

// Tensor cores (see the file's head): half/bfloat16 always, float when torch allows TF32 for cuDNN; sm_80 or newer.
bool use_tensor_cores(const at::Tensor& x) {
  if (x.scalar_type() == at::kDouble) return false;
  if (x.scalar_type() == at::kFloat && !at::globalContext().allowTF32CuDNN()) return false;
  int device = 0, major = 0;
  cuda_check(cudaGetDevice(&device));
  cuda_check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major >= 8;
}

// f(std::true_type) or f(std::false_type): a run-time flag to a template argument
template <typename F>
void with_flag(bool flag, F&& f) {
  if (flag)
    f(std::true_type{});
  else
    f(std::false_type{});
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

at::Tensor ttl_forward_cuda(const at::Tensor& x_in, const at::Tensor& bn_weight_in, const at::Tensor& bn_bias_in,
                            const at::Tensor& mean_in, const at::Tensor& var_in, const std::vector<at::Tensor>& weights,
                            bool pool, double eps) {
  check_cuda_inputs(x_in, bn_weight_in, bn_bias_in, mean_in, var_in, weights);
  c10::DeviceGuard guard(x_in.device());
  const auto x = x_in.contiguous(), bn_weight = bn_weight_in.contiguous(), bn_bias = bn_bias_in.contiguous();
  const auto mean = mean_in.contiguous(), var = var_in.contiguous();
  std::vector<Branch> branches;
  const TtlGeometry g = geometry_of(x, weights, pool, branches);
  const int64_t N = x.size(0), C = x.size(1);
  int64_t C_total = 0;
  for (const auto& b : branches) C_total += b.c_br;
  const int64_t M = N * g.To * g.Ho * g.Wo;
  if (M == 0) return at::zeros({N, C_total, g.To, g.Ho, g.Wo}, x.options());
  const auto src = box_source(x, bn_weight, bn_bias, mean, var, g, eps);
  const bool tc = use_tensor_cores(x);

  std::vector<int64_t> splits;
  bool atomic = false;
  for (const auto& b : branches) {
    const int64_t programs = ceil_div(M, kTile) * ceil_div(b.c_br, kTile);
    splits.push_back(split_for(programs, b.d * b.kh * b.kw));
    atomic = atomic || splits.back() > 1;
  }
  auto y = at::empty({N, C_total, g.To, g.Ho, g.Wo}, x.options());
  // split-K partial sums meet in an accumulator-precision buffer
  auto y_acc = atomic ? at::zeros(y.sizes(), x.options().dtype(acc_type(x.scalar_type()))) : at::Tensor();
  auto stream = current_stream(x.device());
  for (size_t i = 0; i < branches.size(); ++i) {
    const auto& b = branches[i];
    const ConvArgs a = conv_args(g, b, N, C, C_total);
    const auto wk = weights[i].permute({2, 3, 4, 1, 0}).contiguous();  // (tap, ci, co)
    const int64_t n_taps = b.d * b.kh * b.kw;
    const int64_t per = ceil_div(n_taps, splits[i]);
    const dim3 grid(ceil_div(M, kTile), ceil_div(b.c_br, kTile), ceil_div(n_taps, per));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ttl_forward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      with_flag(tc, [&](auto tc_flag) {
        constexpr bool kTC = decltype(tc_flag)::value;
        if (atomic)
          conv_fwd_kernel<scalar_t, acc_t, true, kTC><<<grid, kThreads, 0, stream>>>(
              src.const_data_ptr<scalar_t>(), wk.const_data_ptr<scalar_t>(), nullptr, y_acc.mutable_data_ptr<acc_t>(),
              a, per);
        else
          conv_fwd_kernel<scalar_t, acc_t, false, kTC><<<grid, kThreads, 0, stream>>>(
              src.const_data_ptr<scalar_t>(), wk.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), nullptr,
              a, per);
      });
      check_launch();
    });
  }
  return atomic ? y_acc.to(x.scalar_type()) : y;
}

TtlGrads ttl_backward_cuda(const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& bn_weight_in,
                           const at::Tensor& bn_bias_in, const at::Tensor& mean_in, const at::Tensor& var_in,
                           const std::vector<at::Tensor>& weights, bool pool, bool training, double eps) {
  check_cuda_inputs(x_in, bn_weight_in, bn_bias_in, mean_in, var_in, weights);
  c10::DeviceGuard guard(x_in.device());
  const auto x = x_in.contiguous(), bn_weight = bn_weight_in.contiguous(), bn_bias = bn_bias_in.contiguous();
  const auto mean = mean_in.contiguous(), var = var_in.contiguous();
  std::vector<Branch> branches;
  const TtlGeometry g = geometry_of(x, weights, pool, branches);
  const int64_t N = x.size(0), C = x.size(1);
  int64_t C_total = 0;
  for (const auto& b : branches) C_total += b.c_br;
  const std::vector<int64_t> y_shape{N, C_total, g.To, g.Ho, g.Wo};
  TORCH_CHECK(grad_y_in.sizes() == at::IntArrayRef(y_shape), "grad_y: expected shape ", at::IntArrayRef(y_shape),
              ", got ", grad_y_in.sizes());
  TORCH_CHECK(grad_y_in.device() == x.device(), "grad_y: expected a tensor on ", x.device(), ", got ",
              grad_y_in.device());
  const auto gy = grad_y_in.to(x.scalar_type()).contiguous();
  const int64_t M = N * g.To * g.Ho * g.Wo;
  const auto acc_opts = x.options().dtype(acc_type(x.scalar_type()));
  const auto src = box_source(x, bn_weight, bn_bias, mean, var, g, eps);
  const bool tc = use_tensor_cores(x);
  auto grad_src = at::zeros({N, g.Ts, g.Hs, g.Ws, C}, acc_opts);
  auto stream = current_stream(x.device());
  std::vector<at::Tensor> grad_weights;
  for (size_t i = 0; i < branches.size(); ++i) {
    const auto& b = branches[i];
    ConvArgs a = conv_args(g, b, N, C, C_total);
    const int64_t n_taps = b.d * b.kh * b.kw;
    // weight gradient, (tap, ci, co)
    const int64_t programs = n_taps * ceil_div(C, kTile) * ceil_div(b.c_br, kTile);
    const int64_t split = M > 0 ? split_for(programs, ceil_div(M, kTileK)) : 1;
    const int64_t m_per = ceil_div(ceil_div(std::max<int64_t>(M, 1), split), kTileK) * kTileK;
    const bool atomic = split > 1;
    auto gw = atomic ? at::zeros({n_taps, C, b.c_br}, acc_opts) : at::zeros({n_taps, C, b.c_br}, x.options());
    if (M > 0) {
      const dim3 grid(n_taps * ceil_div(C, kTile), ceil_div(b.c_br, kTile), ceil_div(M, m_per));
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ttl_wgrad_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        with_flag(tc, [&](auto tc_flag) {
          constexpr bool kTC = decltype(tc_flag)::value;
          if (atomic)
            conv_wgrad_kernel<scalar_t, acc_t, true, kTC><<<grid, kThreads, 0, stream>>>(
                src.const_data_ptr<scalar_t>(), gy.const_data_ptr<scalar_t>(), nullptr, gw.mutable_data_ptr<acc_t>(), a,
                m_per);
          else
            conv_wgrad_kernel<scalar_t, acc_t, false, kTC><<<grid, kThreads, 0, stream>>>(
                src.const_data_ptr<scalar_t>(), gy.const_data_ptr<scalar_t>(), gw.mutable_data_ptr<scalar_t>(),
                nullptr, a, m_per);
        });
        check_launch();
      });
    }
    grad_weights.push_back(
        gw.view({b.d, b.kh, b.kw, C, b.c_br}).permute({4, 3, 0, 1, 2}).contiguous().to(weights[i].scalar_type()));
    if (M == 0) continue;
    // gradient of src, gathered per parity class
    const int64_t s = g.stride;
    a.Lt = s * (g.To - 1) + b.d; a.Lh = s * (g.Ho - 1) + b.kh; a.Lw = s * (g.Wo - 1) + b.kw;
    a.Qt = ceil_div(a.Lt, s); a.Qh = ceil_div(a.Lh, s); a.Qw = ceil_div(a.Lw, s);
    a.M = N * a.Qt * a.Qh * a.Qw;
    const auto wt = weights[i].permute({2, 3, 4, 0, 1}).contiguous();  // (tap, co, ci)
    const dim3 grid(ceil_div(a.M, kTile), ceil_div(C, kTile), s == 2 ? 8 : 1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ttl_dgrad_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      with_flag(tc, [&](auto tc_flag) {
        conv_dgrad_kernel<scalar_t, acc_t, decltype(tc_flag)::value><<<grid, kThreads, 0, stream>>>(
            gy.const_data_ptr<scalar_t>(), wt.const_data_ptr<scalar_t>(), grad_src.mutable_data_ptr<acc_t>(), a);
      });
      check_launch();
    });
  }
  // box adjoint, ReLU mask, BN backward
  auto grad_x = at::empty_like(x);
  auto sums = at::zeros({2 * C}, acc_opts);
  const int64_t n_in = g.T * g.H * g.W;
  const dim3 grid(ceil_div(n_in, kThreads), N * C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ttl_bn_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* gsrc_p = grad_src.const_data_ptr<acc_t>();
    const scalar_t* x_p = x.const_data_ptr<scalar_t>();
    const scalar_t *gamma = bn_weight.const_data_ptr<scalar_t>(), *beta = bn_bias.const_data_ptr<scalar_t>();
    const scalar_t *mean_p = mean.const_data_ptr<scalar_t>(), *var_p = var.const_data_ptr<scalar_t>();
    acc_t* sums_p = sums.mutable_data_ptr<acc_t>();
    scalar_t* gx_p = grad_x.mutable_data_ptr<scalar_t>();
    const acc_t eps_a = static_cast<acc_t>(eps), count = static_cast<acc_t>(N * n_in);
    if (training) {
      box_adjoint_bn_bwd_kernel<scalar_t, acc_t, 0><<<grid, kThreads, 0, stream>>>(
          gsrc_p, x_p, gamma, beta, mean_p, var_p, eps_a, sums_p, gx_p, g, C, count);
      check_launch();
      box_adjoint_bn_bwd_kernel<scalar_t, acc_t, 1><<<grid, kThreads, 0, stream>>>(
          gsrc_p, x_p, gamma, beta, mean_p, var_p, eps_a, sums_p, gx_p, g, C, count);
    } else {
      box_adjoint_bn_bwd_kernel<scalar_t, acc_t, 2><<<grid, kThreads, 0, stream>>>(
          gsrc_p, x_p, gamma, beta, mean_p, var_p, eps_a, sums_p, gx_p, g, C, count);
    }
    check_launch();
  });
  return {grad_x, sums.slice(0, C, 2 * C).to(bn_weight.scalar_type(), /*non_blocking=*/false, /*copy=*/true),
          sums.slice(0, 0, C).to(bn_bias.scalar_type(), false, true), grad_weights};
}

}  // namespace t3d
