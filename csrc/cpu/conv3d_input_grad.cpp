// The input gradient of a 3D convolution with few input channels and stride 2 along W (a video net's first conv:
// T3D's conv0 is 3 -> 64 channels, kernel (3, 7, 7), stride 2, padding (1, 3, 3)). oneDNN's backward-data for it runs
// at ~55 GFLOP/s on 2 threads here (51 ms at 1x3x32x112x112, against 8 ms for the forward): its blocking is over
// input channels, of which there are 3.
//
// Here each task is one row (n, t, h) of dx for all its channels (at most kMaxChannels) and a block of 64 columns of
// each of the two W phases: dx[.., 2w' + pw] sums gy[.., wo = w' + s] over the taps kw of phase pw (s depends on kw),
// so a phase row is a sum of shifted, contiguous rows of gy scaled by one weight per channel. Per (o, kt, kh) and
// distinct shift: 4 vector loads of gy (masked at the row's ends), shared by that shift's tap of each phase; per tap
// one broadcast weight per channel and 4 FMAs per channel into the phase's accumulators (2 phases x 4 vectors x 3
// channels = 24 zmm). The taps kt, kh that reach row (t, h) are found by the usual divisibility test, so T and H take
// any stride. The two phases are interleaved into contiguous rows of dx on the way out. Every element of dx is
// written once (no atomics, no zeroing pass) in a fixed order, so the result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/cpu_features.h"
#include "common/dispatch.h"

namespace t3d {
namespace {

constexpr int64_t kMaxChannels = 4;  // input channels the kernel takes (a stem: RGB, flow, grey)
constexpr int64_t kBlock = 64;       // columns of a phase per task: 4 vectors of 16 floats
constexpr int64_t kMaxKernel = 16;   // kernel size in each dim the kernel takes

struct Geo {
  int64_t N, C, T, H, W;     // dx
  int64_t O, To, Ho, Wo;     // gy
  int64_t KT, KH, KW;        // kernel
  int64_t st, sh, pt, ph, pw;  // strides (T, H) and paddings; the W stride is 2
};

// the kernel taps k of one dim that reach input index i: i + pad - k = stride * o with 0 <= o < n_out
template <typename F>
inline void for_taps(int64_t i, int64_t k_n, int64_t stride, int64_t pad, int64_t n_out, F f) {
  for (int64_t k = 0; k < k_n; ++k) {
    const int64_t v = i + pad - k;
    if (v < 0 || v % stride != 0 || v / stride >= n_out) continue;
    f(k, v / stride);
  }
}

// W phase of tap kw (the parity of the dx columns it reaches) and its shift: wo = w' + s for dx column 2 w' + phase
inline int64_t phase_of(int64_t kw, int64_t pad) { return ((kw - pad) % 2 + 2) % 2; }
inline int64_t shift_of(int64_t kw, int64_t pad) { return (phase_of(kw, pad) + pad - kw) / 2; }

// weights with c padded to kMaxChannels, as [kt][kh][kw][o][c] (tap-major: the per-tap channel weights side by side,
// the scalar and AVX-512 forms) or [o][kt][kh][kw][c] (channel-major: the AVX2 form, which reads a channel's taps in
// this order)
template <typename T>
std::vector<T> pack_weights(const T* w, const Geo& g, bool channel_major = false) {
  std::vector<T> p(g.KT * g.KH * g.KW * g.O * kMaxChannels, T(0));
  for (int64_t o = 0; o < g.O; ++o)
    for (int64_t c = 0; c < g.C; ++c)
      for (int64_t kt = 0; kt < g.KT; ++kt)
        for (int64_t kh = 0; kh < g.KH; ++kh)
          for (int64_t kw = 0; kw < g.KW; ++kw) {
            const int64_t tap = (kt * g.KH + kh) * g.KW + kw;
            const int64_t at = channel_major ? o * g.KT * g.KH * g.KW + tap : tap * g.O + o;
            p[at * kMaxChannels + c] = w[(((o * g.C + c) * g.KT + kt) * g.KH + kh) * g.KW + kw];
          }
  return p;
}

// Scalar form, any dtype (float64 for gradcheck; CPUs without AVX2): the same taps, one chain per element.
template <typename T>
void row_generic(const T* gy, const T* wp, const Geo& g, int64_t n, int64_t t, int64_t h, T* dx) {
  // float32 sums in double: this form sums over all output channels and taps in one chain per element (the AVX-512
  // form blocks them); in float32 that erred beyond ATen's error at W > 128 (found on an AVX2-only CPU)
  using Acc = std::conditional_t<std::is_same_v<T, float>, double, T>;
  std::vector<Acc> acc(g.C * g.W, Acc(0));
  for (int64_t o = 0; o < g.O; ++o)
    for_taps(t, g.KT, g.st, g.pt, g.To, [&](int64_t kt, int64_t to) {
      for_taps(h, g.KH, g.sh, g.ph, g.Ho, [&](int64_t kh, int64_t ho) {
        const T* row = gy + (((n * g.O + o) * g.To + to) * g.Ho + ho) * g.Wo;
        for (int64_t kw = 0; kw < g.KW; ++kw) {
          const T* wk = wp + ((((kt * g.KH + kh) * g.KW + kw) * g.O) + o) * kMaxChannels;
          const int64_t ph = phase_of(kw, g.pw), s = shift_of(kw, g.pw);
          for (int64_t w = ph; w < g.W; w += 2) {
            const int64_t wo = (w - ph) / 2 + s;
            if (wo < 0 || wo >= g.Wo) continue;
            for (int64_t c = 0; c < g.C; ++c) acc[c * g.W + w] += Acc(wk[c]) * Acc(row[wo]);
          }
        }
      });
    });
  for (int64_t c = 0; c < g.C; ++c)
    for (int64_t w = 0; w < g.W; ++w) dx[(((n * g.C + c) * g.T + t) * g.H + h) * g.W + w] = T(acc[c * g.W + w]);
}

#define T3D_AVX512 __attribute__((target("avx512f,fma")))

// lanes j of vector v (columns wo = base + 16 v + j) that lie in [0, Wo)
T3D_AVX512 inline __mmask16 valid_lanes(int64_t first, int64_t n) {
  uint32_t m = 0;
  for (int j = 0; j < 16; ++j) m |= uint32_t(first + j >= 0 && first + j < n) << j;
  return __mmask16(m);
}

// x[v] = gy[src + 16 v], lanes outside the row zero
T3D_AVX512 inline __attribute__((always_inline)) void load_row(__m512 (&x)[4], const float* src, const __mmask16* mask) {
#pragma GCC unroll 4
  for (int v = 0; v < 4; ++v) x[v] = _mm512_maskz_loadu_ps(mask[v], src + 16 * v);
}

// acc[v][c] += w[c] * x[v]
template <int C>
T3D_AVX512 inline __attribute__((always_inline)) void fma_row(__m512 (&acc)[4][C], const __m512 (&x)[4],
                                                               const float* wk) {
#pragma GCC unroll 4
  for (int c = 0; c < C; ++c) {
    const __m512 wv = _mm512_set1_ps(wk[c]);
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) acc[v][c] = _mm512_fmadd_ps(wv, x[v], acc[v][c]);
  }
}

// sum[v][c] (+)= acc[v][c], acc = 0
template <int C>
T3D_AVX512 inline __attribute__((always_inline)) void flush(__m512 (&acc)[4][C], float* sum, bool first) {
#pragma GCC unroll 4
  for (int v = 0; v < 4; ++v)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      float* d = sum + (v * C + c) * 16;
      _mm512_store_ps(d, first ? acc[v][c] : _mm512_add_ps(_mm512_load_ps(d), acc[v][c]));
      acc[v][c] = _mm512_setzero_ps();
    }
}

// One row (n, t, h) of dx, columns [64 b, 64 b + 64) of each phase, C channels (compile time: the accumulators stay
// in registers). Taps kw with the same shift read the same columns of gy (with stride 2 one of each phase): one load
// serves both. The sums over the output channels run in blocks of kSumBlock channels added into an L1 tile
// (a single chain over T3D's 64 channels x 18 taps erred 16 units of rounding of max|dx| against ATen's 6).
template <int C>
T3D_AVX512 void row_block_avx512(const float* gy, const float* wp, const Geo& g, int64_t n, int64_t t, int64_t h,
                                 int64_t b, float* dx) {
  constexpr int64_t kSumBlock = 4;
  __m512 acc0[4][C], acc1[4][C];  // phases 0 and 1
  alignas(64) float sum0[4 * C * 16], sum1[4 * C * 16];
#pragma GCC unroll 4
  for (int v = 0; v < 4; ++v)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc0[v][c] = acc1[v][c] = _mm512_setzero_ps();
  const int64_t w0 = b * kBlock;  // first phase column of the block
  // the distinct shifts of the taps kw, each with its first gy column, its 4 masks and its taps of each phase
  int64_t off[kMaxKernel];
  __mmask16 mask[kMaxKernel][4];
  int64_t kw0[kMaxKernel], kw1[kMaxKernel];  // the phase-0 / phase-1 tap of the shift, or -1
  int ns = 0;
  for (int64_t kw = 0; kw < g.KW; ++kw) {
    const int64_t o = w0 + shift_of(kw, g.pw);
    int i = 0;
    while (i < ns && off[i] != o) ++i;
    if (i == ns) {
      off[ns] = o, kw0[ns] = kw1[ns] = -1;
      for (int v = 0; v < 4; ++v) mask[ns][v] = valid_lanes(o + 16 * v, g.Wo);
      ++ns;
    }
    (phase_of(kw, g.pw) == 1 ? kw1[i] : kw0[i]) = kw;
  }
  // the taps (kt, to) and (kh, ho) that reach row (t, h)
  int64_t kts[kMaxKernel], tos[kMaxKernel], khs[kMaxKernel], hos[kMaxKernel];
  int nt = 0, nh = 0;
  for_taps(t, g.KT, g.st, g.pt, g.To, [&](int64_t k, int64_t o) { kts[nt] = k, tos[nt++] = o; });
  for_taps(h, g.KH, g.sh, g.ph, g.Ho, [&](int64_t k, int64_t o) { khs[nh] = k, hos[nh++] = o; });
  const int64_t wstep = g.O * kMaxChannels;
  bool first = true;
  for (int64_t o = 0; o < g.O; ++o) {
    for (int i = 0; i < nt; ++i)
      for (int j = 0; j < nh; ++j) {
        const float* row = gy + (((n * g.O + o) * g.To + tos[i]) * g.Ho + hos[j]) * g.Wo;
        const float* wk = wp + ((((kts[i] * g.KH + khs[j]) * g.KW) * g.O) + o) * kMaxChannels;
        for (int k = 0; k < ns; ++k) {
          __m512 x[4];
          load_row(x, row + off[k], mask[k]);
          if (kw0[k] >= 0) fma_row<C>(acc0, x, wk + kw0[k] * wstep);
          if (kw1[k] >= 0) fma_row<C>(acc1, x, wk + kw1[k] * wstep);
        }
      }
    if ((o + 1) % kSumBlock == 0 || o + 1 == g.O) {
      flush<C>(acc0, sum0, first);
      flush<C>(acc1, sum1, first);
      first = false;
    }
  }
  // interleave the phases: dx column 2 (w0 + 16 v + j) + p
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int c = 0; c < C; ++c) {
    float* out = dx + (((n * g.C + c) * g.T + t) * g.H + h) * g.W;
    for (int v = 0; v < 4; ++v) {
      const int64_t col = 2 * (w0 + 16 * v);
      if (col >= g.W) break;
      const __m512 p0 = _mm512_load_ps(sum0 + (v * C + c) * 16), p1 = _mm512_load_ps(sum1 + (v * C + c) * 16);
      const __m512 a = _mm512_permutex2var_ps(p0, lo, p1);
      const __m512 z = _mm512_permutex2var_ps(p0, hi, p1);
      _mm512_mask_storeu_ps(out + col, valid_lanes(col, g.W), a);
      if (col + 16 < g.W) _mm512_mask_storeu_ps(out + col + 16, valid_lanes(col + 16, g.W), z);
    }
  }
}

template <int C>
T3D_AVX512 void rows_avx512(const float* gy, const float* wp, const Geo& g, float* dx) {
  const int64_t blocks = ((g.W + 1) / 2 + kBlock - 1) / kBlock;
  // consecutive rows h of one (n, t) on one thread: rows h and h + sh read the same rows of gy
  at::parallel_for(0, g.N * g.T * g.H * blocks, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i % blocks, h = (i / blocks) % g.H, t = (i / (blocks * g.H)) % g.T, n = i / (blocks * g.H * g.T);
      row_block_avx512<C>(gy, wp, g, n, t, h, b, dx);
    }
  });
}

#undef T3D_AVX512

// ---- AVX2 (AMD Zen 2/3, older Intel): 8-lane vectors, V per phase (16 ymm registers: 2 phases x V x C
// accumulators, V = 4 for 1 channel, 2 for 2-3, 1 for 4), so blocks of 8 V columns per phase; the per-element sums
// are the AVX-512 form's (blocks of kSumBlock output channels, the same tap order), hence the same bits.
#define T3D_AVX2 __attribute__((target("avx2,fma")))
#define T3D_AVX2_INLINE __attribute__((target("avx2,fma"), always_inline)) inline

// the vmaskmovps mask of lanes j (columns first + j) that lie in [0, n)
T3D_AVX2_INLINE __m256i valid_lanes8(int64_t first, int64_t n) {
  const __m256i j = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i lo = _mm256_set1_epi32(static_cast<int>(std::clamp<int64_t>(-first, -1, 8)));
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(std::clamp<int64_t>(n - first, -1, 9)));
  // -first <= j < n - first
  return _mm256_andnot_si256(_mm256_cmpgt_epi32(lo, j), _mm256_cmpgt_epi32(hi, j));
}

// adds a block of output channels' partial sums into the row's sums (or sets them: the first block) and clears them
template <int C, int V>
T3D_AVX2_INLINE void flush_avx2(__m256 (&acc)[V][C], float* sum, bool first) {
#pragma GCC unroll 4
  for (int v = 0; v < V; ++v)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      float* d = sum + (v * C + c) * 8;
      _mm256_store_ps(d, first ? acc[v][c] : _mm256_add_ps(_mm256_load_ps(d), acc[v][c]));
      acc[v][c] = _mm256_setzero_ps();
    }
}

// acc[v][c] += w[c] * x[v] for the V vectors x at src (lanes outside the row zero where Masked)
template <int C, int V, bool Masked>
T3D_AVX2_INLINE void tap_avx2(__m256 (&acc)[V][C], const float* src, const __m256i* mask, const float* wc) {
  __m256 x[V];
#pragma GCC unroll 4
  for (int v = 0; v < V; ++v) x[v] = Masked ? _mm256_maskload_ps(src + 8 * v, mask[v]) : _mm256_loadu_ps(src + 8 * v);
#pragma GCC unroll 4
  for (int c = 0; c < C; ++c) {
    const __m256 wv = _mm256_broadcast_ss(wc + c);
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[v][c] = _mm256_fmadd_ps(wv, x[v], acc[v][c]);
  }
}

// One row (n, t, h) of dx, columns [8 V b, 8 V b + 8 V) of each phase. The taps run in kw order, two at a time:
// with stride 2 the even taps reach one phase and the odd taps the other (accumulators accE / accO), so the loop has
// no branches; each tap loads its own V vectors (the AVX-512 form shares a load between the two taps of a shift,
// which costs a branch per tap here). Per element the order of the sums is the AVX-512 form's (blocks of kSumBlock
// output channels; per channel kt, kh, then kw ascending), hence the same bits. Masked: some lane of some tap lies
// outside the row (the row's first and last blocks).
template <int C, int V, bool Masked>
T3D_AVX2 void row_block_avx2(const float* gy, const float* wp, const Geo& g, int64_t n, int64_t t, int64_t h,
                             int64_t b, float* dx) {
  constexpr int64_t kSumBlock = 4;
  __m256 accE[V][C], accO[V][C];  // the even taps' phase and the odd taps' phase
  alignas(32) float sum0[V * C * 8], sum1[V * C * 8];
#pragma GCC unroll 4
  for (int v = 0; v < V; ++v)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) accE[v][c] = accO[v][c] = _mm256_setzero_ps();
  const int64_t w0 = b * 8 * V;  // first phase column of the block
  int64_t off[kMaxKernel];       // the first gy column each tap kw reads
  __m256i mask[kMaxKernel][V];
  for (int64_t kw = 0; kw < g.KW; ++kw) {
    off[kw] = w0 + shift_of(kw, g.pw);
    for (int v = 0; v < V; ++v) mask[kw][v] = Masked ? valid_lanes8(off[kw] + 8 * v, g.Wo) : _mm256_setzero_si256();
  }
  float* sumE = phase_of(0, g.pw) == 0 ? sum0 : sum1;
  float* sumO = phase_of(0, g.pw) == 0 ? sum1 : sum0;
  int64_t kts[kMaxKernel], tos[kMaxKernel], khs[kMaxKernel], hos[kMaxKernel];
  int nt = 0, nh = 0;
  for_taps(t, g.KT, g.st, g.pt, g.To, [&](int64_t k, int64_t o) { kts[nt] = k, tos[nt++] = o; });
  for_taps(h, g.KH, g.sh, g.ph, g.Ho, [&](int64_t k, int64_t o) { khs[nh] = k, hos[nh++] = o; });
  constexpr int64_t wstep = kMaxChannels;
  const int64_t plane = g.To * g.Ho * g.Wo;                       // one output channel
  const int64_t lo = std::max<int64_t>(0, off[g.KW - 1]);          // the block's first column read
  const int64_t kw_pairs = g.KW / 2;
  bool first = true;
  for (int64_t o = 0; o < g.O; ++o) {
    for (int i = 0; i < nt; ++i)
      for (int j = 0; j < nh; ++j) {
        const float* row = gy + (((n * g.O + o) * g.To + tos[i]) * g.Ho + hos[j]) * g.Wo;
        const float* wk = wp + (((o * g.KT + kts[i]) * g.KH + khs[j]) * g.KW) * kMaxChannels;
        if (o + 1 < g.O) {  // the next channel's row, 400 KB away for conv0: the hardware prefetchers miss it
          const char* next = reinterpret_cast<const char*>(row + plane + lo);
          _mm_prefetch(next, _MM_HINT_T0);
          _mm_prefetch(next + 64, _MM_HINT_T0);
        }
        for (int64_t q = 0; q < kw_pairs; ++q) {
          tap_avx2<C, V, Masked>(accE, row + off[2 * q], mask[2 * q], wk + 2 * q * wstep);
          tap_avx2<C, V, Masked>(accO, row + off[2 * q + 1], mask[2 * q + 1], wk + (2 * q + 1) * wstep);
        }
        if (g.KW % 2) tap_avx2<C, V, Masked>(accE, row + off[g.KW - 1], mask[g.KW - 1], wk + (g.KW - 1) * wstep);
      }
    if ((o + 1) % kSumBlock == 0 || o + 1 == g.O) {
      flush_avx2<C, V>(accE, sumE, first);
      flush_avx2<C, V>(accO, sumO, first);
      first = false;
    }
  }
  // interleave the phases: dx column 2 (w0 + 8 v + j) + p
  for (int c = 0; c < C; ++c) {
    float* out = dx + (((n * g.C + c) * g.T + t) * g.H + h) * g.W;
    for (int v = 0; v < V; ++v) {
      const int64_t col = 2 * (w0 + 8 * v);
      if (col >= g.W) break;
      const __m256 p0 = _mm256_load_ps(sum0 + (v * C + c) * 8), p1 = _mm256_load_ps(sum1 + (v * C + c) * 8);
      const __m256 l = _mm256_unpacklo_ps(p0, p1), u = _mm256_unpackhi_ps(p0, p1);
      const __m256 a = _mm256_permute2f128_ps(l, u, 0x20), z = _mm256_permute2f128_ps(l, u, 0x31);
      if (col + 16 <= g.W) {
        _mm256_storeu_ps(out + col, a);
        _mm256_storeu_ps(out + col + 8, z);
      } else {  // the row's end (masked stores are slow on AMD: only here)
        _mm256_maskstore_ps(out + col, valid_lanes8(col, g.W), a);
        if (col + 8 < g.W) _mm256_maskstore_ps(out + col + 8, valid_lanes8(col + 8, g.W), z);
      }
    }
  }
}

template <int C>
T3D_AVX2 void rows_avx2(const float* gy, const float* wp, const Geo& g, float* dx) {
  constexpr int V = C == 1 ? 4 : C <= 3 ? 2 : 1;  // 2 V C accumulators, V loads and a broadcast: <= 16 ymm
  const int64_t blocks = ((g.W + 1) / 2 + 8 * V - 1) / (8 * V);
  at::parallel_for(0, g.N * g.T * g.H * blocks, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i % blocks, h = (i / blocks) % g.H, t = (i / (blocks * g.H)) % g.T, n = i / (blocks * g.H * g.T);
      // every tap's V vectors lie in the row: the first one's first column and the last one's last column do
      const int64_t w0 = b * 8 * V;
      if (w0 + shift_of(g.KW - 1, g.pw) >= 0 && w0 + shift_of(0, g.pw) + 8 * V <= g.Wo)
        row_block_avx2<C, V, false>(gy, wp, g, n, t, h, b, dx);
      else
        row_block_avx2<C, V, true>(gy, wp, g, n, t, h, b, dx);
    }
  });
}

#undef T3D_AVX2
#undef T3D_AVX2_INLINE

// f(std::integral_constant<int, C>) for the channel count C = g.C (1-4): the kernels' accumulators need it at
// compile time
template <typename F>
void with_channels(const Geo& g, F f) {
  switch (g.C) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

// the AVX-512 or AVX2 rows where the CPU has them (float32), each packing the weights in its layout; false: the
// caller runs the scalar form
template <typename T>
bool rows_vectorized(const T*, const T*, const Geo&, T*) {
  return false;
}

template <>
bool rows_vectorized<float>(const float* gy, const float* w, const Geo& g, float* dx) {
  if (cpu_has_avx512_fma()) {
    const auto wp = pack_weights(w, g);
    with_channels(g, [&](auto c) { rows_avx512<decltype(c)::value>(gy, wp.data(), g, dx); });
    return true;
  }
  if (cpu_has_avx2_fma()) {
    const auto wp = pack_weights(w, g, /*channel_major=*/true);
    with_channels(g, [&](auto c) { rows_avx2<decltype(c)::value>(gy, wp.data(), g, dx); });
    return true;
  }
  return false;
}

Geo make_geo(const at::Tensor& grad_y, const at::Tensor& weight, at::IntArrayRef input_size, at::IntArrayRef stride,
             at::IntArrayRef padding) {
  TORCH_CHECK(grad_y.dim() == 5, "grad_y: expected a 5-D tensor (N, C_out, T, H, W), got ", grad_y.dim(), " dims");
  TORCH_CHECK(weight.dim() == 5, "weight: expected a 5-D tensor (C_out, C_in, kT, kH, kW), got ", weight.dim(),
              " dims");
  TORCH_CHECK(input_size.size() == 5, "input_size: expected 5 sizes (N, C_in, T, H, W), got ", input_size.size());
  TORCH_CHECK(stride.size() == 3 && padding.size() == 3, "stride, padding: expected 3 values each (T, H, W), got ",
              stride.size(), " and ", padding.size());
  TORCH_CHECK(stride[2] == 2, "stride: this kernel expects a W stride of 2, got ", stride);
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1, "stride: expected values >= 1, got ", stride);
  Geo g{input_size[0], input_size[1], input_size[2], input_size[3], input_size[4],
        grad_y.size(1), grad_y.size(2), grad_y.size(3), grad_y.size(4),
        weight.size(2), weight.size(3), weight.size(4),
        stride[0], stride[1], padding[0], padding[1], padding[2]};
  TORCH_CHECK(g.C >= 1 && g.C <= kMaxChannels, "input_size: this kernel takes 1 to ", kMaxChannels,
              " input channels, got ", g.C);
  TORCH_CHECK(weight.size(1) == g.C, "weight: expected ", g.C, " input channels (input_size[1]), got ", weight.size(1));
  TORCH_CHECK(weight.size(0) == g.O, "weight: expected ", g.O, " output channels (grad_y's), got ", weight.size(0));
  TORCH_CHECK(grad_y.size(0) == g.N, "grad_y: expected batch ", g.N, " (input_size[0]), got ", grad_y.size(0));
  TORCH_CHECK(g.KT <= kMaxKernel && g.KH <= kMaxKernel && g.KW <= kMaxKernel, "weight: this kernel takes kernels of at most ",
              kMaxKernel, " in each dim, got ", weight.sizes().slice(2));
  for (int d = 0; d < 3; ++d) {
    const int64_t in = input_size[2 + d], k = weight.size(2 + d), s = stride[d], p = padding[d];
    TORCH_CHECK(p >= 0, "padding: expected values >= 0, got ", padding);
    TORCH_CHECK(in + 2 * p >= k && (in + 2 * p - k) / s + 1 == grad_y.size(2 + d), "grad_y: expected size ",
                in + 2 * p >= k ? (in + 2 * p - k) / s + 1 : 0, " in dim ", 2 + d, " (the conv of input_size ",
                input_size, " with kernel ", weight.sizes().slice(2), ", stride ", stride, ", padding ", padding,
                "), got ", grad_y.size(2 + d));
  }
  return g;
}

}  // namespace

at::Tensor conv3d_input_grad_cpu(const at::Tensor& grad_y, const at::Tensor& weight, at::IntArrayRef input_size,
                                 at::IntArrayRef stride, at::IntArrayRef padding) {
  TORCH_CHECK(grad_y.device().is_cpu() && weight.device().is_cpu(), "grad_y, weight: expected CPU tensors, got ",
              grad_y.device(), " and ", weight.device());
  TORCH_CHECK(grad_y.scalar_type() == weight.scalar_type(), "weight: expected dtype ", grad_y.scalar_type(),
              " (grad_y's), got ", weight.scalar_type());
  const Geo g = make_geo(grad_y, weight, input_size, stride, padding);
  auto gy = grad_y.contiguous();
  auto w = weight.contiguous();
  auto dx = at::empty(input_size, grad_y.options());
  T3D_DISPATCH_FP32_FP64(gy, "grad_y", "CPU conv3d input gradient", [&] {
    if (rows_vectorized(gy.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), g, dx.data_ptr<scalar_t>())) return 0;
    const auto wp = pack_weights<scalar_t>(w.data_ptr<scalar_t>(), g);
    const scalar_t* gp = gy.data_ptr<scalar_t>();
    scalar_t* out = dx.data_ptr<scalar_t>();
    at::parallel_for(0, g.N * g.T * g.H, 8, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        row_generic<scalar_t>(gp, wp.data(), g, i / (g.T * g.H), (i / g.H) % g.T, i % g.H, out);
    });
    return 0;
  });
  return dx;
}

void init_conv3d_input_grad(pybind11::module& m) {
  m.def("conv3d_input_grad", &conv3d_input_grad_cpu,
        "Input gradient of a conv3d with 1-4 input channels and W stride 2 (CPU)", pybind11::arg("grad_y"),
        pybind11::arg("weight"), pybind11::arg("input_size"), pybind11::arg("stride"), pybind11::arg("padding"));
}

}  // namespace t3d
