// Winograd F(2x2x2, 3x3x3): the 'same' 3x3x3 convolution (stride 1, padding 1, no bias) of the dense block's
// conv2 and of its input gradient, on the CPU in float32 with AVX-512.
//
// Why: at T3D-121's shapes this convolution is most of the dense block's (and the model's) arithmetic, and oneDNN
// already runs it at ~90% of this CPU's FMA peak; the only way past it is fewer multiplications. F(2x2x2, 3x3x3)
// computes each 2x2x2 output tile from a 4x4x4 input patch with 64 products per (input, output) channel pair
// instead of 8 * 27 = 216: 0.30x the multiply-adds, as 64 GEMMs over the channels. See docs/design.md.
#pragma once

#include <ATen/ATen.h>

namespace t3d {

// True when winograd_conv3x3x3 takes (x, w) here: a float32 5-D x (N, C, T, H, W) whose samples are each
// contiguous (a channel slice of a bigger tensor is fine), a float32 (K, C, 3, 3, 3) weight, a CPU with AVX-512F or
// AVX2+FMA.
bool winograd_conv3x3x3_applies(const at::Tensor& x, const at::Tensor& w);

// ... and enough output tiles for it to beat oneDNN's direct convolution here (winograd_conv3d.cpp: min_tiles(), per
// ISA).
bool winograd_conv3x3x3_pays(const at::Tensor& x, const at::Tensor& w);

// y (N, K, T, H, W) = conv3d(x, w, padding=1). Written into `out` when it is defined (shape and dtype checked; its
// samples may be a channel slice of a bigger tensor, as the dense block's concatenated output).
at::Tensor winograd_conv3x3x3(const at::Tensor& x, const at::Tensor& w, at::Tensor out = at::Tensor());

// dL/dw (K, C, 3, 3, 3) of y = conv3d(x, w, padding=1) for dL/dy = grad_y (N, K, T, H, W): 64 GEMMs summing over
// the tiles, dL/dU[p] = sum over tiles of V[p] Mb[p]^T, then G^T (dL/dU) G in each dim. Each sample of x and of
// grad_y contiguous (channel slices are fine).
at::Tensor winograd_conv3x3x3_grad_weight(const at::Tensor& x, const at::Tensor& grad_y);

// ... for (x, grad_y) of the conv with weight w's shape, and enough tiles for it to beat ATen's (per ISA:
// winograd_conv3d.cpp).
bool winograd_conv3x3x3_grad_weight_pays(const at::Tensor& x, const at::Tensor& grad_y, const at::Tensor& w);

}  // namespace t3d
