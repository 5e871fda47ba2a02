"""Triton kernels of the fused ops (GPU; on CPU only under ``TRITON_INTERPRET=1``).

Imported lazily by the ops (``t3d_kernels.ops.ttl``) so that a missing Triton never breaks ``import t3d_kernels``.
"""
