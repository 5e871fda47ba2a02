"""Loads the compiled extension (``t3d_kernels._C``) if it was built; never raises at import."""

from __future__ import annotations

import importlib
import os

# T3D_CPU_ISA caps the instruction sets the CPU kernels use (csrc/common/cpu_features.h), to compare code paths
CPU_ISAS = ("native", "avx2", "generic")

_module = None
_error: str | None = None


def load():
    """The compiled extension module, or None (the reason is in :func:`load_error`)."""
    global _module, _error
    isa = os.environ.get("T3D_CPU_ISA", "")
    if isa and isa not in CPU_ISAS:
        raise ValueError(f"T3D_CPU_ISA: expected one of {', '.join(CPU_ISAS)} (or unset), got {isa!r}")
    if _module is None and _error is None:
        try:
            _module = importlib.import_module("t3d_kernels._C")
        except ImportError as exc:  # not built (e.g. a source checkout without `pip install -e .`)
            _error = str(exc)
    return _module


def load_error() -> str | None:
    load()
    return _error


def has_cuda_kernels() -> bool:
    mod = load()
    return bool(mod is not None and getattr(mod, "built_with_cuda", lambda: False)())
