"""Reproducibility: seeding every RNG a run draws from, and deterministic GPU kernels (``--deterministic``)."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

__all__ = ["seed_everything", "set_deterministic"]


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global RNGs (the model's initial weights come from torch's)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic() -> None:
    """Deterministic kernels (cuDNN, cuBLAS, scatter ...): needed for bit-exact resume on GPUs, slower."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS initialises
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)
