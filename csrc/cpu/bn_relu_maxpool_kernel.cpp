// CPU kernels of t3d::bn_relu_maxpool: y = max_pool3d(relu(batch_norm(x)), kernel, stride, padding), the stem of a
// T3D (norm0 -> relu0 -> pool0). ATen runs three memory-bound passes (BN, ReLU, a max pool that also writes int64
// indices) and saves the BN output, the ReLU output and the indices for backward. Here:
//   forward:  one pass over x: the max pool of sgn(gamma) * x (BN-ReLU is monotone per channel, see VolumePool),
//             separable (W, then H, then T, each keeping the first strict maximum, so the position chosen is the
//             lexicographically first maximum, as ATen's pool chooses) with the batch statistics summed in the same
//             pass; then BN-ReLU on the 4-8x smaller pooled volume while it is still in cache. Saves x, y and int32
//             indices of the maxima (ATen saves the BN output, the ReLU output and int64 indices: 2 + 2 + 0.5 times
//             x's size).
//   backward: one pass over x and grad_x per channel: the BN backward sums sum(g) and sum(g * xhat) over the maxima
//             ReLU lets through come from the pooled tensors (g, y, indices) and a gather of x at the maxima, which
//             leaves the channel's x in cache; then grad_x = alpha + beta * x is written once (the batch statistics'
//             share), and the pooled gradient scale * g is scattered onto it through the indices (serially per
//             volume: deterministic, no atomics).
// float32 on a CPU with AVX-512F runs vector kernels (a target attribute: the extension stays baseline x86-64); the
// templates below are the generic path (float64, other CPUs) and the specification of the vector ones.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

// -DT3D_NO_AVX512 builds the generic path only (to test it on a machine with AVX-512)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(T3D_NO_AVX512)
#include <immintrin.h>
#define T3D_POOL_AVX512 1
#endif

#include "bn_relu_maxpool.h"
#include "common/cpu_features.h"
#include "common/dispatch.h"
#include "common/huge_pages.h"
#include "common/ttl_math.h"

namespace t3d {
namespace {

struct PoolGeometry {
  int64_t T, H, W, To, Ho, Wo;
  int64_t k[3], s[3], p[3];
};

PoolGeometry make_pool_geometry(const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride,
                                at::IntArrayRef padding) {
  PoolGeometry g;
  g.T = x.size(2), g.H = x.size(3), g.W = x.size(4);
  const int64_t in[3] = {g.T, g.H, g.W};
  int64_t out[3];
  for (int d = 0; d < 3; ++d) {
    g.k[d] = kernel[d], g.s[d] = stride[d], g.p[d] = padding[d];
    out[d] = (in[d] + 2 * g.p[d] - g.k[d]) / g.s[d] + 1;
    TORCH_CHECK(out[d] >= 1, "x: input size ", in[d], " in dim ", d + 2, " is too small for kernel ", g.k[d],
                " with padding ", g.p[d]);
  }
  g.To = out[0], g.Ho = out[1], g.Wo = out[2];
  return g;
}

// window [lo, hi) of output index o along one dim, clipped to the input
inline void window(int64_t o, int64_t k, int64_t s, int64_t p, int64_t n, int64_t& lo, int64_t& hi) {
  lo = std::max<int64_t>(o * s - p, 0);
  hi = std::min<int64_t>(o * s - p + k, n);
}

// ---------------------------------------------------------------------------------------------------------------
// Primitives of the passes: generic templates (the specification), and AVX-512 float32 versions where x86 allows.
// ---------------------------------------------------------------------------------------------------------------

// ov, oi <- iv, off + ii (the first row of a window)
template <typename T>
void copy_with_offset(const T* iv, const int32_t* ii, int32_t off, T* ov, int32_t* oi, int64_t n) {
  for (int64_t q = 0; q < n; ++q) ov[q] = iv[q], oi[q] = off + ii[q];
}

// where iv > ov (strictly: the first maximum stays): ov, oi <- iv, off + ii
template <typename T>
void select_max(const T* iv, const int32_t* ii, int32_t off, T* ov, int32_t* oi, int64_t n) {
  for (int64_t q = 0; q < n; ++q) {
    const bool gt = iv[q] > ov[q];
    ov[q] = gt ? iv[q] : ov[q];
    oi[q] = gt ? off + ii[q] : oi[q];
  }
}

template <typename T>
void max_into(const T* iv, T* ov, int64_t n) {
  for (int64_t q = 0; q < n; ++q) ov[q] = std::max(ov[q], iv[q]);
}

// o <- relu(scale * (sgn * o) + shift): BN-ReLU of the pooled sgn * x
template <typename T>
void bn_relu_pooled(T* o, int64_t n, T sgn, T scale, T shift) {
  for (int64_t q = 0; q < n; ++q) o[q] = bn_relu(sgn * o[q], scale, shift);
}

// over the maxima that ReLU lets through (y > 0): sg += sum g, sgx += sum g * (x[idx] - mean)
template <typename T>
void maxima_sums(const T* x, const T* y, const T* g, const int32_t* idx, int64_t n, double mean, double& sg,
                 double& sgx) {
  double s1 = 0, s2 = 0;
  for (int64_t q = 0; q < n; ++q)
    if (y[q] > T(0)) {
      s1 += double(g[q]);
      s2 += double(g[q]) * (double(x[idx[q]]) - mean);
    }
  sg += s1, sgx += s2;
}

// out <- a + b * (x - m): the batch statistics' share of BN's input gradient (centered: no cancellation)
template <typename T>
void bn_affine(const T* x, T* out, int64_t n, T a, T b, T m) {
  for (int64_t p = 0; p < n; ++p) out[p] = a + b * (x[p] - m);
}

// out[idx] += scale * g where y > 0, in order (deterministic; windows overlap, so an index may repeat); branch-free
// (ReLU passes about half of the maxima: a branch would be mispredicted half the time)
template <typename T>
void scatter_maxima(T* out, const T* y, const T* g, const int32_t* idx, int64_t n, T scale) {
  for (int64_t q = 0; q < n; ++q) out[idx[q]] += y[q] > T(0) ? scale * g[q] : T(0);
}

#ifdef T3D_POOL_AVX512
#define T3D_AVX512F __attribute__((target("avx512f")))
// GCC 12's avx512fintrin.h trips its own -W(maybe-)uninitialized on the _mm512_undefined_* operands of its intrinsics
// (GCC bug 105593): a false positive of the header, silenced here only
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

inline bool use_avx512() { return cpu_has_avx512_fma(); }

T3D_AVX512F inline __mmask16 first_lanes(int64_t k) {  // lanes [0, k) of 16, k clamped to [0, 16]
  return __mmask16((1u << std::clamp<int64_t>(k, 0, 16)) - 1u);
}

// the float's 16 lanes as two vectors of 8 doubles
T3D_AVX512F inline __m512d low_pd(__m512 v) { return _mm512_cvtps_pd(_mm512_castps512_ps256(v)); }
T3D_AVX512F inline __m512d high_pd(__m512 v) {
  return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

T3D_AVX512F void copy_with_offset_avx512(const float* iv, const int32_t* ii, int32_t off, float* ov, int32_t* oi,
                                         int64_t n) {
  const __m512i voff = _mm512_set1_epi32(off);
  for (int64_t q = 0; q < n; q += 16) {
    const __mmask16 m = first_lanes(n - q);
    _mm512_mask_storeu_ps(ov + q, m, _mm512_maskz_loadu_ps(m, iv + q));
    _mm512_mask_storeu_epi32(oi + q, m, _mm512_add_epi32(_mm512_maskz_loadu_epi32(m, ii + q), voff));
  }
}

T3D_AVX512F void select_max_avx512(const float* iv, const int32_t* ii, int32_t off, float* ov, int32_t* oi,
                                   int64_t n) {
  const __m512i voff = _mm512_set1_epi32(off);
  for (int64_t q = 0; q < n; q += 16) {
    const __mmask16 m = first_lanes(n - q);
    const __m512 a = _mm512_maskz_loadu_ps(m, iv + q);
    const __mmask16 gt = _mm512_mask_cmp_ps_mask(m, a, _mm512_maskz_loadu_ps(m, ov + q), _CMP_GT_OQ);
    _mm512_mask_storeu_ps(ov + q, gt, a);
    _mm512_mask_storeu_epi32(oi + q, gt, _mm512_add_epi32(_mm512_maskz_loadu_epi32(gt, ii + q), voff));
  }
}

T3D_AVX512F void max_into_avx512(const float* iv, float* ov, int64_t n) {
  for (int64_t q = 0; q < n; q += 16) {
    const __mmask16 m = first_lanes(n - q);
    _mm512_mask_storeu_ps(ov + q, m, _mm512_max_ps(_mm512_maskz_loadu_ps(m, ov + q), _mm512_maskz_loadu_ps(m, iv + q)));
  }
}

T3D_AVX512F void bn_relu_pooled_avx512(float* o, int64_t n, float sgn, float scale, float shift) {
  const __m512 vg = _mm512_set1_ps(sgn), vs = _mm512_set1_ps(scale), vt = _mm512_set1_ps(shift);
  for (int64_t q = 0; q < n; q += 16) {
    const __mmask16 m = first_lanes(n - q);
    const __m512 v = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(vg, _mm512_maskz_loadu_ps(m, o + q)), vs), vt);
    _mm512_mask_storeu_ps(o + q, m, _mm512_max_ps(v, _mm512_setzero_ps()));
  }
}

T3D_AVX512F void maxima_sums_avx512(const float* x, const float* y, const float* g, const int32_t* idx, int64_t n,
                                    double mean, double& sg, double& sgx) {
  const __m512d vm = _mm512_set1_pd(mean);
  __m512d g0 = _mm512_setzero_pd(), g1 = g0, x0 = g0, x1 = g0;
  for (int64_t q = 0; q < n; q += 16) {
    const __mmask16 m = first_lanes(n - q);
    const __mmask16 on = _mm512_mask_cmp_ps_mask(m, _mm512_maskz_loadu_ps(m, y + q), _mm512_setzero_ps(), _CMP_GT_OQ);
    const __m512 gv = _mm512_maskz_loadu_ps(on, g + q);
    const __m512 xv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), on, _mm512_maskz_loadu_epi32(on, idx + q), x, 4);
    const __m512d ga = low_pd(gv), gb = high_pd(gv);  // lanes off: g = 0, so they add nothing below
    g0 = _mm512_add_pd(g0, ga), g1 = _mm512_add_pd(g1, gb);
    x0 = _mm512_fmadd_pd(ga, _mm512_sub_pd(low_pd(xv), vm), x0);
    x1 = _mm512_fmadd_pd(gb, _mm512_sub_pd(high_pd(xv), vm), x1);
  }
  sg += _mm512_reduce_add_pd(_mm512_add_pd(g0, g1));
  sgx += _mm512_reduce_add_pd(_mm512_add_pd(x0, x1));
}

T3D_AVX512F void bn_affine_avx512(const float* x, float* out, int64_t n, float a, float b, float m) {
  const __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b), vm = _mm512_set1_ps(m);
  for (int64_t p = 0; p < n; p += 16) {
    const __mmask16 k = first_lanes(n - p);
    const __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + p), vm);
    _mm512_mask_storeu_ps(out + p, k, _mm512_fmadd_ps(vb, d, va));
  }
}

// The stem's W pass (kernel 3, stride 2, padding 1) over `rows` rows of W samples, 16 outputs per step: the raw
// samples [2 wo0, 2 wo0 + 32) are split into even and odd ones, and out[wo] = first max of (odd[wo - 1], even[wo],
// odd[wo]) (samples outside the row are -inf, so never chosen). Adds sum(x - ref), sum((x - ref)^2) of every sample
// to *sum, *sumsq if given (double lanes: the scalar path's sums in another order).
T3D_AVX512F void w_pass_stem_avx512(const float* x, int64_t rows, int64_t W, int64_t Wo, float sgn, float* wv,
                                    int32_t* wi, double* sum, double* sumsq, double ref) {
  const __m512i even_of = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd_of = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i one = _mm512_set1_epi32(1);
  const __m512 none = _mm512_set1_ps(-INFINITY), vsgn = _mm512_set1_ps(sgn);
  const __m512d vref = _mm512_set1_pd(ref);
  __m512d s1 = _mm512_setzero_pd(), s2 = s1;
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * W;
    float* ov = wv + r * Wo;
    int32_t* oi = wi + r * Wo;
    __m512 prev_odd = none;
    for (int64_t wo0 = 0; wo0 < Wo; wo0 += 16) {
      const int64_t avail = W - 2 * wo0;  // samples of the row from this step's first one on (>= 1)
      const __mmask16 m_lo = first_lanes(avail), m_hi = first_lanes(avail - 16);
      const __m512 lo = _mm512_maskz_loadu_ps(m_lo, row + 2 * wo0);
      const __m512 hi = _mm512_maskz_loadu_ps(m_hi, row + 2 * wo0 + 16);
      if (sum) {  // every sample of the row is in exactly one step's [lo, hi)
        const __m512d d0 = _mm512_maskz_sub_pd(__mmask8(m_lo), low_pd(lo), vref);
        const __m512d d1 = _mm512_maskz_sub_pd(__mmask8(m_lo >> 8), high_pd(lo), vref);
        const __m512d d2 = _mm512_maskz_sub_pd(__mmask8(m_hi), low_pd(hi), vref);
        const __m512d d3 = _mm512_maskz_sub_pd(__mmask8(m_hi >> 8), high_pd(hi), vref);
        s1 = _mm512_add_pd(s1, _mm512_add_pd(_mm512_add_pd(d0, d1), _mm512_add_pd(d2, d3)));
        s2 = _mm512_fmadd_pd(d0, d0, _mm512_fmadd_pd(d1, d1, _mm512_fmadd_pd(d2, d2, _mm512_fmadd_pd(d3, d3, s2))));
      }
      const __m512 a = _mm512_mul_ps(vsgn, lo), b = _mm512_mul_ps(vsgn, hi);
      const __m512 even = _mm512_mask_mov_ps(none, first_lanes((avail + 1) / 2), _mm512_permutex2var_ps(a, even_of, b));
      const __m512 odd = _mm512_mask_mov_ps(none, first_lanes(avail / 2), _mm512_permutex2var_ps(a, odd_of, b));
      // odd[wo - 1]: the previous step's last odd sample, then this step's odd samples shifted by one lane
      const __m512 before = _mm512_castsi512_ps(
          _mm512_alignr_epi32(_mm512_castps_si512(odd), _mm512_castps_si512(prev_odd), 15));
      prev_odd = odd;
      const __m512i at_even = _mm512_slli_epi32(_mm512_add_epi32(_mm512_set1_epi32(int32_t(wo0)), lane), 1);
      __m512 best = before;
      __m512i bi = _mm512_sub_epi32(at_even, one);
      const __mmask16 g1 = _mm512_cmp_ps_mask(even, best, _CMP_GT_OQ);
      best = _mm512_mask_mov_ps(best, g1, even);
      bi = _mm512_mask_mov_epi32(bi, g1, at_even);
      const __mmask16 g2 = _mm512_cmp_ps_mask(odd, best, _CMP_GT_OQ);
      best = _mm512_mask_mov_ps(best, g2, odd);
      bi = _mm512_mask_mov_epi32(bi, g2, _mm512_add_epi32(at_even, one));
      const __mmask16 out = first_lanes(Wo - wo0);
      _mm512_mask_storeu_ps(ov + wo0, out, best);
      _mm512_mask_storeu_epi32(oi + wo0, out, bi);
    }
  }
  if (sum) *sum += _mm512_reduce_add_pd(s1), *sumsq += _mm512_reduce_add_pd(s2);
}

#undef T3D_AVX512F
#pragma GCC diagnostic pop
#else
inline bool use_avx512() { return false; }
#endif

// float32 with AVX-512 -> the vector kernel, else the template; `name` is the primitive's generic name
#ifdef T3D_POOL_AVX512
#define T3D_VECTOR_OR_GENERIC(name, ...)                                                        \
  do {                                                                                          \
    if constexpr (std::is_same_v<T, float>) {                                                   \
      if (use_avx512()) return name##_avx512(__VA_ARGS__);                                      \
    }                                                                                           \
    return name<T>(__VA_ARGS__);                                                                \
  } while (0)
#else
#define T3D_VECTOR_OR_GENERIC(name, ...) return name<T>(__VA_ARGS__)
#endif

template <typename T>
void copy_with_offset_any(const T* iv, const int32_t* ii, int32_t off, T* ov, int32_t* oi, int64_t n) {
  T3D_VECTOR_OR_GENERIC(copy_with_offset, iv, ii, off, ov, oi, n);
}
template <typename T>
void select_max_any(const T* iv, const int32_t* ii, int32_t off, T* ov, int32_t* oi, int64_t n) {
  T3D_VECTOR_OR_GENERIC(select_max, iv, ii, off, ov, oi, n);
}
template <typename T>
void max_into_any(const T* iv, T* ov, int64_t n) {
  T3D_VECTOR_OR_GENERIC(max_into, iv, ov, n);
}
template <typename T>
void bn_relu_pooled_any(T* o, int64_t n, T sgn, T scale, T shift) {
  T3D_VECTOR_OR_GENERIC(bn_relu_pooled, o, n, sgn, scale, shift);
}
template <typename T>
void maxima_sums_any(const T* x, const T* y, const T* g, const int32_t* idx, int64_t n, double mean, double& sg,
                     double& sgx) {
  T3D_VECTOR_OR_GENERIC(maxima_sums, x, y, g, idx, n, mean, sg, sgx);
}
template <typename T>
void bn_affine_any(const T* x, T* out, int64_t n, T a, T b, T m) {
  T3D_VECTOR_OR_GENERIC(bn_affine, x, out, n, a, b, m);
}
#undef T3D_VECTOR_OR_GENERIC

// Max pool of v = sgn * x over one (T, H, W) volume, sgn in {1, -1, 0} per channel. BN-ReLU is monotone per
// channel (increasing where gamma > 0, decreasing where gamma < 0, constant where gamma = 0), so the maximum of
// relu(bn(x)) over a window sits where the maximum of sgn * x does (ties: the first, as ATen's pool picks; windows
// where ReLU clips everything to 0 get no gradient, whichever position is chosen). Pooling x itself needs no
// statistics, so one pass over x also sums it for the batch statistics, and BN-ReLU is applied afterwards to the
// smaller pooled volume. Writes the pooled sgn * x (To, Ho, Wo) and, if idx is given, the flat input index of
// each maximum; adds sum(x - ref) and sum((x - ref)^2) to *sum / *sumsq if given.
template <typename T>
struct VolumePool {
  const PoolGeometry& g;
  std::vector<T> vrow, even, odd, wv, hv;
  std::vector<int32_t> wi, hi_;

  explicit VolumePool(const PoolGeometry& geo)
      : g(geo),
        vrow(geo.W),
        even((geo.W + 1) / 2),
        odd(geo.W / 2 + 1),
        wv(geo.T * geo.H * geo.Wo),
        hv(geo.T * geo.Ho * geo.Wo),
        wi(wv.size()),
        hi_(hv.size()) {}

  // The stem's W window (kernel 3, stride 2, padding 1) without branches: over the even and odd samples of the row,
  // out[wo] = first max of (odd[wo-1], even[wo], odd[wo]) (w_pass_stem_avx512 is the same, 16 outputs at a time).
  void w_pass_k3s2p1(const T* __restrict row, T sgn, T* __restrict ov, int32_t* __restrict oi) {
    const int64_t W = g.W, Wo = g.Wo, ne = (W + 1) / 2, no = W / 2;
    T* __restrict ev = even.data();
    T* __restrict od = odd.data();
    for (int64_t j = 0; j < no; ++j) ev[j] = sgn * row[2 * j], od[j] = sgn * row[2 * j + 1];
    if (ne > no) ev[ne - 1] = sgn * row[W - 1];
    // wo = 0: window (even[0], odd[0])
    {
      T best = ev[0];
      int32_t bi = 0;
      if (no > 0 && od[0] > best) best = od[0], bi = 1;
      ov[0] = best, oi[0] = bi;
    }
    const int64_t full = std::min(Wo, no);  // wo with all three samples inside the row
    for (int64_t wo = 1; wo < full; ++wo) {
      T best = od[wo - 1];
      int32_t bi = int32_t(2 * wo - 1);
      const bool g1 = ev[wo] > best;
      best = g1 ? ev[wo] : best;
      bi = g1 ? int32_t(2 * wo) : bi;
      const bool g2 = od[wo] > best;
      best = g2 ? od[wo] : best;
      bi = g2 ? int32_t(2 * wo + 1) : bi;
      ov[wo] = best, oi[wo] = bi;
    }
    for (int64_t wo = std::max<int64_t>(full, 1); wo < Wo; ++wo) {  // the last window, cut by the row's end
      T best = od[wo - 1];
      int32_t bi = int32_t(2 * wo - 1);
      if (ev[wo] > best) best = ev[wo], bi = int32_t(2 * wo);
      ov[wo] = best, oi[wo] = bi;
    }
  }

  // W pass of every row (and the statistics)
  void w_pass(const T* x, T sgn, double* sum, double* sumsq, double ref) {
    const int64_t HW = g.H * g.W;
    const bool stem_w = g.k[2] == 3 && g.s[2] == 2 && g.p[2] == 1 && g.W >= 2;
#ifdef T3D_POOL_AVX512
    if constexpr (std::is_same_v<T, float>) {
      if (stem_w && use_avx512())
        return w_pass_stem_avx512(x, g.T * g.H, g.W, g.Wo, sgn, wv.data(), wi.data(), sum, sumsq, ref);
    }
#endif
    double s1 = 0, s2 = 0;
    for (int64_t t = 0; t < g.T; ++t)
      for (int64_t h = 0; h < g.H; ++h) {
        const T* row = x + t * HW + h * g.W;
        if (sum) {
          double r1 = 0, r2 = 0;
          for (int64_t w = 0; w < g.W; ++w) {
            const double d = double(row[w]) - ref;
            r1 += d, r2 += d * d;
          }
          s1 += r1, s2 += r2;
        }
        T* ov = wv.data() + (t * g.H + h) * g.Wo;
        int32_t* oi = wi.data() + (t * g.H + h) * g.Wo;
        if (stem_w) {
          w_pass_k3s2p1(row, sgn, ov, oi);
          continue;
        }
        for (int64_t w = 0; w < g.W; ++w) vrow[w] = sgn * row[w];
        for (int64_t wo = 0; wo < g.Wo; ++wo) {
          int64_t lo, hi;
          window(wo, g.k[2], g.s[2], g.p[2], g.W, lo, hi);
          T best = vrow[lo];
          int64_t bi = lo;
          for (int64_t w = lo + 1; w < hi; ++w)
            if (vrow[w] > best) best = vrow[w], bi = w;
          ov[wo] = best, oi[wo] = int32_t(bi);
        }
      }
    if (sum) *sum += s1, *sumsq += s2;
  }

  void run(const T* x, T sgn, T* out, int32_t* idx, double* sum = nullptr, double* sumsq = nullptr, double ref = 0) {
    const int64_t HW = g.H * g.W;
    w_pass(x, sgn, sum, sumsq, ref);
    // H pass: rows of Wo, the first row of each window copied, the others compared
    for (int64_t t = 0; t < g.T; ++t)
      for (int64_t ho = 0; ho < g.Ho; ++ho) {
        int64_t lo, hi;
        window(ho, g.k[1], g.s[1], g.p[1], g.H, lo, hi);
        T* ov = hv.data() + (t * g.Ho + ho) * g.Wo;
        int32_t* oi = hi_.data() + (t * g.Ho + ho) * g.Wo;
        for (int64_t h = lo; h < hi; ++h) {
          const T* iv = wv.data() + (t * g.H + h) * g.Wo;
          const int32_t* ii = wi.data() + (t * g.H + h) * g.Wo;
          if (h == lo)
            copy_with_offset_any(iv, ii, int32_t(h * g.W), ov, oi, g.Wo);
          else
            select_max_any(iv, ii, int32_t(h * g.W), ov, oi, g.Wo);
        }
      }
    // T pass: planes of Ho * Wo, likewise
    const int64_t plane = g.Ho * g.Wo;
    for (int64_t to = 0; to < g.To; ++to) {
      int64_t lo, hi;
      window(to, g.k[0], g.s[0], g.p[0], g.T, lo, hi);
      T* oy = out + to * plane;
      for (int64_t t = lo; t < hi; ++t) {
        const T* iv = hv.data() + t * plane;
        if (idx) {
          int32_t* oi = idx + to * plane;
          const int32_t* ii = hi_.data() + t * plane;
          if (t == lo)
            copy_with_offset_any(iv, ii, int32_t(t * HW), oy, oi, plane);
          else
            select_max_any(iv, ii, int32_t(t * HW), oy, oi, plane);
        } else if (t == lo) {
          std::copy(iv, iv + plane, oy);
        } else {
          max_into_any(iv, oy, plane);
        }
      }
    }
  }
};

void check_inputs(const at::Tensor& x, const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& mean,
                  const at::Tensor& var, at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding) {
  TORCH_CHECK(x.dim() == 5, "x: expected a 5-D tensor (N, C, T, H, W), got shape ", x.sizes());
  TORCH_CHECK(x.numel() > 0, "x: expected no empty dimension, got shape ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "x: the cpu backend of bn_relu_maxpool expects a CPU tensor, got ", x.device());
  TORCH_CHECK(x.size(2) * x.size(3) * x.size(4) < (int64_t(1) << 31),
              "x: expected fewer than 2^31 positions per (sample, channel), got shape ", x.sizes());
  const char* names[4] = {"bn_weight", "bn_bias", "mean", "var"};
  const at::Tensor* params[4] = {&bn_weight, &bn_bias, &mean, &var};
  for (int i = 0; i < 4; ++i) {
    const at::Tensor& p = *params[i];
    TORCH_CHECK(p.dim() == 1 && p.size(0) == x.size(1), names[i], ": expected shape (", x.size(1), ",), got ",
                p.sizes());
    TORCH_CHECK(p.scalar_type() == x.scalar_type(), names[i], ": expected dtype ", x.scalar_type(), ", got ",
                p.scalar_type());
    TORCH_CHECK(p.device() == x.device(), names[i], ": expected a tensor on ", x.device(), ", got ", p.device());
  }
  TORCH_CHECK(kernel.size() == 3 && stride.size() == 3 && padding.size() == 3,
              "kernel_size, stride, padding: expected 3 values each, got ", kernel, ", ", stride, ", ", padding);
  for (int d = 0; d < 3; ++d) {
    TORCH_CHECK(kernel[d] >= 1 && stride[d] >= 1, "kernel_size, stride: expected values >= 1, got ", kernel, ", ",
                stride);
    TORCH_CHECK(padding[d] >= 0 && 2 * padding[d] <= kernel[d], "padding: expected 0 <= padding <= kernel_size / 2, got ",
                padding, " for kernel_size ", kernel);
  }
}

// scale, shift, invstd of one channel (invstd from the variance in double, as the composite backend does)
template <typename T>
void fold_channel(T gamma, T beta, T mean, T var, double eps, T& scale, T& shift, T& invstd) {
  invstd = T(1.0 / std::sqrt(double(var) + eps));
  fold_bn(gamma, beta, mean, invstd, scale, shift);
}

template <typename T>
T sign_of(T v) {
  return v > 0 ? T(1) : (v < 0 ? T(-1) : T(0));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_maxpool_forward_cpu(
    const at::Tensor& x_in, const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& running_mean,
    const at::Tensor& running_var, at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
    bool training, double eps, bool save_indices) {
  check_inputs(x_in, bn_weight, bn_bias, running_mean, running_var, kernel, stride, padding);
  const at::Tensor x = x_in.contiguous();
  const PoolGeometry g = make_pool_geometry(x, kernel, stride, padding);
  const int64_t N = x.size(0), C = x.size(1);
  TORCH_CHECK(!training || N * g.T * g.H * g.W > 1, "x: expected more than 1 value per channel when training, got ",
              "shape ", x.sizes());
  auto y = empty_huge({N, C, g.To, g.Ho, g.Wo}, x.options());
  auto idx = save_indices ? empty_huge({N, C, g.To, g.Ho, g.Wo}, x.options().dtype(at::kInt))
                          : at::empty({0}, x.options().dtype(at::kInt));
  at::Tensor mean = training ? at::empty({C}, x.options()) : running_mean.clone();
  at::Tensor var = training ? at::empty({C}, x.options()) : running_var.clone();
  T3D_DISPATCH_FP32_FP64(x, "x", "bn_relu_maxpool_forward_cpu", [&] {
    const auto gamma = bn_weight.contiguous(), beta = bn_bias.contiguous();
    const scalar_t* gp = gamma.data_ptr<scalar_t>();
    const scalar_t* bp = beta.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* mp = mean.data_ptr<scalar_t>();
    scalar_t* vp = var.data_ptr<scalar_t>();
    int32_t* ip = save_indices ? idx.data_ptr<int32_t>() : nullptr;
    const int64_t vin = g.T * g.H * g.W, vout = g.To * g.Ho * g.Wo;
    if (training) {
      // channels in parallel, samples in order: the pool and the channel's statistics in one pass over x, then
      // BN-ReLU of the channel's pooled volumes (still in cache)
      at::parallel_for(0, C, 1, [&](int64_t cb, int64_t ce) {
        VolumePool<scalar_t> pool(g);
        for (int64_t c = cb; c < ce; ++c) {
          const scalar_t sg = sign_of(gp[c]);
          double s1 = 0, s2 = 0;
          const double ref = double(xp[c * vin]);  // sums around a sample value: no cancellation when |mean| >> std
          for (int64_t n = 0; n < N; ++n) {
            const int64_t i = n * C + c;
            pool.run(xp + i * vin, sg, yp + i * vout, ip ? ip + i * vout : nullptr, &s1, &s2, ref);
          }
          const double count = double(N * vin), m = s1 / count;
          mp[c] = scalar_t(ref + m);
          vp[c] = scalar_t(std::max(s2 / count - m * m, 0.0));
          scalar_t scale, shift, invstd;
          fold_channel(gp[c], bp[c], mp[c], vp[c], eps, scale, shift, invstd);
          for (int64_t n = 0; n < N; ++n) bn_relu_pooled_any(yp + (n * C + c) * vout, vout, sg, scale, shift);
        }
      });
    } else {
      const scalar_t* rm = mean.data_ptr<scalar_t>();
      const scalar_t* rv = var.data_ptr<scalar_t>();
      at::parallel_for(0, N * C, 1, [&](int64_t b, int64_t e) {
        VolumePool<scalar_t> pool(g);
        for (int64_t i = b; i < e; ++i) {
          const int64_t c = i % C;
          const scalar_t sg = sign_of(gp[c]);
          pool.run(xp + i * vin, sg, yp + i * vout, ip ? ip + i * vout : nullptr);
          scalar_t scale, shift, invstd;
          fold_channel(gp[c], bp[c], rm[c], rv[c], eps, scale, shift, invstd);
          bn_relu_pooled_any(yp + i * vout, vout, sg, scale, shift);
        }
      });
    }
  });
  return {y, mean, var, idx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_maxpool_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    const at::Tensor& mean, const at::Tensor& var, const at::Tensor& y_in, const at::Tensor& indices_in,
    at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding, bool training, double eps) {
  check_inputs(x_in, bn_weight, bn_bias, mean, var, kernel, stride, padding);
  const at::Tensor x = x_in.contiguous();
  const PoolGeometry g = make_pool_geometry(x, kernel, stride, padding);
  const int64_t N = x.size(0), C = x.size(1);
  const std::vector<int64_t> out_shape = {N, C, g.To, g.Ho, g.Wo};
  TORCH_CHECK(grad_y_in.sizes() == at::IntArrayRef(out_shape), "grad_y: expected shape ", out_shape, ", got ",
              grad_y_in.sizes());
  TORCH_CHECK(grad_y_in.scalar_type() == x.scalar_type(), "grad_y: expected dtype ", x.scalar_type(), ", got ",
              grad_y_in.scalar_type());
  TORCH_CHECK(y_in.sizes() == at::IntArrayRef(out_shape) && y_in.scalar_type() == x.scalar_type(),
              "y: expected the forward output (", out_shape, ", ", x.scalar_type(), "), got ", y_in.sizes(), " ",
              y_in.scalar_type());
  TORCH_CHECK(indices_in.sizes() == at::IntArrayRef(out_shape) && indices_in.scalar_type() == at::kInt,
              "indices: expected the int32 indices the forward saved (shape ", out_shape, "), got ",
              indices_in.sizes(), " ", indices_in.scalar_type());
  const at::Tensor grad_y = grad_y_in.contiguous(), y = y_in.contiguous(), indices = indices_in.contiguous();
  // advised for huge pages: at the stem of T3D-121 at batch 4 grad_x is 51 MB, fresh on every call (glibc maps
  // blocks that big afresh), and its 12.5k 4 KB page faults cost more than the whole pass
  auto grad_x = empty_huge(x.sizes(), x.options());
  auto grad_w = at::empty({C}, x.options()), grad_b = at::empty({C}, x.options());
  T3D_DISPATCH_FP32_FP64(x, "x", "bn_relu_maxpool_backward_cpu", [&] {
    const auto gamma = bn_weight.contiguous(), beta = bn_bias.contiguous(), mean_c = mean.contiguous(),
               var_c = var.contiguous();
    const scalar_t* gam = gamma.data_ptr<scalar_t>();
    const scalar_t* bet = beta.data_ptr<scalar_t>();
    const scalar_t* mp = mean_c.data_ptr<scalar_t>();
    const scalar_t* vp = var_c.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* gyp = grad_y.data_ptr<scalar_t>();
    const int32_t* ip = indices.data_ptr<int32_t>();
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    scalar_t* gwp = grad_w.data_ptr<scalar_t>();
    scalar_t* gbp = grad_b.data_ptr<scalar_t>();
    const int64_t vin = g.T * g.H * g.W, vout = g.To * g.Ho * g.Wo;
    const double count = double(N * vin);
    // channels in parallel, samples in order (deterministic): the channel's sums over its maxima (the gather of x
    // brings its volumes into cache), then its grad_x written once and the pooled gradient scattered onto it
    at::parallel_for(0, C, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        scalar_t scale, shift, invstd;
        fold_channel(gam[c], bet[c], mp[c], vp[c], eps, scale, shift, invstd);
        double sg = 0, sgx = 0;
        for (int64_t n = 0; n < N; ++n) {
          const int64_t i = n * C + c;
          maxima_sums_any(xp + i * vin, yp + i * vout, gyp + i * vout, ip + i * vout, vout, double(mp[c]), sg, sgx);
        }
        sgx *= double(invstd);
        gwp[c] = scalar_t(sgx), gbp[c] = scalar_t(sg);
        // training: dL/dx = scale * (gz - mean(gz) - xhat * mean(gz * xhat)), gz the scattered pooled gradient
        const scalar_t a = scalar_t(-double(scale) * sg / count);
        const scalar_t b = scalar_t(-double(scale) * double(invstd) * sgx / count);
        for (int64_t n = 0; n < N; ++n) {
          const int64_t i = n * C + c;
          scalar_t* out = gxp + i * vin;
          if (training)
            bn_affine_any(xp + i * vin, out, vin, a, b, mp[c]);
          else
            std::fill(out, out + vin, scalar_t(0));
          scatter_maxima(out, yp + i * vout, gyp + i * vout, ip + i * vout, vout, scale);
        }
      }
    });
  });
  return {grad_x, grad_w, grad_b};
}

}  // namespace t3d
