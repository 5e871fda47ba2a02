// CPU kernels of the fused dense block (docs/design.md "Dense block"; the math is in common/dense_block_math.h).
//
// Forward, per layer i (C_i input channels, B = bn_size*k bottleneck channels, k new channels):
//   1. BN1-ReLU fused into the 1x1x1 conv: the positions are cut into chunks; per chunk the normalized prefix
//      (C_i x chunk, sized to stay in L2) is written to a per-thread scratch and multiplied by W1 (oneDNN's matmul;
//      MKL dgemm for float64; single-threaded inside at::parallel_for). Nothing normalized outlives the chunk. The
//      per-chunk statistics of the bottleneck h are taken while the chunk is hot and merged (Chan) afterwards.
//   2. BN2-ReLU of h (in place in eval; into a reused buffer in training, where h is kept), then the 3x3x3 conv,
//      written into the buffer slice of the layer: float32 with enough output tiles by Winograd F(2x2x2, 3x3x3)
//      (winograd_conv3d.h: 0.30x the multiply-adds), else by oneDNN (at::mkldnn_convolution: ATen's heuristic sends
//      batch-1 convs of these shapes to the ~3x slower im2col path).
//   3. Batch statistics of the k new channels, once; every later layer's BN1 shares them.
// In training the forward keeps the h (before BN2) of the layers with C_i >= 2 B_i (keeps_h; the op's sixth output,
// saved_h): backward then needs no BN1-ReLU + conv1 recompute for them.
// Backward, layers in reverse, accumulating dL/dy in one buffer G:
//   1. the layer's output gradient is completed by applying the pending affine BN corrections of its channels;
//   2. z2 = BN2-ReLU(h) from the kept h, or (not kept) h recomputed by step 1 of the forward without statistics,
//      z2 taken while each chunk of h is in cache;
//   3. conv2 backward: grad input as the 'same' conv with the flipped, transposed kernel (Winograd or oneDNN, as in
//      the forward); grad weight by
//      Winograd too from enough tiles (winograd_conv3x3x3_grad_weight), else at::convolution_backward (batch 1 split
//      in two halves along T with a halo so oneDNN takes it);
//   4. BN2 backward's two sums per channel (one read of grad z2 and h);
//   5. conv1 backward fused with the rest of BN2's backward and with BN1's, chunked like the forward: dL/dh of the
//      chunk from grad z2 and h into a contiguous scratch, recompute the normalized chunk, grad input and grad W1 by
//      GEMMs, then one pass adds scale*gp to G and the two per-channel sums; the rest of BN1's backward is an affine
//      correction per channel, added to the pending one (see the header).
// Synchronised BN (csrc/dense_block.h): the statistics of each set of channels are merged over the group right after
// they are computed (steps 1 and 3 of the forward), and the two sums of each BN backward (steps 4 and 5) are summed
// over the group before its affine correction is formed; without a group none of this runs.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <memory>
#include <vector>

#include "common/dense_block_math.h"
#include "common/dispatch.h"
#include "common/huge_pages.h"
#include "common/vec16.h"
#include "cpu/winograd_conv3d.h"
#include "dense_block.h"

// The BLAS that torch links (MKL in the x86 wheels) exports the Fortran sgemm_/dgemm_; ATen's own cpublas::gemm
// is not exported. Weak references, so a torch without them still loads this module and takes at::mm instead.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

// oneDNN's matmul, which libtorch_cpu exports but no installed header declares (ATen/native/mkldnn/Matmul.h):
// result = beta * result + alpha * mat1 @ mat2 on strided 2-D tensors. Weak, like sgemm_ above.
namespace at {
namespace native {
TORCH_API void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2, const at::Tensor& result, float beta,
                             float alpha) __attribute__((weak));
}  // namespace native
}  // namespace at

namespace t3d {
namespace {

// float32 GEMMs by oneDNN where present: measured here (AMD EPYC, AVX-512, one thread) on the dense block's
// 1x1x1-conv shapes (128 x 64..992 x 144..1024) it runs at 190-220 GFLOP/s against MKL sgemm's ~100 (MKL takes its
// generic code path on non-Intel CPUs).
// oneDNN's matmul refuses CPUs without its reduced-precision ISA (before looking at the dtype: AMD Zen 3, AVX2
// only, throws "mkldnn_matmul bf16 path needs the cpu support ..."), so it is used only where a probe product
// succeeds and is right; elsewhere sgemm.
bool onednn_gemm_works() {
  if (&at::native::mkldnn_matmul == nullptr || !at::hasMKLDNN()) return false;
  try {
    auto a = at::arange(1, 5, at::kFloat).view({2, 2});  // [[1, 2], [3, 4]]
    auto c = at::zeros({2, 2}, at::kFloat);
    at::native::mkldnn_matmul(a, a, c, 0.f, 1.f);
    return at::equal(c, at::mm(a, a));
  } catch (const std::exception&) {
    return false;
  }
}
bool use_onednn_gemm() {
  static const bool ok = onednn_gemm_works();
  return ok;
}

// Column-major C (m x n, ldc) = alpha * op(A) op(B) + beta * C, BLAS conventions; op(A) is m x k.
template <typename scalar_t>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, scalar_t alpha, const scalar_t* a, int64_t lda,
          const scalar_t* b, int64_t ldb, scalar_t beta, scalar_t* c, int64_t ldc) {
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int mi = int(m), ni = int(n), ki = int(k), la = int(lda), lb = int(ldb), lc = int(ldc);
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (use_onednn_gemm()) {
      // the same product transposed, in row-major tensors: C^T (n x m) = op(B)^T (n x k) @ op(A)^T (k x m), where a
      // column-major (r x c, ld) matrix is the row-major (c x r) tensor with strides (ld, 1)
      auto opt = at::TensorOptions().dtype(at::kFloat);
      auto row_major = [&](const float* p, int64_t rows, int64_t cols, int64_t ld) {
        return at::from_blob(const_cast<float*>(p), {rows, cols}, {ld, 1}, opt);
      };
      auto op_b_t = trans_b ? row_major(b, k, n, ldb).t() : row_major(b, n, k, ldb);
      auto op_a_t = trans_a ? row_major(a, m, k, lda).t() : row_major(a, k, m, lda);
      return at::native::mkldnn_matmul(op_b_t, op_a_t, row_major(c, n, m, ldc), beta, alpha);
    }
    if (sgemm_ != nullptr) return sgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
  } else {
    if (dgemm_ != nullptr) return dgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
  }
  // a column-major (r x c, ld) matrix is the transpose of a row-major (c x r) tensor with strides (ld, 1)
  auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  auto col_major = [&](const scalar_t* p, int64_t rows, int64_t cols, int64_t ld) {
    return at::from_blob(const_cast<scalar_t*>(p), {cols, rows}, {ld, 1}, opt).t();
  };
  auto op_a = trans_a ? col_major(a, k, m, lda).t() : col_major(a, m, k, lda);
  auto op_b = trans_b ? col_major(b, n, k, ldb).t() : col_major(b, k, n, ldb);
  auto out = col_major(c, m, n, ldc);
  if (beta == scalar_t(0)) {
    out.copy_(at::mm(op_a, op_b).mul_(alpha));
  } else {
    out.mul_(beta).add_(at::mm(op_a, op_b), alpha);
  }
}


// ---------------------------------------------------------------------------------------------------------------
// Row kernels: one contiguous row of a channel (len positions). The float versions are vectorized explicitly
// (GCC vector extensions; sums in float lanes over blocks of kSumBlock, then in double) and compiled for AVX-512,
// AVX2 and the baseline, picked at load time (target_clones); the double versions (tests) are plain loops.
// ---------------------------------------------------------------------------------------------------------------
constexpr int64_t kLanes = 16;  // of a v16f (common/vec16.h)
constexpr int64_t kSumBlock = 1024;

inline v16f splat16(float s) { return v16f{} + s; }
inline float hsum16(v16f v) {
  float s = 0;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// out = relu(in * s + t)
T3D_CLONES void row_bn_relu(const float* in, float* out, int64_t len, float s, float t) {
  const v16f sv = splat16(s), tv = splat16(t), zero = v16f{};
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    const v16f v = load16(in + j) * sv + tv;
    store16(out + j, v > zero ? v : zero);
  }
  for (; j < len; ++j) out[j] = dense::bn_relu(in[j], s, t);
}
template <typename T>
void row_bn_relu(const T* in, T* out, int64_t len, T s, T t) {
  for (int64_t j = 0; j < len; ++j) out[j] = dense::bn_relu(in[j], s, t);
}

// sum of the row, or with `center` the sum of squared deviations from it
T3D_CLONES double row_sum(const float* in, int64_t len, bool centered, double center) {
  const float c = float(center);
  const v16f cv = splat16(c);
  double total = 0;
  int64_t j = 0;
  while (j < len) {
    const int64_t end = std::min(len, j + kSumBlock);
    v16f acc = v16f{};
    float tail = 0;
    for (; j + kLanes <= end; j += kLanes) {
      const v16f v = load16(in + j);
      if (centered) {
        const v16f d = v - cv;
        acc += d * d;
      } else {
        acc += v;
      }
    }
    for (; j < end; ++j) tail += centered ? (in[j] - c) * (in[j] - c) : in[j];
    total += double(hsum16(acc)) + double(tail);
  }
  return total;
}
template <typename T>
double row_sum(const T* in, int64_t len, bool centered, double center) {
  double total = 0;
  for (int64_t j = 0; j < len; ++j) {
    const double d = double(in[j]) - (centered ? center : 0.0);
    total += centered ? d * d : d;
  }
  return total;
}

// gp = g where x * s + t > 0 (else 0); sums of gp and gp * (x - center) added to sum_g, sum_gx (centered, so the
// sum of gp * xhat needs no cancelling subtraction). With `dst` (conv1's backward) also dst += s * gp.
T3D_CLONES void row_masked_sums(const float* g, const float* x, float* dst, int64_t len, float s, float t,
                                float center, double& sum_g, double& sum_gx) {
  const v16f sv = splat16(s), tv = splat16(t), cv = splat16(center), zero = v16f{};
  int64_t j = 0;
  while (j < len) {
    const int64_t end = std::min(len, j + kSumBlock);
    v16f a1 = v16f{}, a2 = v16f{};
    float t1 = 0, t2 = 0;
    for (; j + kLanes <= end; j += kLanes) {
      const v16f xv = load16(x + j);
      const v16f gp = xv * sv + tv > zero ? load16(g + j) : zero;
      if (dst) store16(dst + j, load16(dst + j) + sv * gp);
      a1 += gp;
      a2 += gp * (xv - cv);
    }
    for (; j < end; ++j) {
      const float gp = dense::relu_grad(g[j], x[j], s, t);
      if (dst) dst[j] += s * gp;
      t1 += gp;
      t2 += gp * (x[j] - center);
    }
    sum_g += double(hsum16(a1)) + double(t1);
    sum_gx += double(hsum16(a2)) + double(t2);
  }
}
template <typename T>
void row_masked_sums(const T* g, const T* x, T* dst, int64_t len, T s, T t, T center, double& sum_g,
                     double& sum_gx) {
  for (int64_t j = 0; j < len; ++j) {
    const T gp = dense::relu_grad(g[j], x[j], s, t);
    if (dst) dst[j] += s * gp;
    sum_g += double(gp);
    sum_gx += double(gp) * (double(x[j]) - double(center));
  }
}

// out = s * (g where h * s + t > 0) + alpha + beta * h  (BN-ReLU backward)
T3D_CLONES void row_bn_backward(const float* g, const float* h, float* out, int64_t len, float s, float t,
                                float alpha, float beta) {
  const v16f sv = splat16(s), tv = splat16(t), av = splat16(alpha), bv = splat16(beta), zero = v16f{};
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    const v16f hv = load16(h + j);
    const v16f gp = hv * sv + tv > zero ? load16(g + j) : zero;
    store16(out + j, sv * gp + av + bv * hv);
  }
  for (; j < len; ++j) out[j] = s * dense::relu_grad(g[j], h[j], s, t) + alpha + beta * h[j];
}
template <typename T>
void row_bn_backward(const T* g, const T* h, T* out, int64_t len, T s, T t, T alpha, T beta) {
  for (int64_t j = 0; j < len; ++j) out[j] = s * dense::relu_grad(g[j], h[j], s, t) + alpha + beta * h[j];
}

// out = src + a + b * y  (a pending BN correction applied)
T3D_CLONES void row_affine_add(const float* src, const float* y, float* out, int64_t len, float a, float b) {
  for (int64_t j = 0; j < len; ++j) out[j] = src[j] + a + b * y[j];
}
template <typename T>
void row_affine_add(const T* src, const T* y, T* out, int64_t len, T a, T b) {
  for (int64_t j = 0; j < len; ++j) out[j] = src[j] + a + b * y[j];
}

struct Geometry {
  int64_t N, C0, Ctot, T, H, W, P;
  int64_t layers;
  std::vector<int64_t> cin, growth, bott;  // per layer: C_i, k_i, B_i
  std::vector<int64_t> off1, off2;         // per layer: offset of its statistics in mean1/var1, mean2/var2
  std::vector<int64_t> offh;               // per layer: its first channel in saved_h, or -1 (h not kept)
  int64_t len1 = 0, len2 = 0, lenh = 0;
};

// Whether the training forward keeps layer i's h for backward (csrc/dense_block.h; the op's Python fake applies the
// same rule): where C_i >= 2 B_i, i.e. where recomputing h costs at least 4 FLOPs per kept element. Measured here
// (1 thread): keeping every layer's h sped block3 b4's backward up 14% (C_i 256-992, B 128) but left block1 b1's
// (C_i 64-224) unchanged, at 3x the buffer's memory.
bool keeps_h(int64_t cin, int64_t bott) { return cin >= 2 * bott; }

Geometry make_geometry(const at::Tensor& x, const TensorList& conv1_weight, const TensorList& conv2_weight) {
  Geometry g;
  g.N = x.size(0);
  g.C0 = x.size(1);
  g.T = x.size(2);
  g.H = x.size(3);
  g.W = x.size(4);
  g.P = g.T * g.H * g.W;
  g.layers = static_cast<int64_t>(conv1_weight.size());
  int64_t c = g.C0;
  for (int64_t i = 0; i < g.layers; ++i) {
    g.cin.push_back(c);
    g.bott.push_back(conv1_weight[i].size(0));
    g.growth.push_back(conv2_weight[i].size(0));
    g.off1.push_back(g.len1);
    g.off2.push_back(g.len2);
    g.offh.push_back(keeps_h(c, g.bott.back()) ? g.lenh : -1);
    if (g.offh.back() >= 0) g.lenh += g.bott.back();
    g.len1 += c;
    g.len2 += g.bott.back();
    c += g.growth.back();
  }
  g.Ctot = c;
  return g;
}

// Positions per chunk of the fused BN-ReLU + 1x1x1 conv: the normalized chunk (cin x chunk) is at most 2^18 elements
// (1 MiB in float32: halving it made the chunk GEMMs slower here), and the batch's chunks are a multiple of the
// threads, of nearly equal length: at::parallel_for hands each thread a contiguous run of chunks, and 3 chunks on 2
// threads (block2 of T3D-121 at batch 1 from 416 input channels) or a short last chunk left one thread idle for up
// to a third of the loop (41% of block2's backward had one thread idle, in a perf trace of the training step).
int64_t chunk_positions(const Geometry& g, int64_t cin) {
  const int64_t pc_max = std::clamp<int64_t>((int64_t(1) << 18) / std::max<int64_t>(cin, 1), 64, 1024);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t per_sample = std::max<int64_t>((threads + g.N - 1) / g.N, (g.P + pc_max - 1) / pc_max);
  // N * per_sample chunks in all: round per_sample up until they split evenly over the threads (at most `threads`
  // steps; a batch of a multiple of the threads splits evenly as it is)
  for (int64_t i = 0; i < threads && (g.N * per_sample) % threads != 0; ++i) ++per_sample;
  per_sample = std::min(per_sample, g.P);
  int64_t pc = (g.P + per_sample - 1) / per_sample;
  // whole 64-byte lines per chunk where that keeps the chunk count and the last chunk at least 7/8 of the others
  const int64_t pc16 = (pc + 15) / 16 * 16;
  if (pc > 16 && 8 * (g.P - (per_sample - 1) * pc16) >= 7 * pc16) pc = pc16;
  return std::max<int64_t>(pc, 1);
}

template <typename scalar_t>
struct Folded {
  std::vector<scalar_t> scale, shift, invstd;
  std::vector<double> mean;
};

template <typename scalar_t>
Folded<scalar_t> fold(const at::Tensor& gamma, const at::Tensor& beta, const double* mean, const double* var,
                      int64_t channels, double eps) {
  Folded<scalar_t> f;
  f.scale.resize(channels);
  f.shift.resize(channels);
  f.invstd.resize(channels);
  f.mean.assign(mean, mean + channels);
  auto gc = gamma.contiguous();
  auto bc = beta.contiguous();
  const scalar_t* gp = gc.data_ptr<scalar_t>();
  const scalar_t* bp = bc.data_ptr<scalar_t>();
  for (int64_t c = 0; c < channels; ++c) {
    dense::fold_bn<scalar_t, double>(gp[c], bp[c], mean[c], var[c], eps, f.scale[c], f.shift[c], f.invstd[c]);
  }
  return f;
}

// Biased mean and variance of buffer channels [c_begin, c_end) over (N, P), two-pass in double per channel.
template <typename scalar_t>
void channel_stats(const scalar_t* y, const Geometry& g, int64_t c_begin, int64_t c_end, double* mean, double* var) {
  at::parallel_for(c_begin, c_end, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const double count = double(g.N * g.P);
      double sum = 0;
      for (int64_t n = 0; n < g.N; ++n) sum += row_sum(y + (n * g.Ctot + c) * g.P, g.P, false, 0.0);
      const double m = sum / count;
      double m2 = 0;
      for (int64_t n = 0; n < g.N; ++n) m2 += row_sum(y + (n * g.Ctot + c) * g.P, g.P, true, m);
      mean[c] = m;
      var[c] = m2 / count;
    }
  });
}

// h[n, :, chunk] = W1 @ relu(y[n, :cin, chunk] * scale + shift) for every chunk; with `chunk_stats`, also each
// chunk's (mean, M2) of every bottleneck channel, for the training statistics of BN2; with `z` (backward), also
// z = relu(h * bn_z.scale + bn_z.shift) while the chunk of h is still in cache (one read of h from memory less).
template <typename scalar_t>
void bn_relu_conv1x1(const scalar_t* y, const Geometry& g, int64_t cin, const Folded<scalar_t>& bn,
                     const scalar_t* w1, int64_t bott, scalar_t* h, int64_t pc, std::vector<double>* chunk_stats,
                     const Folded<scalar_t>* bn_z = nullptr, scalar_t* z = nullptr) {
  const int64_t per_sample = (g.P + pc - 1) / pc;
  const int64_t chunks = g.N * per_sample;
  if (chunk_stats) chunk_stats->assign(chunks * bott * 2, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::unique_ptr<scalar_t[]> a(new scalar_t[cin * pc]);  // scratch, written before it is read
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t n = chunk / per_sample;
      const int64_t p0 = (chunk % per_sample) * pc;
      const int64_t len = std::min(pc, g.P - p0);
      const scalar_t* src = y + n * g.Ctot * g.P + p0;
      for (int64_t c = 0; c < cin; ++c) {
        row_bn_relu(src + c * g.P, a.get() + c * len, len, bn.scale[c], bn.shift[c]);
      }
      scalar_t* hc = h + n * bott * g.P + p0;
      // row-major h_chunk (bott x len, ld P) = W1 (bott x cin) @ a (cin x len), as column-major h^T = a^T W1^T
      gemm<scalar_t>(false, false, len, bott, cin, scalar_t(1), a.get(), len, w1, cin, scalar_t(0), hc, g.P);
      if (chunk_stats) {
        double* st = chunk_stats->data() + chunk * bott * 2;
        for (int64_t b = 0; b < bott; ++b) {
          const scalar_t* row = hc + b * g.P;
          const double m = row_sum(row, len, false, 0.0) / double(len);
          st[2 * b] = m;
          st[2 * b + 1] = row_sum(row, len, true, m);
        }
      }
      if (z) {
        scalar_t* zc = z + n * bott * g.P + p0;
        for (int64_t b = 0; b < bott; ++b) {
          row_bn_relu(hc + b * g.P, zc + b * g.P, len, bn_z->scale[b], bn_z->shift[b]);
        }
      }
    }
  });
}

// Merges the per-chunk statistics of bn_relu_conv1x1 (in chunk order: deterministic) into biased mean/var.
void merge_chunk_stats(const std::vector<double>& st, const Geometry& g, int64_t bott, int64_t pc, double* mean,
                       double* var) {
  const int64_t per_sample = (g.P + pc - 1) / pc;
  const int64_t chunks = g.N * per_sample;
  for (int64_t b = 0; b < bott; ++b) {
    double count = 0, m = 0, m2 = 0;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const int64_t p0 = (chunk % per_sample) * pc;
      const double len = double(std::min(pc, g.P - p0));
      dense::merge_stats(count, m, m2, len, st[(chunk * bott + b) * 2], st[(chunk * bott + b) * 2 + 1]);
    }
    mean[b] = m;
    var[b] = m2 / count;
  }
}

// z = relu(h * scale + shift) over (N, B, P); in place when z == h.
template <typename scalar_t>
void bn_relu_apply(const scalar_t* h, scalar_t* z, const Geometry& g, int64_t bott, const Folded<scalar_t>& bn) {
  at::parallel_for(0, g.N * bott, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row % bott;
      row_bn_relu(h + row * g.P, z + row * g.P, g.P, bn.scale[b], bn.shift[b]);
    }
  });
}

std::vector<int64_t> same_padding(const at::Tensor& w) { return {w.size(2) / 2, w.size(3) / 2, w.size(4) / 2}; }

bool use_onednn(const at::Tensor& t) { return t.scalar_type() == at::kFloat && at::hasMKLDNN(); }

at::Tensor conv_same(const at::Tensor& z, const at::Tensor& w) {
  const std::vector<int64_t> one{1, 1, 1};
  if (use_onednn(z)) return at::mkldnn_convolution(z, w.contiguous(), {}, same_padding(w), one, one, 1);
  return at::convolution(z, w, {}, one, same_padding(w), one, false, {0, 0, 0}, 1);
}

// ATen's own choice for the backward of a batch-1 conv of this size is its im2col path (see conv_same).
bool aten_picks_slow_path(const at::Tensor& z) { return z.size(0) == 1 && z.size(1) * z.size(2) * z.size(3) <= 20480; }

// Gradient of the weight of a 'same' conv; a batch-1 input is split along T into two overlapping halves (a halo
// of kt/2 frames, zero beyond the clip) so the weight-gradient conv runs as batch 2 on oneDNN.
at::Tensor conv_same_grad_weight(const at::Tensor& g, const at::Tensor& z, const at::Tensor& w) {
  const std::vector<int64_t> one{1, 1, 1};
  const auto pad = same_padding(w);
  const int64_t T = z.size(2);
  if (!use_onednn(z) || !aten_picks_slow_path(z) || T < 2) {
    return std::get<1>(at::convolution_backward(g, z, w, c10::nullopt, one, pad, one, false, {0, 0, 0}, 1,
                                                {false, true, false}));
  }
  const int64_t pt = pad[0];
  const int64_t t1 = (T + 1) / 2, t2 = T - t1;
  auto zp = at::constant_pad_nd(z, {0, 0, 0, 0, pt, pt + (t1 - t2)});
  auto gp = at::constant_pad_nd(g, {0, 0, 0, 0, 0, t1 - t2});
  auto z2 = at::cat({zp.narrow(2, 0, t1 + 2 * pt), zp.narrow(2, t1, t1 + 2 * pt)}, 0);
  auto g2 = at::cat({gp.narrow(2, 0, t1), gp.narrow(2, t1, t1)}, 0);
  return std::get<1>(at::convolution_backward(g2, z2, w, c10::nullopt, one, {0, pad[1], pad[2]}, one, false,
                                              {0, 0, 0}, 1, {false, true, false}));
}

// Input gradient per oneDNN call of conv_same_backward at most (whole samples; at least one). oneDNN's output of a
// bigger call, and its reorder, is fresh memory on every call (glibc hands blocks of tens of MB back to the system):
// one page fault per 4 KB. Measured here, 1 thread, 4x128x16x28x28 (block1 b4): 69 ms for one call (55 MB of page
// faults) against 50 ms for per-sample calls copied into one reused buffer (none).
constexpr int64_t kGradInputCallBytes = int64_t(8) << 20;

// Gradients of a 'same' conv: (dL/dz, dL/dw). A batch whose dL/dz exceeds kGradInputCallBytes is done in groups of
// samples written into `buffer` (allocated on first use, z's shape, kept by the caller from layer to layer).
std::tuple<at::Tensor, at::Tensor> conv_same_backward(const at::Tensor& g, const at::Tensor& z, const at::Tensor& w,
                                                      at::Tensor& buffer) {
  const std::vector<int64_t> one{1, 1, 1};
  if (!use_onednn(z)) {
    auto r = at::convolution_backward(g, z, w, c10::nullopt, one, same_padding(w), one, false, {0, 0, 0}, 1,
                                      {true, true, false});
    return {std::get<0>(r), std::get<1>(r)};
  }
  // the transposed 'same' conv of an odd kernel is the 'same' conv with the flipped, transposed kernel
  auto w_t = w.flip({2, 3, 4}).transpose(0, 1).contiguous();
  auto reuse_buffer = [&] {
    if (!buffer.defined() || !buffer.sizes().equals(z.sizes())) buffer = empty_huge(z.sizes(), z.options());
  };
  // the weight gradient by Winograd where that pays, whichever way the input gradient goes (on AVX2 it pays at shapes
  // whose input gradient stays with oneDNN: rows of fewer than 7 tiles)
  auto grad_weight = [&] {
    return winograd_conv3x3x3_grad_weight_pays(z, g, w) ? winograd_conv3x3x3_grad_weight(z, g)
                                                        : conv_same_grad_weight(g, z, w);
  };
  if (winograd_conv3x3x3_pays(g, w_t)) {
    reuse_buffer();
    auto grad_z = winograd_conv3x3x3(g, w_t, buffer);
    return {grad_z, grad_weight()};
  }
  const int64_t N = z.size(0), sample_bytes = z.numel() / std::max<int64_t>(N, 1) * int64_t(z.element_size());
  const int64_t group =
      std::clamp<int64_t>(kGradInputCallBytes / std::max<int64_t>(sample_bytes, 1), 1, std::max<int64_t>(N, 1));
  if (group >= N) {
    return {at::mkldnn_convolution(g, w_t, {}, same_padding(w), one, one, 1), grad_weight()};
  }
  reuse_buffer();
  for (int64_t n0 = 0; n0 < N; n0 += group) {
    const int64_t len = std::min(group, N - n0);
    auto part = at::mkldnn_convolution(g.narrow(0, n0, len), w_t, {}, same_padding(w), one, one, 1);
    buffer.narrow(0, n0, len).copy_(part);
  }
  return {buffer, grad_weight()};
}

// Synchronised BN: this process's biased (mean, var) of `channels` channels replaced, in place, by the group's.
void merge_over_group(const StatsMerge& merge_stats, double* mean, double* var, int64_t channels) {
  auto opt = at::TensorOptions().dtype(at::kDouble);
  auto [m, v] = merge_stats(at::from_blob(mean, {channels}, opt).clone(), at::from_blob(var, {channels}, opt).clone());
  m = m.to(at::kDouble).contiguous();
  v = v.to(at::kDouble).contiguous();
  TORCH_CHECK(m.numel() == channels && v.numel() == channels, "merge_stats: expected ", channels,
              " merged means and variances, got ", m.numel(), " and ", v.numel());
  std::copy(m.data_ptr<double>(), m.data_ptr<double>() + channels, mean);
  std::copy(v.data_ptr<double>(), v.data_ptr<double>() + channels, var);
}

// Synchronised BN: the group's (sum dy, sum dy * xhat) of `channels` channels from this process's.
void reduce_over_group(const SumsReduce& reduce_sums, const double* sum_g, const double* sum_gx, int64_t channels,
                       std::vector<double>& group_g, std::vector<double>& group_gx) {
  auto local = at::empty({2 * channels}, at::TensorOptions().dtype(at::kDouble));
  std::copy(sum_g, sum_g + channels, local.data_ptr<double>());
  std::copy(sum_gx, sum_gx + channels, local.data_ptr<double>() + channels);
  auto total = reduce_sums(local).to(at::kDouble).contiguous();
  TORCH_CHECK(total.numel() == 2 * channels, "reduce_sums: expected ", 2 * channels, " sums, got ", total.numel());
  const double* tp = total.data_ptr<double>();
  group_g.assign(tp, tp + channels);
  group_gx.assign(tp + channels, tp + 2 * channels);
}

// The affine correction (alpha, beta) of a training-mode BN backward for each of `channels` channels, from this
// process's two sums (over the group's when synced), handed to apply(c, alpha, beta).
template <typename Folded, typename Apply>
void bn_backward_corrections(const Folded& bn, const std::vector<double>& sum_g, const std::vector<double>& sum_gx,
                             int64_t channels, double count, bool synced, const SumsReduce& reduce_sums,
                             Apply apply) {
  std::vector<double> group_g, group_gx;
  if (synced) reduce_over_group(reduce_sums, sum_g.data(), sum_gx.data(), channels, group_g, group_gx);
  const std::vector<double>& sg = synced ? group_g : sum_g;
  const std::vector<double>& sgx = synced ? group_gx : sum_gx;
  for (int64_t c = 0; c < channels; ++c) {
    double alpha, beta;
    dense::bn_backward_affine<double>(bn.scale[c], double(bn.invstd[c]), bn.mean[c], sg[c], sgx[c], count, alpha,
                                      beta);
    apply(c, alpha, beta);
  }
}

at::Tensor to_double_cat(const TensorList& list) {
  std::vector<at::Tensor> parts;
  for (const auto& t : list) parts.push_back(t.detach().reshape({-1}).to(at::kDouble));
  return at::cat(parts);
}

template <typename scalar_t>
DenseForwardCpu forward_impl(const at::Tensor& x_in, const TensorList& bn1_weight, const TensorList& bn1_bias,
                          const TensorList& bn1_mean, const TensorList& bn1_var, const TensorList& conv1_weight,
                          const TensorList& bn2_weight, const TensorList& bn2_bias, const TensorList& bn2_mean,
                          const TensorList& bn2_var, const TensorList& conv2_weight, bool training, double eps,
                          const StatsMerge& merge_stats) {
  const Geometry g = make_geometry(x_in, conv1_weight, conv2_weight);
  const bool synced = training && bool(merge_stats);
  auto y = empty_huge({g.N, g.Ctot, g.T, g.H, g.W}, x_in.options());
  y.narrow(1, 0, g.C0).copy_(x_in);
  scalar_t* yp = y.data_ptr<scalar_t>();

  auto dopt = x_in.options().dtype(at::kDouble);
  // statistics each layer's BN uses, layer after layer (double here; returned in x's dtype)
  at::Tensor mean1, var1, mean2, var2;
  std::vector<double> chan_mean, chan_var;
  if (training) {
    mean1 = at::empty({g.len1}, dopt);
    var1 = at::empty({g.len1}, dopt);
    mean2 = at::empty({g.len2}, dopt);
    var2 = at::empty({g.len2}, dopt);
    chan_mean.resize(g.Ctot);
    chan_var.resize(g.Ctot);
    channel_stats(yp, g, 0, g.C0, chan_mean.data(), chan_var.data());
    if (synced) merge_over_group(merge_stats, chan_mean.data(), chan_var.data(), g.C0);
  } else {
    mean1 = to_double_cat(bn1_mean);
    var1 = to_double_cat(bn1_var);
    mean2 = to_double_cat(bn2_mean);
    var2 = to_double_cat(bn2_var);
  }
  double* m1 = mean1.data_ptr<double>();
  double* v1 = var1.data_ptr<double>();
  double* m2 = mean2.data_ptr<double>();
  double* v2 = var2.data_ptr<double>();

  // In training the bottleneck h (before BN2) of every layer that keeps_h is kept for backward, layer after layer in
  // one flat buffer (N * P * lenh elements): backward then skips the recompute of BN1-ReLU + conv1 (see the header).
  // z, BN2-ReLU(h), is one buffer reused from layer to layer; a layer whose h is not kept computes h into it and
  // applies BN2-ReLU in place.
  auto saved_h = training ? empty_huge({g.N * g.P * g.lenh}, y.options()) : at::empty({0}, y.options());
  at::Tensor h, z;
  std::vector<double> chunk_stats;
  for (int64_t i = 0; i < g.layers; ++i) {
    const int64_t cin = g.cin[i], bott = g.bott[i], k = g.growth[i];
    if (training) {
      std::copy(chan_mean.begin(), chan_mean.begin() + cin, m1 + g.off1[i]);
      std::copy(chan_var.begin(), chan_var.begin() + cin, v1 + g.off1[i]);
    }
    auto bn1 = fold<scalar_t>(bn1_weight[i], bn1_bias[i], m1 + g.off1[i], v1 + g.off1[i], cin, eps);
    if (!z.defined() || z.size(1) != bott) z = empty_huge({g.N, bott, g.T, g.H, g.W}, y.options());
    h = training && g.offh[i] >= 0
            ? saved_h.narrow(0, g.N * g.P * g.offh[i], g.N * g.P * bott).view({g.N, bott, g.T, g.H, g.W})
            : z;
    auto w1 = conv1_weight[i].contiguous();
    const int64_t pc = chunk_positions(g, cin);
    bn_relu_conv1x1(yp, g, cin, bn1, w1.data_ptr<scalar_t>(), bott, h.data_ptr<scalar_t>(), pc,
                    training ? &chunk_stats : nullptr);
    if (training) merge_chunk_stats(chunk_stats, g, bott, pc, m2 + g.off2[i], v2 + g.off2[i]);
    if (synced) merge_over_group(merge_stats, m2 + g.off2[i], v2 + g.off2[i], bott);
    auto bn2 = fold<scalar_t>(bn2_weight[i], bn2_bias[i], m2 + g.off2[i], v2 + g.off2[i], bott, eps);
    bn_relu_apply(h.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), g, bott, bn2);
    auto y_new = y.narrow(1, cin, k);
    if (winograd_conv3x3x3_pays(z, conv2_weight[i]))
      winograd_conv3x3x3(z, conv2_weight[i], y_new);  // straight into the concatenated output
    else
      y_new.copy_(conv_same(z, conv2_weight[i]));
    if (training) channel_stats(yp, g, cin, cin + k, chan_mean.data(), chan_var.data());
    if (synced) merge_over_group(merge_stats, chan_mean.data() + cin, chan_var.data() + cin, k);
  }
  auto dt = x_in.scalar_type();
  return {y, mean1.to(dt), var1.to(dt), mean2.to(dt), var2.to(dt), saved_h};
}

template <typename scalar_t>
DenseGrads backward_impl(const at::Tensor& grad_y, const at::Tensor& y_in, const at::Tensor& mean1_in,
                         const at::Tensor& var1_in, const at::Tensor& mean2_in, const at::Tensor& var2_in,
                         const at::Tensor& saved_h_in, const TensorList& bn1_weight, const TensorList& bn1_bias,
                         const TensorList& conv1_weight,
                         const TensorList& bn2_weight, const TensorList& bn2_bias, const TensorList& conv2_weight,
                         bool training, double eps, const SumsReduce& reduce_sums, int64_t group_count) {
  auto y = y_in.contiguous();
  const bool synced = training && bool(reduce_sums);
  const int64_t L = static_cast<int64_t>(conv1_weight.size());
  int64_t c0 = y.size(1);
  for (const auto& w : conv2_weight) c0 -= w.size(0);
  const Geometry g = make_geometry(y.narrow(1, 0, c0), conv1_weight, conv2_weight);
  const scalar_t* yp = y.data_ptr<scalar_t>();
  // the forward's h of every layer (training), or nothing: h is then recomputed
  const bool have_h = saved_h_in.defined() && saved_h_in.numel() > 0;
  TORCH_CHECK(!have_h || saved_h_in.numel() == g.N * g.P * g.lenh, "saved_h: expected ", g.N * g.P * g.lenh,
              " elements (N * T * H * W * the bottleneck widths of the layers that keep h) or none, got ",
              saved_h_in.numel());
  TORCH_CHECK(!have_h || saved_h_in.scalar_type() == y.scalar_type(), "saved_h: expected dtype ", y.scalar_type(),
              ", got ", saved_h_in.scalar_type());
  auto saved_h = have_h ? saved_h_in.contiguous() : saved_h_in;
  // dL/dy accumulated over the layers (the local part of every BN1 backward lands here): a per-thread buffer kept
  // between calls (kept_buffer): fresh, it cost T3D-121's block1 at batch 1 (12.8 MB) 0.5 or 15 ms of page faults
  // for its copy, depending on what the heap handed back
  struct DenseGradTag {};
  at::Tensor G = kept_buffer<DenseGradTag>(y.sizes(), y.options());
  G.copy_(grad_y);
  scalar_t* gp_buf = G.data_ptr<scalar_t>();
  // pending affine BN1-backward corrections per buffer channel: dL/dy[c] += corr_a[c] + corr_b[c] * y[c]
  std::vector<double> corr_a(g.Ctot, 0.0), corr_b(g.Ctot, 0.0);

  auto mean1 = mean1_in.to(at::kDouble).contiguous(), var1 = var1_in.to(at::kDouble).contiguous();
  auto mean2 = mean2_in.to(at::kDouble).contiguous(), var2 = var2_in.to(at::kDouble).contiguous();
  const double* m1 = mean1.data_ptr<double>();
  const double* v1 = var1.data_ptr<double>();
  const double* m2 = mean2.data_ptr<double>();
  const double* v2 = var2.data_ptr<double>();
  TORCH_CHECK(!synced || group_count >= g.N * g.P, "group_count: expected the process group's elements per channel (",
              "at least this process's ", g.N * g.P, "), got ", group_count);
  // elements per channel of the statistics: the group's when synchronised
  const double count = double(synced ? group_count : g.N * g.P);
  const int64_t threads = at::get_num_threads();

  TensorList g_bn1_w(L), g_bn1_b(L), g_conv1(L), g_bn2_w(L), g_bn2_b(L), g_conv2(L);
  at::Tensor h, h_buffer, z2, gout, grad_z2_buffer;
  for (int64_t i = L - 1; i >= 0; --i) {
    const int64_t cin = g.cin[i], bott = g.bott[i], k = g.growth[i];
    auto opts = y.options();
    // 1. this layer's output gradient is complete once its channels' pending corrections are applied (the buffer
    // reused from layer to layer, like h and z2)
    if (!gout.defined() || gout.size(1) != k) gout = empty_huge({g.N, k, g.T, g.H, g.W}, opts);
    {
      scalar_t* go = gout.data_ptr<scalar_t>();
      at::parallel_for(0, g.N * k, 1, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const int64_t n = row / k, c = cin + row % k;
          row_affine_add(gp_buf + (n * g.Ctot + c) * g.P, yp + (n * g.Ctot + c) * g.P, go + row * g.P, g.P,
                         scalar_t(corr_a[c]), scalar_t(corr_b[c]));
        }
      });
    }
    // 2. h (kept by the forward, or recomputed) and z2
    auto bn1 = fold<scalar_t>(bn1_weight[i], bn1_bias[i], m1 + g.off1[i], v1 + g.off1[i], cin, eps);
    auto bn2 = fold<scalar_t>(bn2_weight[i], bn2_bias[i], m2 + g.off2[i], v2 + g.off2[i], bott, eps);
    auto w1 = conv1_weight[i].contiguous();
    const scalar_t* w1p = w1.data_ptr<scalar_t>();
    const int64_t pc = chunk_positions(g, cin);
    // the buffers of z2 and of a recomputed h are reused from layer to layer: fresh pages cost a page fault each
    if (!z2.defined() || z2.size(1) != bott) z2 = empty_huge({g.N, bott, g.T, g.H, g.W}, opts);
    if (have_h && g.offh[i] >= 0) {
      h = saved_h.narrow(0, g.N * g.P * g.offh[i], g.N * g.P * bott).view({g.N, bott, g.T, g.H, g.W});
      bn_relu_apply(h.data_ptr<scalar_t>(), z2.data_ptr<scalar_t>(), g, bott, bn2);
    } else {
      if (!h_buffer.defined() || h_buffer.size(1) != bott) h_buffer = empty_huge(z2.sizes(), opts);
      h = h_buffer;
      bn_relu_conv1x1(yp, g, cin, bn1, w1p, bott, h.data_ptr<scalar_t>(), pc, nullptr, &bn2, z2.data_ptr<scalar_t>());
    }
    // 3. conv2 backward
    auto [grad_z2, grad_w2] = conv_same_backward(gout, z2, conv2_weight[i], grad_z2_buffer);
    grad_z2 = grad_z2.contiguous();
    g_conv2[i] = grad_w2;
    // 4. BN2 backward's sums per channel; the rest of it (dL/dh from grad_z2 and h) is done chunk by chunk in step 5,
    // into a scratch the conv1 GEMMs read (contiguous: oneDNN's matmul copies a strided operand)
    std::vector<double> sum_g2(bott), sum_gx2(bott);
    const scalar_t* gz = grad_z2.data_ptr<scalar_t>();
    const scalar_t* hp = h.data_ptr<scalar_t>();
    at::parallel_for(0, bott, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        double sg = 0, sgx = 0;
        for (int64_t n = 0; n < g.N; ++n) {
          row_masked_sums(gz + (n * bott + b) * g.P, hp + (n * bott + b) * g.P, static_cast<scalar_t*>(nullptr), g.P,
                          bn2.scale[b], bn2.shift[b], scalar_t(bn2.mean[b]), sg, sgx);
        }
        sum_g2[b] = sg;
        sum_gx2[b] = sgx * double(bn2.invstd[b]);  // sum gp * xhat
      }
    });
    std::vector<scalar_t> alpha2(bott, scalar_t(0)), beta2(bott, scalar_t(0));
    if (training) {
      bn_backward_corrections(bn2, sum_g2, sum_gx2, bott, count, synced, reduce_sums,
                              [&](int64_t b, double alpha, double beta) {
                                alpha2[b] = scalar_t(alpha);
                                beta2[b] = scalar_t(beta);
                              });
    }
    auto dopt = opts.dtype(at::kDouble);
    g_bn2_w[i] = at::from_blob(sum_gx2.data(), {bott}, dopt).to(y.scalar_type(), false, /*copy=*/true);
    g_bn2_b[i] = at::from_blob(sum_g2.data(), {bott}, dopt).to(y.scalar_type(), false, /*copy=*/true);
    // 5. conv1 backward fused with the rest of BN2's backward and with BN1's
    std::vector<scalar_t> gw1_acc(threads * bott * cin, scalar_t(0));
    std::vector<double> sg_acc(threads * cin, 0.0), sgx_acc(threads * cin, 0.0);
    const int64_t per_sample = (g.P + pc - 1) / pc;
    at::parallel_for(0, g.N * per_sample, 1, [&](int64_t begin, int64_t end) {
      const int64_t tid = at::get_thread_num();
      // scratch, every element written before it is read
      std::unique_ptr<scalar_t[]> a(new scalar_t[cin * pc]), ga(new scalar_t[cin * pc]), gh(new scalar_t[bott * pc]);
      scalar_t* gw1 = gw1_acc.data() + tid * bott * cin;
      double* sg = sg_acc.data() + tid * cin;
      double* sgx = sgx_acc.data() + tid * cin;
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t n = chunk / per_sample;
        const int64_t p0 = (chunk % per_sample) * pc;
        const int64_t len = std::min(pc, g.P - p0);
        const scalar_t* src = yp + n * g.Ctot * g.P + p0;
        for (int64_t c = 0; c < cin; ++c) {
          row_bn_relu(src + c * g.P, a.get() + c * len, len, bn1.scale[c], bn1.shift[c]);
        }
        const int64_t hoff = n * bott * g.P + p0;
        for (int64_t b = 0; b < bott; ++b) {
          row_bn_backward(gz + hoff + b * g.P, hp + hoff + b * g.P, gh.get() + b * len, len, bn2.scale[b],
                          bn2.shift[b], alpha2[b], beta2[b]);
        }
        // ga (cin x len) = W1^T (cin x bott) @ gh (bott x len)
        gemm<scalar_t>(false, true, len, cin, bott, scalar_t(1), gh.get(), len, w1p, cin, scalar_t(0), ga.get(), len);
        // gW1 (bott x cin) += gh (bott x len) @ a^T (len x cin)
        gemm<scalar_t>(true, false, cin, bott, len, scalar_t(1), a.get(), len, gh.get(), len, scalar_t(1), gw1, cin);
        scalar_t* gdst = gp_buf + n * g.Ctot * g.P + p0;
        for (int64_t c = 0; c < cin; ++c) {
          row_masked_sums(ga.get() + c * len, src + c * g.P, gdst + c * g.P, len, bn1.scale[c], bn1.shift[c],
                          scalar_t(bn1.mean[c]), sg[c], sgx[c]);
        }
      }
    });
    auto gw1_t = at::empty({bott, cin, 1, 1, 1}, opts);
    scalar_t* gw1p = gw1_t.data_ptr<scalar_t>();
    std::vector<double> sum_g1(cin, 0.0), sum_gx1(cin, 0.0);
    for (int64_t e = 0; e < bott * cin; ++e) {
      scalar_t acc = 0;
      for (int64_t t = 0; t < threads; ++t) acc += gw1_acc[t * bott * cin + e];
      gw1p[e] = acc;
    }
    for (int64_t c = 0; c < cin; ++c) {
      double sg = 0, sx = 0;
      for (int64_t t = 0; t < threads; ++t) {
        sg += sg_acc[t * cin + c];
        sx += sgx_acc[t * cin + c];
      }
      sum_g1[c] = sg;
      sum_gx1[c] = sx * double(bn1.invstd[c]);
    }
    if (training) {
      bn_backward_corrections(bn1, sum_g1, sum_gx1, cin, count, synced, reduce_sums,
                              [&](int64_t c, double alpha, double beta) {
                                corr_a[c] += alpha;
                                corr_b[c] += beta;
                              });
    }
    g_conv1[i] = gw1_t;
    g_bn1_w[i] = at::from_blob(sum_gx1.data(), {cin}, dopt).to(y.scalar_type(), false, /*copy=*/true);
    g_bn1_b[i] = at::from_blob(sum_g1.data(), {cin}, dopt).to(y.scalar_type(), false, /*copy=*/true);
  }
  // the input's gradient: its channels' slice of G plus their pending corrections
  auto grad_x = empty_huge({g.N, g.C0, g.T, g.H, g.W}, y.options());
  scalar_t* gx = grad_x.data_ptr<scalar_t>();
  at::parallel_for(0, g.N * g.C0, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.C0, c = row % g.C0;
      row_affine_add(gp_buf + (n * g.Ctot + c) * g.P, yp + (n * g.Ctot + c) * g.P, gx + row * g.P, g.P,
                     scalar_t(corr_a[c]), scalar_t(corr_b[c]));
    }
  });
  return {grad_x, g_bn1_w, g_bn1_b, g_conv1, g_bn2_w, g_bn2_b, g_conv2};
}

}  // namespace

DenseForwardCpu dense_block_forward_cpu(const at::Tensor& x, const TensorList& bn1_weight, const TensorList& bn1_bias,
                                     const TensorList& bn1_mean, const TensorList& bn1_var,
                                     const TensorList& conv1_weight, const TensorList& bn2_weight,
                                     const TensorList& bn2_bias, const TensorList& bn2_mean, const TensorList& bn2_var,
                                     const TensorList& conv2_weight, bool training, double eps,
                                     const StatsMerge& merge_stats) {
  check_dense_block_inputs(x, bn1_weight, bn1_bias, conv1_weight, bn2_weight, bn2_bias, conv2_weight);
  if (!training) {
    TORCH_CHECK(bn1_mean.size() == conv1_weight.size() && bn1_var.size() == conv1_weight.size() &&
                    bn2_mean.size() == conv1_weight.size() && bn2_var.size() == conv1_weight.size(),
                "running statistics: expected one tensor per layer in eval mode");
  }
  return T3D_DISPATCH_FP32_FP64(x, "x", "CPU dense block kernel", [&] {
    return forward_impl<scalar_t>(x, bn1_weight, bn1_bias, bn1_mean, bn1_var, conv1_weight, bn2_weight, bn2_bias,
                                  bn2_mean, bn2_var, conv2_weight, training, eps, merge_stats);
  });
}

DenseGrads dense_block_backward_cpu(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& mean1,
                                    const at::Tensor& var1, const at::Tensor& mean2, const at::Tensor& var2,
                                    const at::Tensor& saved_h, const TensorList& bn1_weight,
                                    const TensorList& bn1_bias, const TensorList& conv1_weight,
                                    const TensorList& bn2_weight, const TensorList& bn2_bias,
                                    const TensorList& conv2_weight, bool training, double eps,
                                    const SumsReduce& reduce_sums, int64_t group_count) {
  TORCH_CHECK(grad_y.sizes() == y.sizes(), "grad_y: expected shape ", y.sizes(), ", got ", grad_y.sizes());
  return T3D_DISPATCH_FP32_FP64(y, "y", "CPU dense block kernel", [&] {
    return backward_impl<scalar_t>(grad_y, y, mean1, var1, mean2, var2, saved_h, bn1_weight, bn1_bias, conv1_weight,
                                   bn2_weight, bn2_bias, conv2_weight, training, eps, reduce_sums, group_count);
  });
}

}  // namespace t3d
