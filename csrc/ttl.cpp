// t3d::ttl — Python bindings of the TTL kernels (the op's schema is declared once, in
// t3d_kernels/ops/ttl.py, with torch.library.custom_op; these are the backend kernels it calls).
#include <torch/extension.h>

namespace t3d {
void init_ttl(pybind11::module& m) { (void)m; }
}  // namespace t3d
