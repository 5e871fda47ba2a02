// Backend kernels of the fused dense block (docs/design.md, "Dense block"). Signatures mirror
// t3d_kernels/composite/dense_block.py.
//
// forward(x, per-layer BN1/conv1/BN2/conv2 parameters, training, eps) ->
//   (y, mean1, var1, mean2, var2)
// y: (N, C_0 + sum k_i, T, H, W), the block's output and the one buffer every layer reads its prefix from.
// mean1/var1: (sum_i C_i,) the statistics each layer's BN1 used, layer after layer (in training the shared
// batch statistics of the buffer channels 0..C_i-1, computed once per channel; in eval its running statistics);
// mean2/var2: (sum_i B_i,) the same for BN2. Variances are biased (the caller converts for the running stats).
//
// The CPU forward also returns saved_h: in training the bottleneck h = conv1(BN1-ReLU(prefix)) before BN2 of every
// layer with C_i >= 2 B_i (where the recompute is dearest per kept element), flat, layer after layer, each
// (N, B_i, T, H, W); in eval an empty tensor.
//
// backward(grad_y, y, mean1, var1, mean2, var2, [saved_h,] parameters, training, eps) ->
//   (grad_x, grad_bn1_weight[], grad_bn1_bias[], grad_conv1[], grad_bn2_weight[], grad_bn2_bias[], grad_conv2[])
// Nothing normalized is saved: BN2-ReLU is recomputed from h, and (CPU without saved_h, or CUDA) h from y.
//
// Synchronised BN (docs/design.md "Synchronised BatchNorm"; CPU kernels only). In training, a non-empty
// `merge_stats` is called once per set of channels whose statistics are written (x's channels, then per layer its
// bottleneck and its new channels) with this process's biased (mean, var) in float64 and returns the group's; a
// non-empty `reduce_sums` is called once per BN of each layer in backward with the float64 concatenation
// [sum dy, sum dy * xhat] and returns it summed over the group, and `group_count` is then the group's element count
// per channel. The parameter gradients stay this process's (DDP averages them), as in nn.SyncBatchNorm. Empty
// functions: no synchronisation, no extra work.
#pragma once

#include <torch/extension.h>

#include <functional>
#include <tuple>
#include <vector>

namespace t3d {

using TensorList = std::vector<at::Tensor>;
using DenseForward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// DenseForward and saved_h
using DenseForwardCpu = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using DenseGrads = std::tuple<at::Tensor, TensorList, TensorList, TensorList, TensorList, TensorList, TensorList>;
// (mean, var) of this process -> the group's (mean, var); float64, one entry per channel
using StatsMerge = std::function<std::tuple<at::Tensor, at::Tensor>(at::Tensor, at::Tensor)>;
// float64 sums of this process -> the same sums over the group
using SumsReduce = std::function<at::Tensor(at::Tensor)>;

void check_dense_block_inputs(const at::Tensor& x, const TensorList& bn1_weight, const TensorList& bn1_bias,
                              const TensorList& conv1_weight, const TensorList& bn2_weight, const TensorList& bn2_bias,
                              const TensorList& conv2_weight);

DenseForwardCpu dense_block_forward_cpu(const at::Tensor& x, const TensorList& bn1_weight,
                                        const TensorList& bn1_bias, const TensorList& bn1_mean,
                                        const TensorList& bn1_var, const TensorList& conv1_weight,
                                        const TensorList& bn2_weight, const TensorList& bn2_bias,
                                        const TensorList& bn2_mean, const TensorList& bn2_var,
                                        const TensorList& conv2_weight, bool training, double eps,
                                        const StatsMerge& merge_stats = {});
// saved_h: the forward's, or an undefined/empty tensor (h is then recomputed)
DenseGrads dense_block_backward_cpu(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& mean1,
                                    const at::Tensor& var1, const at::Tensor& mean2, const at::Tensor& var2,
                                    const at::Tensor& saved_h, const TensorList& bn1_weight,
                                    const TensorList& bn1_bias, const TensorList& conv1_weight,
                                    const TensorList& bn2_weight, const TensorList& bn2_bias,
                                    const TensorList& conv2_weight, bool training, double eps,
                                    const SumsReduce& reduce_sums = {}, int64_t group_count = 0);

#ifdef WITH_CUDA
DenseForward dense_block_forward_cuda(const at::Tensor& x, const TensorList& bn1_weight, const TensorList& bn1_bias,
                                      const TensorList& bn1_mean, const TensorList& bn1_var,
                                      const TensorList& conv1_weight, const TensorList& bn2_weight,
                                      const TensorList& bn2_bias, const TensorList& bn2_mean,
                                      const TensorList& bn2_var, const TensorList& conv2_weight, bool training,
                                      double eps);
DenseGrads dense_block_backward_cuda(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& mean1,
                                     const at::Tensor& var1, const at::Tensor& mean2, const at::Tensor& var2,
                                     const TensorList& bn1_weight, const TensorList& bn1_bias,
                                     const TensorList& conv1_weight, const TensorList& bn2_weight,
                                     const TensorList& bn2_bias, const TensorList& conv2_weight, bool training,
                                     double eps);
#endif

}  // namespace t3d
