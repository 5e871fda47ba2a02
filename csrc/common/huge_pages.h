// Large per-call CPU buffers advised for transparent huge pages before their first touch (where the kernel grants
// them on request: THP in madvise mode). A fresh buffer otherwise costs one page fault per 4 KB when first written:
// measured here, 1 thread, a fresh 45 MB tensor filled in 19 ms with 4 KB pages and in 3 ms with the advice (a
// read of 45 MB: 1.6 ms; TTL3's weight gradients alone are 45 MB per call). glibc
// returns big freed blocks to the system (mmap, heap trim), so buffers of tens of MB are fresh on every call.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace t3d {

inline at::Tensor empty_huge(at::IntArrayRef sizes, const at::TensorOptions& opts,
                             at::MemoryFormat fmt = at::MemoryFormat::Contiguous) {
  at::Tensor t = at::empty(sizes, opts.memory_format(fmt));
#ifdef __linux__
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t b = (p + kHuge - 1) & ~(kHuge - 1), e = (p + t.nbytes()) & ~(kHuge - 1);
  if (e > b) madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);  // advice only: a refusal changes nothing
#endif
  return t;
}

// A byte tensor of its own anonymous mapping, 2 MB aligned and advised for huge pages before its first touch, so
// that it gets them wherever the kernel has them (a malloc'ed buffer may lie on heap pages already touched as
// 4 KB pages, and gets huge pages in some processes and not in others). For buffers kept between calls.
inline at::Tensor mapped_huge(int64_t bytes) {
#ifdef __linux__
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t size = (static_cast<size_t>(bytes) + kHuge - 1) & ~(kHuge - 1), span = size + kHuge;
  void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw != MAP_FAILED) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(raw), a = (p + kHuge - 1) & ~(kHuge - 1);
    if (a > p) munmap(raw, a - p);                                       // the unaligned head
    if (p + span > a + size) munmap(reinterpret_cast<void*>(a + size), p + span - a - size);  // and tail
    madvise(reinterpret_cast<void*>(a), size, MADV_HUGEPAGE);
    return at::from_blob(
        reinterpret_cast<void*>(a), {bytes}, [size](void* q) { munmap(q, size); },
        at::TensorOptions().dtype(at::kByte));
  }
#endif
  return at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
}

// A per-thread buffer kept between calls, one per Tag type: a view of `sizes` elements of `opts`' dtype into a
// mapped_huge buffer grown on demand. For an op's large temporaries that are not results (a fresh one per call costs
// a page fault per 4 KB on first touch, and glibc hands blocks of tens of MB back to the system between calls).
// The view holds the storage, so it stays valid for the call even if a later call on this thread grows the buffer;
// two live views of one Tag on one thread alias, so a Tag serves one temporary of one op at a time. Above
// kMaxKeptBytes the buffer is not kept (a huge batch does not pin its memory after the call).
constexpr int64_t kMaxKeptBytes = int64_t(1) << 30;

template <typename Tag>
at::Tensor kept_buffer(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  thread_local at::Tensor buffer;  // bytes
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const auto dtype = c10::typeMetaToScalarType(opts.dtype());
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(dtype));
  if (bytes > kMaxKeptBytes) return empty_huge(sizes, opts);
  if (!buffer.defined() || buffer.numel() < bytes) {
    buffer.reset();  // free the old one before the larger one is allocated
    buffer = mapped_huge(std::max<int64_t>(bytes, 1));
  }
  return buffer.narrow(0, 0, bytes).view(dtype).view(sizes);
}

}  // namespace t3d
