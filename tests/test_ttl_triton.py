"""The TTL's Triton- and GPU-specific paths against the float64 reference, in this pytest process.

The whole matrix (every sample input, both dtypes, every gradient, running statistics, gradcheck, opcheck,
torch.compile) runs on every (backend, device) pair, triton included, in test_ttl.py. Here: the split-K / split-M
(atomic) reductions of the Triton kernels, which only big shapes take, forced on tiny ones; and on a GPU fp16/bf16
through the triton and cuda backends. On a machine without CUDA the triton backend runs under
``TRITON_INTERPRET=1`` (set by conftest.py before triton is imported).
"""

from __future__ import annotations

import pytest
import torch
from _tolerance import check_backend

from t3d_kernels import testing

PAIRS = testing.backend_device_pairs("ttl")
TRITON = [p for p in PAIRS if p[0] == "triton"]
GPU = [p for p in PAIRS if p[1] == "cuda" and p[0] in ("triton", "cuda")]
# (split, sample): tiny samples that take the split paths when forced, in eval and in training
SPLITS = [
    (3, testing.ttl_input((1, 9, 2, 2, 3), [(1, 1, 1), (2, 3, 3)], layout="expanded", training=False)),
    (2, testing.ttl_input((4, 5, 4, 4, 4), [(2, 1, 1), (2, 2, 3)], layout="non_contiguous", training=True)),
]


@pytest.mark.triton
@pytest.mark.parametrize("backend,device", TRITON, ids=[f"{b}-{d}" for b, d in TRITON])
@pytest.mark.parametrize("case", range(len(SPLITS)))
def test_forced_split_reductions(backend, device, case):
    from t3d_kernels.triton import ttl as triton_ttl

    split, sample = SPLITS[case]
    triton_ttl._split_override = split
    try:
        failures = check_backend(sample, backend, device, torch.float32)
    finally:
        triton_ttl._split_override = None
    assert not failures, "\n".join(failures)


@pytest.mark.cuda
@pytest.mark.parametrize("backend,device", GPU, ids=[f"{b}-{d}" for b, d in GPU])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_on_gpu(backend, device, dtype):
    """fp16/bf16 on tensor cores, within twice PyTorch's own error in that dtype on the same GPU."""
    for sample in testing.sample_inputs("ttl", tiny=True):
        failures = check_backend(sample, backend, device, dtype)
        assert not failures, "\n".join(failures)
