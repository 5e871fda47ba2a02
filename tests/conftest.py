"""Test session setup: Triton's interpreter on machines without a GPU, and the hypothesis profiles.

- Without CUDA, ``TRITON_INTERPRET=1`` is set here, before anything imports triton (Triton reads it when a kernel
  is decorated), so the triton backend's tests run in this pytest process on the CPU. With CUDA the kernels compile
  for the GPU instead. An explicit ``TRITON_INTERPRET`` in the environment wins.
- hypothesis profiles: "ci" (the default: fixed seed, derandomized, each suite bounded) and "thorough" (10x the
  examples, random seeds, for local runs): ``T3D_FUZZ=thorough pytest tests/test_fuzz_ttl.py`` or
  ``pytest --hypothesis-profile=thorough ...``. Suites size themselves with ``_tolerance.fuzz_examples``.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

_COMMON = dict(
    deadline=None,  # an example's time depends on its shape and on the machine's load
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    print_blob=True,
)
settings.register_profile("ci", max_examples=20, derandomize=True, database=None, **_COMMON)
settings.register_profile("thorough", max_examples=200, **_COMMON)
settings.load_profile(os.environ.get("T3D_FUZZ", "ci"))
