// t3d::bn_relu_maxpool — Python bindings of its compiled kernels (CPU). The op's schema is declared once, in
// t3d_kernels/ops/bn_relu_maxpool.py (torch.library.custom_op with a `backend` argument).
#include "bn_relu_maxpool.h"

namespace t3d {

void init_bn_relu_maxpool(pybind11::module& m) {
  m.def("bn_relu_maxpool_forward", &bn_relu_maxpool_forward_cpu, "Fused BN-ReLU-MaxPool3d forward (CPU): (y, mean, var, indices)",
        pybind11::arg("x"), pybind11::arg("bn_weight"), pybind11::arg("bn_bias"), pybind11::arg("mean"),
        pybind11::arg("var"), pybind11::arg("kernel_size"), pybind11::arg("stride"), pybind11::arg("padding"),
        pybind11::arg("training"), pybind11::arg("eps"), pybind11::arg("save_indices"));
  m.def("bn_relu_maxpool_backward", &bn_relu_maxpool_backward_cpu,
        "Fused BN-ReLU-MaxPool3d backward (CPU): (grad_x, grad_bn_weight, grad_bn_bias)", pybind11::arg("grad_y"),
        pybind11::arg("x"), pybind11::arg("bn_weight"), pybind11::arg("bn_bias"), pybind11::arg("mean"),
        pybind11::arg("var"), pybind11::arg("y"), pybind11::arg("indices"), pybind11::arg("kernel_size"),
        pybind11::arg("stride"), pybind11::arg("padding"), pybind11::arg("training"), pybind11::arg("eps"));
}

}  // namespace t3d
