// Math of the fused dense block shared by the CPU and CUDA kernels (__host__ __device__ where it can be), so
// the CPU tests exercise it. See docs/design.md ("Dense block") and
// t3d_kernels/composite/dense_block.py (the executable spec).
//
// Buffer. y: (N, C_tot, T, H, W), C_tot = C_0 + sum_i k_i. Layer i reads the prefix y[:, :C_i] (C_i = C_0 +
// sum_{j<i} k_j) and writes its k_i new channels at y[:, C_i:C_i + k_i].
//
// BN folding. With the statistics (mean, var) a layer uses (batch statistics in training, its running statistics
// in eval): invstd = 1/sqrt(var + eps), scale = gamma * invstd, shift = beta - mean * scale, and
// z = relu(x * scale + shift).
//
// BN backward as an affine correction. In training, with gp = dL/d(pre-ReLU) = dL/dz * [z > 0], M elements per
// channel, xhat = (x - mean) * invstd, Sg = sum gp and Sgx = sum gp * xhat (the grads of beta and gamma):
//   dL/dx = scale * gp  +  alpha + beta_x * x,   alpha = scale * (invstd * mean * Sgx - Sg) / M,
//                                               beta_x = -scale * invstd * Sgx / M.
// The first term is local; the correction is affine in x with per-channel coefficients known only after the
// whole reduction. Every later layer that normalizes buffer channel c adds its own (alpha, beta_x) to that
// channel's pending correction; it is applied once, when the channel's gradient is complete (when the layer that
// wrote it is reached in the backward sweep, or at the end for the input channels). In eval alpha = beta_x = 0.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace t3d {
namespace dense {

template <typename T>
T3D_HD T relu(T v) {
  return v > T(0) ? v : T(0);
}

// Per-channel folded BN: scale and shift from (gamma, beta, mean, var, eps); also returns invstd.
template <typename T, typename Acc>
T3D_HD void fold_bn(T gamma, T beta, Acc mean, Acc var, double eps, T& scale, T& shift, T& invstd) {
  Acc inv = Acc(1) / sqrt(var + Acc(eps));
  invstd = T(inv);
  scale = T(Acc(gamma) * inv);
  shift = T(Acc(beta) - mean * Acc(gamma) * inv);
}

template <typename T>
T3D_HD T bn_relu(T x, T scale, T shift) {
  return relu(x * scale + shift);
}

// Gradient through ReLU: the upstream gradient where the ReLU was active (recomputed from x, never stored).
template <typename T>
T3D_HD T relu_grad(T grad_z, T x, T scale, T shift) {
  return x * scale + shift > T(0) ? grad_z : T(0);
}

// Coefficients of the affine BN-backward correction (see the header comment); count = M.
template <typename Acc>
T3D_HD void bn_backward_affine(Acc scale, Acc invstd, Acc mean, Acc sum_g, Acc sum_gx, Acc count, Acc& alpha,
                                  Acc& beta_x) {
  alpha = scale * (invstd * mean * sum_gx - sum_g) / count;
  beta_x = -scale * invstd * sum_gx / count;
}

// Chan et al. merge of two partial (count, mean, M2) statistics into the first.
template <typename Acc>
T3D_HD void merge_stats(Acc& count, Acc& mean, Acc& m2, Acc count_b, Acc mean_b, Acc m2_b) {
  if (count_b == Acc(0)) return;
  Acc total = count + count_b;
  Acc delta = mean_b - mean;
  mean += delta * count_b / total;
  m2 += m2_b + delta * delta * count * count_b / total;
  count = total;
}

// Offset of the first channel of layer `layer` in the buffer: C_0 + sum_{j < layer} k_j.
T3D_HD int64_t layer_in_channels(int64_t c0, const int64_t* growth, int64_t layer) {
  int64_t c = c0;
  for (int64_t j = 0; j < layer; ++j) c += growth[j];
  return c;
}

}  // namespace dense
}  // namespace t3d
