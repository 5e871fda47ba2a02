// Math of the fused TTL shared by the CPU and CUDA kernels (__host__ __device__ where it can be), so the CPU
// tests exercise it. See docs/design.md ("The pool-first algebra") and t3d_kernels/composite/ttl.py (the executable spec).
//
// Geometry. z = relu(x * scale + shift) (BN folded per channel), zero-padded in time by `front`/`back` (the
// largest 'same' padding of any branch) and in space by ph/pw (the largest kh/2, kw/2): zp. With pooling, the
// source tensor of every branch is the box filter src = box(zp), box(v) = mean of zp[v + a], a in {0,1}^3
// (zp carries one more zero at the end of each dim); without pooling src = zp. Both have dims
// (T + front + back, H + 2 ph, W + 2 pw). Branch i reads src at
//   (t0_i + s*to + dt, h0_i + s*ho + dh, w0_i + s*wo + dw),  s = 2 with pooling, 1 without,
// with t0_i = front - front_i, h0_i = ph - kh_i/2, w0_i = pw - kw_i/2. Output (To, Ho, Wo) = (T/2, H/2, W/2)
// with pooling, (T, H, W) without.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace t3d {

T3D_HD int64_t temporal_front(int64_t depth) { return (depth - 1) / 2; }
T3D_HD int64_t temporal_back(int64_t depth) { return depth - 1 - (depth - 1) / 2; }

// BN (folded into scale/shift) then ReLU
template <typename T>
T3D_HD T bn_relu(T x, T scale, T shift) {
  T v = x * scale + shift;
  return v > T(0) ? v : T(0);
}

// scale = gamma / sqrt(var + eps), shift = beta - mean * scale
template <typename T>
T3D_HD void fold_bn(T gamma, T beta, T mean, T invstd, T& scale, T& shift) {
  scale = gamma * invstd;
  shift = beta - mean * scale;
}

struct TtlGeometry {
  int64_t T, H, W;        // input frames and spatial size
  int64_t front, back;    // temporal zero padding (largest over the branches)
  int64_t ph, pw;         // spatial zero padding (largest kh/2, kw/2)
  int64_t Ts, Hs, Ws;     // dims of the source tensor (box(zp) or zp)
  int64_t To, Ho, Wo;     // output dims
  int64_t stride;         // 2 with pooling, 1 without
  bool pool;
};

T3D_HD TtlGeometry make_geometry(int64_t T, int64_t H, int64_t W, int64_t front, int64_t back, int64_t ph,
                                 int64_t pw, bool pool) {
  TtlGeometry g;
  g.T = T; g.H = H; g.W = W;
  g.front = front; g.back = back; g.ph = ph; g.pw = pw;
  g.Ts = T + front + back; g.Hs = H + 2 * ph; g.Ws = W + 2 * pw;
  g.pool = pool;
  g.stride = pool ? 2 : 1;
  g.To = pool ? T / 2 : T; g.Ho = pool ? H / 2 : H; g.Wo = pool ? W / 2 : W;
  return g;
}

// The geometry of a TTL from the input dims and the branch weights (C_i, C_in, d_i, kh_i, kw_i): pads by the
// largest 'same' padding of any branch. Host-side; `Weights` is any container of tensors with .size(dim).
template <typename Weights>
inline TtlGeometry geometry_from_weights(int64_t T, int64_t H, int64_t W, const Weights& weights, bool pool) {
  int64_t front = 0, back = 0, ph = 0, pw = 0;
  for (const auto& w : weights) {
    front = front > temporal_front(w.size(2)) ? front : temporal_front(w.size(2));
    back = back > temporal_back(w.size(2)) ? back : temporal_back(w.size(2));
    ph = ph > w.size(3) / 2 ? ph : w.size(3) / 2;
    pw = pw > w.size(4) / 2 ? pw : w.size(4) / 2;
  }
  return make_geometry(T, H, W, front, back, ph, pw, pool);
}

// Where branch (depth, kh, kw) starts reading the source tensor.
T3D_HD void branch_origin(const TtlGeometry& g, int64_t depth, int64_t kh, int64_t kw, int64_t& t0, int64_t& h0,
                          int64_t& w0) {
  t0 = g.front - temporal_front(depth);
  h0 = g.ph - kh / 2;
  w0 = g.pw - kw / 2;
}

// Source coordinate (ts, hs, ws) -> coordinate in the unpadded input; returns false in the zero padding.
T3D_HD bool source_to_input(const TtlGeometry& g, int64_t ts, int64_t hs, int64_t ws, int64_t& t, int64_t& h,
                            int64_t& w) {
  t = ts - g.front; h = hs - g.ph; w = ws - g.pw;
  return t >= 0 && t < g.T && h >= 0 && h < g.H && w >= 0 && w < g.W;
}

// Weight of the box filter (and of its adjoint) per tap: a mean over 2x2x2.
template <typename T>
T3D_HD T box_weight() { return T(0.125); }

// For a source index v along one dim of length L_src, the input indices u = v + a - pad (a in {0,1}) the box
// window covers, clipped to [0, n): [lo, hi). Used by the box pass and, transposed, by its adjoint: input u
// receives from source indices v in [u + pad - 1, u + pad] clipped to [0, L_src).
T3D_HD void box_window(int64_t v, int64_t pad, int64_t n, int64_t& lo, int64_t& hi) {
  lo = v - pad;
  hi = v - pad + 2;
  if (lo < 0) lo = 0;
  if (hi > n) hi = n;
}

}  // namespace t3d
