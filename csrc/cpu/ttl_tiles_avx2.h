// AVX2 tile kernels of the CPU TTL (float32), for CPUs without AVX-512 (AMD Zen 2/3, older Intel). Same contracts,
// packed layouts (MR x 48 tiles) and per-element summation order as the AVX-512 kernels of ttl_tiles_avx512.h, so
// both give the same bits: AVX2 has 16 ymm registers, not 32 zmm, so each MR x 48 tile is computed as quadrants of
// 4 rows x 24 columns (12 ymm accumulators, 3 vector loads and 4 broadcasts per reduction step), each quadrant
// summing the whole reduction in the same blocks of kSumBlock terms. Called only when the CPU reports AVX2 and FMA.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace t3d {
namespace {

constexpr int kAvx2QR = 4;   // quadrant rows
constexpr int kAvx2QV = 3;   // quadrant vectors (8 floats each)
constexpr int kAvx2NR = 48;  // tile columns (kAvxNV * 16 of the AVX-512 tiles)
static_assert(kAvx2QR * 2 == kAvxMR && kAvx2QV * 8 * 2 == kAvx2NR, "AVX2 quadrants must cover the AVX-512 tile");

#define T3D_AVX2 __attribute__((target("avx2,fma")))
#define T3D_UNROLL2 _Pragma("GCC unroll 8")

// dst rows (+)= a for a quadrant (rows ld floats apart)
T3D_AVX2 T3D_INLINE void add_quadrant_avx2(const __m256 (&a)[kAvx2QR][kAvx2QV], float* dst, int64_t ld, int rows,
                                           bool assign) {
  T3D_UNROLL2 for (int r = 0; r < kAvx2QR; ++r) {
    if (r >= rows) break;
    T3D_UNROLL2 for (int v = 0; v < kAvx2QV; ++v) {
      float* d = dst + r * ld + v * 8;
      _mm256_storeu_ps(d, assign ? a[r][v] : _mm256_add_ps(_mm256_loadu_ps(d), a[r][v]));
    }
  }
}

T3D_AVX2 T3D_INLINE void zero_quadrant_avx2(__m256 (&a)[kAvx2QR][kAvx2QV]) {
  T3D_UNROLL2 for (int r = 0; r < kAvx2QR; ++r) T3D_UNROLL2 for (int v = 0; v < kAvx2QV; ++v) a[r][v] =
      _mm256_setzero_ps();
}

// a[r] += s_r * (b0, b1, b2) for the quadrant's rows, s_r = *x[r]
T3D_AVX2 T3D_INLINE void fma_quadrant_avx2(__m256 (&a)[kAvx2QR][kAvx2QV], const float* w, float x0, float x1, float x2,
                                           float x3) {
  const __m256 b0 = _mm256_loadu_ps(w), b1 = _mm256_loadu_ps(w + 8), b2 = _mm256_loadu_ps(w + 16);
  const float xs[kAvx2QR] = {x0, x1, x2, x3};
  T3D_UNROLL2 for (int r = 0; r < kAvx2QR; ++r) {
    const __m256 s = _mm256_set1_ps(xs[r]);
    a[r][0] = _mm256_fmadd_ps(s, b0, a[r][0]);
    a[r][1] = _mm256_fmadd_ps(s, b1, a[r][1]);
    a[r][2] = _mm256_fmadd_ps(s, b2, a[r][2]);
  }
}

T3D_AVX2 void fwd_tile_avx2(const float* src, const int64_t* rows, const int64_t* tap_off, int ntaps, int64_t c0,
                            int64_t cb, const float* const* wtap, float* acc, int64_t ld, int mr_valid, bool first) {
  alignas(32) float part[kAvxMR * kAvx2NR];
  for (int q = 0; q < 4; ++q) {
    const int r0 = (q >> 1) * kAvx2QR, k0 = (q & 1) * kAvx2QV * 8;
    bool empty = true;
    for (int j = 0; j < ntaps; ++j) {
      const float* p0 = src + rows[r0] + tap_off[j] + c0;
      const float* p1 = src + rows[r0 + 1] + tap_off[j] + c0;
      const float* p2 = src + rows[r0 + 2] + tap_off[j] + c0;
      const float* p3 = src + rows[r0 + 3] + tap_off[j] + c0;
      const float* w = wtap[j] + c0 * kAvx2NR + k0;
      for (int64_t cs = 0; cs < cb; cs += kSumBlock) {  // blocks of one tap x kSumBlock channels
        const int64_t ce = std::min(cb, cs + kSumBlock);
        __m256 a[kAvx2QR][kAvx2QV];
        zero_quadrant_avx2(a);
        for (int64_t c = cs; c < ce; ++c, w += kAvx2NR) fma_quadrant_avx2(a, w, p0[c], p1[c], p2[c], p3[c]);
        add_quadrant_avx2(a, part + r0 * kAvx2NR + k0, kAvx2NR, kAvx2QR, empty);
        empty = false;
      }
    }
  }
  for (int r = 0; r < mr_valid; ++r)
    T3D_UNROLL2 for (int v = 0; v < kAvx2NR / 8; ++v) {
      const __m256 s = _mm256_load_ps(part + r * kAvx2NR + v * 8);
      float* d = acc + r * ld + v * 8;
      _mm256_storeu_ps(d, first ? s : _mm256_add_ps(_mm256_loadu_ps(d), s));
    }
}

T3D_AVX2 void wgrad_tile_avx2(const float* src, const int64_t* rows, int64_t np, int64_t off, const float* gy,
                              int64_t ldg, float* acc, bool assign) {
  alignas(32) float part[kAvxMR * kAvx2NR];
  constexpr int64_t kAhead = 6;  // as the AVX-512 tile: source rows ~2*C floats apart
  for (int q = 0; q < 4; ++q) {
    const int r0 = (q >> 1) * kAvx2QR, k0 = (q & 1) * kAvx2QV * 8;
    for (int64_t ps0 = 0; ps0 < np; ps0 += kSumBlock) {
      const int64_t pe = std::min(np, ps0 + kSumBlock);
      __m256 a[kAvx2QR][kAvx2QV];
      zero_quadrant_avx2(a);
      for (int64_t p = ps0; p < pe; ++p) {
        const float* ps = src + rows[p] + off + r0;
        if (p + kAhead < np) _mm_prefetch(reinterpret_cast<const char*>(src + rows[p + kAhead] + off + r0), _MM_HINT_T0);
        fma_quadrant_avx2(a, gy + p * ldg + k0, ps[0], ps[1], ps[2], ps[3]);
      }
      add_quadrant_avx2(a, part + r0 * kAvx2NR + k0, kAvx2NR, kAvx2QR, ps0 == 0);
    }
  }
  T3D_UNROLL2 for (int i = 0; i < kAvxMR * kAvx2NR / 8; ++i) {
    const __m256 s = _mm256_load_ps(part + i * 8);
    _mm256_storeu_ps(acc + i * 8, assign ? s : _mm256_add_ps(_mm256_loadu_ps(acc + i * 8), s));
  }
}

T3D_AVX2 void dgrad_tile_avx2(const float* const* tap_rows, const float* const* wt, int ntaps, int64_t cout,
                              float* acc) {
  const int group = dgrad_block_taps(cout);
  for (int q = 0; q < 4; ++q) {
    const int r0 = (q >> 1) * kAvx2QR, k0 = (q & 1) * kAvx2QV * 8;
    for (int j0 = 0; j0 < ntaps; j0 += group) {
      const int je = std::min(ntaps, j0 + group);
      __m256 a[kAvx2QR][kAvx2QV];
      zero_quadrant_avx2(a);
      for (int j = j0; j < je; ++j) {
        const float* const* p = tap_rows + j * kAvxMR + r0;
        const float *p0 = p[0], *p1 = p[1], *p2 = p[2], *p3 = p[3];
        const float* w = wt[j] + k0;
        for (int64_t o = 0; o < cout; ++o, w += kAvx2NR) fma_quadrant_avx2(a, w, p0[o], p1[o], p2[o], p3[o]);
      }
      add_quadrant_avx2(a, acc + r0 * kAvx2NR + k0, kAvx2NR, kAvx2QR, false);
    }
  }
}

#undef T3D_UNROLL2
#undef T3D_AVX2

}  // namespace
}  // namespace t3d
