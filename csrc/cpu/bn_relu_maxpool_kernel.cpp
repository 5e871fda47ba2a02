// CPU kernels of t3d::bn_relu_maxpool: y = max_pool3d(relu(batch_norm(x)), kernel, stride, padding), the stem of a
// T3D (norm0 -> relu0 -> pool0). ATen runs three memory-bound passes (BN, ReLU, a max pool that also writes int64
// indices) and saves the BN output, the ReLU output and the indices for backward. Here:
//   forward:  one pass over x: the max pool of sgn(gamma) * x (BN-ReLU is monotone per channel, see VolumePool),
//             separable (W, then H, then T, each keeping the first strict maximum, so the position chosen is the
//             lexicographically first maximum, as ATen's pool chooses) with the batch statistics summed in the same
//             pass; then BN-ReLU on the 8x smaller pooled tensor. Saves x, y and int32 indices of the maxima
//             (ATen saves the BN output, the ReLU output and int64 indices: 2 + 2 + 0.5 times x's size).
//   backward: pass A reduces, per channel, sum(g) and sum(g * xhat) over the maxima ReLU lets through (BN backward
//             needs no dense gradient for these); pass B scatters each volume's gradient into a cache-resident
//             buffer (serially per volume: deterministic, no atomics) and writes grad_x = BN backward of it.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "bn_relu_maxpool.h"
#include "common/dispatch.h"
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

// Max pool of v = sgn * x over one (T, H, W) volume, sgn in {1, -1, 0} per channel. BN-ReLU is monotone per
// channel (increasing where gamma > 0, decreasing where gamma < 0, constant where gamma = 0), so the maximum of
// relu(bn(x)) over a window sits where the maximum of sgn * x does (ties: the first, as ATen's pool picks; windows
// where ReLU clips everything to 0 get no gradient, whichever position is chosen). Pooling x itself needs no
// statistics, so one pass over x also sums it for the batch statistics, and BN-ReLU is applied afterwards to the
// 8x smaller pooled tensor. Writes the pooled sgn * x (To, Ho, Wo) and, if idx is given, the flat input index of
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
  // out[wo] = first max of (odd[wo-1], even[wo], odd[wo]); vectorizes (select instructions instead of jumps).
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

  void run(const T* x, T sgn, T* out, int32_t* idx, double* sum = nullptr, double* sumsq = nullptr, double ref = 0) {
    const int64_t HW = g.H * g.W;
    const bool stem_w = g.k[2] == 3 && g.s[2] == 2 && g.p[2] == 1 && g.W >= 2;
    double s1 = 0, s2 = 0;
    // W pass (and the statistics)
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
    // H pass
    for (int64_t t = 0; t < g.T; ++t)
      for (int64_t ho = 0; ho < g.Ho; ++ho) {
        int64_t lo, hi;
        window(ho, g.k[1], g.s[1], g.p[1], g.H, lo, hi);
        T* ov = hv.data() + (t * g.Ho + ho) * g.Wo;
        int32_t* oi = hi_.data() + (t * g.Ho + ho) * g.Wo;
        const T* iv = wv.data() + (t * g.H + lo) * g.Wo;
        const int32_t* ii = wi.data() + (t * g.H + lo) * g.Wo;
        for (int64_t wo = 0; wo < g.Wo; ++wo) ov[wo] = iv[wo], oi[wo] = int32_t(lo * g.W) + ii[wo];
        for (int64_t h = lo + 1; h < hi; ++h) {
          iv = wv.data() + (t * g.H + h) * g.Wo;
          ii = wi.data() + (t * g.H + h) * g.Wo;
          const int32_t hoff = int32_t(h * g.W);
          for (int64_t wo = 0; wo < g.Wo; ++wo) {
            const bool gt = iv[wo] > ov[wo];
            ov[wo] = gt ? iv[wo] : ov[wo];
            oi[wo] = gt ? hoff + ii[wo] : oi[wo];
          }
        }
      }
    // T pass
    const int64_t plane = g.Ho * g.Wo;
    for (int64_t to = 0; to < g.To; ++to) {
      int64_t lo, hi;
      window(to, g.k[0], g.s[0], g.p[0], g.T, lo, hi);
      T* oy = out + to * plane;
      std::copy(hv.data() + lo * plane, hv.data() + (lo + 1) * plane, oy);
      if (idx) {
        int32_t* oi = idx + to * plane;
        const int32_t* ii = hi_.data() + lo * plane;
        const int32_t toff0 = int32_t(lo * HW);
        for (int64_t q = 0; q < plane; ++q) oi[q] = toff0 + ii[q];
        for (int64_t t = lo + 1; t < hi; ++t) {
          const T* iv = hv.data() + t * plane;
          ii = hi_.data() + t * plane;
          const int32_t toff = int32_t(t * HW);
          for (int64_t q = 0; q < plane; ++q) {
            const bool gt = iv[q] > oy[q];
            oy[q] = gt ? iv[q] : oy[q];
            oi[q] = gt ? toff + ii[q] : oi[q];
          }
        }
      } else {
        for (int64_t t = lo + 1; t < hi; ++t) {
          const T* iv = hv.data() + t * plane;
          for (int64_t q = 0; q < plane; ++q) oy[q] = std::max(oy[q], iv[q]);
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

template <typename T>
void fold(const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& mean, const at::Tensor& var,
          double eps, std::vector<T>& scale, std::vector<T>& shift, std::vector<T>& invstd) {
  const int64_t C = bn_weight.size(0);
  const auto gw = bn_weight.contiguous(), gb = bn_bias.contiguous(), m = mean.contiguous(), v = var.contiguous();
  scale.resize(C), shift.resize(C), invstd.resize(C);
  for (int64_t c = 0; c < C; ++c) {
    invstd[c] = T(1.0 / std::sqrt(double(v.data_ptr<T>()[c]) + eps));
    fold_bn(gw.data_ptr<T>()[c], gb.data_ptr<T>()[c], m.data_ptr<T>()[c], invstd[c], scale[c], shift[c]);
  }
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
  auto y = at::empty({N, C, g.To, g.Ho, g.Wo}, x.options());
  auto idx = save_indices ? at::empty({N, C, g.To, g.Ho, g.Wo}, x.options().dtype(at::kInt))
                          : at::empty({0}, x.options().dtype(at::kInt));
  at::Tensor mean = training ? at::empty({C}, x.options()) : running_mean.clone();
  at::Tensor var = training ? at::empty({C}, x.options()) : running_var.clone();
  T3D_DISPATCH_FP32_FP64(x, "x", "bn_relu_maxpool_forward_cpu", [&] {
    const auto gamma = bn_weight.contiguous();
    const scalar_t* gp = gamma.data_ptr<scalar_t>();
    std::vector<scalar_t> sgn(C);
    for (int64_t c = 0; c < C; ++c) sgn[c] = gp[c] > 0 ? scalar_t(1) : (gp[c] < 0 ? scalar_t(-1) : scalar_t(0));
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    int32_t* ip = save_indices ? idx.data_ptr<int32_t>() : nullptr;
    const int64_t vin = g.T * g.H * g.W, vout = g.To * g.Ho * g.Wo;
    if (training) {
      // channels in parallel, samples in order: the pool and the channel's statistics in one pass over x
      scalar_t* mp = mean.data_ptr<scalar_t>();
      scalar_t* vp = var.data_ptr<scalar_t>();
      at::parallel_for(0, C, 1, [&](int64_t cb, int64_t ce) {
        VolumePool<scalar_t> pool(g);
        for (int64_t c = cb; c < ce; ++c) {
          double s1 = 0, s2 = 0;
          const double ref = double(xp[c * vin]);  // sums around a sample value: no cancellation when |mean| >> std
          for (int64_t n = 0; n < N; ++n) {
            const int64_t i = n * C + c;
            pool.run(xp + i * vin, sgn[c], yp + i * vout, ip ? ip + i * vout : nullptr, &s1, &s2, ref);
          }
          const double count = double(N * vin), m = s1 / count;
          mp[c] = scalar_t(ref + m);
          vp[c] = scalar_t(std::max(s2 / count - m * m, 0.0));
        }
      });
    } else {
      at::parallel_for(0, N * C, 1, [&](int64_t b, int64_t e) {
        VolumePool<scalar_t> pool(g);
        for (int64_t i = b; i < e; ++i)
          pool.run(xp + i * vin, sgn[i % C], yp + i * vout, ip ? ip + i * vout : nullptr);
      });
    }
    std::vector<scalar_t> scale, shift, invstd;
    fold<scalar_t>(bn_weight, bn_bias, mean, var, eps, scale, shift, invstd);
    // BN-ReLU of the pooled values: relu(scale * x_max + shift), x_max = sgn * max(sgn * x)
    at::parallel_for(0, N * C, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t c = i % C;
        const scalar_t sg = sgn[c], sc = scale[c], sh = shift[c];
        scalar_t* o = yp + i * vout;
        for (int64_t q = 0; q < vout; ++q) o[q] = bn_relu(sg * o[q], sc, sh);
      }
    });
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
  TORCH_CHECK(grad_y_in.sizes() == at::IntArrayRef(out_shape), "grad_y: expected shape ", out_shape, ", got ", grad_y_in.sizes());
  TORCH_CHECK(grad_y_in.scalar_type() == x.scalar_type(), "grad_y: expected dtype ", x.scalar_type(), ", got ",
              grad_y_in.scalar_type());
  TORCH_CHECK(y_in.sizes() == at::IntArrayRef(out_shape) && y_in.scalar_type() == x.scalar_type(), "y: expected the forward output (",
              out_shape, ", ", x.scalar_type(), "), got ", y_in.sizes(), " ", y_in.scalar_type());
  TORCH_CHECK(indices_in.sizes() == at::IntArrayRef(out_shape) && indices_in.scalar_type() == at::kInt,
              "indices: expected the int32 indices the forward saved (shape ", out_shape, "), got ",
              indices_in.sizes(), " ", indices_in.scalar_type());
  const at::Tensor grad_y = grad_y_in.contiguous(), y = y_in.contiguous(), indices = indices_in.contiguous();
  auto grad_x = at::empty_like(x);
  auto grad_w = at::empty({C}, x.options()), grad_b = at::empty({C}, x.options());
  T3D_DISPATCH_FP32_FP64(x, "x", "bn_relu_maxpool_backward_cpu", [&] {
    std::vector<scalar_t> scale, shift, invstd;
    fold<scalar_t>(bn_weight, bn_bias, mean, var, eps, scale, shift, invstd);
    const auto mean_c = mean.contiguous();
    const scalar_t* mp = mean_c.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* gyp = grad_y.data_ptr<scalar_t>();
    const int32_t* ip = indices.data_ptr<int32_t>();
    const int64_t vin = g.T * g.H * g.W, vout = g.To * g.Ho * g.Wo;
    std::vector<double> sum_g(C), sum_gx(C);
    // pass A: per channel, sum(g) and sum(g * (x - mean)) over the maxima ReLU lets through (y > 0); channels in
    // parallel, samples in order: deterministic
    at::parallel_for(0, C, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        double sg = 0, sgx = 0;
        for (int64_t n = 0; n < N; ++n) {
          const int64_t i = n * C + c;
          const scalar_t* xv = xp + i * vin;
          const scalar_t* yv = yp + i * vout;
          const scalar_t* gv = gyp + i * vout;
          const int32_t* iv = ip + i * vout;
          for (int64_t q = 0; q < vout; ++q)
            if (yv[q] > scalar_t(0)) {
              sg += double(gv[q]);
              sgx += double(gv[q]) * (double(xv[iv[q]]) - double(mp[c]));
            }
        }
        sum_g[c] = sg;
        sum_gx[c] = sgx * double(invstd[c]);
      }
    });
    // pass B: scatter each volume's gradient into a buffer of its own (serial: deterministic), then BN backward
    const double count = double(N * vin);
    at::parallel_for(0, N * C, 1, [&](int64_t b, int64_t e) {
      std::vector<scalar_t> gz(vin);
      for (int64_t i = b; i < e; ++i) {
        const int64_t c = i % C;
        std::fill(gz.begin(), gz.end(), scalar_t(0));
        const int32_t* iv = ip + i * vout;
        const scalar_t* yv = yp + i * vout;
        const scalar_t* gv = gyp + i * vout;
        for (int64_t q = 0; q < vout; ++q)
          if (yv[q] > scalar_t(0)) gz[iv[q]] += gv[q];
        const scalar_t* xv = xp + i * vin;
        scalar_t* out = grad_x.data_ptr<scalar_t>() + i * vin;
        const scalar_t s = scale[c];
        if (training) {
          const scalar_t mg = scalar_t(sum_g[c] / count), mgx = scalar_t(sum_gx[c] / count);
          const scalar_t m = mp[c], is = invstd[c];
          for (int64_t p = 0; p < vin; ++p) out[p] = s * (gz[p] - mg - (xv[p] - m) * is * mgx);
        } else {
          for (int64_t p = 0; p < vin; ++p) out[p] = s * gz[p];
        }
      }
    });
    for (int64_t c = 0; c < C; ++c) {
      grad_w.data_ptr<scalar_t>()[c] = scalar_t(sum_gx[c]);
      grad_b.data_ptr<scalar_t>()[c] = scalar_t(sum_g[c]);
    }
  });
  return {grad_x, grad_w, grad_b};
}

}  // namespace t3d
