// Winograd F(2x2x2, 3x3x3) convolution, float32, AVX-512 (the AVX2 kernels: winograd_avx2.h; see winograd_conv3d.h).
//
// y = A^T [ (G g G^T) . (B^T d B) ] A in each of the three dims, with (Lavin & Gray 2015, F(2,3)):
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],  G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1],  A^T = [1 1 1 0; 0 1 -1 -1].
// Output tiles are 2x2x2; tile (a, b, j) of a sample reads the input patch t in [2a-1, 2a+2], h in [2b-1, 2b+2],
// w in [2j-1, 2j+2] (zero outside: the padding). Tiles are numbered flat over (n, a, b, j) and taken in blocks of
// kTB = 32: per block,
//   1. input transform: V[p][c][tile] for the 64 transform points p, vectorised over 16 tiles of one (n, a, b) row
//      (a row of the input is loaded once per 16 tiles and split into its even and odd columns by permutes), channel
//      by channel for all the block's pieces (their patches overlap), with the block's lines of a later channel
//      prefetched;
//   2. 64 GEMMs M[p][k][tile] = sum_c U[p][c][k] V[p][c][tile], an MR x 32 register tile (MR output channels,
//      one broadcast of U and two loads of V per channel);
//   3. output transform of M into each tile's 2x2x2 outputs, clipped at the far edges.
// U (the transformed weight, 64 * C * K floats) is made once per call. A block's V (64 * C * 32 floats: 1 MB at
// C = 128) and M stay in the thread's L2 between the three steps. Every output element belongs to exactly one tile,
// so y needs no zeroing. The sum over c is one chain per output (C is the block's bottleneck width, ~128).
#include "cpu/winograd_conv3d.h"

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "common/avx512_transpose.h"
#include "common/cpu_features.h"

namespace t3d {
namespace {

#define T3D_WINO __attribute__((target("avx512f,fma")))

// The input transform's reads of a channel plane miss the cache (consecutive channels lie a plane apart: no hardware
// prefetcher follows them); they are prefetched this many channels ahead. 1 thread, 1x128x16x28x28 -> 32: channels in
// the inner loop and this prefetch took the conv from 10.3 to 7.6 ms, the L1-buffered transform to 7.4 ms (1-4 ahead:
// within 3% of each other).
constexpr int64_t kPrefetch = 2;
constexpr int kTB = 32;  // tiles per block: two 16-lane vectors
constexpr int kMR = 12;  // output channels per register tile: 12 x 2 accumulators
// V's and M's 64 planes (one per transform point) are written / read together by the transforms; a plane size of a
// multiple of 4 KB would put all 64 in one L1 set. One cache line of padding per plane.
// Input channels per pass of a block: its V (64 * kCC * kTB floats, 256 KB) and M stay in L2 while the GEMMs sum
// over the pass's channels into M.
constexpr int64_t kCC = 32;
inline int64_t plane_stride(int64_t rows) { return rows * kTB + 16; }

struct Geo {
  int64_t N, C, K, T, H, W, nt, nh, nw, tiles;
  int64_t sx, sy;  // sample strides of x and y (each sample's (C, T, H, W) is contiguous)
};

// U[p][c][k], p = (i*4 + j)*4 + l over (t, h, w): G g G^T in each dim (0.5 is exact: no rounding beyond the sums)
std::vector<float> transform_weight(const at::Tensor& w, const Geo& g) {
  static const float G[4][3] = {{1, 0, 0}, {0.5f, 0.5f, 0.5f}, {0.5f, -0.5f, 0.5f}, {0, 0, 1}};
  std::vector<float> U(static_cast<size_t>(64 * g.C * g.K));
  const at::Tensor wc = w.contiguous();
  const float* wp = wc.data_ptr<float>();
  at::parallel_for(0, g.C, 8, [&](int64_t begin, int64_t end) {
    // one input channel's 64 x K values, then each point's K values as one run of U (the 64 points' planes are
    // C * K floats apart: written one k at a time, they would all fall in one L1 set)
    std::vector<float> tmp(static_cast<size_t>(64 * g.K));
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t k = 0; k < g.K; ++k) {
        const float* f = wp + (k * g.C + c) * 27;
        float a1[4][3][3], a2[4][4][3];
        for (int i = 0; i < 4; ++i)
          for (int b = 0; b < 3; ++b)
            for (int d = 0; d < 3; ++d)
              a1[i][b][d] = G[i][0] * f[b * 3 + d] + G[i][1] * f[9 + b * 3 + d] + G[i][2] * f[18 + b * 3 + d];
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j)
            for (int d = 0; d < 3; ++d)
              a2[i][j][d] = G[j][0] * a1[i][0][d] + G[j][1] * a1[i][1][d] + G[j][2] * a1[i][2][d];
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j)
            for (int l = 0; l < 4; ++l)
              tmp[((i * 4 + j) * 4 + l) * g.K + k] = G[l][0] * a2[i][j][0] + G[l][1] * a2[i][j][1] + G[l][2] * a2[i][j][2];
      }
      for (int p = 0; p < 64; ++p) std::copy_n(tmp.data() + p * g.K, g.K, U.data() + (p * g.C + c) * g.K);
    }
  });
  return U;
}

// A run of at most 16 consecutive tiles of one (n, a, b) row inside a block, starting at column j0 and block lane
// `lane`.
struct Piece {
  int64_t n, a, b, j0;
  int len, lane;
};

void block_pieces(const Geo& g, int64_t t0, int64_t t1, std::vector<Piece>& out) {
  out.clear();
  for (int64_t f = t0; f < t1;) {
    const int64_t row = f / g.nw, j = f % g.nw;
    const int len = static_cast<int>(std::min<int64_t>({g.nw - j, t1 - f, 16}));
    out.push_back({row / (g.nh * g.nt), (row / g.nh) % g.nt, row % g.nh, j, len, static_cast<int>(f - t0)});
    f += len;
  }
}

// What a piece's input transform reads, the same for every channel: the 16 input rows (t, h) of its tiles' patches
// (offset in a channel plane; -1 for a row in the padding) and the masks of its four 16-float windows of a row
// (columns w0 + i, w0 + 16 + i, w0 + 2 + i, w0 + 18 + i; zero outside [0, W)).
struct PieceReads {
  int64_t row[16];
  int64_t w0;
  __mmask16 mask[4], lanes;
};

inline __mmask16 window_mask(int64_t start, int64_t W) {
  const int64_t lo = std::max<int64_t>(0, -start), hi = std::min<int64_t>(16, W - start);
  return hi <= lo ? 0 : static_cast<__mmask16>(((1u << hi) - 1) & ~((1u << lo) - 1));
}

PieceReads piece_reads(const Geo& g, const Piece& pc) {
  PieceReads r{};
  for (int qt = 0; qt < 4; ++qt)
    for (int qh = 0; qh < 4; ++qh) {
      const int64_t ti = 2 * pc.a - 1 + qt, hi = 2 * pc.b - 1 + qh;
      r.row[qt * 4 + qh] = (ti < 0 || ti >= g.T || hi < 0 || hi >= g.H) ? -1 : (ti * g.H + hi) * g.W;
    }
  r.w0 = 2 * pc.j0 - 1;
  const int64_t starts[4] = {r.w0, r.w0 + 16, r.w0 + 2, r.w0 + 18};
  for (int q = 0; q < 4; ++q) r.mask[q] = window_mask(starts[q], g.W);
  r.lanes = static_cast<__mmask16>(pc.len >= 16 ? 0xFFFFu : (1u << pc.len) - 1);
  return r;
}

// V[p * pstride] (16 lanes, masked to the piece's tiles) = B^T d B of channel plane x (T, H, W) for each tile: the w
// and h stages one t row at a time into an L1 buffer, then the t stage (all 64 stage values at once would not fit
// the 32 vector registers: the compiler's spills cost more than the buffer)
T3D_WINO void input_piece(const float* x, const PieceReads& pr, float* V, int64_t pstride) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  alignas(64) float buf[4][16][16];  // [t][h'*4 + w'] after the w and h stages
  for (int qt = 0; qt < 4; ++qt) {
    __m512 s[4][4];
    for (int qh = 0; qh < 4; ++qh) {
      const int64_t off = pr.row[qt * 4 + qh];
      if (off < 0) {
        for (int qw = 0; qw < 4; ++qw) s[qh][qw] = _mm512_setzero_ps();
        continue;
      }
      const float* row = x + off + pr.w0;
      const __m512 A = _mm512_maskz_loadu_ps(pr.mask[0], row), B = _mm512_maskz_loadu_ps(pr.mask[1], row + 16);
      const __m512 C = _mm512_maskz_loadu_ps(pr.mask[2], row + 2), D = _mm512_maskz_loadu_ps(pr.mask[3], row + 18);
      const __m512 d0 = _mm512_permutex2var_ps(A, even, B), d1 = _mm512_permutex2var_ps(A, odd, B);
      const __m512 d2 = _mm512_permutex2var_ps(C, even, D), d3 = _mm512_permutex2var_ps(C, odd, D);
      s[qh][0] = _mm512_sub_ps(d0, d2);
      s[qh][1] = _mm512_add_ps(d1, d2);
      s[qh][2] = _mm512_sub_ps(d2, d1);
      s[qh][3] = _mm512_sub_ps(d1, d3);
    }
    for (int qw = 0; qw < 4; ++qw) {
      const __m512 e0 = s[0][qw], e1 = s[1][qw], e2 = s[2][qw], e3 = s[3][qw];
      _mm512_store_ps(buf[qt][0 * 4 + qw], _mm512_sub_ps(e0, e2));
      _mm512_store_ps(buf[qt][1 * 4 + qw], _mm512_add_ps(e1, e2));
      _mm512_store_ps(buf[qt][2 * 4 + qw], _mm512_sub_ps(e2, e1));
      _mm512_store_ps(buf[qt][3 * 4 + qw], _mm512_sub_ps(e1, e3));
    }
  }
  for (int hw = 0; hw < 16; ++hw) {
    const __m512 e0 = _mm512_load_ps(buf[0][hw]), e1 = _mm512_load_ps(buf[1][hw]);
    const __m512 e2 = _mm512_load_ps(buf[2][hw]), e3 = _mm512_load_ps(buf[3][hw]);
    _mm512_mask_storeu_ps(V + (0 * 16 + hw) * pstride, pr.lanes, _mm512_sub_ps(e0, e2));
    _mm512_mask_storeu_ps(V + (1 * 16 + hw) * pstride, pr.lanes, _mm512_add_ps(e1, e2));
    _mm512_mask_storeu_ps(V + (2 * 16 + hw) * pstride, pr.lanes, _mm512_sub_ps(e2, e1));
    _mm512_mask_storeu_ps(V + (3 * 16 + hw) * pstride, pr.lanes, _mm512_sub_ps(e1, e3));
  }
}

// The cache lines (byte offsets from a channel plane's start) that the input transforms of a block's pieces read,
// the same in every channel.
void block_lines(const Geo& g, const std::vector<Piece>& pieces, const std::vector<PieceReads>& reads,
                 std::vector<int64_t>& lines) {
  lines.clear();
  for (size_t i = 0; i < pieces.size(); ++i)
    for (int q = 0; q < 16; ++q) {
      const int64_t off = reads[i].row[q];
      if (off < 0) continue;
      const int64_t sample = pieces[i].n * g.sx;
      const int64_t lo = (sample + std::max<int64_t>(0, off + reads[i].w0)) * int64_t(sizeof(float));
      const int64_t hi = (sample + off + std::min<int64_t>(g.W, reads[i].w0 + 34)) * int64_t(sizeof(float));
      for (int64_t b = lo & ~int64_t(63); b < hi; b += 64) lines.push_back(b);
    }
  std::sort(lines.begin(), lines.end());
  lines.erase(std::unique(lines.begin(), lines.end()), lines.end());
}

// V[p][c - c0][lane] for the block's pieces and the input channels [c0, c0 + cn): channel by channel (the pieces'
// patches overlap), the block's lines of the channel kPrefetch planes ahead prefetched.
T3D_WINO void input_channels(const float* x, const Geo& g, const std::vector<Piece>& pieces,
                             const std::vector<PieceReads>& reads, const std::vector<int64_t>& lines, int64_t c0,
                             int64_t cn, float* V, int64_t vs) {
  const int64_t P = g.T * g.H * g.W;
  for (int64_t c = 0; c < cn; ++c) {
    if (c0 + c + kPrefetch < g.C) {
      const char* ahead = reinterpret_cast<const char*>(x + (c0 + c + kPrefetch) * P);
      for (int64_t l : lines) _mm_prefetch(ahead + l, _MM_HINT_T0);
    }
    for (size_t i = 0; i < pieces.size(); ++i)
      input_piece(x + pieces[i].n * g.sx + (c0 + c) * P, reads[i], V + c * kTB + pieces[i].lane, vs);
  }
}

// M[r][0..32) (+)= sum_c U[c][r] * V[c][0..32) for the tile's MR output channels r (U rows ldu apart, V rows kTB)
template <int MR>
T3D_WINO void gemm_tile(const float* U, int64_t ldu, const float* V, int64_t C, float* M, bool add) {
  __m512 acc[MR][2];
  for (int r = 0; r < MR; ++r) {
    acc[r][0] = add ? _mm512_loadu_ps(M + r * kTB) : _mm512_setzero_ps();
    acc[r][1] = add ? _mm512_loadu_ps(M + r * kTB + 16) : _mm512_setzero_ps();
  }
  for (int64_t c = 0; c < C; ++c) {
    const __m512 v0 = _mm512_loadu_ps(V + c * kTB), v1 = _mm512_loadu_ps(V + c * kTB + 16);
    const float* u = U + c * ldu;
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const __m512 ur = _mm512_set1_ps(u[r]);
      acc[r][0] = _mm512_fmadd_ps(ur, v0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(ur, v1, acc[r][1]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm512_storeu_ps(M + r * kTB, acc[r][0]);
    _mm512_storeu_ps(M + r * kTB + 16, acc[r][1]);
  }
}

template <int... MRs>
T3D_WINO void gemm_rows(int mr, const float* U, int64_t ldu, const float* V, int64_t C, float* M, bool add,
                        std::integer_sequence<int, MRs...>) {
  ((mr == MRs + 1 ? gemm_tile<MRs + 1>(U, ldu, V, C, M, add) : void()), ...);
}

// y of each tile of the block from M[p][k][tile]: A^T m A in each dim, clipped at the far edges
T3D_WINO void output_block(const float* M, int64_t ms, const Geo& g, const int64_t* base, const uint8_t* edge, int nvalid,
                           float* y) {
  const int64_t P = g.T * g.H * g.W, HW = g.H * g.W;
  alignas(64) float out[8][16];
  for (int64_t k = 0; k < g.K; ++k) {
    for (int v = 0; v * 16 < nvalid; ++v) {
      __m512 s[4][4][2];  // [t][h][ow] after the w stage
      for (int it = 0; it < 4; ++it)
        for (int ih = 0; ih < 4; ++ih) {
          const float* m = M + ((it * 4 + ih) * 4) * ms + k * kTB + v * 16;
          const __m512 m0 = _mm512_loadu_ps(m), m1 = _mm512_loadu_ps(m + ms);
          const __m512 m2 = _mm512_loadu_ps(m + 2 * ms), m3 = _mm512_loadu_ps(m + 3 * ms);
          s[it][ih][0] = _mm512_add_ps(_mm512_add_ps(m0, m1), m2);
          s[it][ih][1] = _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3);
        }
      __m512 r[4][2][2];  // [t][oh][ow]
      for (int it = 0; it < 4; ++it)
        for (int ow = 0; ow < 2; ++ow) {
          r[it][0][ow] = _mm512_add_ps(_mm512_add_ps(s[it][0][ow], s[it][1][ow]), s[it][2][ow]);
          r[it][1][ow] = _mm512_sub_ps(_mm512_sub_ps(s[it][1][ow], s[it][2][ow]), s[it][3][ow]);
        }
      for (int oh = 0; oh < 2; ++oh)
        for (int ow = 0; ow < 2; ++ow) {
          _mm512_store_ps(out[oh * 2 + ow], _mm512_add_ps(_mm512_add_ps(r[0][oh][ow], r[1][oh][ow]), r[2][oh][ow]));
          _mm512_store_ps(out[4 + oh * 2 + ow],
                          _mm512_sub_ps(_mm512_sub_ps(r[1][oh][ow], r[2][oh][ow]), r[3][oh][ow]));
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

// ---- weight gradient. With V[p] the input's transform (B^T d B) and Mb[p] = A gy A^T the output transform's adjoint
// applied to each tile's 2x2x2 output gradient, dL/dU[p][c][k] = sum over tiles of V[p][c][tile] Mb[p][k][tile],
// and dL/dw = G^T (dL/dU) G in each dim.

// Mb[p * ms + lane] (16 lanes, masked to the piece's tiles) = A g A^T of output-gradient channel plane gk for each
// tile of the piece; outputs past the far edges read as zero
T3D_WINO void grad_output_piece(const float* gk, const Geo& g, const Piece& pc, __mmask16 lanes, float* Mb,
                                int64_t ms) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  const int64_t w0 = 2 * pc.j0;
  const __mmask16 m0 = window_mask(w0, g.W), m1 = window_mask(w0 + 16, g.W);
  __m512 s[2][2][4];  // [ot][oh][qw] after the w stage: (e, e + o, e - o, -o)
  for (int ot = 0; ot < 2; ++ot)
    for (int oh = 0; oh < 2; ++oh) {
      const int64_t t = 2 * pc.a + ot, h = 2 * pc.b + oh;
      if (t >= g.T || h >= g.H) {
        for (int q = 0; q < 4; ++q) s[ot][oh][q] = _mm512_setzero_ps();
        continue;
      }
      const float* row = gk + (t * g.H + h) * g.W + w0;
      const __m512 A = _mm512_maskz_loadu_ps(m0, row), B = _mm512_maskz_loadu_ps(m1, row + 16);
      const __m512 e = _mm512_permutex2var_ps(A, even, B), o = _mm512_permutex2var_ps(A, odd, B);
      s[ot][oh][0] = e;
      s[ot][oh][1] = _mm512_add_ps(e, o);
      s[ot][oh][2] = _mm512_sub_ps(e, o);
      s[ot][oh][3] = _mm512_sub_ps(_mm512_setzero_ps(), o);
    }
  for (int qw = 0; qw < 4; ++qw) {
    __m512 r[2][4];  // [ot][qh] after the h stage
    for (int ot = 0; ot < 2; ++ot) {
      const __m512 a = s[ot][0][qw], b = s[ot][1][qw];
      r[ot][0] = a;
      r[ot][1] = _mm512_add_ps(a, b);
      r[ot][2] = _mm512_sub_ps(a, b);
      r[ot][3] = _mm512_sub_ps(_mm512_setzero_ps(), b);
    }
    for (int qh = 0; qh < 4; ++qh) {
      const __m512 a = r[0][qh], b = r[1][qh];
      _mm512_mask_storeu_ps(Mb + ((0 * 4 + qh) * 4 + qw) * ms, lanes, a);
      _mm512_mask_storeu_ps(Mb + ((1 * 4 + qh) * 4 + qw) * ms, lanes, _mm512_add_ps(a, b));
      _mm512_mask_storeu_ps(Mb + ((2 * 4 + qh) * 4 + qw) * ms, lanes, _mm512_sub_ps(a, b));
      _mm512_mask_storeu_ps(Mb + ((3 * 4 + qh) * 4 + qw) * ms, lanes, _mm512_sub_ps(_mm512_setzero_ps(), b));
    }
  }
}

// dU[r * kp + (0..16 nv)] += sum over the block's tiles t of V[r * kTB + t] * Mt[t * kp + (0..16 nv)], MR input
// channels r
template <int MR>
T3D_WINO void wgrad_tile(const float* V, const float* Mt, int64_t kp, int nv, float* dU) {
  __m512 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int t = 0; t < kTB; ++t) {
    const __m512 m0 = _mm512_loadu_ps(Mt + t * kp);
    const __m512 m1 = nv > 1 ? _mm512_loadu_ps(Mt + t * kp + 16) : _mm512_setzero_ps();
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const __m512 v = _mm512_set1_ps(V[r * kTB + t]);
      acc[r][0] = _mm512_fmadd_ps(v, m0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(v, m1, acc[r][1]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm512_storeu_ps(dU + r * kp, _mm512_add_ps(_mm512_loadu_ps(dU + r * kp), acc[r][0]));
    if (nv > 1) _mm512_storeu_ps(dU + r * kp + 16, _mm512_add_ps(_mm512_loadu_ps(dU + r * kp + 16), acc[r][1]));
  }
}

template <int... MRs>
T3D_WINO void wgrad_rows(int mr, const float* V, const float* Mt, int64_t kp, int nv, float* dU,
                         std::integer_sequence<int, MRs...>) {
  ((mr == MRs + 1 ? wgrad_tile<MRs + 1>(V, Mt, kp, nv, dU) : void()), ...);
}

// The AVX-512 kernels as the drivers below call them (csrc/cpu/winograd_avx2.h has the AVX2 ones: same operations on
// the valid lanes in the same order, so the same bits)
struct Avx512Kernels {
  static void input_channels(const float* x, const Geo& g, const std::vector<Piece>& pieces,
                             const std::vector<PieceReads>& reads, const std::vector<int64_t>& lines, int64_t c0,
                             int64_t cn, float* V, int64_t vs) {
    t3d::input_channels(x, g, pieces, reads, lines, c0, cn, V, vs);
  }
  // M[p] (+)= U[p][c0 .. c0 + cn]^T V[p] for the 64 points p
  T3D_WINO static void gemm_pass(const float* U, const Geo& g, int64_t c0, int64_t cn, const float* V, int64_t vs,
                                 float* M, int64_t ms) {
    for (int p = 0; p < 64; ++p) {
      const float* Up = U + (p * g.C + c0) * g.K;
      for (int64_t k0 = 0; k0 < g.K; k0 += kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, g.K - k0));
        gemm_rows(mr, Up + k0, g.K, V + p * vs, cn, M + p * ms + k0 * kTB, c0 > 0,
                  std::make_integer_sequence<int, kMR>());
      }
    }
  }
  static void output_block(const float* M, int64_t ms, const Geo& g, const int64_t* base, const uint8_t* edge,
                           int nvalid, float* y) {
    t3d::output_block(M, ms, g, base, edge, nvalid, y);
  }
  // Mb[p][k][lane] for every output-gradient channel k and piece of the block
  T3D_WINO static void grad_output_block(const float* gy, const Geo& g, const std::vector<Piece>& pieces,
                                         const std::vector<PieceReads>& reads, float* Mb, int64_t ms) {
    const int64_t P = g.T * g.H * g.W;
    for (size_t i = 0; i < pieces.size(); ++i) {
      const float* gn = gy + pieces[i].n * g.sy;
      for (int64_t k = 0; k < g.K; ++k)
        grad_output_piece(gn + k * P, g, pieces[i], reads[i].lanes, Mb + k * kTB + pieces[i].lane, ms);
    }
  }
  // Mt[p][tile][k] from Mb[p][k][tile] (kp a multiple of 16)
  T3D_WINO static void transpose_block(const float* Mb, int64_t ms, int64_t kp, float* Mt, int64_t mts) {
    for (int p = 0; p < 64; ++p)
      for (int64_t k0 = 0; k0 < kp; k0 += 16)
        for (int t = 0; t < kTB; t += 16) transpose16(Mb + p * ms + k0 * kTB + t, kTB, Mt + p * mts + t * kp + k0, kp);
  }
  // dU[p][c0 + c][k] += sum over the block's tiles of V[p][c][tile] Mt[p][tile][k], c < cn
  T3D_WINO static void wgrad_pass(const float* V, int64_t vs, const float* Mt, int64_t mts, int64_t kp, int64_t C,
                                  int64_t c0, int64_t cn, float* dU) {
    for (int p = 0; p < 64; ++p)
      for (int64_t c = 0; c < cn; c += kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, cn - c));
        for (int64_t k0 = 0; k0 < kp; k0 += 32) {
          const int nv = static_cast<int>(std::min<int64_t>(2, (kp - k0) / 16));
          wgrad_rows(mr, V + p * vs + c * kTB, Mt + p * mts + k0, kp, nv, dU + (p * C + c0 + c) * kp + k0,
                     std::make_integer_sequence<int, kMR>());
        }
      }
  }
};

#include "cpu/winograd_avx2.h"  // after the shared geometry and the AVX-512 kernels

template <class Kernels>
void winograd_forward(const float* x, const float* U, const Geo& g, float* y) {
  const int64_t nblocks = (g.tiles + kTB - 1) / kTB;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    // one cache line of slack past the last plane: the AVX2 kernels store whole 16-lane windows
    const int64_t vs = plane_stride(std::min<int64_t>(kCC, g.C)), ms = plane_stride(g.K);
    std::vector<float> V(static_cast<size_t>(64 * vs + 16)), M(static_cast<size_t>(64 * ms));
    std::vector<Piece> pieces;
    std::vector<PieceReads> reads;
    std::vector<int64_t> lines;
    int64_t base[kTB];
    uint8_t edge[kTB];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t t0 = blk * kTB, t1 = std::min(g.tiles, t0 + kTB);
      const int nvalid = static_cast<int>(t1 - t0);
      if (nvalid < kTB) std::fill(V.begin(), V.end(), 0.f);  // lanes past the last tile: finite, never written out
      block_pieces(g, t0, t1, pieces);
      for (const Piece& pc : pieces) {
        for (int l = 0; l < pc.len; ++l) {
          const int64_t j = pc.j0 + l;
          base[pc.lane + l] = pc.n * g.sy + (2 * pc.a * g.H + 2 * pc.b) * g.W + 2 * j;
          edge[pc.lane + l] = static_cast<uint8_t>((2 * pc.a + 1 >= g.T) | ((2 * pc.b + 1 >= g.H) << 1) |
                                                   ((2 * j + 1 >= g.W) << 2));
        }
      }
      reads.clear();
      for (const Piece& pc : pieces) reads.push_back(piece_reads(g, pc));
      block_lines(g, pieces, reads, lines);
      for (int64_t c0 = 0; c0 < g.C; c0 += kCC) {
        const int64_t cn = std::min<int64_t>(kCC, g.C - c0);
        Kernels::input_channels(x, g, pieces, reads, lines, c0, cn, V.data(), vs);
        Kernels::gemm_pass(U, g, c0, cn, V.data(), vs, M.data(), ms);
      }
      Kernels::output_block(M.data(), ms, g, base, edge, nvalid, y);
    }
  });
}

// dU[p][c][k] (k padded to kp, a multiple of 16) += the sum over the tile blocks [b0, b1)
template <class Kernels>
void wgrad_blocks(const float* x, const float* gy, const Geo& g, int64_t kp, int64_t b0, int64_t b1, float* dU) {
  const int64_t vs = plane_stride(std::min<int64_t>(kCC, g.C)), ms = plane_stride(kp), mts = kTB * kp + 16;
  // V and Mb: lanes past the last tile and Mb's rows past K stay zero (never written); one cache line of slack past
  // the last plane: the AVX2 kernels store whole 16-lane windows
  std::vector<float> V(static_cast<size_t>(64 * vs + 16), 0.f), Mb(static_cast<size_t>(64 * ms + 16), 0.f),
      Mt(static_cast<size_t>(64 * mts));
  std::vector<Piece> pieces;
  std::vector<PieceReads> reads;
  std::vector<int64_t> lines;
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t t0 = blk * kTB, t1 = std::min(g.tiles, t0 + kTB);
    if (t1 - t0 < kTB) {
      std::fill(V.begin(), V.end(), 0.f);
      std::fill(Mb.begin(), Mb.end(), 0.f);
    }
    block_pieces(g, t0, t1, pieces);
    reads.clear();
    for (const Piece& pc : pieces) reads.push_back(piece_reads(g, pc));
    block_lines(g, pieces, reads, lines);
    Kernels::grad_output_block(gy, g, pieces, reads, Mb.data(), ms);
    Kernels::transpose_block(Mb.data(), ms, kp, Mt.data(), mts);
    for (int64_t c0 = 0; c0 < g.C; c0 += kCC) {
      const int64_t cn = std::min<int64_t>(kCC, g.C - c0);
      Kernels::input_channels(x, g, pieces, reads, lines, c0, cn, V.data(), vs);
      Kernels::wgrad_pass(V.data(), vs, Mt.data(), mts, kp, g.C, c0, cn, dU);
    }
  }
}

// Each sample's (C, T, H, W) contiguous; the samples at any stride (a channel slice of a bigger tensor).
bool samples_contiguous(const at::Tensor& t) {
  const int64_t P = t.size(2) * t.size(3) * t.size(4);
  return t.stride(4) == 1 && t.stride(3) == t.size(4) && t.stride(2) == t.size(3) * t.size(4) && t.stride(1) == P;
}

// Fewer tiles than this, or rows of fewer than kMinRowTiles tiles (a piece fills that many of a vector's 16 lanes):
// oneDNN's direct convolution is faster. Measured, 2 threads, against at::mkldnn_convolution, C -> K (after the
// prefetched input transform). AVX-512 (Xeon VM): 1x16x28x28 (1,568 tiles) 128->32 1.75x, 32->128 3.0x; 2x8x14x14
// (392) 1.18x, 2.3x; 1x8x14x14 (196) 1.04x, 0.84x; 8x4x7x7 (256 tiles, rows of 4) 0.67x. AVX2 (AMD Zen 3 VM, where
// oneDNN's AVX2 convolution runs at 140-200 GFLOP/s, and 41 at 1x8x14x14): 1x16x28x28 1.64x, 5.97x; 2x8x14x14 1.18x,
// 1.39x; 1x8x14x14 4.06x, 2.02x; 4x4x7x7 (128 tiles in rows of 4) 0.86x, 0.99x; 1x4x7x7 1.23x, 0.76x.
int64_t min_tiles() { return cpu_has_avx512_fma() ? 384 : 192; }
constexpr int64_t kMinRowTiles = 7;

// The weight gradient, against ATen's convolution_backward, 2 threads, 128 -> 32. AVX-512: 1x16x28x28 (1,568 tiles)
// 1.44x, batch 4 1.46x; 4x8x14x14 (784) 1.10x; 2x8x14x14 (392) 0.91x: from 768 tiles, and where the forward pays.
// AVX2: 1x16x28x28 3.97x; 1x8x14x14 (196) 3.16x; 8x4x7x7 (256, rows of 4) 2.24x; 4x4x7x7 1.72x; 2x4x7x7 (64) 1.23x;
// 1x4x7x7 (32) 0.77x: from 64 tiles, rows of any length.
int64_t tiles_of(const at::Tensor& x) {
  return x.size(0) * ((x.size(2) + 1) / 2) * ((x.size(3) + 1) / 2) * ((x.size(4) + 1) / 2);
}

}  // namespace

bool winograd_conv3x3x3_applies(const at::Tensor& x, const at::Tensor& w) {
  return (cpu_has_avx512_fma() || cpu_has_avx2_fma()) && x.device().is_cpu() && x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat &&
         x.dim() == 5 && w.dim() == 5 && samples_contiguous(x) && w.size(1) == x.size(1) && w.size(2) == 3 &&
         w.size(3) == 3 && w.size(4) == 3 && x.numel() > 0 && w.size(0) > 0;
}

bool winograd_conv3x3x3_grad_weight_pays(const at::Tensor& x, const at::Tensor& grad_y, const at::Tensor& w) {
  const bool avx512 = cpu_has_avx512_fma();
  return winograd_conv3x3x3_applies(x, w) && (!avx512 || winograd_conv3x3x3_pays(x, w)) && grad_y.dim() == 5 &&
         grad_y.scalar_type() == at::kFloat && grad_y.device().is_cpu() && samples_contiguous(grad_y) &&
         grad_y.size(0) == x.size(0) && grad_y.size(1) == w.size(0) &&
         grad_y.sizes().slice(2).equals(x.sizes().slice(2)) && tiles_of(x) >= (avx512 ? 768 : 64);
}

bool winograd_conv3x3x3_pays(const at::Tensor& x, const at::Tensor& w) {
  return winograd_conv3x3x3_applies(x, w) && tiles_of(x) >= min_tiles() && (x.size(4) + 1) / 2 >= kMinRowTiles;
}

at::Tensor winograd_conv3x3x3(const at::Tensor& x, const at::Tensor& w, at::Tensor out) {
  TORCH_CHECK(winograd_conv3x3x3_applies(x, w),
              "winograd_conv3x3x3: expected a contiguous float32 CPU x (N, C, T, H, W) and a float32 weight (K, C, 3, "
              "3, 3) on an AVX2 or AVX-512 CPU, got x ",
              x.sizes(), " ", x.scalar_type(), " and w ", w.sizes(), " ", w.scalar_type());
  Geo g{};
  g.N = x.size(0), g.C = x.size(1), g.K = w.size(0), g.T = x.size(2), g.H = x.size(3), g.W = x.size(4);
  g.nt = (g.T + 1) / 2, g.nh = (g.H + 1) / 2, g.nw = (g.W + 1) / 2;
  g.tiles = g.N * g.nt * g.nh * g.nw;
  if (out.defined()) {
    TORCH_CHECK(out.scalar_type() == at::kFloat && out.sizes().equals({g.N, g.K, g.T, g.H, g.W}) &&
                    samples_contiguous(out),
                "out: expected a float32 tensor of shape ", at::IntArrayRef({g.N, g.K, g.T, g.H, g.W}),
                " with each sample contiguous, got ", out.sizes(), " strides ", out.strides(), " ",
                out.scalar_type());
  } else {
    out = at::empty({g.N, g.K, g.T, g.H, g.W}, x.options());
  }
  g.sx = x.stride(0), g.sy = out.stride(0);
  const std::vector<float> U = transform_weight(w, g);
  if (cpu_has_avx512_fma())
    winograd_forward<Avx512Kernels>(x.data_ptr<float>(), U.data(), g, out.data_ptr<float>());
  else
    winograd_forward<Avx2Kernels>(x.data_ptr<float>(), U.data(), g, out.data_ptr<float>());
  return out;
}

at::Tensor winograd_conv3x3x3_grad_weight(const at::Tensor& x, const at::Tensor& grad_y) {
  TORCH_CHECK(x.dim() == 5 && grad_y.dim() == 5 && grad_y.size(0) == x.size(0) && grad_y.size(1) > 0 &&
                  grad_y.sizes().slice(2).equals(x.sizes().slice(2)) && grad_y.scalar_type() == at::kFloat &&
                  grad_y.device().is_cpu() && samples_contiguous(grad_y) &&
                  winograd_conv3x3x3_applies(x, at::empty({grad_y.size(1), x.size(1), 3, 3, 3}, x.options())),
              "winograd_conv3x3x3_grad_weight: expected float32 CPU x (N, C, T, H, W) and grad_y (N, K, T, H, W) with "
              "each sample contiguous, on an AVX2 or AVX-512 CPU; got x ",
              x.sizes(), " ", x.scalar_type(), " and grad_y ", grad_y.sizes(), " ", grad_y.scalar_type());
  Geo g{};
  g.N = x.size(0), g.C = x.size(1), g.K = grad_y.size(1), g.T = x.size(2), g.H = x.size(3), g.W = x.size(4);
  g.nt = (g.T + 1) / 2, g.nh = (g.H + 1) / 2, g.nw = (g.W + 1) / 2;
  g.tiles = g.N * g.nt * g.nh * g.nw;
  g.sx = x.stride(0), g.sy = grad_y.stride(0);
  const int64_t kp = (g.K + 15) / 16 * 16, nblocks = (g.tiles + kTB - 1) / kTB;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nblocks));
  const int64_t usize = 64 * g.C * kp;
  std::vector<float> dU(static_cast<size_t>(parts * usize), 0.f);  // one sum per part, added in a fixed order
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part)
      (cpu_has_avx512_fma() ? wgrad_blocks<Avx512Kernels> : wgrad_blocks<Avx2Kernels>)(
          x.data_ptr<float>(), grad_y.data_ptr<float>(), g, kp, nblocks * part / parts, nblocks * (part + 1) / parts,
          dU.data() + part * usize);
  });
  for (int64_t part = 1; part < parts; ++part)
    for (int64_t i = 0; i < usize; ++i) dU[i] += dU[part * usize + i];
  // dL/dw[k][c] = G^T dU[.][c][k] G in each dim
  static const float G[4][3] = {{1, 0, 0}, {0.5f, 0.5f, 0.5f}, {0.5f, -0.5f, 0.5f}, {0, 0, 1}};
  at::Tensor dw = at::empty({g.K, g.C, 3, 3, 3}, x.options());
  float* dwp = dw.data_ptr<float>();
  const float* u = dU.data();
  at::parallel_for(0, g.K * g.C, 64, [&](int64_t begin, int64_t end) {
    for (int64_t kc = begin; kc < end; ++kc) {
      const int64_t k = kc / g.C, c = kc % g.C;
      float a[4][4][4], b1[4][4][3], b2[4][3][3];
      for (int p = 0; p < 64; ++p) a[p / 16][(p / 4) % 4][p % 4] = u[(p * g.C + c) * kp + k];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j)
          for (int d = 0; d < 3; ++d)
            b1[i][j][d] = G[0][d] * a[i][j][0] + G[1][d] * a[i][j][1] + G[2][d] * a[i][j][2] + G[3][d] * a[i][j][3];
      for (int i = 0; i < 4; ++i)
        for (int e = 0; e < 3; ++e)
          for (int d = 0; d < 3; ++d)
            b2[i][e][d] = G[0][e] * b1[i][0][d] + G[1][e] * b1[i][1][d] + G[2][e] * b1[i][2][d] + G[3][e] * b1[i][3][d];
      float* out = dwp + kc * 27;
      for (int f = 0; f < 3; ++f)
        for (int e = 0; e < 3; ++e)
          for (int d = 0; d < 3; ++d)
            out[(f * 3 + e) * 3 + d] =
                G[0][f] * b2[0][e][d] + G[1][f] * b2[1][e][d] + G[2][f] * b2[2][e][d] + G[3][f] * b2[3][e][d];
    }
  });
  return dw;
}

// For the tests: the kernel alone, against ATen's conv3d (t3d_kernels._C._winograd_conv3x3x3)
void init_winograd(pybind11::module& m) {
  m.def("_winograd_applies", &winograd_conv3x3x3_applies, "whether the Winograd 3x3x3 conv takes (x, w) here");
  m.def("_winograd_pays", &winograd_conv3x3x3_pays, "whether the dense block uses it for (x, w)");
  m.def("_winograd_grad_weight_pays", &winograd_conv3x3x3_grad_weight_pays,
        "whether the dense block takes the weight gradient of conv3d(x, w) for grad_y by Winograd");
  m.def(
      "_winograd_conv3x3x3",
      [](const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& out) {
        return winograd_conv3x3x3(x, w, out.value_or(at::Tensor()));
      },
      "conv3d(x, w, padding=1) by Winograd F(2x2x2, 3x3x3), into out when given", pybind11::arg("x"),
      pybind11::arg("w"), pybind11::arg("out") = pybind11::none());
  m.def("_winograd_conv3x3x3_grad_weight", &winograd_conv3x3x3_grad_weight,
        "the weight gradient of conv3d(x, w, padding=1) for grad_y, by Winograd F(2x2x2, 3x3x3)", pybind11::arg("x"),
        pybind11::arg("grad_y"));
}

}  // namespace t3d
