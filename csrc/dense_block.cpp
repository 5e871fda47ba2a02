// t3d::dense_block — argument checks shared by the backends and the Python bindings of the kernels (the op's
// schema is declared once, in t3d_kernels/ops/dense_block.py, with torch.library.custom_op).
#include "dense_block.h"

#include <pybind11/functional.h>
#include <pybind11/stl.h>

#include <optional>

namespace t3d {

void check_dense_block_inputs(const at::Tensor& x, const TensorList& bn1_weight, const TensorList& bn1_bias,
                              const TensorList& conv1_weight, const TensorList& bn2_weight, const TensorList& bn2_bias,
                              const TensorList& conv2_weight) {
  TORCH_CHECK(x.dim() == 5, "x: expected a 5-D tensor (N, C, T, H, W), got ", x.dim(), " dims");
  const size_t layers = conv1_weight.size();
  TORCH_CHECK(layers >= 1, "conv1_weight: expected at least one layer");
  for (const auto* list : {&bn1_weight, &bn1_bias, &bn2_weight, &bn2_bias, &conv2_weight}) {
    TORCH_CHECK(list->size() == layers, "dense block: expected ", layers, " tensors per parameter list, got ",
                list->size());
  }
  int64_t c = x.size(1);
  for (size_t i = 0; i < layers; ++i) {
    const auto& w1 = conv1_weight[i];
    const auto& w2 = conv2_weight[i];
    TORCH_CHECK(w1.dim() == 5 && w1.size(1) == c && w1.size(2) == 1 && w1.size(3) == 1 && w1.size(4) == 1,
                "conv1_weight[", i, "]: expected shape (B, ", c, ", 1, 1, 1), got ", w1.sizes());
    TORCH_CHECK(w2.dim() == 5 && w2.size(1) == w1.size(0) && w2.size(2) % 2 == 1 && w2.size(3) % 2 == 1 &&
                    w2.size(4) % 2 == 1,
                "conv2_weight[", i, "]: expected shape (k, ", w1.size(0), ", odd, odd, odd), got ", w2.sizes());
    TORCH_CHECK(bn1_weight[i].numel() == c && bn1_bias[i].numel() == c, "bn1 of layer ", i, ": expected ", c,
                " channels");
    TORCH_CHECK(bn2_weight[i].numel() == w1.size(0) && bn2_bias[i].numel() == w1.size(0), "bn2 of layer ", i,
                ": expected ", w1.size(0), " channels");
    for (const auto& t : {w1, w2, bn1_weight[i], bn1_bias[i], bn2_weight[i], bn2_bias[i]}) {
      TORCH_CHECK(t.device() == x.device() && t.scalar_type() == x.scalar_type(), "layer ", i,
                  ": expected parameters of dtype ", x.scalar_type(), " on ", x.device(), ", got ", t.scalar_type(),
                  " on ", t.device());
    }
    c += w2.size(0);
  }
}

namespace {

DenseForwardCpu forward(const at::Tensor& x, const TensorList& bn1_weight, const TensorList& bn1_bias,
                     const TensorList& bn1_mean, const TensorList& bn1_var, const TensorList& conv1_weight,
                     const TensorList& bn2_weight, const TensorList& bn2_bias, const TensorList& bn2_mean,
                     const TensorList& bn2_var, const TensorList& conv2_weight, bool training, double eps,
                     const std::optional<StatsMerge>& merge_stats) {
#ifdef WITH_CUDA
  if (x.is_cuda()) {
    TORCH_CHECK(!merge_stats, "merge_stats: the CUDA dense block kernels take no process group");
    auto [y, mean1, var1, mean2, var2] = dense_block_forward_cuda(
        x, bn1_weight, bn1_bias, bn1_mean, bn1_var, conv1_weight, bn2_weight, bn2_bias, bn2_mean, bn2_var,
        conv2_weight, training, eps);
    return {y, mean1, var1, mean2, var2, at::empty({0}, x.options())};  // the CUDA backward recomputes h
  }
#endif
  TORCH_CHECK(x.device().is_cpu(), "x: the dense block kernels of this build run on CPU tensors, got ", x.device());
  return dense_block_forward_cpu(x, bn1_weight, bn1_bias, bn1_mean, bn1_var, conv1_weight, bn2_weight, bn2_bias,
                                 bn2_mean, bn2_var, conv2_weight, training, eps, merge_stats.value_or(StatsMerge{}));
}

DenseGrads backward(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& mean1, const at::Tensor& var1,
                    const at::Tensor& mean2, const at::Tensor& var2, const TensorList& bn1_weight,
                    const TensorList& bn1_bias, const TensorList& conv1_weight, const TensorList& bn2_weight,
                    const TensorList& bn2_bias, const TensorList& conv2_weight, bool training, double eps,
                    const std::optional<SumsReduce>& reduce_sums, int64_t group_count,
                    const std::optional<at::Tensor>& saved_h) {
#ifdef WITH_CUDA
  if (y.is_cuda()) {
    TORCH_CHECK(!reduce_sums, "reduce_sums: the CUDA dense block kernels take no process group");
    return dense_block_backward_cuda(grad_y, y, mean1, var1, mean2, var2, bn1_weight, bn1_bias, conv1_weight,
                                     bn2_weight, bn2_bias, conv2_weight, training, eps);
  }
#endif
  TORCH_CHECK(y.device().is_cpu(), "y: the dense block kernels of this build run on CPU tensors, got ", y.device());
  return dense_block_backward_cpu(grad_y, y, mean1, var1, mean2, var2, saved_h.value_or(at::Tensor()), bn1_weight,
                                  bn1_bias, conv1_weight, bn2_weight, bn2_bias, conv2_weight, training, eps,
                                  reduce_sums.value_or(SumsReduce{}), group_count);
}

}  // namespace

void init_dense_block(pybind11::module& m) {
  namespace py = pybind11;
  m.def("dense_block_forward", &forward,
        "fused dense block forward -> (y, mean1, var1, mean2, var2, saved_h); merge_stats: None, or a callable "
        "(mean, var) -> the process group's (mean, var) (synchronised BN); see csrc/dense_block.h",
        py::arg("x"), py::arg("bn1_weight"), py::arg("bn1_bias"), py::arg("bn1_mean"), py::arg("bn1_var"),
        py::arg("conv1_weight"), py::arg("bn2_weight"), py::arg("bn2_bias"), py::arg("bn2_mean"), py::arg("bn2_var"),
        py::arg("conv2_weight"), py::arg("training"), py::arg("eps"), py::arg("merge_stats") = py::none());
  m.def("dense_block_backward", &backward,
        "fused dense block backward -> (grad_x, grad_bn1_w, grad_bn1_b, grad_conv1, grad_bn2_w, grad_bn2_b, "
        "grad_conv2); reduce_sums: None, or a callable (sums) -> the sums over the process group, group_count the "
        "group's elements per channel (synchronised BN); saved_h: None or the forward's (CPU); see "
        "csrc/dense_block.h",
        py::arg("grad_y"), py::arg("y"), py::arg("mean1"), py::arg("var1"), py::arg("mean2"), py::arg("var2"),
        py::arg("bn1_weight"), py::arg("bn1_bias"), py::arg("conv1_weight"), py::arg("bn2_weight"),
        py::arg("bn2_bias"), py::arg("conv2_weight"), py::arg("training"), py::arg("eps"),
        py::arg("reduce_sums") = py::none(), py::arg("group_count") = 0, py::arg("saved_h") = py::none());
}

}  // namespace t3d
