// 16-lane float vectors (GCC vector extensions) for the CPU row kernels, and the target_clones attribute that
// compiles such a kernel for AVX-512, AVX2 and baseline x86-64, picked at load time. Shared by the dense block's and
// the TTL's row kernels.
#pragma once

#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define T3D_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define T3D_CLONES
#endif

namespace t3d {

typedef float v16f __attribute__((vector_size(64)));

inline v16f load16(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store16(float* p, v16f v) { std::memcpy(p, &v, sizeof(v)); }

}  // namespace t3d
