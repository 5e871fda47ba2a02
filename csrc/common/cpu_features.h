// What the CPU the extension runs on can do, asked once per process (the kernels with AVX-512 or AVX2 bodies compile
// them with target attributes and pick them at run time).
//
// T3D_CPU_ISA caps what is used, to test and compare the code paths on one machine: "avx2" (no AVX-512 kernels),
// "generic" (neither AVX-512 nor AVX2 kernels: the portable loops); unset or "native": all the CPU has. It is read
// once, at the first kernel call. (The GCC target_clones row kernels of the dense block and the TTL's glue pick their
// clone at load time and ignore it.)
#pragma once

#include <cstdlib>
#include <cstring>

namespace t3d {

// 2: AVX-512 allowed, 1: AVX2 at most, 0: the generic kernels only
inline int cpu_isa_cap() {
  static const int cap = [] {
    const char* v = std::getenv("T3D_CPU_ISA");
    if (v == nullptr || *v == '\0' || std::strcmp(v, "native") == 0) return 2;
    if (std::strcmp(v, "avx2") == 0) return 1;
    return 0;  // "generic" (validated on the Python side: t3d_kernels._ext)
  }();
  return cap;
}

// AVX-512F and FMA: what the float32 AVX-512 kernels (the TTL's tiles, the Winograd conv, the stem kernels) need.
inline bool cpu_has_avx512_fma() {
  static const bool yes = cpu_isa_cap() >= 2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  return yes;
}

// AVX2 and FMA (AMD Zen 2/3, Intel before Skylake-SP): what the float32 AVX2 tiles of the TTL need.
inline bool cpu_has_avx2_fma() {
  static const bool yes = cpu_isa_cap() >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

}  // namespace t3d
