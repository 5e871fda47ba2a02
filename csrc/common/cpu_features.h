// What the CPU the extension runs on can do, asked once per process (the kernels with AVX-512 bodies compile them
// with target attributes and pick them at run time).
#pragma once

namespace t3d {

// AVX-512F and FMA: what the float32 AVX-512 kernels (the TTL's tiles, the Winograd conv) need.
inline bool cpu_has_avx512_fma() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  return yes;
}

}  // namespace t3d
