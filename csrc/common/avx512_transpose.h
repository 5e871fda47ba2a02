// 16 x 16 float32 transposes in AVX-512 registers, shared by the Winograd conv (its output gradient's tiles) and the
// TTL's source build (a channels-first plane into channels-last rows). Compiled with a target attribute: call them
// only from AVX-512 code, on CPUs that have it (common/cpu_features.h).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace t3d {

// r[i][j] <- r[j][i]
__attribute__((target("avx512f"), always_inline)) inline void transpose16_regs(__m512 (&r)[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 16; i += 8)
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0xDD);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xDD);
  }
}

// out[i * ldo + j] = in[j * ldi + i] for a 16 x 16 block of floats
__attribute__((target("avx512f"))) inline void transpose16(const float* in, int64_t ldi, float* out, int64_t ldo) {
  __m512 r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(in + i * ldi);
  transpose16_regs(r);
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(out + i * ldo, r[i]);
}

}  // namespace t3d
