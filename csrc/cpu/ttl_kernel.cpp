// CPU kernels of the fused TTL (docs/design.md, "The pool-first algebra"): pool first through a box filter, every branch a stride-2
// implicit GEMM over one box-filtered, channels-last source tensor; backward by the transposed algebra.
//
// Pieces (forward):
//   1. build_source: BN-ReLU + zero padding + the separable 2x2x2 box filter in one pass over x, written
//      channels-last: src (N, Ts, Hs, Ws, Cs), Cs >= C elements per position (source_position_stride). Not kept
//      for backward (recomputed there).
//   2. conv_forward: per branch, an implicit GEMM  y[p, o] = sum_{tap, c} src[row(p) + tap, c] * W[o, c, tap]
//      through an indirection of row offsets (XNNPACK's indirect convolution): output positions p are
//      register-tile rows, output channels are vector lanes, the input channel is the reduction. Stride 2 costs
//      nothing (it only changes the row offsets). K is blocked (one temporal tap x a channel block) so a block of
//      packed weights stays in L2 while every position tile streams past it.
// Backward:
//   3. grad of W: gW[o, c, tap] = sum_p gy[p, o] * src[row(p) + tap, c], tiles of 8 input channels x the branch's
//      output channels (vector lanes), reduced over positions.
//   4. grad of src: the stride-2 transposed conv in gather form. Source positions are grouped by parity class
//      (t%2, h%2, w%2): within a class the same taps land, so a tile of positions shares one tap list and each
//      position accumulates in registers, no scatter.
//   5. the box filter's adjoint (a backward 2-window mean), ReLU mask and BN backward (two per-channel sums).
// Few output positions (use_gemm_path: TTL3 of T3D-121) replace 2-4 by an im2col of the positions and GEMMs on the
// weights' own rows (weights_major_forward / weights_major_backward): there the weights are the big operand.
//
// Summation order. Every reduction is blocked: a register tile sums one block of about kSumBlock terms from zero,
// the block results are added into a separate tile, and those tiles (one per kernel call) into the result. One
// float32 chain over all K terms errs ~K * eps * |term| (the partial sums grow and each add rounds at their size);
// blocks of B cut that to ~sqrt(K * B) * eps * |term| and cost one tile add per block. Measured at TTL1 of T3D-121
// (K = 13824 for the 6x3x3 branch): the output's error fell from 38 to ~3 ulp of max|y| (PyTorch's own: 2-5).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/avx512_transpose.h"
#include "common/cpu_features.h"
#include "common/huge_pages.h"
#include "common/ttl_math.h"
#include "common/vec16.h"
#include "ttl.h"

namespace t3d {
namespace {

#define T3D_INLINE inline __attribute__((always_inline))
#define T3D_AVX512_FN __attribute__((target("avx512f,fma")))

template <typename T>
constexpr int kLanes = 64 / sizeof(T);  // one 64-byte vector (an AVX-512 register) of T


// register tile: MR rows x NV vectors
constexpr int MR = 8;  // must match kAvxMR/kAvxNV of cpu/ttl_tiles_avx512.h
constexpr int NV = 3;

// terms a register tile sums before its block result is added into a separate tile ("Summation order")
constexpr int64_t kSumBlock = 128;

// source gradient: taps per block for a branch of `cout` output channels
T3D_INLINE int dgrad_block_taps(int64_t cout) { return (int)std::max<int64_t>(1, kSumBlock / (2 * cout)); }

struct Branch {
  int64_t cout, depth, kh, kw;
  int64_t t0, h0, w0;   // origin in the source tensor
  int64_t y_off;        // first output channel of the branch in y
  int64_t acc_col;      // first column of the branch in the channels-last accumulator
  int64_t nblocks;      // output-channel blocks of NR
  int64_t origin_row;   // (t0*Hs + h0)*Ws + w0
};

struct Problem {
  int64_t N, C, Mo;  // batch, input channels, output positions per sample
  int64_t Cs;        // elements per source position (C and a few padding channels: source_position_stride)
  TtlGeometry g;
  std::vector<Branch> branches;
  int64_t C_out;
};

// Elements per position of the channels-last source tensor: C rounded up to 32 bytes, plus 32 more where that is an
// even number of 32-byte units. The kernels read the source at stride 2 along W; with C = 256 float32 that stride is
// exactly 2 KB, so every row they read maps onto 2 of the L1's 64 sets (and few of the L2's) and the rows evicted
// each other: the weight gradient at TTL1 of T3D-121 ran 1.4x slower than at C = 240. With an odd number of 32-byte
// units the stride-2 rows walk all the sets. The padding channels are never read.
int64_t source_position_stride(int64_t C, int64_t elem_size) {
  const int64_t unit = std::max<int64_t>(1, 32 / elem_size);
  int64_t cs = (C + unit - 1) / unit * unit;
  if ((cs / unit) % 2 == 0) cs += unit;
  return cs;
}

Problem make_problem(const at::Tensor& x, const std::vector<at::Tensor>& weights, bool pool, int64_t nr) {
  Problem pb;
  pb.N = x.size(0);
  pb.C = x.size(1);
  pb.Cs = source_position_stride(pb.C, x.element_size());
  pb.g = geometry_from_weights(x.size(2), x.size(3), x.size(4), weights, pool);
  pb.Mo = pb.g.To * pb.g.Ho * pb.g.Wo;
  int64_t y_off = 0, acc_col = 0;
  for (const auto& w : weights) {
    Branch b;
    b.cout = w.size(0);
    b.depth = w.size(2);
    b.kh = w.size(3);
    b.kw = w.size(4);
    branch_origin(pb.g, b.depth, b.kh, b.kw, b.t0, b.h0, b.w0);
    b.origin_row = (b.t0 * pb.g.Hs + b.h0) * pb.g.Ws + b.w0;
    b.y_off = y_off;
    b.acc_col = acc_col;
    b.nblocks = (b.cout + nr - 1) / nr;
    y_off += b.cout;
    acc_col += b.nblocks * nr;
    pb.branches.push_back(b);
  }
  pb.C_out = y_off;
  return pb;
}

// ---------------------------------------------------------------------------------------------------------
// 1. BN-ReLU + padding + box filter -> channels-last source tensor
// ---------------------------------------------------------------------------------------------------------

// whether the (h, w) plane of a channel (strides s of an (N, C, T, H, W) tensor) is one contiguous row; where it is
// not, input_grad gathers it into / scatters it out of a buffer
bool plane_is_row(const int64_t* s, int64_t H, int64_t W) { return s[4] == 1 && (s[3] == W || H == 1); }

// One 16-channel block of a z plane from a channels-first frame whose H*W positions are contiguous (x: channel
// c0's plane, channels cs apart): 16 positions x 16 channels per step, read as 16 channel rows, BN-ReLU'd and
// transposed in registers, stored as 16 channels-last rows (the scalar loop gathers one float per channel and
// position). x * scale, then + shift, in two roundings as the scalar bn_relu (the empty asm keeps the compiler
// from fusing them into an FMA): the same bits.
T3D_AVX512_FN void bn_relu_block16_avx512(const float* x, int64_t cs, int64_t npos, const float* scale,
                                          const float* shift, int64_t C, float* out) {
  __m512 sc[16], sh[16];
  for (int cc = 0; cc < 16; ++cc) sc[cc] = _mm512_set1_ps(scale[cc]), sh[cc] = _mm512_set1_ps(shift[cc]);
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t q0 = 0; q0 < npos; q0 += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, npos - q0));
    const __mmask16 m = static_cast<__mmask16>(n == 16 ? 0xFFFFu : (1u << n) - 1);
    __m512 r[16];
    for (int cc = 0; cc < 16; ++cc) {
      __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + cc * cs + q0), sc[cc]);
      __asm__("" : "+v"(v));
      r[cc] = _mm512_max_ps(_mm512_add_ps(v, sh[cc]), zero);  // max(v, +0): +0 for v <= 0 and NaN, as bn_relu
    }
    transpose16_regs(r);
    for (int i = 0; i < n; ++i) _mm512_storeu_ps(out + (q0 + i) * C, r[i]);
  }
}

// z plane (H, W, C) of sample n, frame t, from x with any strides
template <typename T>
void bn_relu_plane(const T* x, const int64_t* xs, int64_t n, int64_t t, int64_t C, int64_t H, int64_t W,
                   const T* scale, const T* shift, T* out) {
  const T* base = x + n * xs[0] + t * xs[2];
  if constexpr (std::is_same_v<T, float>) {
    if (xs[1] != 1 && plane_is_row(xs, H, W) && C % 16 == 0 && cpu_has_avx512_fma()) {
      for (int64_t c0 = 0; c0 < C; c0 += 16)
        bn_relu_block16_avx512(base + c0 * xs[1], xs[1], H * W, scale + c0, shift + c0, C, out + c0);
      return;
    }
  }
  if (xs[1] == 1) {  // channels-last input: contiguous channels
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        const T* px = base + h * xs[3] + w * xs[4];
        T* po = out + (h * W + w) * C;
        for (int64_t c = 0; c < C; ++c) po[c] = bn_relu(px[c], scale[c], shift[c]);
      }
  } else {
    // blocks of 16 channels: 16 input rows read in step, 64 contiguous output bytes written per position (a
    // channel-at-a-time loop writes a cache line per element)
    constexpr int64_t CB = 16;
    for (int64_t c0 = 0; c0 < C; c0 += CB) {
      const int64_t cn = std::min(CB, C - c0);
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w) {
          const T* px = base + c0 * xs[1] + h * xs[3] + w * xs[4];
          T* po = out + (h * W + w) * C + c0;
          for (int64_t cc = 0; cc < cn; ++cc) po[cc] = bn_relu(px[cc * xs[1]], scale[c0 + cc], shift[c0 + cc]);
        }
    }
  }
}

// spatial part of the source plane: box ? sum of the 2x2 window of the zero-padded z : the zero-padded z
template <typename T>
void spatial_plane(const T* z, bool valid, const TtlGeometry& g, int64_t C, int64_t Cs, bool box, T* out) {
  const int64_t plane = g.Hs * g.Ws * Cs;
  if (!valid) {
    std::fill(out, out + plane, T(0));
    return;
  }
  for (int64_t hs = 0; hs < g.Hs; ++hs)
    for (int64_t ws = 0; ws < g.Ws; ++ws) {
      T* po = out + (hs * g.Ws + ws) * Cs;
      int64_t hlo, hhi, wlo, whi;
      if (box) {
        box_window(hs, g.ph, g.H, hlo, hhi);
        box_window(ws, g.pw, g.W, wlo, whi);
      } else {
        hlo = hs - g.ph, hhi = hlo + 1, wlo = ws - g.pw, whi = wlo + 1;
        hlo = std::max<int64_t>(hlo, 0), hhi = std::min(hhi, g.H);
        wlo = std::max<int64_t>(wlo, 0), whi = std::min(whi, g.W);
      }
      std::fill(po, po + C, T(0));
      for (int64_t h = hlo; h < hhi; ++h)
        for (int64_t w = wlo; w < whi; ++w) {
          const T* pz = z + (h * g.W + w) * C;
          for (int64_t c = 0; c < C; ++c) po[c] += pz[c];
        }
    }
}

template <typename T>
void build_source(const at::Tensor& x, const T* scale, const T* shift, const Problem& pb, T* src) {
  const TtlGeometry& g = pb.g;
  const int64_t C = pb.C;
  const T* xp = x.data_ptr<T>();
  const int64_t xs[5] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3), x.stride(4)};
  const int64_t plane = g.Hs * g.Ws * pb.Cs;  // padding channels: 0 (the planes' buffers start zeroed)
  at::parallel_for(0, pb.N * g.Ts, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> z(g.H * g.W * C), cur(plane), next(plane);
    // (n*Ts + ts) whose spatial box plane is in `cur`. The plane after a sample's last frame is that sample's
    // padding, not frame 0 of the next sample: never carried over a sample boundary.
    int64_t cached = -1;
    auto spatial = [&](int64_t n, int64_t tp, T* out) {  // tp: padded frame index
      const int64_t t = tp - g.front;
      const bool valid = t >= 0 && t < g.T;
      if (valid) bn_relu_plane(xp, xs, n, t, C, g.H, g.W, scale, shift, z.data());
      spatial_plane(z.data(), valid, g, C, pb.Cs, g.pool, out);
    };
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t n = idx / g.Ts, ts = idx % g.Ts;
      T* out = src + idx * plane;
      if (!g.pool) {
        spatial(n, ts, out);
        continue;
      }
      if (cached != idx) spatial(n, ts, cur.data());
      spatial(n, ts + 1, next.data());
      const T k = box_weight<T>();
      for (int64_t i = 0; i < plane; ++i) out[i] = (cur[i] + next[i]) * k;
      std::swap(cur, next);
      cached = ts + 1 < g.Ts ? idx + 1 : -1;
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// tile kernels (the hot loops). Generic versions for any ISA and float64; AVX-512 or AVX2 intrinsics for float32
// (cpu/ttl_tiles_avx512.h, cpu/ttl_tiles_avx2.h, the same bits), picked at run time.
// ---------------------------------------------------------------------------------------------------------

// forward: acc[r][k] (+)= sum_{taps j} sum_{c in [c0, c0+cb)} src[rows[r] + tap_off[j] + c] * wtap[j][c][k]
template <typename T>
void fwd_tile_generic(const T* src, const int64_t* rows, const int64_t* tap_off, int ntaps, int64_t c0, int64_t cb,
                      const T* const* wtap, T* acc, int64_t ld, int mr_valid, bool first) {
  constexpr int NR = NV * kLanes<T>;
  T part[MR][NR], a[MR][NR];
  bool empty = true;
  for (int j = 0; j < ntaps; ++j)
    for (int64_t cs = 0; cs < cb; cs += kSumBlock) {  // blocks of one tap x kSumBlock channels
      for (int r = 0; r < MR; ++r)
        for (int k = 0; k < NR; ++k) a[r][k] = T(0);
      const T* w = wtap[j] + (c0 + cs) * NR;
      for (int64_t c = cs; c < std::min(cb, cs + kSumBlock); ++c, w += NR)
        for (int r = 0; r < MR; ++r) {
          const T s = src[rows[r] + tap_off[j] + c0 + c];
          for (int k = 0; k < NR; ++k) a[r][k] += s * w[k];
        }
      for (int r = 0; r < MR; ++r)
        for (int k = 0; k < NR; ++k) part[r][k] = empty ? a[r][k] : part[r][k] + a[r][k];
      empty = false;
    }
  for (int r = 0; r < mr_valid; ++r)
    for (int k = 0; k < NR; ++k) acc[r * ld + k] = first ? part[r][k] : acc[r * ld + k] + part[r][k];
}

// weight gradient: acc[r][k] (= or +=) sum_p src[rows[p] + off + r] * gy[p*ldg + k]   (r: input channel, k: output
// channel; np >= 1)
template <typename T>
void wgrad_tile_generic(const T* src, const int64_t* rows, int64_t np, int64_t off, const T* gy, int64_t ldg, T* acc,
                        bool assign) {
  constexpr int NR = NV * kLanes<T>;
  T part[MR][NR], a[MR][NR];
  for (int64_t ps0 = 0; ps0 < np; ps0 += kSumBlock) {
    for (int r = 0; r < MR; ++r)
      for (int k = 0; k < NR; ++k) a[r][k] = T(0);
    for (int64_t p = ps0; p < std::min(np, ps0 + kSumBlock); ++p) {
      const T* ps = src + rows[p] + off;
      const T* pg = gy + p * ldg;
      for (int r = 0; r < MR; ++r)
        for (int k = 0; k < NR; ++k) a[r][k] += ps[r] * pg[k];
    }
    for (int r = 0; r < MR; ++r)
      for (int k = 0; k < NR; ++k) part[r][k] = ps0 == 0 ? a[r][k] : part[r][k] + a[r][k];
  }
  for (int r = 0; r < MR; ++r)
    for (int k = 0; k < NR; ++k) acc[r * NR + k] = assign ? part[r][k] : acc[r * NR + k] + part[r][k];
}

// source gradient: acc[r][k] += sum over (tap j, o) of tap_rows[j][r][o] * wt[j][o][k]   (k: input channel)
template <typename T>
void dgrad_tile_generic(const T* const* tap_rows, const T* const* wt, int ntaps, int64_t cout, T* acc) {
  constexpr int NR = NV * kLanes<T>;
  T a[MR][NR];
  const int group = dgrad_block_taps(cout);
  for (int j0 = 0; j0 < ntaps; j0 += group) {
    for (int r = 0; r < MR; ++r)
      for (int k = 0; k < NR; ++k) a[r][k] = T(0);
    for (int j = j0; j < std::min(ntaps, j0 + group); ++j) {
      const T* const* p = tap_rows + j * MR;
      const T* w = wt[j];
      for (int64_t o = 0; o < cout; ++o, w += NR)
        for (int r = 0; r < MR; ++r)
          for (int k = 0; k < NR; ++k) a[r][k] += p[r][o] * w[k];
    }
    for (int r = 0; r < MR; ++r)
      for (int k = 0; k < NR; ++k) acc[r * NR + k] += a[r][k];
  }
}

}  // namespace
}  // namespace t3d

#include "cpu/ttl_tiles_avx512.h"
#include "cpu/ttl_tiles_avx2.h"  // after it: its quadrants cover the AVX-512 tile (kAvxMR)

namespace t3d {
namespace {

inline bool use_avx512() {
#ifdef T3D_NO_AVX512  // the generic tile kernels only (neither AVX-512 nor AVX2), to test them on a machine with both
  return false;
#else
  return cpu_has_avx512_fma();
#endif
}
inline bool use_avx2() {
#ifdef T3D_NO_AVX512
  return false;
#else
  return cpu_has_avx2_fma();
#endif
}
template <typename T>
T3D_INLINE void fwd_tile_mv(const T* src, const int64_t* rows, const int64_t* tap_off, int ntaps, int64_t c0,
                            int64_t cb, const T* const* wtap, T* acc, int64_t ld, int mr_valid, bool first) {
  if constexpr (std::is_same_v<T, float>) {
    if (use_avx512()) return fwd_tile_avx512(src, rows, tap_off, ntaps, c0, cb, wtap, acc, ld, mr_valid, first);
    if (use_avx2()) return fwd_tile_avx2(src, rows, tap_off, ntaps, c0, cb, wtap, acc, ld, mr_valid, first);
  }
  fwd_tile_generic<T>(src, rows, tap_off, ntaps, c0, cb, wtap, acc, ld, mr_valid, first);
}
template <typename T>
T3D_INLINE void wgrad_tile_mv(const T* src, const int64_t* rows, int64_t np, int64_t off, const T* gy, int64_t ldg,
                              T* acc, bool assign) {
  if constexpr (std::is_same_v<T, float>) {
    if (use_avx512()) return wgrad_tile_avx512(src, rows, np, off, gy, ldg, acc, assign);
    if (use_avx2()) return wgrad_tile_avx2(src, rows, np, off, gy, ldg, acc, assign);
  }
  wgrad_tile_generic<T>(src, rows, np, off, gy, ldg, acc, assign);
}
// dst[i] = src[i * stride] for i < NR (stride * NR < 2^31)
template <typename T>
T3D_INLINE void gather_column(const T* src, int64_t stride, T* dst) {
  if constexpr (std::is_same_v<T, float>) {
    if (use_avx512()) return gather_column_avx512(src, stride, dst);
  }
  for (int64_t i = 0; i < NV * kLanes<T>; ++i) dst[i] = src[i * stride];
}
template <typename T>
T3D_INLINE void dgrad_tile_mv(const T* const* tap_rows, const T* const* wt, int ntaps, int64_t cout, T* acc,
                              int64_t lanes) {
  if constexpr (std::is_same_v<T, float>) {
    if (use_avx512()) return dgrad_tile_avx512(tap_rows, wt, ntaps, cout, acc, lanes);
    if (use_avx2()) return dgrad_tile_avx2(tap_rows, wt, ntaps, cout, acc);
  }
  dgrad_tile_generic<T>(tap_rows, wt, ntaps, cout, acc);
}


// ---------------------------------------------------------------------------------------------------------
// GEMMs of the few-position path on the weights' own rows (w: (cout, K), K = C * taps, the im2col col: (M, K)).
// The weights are the big operand there (TTL3 of T3D-121: 45 MB for 18 positions per clip): they are read once,
// as they lie, with vector lanes along k, and never repacked. Tiles of kGR rows x kGV vectors; the few positions
// or the output channels are the rows. Generic (GCC vector extension) bodies, compiled for AVX-512 when the CPU
// has it, so both paths sum in the same order.
// ---------------------------------------------------------------------------------------------------------

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(64)));
};
template <typename T>
T3D_INLINE typename Vec<T>::type vload(const T* p) {
  typename Vec<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
T3D_INLINE void vstore(T* p, typename Vec<T>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

constexpr int kGR = 6;  // tile rows
constexpr int kGV = 4;  // tile vectors

// sum_{i < n} a[i * sa] * b[i * sb], in blocks of kSumBlock terms ("Summation order")
template <typename T>
T blocked_dot(const T* a, int64_t sa, const T* b, int64_t sb, int64_t n) {
  T total = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kSumBlock) {
    T part = 0;
    for (int64_t i = i0; i < std::min(n, i0 + kSumBlock); ++i) part += a[i * sa] * b[i * sb];
    total += part;
  }
  return total;
}

// acc vector i * kGV + j += per-lane sums over nv vectors of a[i][v] * b[j][v]   (i < kGR rows of a, j < kGV of b)
template <typename T>
T3D_INLINE void dot_tile_body(const T* const* a, const T* const* b, int64_t nv, T* acc) {
  using V = typename Vec<T>::type;
  constexpr int64_t VL = kLanes<T>;
  V r[kGR][kGV] = {};
  for (int64_t v = 0; v < nv; ++v) {
    V w[kGV];
    _Pragma("GCC unroll 4") for (int j = 0; j < kGV; ++j) w[j] = vload(b[j] + v * VL);
    _Pragma("GCC unroll 6") for (int i = 0; i < kGR; ++i) {
      const V x = vload(a[i] + v * VL);
      _Pragma("GCC unroll 4") for (int j = 0; j < kGV; ++j) r[i][j] += x * w[j];
    }
  }
  for (int i = 0; i < kGR; ++i)
    for (int j = 0; j < kGV; ++j) vstore(acc + (i * kGV + j) * VL, vload(acc + (i * kGV + j) * VL) + r[i][j]);
}

// out[i][v] (= or +=) sum_{q in [q0, q1)} coef[i][q * cs] * rows[q * rs + v * lanes]   (i < nvalid, v < NVEC)
template <typename T, int NVEC>
T3D_INLINE void outer_tile_body(const T* const* coef, int64_t cs, const T* rows, int64_t rs, int64_t q0, int64_t q1,
                                T* const* out, int nvalid, bool assign) {
  using V = typename Vec<T>::type;
  constexpr int64_t VL = kLanes<T>, kAhead = 8;
  // the rows are far apart (rows of w or col, K apart: no hardware prefetcher follows ~170 such streams), so ask
  // for the lines a few rows ahead, and for the output lines (write misses) before the reduction
  for (int i = 0; i < nvalid; ++i)
    for (int v = 0; v < NVEC; ++v) __builtin_prefetch(out[i] + v * VL, 1);
  V r[kGR][NVEC] = {};
  for (int64_t q = q0; q < q1; ++q) {
    const T* ahead = rows + std::min(q + kAhead, q1 - 1) * rs;
    _Pragma("GCC unroll 4") for (int v = 0; v < NVEC; ++v) __builtin_prefetch(ahead + v * VL);
    V b[NVEC];
    _Pragma("GCC unroll 4") for (int v = 0; v < NVEC; ++v) b[v] = vload(rows + q * rs + v * VL);
    _Pragma("GCC unroll 6") for (int i = 0; i < kGR; ++i) {
      const V c = V{} + coef[i][q * cs];
      _Pragma("GCC unroll 4") for (int v = 0; v < NVEC; ++v) r[i][v] += c * b[v];
    }
  }
  for (int i = 0; i < nvalid; ++i)
    for (int v = 0; v < NVEC; ++v) {
      T* d = out[i] + v * VL;
      vstore(d, assign ? r[i][v] : vload(d) + r[i][v]);
    }
}

__attribute__((target("avx512f,fma"))) void dot_tile_avx512(const float* const* a, const float* const* b, int64_t nv,
                                                             float* acc) {
  dot_tile_body<float>(a, b, nv, acc);
}
template <int NVEC>
__attribute__((target("avx512f,fma"))) void outer_tile_avx512(const float* const* coef, int64_t cs, const float* rows,
                                                               int64_t rs, int64_t q0, int64_t q1, float* const* out,
                                                               int nvalid, bool assign) {
  outer_tile_body<float, NVEC>(coef, cs, rows, rs, q0, q1, out, nvalid, assign);
}
// AVX2: the same sums, in sub-tiles that fit 16 ymm registers. The generic bodies compiled for AVX2 hold the
// 6 x 4 tile of 64-byte vectors in 48 ymm registers and spilled every step (TTL3 of T3D-121 at batch 1: forward
// 1.13x eager, backward 0.63x). Each lane's sum is still one chain over the vectors v (or the rows q) from zero,
// then added to the output: the same bits as the AVX-512 bodies, whatever the sub-tiling.
__attribute__((target("avx2,fma"))) void dot_tile_avx2(const float* const* a, const float* const* b, int64_t nv,
                                                        float* acc) {
  constexpr int64_t VL = kLanes<float>;
  for (int j0 = 0; j0 < kGV; j0 += 2)
    for (int h = 0; h < VL; h += 8) {  // 6 rows x 2 columns of one 8-lane half: 12 accumulators
      __m256 r[kGR][2];
#pragma GCC unroll 6
      for (int i = 0; i < kGR; ++i) r[i][0] = r[i][1] = _mm256_setzero_ps();
      const float* b0 = b[j0] + h;
      const float* b1 = b[j0 + 1] + h;
      for (int64_t v = 0; v < nv; ++v) {
        const __m256 w0 = _mm256_loadu_ps(b0 + v * VL), w1 = _mm256_loadu_ps(b1 + v * VL);
#pragma GCC unroll 6
        for (int i = 0; i < kGR; ++i) {
          const __m256 x = _mm256_loadu_ps(a[i] + h + v * VL);
          r[i][0] = _mm256_fmadd_ps(x, w0, r[i][0]);
          r[i][1] = _mm256_fmadd_ps(x, w1, r[i][1]);
        }
      }
#pragma GCC unroll 6
      for (int i = 0; i < kGR; ++i)
#pragma GCC unroll 2
        for (int j = 0; j < 2; ++j) {
          float* d = acc + (i * kGV + j0 + j) * VL + h;
          _mm256_storeu_ps(d, _mm256_add_ps(_mm256_loadu_ps(d), r[i][j]));
        }
    }
}
template <int NVEC>
__attribute__((target("avx2,fma"))) void outer_tile_avx2(const float* const* coef, int64_t cs, const float* rows,
                                                          int64_t rs, int64_t q0, int64_t q1, float* const* out,
                                                          int nvalid, bool assign) {
  constexpr int64_t VL = kLanes<float>, kAhead = 8;
  for (int i = 0; i < nvalid; ++i)
    for (int v = 0; v < NVEC; ++v) __builtin_prefetch(out[i] + v * VL, 1);
  for (int v = 0; v < NVEC; ++v) {  // one 16-float vector of the rows at a time: 6 x 2 ymm accumulators
    __m256 r[kGR][2];
#pragma GCC unroll 6
    for (int i = 0; i < kGR; ++i) r[i][0] = r[i][1] = _mm256_setzero_ps();
    for (int64_t q = q0; q < q1; ++q) {
      __builtin_prefetch(rows + std::min(q + kAhead, q1 - 1) * rs + v * VL);
      const float* row = rows + q * rs + v * VL;
      const __m256 b0 = _mm256_loadu_ps(row), b1 = _mm256_loadu_ps(row + 8);
#pragma GCC unroll 6
      for (int i = 0; i < kGR; ++i) {
        const __m256 c = _mm256_broadcast_ss(coef[i] + q * cs);
        r[i][0] = _mm256_fmadd_ps(c, b0, r[i][0]);
        r[i][1] = _mm256_fmadd_ps(c, b1, r[i][1]);
      }
    }
    for (int i = 0; i < nvalid; ++i) {
      float* d = out[i] + v * VL;
      _mm256_storeu_ps(d, assign ? r[i][0] : _mm256_add_ps(_mm256_loadu_ps(d), r[i][0]));
      _mm256_storeu_ps(d + 8, assign ? r[i][1] : _mm256_add_ps(_mm256_loadu_ps(d + 8), r[i][1]));
    }
  }
}
template <typename T>
void dot_tile(const T* const* a, const T* const* b, int64_t nv, T* acc) {
  if constexpr (std::is_same_v<T, float>) {
    if (use_avx512()) return dot_tile_avx512(a, b, nv, acc);
    if (use_avx2()) return dot_tile_avx2(a, b, nv, acc);
  }
  dot_tile_body<T>(a, b, nv, acc);
}
template <typename T, int NVEC>
void outer_tile(const T* const* coef, int64_t cs, const T* rows, int64_t rs, int64_t q0, int64_t q1, T* const* out,
                int nvalid, bool assign) {
  if constexpr (std::is_same_v<T, float>) {
    if (use_avx512()) return outer_tile_avx512<NVEC>(coef, cs, rows, rs, q0, q1, out, nvalid, assign);
    if (use_avx2()) return outer_tile_avx2<NVEC>(coef, cs, rows, rs, q0, q1, out, nvalid, assign);
  }
  outer_tile_body<T, NVEC>(coef, cs, rows, rs, q0, q1, out, nvalid, assign);
}

// out[p * ldo + o] = sum_k col[p * K + k] * w[o * K + k]. Per thread a range of output-channel groups; k in chunks
// of kSumBlock vectors (one summation block per lane), each chunk's rows of col stay in L2 while the weight rows
// stream past once.
template <typename T>
void weights_major_forward(const T* col, const T* w, int64_t M, int64_t K, int64_t cout, T* out, int64_t ldo) {
  constexpr int64_t VL = kLanes<T>;
  const int64_t kv = K / VL, npt = (M + kGR - 1) / kGR, nog = (cout + kGV - 1) / kGV;
  at::parallel_for(0, nog, 1, [&](int64_t ob, int64_t oe) {
    std::vector<T> acc((oe - ob) * npt * kGR * kGV * VL, T(0));  // vector partials
    const T* a[kGR];
    const T* b[kGV];
    for (int64_t c0 = 0; c0 < kv; c0 += kSumBlock) {
      const int64_t nv = std::min<int64_t>(kSumBlock, kv - c0);
      for (int64_t og = ob; og < oe; ++og) {
        for (int j = 0; j < kGV; ++j) b[j] = w + std::min(og * kGV + j, cout - 1) * K + c0 * VL;
        for (int64_t pt = 0; pt < npt; ++pt) {
          for (int i = 0; i < kGR; ++i) a[i] = col + std::min(pt * kGR + i, M - 1) * K + c0 * VL;
          dot_tile<T>(a, b, nv, acc.data() + ((og - ob) * npt + pt) * kGR * kGV * VL);
        }
      }
    }
    for (int64_t og = ob; og < oe; ++og)
      for (int64_t pt = 0; pt < npt; ++pt)
        for (int i = 0; i < kGR && pt * kGR + i < M; ++i)
          for (int j = 0; j < kGV && og * kGV + j < cout; ++j) {
            const int64_t p = pt * kGR + i, o = og * kGV + j;
            const T* s = acc.data() + (((og - ob) * npt + pt) * kGR * kGV + i * kGV + j) * VL;
            T sum = 0;
            for (int l = 0; l < VL; ++l) sum += s[l];
            out[p * ldo + o] = sum + blocked_dot(col + p * K + kv * VL, 1, w + o * K + kv * VL, 1, K - kv * VL);
          }
  });
}

// gw[o * K + k] = sum_p gy[p * ldg + o] * col[p * K + k]  and  gcol[p * K + k] = sum_o gy[p * ldg + o] * w[o * K + k],
// tasks of kGV vectors of k (then single vectors, then the scalar tail): each task reads its columns of col and w
// once, both within L1/L2 while every tile of output channels / positions passes.
template <typename T>
void weights_major_backward(const T* col, const T* w, const T* gy, int64_t ldg, int64_t M, int64_t K, int64_t cout,
                            T* gw, T* gcol) {
  constexpr int64_t VL = kLanes<T>;
  const int64_t kv = K / VL, nwide = kv / kGV, ntasks = nwide + (kv - nwide * kGV);
  at::parallel_for(0, ntasks, 1, [&](int64_t begin, int64_t end) {
    const T* coef[kGR];
    T* out[kGR];
    for (int64_t task = begin; task < end; ++task) {
      const bool wide = task < nwide;
      const int64_t k0 = wide ? task * kGV * VL : (nwide * kGV + task - nwide) * VL;
      for (int64_t o0 = 0; o0 < cout; o0 += kGR) {  // gw rows o0.. : coef gy[p][o], rows col[p]
        const int nvalid = (int)std::min<int64_t>(kGR, cout - o0);
        for (int i = 0; i < kGR; ++i) {
          coef[i] = gy + std::min<int64_t>(o0 + i, cout - 1);
          out[i] = gw + std::min<int64_t>(o0 + i, cout - 1) * K + k0;
        }
        for (int64_t q0 = 0; q0 < M; q0 += kSumBlock) {
          const int64_t q1 = std::min(M, q0 + kSumBlock);
          if (wide)
            outer_tile<T, kGV>(coef, ldg, col + k0, K, q0, q1, out, nvalid, q0 == 0);
          else
            outer_tile<T, 1>(coef, ldg, col + k0, K, q0, q1, out, nvalid, q0 == 0);
        }
      }
      for (int64_t p0 = 0; p0 < M; p0 += kGR) {  // gcol rows p0.. : coef gy[p][o], rows w[o]
        const int nvalid = (int)std::min<int64_t>(kGR, M - p0);
        for (int i = 0; i < kGR; ++i) {
          coef[i] = gy + std::min<int64_t>(p0 + i, M - 1) * ldg;
          out[i] = gcol + std::min<int64_t>(p0 + i, M - 1) * K + k0;
        }
        for (int64_t q0 = 0; q0 < cout; q0 += kSumBlock) {
          const int64_t q1 = std::min(cout, q0 + kSumBlock);
          if (wide)
            outer_tile<T, kGV>(coef, 1, w + k0, K, q0, q1, out, nvalid, q0 == 0);
          else
            outer_tile<T, 1>(coef, 1, w + k0, K, q0, q1, out, nvalid, q0 == 0);
        }
      }
    }
  });
  for (int64_t k = kv * VL; k < K; ++k) {
    for (int64_t o = 0; o < cout; ++o) gw[o * K + k] = blocked_dot(gy + o, ldg, col + k, K, M);
    for (int64_t p = 0; p < M; ++p) gcol[p * K + k] = blocked_dot(gy + p * ldg, 1, w + k, K, cout);
  }
}

// Channels per tile of the weight packing: the tile's part of w (NR rows x CT channels x taps) within about one
// L1 (48 KB). With 16 channels it was 110 KB for TTL2's 4x3x3 branch, and packing TTL2's 11 MB of weights took
// 3.8 ms of its 9.4 ms forward (the register tiles: 5.5 ms); measured best at 4-8 channels there.
template <typename T>
int64_t pack_tile_len(int64_t taps, int64_t nr) {
  return std::clamp<int64_t>((48 * 1024) / (nr * taps * (int64_t)sizeof(T)), 1, 16);
}

// packed forward weights of a branch: [nblock][tap][c][NR], zero beyond cout
template <typename T>
at::Tensor pack_forward_weights(const at::Tensor& w, const Branch& b, int64_t C) {
  constexpr int64_t NR = NV * kLanes<T>;
  const int64_t taps = b.depth * b.kh * b.kw, CT = pack_tile_len<T>(taps, NR), nct = (C + CT - 1) / CT;
  auto packed = empty_huge({b.nblocks, taps, C, NR}, w.options());
  const T* pw = w.data_ptr<T>();
  T* out = packed.data_ptr<T>();
  // tiles of (output block, CT input channels): the tile's source rows (NR x CT x taps) are copied into a compact
  // buffer (rows C * taps apart in w map onto the same few L1 sets: TTL2's rows lie 72 KB apart, and gathering
  // from them missed L1 on every element), which stays in cache while the packed rows are written contiguously
  // (a loop in source order writes a page apart and thrashes the TLB). TTL2's forward packing: 3.8 -> 1.6 ms.
  at::parallel_for(0, b.nblocks * nct, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(NR * CT * taps);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t nb = t / nct, c0 = (t % nct) * CT, cn = std::min(CT, C - c0), len = cn * taps;
      const int64_t on = std::min(NR, b.cout - nb * NR);
      const T* tile = pw + (nb * NR * C + c0) * taps;  // rows o of the tile are C*taps apart
      for (int64_t oo = 0; oo < on; ++oo) std::memcpy(buf.data() + oo * len, tile + oo * C * taps, len * sizeof(T));
      std::fill(buf.data() + on * len, buf.data() + NR * len, T(0));  // zero beyond cout
      for (int64_t j = 0; j < taps; ++j)
        for (int64_t c = 0; c < cn; ++c)  // written contiguously
          gather_column(buf.data() + c * taps + j, len, out + ((nb * taps + j) * C + c0 + c) * NR);
    }
  });
  return packed;
}

// row offset (in rows of C) of the window corner for each output position (n, to, ho, wo)
std::vector<int64_t> output_rows(const Problem& pb) {
  const TtlGeometry& g = pb.g;
  std::vector<int64_t> rows(pb.N * pb.Mo);
  int64_t p = 0;
  for (int64_t n = 0; n < pb.N; ++n)
    for (int64_t to = 0; to < g.To; ++to)
      for (int64_t ho = 0; ho < g.Ho; ++ho)
        for (int64_t wo = 0; wo < g.Wo; ++wo)
          rows[p++] = ((n * g.Ts + g.stride * to) * g.Hs + g.stride * ho) * g.Ws + g.stride * wo;
  return rows;
}

// Few output positions (deep TTLs at small clips: TTL3 of T3D-121 has 18 per clip) make the weights, not the
// activations, the big operand; packing them costs more than the convolution. Then every branch is a plain GEMM on
// the weights' own layout: an im2col of the few positions, in the weights' (c, tap) order, and the weights-major
// GEMMs above (BLAS ran these shapes at 26-37 GFLOP/s, 1 thread).
bool use_gemm_path(const Problem& pb) {
  int64_t min_cout = pb.branches.front().cout;
  for (const auto& b : pb.branches) min_cout = std::min(min_cout, b.cout);
  return pb.N * pb.Mo <= 2 * min_cout;
}

// the source row of each tap (dt, dh, dw) of branch b at the output position whose window corner is `row`
template <typename T, typename P>
void tap_rows_of(T* src, const Problem& pb, const Branch& b, int64_t row, P* out) {
  const TtlGeometry& g = pb.g;
  for (int64_t dt = 0; dt < b.depth; ++dt)
    for (int64_t dh = 0; dh < b.kh; ++dh)
      for (int64_t dw = 0; dw < b.kw; ++dw)
        out[(dt * b.kh + dh) * b.kw + dw] = src + (row + b.origin_row + (dt * g.Hs + dh) * g.Ws + dw) * pb.Cs;
}

constexpr int64_t kCB = 16;  // channels per block of the im2col transposes (a 64-byte line of float32)

// im2col of branch b: (M, C * taps) with column c * taps + tap, the layout of the branch's weight rows
template <typename T>
at::Tensor im2col(const T* src, const Problem& pb, const Branch& b, const std::vector<int64_t>& rows,
                  const at::TensorOptions& opts) {
  const int64_t C = pb.C, taps = b.depth * b.kh * b.kw, K = C * taps, M = pb.N * pb.Mo;
  auto col = empty_huge({M, K}, opts);
  T* out = col.data_ptr<T>();
  // per position, blocks of kCB channels x all taps: a column block (kCB * taps contiguous floats, in L1) from one
  // line-sized run of each tap's row (a tap-by-tap loop wrote each float to a new line: 0.36 -> 0.22 ms for TTL3's
  // depth-4 branch, 1 thread)
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    std::vector<const T*> tap_row(taps);
    for (int64_t p = begin; p < end; ++p) {
      tap_rows_of(src, pb, b, rows[p], tap_row.data());
      T* dst = out + p * K;
      for (int64_t c0 = 0; c0 < C; c0 += kCB)
        for (int64_t j = 0; j < taps; ++j)
          for (int64_t c = c0; c < std::min(C, c0 + kCB); ++c) dst[c * taps + j] = tap_row[j][c];
    }
  });
  return col;
}

// the adjoint of im2col: gsrc rows += columns (parallel over channel ranges: rows of different taps overlap)
template <typename T>
void col2im_add(const at::Tensor& col, const Problem& pb, const Branch& b, const std::vector<int64_t>& rows, T* gsrc) {
  const int64_t C = pb.C, taps = b.depth * b.kh * b.kw, K = C * taps, M = pb.N * pb.Mo;
  const T* in = col.data_ptr<T>();
  at::parallel_for(0, (C + kCB - 1) / kCB, 1, [&](int64_t cbb, int64_t cbe) {
    std::vector<T*> tap_row(taps);
    for (int64_t p = 0; p < M; ++p) {
      tap_rows_of(gsrc, pb, b, rows[p], tap_row.data());
      const T* src_col = in + p * K;
      for (int64_t c0 = cbb * kCB; c0 < std::min(C, cbe * kCB); c0 += kCB)
        for (int64_t j = 0; j < taps; ++j)
          for (int64_t c = c0; c < std::min(C, c0 + kCB); ++c) tap_row[j][c] += src_col[c * taps + j];
    }
  });
}

template <typename T>
void conv_forward_gemm(const T* src, const Problem& pb, const std::vector<at::Tensor>& weights, T* y,
                       const at::TensorOptions& opts) {
  const std::vector<int64_t> rows = output_rows(pb);
  for (size_t bi = 0; bi < pb.branches.size(); ++bi) {
    const Branch& b = pb.branches[bi];
    const at::Tensor col = im2col<T>(src, pb, b, rows, opts);
    const int64_t M = pb.N * pb.Mo;
    std::vector<T> yb(M * b.cout);  // (M, cout)
    weights_major_forward<T>(col.data_ptr<T>(), weights[bi].data_ptr<T>(), M, col.size(1), b.cout, yb.data(), b.cout);
    const T* pyb = yb.data();
    at::parallel_for(0, pb.N * b.cout, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t n = i / b.cout, o = i % b.cout;
        T* out = y + (n * pb.C_out + b.y_off + o) * pb.Mo;
        for (int64_t q = 0; q < pb.Mo; ++q) out[q] = pyb[(n * pb.Mo + q) * b.cout + o];
      }
    });
  }
}

template <typename T>
void conv_forward(const T* src, const Problem& pb, const std::vector<at::Tensor>& weights, T* y) {
  constexpr int64_t L = kLanes<T>, NR = NV * L;
  const TtlGeometry& g = pb.g;
  const int64_t C = pb.C, M = pb.N * pb.Mo;
  const int64_t ld = pb.branches.back().acc_col + pb.branches.back().nblocks * NR;
  std::vector<at::Tensor> packed;
  for (size_t i = 0; i < weights.size(); ++i) packed.push_back(pack_forward_weights<T>(weights[i], pb.branches[i], C));
  at::Tensor acc_t = empty_huge({M * ld}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  T* acc = acc_t.data_ptr<T>();  // every element assigned by the first K-block's tiles
  const std::vector<int64_t> rows = output_rows(pb);
  const int64_t ntiles = (M + MR - 1) / MR;
  // Position chunks of about one sample's worth of tiles: every K-block below sweeps the chunk's tiles, so the
  // chunk's source rows must stay in cache across K-blocks (a whole batch-4 source tensor does not fit in L3).
  const int64_t chunk_tiles = std::max<int64_t>(16, (pb.Mo + MR - 1) / MR);
  at::parallel_for(0, ntiles, 4, [&](int64_t tb_all, int64_t te_all) {
    int64_t tile_rows[MR];
    for (int64_t tb = tb_all; tb < te_all; tb += chunk_tiles)
    for (size_t bi = 0; bi < pb.branches.size(); ++bi) {
      const int64_t te = std::min(te_all, tb + chunk_tiles);
      const Branch& b = pb.branches[bi];
      const int64_t sp = b.kh * b.kw, taps = b.depth * sp;
      // channel block: keep one temporal tap's packed weights for the block within ~256 KB of L2
      const int64_t cb_max = std::max<int64_t>(8, (256 * 1024) / (sp * NR * (int64_t)sizeof(T)));
      const int64_t ncb = (C + cb_max - 1) / cb_max, cb_len = (C + ncb - 1) / ncb;
      std::vector<int64_t> tap_off(taps);
      for (int64_t dt = 0; dt < b.depth; ++dt)
        for (int64_t dh = 0; dh < b.kh; ++dh)
          for (int64_t dw = 0; dw < b.kw; ++dw)
            tap_off[(dt * b.kh + dh) * b.kw + dw] = ((dt * g.Hs + dh) * g.Ws + dw) * pb.Cs;
      const T* wbase = packed[bi].data_ptr<T>();
      std::vector<const T*> wtap(sp);
      for (int64_t nb = 0; nb < b.nblocks; ++nb) {
        T* acc_nb = acc + b.acc_col + nb * NR;
        bool first = true;
        for (int64_t dt = 0; dt < b.depth; ++dt)
          for (int64_t c0 = 0; c0 < C; c0 += cb_len) {
            const int64_t cb = std::min(cb_len, C - c0);
            for (int64_t s = 0; s < sp; ++s) wtap[s] = wbase + ((nb * taps + dt * sp + s) * C) * NR;
            for (int64_t t = tb; t < te; ++t) {
              const int64_t p0 = t * MR;
              const int mr_valid = (int)std::min<int64_t>(MR, M - p0);
              for (int r = 0; r < MR; ++r)
                tile_rows[r] = (rows[p0 + std::min(r, mr_valid - 1)] + b.origin_row) * pb.Cs;
              fwd_tile_mv(src, tile_rows, tap_off.data() + dt * sp, (int)sp, c0, cb, wtap.data(), acc_nb + p0 * ld, ld,
                          mr_valid, first);
            }
            first = false;
          }
      }
    }
  });
  // channels-last accumulator -> y (N, C_out, To, Ho, Wo)
  at::parallel_for(0, pb.N * pb.C_out, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / pb.C_out, o = i % pb.C_out;
      size_t bi = 0;
      while (o >= pb.branches[bi].y_off + pb.branches[bi].cout) ++bi;
      const int64_t col = pb.branches[bi].acc_col + (o - pb.branches[bi].y_off);
      T* out = y + i * pb.Mo;
      const T* in = acc + n * pb.Mo * ld + col;
      for (int64_t p = 0; p < pb.Mo; ++p) out[p] = in[p * ld];
    }
  });
}

// packed transposed weights of a branch: [cblock][tap][o][NR over input channels], zero beyond C. Tiles of
// (channel block, OT output channels): the tile's rows of w (OT x NR x taps) stay in L1 (pack_tile_len).
template <typename T>
at::Tensor pack_transposed_weights(const at::Tensor& w, const Branch& b, int64_t C) {
  constexpr int64_t NR = NV * kLanes<T>;
  const int64_t taps = b.depth * b.kh * b.kw, OT = pack_tile_len<T>(taps, NR);
  const int64_t ncb = (C + NR - 1) / NR, not_ = (b.cout + OT - 1) / OT;
  auto packed = empty_huge({ncb, taps, b.cout, NR}, w.options());
  const T* pw = w.data_ptr<T>();
  T* out = packed.data_ptr<T>();
  at::parallel_for(0, ncb * not_, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t cb = t / not_, o0 = (t % not_) * OT, on = std::min(OT, b.cout - o0);
      const int64_t cn = std::min(NR, C - cb * NR);
      for (int64_t j = 0; j < taps; ++j)
        for (int64_t o = o0; o < o0 + on; ++o) {
          T* dst = out + ((cb * taps + j) * b.cout + o) * NR;
          const T* row = pw + (o * C + cb * NR) * taps + j;
          for (int64_t cc = 0; cc < cn; ++cc) dst[cc] = row[cc * taps];
          for (int64_t cc = cn; cc < NR; ++cc) dst[cc] = T(0);
        }
    }
  });
  return packed;
}

// Per dim: source index v receives tap k of a branch whose origin is o0 when (v - o0 - k) is a non-negative
// multiple of the stride s and (v - o0 - k)/s < n_out.
T3D_INLINE bool tap_hits(int64_t v, int64_t o0, int64_t k, int64_t s, int64_t n_out, int64_t& out_idx) {
  const int64_t d = v - o0 - k;
  if (s == 2) {  // the pooling TTL: a parity test and a shift, not two 64-bit divisions per tap, row and dim
    if (d < 0 || (d & 1)) return false;
    out_idx = d >> 1;
  } else {
    if (d < 0 || d % s != 0) return false;
    out_idx = d / s;
  }
  return out_idx < n_out;
}

// The source indices [lo, hi) along one dim that the input gradient (step 5) reads: with pooling the box windows
// that overlap the input, v in [pad - 1, pad + n - 1] (box_window); without, the input itself, [pad, pad + n). The
// other source positions (the box windows that lie wholly in the zero padding) get no gradient computed.
inline void source_rows_read(int64_t pad, int64_t n, bool pool, int64_t& lo, int64_t& hi) {
  lo = pool ? std::max<int64_t>(0, pad - 1) : pad;
  hi = pad + n;
}

template <typename T>
void source_grad(const T* gy_cl, int64_t ldg, const Problem& pb, const std::vector<at::Tensor>& weights, T* gsrc) {
  constexpr int64_t L = kLanes<T>, NR = NV * L;
  const TtlGeometry& g = pb.g;
  const int64_t C = pb.C, s = g.stride, ncb = (C + NR - 1) / NR;
  std::vector<at::Tensor> packed;
  for (size_t i = 0; i < weights.size(); ++i)
    packed.push_back(pack_transposed_weights<T>(weights[i], pb.branches[i], C));
  std::vector<T> zero_row(ldg, T(0));
  // positions grouped by parity class (t%s, h%s, w%s); tiles of MR positions within one class and sample
  struct Tile {
    int64_t n, cls, first, count;
  };
  std::vector<Tile> tiles;
  std::vector<std::vector<int64_t>> class_pos(s * s * s);  // (ts, hs, ws) packed as row index within a sample
  // only the source positions the input gradient reads (source_rows_read): the rest of gsrc is left unwritten
  int64_t t_lo, t_hi, h_lo, h_hi, w_lo, w_hi;
  source_rows_read(g.front, g.T, g.pool, t_lo, t_hi);
  source_rows_read(g.ph, g.H, g.pool, h_lo, h_hi);
  source_rows_read(g.pw, g.W, g.pool, w_lo, w_hi);
  for (int64_t ts = t_lo; ts < t_hi; ++ts)
    for (int64_t hs = h_lo; hs < h_hi; ++hs)
      for (int64_t ws = w_lo; ws < w_hi; ++ws)
        class_pos[((ts % s) * s + hs % s) * s + ws % s].push_back((ts * g.Hs + hs) * g.Ws + ws);
  for (int64_t n = 0; n < pb.N; ++n)
    for (int64_t cls = 0; cls < s * s * s; ++cls)
      for (int64_t f = 0; f < (int64_t)class_pos[cls].size(); f += MR)
        tiles.push_back({n, cls, f, std::min<int64_t>(MR, class_pos[cls].size() - f)});
  const int64_t nb = (int64_t)pb.branches.size();
  // Tiles go in chunks of kChunk: per channel block, branch and group of taps (dgrad_block_taps), the chunk's
  // tiles take turns, so a group's packed weights (cout x NR floats: 16 KB at TTL2) are read from L1 by all the
  // chunk's tiles instead of streaming every tap's weights from L2 for each tile. Each tile still adds its groups
  // into its accumulator in the same order (branch, then group): the same sums.
  constexpr int64_t kChunk = 8;
  at::parallel_for(0, (int64_t)tiles.size(), kChunk, [&](int64_t begin, int64_t end) {
    // per tile of the chunk and branch: the taps that land on the tile's parity class, and each row's gy row (or a
    // zero row)
    std::vector<std::vector<std::vector<const T*>>> tap_rows(kChunk, std::vector<std::vector<const T*>>(nb));
    std::vector<std::vector<std::vector<int64_t>>> tap_ids(kChunk, std::vector<std::vector<int64_t>>(nb));
    std::vector<std::vector<const T*>> wt(kChunk);
    std::vector<T> acc_buf(kChunk * MR * NR + 16);
    T* acc = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(acc_buf.data()) + 63) & ~uintptr_t(63));
    for (int64_t cb = begin; cb < end; cb += kChunk) {
      const int64_t nt = std::min(kChunk, end - cb);
      for (int64_t k = 0; k < nt; ++k) {
        const Tile& tile = tiles[cb + k];
        const int64_t* pos = class_pos[tile.cls].data() + tile.first;
        // each row's (ts, hs, ws), decoded once per tile (the divisions had been redone for every tap)
        int64_t rt[MR], rh[MR], rw[MR];
        for (int r = 0; r < tile.count; ++r)
          rt[r] = pos[r] / (g.Hs * g.Ws), rh[r] = (pos[r] / g.Ws) % g.Hs, rw[r] = pos[r] % g.Ws;
        const int64_t t_0 = rt[0], h_0 = rh[0], w_0 = rw[0];
        for (int64_t bi = 0; bi < nb; ++bi) {
          const Branch& b = pb.branches[bi];
          auto& rows_k = tap_rows[k][bi];
          auto& ids_k = tap_ids[k][bi];
          rows_k.clear();
          ids_k.clear();
          for (int64_t dt = 0; dt < b.depth; ++dt) {
            if ((t_0 - b.t0 - dt) % s != 0) continue;
            for (int64_t dh = 0; dh < b.kh; ++dh) {
              if ((h_0 - b.h0 - dh) % s != 0) continue;
              for (int64_t dw = 0; dw < b.kw; ++dw) {
                if ((w_0 - b.w0 - dw) % s != 0) continue;
                bool any = false;
                const size_t at_ = rows_k.size();
                for (int r = 0; r < MR; ++r) {
                  const T* row = zero_row.data();
                  if (r < tile.count) {
                    int64_t to, ho, wo;
                    if (tap_hits(rt[r], b.t0, dt, s, g.To, to) && tap_hits(rh[r], b.h0, dh, s, g.Ho, ho) &&
                        tap_hits(rw[r], b.w0, dw, s, g.Wo, wo)) {
                      row = gy_cl + (tile.n * pb.Mo + (to * g.Ho + ho) * g.Wo + wo) * ldg + b.y_off;
                      any = true;
                    }
                  }
                  rows_k.push_back(row);
                }
                if (any)
                  ids_k.push_back((dt * b.kh + dh) * b.kw + dw);
                else
                  rows_k.resize(at_);
              }
            }
          }
        }
      }
      for (int64_t cbi = 0; cbi < ncb; ++cbi) {
        const int64_t c0 = cbi * NR, cvalid = std::min<int64_t>(NR, C - c0);
        std::fill(acc, acc + nt * MR * NR, T(0));
        for (int64_t bi = 0; bi < nb; ++bi) {
          const Branch& b = pb.branches[bi];
          const int64_t taps = b.depth * b.kh * b.kw, group = dgrad_block_taps(b.cout);
          const T* wbase = packed[bi].template data_ptr<T>() + cbi * taps * b.cout * NR;
          int64_t most = 0;
          for (int64_t k = 0; k < nt; ++k) {
            wt[k].clear();
            for (int64_t j : tap_ids[k][bi]) wt[k].push_back(wbase + j * b.cout * NR);
            most = std::max<int64_t>(most, (int64_t)wt[k].size());
          }
          for (int64_t j0 = 0; j0 < most; j0 += group)
            for (int64_t k = 0; k < nt; ++k) {
              const int64_t n_k = (int64_t)wt[k].size();
              if (j0 >= n_k) continue;
              dgrad_tile_mv(tap_rows[k][bi].data() + j0 * MR, wt[k].data() + j0, (int)std::min(group, n_k - j0),
                            b.cout, acc + k * MR * NR, cvalid);
            }
        }
        for (int64_t k = 0; k < nt; ++k) {
          const Tile& tile = tiles[cb + k];
          const int64_t* pos = class_pos[tile.cls].data() + tile.first;
          for (int r = 0; r < tile.count; ++r)
            std::memcpy(gsrc + (tile.n * g.Ts * g.Hs * g.Ws + pos[r]) * pb.Cs + c0, acc + (k * MR + r) * NR,
                        cvalid * sizeof(T));
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// 5. box adjoint + ReLU mask + BN backward
// ---------------------------------------------------------------------------------------------------------
// Per (sample, frame) plane and block of 16 channels (64 bytes of a source row): the box filter's adjoint into a
// channel-major block (16 x H*W, in L1/L2), then per channel one contiguous row of the plane through the ReLU mask
// and the BN sums (vectorized row kernels below). A plane's two source frames stay in L2 across its channel blocks
// (tasks of (sample, channel block) sweeping the frames in order read each line once but were 1.5x slower: strided
// misses); nothing of the plane's size is written but grad_x. Measured at TTL1 of T3D-121, 1 thread: 28 -> 9 ms.

// ReLU mask and BN backward of one row: g = relu'(x * sc + sh) * gz; out = training ? g : g * sc; sums of g and
// g * (x - mu), in blocks of kSumBlock ("Summation order")
T3D_CLONES void row_bn_backward(const float* x, const float* gz, float* out, int64_t len, float sc, float sh, float mu,
                                bool training, float& sum_g, float& sum_gx) {
  const v16f scv = v16f{} + sc, shv = v16f{} + sh, muv = v16f{} + mu, zero = v16f{};
  const v16f outk = v16f{} + (training ? 1.0f : sc);
  float tg = 0, tgx = 0;
  int64_t j = 0;
  while (j + 16 <= len) {
    const int64_t end = std::min(len, j + 16 * kSumBlock);
    v16f ag = v16f{}, agx = v16f{};
    for (; j + 16 <= end; j += 16) {
      const v16f xv = load16(x + j);
      const v16f gv = xv * scv + shv > zero ? load16(gz + j) : zero;
      ag += gv;
      agx += gv * (xv - muv);
      store16(out + j, gv * outk);
    }
    float bg = 0, bgx = 0;
    for (int i = 0; i < 16; ++i) bg += ag[i], bgx += agx[i];
    tg += bg, tgx += bgx;
  }
  float rg = 0, rgx = 0;
  for (; j < len; ++j) {
    const float gv = x[j] * sc + sh > 0.0f ? gz[j] : 0.0f;
    rg += gv;
    rgx += gv * (x[j] - mu);
    out[j] = training ? gv : gv * sc;
  }
  sum_g += tg + rg;
  sum_gx += tgx + rgx;
}
template <typename T>
void row_bn_backward(const T* x, const T* gz, T* out, int64_t len, T sc, T sh, T mu, bool training, T& sum_g,
                     T& sum_gx) {
  T tg = 0, tgx = 0;
  for (int64_t j0 = 0; j0 < len; j0 += kSumBlock) {
    T bg = 0, bgx = 0;
    for (int64_t j = j0; j < std::min(len, j0 + kSumBlock); ++j) {
      const T gv = x[j] * sc + sh > T(0) ? gz[j] : T(0);
      bg += gv;
      bgx += gv * (x[j] - mu);
      out[j] = training ? gv : gv * sc;
    }
    tg += bg, tgx += bgx;
  }
  sum_g += tg, sum_gx += tgx;
}

// the training-mode correction of one row: g = sc * g + kx * x + k0
T3D_CLONES void row_bn_correct(const float* x, float* g, int64_t len, float sc, float kx, float k0) {
  const v16f scv = v16f{} + sc, kxv = v16f{} + kx, k0v = v16f{} + k0;
  int64_t j = 0;
  for (; j + 16 <= len; j += 16) store16(g + j, scv * load16(g + j) + kxv * load16(x + j) + k0v);
  for (; j < len; ++j) g[j] = sc * g[j] + kx * x[j] + k0;
}
template <typename T>
void row_bn_correct(const T* x, T* g, int64_t len, T sc, T kx, T k0) {
  for (int64_t j = 0; j < len; ++j) g[j] = sc * g[j] + kx * x[j] + k0;
}


// The box adjoint of one block of 16 channels of frame plane f1 (and f0, the frame before it, or null; positions ld
// floats apart), float:
// tsum[q] = f1[q] + f0[q] over the rows [h_lo, h_hi) and columns [w_lo, w_hi) source_grad wrote, then
// gzt[cc][h * W + w] = 0.125 * (the sum of tsum over the 2x2 window (uh-1..uh, uw-1..uw) in that order). The same
// operations per channel as the generic loop in input_grad, on one 16-lane vector.
T3D_CLONES void box_adjoint_block16(const float* f0, const float* f1, int64_t ld, const TtlGeometry& g, int64_t h_lo,
                                    int64_t h_hi, int64_t w_lo, int64_t w_hi, float* tsum, float* gzt) {
  const v16f zero = {};
  for (int64_t hs = h_lo; hs < h_hi; ++hs)
    for (int64_t q = hs * g.Ws + w_lo; q < hs * g.Ws + w_hi; ++q)
      store16(tsum + q * 16, load16(f1 + q * ld) + (f0 ? load16(f0 + q * ld) : zero));
  const int64_t hw = g.H * g.W;
  for (int64_t h = 0; h < g.H; ++h)
    for (int64_t w = 0; w < g.W; ++w) {
      const int64_t uh = h + g.ph, uw = w + g.pw;
      v16f v = zero;
      for (int64_t hs = uh - 1; hs <= uh; ++hs)
        for (int64_t ws = uw - 1; ws <= uw; ++ws)
          if (hs >= 0 && ws >= 0) v += load16(tsum + (hs * g.Ws + ws) * 16);
      v *= 0.125f;
      float* d = gzt + h * g.W + w;
      for (int cc = 0; cc < 16; ++cc) d[cc * hw] = v[cc];
    }
}

template <typename T>
void input_grad(const T* gsrc, const at::Tensor& x, const Problem& pb, const T* scale, const T* shift,
                const T* mean, const T* invstd, bool training, at::Tensor& grad_x, T* sum_g, T* sum_gx) {
  const TtlGeometry& g = pb.g;
  const int64_t C = pb.C, hw = g.H * g.W;
  constexpr int64_t CB = 16;
  const T* xp = x.data_ptr<T>();
  T* gp = grad_x.data_ptr<T>();
  const int64_t xs[5] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3), x.stride(4)};
  const int64_t gs[5] = {grad_x.stride(0), grad_x.stride(1), grad_x.stride(2), grad_x.stride(3), grad_x.stride(4)};
  const bool x_row = plane_is_row(xs, g.H, g.W), g_row = plane_is_row(gs, g.H, g.W);
  const int nthreads = at::get_num_threads();
  std::vector<T> partial(2 * C * nthreads, T(0));
  const int64_t Cs = pb.Cs, plane = g.Hs * g.Ws * Cs;
  int64_t h_lo, h_hi, w_lo, w_hi;
  source_rows_read(g.ph, g.H, g.pool, h_lo, h_hi);
  source_rows_read(g.pw, g.W, g.pool, w_lo, w_hi);
  at::parallel_for(0, pb.N * g.T, 1, [&](int64_t begin, int64_t end) {
    T* psum_g = partial.data() + 2 * C * at::get_thread_num();
    T* psum_gx = psum_g + C;
    std::vector<T> tsum(g.Hs * g.Ws * CB), gzt(CB * hw), xrow(x_row ? 0 : hw), grow(g_row ? 0 : hw);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t n = idx / g.T, t = idx % g.T;
      const int64_t ut = t + g.front;
      const T* base = gsrc + n * g.Ts * plane;
      for (int64_t c0 = 0; c0 < C; c0 += CB) {
        const int64_t cn = std::min(CB, C - c0);
        // the box adjoint of channels [c0, c0 + cn), channel-major: gzt[cc][h * W + w]
        if (g.pool) {  // the adjoint of the 2-window mean: source frames ut-1 and ut, rows uh-1, uh, columns uw-1, uw
          const T* f1 = base + ut * plane + c0;
          const T* f0 = ut >= 1 ? base + (ut - 1) * plane + c0 : nullptr;
          bool done = false;  // the float path with a full block of 16 channels: one vector per position
          if constexpr (std::is_same_v<T, float>) {
            static_assert(CB == 16, "box_adjoint_block16 takes blocks of 16 channels");
            if (cn == CB) {
              box_adjoint_block16(f0, f1, Cs, g, h_lo, h_hi, w_lo, w_hi, tsum.data(), gzt.data());
              done = true;
            }
          }
          if (!done) {
            for (int64_t hs = h_lo; hs < h_hi; ++hs)  // the rows and columns source_grad wrote
              for (int64_t q = hs * g.Ws + w_lo; q < hs * g.Ws + w_hi; ++q) {
                T* d = tsum.data() + q * CB;
                for (int64_t cc = 0; cc < cn; ++cc) d[cc] = f1[q * Cs + cc] + (f0 ? f0[q * Cs + cc] : T(0));
              }
            for (int64_t h = 0; h < g.H; ++h)
              for (int64_t w = 0; w < g.W; ++w) {
                const int64_t uh = h + g.ph, uw = w + g.pw;
                T v[CB] = {};
                for (int64_t hs = uh - 1; hs <= uh; ++hs)
                  for (int64_t ws = uw - 1; ws <= uw; ++ws) {
                    if (hs < 0 || ws < 0) continue;  // hs <= Hs - 1 and ws <= Ws - 1 always
                    const T* pi = tsum.data() + (hs * g.Ws + ws) * CB;
                    for (int64_t cc = 0; cc < CB; ++cc) v[cc] += pi[cc];
                  }
                for (int64_t cc = 0; cc < cn; ++cc) gzt[cc * hw + h * g.W + w] = v[cc] * box_weight<T>();
              }
          }
        } else {
          const T* pl = base + ut * plane + c0;
          for (int64_t h = 0; h < g.H; ++h)
            for (int64_t w = 0; w < g.W; ++w) {
              const T* pi = pl + ((h + g.ph) * g.Ws + w + g.pw) * Cs;
              for (int64_t cc = 0; cc < cn; ++cc) gzt[cc * hw + h * g.W + w] = pi[cc];
            }
        }
        // ReLU mask, BN backward sums; in eval the final gradient directly
        for (int64_t cc = 0; cc < cn; ++cc) {
          const int64_t c = c0 + cc;
          const T* px = xp + n * xs[0] + c * xs[1] + t * xs[2];
          T* pg = gp + n * gs[0] + c * gs[1] + t * gs[2];
          const T* xr = px;
          if (!x_row) {
            for (int64_t h = 0; h < g.H; ++h)
              for (int64_t w = 0; w < g.W; ++w) xrow[h * g.W + w] = px[h * xs[3] + w * xs[4]];
            xr = xrow.data();
          }
          T* gr = g_row ? pg : grow.data();
          T acc_g = 0, acc_gx = 0;
          row_bn_backward(xr, gzt.data() + cc * hw, gr, hw, scale[c], shift[c], mean[c], training, acc_g, acc_gx);
          if (!g_row)
            for (int64_t h = 0; h < g.H; ++h)
              for (int64_t w = 0; w < g.W; ++w) pg[h * gs[3] + w * gs[4]] = grow[h * g.W + w];
          psum_g[c] += acc_g;
          psum_gx[c] += acc_gx * invstd[c];
        }
      }
    }
  });
  for (int th = 0; th < nthreads; ++th)
    for (int64_t c = 0; c < C; ++c) {
      sum_g[c] += partial[2 * C * th + c];
      sum_gx[c] += partial[2 * C * th + C + c];
    }
  if (!training) return;
  // grad_x = scale * (g - sum_g/count - xhat * sum_gx/count): an affine map of (g, x) per channel
  const T count = T(pb.N * g.T * g.H * g.W);
  at::parallel_for(0, pb.N * C * g.T, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> xrow(x_row ? 0 : hw), grow(g_row ? 0 : hw);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / (C * g.T), c = (i / g.T) % C, t = i % g.T;
      const T sc = scale[c], is = invstd[c];
      const T k_x = -sc * is * sum_gx[c] / count;
      const T k_0 = -sc * sum_g[c] / count - k_x * mean[c];
      const T* px = xp + n * xs[0] + c * xs[1] + t * xs[2];
      T* pg = gp + n * gs[0] + c * gs[1] + t * gs[2];
      const T* xr = px;
      if (!x_row) {
        for (int64_t h = 0; h < g.H; ++h)
          for (int64_t w = 0; w < g.W; ++w) xrow[h * g.W + w] = px[h * xs[3] + w * xs[4]];
        xr = xrow.data();
      }
      if (g_row) {
        row_bn_correct(xr, pg, hw, sc, k_x, k_0);
      } else {
        for (int64_t h = 0; h < g.H; ++h)
          for (int64_t w = 0; w < g.W; ++w) grow[h * g.W + w] = pg[h * gs[3] + w * gs[4]];
        row_bn_correct(xr, grow.data(), hw, sc, k_x, k_0);
        for (int64_t h = 0; h < g.H; ++h)
          for (int64_t w = 0; w < g.W; ++w) pg[h * gs[3] + w * gs[4]] = grow[h * g.W + w];
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// drivers
// ---------------------------------------------------------------------------------------------------------

template <typename T>
void folded_bn(const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& mean, const at::Tensor& var,
               double eps, std::vector<T>& scale, std::vector<T>& shift, std::vector<T>& invstd) {
  const int64_t C = bn_weight.numel();
  scale.resize(C), shift.resize(C), invstd.resize(C);
  auto w = bn_weight.contiguous(), b = bn_bias.contiguous(), m = mean.contiguous(), v = var.contiguous();
  for (int64_t c = 0; c < C; ++c) {
    invstd[c] = T(1) / std::sqrt(v.data_ptr<T>()[c] + T(eps));
    fold_bn(w.data_ptr<T>()[c], b.data_ptr<T>()[c], m.data_ptr<T>()[c], invstd[c], scale[c], shift[c]);
  }
}

std::vector<at::Tensor> contiguous_all(const std::vector<at::Tensor>& ws) {
  std::vector<at::Tensor> out;
  for (const auto& w : ws) out.push_back(w.contiguous());
  return out;
}

// The source tensor src (N, Ts, Hs, Ws, C) is the op's largest temporary (23 MB at T3D-121's TTL1, batch 1), and
// not a result: a fresh one per call costs a page fault per 4 KiB on first touch (4.7k faults, ~3-5 ms of TTL1's
// ~17 ms 2-thread forward, and most of its call-to-call spread: faulting threads serialise on the address-space
// lock). It lives in a per-thread buffer kept between calls instead. Forward and backward on one thread use it
// one after the other, never at once (CPU autograd runs a backward on the thread that calls it). Buffers above
// kMaxKeptBytes are not kept (a huge batch does not pin its memory after the call).
struct TtlSourceTag {};
at::Tensor source_workspace(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return kept_buffer<TtlSourceTag>(sizes, opts);
}

void check_cpu_dtype(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "x: the cpu backend of ttl expects float32 or float64, got ", x.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> batch_stats_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 5 && x.numel() > 0, "x: expected a non-empty 5-D tensor (N, C, T, H, W), got shape ",
              x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "x: expected a CPU tensor, got ", x.device());
  check_cpu_dtype(x);
  const int64_t N = x.size(0), C = x.size(1), T = x.size(2), H = x.size(3), W = x.size(4);
  auto mean = at::empty({C}, x.options()), var = at::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_stats_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2), s3 = x.stride(3), s4 = x.stride(4);
    // sums around a per-channel shift (its first element) in double: no cancellation when |mean| >> std
    at::parallel_for(0, C, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        const double shift = xp[c * s1];
        double sum = 0, sumsq = 0;
        for (int64_t n = 0; n < N; ++n)
          for (int64_t t = 0; t < T; ++t)
            for (int64_t h = 0; h < H; ++h) {
              const scalar_t* row = xp + n * s0 + c * s1 + t * s2 + h * s3;
              double rs = 0, rq = 0;
              for (int64_t w = 0; w < W; ++w) {
                const double d = double(row[w * s4]) - shift;
                rs += d;
                rq += d * d;
              }
              sum += rs;
              sumsq += rq;
            }
        const double count = double(N * T * H * W), m = sum / count;
        mean.data_ptr<scalar_t>()[c] = scalar_t(shift + m);
        var.data_ptr<scalar_t>()[c] = scalar_t(std::max(sumsq / count - m * m, 0.0));
      }
    });
  });
  return {mean, var};
}

at::Tensor ttl_forward_cpu(const at::Tensor& x, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                           const at::Tensor& mean, const at::Tensor& var, const std::vector<at::Tensor>& weights,
                           bool pool, double eps) {
  check_ttl_inputs(x, bn_weight, bn_bias, mean, var, weights);
  TORCH_CHECK(x.device().is_cpu(), "x: the cpu backend of ttl expects a CPU tensor, got ", x.device());
  check_cpu_dtype(x);
  at::Tensor y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ttl_forward_cpu", [&] {
    const auto ws = contiguous_all(weights);
    const Problem pb = make_problem(x, ws, pool, NV * kLanes<scalar_t>);
    std::vector<scalar_t> scale, shift, invstd;
    folded_bn<scalar_t>(bn_weight, bn_bias, mean, var, eps, scale, shift, invstd);
    auto src = source_workspace({pb.N, pb.g.Ts, pb.g.Hs, pb.g.Ws, pb.Cs}, x.options());
    build_source<scalar_t>(x, scale.data(), shift.data(), pb, src.data_ptr<scalar_t>());
    y = empty_huge({pb.N, pb.C_out, pb.g.To, pb.g.Ho, pb.g.Wo}, x.options());
    if (use_gemm_path(pb))
      conv_forward_gemm<scalar_t>(src.data_ptr<scalar_t>(), pb, ws, y.data_ptr<scalar_t>(), x.options());
    else
      conv_forward<scalar_t>(src.data_ptr<scalar_t>(), pb, ws, y.data_ptr<scalar_t>());
  });
  return y;
}

TtlGrads ttl_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& bn_weight,
                          const at::Tensor& bn_bias, const at::Tensor& mean, const at::Tensor& var,
                          const std::vector<at::Tensor>& weights, bool pool, bool training, double eps) {
  check_ttl_inputs(x, bn_weight, bn_bias, mean, var, weights);
  TORCH_CHECK(x.device().is_cpu(), "x: the cpu backend of ttl expects a CPU tensor, got ", x.device());
  check_cpu_dtype(x);
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), "grad_y: expected dtype ", x.scalar_type(), ", got ",
              grad_y.scalar_type());
  at::Tensor grad_x = empty_huge(x.sizes(), x.options(), x.suggest_memory_format());
  at::Tensor grad_bn_weight = at::zeros_like(bn_weight), grad_bn_bias = at::zeros_like(bn_bias);
  std::vector<at::Tensor> grad_weights;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ttl_backward_cpu", [&] {
    using T = scalar_t;
    constexpr int64_t L = kLanes<T>, NR = NV * L;
    const auto ws = contiguous_all(weights);
    const Problem pb = make_problem(x, ws, pool, NR);
    const TtlGeometry& g = pb.g;
    TORCH_CHECK(grad_y.dim() == 5 && grad_y.size(0) == pb.N && grad_y.size(1) == pb.C_out &&
                    grad_y.size(2) == g.To && grad_y.size(3) == g.Ho && grad_y.size(4) == g.Wo,
                "grad_y: expected shape (", pb.N, ", ", pb.C_out, ", ", g.To, ", ", g.Ho, ", ", g.Wo, "), got ",
                grad_y.sizes());
    std::vector<T> scale, shift, invstd;
    folded_bn<T>(bn_weight, bn_bias, mean, var, eps, scale, shift, invstd);
    auto src = source_workspace({pb.N, g.Ts, g.Hs, g.Ws, pb.Cs}, x.options());
    build_source<T>(x, scale.data(), shift.data(), pb, src.data_ptr<T>());
    const T* srcp = src.data_ptr<T>();
    // gy channels-last with NR zero columns of slack so full-width vector loads stay in bounds
    const int64_t M = pb.N * pb.Mo, ldg = pb.C_out + NR;
    std::vector<T> gy_cl(M * ldg, T(0));
    {
      auto gyc = grad_y.contiguous();
      const T* pg = gyc.data_ptr<T>();
      at::parallel_for(0, pb.N, 1, [&](int64_t nb, int64_t ne) {
        for (int64_t n = nb; n < ne; ++n)
          for (int64_t o = 0; o < pb.C_out; ++o)
            for (int64_t p = 0; p < pb.Mo; ++p) gy_cl[(n * pb.Mo + p) * ldg + o] = pg[(n * pb.C_out + o) * pb.Mo + p];
      });
    }
    const std::vector<int64_t> rows = output_rows(pb);
    const bool gemm_path = use_gemm_path(pb);
    at::Tensor gsrc = gemm_path ? empty_huge(src.sizes(), x.options()).zero_() : at::Tensor();
    if (gemm_path) {  // 3 + 4 for few positions: gW = gy^T im2col(src), gsrc += col2im(gy W)
      for (size_t bi = 0; bi < pb.branches.size(); ++bi) {
        const Branch& b = pb.branches[bi];
        const at::Tensor col = im2col<T>(srcp, pb, b, rows, x.options());
        const int64_t K = col.size(1);
        auto gw = empty_huge(ws[bi].sizes(), x.options());
        auto gcol = empty_huge({M, K}, x.options());
        weights_major_backward<T>(col.data_ptr<T>(), ws[bi].data_ptr<T>(), gy_cl.data() + b.y_off, ldg, M, K, b.cout,
                                  gw.data_ptr<T>(), gcol.data_ptr<T>());
        grad_weights.push_back(gw);
        col2im_add<T>(gcol, pb, b, rows, gsrc.data_ptr<T>());
      }
    }
    // 3. weight gradients: tasks (branch, tap, block of NR output channels, 8-channel tile of C)
    for (size_t bi = 0; !gemm_path && bi < pb.branches.size(); ++bi) {
      const Branch& b = pb.branches[bi];
      const int64_t taps = b.depth * b.kh * b.kw, nct = (pb.C + MR - 1) / MR;
      auto gw = empty_huge({b.cout, pb.C, b.depth, b.kh, b.kw}, x.options());
      T* gwp = gw.data_ptr<T>();
      std::vector<int64_t> rows_c(M);
      for (int64_t p = 0; p < M; ++p) rows_c[p] = (rows[p] + b.origin_row) * pb.Cs;
      // reduce over positions one sample at a time (each task's accumulator tile kept in memory, tiles ordered
      // [nb][ct][tap]), so the source rows a sample's tasks read stay in cache instead of streaming a whole batch
      // per task
      const int64_t ntasks = taps * b.nblocks * nct;
      at::Tensor acc_t = empty_huge({ntasks * MR * NR}, x.options());  // every tile assigned by the first sample
      T* acc_all = acc_t.data_ptr<T>();
      for (int64_t p0 = 0; p0 < M; p0 += pb.Mo) {
        const int64_t np = std::min(pb.Mo, M - p0);
        at::parallel_for(0, ntasks, 1, [&](int64_t begin, int64_t end) {
          std::vector<T> tail;
          std::vector<int64_t> trow;
          for (int64_t task = begin; task < end; ++task) {
            const int64_t ct = task % nct, nb = (task / nct) % b.nblocks, j = task / (nct * b.nblocks);
            const int64_t dt = j / (b.kh * b.kw), dh = (j / b.kw) % b.kh, dw = j % b.kw;
            const int64_t c0 = ct * MR, cvalid = std::min<int64_t>(MR, pb.C - c0);
            const int64_t off = ((dt * g.Hs + dh) * g.Ws + dw) * pb.Cs + c0;
            T* a = acc_all + ((nb * nct + ct) * taps + j) * MR * NR;
            const T* gyp = gy_cl.data() + p0 * ldg + b.y_off + nb * NR;
            if (cvalid == MR) {
              wgrad_tile_mv(srcp, rows_c.data() + p0, np, off, gyp, ldg, a, p0 == 0);
            } else {  // channel tail: read through a zero-padded copy of the rows' last channels
              tail.assign(np * MR, T(0));
              trow.resize(np);
              for (int64_t p = 0; p < np; ++p) {
                for (int64_t r = 0; r < cvalid; ++r) tail[p * MR + r] = srcp[rows_c[p0 + p] + off + r];
                trow[p] = p * MR;
              }
              wgrad_tile_mv(tail.data(), trow.data(), np, 0, gyp, ldg, a, p0 == 0);
            }
          }
        });
      }
      // tiles [nb][ct][tap][MR][NR] -> gw (cout, C, taps): per (nb, ct) its taps' tiles (in L1/L2) are written out
      // along gw's rows, contiguous over the taps (writing tap by tap would touch a new line of gw per element)
      at::parallel_for(0, b.nblocks * nct, 1, [&](int64_t begin, int64_t end) {
        for (int64_t blk = begin; blk < end; ++blk) {
          const int64_t nb = blk / nct, ct = blk % nct;
          const int64_t c0 = ct * MR, cvalid = std::min<int64_t>(MR, pb.C - c0);
          const T* a = acc_all + blk * taps * MR * NR;
          for (int64_t oo = 0; oo < NR && nb * NR + oo < b.cout; ++oo)
            for (int r = 0; r < cvalid; ++r) {
              T* dst = gwp + ((nb * NR + oo) * pb.C + c0 + r) * taps;
              for (int64_t j = 0; j < taps; ++j) dst[j] = a[(j * MR + r) * NR + oo];
            }
        }
      });
      grad_weights.push_back(gw);
    }
    // 4. gradient of the source tensor
    // the source gradient overwrites every element and nothing reads the source after the weight gradients: it
    // takes the source's memory (no second tensor of that size, and no page faults of a fresh one)
    if (!gemm_path) {
      gsrc = src;
      source_grad<T>(gy_cl.data(), ldg, pb, ws, gsrc.data_ptr<T>());
    }
    src.reset();
    // 5. box adjoint, ReLU mask, BN backward
    std::vector<T> sum_g(pb.C, T(0)), sum_gx(pb.C, T(0));
    std::vector<T> mean_v(pb.C);
    auto mc = mean.contiguous();
    for (int64_t c = 0; c < pb.C; ++c) mean_v[c] = mc.data_ptr<T>()[c];
    input_grad<T>(gsrc.data_ptr<T>(), x, pb, scale.data(), shift.data(), mean_v.data(), invstd.data(), training,
                  grad_x, sum_g.data(), sum_gx.data());
    for (int64_t c = 0; c < pb.C; ++c) {
      grad_bn_bias.data_ptr<T>()[c] = sum_g[c];
      grad_bn_weight.data_ptr<T>()[c] = sum_gx[c];
    }
  });
  return {grad_x, grad_bn_weight, grad_bn_bias, grad_weights};
}

}  // namespace t3d
