// Dtype dispatch of kernels that take float32 or float64 only: the check names the argument and the kernel (a clear
// error, not ATen's generic "not implemented for 'Half'"), then AT_DISPATCH_FLOATING_TYPES runs the body with
// scalar_t. The Python backends declare the same dtypes (t3d_kernels/ops/*.py), so dispatch never sends others here.
#pragma once

#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>

#define T3D_DISPATCH_FP32_FP64(tensor, arg, kernel, ...)                                                      \
  [&] {                                                                                                       \
    const auto t3d_dtype_ = (tensor).scalar_type();                                                           \
    TORCH_CHECK(t3d_dtype_ == at::kFloat || t3d_dtype_ == at::kDouble, arg, ": the " kernel                   \
                " takes float32 or float64, got ", t3d_dtype_);                                              \
    return AT_DISPATCH_FLOATING_TYPES(t3d_dtype_, kernel, __VA_ARGS__);                                       \
  }()
