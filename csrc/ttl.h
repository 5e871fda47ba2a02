// Backend kernels of the TTL op. Signatures mirror t3d_kernels/ops/ttl.py:
//   forward:  y = ttl(x; BN with the given mean/var; weights; pool)       (no running-stat update here)
//   backward: grad_x, grad_bn_weight, grad_bn_bias, grad_weights
// mean/var are the batch statistics in training and the running statistics in eval; `training` tells the
// backward whether the statistics depend on x.
#pragma once

#include <torch/extension.h>

#include <tuple>
#include <vector>

namespace t3d {

using TtlGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>>;

void check_ttl_inputs(const at::Tensor& x, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                      const at::Tensor& mean, const at::Tensor& var, const std::vector<at::Tensor>& weights);

// per-channel batch mean and biased variance of x (N, C, T, H, W), any strides
std::tuple<at::Tensor, at::Tensor> batch_stats_cpu(const at::Tensor& x);

at::Tensor ttl_forward_cpu(const at::Tensor& x, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                           const at::Tensor& mean, const at::Tensor& var, const std::vector<at::Tensor>& weights,
                           bool pool, double eps);
TtlGrads ttl_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& bn_weight,
                          const at::Tensor& bn_bias, const at::Tensor& mean, const at::Tensor& var,
                          const std::vector<at::Tensor>& weights, bool pool, bool training, double eps);

#ifdef WITH_CUDA
at::Tensor ttl_forward_cuda(const at::Tensor& x, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                            const at::Tensor& mean, const at::Tensor& var, const std::vector<at::Tensor>& weights,
                            bool pool, double eps);
TtlGrads ttl_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& bn_weight,
                           const at::Tensor& bn_bias, const at::Tensor& mean, const at::Tensor& var,
                           const std::vector<at::Tensor>& weights, bool pool, bool training, double eps);
#endif

}  // namespace t3d
