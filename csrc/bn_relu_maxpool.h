// Backend kernels of t3d::bn_relu_maxpool (the T3D stem: BN -> ReLU -> MaxPool3d). Signatures mirror
// t3d_kernels/ops/bn_relu_maxpool.py. mean/var are the batch statistics in training and the running statistics in
// eval (the running-stat update is done in Python); `training` tells the backward whether they depend on x.
#pragma once

#include <torch/extension.h>

#include <tuple>

namespace t3d {

// (y, mean, var, indices): mean/var the batch statistics in training (running ones copied in eval); indices (int32,
// flat in each (T, H, W) volume) of the maxima when save_indices, else empty
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_maxpool_forward_cpu(
    const at::Tensor& x, const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& running_mean,
    const at::Tensor& running_var, at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
    bool training, double eps, bool save_indices);

// (grad_x, grad_bn_weight, grad_bn_bias) from the forward's y and indices
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_maxpool_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    const at::Tensor& mean, const at::Tensor& var, const at::Tensor& y, const at::Tensor& indices,
    at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding, bool training, double eps);

}  // namespace t3d
