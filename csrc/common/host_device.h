// T3D_HD: the qualifier of math shared by the CPU and CUDA kernels (common/*_math.h). Under nvcc the functions are
// __host__ __device__ (so the CPU tests exercise exactly what the GPU runs), elsewhere plain inline C++.
#pragma once

#if defined(__CUDACC__)
#define T3D_HD __host__ __device__ __forceinline__
#else
#define T3D_HD inline
#endif
