"""Triton kernels of the fused ops (GPU; on CPU only under ``TRITON_INTERPRET=1``).

Imported lazily by the ops' backend declarations (``t3d_kernels.ops``) so that a missing Triton never breaks
``import t3d_kernels``. A kernel module imports only torch, triton and the leaves (:mod:`t3d_kernels.geometry`,
:mod:`t3d_kernels.composite`).
"""
