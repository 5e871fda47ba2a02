"""Backend registry: which implementations of each op exist on this install, and "auto" selection.

Backends:
- ``reference``: plain PyTorch (:mod:`t3d_kernels.reference`), any device; autograd by PyTorch.
- ``composite``: the fused op's algorithm written with PyTorch ops behind the registered custom op; any device.
- ``cpu``: C++ kernels in ``csrc/cpu`` (CPU tensors).
- ``triton``: Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``).
- ``cuda``: CUDA C++ kernels in ``csrc/cuda`` (CUDA tensors).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from . import _ext

__all__ = ["backends", "resolve", "register", "BackendError"]


class BackendError(RuntimeError):
    """A backend was asked for that is unknown, not built, or cannot run on the given device."""


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_runs_on(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


# op -> backend -> (is it built?, can it run on this device?)
_REGISTRY: dict[str, dict[str, tuple[Callable[[], bool], Callable[[torch.device], bool]]]] = {}
# preference order for "auto", per op and device type, from measurements (README "Performance"): on an H100 the
# Triton TTL beats cuDNN on every shape, while the fused dense block's GPU kernels are still slower than the cuDNN
# block, so on CUDA the dense block stays on the reference unless a fused backend is asked for (it saves memory).
_AUTO_ORDER = {
    ("ttl", "cpu"): ("cpu", "composite", "reference"),
    ("ttl", "cuda"): ("triton", "cuda", "composite", "reference"),
    ("dense_block", "cpu"): ("cpu", "composite", "reference"),
    ("dense_block", "cuda"): ("reference",),
    ("bn_relu_maxpool", "cpu"): ("cpu", "composite", "reference"),
    # cuDNN-free ATen pool is as fast; the composite backend (deterministic backward) is asked for explicitly
    ("bn_relu_maxpool", "cuda"): ("reference",),
}


def register(op: str, name: str, built: Callable[[], bool], runs_on: Callable[[torch.device], bool]) -> None:
    _REGISTRY.setdefault(op, {})[name] = (built, runs_on)


def _any_device(device: torch.device) -> bool:
    return True


for _op in ("ttl", "dense_block"):
    register(_op, "reference", lambda: True, _any_device)
register("ttl", "composite", lambda: True, _any_device)
register(
    "ttl", "cpu", lambda: _ext.load() is not None and hasattr(_ext.load(), "ttl_forward"), lambda d: d.type == "cpu"
)
register("ttl", "cuda", _ext.has_cuda_kernels, lambda d: d.type == "cuda")
register("ttl", "triton", _triton_available, _triton_runs_on)
register("dense_block", "composite", lambda: True, _any_device)
register(
    "dense_block",
    "cpu",
    lambda: _ext.load() is not None and hasattr(_ext.load(), "dense_block_forward"),
    lambda d: d.type == "cpu",
)
register("dense_block", "cuda", _ext.has_cuda_kernels, lambda d: d.type == "cuda")
register("dense_block", "triton", _triton_available, _triton_runs_on)
register("bn_relu_maxpool", "reference", lambda: True, _any_device)
register("bn_relu_maxpool", "composite", lambda: True, _any_device)
register(
    "bn_relu_maxpool",
    "cpu",
    lambda: _ext.load() is not None and hasattr(_ext.load(), "bn_relu_maxpool_forward"),
    lambda d: d.type == "cpu",
)


def backends(op: str = "ttl") -> list[str]:
    """Names of the backends of ``op`` built on this install (whatever the device)."""
    if op not in _REGISTRY:
        raise ValueError(f"op: expected one of {sorted(_REGISTRY)}, got {op!r}")
    return [name for name, (built, _) in _REGISTRY[op].items() if built()]


def resolve(op: str, backend: str, device: torch.device) -> str:
    """The concrete backend that runs ``op`` on ``device`` for the requested ``backend`` ("auto" allowed)."""
    table = _REGISTRY[op]
    if backend == "auto":
        for name in _AUTO_ORDER.get((op, device.type), ("composite", "reference")):
            if name in table and table[name][0]() and table[name][1](device):
                return name
        return "reference"
    if backend not in table:
        raise BackendError(
            f"backend: unknown backend {backend!r} for op {op!r}; expected 'auto' or one of {sorted(table)} "
            f"(built here: {backends(op)})"
        )
    built, runs_on = table[backend]
    if not built():
        why = _ext.load_error() if backend in ("cpu", "cuda") else "triton is not installed"
        raise BackendError(
            f"backend: {backend!r} for op {op!r} is not built on this install ({why}); available: {backends(op)}"
        )
    if not runs_on(device):
        raise BackendError(
            f"backend: {backend!r} for op {op!r} cannot run on device {device}; available: {backends(op)}"
        )
    return backend
