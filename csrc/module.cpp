// The Python module t3d_kernels._C: each op's file contributes its functions through an init_* hook, so
// the module is declared once and an op's C++ lives in files named after it.
#include <torch/extension.h>

#include "common/cpu_features.h"

namespace t3d {
void init_ttl(pybind11::module& m);
void init_dense_block(pybind11::module& m);
void init_bn_relu_maxpool(pybind11::module& m);
void init_winograd(pybind11::module& m);
void init_conv3d_input_grad(pybind11::module& m);
}  // namespace t3d

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "t3d-kernels compiled kernels (CPU; CUDA when built with it)";
  m.def("built_with_cuda", []() {
#ifdef WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  // the widest float32 vector path the CPU kernels take here (under the T3D_CPU_ISA cap): "avx512", "avx2", "generic"
  m.def("cpu_isa", []() {
    return std::string(t3d::cpu_has_avx512_fma() ? "avx512" : t3d::cpu_has_avx2_fma() ? "avx2" : "generic");
  });
  t3d::init_ttl(m);
  t3d::init_dense_block(m);
  t3d::init_bn_relu_maxpool(m);
  t3d::init_winograd(m);
  t3d::init_conv3d_input_grad(m);
}
