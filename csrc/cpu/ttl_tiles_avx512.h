// AVX-512 tile kernels of the CPU TTL (float32). Same contracts, packed layouts and summation order as the generic
// kernels in ttl_kernel.cpp: an MR x (NV*16) register tile, 24 zmm accumulators, one broadcast per row and NV vector
// loads per reduction step; the registers sum one block of the reduction (kSumBlock terms) at a time and the block
// results are added into a separate tile (see "Summation order" there). Compiled with a target attribute so the rest
// of the extension stays baseline x86-64; called only when the CPU reports AVX-512F.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace t3d {
namespace {

constexpr int kAvxMR = 8;
constexpr int kAvxNV = 3;

#define T3D_AVX512 __attribute__((target("avx512f,fma")))
#define T3D_UNROLL _Pragma("GCC unroll 8")

// dst[r] (+)= a[r] for the tile's rows r < rows (dst rows ld floats apart)
T3D_AVX512 T3D_INLINE void add_tile_avx512(const __m512 (&a)[kAvxMR][kAvxNV], float* dst, int64_t ld, int rows,
                                           bool assign) {
  T3D_UNROLL for (int r = 0; r < kAvxMR; ++r) {
    if (r >= rows) break;
    T3D_UNROLL for (int v = 0; v < kAvxNV; ++v) {
      float* d = dst + r * ld + v * 16;
      _mm512_storeu_ps(d, assign ? a[r][v] : _mm512_add_ps(_mm512_loadu_ps(d), a[r][v]));
    }
  }
}

T3D_AVX512 void fwd_tile_avx512(const float* src, const int64_t* rows, const int64_t* tap_off, int ntaps, int64_t c0,
                                int64_t cb, const float* const* wtap, float* acc, int64_t ld, int mr_valid,
                                bool first) {
  constexpr int NR = kAvxNV * 16;
  alignas(64) float part[kAvxMR * NR];
  bool empty = true;
  for (int j = 0; j < ntaps; ++j) {
    const float* p[kAvxMR];
    T3D_UNROLL for (int r = 0; r < kAvxMR; ++r) p[r] = src + rows[r] + tap_off[j] + c0;
    const float* w = wtap[j] + c0 * NR;
    for (int64_t cs = 0; cs < cb; cs += kSumBlock) {  // blocks of one tap x kSumBlock channels
      const int64_t ce = std::min(cb, cs + kSumBlock);
      __m512 a[kAvxMR][kAvxNV];
      T3D_UNROLL for (int r = 0; r < kAvxMR; ++r) T3D_UNROLL for (int v = 0; v < kAvxNV; ++v) a[r][v] =
          _mm512_setzero_ps();
      for (int64_t c = cs; c < ce; ++c, w += NR) {
        const __m512 b0 = _mm512_loadu_ps(w), b1 = _mm512_loadu_ps(w + 16), b2 = _mm512_loadu_ps(w + 32);
        T3D_UNROLL for (int r = 0; r < kAvxMR; ++r) {
          const __m512 s = _mm512_set1_ps(p[r][c]);
          a[r][0] = _mm512_fmadd_ps(s, b0, a[r][0]);
          a[r][1] = _mm512_fmadd_ps(s, b1, a[r][1]);
          a[r][2] = _mm512_fmadd_ps(s, b2, a[r][2]);
        }
      }
      add_tile_avx512(a, part, NR, kAvxMR, empty);
      empty = false;
    }
  }
  for (int r = 0; r < mr_valid; ++r)
    T3D_UNROLL for (int v = 0; v < kAvxNV; ++v) {
      const __m512 s = _mm512_load_ps(part + r * NR + v * 16);
      float* d = acc + r * ld + v * 16;
      _mm512_storeu_ps(d, first ? s : _mm512_add_ps(_mm512_loadu_ps(d), s));
    }
}

T3D_AVX512 void wgrad_tile_avx512(const float* src, const int64_t* rows, int64_t np, int64_t off, const float* gy,
                                  int64_t ldg, float* acc, bool assign) {
  constexpr int NR = kAvxNV * 16;
  alignas(64) float part[kAvxMR * NR];
  // consecutive positions read rows ~2*C floats apart (stride 2): too far for the hardware prefetcher, so ask
  // for the row a few positions ahead
  constexpr int64_t kAhead = 6;
  for (int64_t ps0 = 0; ps0 < np; ps0 += kSumBlock) {
    const int64_t pe = std::min(np, ps0 + kSumBlock);
    __m512 a[kAvxMR][kAvxNV];
    T3D_UNROLL for (int r = 0; r < kAvxMR; ++r) T3D_UNROLL for (int v = 0; v < kAvxNV; ++v) a[r][v] =
        _mm512_setzero_ps();
    for (int64_t p = ps0; p < pe; ++p) {
      const float* ps = src + rows[p] + off;
      const float* pg = gy + p * ldg;
      if (p + kAhead < np) _mm_prefetch(reinterpret_cast<const char*>(src + rows[p + kAhead] + off), _MM_HINT_T0);
      const __m512 b0 = _mm512_loadu_ps(pg), b1 = _mm512_loadu_ps(pg + 16), b2 = _mm512_loadu_ps(pg + 32);
      T3D_UNROLL for (int r = 0; r < kAvxMR; ++r) {
        const __m512 s = _mm512_set1_ps(ps[r]);
        a[r][0] = _mm512_fmadd_ps(s, b0, a[r][0]);
        a[r][1] = _mm512_fmadd_ps(s, b1, a[r][1]);
        a[r][2] = _mm512_fmadd_ps(s, b2, a[r][2]);
      }
    }
    add_tile_avx512(a, part, NR, kAvxMR, ps0 == 0);
  }
  T3D_UNROLL for (int i = 0; i < kAvxMR * kAvxNV; ++i) {
    const __m512 s = _mm512_load_ps(part + i * 16);
    _mm512_storeu_ps(acc + i * 16, assign ? s : _mm512_add_ps(_mm512_loadu_ps(acc + i * 16), s));
  }
}

// NVT <= kAvxNV vectors of the tile's columns: the last channel block of a source whose channel count is not a
// multiple of kAvxNV * 16 computes only the vectors it has (each lane's sum is the same either way)
template <int NVT>
T3D_AVX512 void dgrad_tile_avx512_n(const float* const* tap_rows, const float* const* wt, int ntaps, int64_t cout,
                                    float* acc) {
  constexpr int NR = kAvxNV * 16;
  const int group = dgrad_block_taps(cout);
  for (int j0 = 0; j0 < ntaps; j0 += group) {
    const int je = std::min(ntaps, j0 + group);
    __m512 a[kAvxMR][NVT];
    T3D_UNROLL for (int r = 0; r < kAvxMR; ++r) T3D_UNROLL for (int v = 0; v < NVT; ++v) a[r][v] =
        _mm512_setzero_ps();
    for (int j = j0; j < je; ++j) {
      const float* const* p = tap_rows + j * kAvxMR;
      const float* w = wt[j];
      for (int64_t o = 0; o < cout; ++o, w += NR) {
        __m512 b[NVT];
        T3D_UNROLL for (int v = 0; v < NVT; ++v) b[v] = _mm512_loadu_ps(w + v * 16);
        T3D_UNROLL for (int r = 0; r < kAvxMR; ++r) {
          const __m512 s = _mm512_set1_ps(p[r][o]);
          T3D_UNROLL for (int v = 0; v < NVT; ++v) a[r][v] = _mm512_fmadd_ps(s, b[v], a[r][v]);
        }
      }
    }
    T3D_UNROLL for (int r = 0; r < kAvxMR; ++r) T3D_UNROLL for (int v = 0; v < NVT; ++v) {
      float* d = acc + r * NR + v * 16;
      _mm512_storeu_ps(d, _mm512_add_ps(_mm512_loadu_ps(d), a[r][v]));
    }
  }
}

// acc (MR x NR) += the tile's sums for its first `lanes` columns (the rest of acc is left as it is)
T3D_AVX512 void dgrad_tile_avx512(const float* const* tap_rows, const float* const* wt, int ntaps, int64_t cout,
                                  float* acc, int64_t lanes) {
  if (lanes > 32) return dgrad_tile_avx512_n<3>(tap_rows, wt, ntaps, cout, acc);
  if (lanes > 16) return dgrad_tile_avx512_n<2>(tap_rows, wt, ntaps, cout, acc);
  dgrad_tile_avx512_n<1>(tap_rows, wt, ntaps, cout, acc);
}

// dst[i] = src[i * stride] for i < kAvxNV * 16 (the weight packing's column gathers, from an L1 buffer)
T3D_AVX512 void gather_column_avx512(const float* src, int64_t stride, float* dst) {
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32((int)stride));
  T3D_UNROLL for (int v = 0; v < kAvxNV; ++v)
    _mm512_storeu_ps(dst + v * 16,  // masked form: the plain one reads an undefined source register
                     _mm512_mask_i32gather_ps(_mm512_setzero_ps(), 0xFFFF, idx, src + v * 16 * stride, 4));
}

#undef T3D_UNROLL
#undef T3D_AVX512

}  // namespace
}  // namespace t3d
