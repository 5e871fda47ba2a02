// CUDA kernels of the fused dense block (docs/design.md "Dense block"; per-element math in common/dense_block_math.h, shared
// with the CPU kernels and so covered by the CPU tests).
//
// Same algorithm as csrc/cpu/dense_block_kernel.cpp: one buffer y, batch statistics once per channel, nothing
// normalized saved, backward by recomputation with BN1's backward split into a local term and a pending affine
// correction per channel. GEMMs are cuBLAS (at::matmul) and the 3x3x3 conv cuDNN (at::convolution[_backward]);
// the normalized prefix of a layer is a transient buffer freed right after its GEMM (the Triton backend fuses
// the normalization into its GEMM's load instead).
// Only core torch headers (not ATen/cuda: those need the whole CUDA toolkit, cuSPARSE included, to compile).
#include <c10/core/DeviceGuard.h>
#include <cuda_runtime.h>
#include <torch/extension.h>

#include <vector>

#include "common/cuda_launch.h"
#include "common/dense_block_math.h"
#include "common/dispatch.h"
#include "dense_block.h"

namespace t3d {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535)); }

__device__ double block_sum(double v, double* shared) {
  const int tid = threadIdx.x;
  shared[tid] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (tid < s) shared[tid] += shared[tid + s];
    __syncthreads();
  }
  const double total = shared[0];
  __syncthreads();
  return total;
}

// One block per channel c of a (N, C, P) view (channel stride P, sample stride stride_n): biased mean, var.
template <typename scalar_t>
__global__ void channel_stats_kernel(const scalar_t* __restrict__ x, int64_t N, int64_t P, int64_t stride_n,
                                     double* __restrict__ mean, double* __restrict__ var) {
  __shared__ double shared[kThreads];
  const int64_t c = blockIdx.x;
  const int64_t count = N * P;
  double s = 0;
  for (int64_t e = threadIdx.x; e < count; e += blockDim.x) s += double(x[(e / P) * stride_n + c * P + e % P]);
  const double m = block_sum(s, shared) / double(count);
  double s2 = 0;
  for (int64_t e = threadIdx.x; e < count; e += blockDim.x) {
    const double d = double(x[(e / P) * stride_n + c * P + e % P]) - m;
    s2 += d * d;
  }
  const double m2 = block_sum(s2, shared);
  if (threadIdx.x == 0) {
    mean[c] = m;
    var[c] = m2 / double(count);
  }
}

template <typename scalar_t>
__global__ void fold_kernel(const scalar_t* __restrict__ gamma, const scalar_t* __restrict__ beta,
                            const double* __restrict__ mean, const double* __restrict__ var, double eps, int64_t C,
                            scalar_t* __restrict__ scale, scalar_t* __restrict__ shift, scalar_t* __restrict__ invstd) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c < C) dense::fold_bn<scalar_t, double>(gamma[c], beta[c], mean[c], var[c], eps, scale[c], shift[c], invstd[c]);
}

// out (N, C, P) contiguous = relu(in * scale + shift), in a (N, C, P) view with sample stride in_stride_n.
template <typename scalar_t>
__global__ void bn_relu_kernel(const scalar_t* __restrict__ in, int64_t in_stride_n, scalar_t* __restrict__ out,
                               int64_t N, int64_t C, int64_t P, const scalar_t* __restrict__ scale,
                               const scalar_t* __restrict__ shift) {
  const int64_t total = N * C * P;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = e / (C * P), c = (e / P) % C, p = e % P;
    out[e] = dense::bn_relu(in[n * in_stride_n + c * P + p], scale[c], shift[c]);
  }
}

// One block per channel: sums of gp = relu_grad(g, h) and gp * h over (N, P); g, h contiguous (N, C, P).
template <typename scalar_t>
__global__ void bn_bwd_sums_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ h, int64_t N,
                                   int64_t C, int64_t P, const scalar_t* __restrict__ scale,
                                   const scalar_t* __restrict__ shift, double* __restrict__ sum_g,
                                   double* __restrict__ sum_gh) {
  __shared__ double shared[kThreads];
  const int64_t c = blockIdx.x;
  double a1 = 0, a2 = 0;
  for (int64_t e = threadIdx.x; e < N * P; e += blockDim.x) {
    const int64_t i = ((e / P) * C + c) * P + e % P;
    const scalar_t gp = dense::relu_grad(g[i], h[i], scale[c], shift[c]);
    a1 += double(gp);
    a2 += double(gp) * double(h[i]);
  }
  a1 = block_sum(a1, shared);
  a2 = block_sum(a2, shared);
  if (threadIdx.x == 0) {
    sum_g[c] = a1;
    sum_gh[c] = a2;
  }
}

// Per channel: sum gp*xhat from sum gp*x, the grads of gamma and beta, and (training) the affine correction,
// added to corr_a/corr_b when given (BN1) or returned in alpha/beta (BN2).
template <typename scalar_t>
__global__ void bn_bwd_finish_kernel(const double* __restrict__ sum_g, const double* __restrict__ sum_gx_raw,
                                     const double* __restrict__ mean, const scalar_t* __restrict__ scale,
                                     const scalar_t* __restrict__ invstd, int64_t C, double count, bool training,
                                     scalar_t* __restrict__ grad_gamma, scalar_t* __restrict__ grad_beta,
                                     double* __restrict__ alpha, double* __restrict__ beta, bool accumulate) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  const double inv = double(invstd[c]);
  const double sgx = (sum_gx_raw[c] - mean[c] * sum_g[c]) * inv;
  grad_gamma[c] = scalar_t(sgx);
  grad_beta[c] = scalar_t(sum_g[c]);
  double a = 0, b = 0;
  if (training) dense::bn_backward_affine<double>(double(scale[c]), inv, mean[c], sum_g[c], sgx, count, a, b);
  if (accumulate) {
    alpha[c] += a;
    beta[c] += b;
  } else {
    alpha[c] = a;
    beta[c] = b;
  }
}

// grad_h = scale * relu_grad(g, h) + alpha + beta * h, contiguous (N, C, P).
template <typename scalar_t>
__global__ void bn_bwd_apply_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ h, int64_t N,
                                    int64_t C, int64_t P, const scalar_t* __restrict__ scale,
                                    const scalar_t* __restrict__ shift, const double* __restrict__ alpha,
                                    const double* __restrict__ beta, scalar_t* __restrict__ out) {
  const int64_t total = N * C * P;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = (e / P) % C;
    out[e] = scale[c] * dense::relu_grad(g[e], h[e], scale[c], shift[c]) + scalar_t(alpha[c]) +
             scalar_t(beta[c]) * h[e];
  }
}

// One block per prefix channel: gp = relu_grad(ga, x); G += scale * gp; sums of gp and gp * x.
template <typename scalar_t>
__global__ void conv1_bn_bwd_local_kernel(const scalar_t* __restrict__ ga, const scalar_t* __restrict__ y,
                                          scalar_t* __restrict__ G, int64_t N, int64_t C, int64_t P,
                                          int64_t stride_n, const scalar_t* __restrict__ scale,
                                          const scalar_t* __restrict__ shift, double* __restrict__ sum_g,
                                          double* __restrict__ sum_gx) {
  __shared__ double shared[kThreads];
  const int64_t c = blockIdx.x;
  double a1 = 0, a2 = 0;
  for (int64_t e = threadIdx.x; e < N * P; e += blockDim.x) {
    const int64_t n = e / P, p = e % P;
    const int64_t iy = n * stride_n + c * P + p;
    const scalar_t gp = dense::relu_grad(ga[(n * C + c) * P + p], y[iy], scale[c], shift[c]);
    G[iy] += scale[c] * gp;
    a1 += double(gp);
    a2 += double(gp) * double(y[iy]);
  }
  a1 = block_sum(a1, shared);
  a2 = block_sum(a2, shared);
  if (threadIdx.x == 0) {
    sum_g[c] = a1;
    sum_gx[c] = a2;
  }
}

// out (N, K, P) contiguous = G[:, c0:c0+K] + corr_a + corr_b * y[:, c0:c0+K] (pending corrections applied).
template <typename scalar_t>
__global__ void apply_corrections_kernel(const scalar_t* __restrict__ G, const scalar_t* __restrict__ y, int64_t N,
                                         int64_t K, int64_t P, int64_t stride_n, int64_t c0,
                                         const double* __restrict__ corr_a, const double* __restrict__ corr_b,
                                         scalar_t* __restrict__ out) {
  const int64_t total = N * K * P;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = e / (K * P), c = c0 + (e / P) % K, p = e % P;
    const int64_t i = n * stride_n + c * P + p;
    out[e] = G[i] + scalar_t(corr_a[c]) + scalar_t(corr_b[c]) * y[i];
  }
}

struct Layout {
  int64_t N, C0, Ctot, T, H, W, P;
  std::vector<int64_t> cin, growth, bott, off1, off2;
};

Layout make_layout(int64_t N, int64_t C0, int64_t T, int64_t H, int64_t W, const TensorList& conv1_weight,
                   const TensorList& conv2_weight) {
  Layout l{N, C0, C0, T, H, W, T * H * W, {}, {}, {}, {}, {}};
  int64_t o1 = 0, o2 = 0;
  for (size_t i = 0; i < conv1_weight.size(); ++i) {
    l.cin.push_back(l.Ctot);
    l.bott.push_back(conv1_weight[i].size(0));
    l.growth.push_back(conv2_weight[i].size(0));
    l.off1.push_back(o1);
    l.off2.push_back(o2);
    o1 += l.Ctot;
    o2 += l.bott.back();
    l.Ctot += l.growth.back();
  }
  return l;
}

std::vector<int64_t> same_padding(const at::Tensor& w) { return {w.size(2) / 2, w.size(3) / 2, w.size(4) / 2}; }

template <typename scalar_t>
void fold(const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& var, double eps,
          at::Tensor& scale, at::Tensor& shift, at::Tensor& invstd) {
  const int64_t C = gamma.numel();
  scale = at::empty({C}, gamma.options());
  shift = at::empty_like(scale);
  invstd = at::empty_like(scale);
  auto stream = current_stream(gamma.device());
  auto g = gamma.contiguous(), b = beta.contiguous();
  fold_kernel<scalar_t><<<blocks_for(C), kThreads, 0, stream>>>(
      g.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), mean.data_ptr<double>(), var.data_ptr<double>(), eps, C,
      scale.data_ptr<scalar_t>(), shift.data_ptr<scalar_t>(), invstd.data_ptr<scalar_t>());
}

// normalized prefix (N, cin, P) then h = W1 @ it: (N, B, T, H, W); the normalized prefix is freed on return.
template <typename scalar_t>
at::Tensor bn_relu_conv1x1(const at::Tensor& y, const Layout& l, int64_t cin, const at::Tensor& scale,
                           const at::Tensor& shift, const at::Tensor& w1, at::Tensor* normalized = nullptr) {
  auto a = at::empty({l.N, cin, l.P}, y.options());
  auto stream = current_stream(y.device());
  bn_relu_kernel<scalar_t><<<blocks_for(a.numel()), kThreads, 0, stream>>>(
      y.data_ptr<scalar_t>(), l.Ctot * l.P, a.data_ptr<scalar_t>(), l.N, cin, l.P, scale.data_ptr<scalar_t>(),
      shift.data_ptr<scalar_t>());
  check_launch();
  auto h = at::matmul(w1.reshape({w1.size(0), cin}), a).view({l.N, w1.size(0), l.T, l.H, l.W});
  if (normalized) *normalized = a;
  return h;
}

template <typename scalar_t>
DenseForward forward_impl(const at::Tensor& x, const TensorList& bn1_weight, const TensorList& bn1_bias,
                          const TensorList& bn1_mean, const TensorList& bn1_var, const TensorList& conv1_weight,
                          const TensorList& bn2_weight, const TensorList& bn2_bias, const TensorList& bn2_mean,
                          const TensorList& bn2_var, const TensorList& conv2_weight, bool training, double eps) {
  const Layout l = make_layout(x.size(0), x.size(1), x.size(2), x.size(3), x.size(4), conv1_weight, conv2_weight);
  auto stream = current_stream(x.device());
  auto y = at::empty({l.N, l.Ctot, l.T, l.H, l.W}, x.options().memory_format(at::MemoryFormat::Contiguous));
  y.narrow(1, 0, l.C0).copy_(x);
  auto dopt = x.options().dtype(at::kDouble);
  auto cat = [&](const TensorList& ts) {
    std::vector<at::Tensor> parts;
    for (const auto& t : ts) parts.push_back(t.detach().reshape({-1}).to(at::kDouble));
    return at::cat(parts);
  };
  at::Tensor chan_mean, chan_var;
  std::vector<at::Tensor> m1s, v1s, m2s, v2s;
  if (training) {
    chan_mean = at::empty({l.Ctot}, dopt);
    chan_var = at::empty({l.Ctot}, dopt);
    channel_stats_kernel<scalar_t><<<l.C0, kThreads, 0, stream>>>(y.data_ptr<scalar_t>(), l.N, l.P, l.Ctot * l.P,
                                                                   chan_mean.data_ptr<double>(),
                                                                   chan_var.data_ptr<double>());
    check_launch();
  }
  at::Tensor run1m = training ? at::Tensor() : cat(bn1_mean), run1v = training ? at::Tensor() : cat(bn1_var);
  at::Tensor run2m = training ? at::Tensor() : cat(bn2_mean), run2v = training ? at::Tensor() : cat(bn2_var);
  for (size_t i = 0; i < conv1_weight.size(); ++i) {
    const int64_t cin = l.cin[i], bott = l.bott[i], k = l.growth[i];
    at::Tensor m1 = training ? chan_mean.narrow(0, 0, cin).clone() : run1m.narrow(0, l.off1[i], cin);
    at::Tensor v1 = training ? chan_var.narrow(0, 0, cin).clone() : run1v.narrow(0, l.off1[i], cin);
    at::Tensor scale1, shift1, invstd1, scale2, shift2, invstd2;
    fold<scalar_t>(bn1_weight[i], bn1_bias[i], m1, v1, eps, scale1, shift1, invstd1);
    at::Tensor h = bn_relu_conv1x1<scalar_t>(y, l, cin, scale1, shift1, conv1_weight[i]).contiguous();
    at::Tensor m2, v2;
    if (training) {
      m2 = at::empty({bott}, dopt);
      v2 = at::empty({bott}, dopt);
      channel_stats_kernel<scalar_t><<<bott, kThreads, 0, stream>>>(h.data_ptr<scalar_t>(), l.N, l.P, bott * l.P,
                                                                     m2.data_ptr<double>(), v2.data_ptr<double>());
      check_launch();
      m1s.push_back(m1);
      v1s.push_back(v1);
      m2s.push_back(m2);
      v2s.push_back(v2);
    } else {
      m2 = run2m.narrow(0, l.off2[i], bott);
      v2 = run2v.narrow(0, l.off2[i], bott);
    }
    fold<scalar_t>(bn2_weight[i], bn2_bias[i], m2, v2, eps, scale2, shift2, invstd2);
    bn_relu_kernel<scalar_t><<<blocks_for(h.numel()), kThreads, 0, stream>>>(
        h.data_ptr<scalar_t>(), bott * l.P, h.data_ptr<scalar_t>(), l.N, bott, l.P, scale2.data_ptr<scalar_t>(),
        shift2.data_ptr<scalar_t>());
    check_launch();
    const std::vector<int64_t> one{1, 1, 1};
    auto out = at::convolution(h, conv2_weight[i], {}, one, same_padding(conv2_weight[i]), one, false, {0, 0, 0}, 1);
    y.narrow(1, cin, k).copy_(out);
    if (training) {
      channel_stats_kernel<scalar_t><<<k, kThreads, 0, stream>>>(
          y.data_ptr<scalar_t>() + cin * l.P, l.N, l.P, l.Ctot * l.P, chan_mean.data_ptr<double>() + cin,
          chan_var.data_ptr<double>() + cin);
      check_launch();
    }
  }
  auto dt = x.scalar_type();
  if (training) return {y, at::cat(m1s).to(dt), at::cat(v1s).to(dt), at::cat(m2s).to(dt), at::cat(v2s).to(dt)};
  return {y, run1m.to(dt), run1v.to(dt), run2m.to(dt), run2v.to(dt)};
}

template <typename scalar_t>
DenseGrads backward_impl(const at::Tensor& grad_y, const at::Tensor& y_in, const at::Tensor& mean1_in,
                         const at::Tensor& var1_in, const at::Tensor& mean2_in, const at::Tensor& var2_in,
                         const TensorList& bn1_weight, const TensorList& bn1_bias, const TensorList& conv1_weight,
                         const TensorList& bn2_weight, const TensorList& bn2_bias, const TensorList& conv2_weight,
                         bool training, double eps) {
  auto y = y_in.contiguous();
  int64_t c0 = y.size(1);
  for (const auto& w : conv2_weight) c0 -= w.size(0);
  const Layout l = make_layout(y.size(0), c0, y.size(2), y.size(3), y.size(4), conv1_weight, conv2_weight);
  const int64_t L = static_cast<int64_t>(conv1_weight.size());
  auto stream = current_stream(y.device());
  auto G = at::empty_like(y);
  G.copy_(grad_y);
  auto dopt = y.options().dtype(at::kDouble);
  auto corr_a = at::zeros({l.Ctot}, dopt), corr_b = at::zeros({l.Ctot}, dopt);
  auto mean1 = mean1_in.to(at::kDouble).contiguous(), var1 = var1_in.to(at::kDouble).contiguous();
  auto mean2 = mean2_in.to(at::kDouble).contiguous(), var2 = var2_in.to(at::kDouble).contiguous();
  const double count = double(l.N * l.P);
  const std::vector<int64_t> one{1, 1, 1};
  TensorList g_bn1_w(L), g_bn1_b(L), g_conv1(L), g_bn2_w(L), g_bn2_b(L), g_conv2(L);
  for (int64_t i = L - 1; i >= 0; --i) {
    const int64_t cin = l.cin[i], bott = l.bott[i], k = l.growth[i];
    auto gout = at::empty({l.N, k, l.T, l.H, l.W}, y.options());
    apply_corrections_kernel<scalar_t><<<blocks_for(gout.numel()), kThreads, 0, stream>>>(
        G.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), l.N, k, l.P, l.Ctot * l.P, cin, corr_a.data_ptr<double>(),
        corr_b.data_ptr<double>(), gout.data_ptr<scalar_t>());
    check_launch();
    auto m1 = mean1.narrow(0, l.off1[i], cin), v1 = var1.narrow(0, l.off1[i], cin);
    auto m2 = mean2.narrow(0, l.off2[i], bott), v2 = var2.narrow(0, l.off2[i], bott);
    at::Tensor scale1, shift1, invstd1, scale2, shift2, invstd2;
    fold<scalar_t>(bn1_weight[i], bn1_bias[i], m1, v1, eps, scale1, shift1, invstd1);
    fold<scalar_t>(bn2_weight[i], bn2_bias[i], m2, v2, eps, scale2, shift2, invstd2);
    at::Tensor a;
    at::Tensor h = bn_relu_conv1x1<scalar_t>(y, l, cin, scale1, shift1, conv1_weight[i], &a).contiguous();
    auto z2 = at::empty_like(h);
    bn_relu_kernel<scalar_t><<<blocks_for(h.numel()), kThreads, 0, stream>>>(
        h.data_ptr<scalar_t>(), bott * l.P, z2.data_ptr<scalar_t>(), l.N, bott, l.P, scale2.data_ptr<scalar_t>(),
        shift2.data_ptr<scalar_t>());
    check_launch();
    auto r = at::convolution_backward(gout, z2, conv2_weight[i], c10::nullopt, one, same_padding(conv2_weight[i]),
                                      one, false, {0, 0, 0}, 1, {true, true, false});
    z2.reset();
    auto grad_z2 = std::get<0>(r).contiguous();
    g_conv2[i] = std::get<1>(r);
    // BN2 backward
    auto sg = at::empty({bott}, dopt), sgh = at::empty({bott}, dopt);
    bn_bwd_sums_kernel<scalar_t><<<bott, kThreads, 0, stream>>>(grad_z2.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(),
                                                                 l.N, bott, l.P, scale2.data_ptr<scalar_t>(),
                                                                 shift2.data_ptr<scalar_t>(), sg.data_ptr<double>(),
                                                                 sgh.data_ptr<double>());
    check_launch();
    g_bn2_w[i] = at::empty({bott}, y.options());
    g_bn2_b[i] = at::empty({bott}, y.options());
    auto alpha2 = at::empty({bott}, dopt), beta2 = at::empty({bott}, dopt);
    bn_bwd_finish_kernel<scalar_t><<<blocks_for(bott), kThreads, 0, stream>>>(
        sg.data_ptr<double>(), sgh.data_ptr<double>(), m2.data_ptr<double>(), scale2.data_ptr<scalar_t>(),
        invstd2.data_ptr<scalar_t>(), bott, count, training, g_bn2_w[i].data_ptr<scalar_t>(),
        g_bn2_b[i].data_ptr<scalar_t>(), alpha2.data_ptr<double>(), beta2.data_ptr<double>(), false);
    check_launch();
    auto grad_h = at::empty_like(h);
    bn_bwd_apply_kernel<scalar_t><<<blocks_for(h.numel()), kThreads, 0, stream>>>(
        grad_z2.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), l.N, bott, l.P, scale2.data_ptr<scalar_t>(),
        shift2.data_ptr<scalar_t>(), alpha2.data_ptr<double>(), beta2.data_ptr<double>(), grad_h.data_ptr<scalar_t>());
    check_launch();
    h.reset();
    grad_z2.reset();
    // conv1 backward (cuBLAS) and BN1 backward's local term; its correction joins the pending ones
    auto gh = grad_h.view({l.N, bott, l.P});
    auto w1 = conv1_weight[i].reshape({bott, cin});
    g_conv1[i] = at::matmul(gh, a.transpose(1, 2)).sum(0).view(conv1_weight[i].sizes());
    a.reset();
    auto ga = at::matmul(w1.t(), gh).contiguous();
    auto s1 = at::empty({cin}, dopt), sx1 = at::empty({cin}, dopt);
    conv1_bn_bwd_local_kernel<scalar_t><<<cin, kThreads, 0, stream>>>(
        ga.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), G.data_ptr<scalar_t>(), l.N, cin, l.P, l.Ctot * l.P,
        scale1.data_ptr<scalar_t>(), shift1.data_ptr<scalar_t>(), s1.data_ptr<double>(), sx1.data_ptr<double>());
    check_launch();
    g_bn1_w[i] = at::empty({cin}, y.options());
    g_bn1_b[i] = at::empty({cin}, y.options());
    bn_bwd_finish_kernel<scalar_t><<<blocks_for(cin), kThreads, 0, stream>>>(
        s1.data_ptr<double>(), sx1.data_ptr<double>(), m1.data_ptr<double>(), scale1.data_ptr<scalar_t>(),
        invstd1.data_ptr<scalar_t>(), cin, count, training, g_bn1_w[i].data_ptr<scalar_t>(),
        g_bn1_b[i].data_ptr<scalar_t>(), corr_a.data_ptr<double>(), corr_b.data_ptr<double>(), true);
    check_launch();
  }
  auto grad_x = at::empty({l.N, l.C0, l.T, l.H, l.W}, y.options());
  apply_corrections_kernel<scalar_t><<<blocks_for(grad_x.numel()), kThreads, 0, stream>>>(
      G.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), l.N, l.C0, l.P, l.Ctot * l.P, 0, corr_a.data_ptr<double>(),
      corr_b.data_ptr<double>(), grad_x.data_ptr<scalar_t>());
  check_launch();
  return {grad_x, g_bn1_w, g_bn1_b, g_conv1, g_bn2_w, g_bn2_b, g_conv2};
}

}  // namespace

DenseForward dense_block_forward_cuda(const at::Tensor& x, const TensorList& bn1_weight, const TensorList& bn1_bias,
                                      const TensorList& bn1_mean, const TensorList& bn1_var,
                                      const TensorList& conv1_weight, const TensorList& bn2_weight,
                                      const TensorList& bn2_bias, const TensorList& bn2_mean,
                                      const TensorList& bn2_var, const TensorList& conv2_weight, bool training,
                                      double eps) {
  check_dense_block_inputs(x, bn1_weight, bn1_bias, conv1_weight, bn2_weight, bn2_bias, conv2_weight);
  c10::DeviceGuard guard(x.device());
  return T3D_DISPATCH_FP32_FP64(x, "x", "CUDA dense block kernel", [&] {
    return forward_impl<scalar_t>(x, bn1_weight, bn1_bias, bn1_mean, bn1_var, conv1_weight, bn2_weight, bn2_bias,
                                  bn2_mean, bn2_var, conv2_weight, training, eps);
  });
}

DenseGrads dense_block_backward_cuda(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& mean1,
                                     const at::Tensor& var1, const at::Tensor& mean2, const at::Tensor& var2,
                                     const TensorList& bn1_weight, const TensorList& bn1_bias,
                                     const TensorList& conv1_weight, const TensorList& bn2_weight,
                                     const TensorList& bn2_bias, const TensorList& conv2_weight, bool training,
                                     double eps) {
  TORCH_CHECK(grad_y.sizes() == y.sizes(), "grad_y: expected shape ", y.sizes(), ", got ", grad_y.sizes());
  c10::DeviceGuard guard(y.device());
  return T3D_DISPATCH_FP32_FP64(y, "y", "CUDA dense block kernel", [&] {
    return backward_impl<scalar_t>(grad_y, y, mean1, var1, mean2, var2, bn1_weight, bn1_bias, conv1_weight,
                                   bn2_weight, bn2_bias, conv2_weight, training, eps);
  });
}

}  // namespace t3d
