// AVX2 kernels of the Winograd F(2x2x2, 3x3x3) convolution (winograd_conv3d.cpp), for CPUs without AVX-512 (AMD
// Zen 2/3, older Intel). Included by winograd_conv3d.cpp after its shared geometry (Geo, Piece, PieceReads, kTB,
// kCC) and its AVX-512 kernels; called only when the CPU reports AVX2 and FMA.
//
// The same transforms and GEMMs as the AVX-512 kernels, each 16-lane vector there a pair of 8-lane ones here, and
// every valid lane computed by the same operations in the same order: both give the same bits (tests/test_cpu_isa.py
// checks it where AVX-512 exists). What differs:
//   - AVX2 has 16 ymm registers, not 32 zmm: the GEMM tiles are 6 rows x 16 lanes (12 accumulators, 2 loads and 6
//     broadcasts per step), each half of the 32-tile block in turn, instead of 12 rows x 32 lanes;
//   - masked stores are slow on AMD (vmaskmovps to memory): a piece writes its whole 16-lane window, and the lanes
//     past the piece belong to a later piece of the same row (written after it) or to the next row (written after
//     it: rows are filled in order, and the buffers have a cache line of slack past the last one). Only the last
//     piece of a block with fewer than kTB tiles stores masked, so the lanes past the last tile stay zero (the
//     weight gradient sums over all kTB lanes of V and Mb).
//   - masked loads are vmaskmovps from memory (no fault on the masked lanes, as AVX-512's masked loads).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#define T3D_WINO2 __attribute__((target("avx2,fma")))
#define T3D_WINO2_INLINE __attribute__((target("avx2,fma"), always_inline)) inline

// 16 floats as two 8-lane halves
struct F16 {
  __m256 lo, hi;
};

T3D_WINO2_INLINE F16 f16_add(F16 a, F16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
T3D_WINO2_INLINE F16 f16_sub(F16 a, F16 b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
T3D_WINO2_INLINE F16 f16_zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
T3D_WINO2_INLINE F16 f16_load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
T3D_WINO2_INLINE void f16_store(float* p, F16 v) {
  _mm256_storeu_ps(p, v.lo);
  _mm256_storeu_ps(p + 8, v.hi);
}

// the lanes of a 16-bit mask as two vmaskmovps masks
struct Mask16 {
  __m256i lo, hi;
};

T3D_WINO2_INLINE Mask16 mask16(unsigned m) {
  const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i lo = _mm256_set1_epi32(static_cast<int>(m & 0xFFu)), hi = _mm256_set1_epi32(static_cast<int>(m >> 8));
  return {_mm256_cmpeq_epi32(_mm256_and_si256(lo, bits), bits), _mm256_cmpeq_epi32(_mm256_and_si256(hi, bits), bits)};
}

T3D_WINO2_INLINE F16 f16_maskz_load(const Mask16& m, const float* p) {
  return {_mm256_maskload_ps(p, m.lo), _mm256_maskload_ps(p + 8, m.hi)};
}

// the whole window, or only the masked lanes where `masked`
T3D_WINO2_INLINE void f16_store_lanes(float* p, F16 v, bool masked, const Mask16& m) {
  if (masked) {
    _mm256_maskstore_ps(p, m.lo, v.lo);
    _mm256_maskstore_ps(p + 8, m.hi, v.hi);
  } else {
    f16_store(p, v);
  }
}

// the even and the odd lanes of the 32 floats (a, b): what _mm512_permutex2var_ps(a, even / odd, b) gives
T3D_WINO2_INLINE __m256 evens8(__m256 x, __m256 y) {
  const __m256 t = _mm256_shuffle_ps(x, y, _MM_SHUFFLE(2, 0, 2, 0));  // x0 x2 y0 y2 | x4 x6 y4 y6
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(t), _MM_SHUFFLE(3, 1, 2, 0)));
}
T3D_WINO2_INLINE __m256 odds8(__m256 x, __m256 y) {
  const __m256 t = _mm256_shuffle_ps(x, y, _MM_SHUFFLE(3, 1, 3, 1));
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(t), _MM_SHUFFLE(3, 1, 2, 0)));
}
T3D_WINO2_INLINE F16 f16_evens(F16 a, F16 b) { return {evens8(a.lo, a.hi), evens8(b.lo, b.hi)}; }
T3D_WINO2_INLINE F16 f16_odds(F16 a, F16 b) { return {odds8(a.lo, a.hi), odds8(b.lo, b.hi)}; }

// input_piece of the AVX-512 kernels: V[p * pstride] = B^T d B of channel plane x for each tile of the piece
T3D_WINO2 void input_piece_avx2(const float* x, const PieceReads& pr, bool masked, float* V, int64_t pstride) {
  const Mask16 m0 = mask16(pr.mask[0]), m1 = mask16(pr.mask[1]), m2 = mask16(pr.mask[2]), m3 = mask16(pr.mask[3]);
  alignas(64) float buf[4][16][16];  // [t][h'*4 + w'] after the w and h stages
  for (int qt = 0; qt < 4; ++qt) {
    F16 s[4][4];
    for (int qh = 0; qh < 4; ++qh) {
      const int64_t off = pr.row[qt * 4 + qh];
      if (off < 0) {
        for (int qw = 0; qw < 4; ++qw) s[qh][qw] = f16_zero();
        continue;
      }
      const float* row = x + off + pr.w0;
      const F16 A = f16_maskz_load(m0, row), B = f16_maskz_load(m1, row + 16);
      const F16 C = f16_maskz_load(m2, row + 2), D = f16_maskz_load(m3, row + 18);
      const F16 d0 = f16_evens(A, B), d1 = f16_odds(A, B), d2 = f16_evens(C, D), d3 = f16_odds(C, D);
      s[qh][0] = f16_sub(d0, d2);
      s[qh][1] = f16_add(d1, d2);
      s[qh][2] = f16_sub(d2, d1);
      s[qh][3] = f16_sub(d1, d3);
    }
    for (int qw = 0; qw < 4; ++qw) {
      const F16 e0 = s[0][qw], e1 = s[1][qw], e2 = s[2][qw], e3 = s[3][qw];
      f16_store(buf[qt][0 * 4 + qw], f16_sub(e0, e2));
      f16_store(buf[qt][1 * 4 + qw], f16_add(e1, e2));
      f16_store(buf[qt][2 * 4 + qw], f16_sub(e2, e1));
      f16_store(buf[qt][3 * 4 + qw], f16_sub(e1, e3));
    }
  }
  const Mask16 lanes = mask16(pr.lanes);
  for (int hw = 0; hw < 16; ++hw) {
    const F16 e0 = f16_load(buf[0][hw]), e1 = f16_load(buf[1][hw]);
    const F16 e2 = f16_load(buf[2][hw]), e3 = f16_load(buf[3][hw]);
    f16_store_lanes(V + (0 * 16 + hw) * pstride, f16_sub(e0, e2), masked, lanes);
    f16_store_lanes(V + (1 * 16 + hw) * pstride, f16_add(e1, e2), masked, lanes);
    f16_store_lanes(V + (2 * 16 + hw) * pstride, f16_sub(e2, e1), masked, lanes);
    f16_store_lanes(V + (3 * 16 + hw) * pstride, f16_sub(e1, e3), masked, lanes);
  }
}

// Whether piece i of a block must store masked: it is the block's last and lanes past it (past the last tile) must
// stay zero.
inline bool store_masked(const std::vector<Piece>& pieces, size_t i) {
  return i + 1 == pieces.size() && pieces[i].lane + pieces[i].len < kTB;
}

// M[r * kTB + (0..16)] (+)= sum_c U[c * ldu + r] V[c * kTB + (0..16)], MR output channels r
template <int MR>
T3D_WINO2 void gemm_tile_avx2(const float* U, int64_t ldu, const float* V, int64_t C, float* M, bool add) {
  __m256 acc[MR][2];  // every loop over r unrolled: the accumulators stay in registers (else GCC keeps them on the stack)
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    acc[r][0] = add ? _mm256_loadu_ps(M + r * kTB) : _mm256_setzero_ps();
    acc[r][1] = add ? _mm256_loadu_ps(M + r * kTB + 8) : _mm256_setzero_ps();
  }
  for (int64_t c = 0; c < C; ++c) {
    const __m256 v0 = _mm256_loadu_ps(V + c * kTB), v1 = _mm256_loadu_ps(V + c * kTB + 8);
    const float* u = U + c * ldu;
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m256 ur = _mm256_broadcast_ss(u + r);
      acc[r][0] = _mm256_fmadd_ps(ur, v0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(ur, v1, acc[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(M + r * kTB, acc[r][0]);
    _mm256_storeu_ps(M + r * kTB + 8, acc[r][1]);
  }
}

template <int... MRs>
T3D_WINO2 void gemm_rows_avx2(int mr, const float* U, int64_t ldu, const float* V, int64_t C, float* M, bool add,
                              std::integer_sequence<int, MRs...>) {
  ((mr == MRs + 1 ? gemm_tile_avx2<MRs + 1>(U, ldu, V, C, M, add) : void()), ...);
}

// dU[r * kp + (0..16)] += sum over the block's tiles t of V[r * kTB + t] * Mt[t * kp + (0..16)], MR input channels r
template <int MR>
T3D_WINO2 void wgrad_tile_avx2(const float* V, const float* Mt, int64_t kp, float* dU) {
  __m256 acc[MR][2];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int t = 0; t < kTB; ++t) {
    const __m256 m0 = _mm256_loadu_ps(Mt + t * kp), m1 = _mm256_loadu_ps(Mt + t * kp + 8);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m256 v = _mm256_broadcast_ss(V + r * kTB + t);
      acc[r][0] = _mm256_fmadd_ps(v, m0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(v, m1, acc[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(dU + r * kp, _mm256_add_ps(_mm256_loadu_ps(dU + r * kp), acc[r][0]));
    _mm256_storeu_ps(dU + r * kp + 8, _mm256_add_ps(_mm256_loadu_ps(dU + r * kp + 8), acc[r][1]));
  }
}

template <int... MRs>
T3D_WINO2 void wgrad_rows_avx2(int mr, const float* V, const float* Mt, int64_t kp, float* dU,
                               std::integer_sequence<int, MRs...>) {
  ((mr == MRs + 1 ? wgrad_tile_avx2<MRs + 1>(V, Mt, kp, dU) : void()), ...);
}

// out[i * ldo + j] = in[j * ldi + i] for an 8 x 8 block of floats
T3D_WINO2 void transpose8(const float* in, int64_t ldi, float* out, int64_t ldo) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(in + i * ldi);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    t[j] = _mm256_permute2f128_ps(r[j], r[j + 4], 0x20);
    t[j + 4] = _mm256_permute2f128_ps(r[j], r[j + 4], 0x31);
  }
  for (int i = 0; i < 8; ++i) _mm256_storeu_ps(out + i * ldo, t[i]);
}

// grad_output_piece of the AVX-512 kernels: Mb[p * ms] = A g A^T of output-gradient plane gk for each tile
T3D_WINO2 void grad_output_piece_avx2(const float* gk, const Geo& g, const Piece& pc, bool masked, __mmask16 lane_bits,
                                      float* Mb, int64_t ms) {
  const Mask16 lanes = mask16(lane_bits);
  const int64_t w0 = 2 * pc.j0;
  const Mask16 m0 = mask16(window_mask(w0, g.W)), m1 = mask16(window_mask(w0 + 16, g.W));
  F16 s[2][2][4];  // [ot][oh][qw] after the w stage: (e, e + o, e - o, -o)
  for (int ot = 0; ot < 2; ++ot)
    for (int oh = 0; oh < 2; ++oh) {
      const int64_t t = 2 * pc.a + ot, h = 2 * pc.b + oh;
      if (t >= g.T || h >= g.H) {
        for (int q = 0; q < 4; ++q) s[ot][oh][q] = f16_zero();
        continue;
      }
      const float* row = gk + (t * g.H + h) * g.W + w0;
      const F16 A = f16_maskz_load(m0, row), B = f16_maskz_load(m1, row + 16);
      const F16 e = f16_evens(A, B), o = f16_odds(A, B);
      s[ot][oh][0] = e;
      s[ot][oh][1] = f16_add(e, o);
      s[ot][oh][2] = f16_sub(e, o);
      s[ot][oh][3] = f16_sub(f16_zero(), o);
    }
  for (int qw = 0; qw < 4; ++qw) {
    F16 r[2][4];  // [ot][qh] after the h stage
    for (int ot = 0; ot < 2; ++ot) {
      const F16 a = s[ot][0][qw], b = s[ot][1][qw];
      r[ot][0] = a;
      r[ot][1] = f16_add(a, b);
      r[ot][2] = f16_sub(a, b);
      r[ot][3] = f16_sub(f16_zero(), b);
    }
    for (int qh = 0; qh < 4; ++qh) {
      const F16 a = r[0][qh], b = r[1][qh];
      f16_store_lanes(Mb + ((0 * 4 + qh) * 4 + qw) * ms, a, masked, lanes);
      f16_store_lanes(Mb + ((1 * 4 + qh) * 4 + qw) * ms, f16_add(a, b), masked, lanes);
      f16_store_lanes(Mb + ((2 * 4 + qh) * 4 + qw) * ms, f16_sub(a, b), masked, lanes);
      f16_store_lanes(Mb + ((3 * 4 + qh) * 4 + qw) * ms, f16_sub(f16_zero(), b), masked, lanes);
    }
  }
}

// output_block of the AVX-512 kernels
T3D_WINO2 void output_block_avx2(const float* M, int64_t ms, const Geo& g, const int64_t* base, const uint8_t* edge,
                                 int nvalid, float* y) {
  const int64_t P = g.T * g.H * g.W, HW = g.H * g.W;
  alignas(64) float out[8][16];
  for (int64_t k = 0; k < g.K; ++k) {
    for (int v = 0; v * 16 < nvalid; ++v) {
      F16 s[4][4][2];  // [t][h][ow] after the w stage
      for (int it = 0; it < 4; ++it)
        for (int ih = 0; ih < 4; ++ih) {
          const float* m = M + ((it * 4 + ih) * 4) * ms + k * kTB + v * 16;
          const F16 m0 = f16_load(m), m1 = f16_load(m + ms), m2 = f16_load(m + 2 * ms), m3 = f16_load(m + 3 * ms);
          s[it][ih][0] = f16_add(f16_add(m0, m1), m2);
          s[it][ih][1] = f16_sub(f16_sub(m1, m2), m3);
        }
      F16 r[4][2][2];  // [t][oh][ow]
      for (int it = 0; it < 4; ++it)
        for (int ow = 0; ow < 2; ++ow) {
          r[it][0][ow] = f16_add(f16_add(s[it][0][ow], s[it][1][ow]), s[it][2][ow]);
          r[it][1][ow] = f16_sub(f16_sub(s[it][1][ow], s[it][2][ow]), s[it][3][ow]);
        }
      for (int oh = 0; oh < 2; ++oh)
        for (int ow = 0; ow < 2; ++ow) {
          f16_store(out[oh * 2 + ow], f16_add(f16_add(r[0][oh][ow], r[1][oh][ow]), r[2][oh][ow]));
          f16_store(out[4 + oh * 2 + ow], f16_sub(f16_sub(r[1][oh][ow], r[2][oh][ow]), r[3][oh][ow]));
        }
      const int lanes = std::min(16, nvalid - v * 16);
      for (int l = 0; l < lanes; ++l) {
        const int tile = v * 16 + l;
        float* yk = y + base[tile] + k * P;
        const uint8_t e = edge[tile];  // bit 0: no second t, 1: no second h, 2: no second w
        for (int ot = 0; ot < 2; ++ot) {
          if (ot && (e & 1)) break;
          for (int oh = 0; oh < 2; ++oh) {
            if (oh && (e & 2)) break;
            float* row = yk + ot * HW + oh * g.W;
            row[0] = out[ot * 4 + oh * 2][l];
            if (!(e & 4)) row[1] = out[ot * 4 + oh * 2 + 1][l];
          }
        }
      }
    }
  }
}

struct Avx2Kernels {
  static constexpr int kMR = 6;  // output (forward) or input (weight gradient) channels per register tile

  // channel by channel, the pieces of each in lane order (see the header: later pieces and rows overwrite the
  // lanes an earlier whole-window store wrote past its piece)
  T3D_WINO2 static void input_channels(const float* x, const Geo& g, const std::vector<Piece>& pieces,
                                       const std::vector<PieceReads>& reads, const std::vector<int64_t>& lines,
                                       int64_t c0, int64_t cn, float* V, int64_t vs) {
    const int64_t P = g.T * g.H * g.W;
    for (int64_t c = 0; c < cn; ++c) {
      if (c0 + c + kPrefetch < g.C) {
        const char* ahead = reinterpret_cast<const char*>(x + (c0 + c + kPrefetch) * P);
        for (int64_t l : lines) _mm_prefetch(ahead + l, _MM_HINT_T0);
      }
      for (size_t i = 0; i < pieces.size(); ++i)
        input_piece_avx2(x + pieces[i].n * g.sx + (c0 + c) * P, reads[i], store_masked(pieces, i),
                         V + c * kTB + pieces[i].lane, vs);
    }
  }

  T3D_WINO2 static void gemm_pass(const float* U, const Geo& g, int64_t c0, int64_t cn, const float* V, int64_t vs,
                                  float* M, int64_t ms) {
    for (int p = 0; p < 64; ++p) {
      const float* Up = U + (p * g.C + c0) * g.K;
      for (int64_t k0 = 0; k0 < g.K; k0 += kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, g.K - k0));
        for (int half = 0; half < kTB; half += 16)
          gemm_rows_avx2(mr, Up + k0, g.K, V + p * vs + half, cn, M + p * ms + k0 * kTB + half, c0 > 0,
                         std::make_integer_sequence<int, kMR>());
      }
    }
  }

  static void output_block(const float* M, int64_t ms, const Geo& g, const int64_t* base, const uint8_t* edge,
                           int nvalid, float* y) {
    output_block_avx2(M, ms, g, base, edge, nvalid, y);
  }

  // row by row (k), the pieces of each in lane order (as input_channels)
  T3D_WINO2 static void grad_output_block(const float* gy, const Geo& g, const std::vector<Piece>& pieces,
                                          const std::vector<PieceReads>& reads, float* Mb, int64_t ms) {
    const int64_t P = g.T * g.H * g.W;
    for (int64_t k = 0; k < g.K; ++k)
      for (size_t i = 0; i < pieces.size(); ++i)
        grad_output_piece_avx2(gy + pieces[i].n * g.sy + k * P, g, pieces[i], store_masked(pieces, i),
                               reads[i].lanes, Mb + k * kTB + pieces[i].lane, ms);
  }

  T3D_WINO2 static void transpose_block(const float* Mb, int64_t ms, int64_t kp, float* Mt, int64_t mts) {
    for (int p = 0; p < 64; ++p)
      for (int64_t k0 = 0; k0 < kp; k0 += 8)
        for (int t = 0; t < kTB; t += 8) transpose8(Mb + p * ms + k0 * kTB + t, kTB, Mt + p * mts + t * kp + k0, kp);
  }

  T3D_WINO2 static void wgrad_pass(const float* V, int64_t vs, const float* Mt, int64_t mts, int64_t kp, int64_t C,
                                   int64_t c0, int64_t cn, float* dU) {
    for (int p = 0; p < 64; ++p)
      for (int64_t c = 0; c < cn; c += kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, cn - c));
        for (int64_t k0 = 0; k0 < kp; k0 += 16)
          wgrad_rows_avx2(mr, V + p * vs + c * kTB, Mt + p * mts + k0, kp, dU + (p * C + c0 + c) * kp + k0,
                          std::make_integer_sequence<int, kMR>());
      }
  }
};
