"""Declarative backends (xformers' ``fmha/dispatch.py`` pattern; docs/design.md, "Dispatch").

Each op declares its backends in its own file (``t3d_kernels/ops/<op>.py``) with :func:`declare`: for every backend
its name, the device types and dtypes it runs, whether it is built here (and why not), extra refusals, and the
functions it runs; plus the op's ``auto`` order per device type and the devices/dtypes its autocast rule serves.
:func:`resolve` walks the order and, when nothing fits, says why each backend was refused. This module holds no
op-specific knowledge: a new backend or op only adds a declaration.

Backend names in use: ``reference`` (plain PyTorch, :mod:`t3d_kernels.reference`), ``composite`` (the fused
algorithm in PyTorch ops, :mod:`t3d_kernels.composite`), ``cpu`` (C++ in ``csrc/cpu``), ``triton`` (Triton;
CPU tensors only under ``TRITON_INTERPRET=1``), ``cuda`` (CUDA C++ in ``csrc/cuda``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from . import _ext

__all__ = [
    "ANY_FLOAT",
    "HALF",
    "autocast_dtype",
    "register_autocast",
    "Backend",
    "BackendError",
    "OpDeclaration",
    "backends",
    "declare",
    "declared",
    "extension_reason",
    "get",
    "op_declaration",
    "resolve",
    "triton_reason",
    "triton_reasons_on",
]

ANY_FLOAT = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))
HALF = frozenset((torch.float16, torch.bfloat16))


class BackendError(RuntimeError):
    """A backend was asked for that is unknown, not built, or cannot run the given inputs."""


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _built() -> str | None:
    return None


def _no_reasons(device: torch.device, dtype: torch.dtype | None) -> list[str]:
    return []


@dataclass(frozen=True)
class Backend:
    """One implementation of one op.

    ``devices``: device types it runs on (empty: any). ``dtypes``: input dtypes it computes in. ``built``: None when
    built on this install, else why not. ``reasons``: further refusals for a device and dtype (e.g. Triton on CPU).
    ``impl``: what the op calls, by role (e.g. "forward", "backward", "stats", "direct"); the op file names the roles.
    ``autocast_dtypes``: the autocast dtypes it computes in (inputs and conv weights in that dtype, BN parameters,
    statistics and accumulation in float32); under autocast in another dtype it computes in the input's dtype.
    ``process_group``: whether it synchronises BN statistics over a process group (SyncBatchNorm).
    """

    name: str
    devices: tuple[str, ...] = ()
    dtypes: frozenset[torch.dtype] = ANY_FLOAT
    built: Callable[[], str | None] = _built
    reasons: Callable[[torch.device, torch.dtype | None], list[str]] = _no_reasons
    impl: Mapping[str, Callable] = field(default_factory=dict)
    autocast_dtypes: frozenset[torch.dtype] = frozenset()
    process_group: bool = False

    def not_built_reason(self) -> str | None:
        return self.built()

    def not_supported_reasons(
        self,
        device: torch.device,
        dtype: torch.dtype | None = None,
        autocast: torch.dtype | None = None,
        group: bool = False,
    ) -> list[str]:
        """Every reason this backend cannot run an input of ``dtype`` on ``device`` (empty: it can); with
        ``autocast``, also when it does not compute in that autocast dtype; with ``group``, when it cannot
        synchronise BN statistics over a process group."""
        out = []
        why = self.built()
        if why is not None:
            out.append(f"not built ({why})")
        if self.devices and device.type not in self.devices:
            out.append(f"runs on {'/'.join(self.devices)}, not {device.type}")
        if dtype is not None and dtype not in self.dtypes:
            out.append(f"{_name(dtype)} not supported")
        if autocast is not None and autocast not in self.autocast_dtypes:
            out.append(f"no {_name(autocast)} autocast")
        if group and not self.process_group:
            out.append("no process-group (SyncBatchNorm) support")
        out.extend(self.reasons(device, dtype))
        return out


@dataclass(frozen=True)
class OpDeclaration:
    """An op's backends, its ``auto`` order per device type ("default" for device types not named) and the device
    types and dtypes its autocast rule computes in (a device type absent: no autocast rule there)."""

    op: str
    backends: Mapping[str, Backend]
    auto: Mapping[str, tuple[str, ...]]
    autocast: Mapping[str, frozenset[torch.dtype]] = field(default_factory=dict)


_OPS: dict[str, OpDeclaration] = {}


def declare(
    op: str,
    backends: Sequence[Backend],
    auto: Mapping[str, Sequence[str]],
    autocast: Mapping[str, Iterable[torch.dtype]] | None = None,
) -> OpDeclaration:
    """Declare ``op``'s backends (called once, by the op's own file)."""
    table = {b.name: b for b in backends}
    for device_type, order in auto.items():
        unknown = [n for n in order if n not in table]
        if unknown:
            raise ValueError(f"auto[{device_type!r}]: backends {unknown} of op {op!r} are not declared")
    decl = OpDeclaration(
        op,
        table,
        {k: tuple(v) for k, v in auto.items()},
        {k: frozenset(v) for k, v in (autocast or {}).items()},
    )
    _OPS[op] = decl
    return decl


def op_declaration(op: str) -> OpDeclaration:
    """The declaration of ``op`` ("ttl", "dense_block"; the ``t3d::`` prefix is accepted)."""
    name = op.removeprefix("t3d::")
    if name not in _OPS:
        raise ValueError(f"op: expected one of {sorted(_OPS)}, got {op!r}")
    return _OPS[name]


def declared(op: str) -> list[str]:
    """Names of every backend declared for ``op``, built here or not."""
    return list(op_declaration(op).backends)


def get(op: str, name: str) -> Backend:
    """The declared backend ``name`` of ``op``."""
    return op_declaration(op).backends[name]


def backends(op: str = "ttl") -> list[str]:
    """Names of the backends of ``op`` built on this install (whatever the device)."""
    return [name for name, b in op_declaration(op).backends.items() if b.not_built_reason() is None]


def resolve(
    op: str,
    backend: str,
    device: torch.device,
    dtype: torch.dtype | None = None,
    autocast: torch.dtype | None = None,
    group: bool = False,
) -> str:
    """The backend that runs ``op`` for an input of ``dtype`` on ``device``: ``backend`` itself if it can, or, for
    "auto", the first of the op's order for the device type that can. Else a :class:`BackendError` that gives each
    refused backend's reasons. ``dtype`` None: any dtype (only the device is checked).

    ``autocast``: the autocast dtype in effect; "auto" then takes the first backend that computes in it, while an
    explicitly named backend that does not computes in the input's dtype (its declared fallback). ``group``: BN
    statistics are synchronised over a process group; only backends that can are taken."""
    decl = op_declaration(op)
    if backend == "auto":
        order = decl.auto.get(device.type, decl.auto.get("default", ()))
        refused = []
        for name in order:
            reasons = decl.backends[name].not_supported_reasons(device, dtype, autocast, group)
            if not reasons:
                return name
            refused.append(f"{name}: {'; '.join(reasons)}")
        what = f"a {_name(dtype)} input" if dtype is not None else "an input"
        raise BackendError(f"backend: no backend of op {op!r} runs {what} on {device}: " + ", ".join(refused))
    if backend not in decl.backends:
        raise BackendError(
            f"backend: unknown backend {backend!r} for op {op!r}; expected 'auto' or one of {sorted(decl.backends)} "
            f"(built here: {backends(op)})"
        )
    chosen = decl.backends[backend]
    why = chosen.not_built_reason()
    if why is not None:
        raise BackendError(
            f"backend: {backend!r} for op {op!r} is not built on this install ({why}); available: {backends(op)}"
        )
    reasons = chosen.not_supported_reasons(device, dtype, group=group)
    if reasons:
        raise BackendError(
            f"backend: {backend!r} for op {op!r} cannot run on {device}: {'; '.join(reasons)}; "
            f"available: {backends(op)}"
        )
    return backend


# --------------------------------------------------------------------------------------------------------
# autocast
# --------------------------------------------------------------------------------------------------------

_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def autocast_dtype(op: str, x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype ``op`` computes a floating-point ``x`` in on its device type, or None (autocast off, or no
    rule of the op for that dtype there)."""
    device_type = x.device.type
    if device_type not in _AUTOCAST_KEYS or not x.is_floating_point() or not torch.is_autocast_enabled(device_type):
        return None
    dtype = torch.get_autocast_dtype(device_type)
    return dtype if dtype in op_declaration(op).autocast.get(device_type, ()) else None


def register_autocast(op: str, cast: Sequence[int], backend_arg: int) -> None:
    """Register the autocast rule of ``torch.ops.t3d.<op>`` on every device type its declaration names.

    Under autocast the rule casts the arguments at positions ``cast`` (the input and the conv weights: tensors or
    lists of tensors) to the autocast dtype when the backend (argument ``backend_arg``) declares that dtype in its
    ``autocast_dtypes``; BN parameters and running statistics keep their dtype (float32), so the statistics,
    accumulation and running statistics are float32. A backend that does not declare it computes in float32 (the
    same casts to float32: its declared fallback); a dtype the op's declaration does not name for the device type
    leaves the arguments as they are.
    """
    decl = op_declaration(op)
    packet = getattr(torch.ops.t3d, decl.op)

    def to(t, dtype):
        if isinstance(t, torch.Tensor):  # float64 stays float64, as autocast leaves it
            return t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t
        return [to(v, dtype) for v in t]

    for device_type in decl.autocast:
        key = _AUTOCAST_KEYS[device_type]

        def rule(*args, _device_type=device_type, _key=key):
            dtype = autocast_dtype(decl.op, args[0])
            args = list(args)
            if dtype is not None:
                if dtype not in get(decl.op, args[backend_arg]).autocast_dtypes:
                    dtype = torch.float32  # the declared fallback
                for i in cast:
                    args[i] = to(args[i], dtype)
            keys = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, _key))
            with torch._C._ExcludeDispatchKeyGuard(keys):
                return packet(*args)

        torch.library.impl(f"t3d::{decl.op}", key)(rule)


# --------------------------------------------------------------------------------------------------------
# reasons shared by the ops' declarations
# --------------------------------------------------------------------------------------------------------


def extension_reason(entry_point: str, cuda: bool = False) -> Callable[[], str | None]:
    """``built`` of a backend in the compiled extension: its ``entry_point`` is there (and CUDA, if ``cuda``)."""

    def built() -> str | None:
        mod = _ext.load()
        if mod is None:
            return f"the compiled extension t3d_kernels._C did not load: {_ext.load_error()}"
        if not hasattr(mod, entry_point):
            return f"the compiled extension has no {entry_point}"
        if cuda and not _ext.has_cuda_kernels():
            return "the extension was built without CUDA (nvcc not found, or torch without CUDA)"
        return None

    return built


def triton_reason() -> str | None:
    """``built`` of a Triton backend."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return None


def triton_reasons_on(device: torch.device, dtype: torch.dtype | None) -> list[str]:
    """Triton compiles for CUDA devices; on CPU it runs only through its interpreter."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return ["runs on CPU tensors only under TRITON_INTERPRET=1"]
    return []
