// t3d::ttl — argument checks shared by every compiled backend, device dispatch, and the Python bindings of the
// TTL kernels. The op's schema is declared once, in t3d_kernels/ops/ttl.py (torch.library.custom_op, with a
// `backend` argument so the cpu, cuda and triton kernels sit behind one op); these are the kernels it calls.
#include "ttl.h"

namespace t3d {

namespace {
void check_param(const char* name, const at::Tensor& p, const at::Tensor& x) {
  TORCH_CHECK(p.dim() == 1 && p.size(0) == x.size(1), name, ": expected shape (", x.size(1), ",), got ", p.sizes());
  TORCH_CHECK(p.scalar_type() == x.scalar_type(), name, ": expected dtype ", x.scalar_type(), " (the dtype of x), got ",
              p.scalar_type());
  TORCH_CHECK(p.device() == x.device(), name, ": expected a tensor on ", x.device(), " (the device of x), got ",
              p.device());
}
}  // namespace

void check_ttl_inputs(const at::Tensor& x, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                      const at::Tensor& mean, const at::Tensor& var, const std::vector<at::Tensor>& weights) {
  TORCH_CHECK(x.dim() == 5, "x: expected a 5-D tensor (N, C, T, H, W), got shape ", x.sizes());
  TORCH_CHECK(x.numel() > 0, "x: expected no empty dimension, got shape ", x.sizes());
  check_param("bn_weight", bn_weight, x);
  check_param("bn_bias", bn_bias, x);
  check_param("mean", mean, x);
  check_param("var", var, x);
  TORCH_CHECK(!weights.empty(), "weights: expected a non-empty list of branch weights");
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto& w = weights[i];
    TORCH_CHECK(w.dim() == 5, "weights[", i, "]: expected a 5-D tensor (C_i, C_in, d_i, kh, kw), got shape ",
                w.sizes());
    TORCH_CHECK(w.size(1) == x.size(1), "weights[", i, "]: expected ", x.size(1), " input channels (C_in of x), got ",
                w.size(1));
    TORCH_CHECK(w.size(0) >= 1 && w.size(2) >= 1, "weights[", i,
                "]: expected C_i >= 1 and temporal depth d_i >= 1, got shape ", w.sizes());
    TORCH_CHECK(w.size(3) % 2 == 1 && w.size(4) % 2 == 1, "weights[", i,
                "]: expected odd spatial kernel sizes (kh, kw), got shape ", w.sizes());
    TORCH_CHECK(w.scalar_type() == x.scalar_type(), "weights[", i, "]: expected dtype ", x.scalar_type(), ", got ",
                w.scalar_type());
    TORCH_CHECK(w.device() == x.device(), "weights[", i, "]: expected a tensor on ", x.device(), ", got ", w.device());
  }
}

namespace {
at::Tensor ttl_forward(const at::Tensor& x, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                       const at::Tensor& mean, const at::Tensor& var, const std::vector<at::Tensor>& weights, bool pool,
                       double eps) {
  if (x.is_cuda()) {
#ifdef WITH_CUDA
    return ttl_forward_cuda(x, bn_weight, bn_bias, mean, var, weights, pool, eps);
#else
    TORCH_CHECK(false, "x: a CUDA tensor was given but t3d_kernels._C was built without CUDA");
#endif
  }
  return ttl_forward_cpu(x, bn_weight, bn_bias, mean, var, weights, pool, eps);
}

TtlGrads ttl_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& bn_weight,
                      const at::Tensor& bn_bias, const at::Tensor& mean, const at::Tensor& var,
                      const std::vector<at::Tensor>& weights, bool pool, bool training, double eps) {
  if (x.is_cuda()) {
#ifdef WITH_CUDA
    return ttl_backward_cuda(grad_y, x, bn_weight, bn_bias, mean, var, weights, pool, training, eps);
#else
    TORCH_CHECK(false, "x: a CUDA tensor was given but t3d_kernels._C was built without CUDA");
#endif
  }
  return ttl_backward_cpu(grad_y, x, bn_weight, bn_bias, mean, var, weights, pool, training, eps);
}
}  // namespace

void init_ttl(pybind11::module& m) {
  m.def("ttl_forward", &ttl_forward, "Fused TTL forward (pool-first algebra)", pybind11::arg("x"),
        pybind11::arg("bn_weight"), pybind11::arg("bn_bias"), pybind11::arg("mean"), pybind11::arg("var"),
        pybind11::arg("weights"), pybind11::arg("pool"), pybind11::arg("eps"));
  m.def("batch_stats", &batch_stats_cpu, "Per-channel batch mean and biased variance (CPU)", pybind11::arg("x"));
  m.def("ttl_backward", &ttl_backward, "Fused TTL backward: (grad_x, grad_bn_weight, grad_bn_bias, grad_weights)",
        pybind11::arg("grad_y"), pybind11::arg("x"), pybind11::arg("bn_weight"), pybind11::arg("bn_bias"),
        pybind11::arg("mean"), pybind11::arg("var"), pybind11::arg("weights"), pybind11::arg("pool"),
        pybind11::arg("training"), pybind11::arg("eps"));
}

}  // namespace t3d
