// Host-side helpers of every CUDA kernel file: error checks and the current stream. Only core torch headers (not
// ATen/cuda: those need the whole CUDA toolkit, cuSPARSE included, to compile).
#pragma once

#include <c10/core/Device.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

namespace t3d {

inline void cuda_check(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "CUDA error: ", cudaGetErrorString(err)); }

// after every kernel launch: a bad configuration fails here, named, not at the next synchronizing call
inline void check_launch() {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// PyTorch's current stream of `device`, so the kernels order with the surrounding torch ops
inline cudaStream_t current_stream(const c10::Device& device) {
  const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(impl->getStream(device).native_handle());
}

}  // namespace t3d
