"""The fused algorithms written in PyTorch ops: the ``composite`` backend and the executable specification of what
the C++, CUDA and Triton kernels compute (docs/design.md). A leaf: it imports torch and :mod:`t3d_kernels.geometry`
only, so both the ops (``t3d_kernels.ops``) and the Triton kernels (``t3d_kernels.triton``) can build on it.

- :mod:`.bn`: BN folding, BN(-ReLU) backward and the running-statistics update, once for every op.
- :mod:`.ttl`: the pool-first TTL (box filter, then stride-2 convs over the shared source).
- :mod:`.dense_block`: the concat-free dense block over pluggable per-piece kernels.
- :mod:`.conv`: convolution gradients (with the CPU bfloat16 weight-gradient fallback).
- :mod:`.pool`: the fused stem (BN-ReLU-MaxPool3d) and the deterministic (gather) max-pool backward.
"""
