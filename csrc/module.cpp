// The Python module t3d_kernels._C: each op's file contributes its functions through an init_* hook, so
// the module is declared once and an op's C++ lives in files named after it.
#include <torch/extension.h>

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
  t3d::init_ttl(m);
  t3d::init_dense_block(m);
  t3d::init_bn_relu_maxpool(m);
  t3d::init_winograd(m);
  t3d::init_conv3d_input_grad(m);
}
