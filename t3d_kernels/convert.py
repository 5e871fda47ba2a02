"""Model-level conversions over the fused modules: :func:`fuse` (switch a model to the fused ops),
:func:`convert_sync_batchnorm` (synchronise every BN over a process group) and :func:`autocast_support` (can the
model's fused ops run under autocast in a dtype?). The modules themselves are in :mod:`t3d_kernels.nn`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .backends import BackendError, declared, get, op_declaration, resolve
from .nn import BatchNormReLUMaxPool3d, StemConv3d, _BackendModule

__all__ = ["autocast_support", "convert_sync_batchnorm", "fuse"]


def _fuse_stems(model: nn.Module, backend: str) -> None:
    """Replace every ``BatchNorm3d, ReLU, MaxPool3d`` run of children of an ``nn.Sequential`` by the fused module
    (ReLU and pool become ``nn.Identity``: no parameters, so the state_dict keys do not change)."""
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b, c in zip(names, names[1:], names[2:]):
            bn, relu, pool = seq._modules[a], seq._modules[b], seq._modules[c]
            if (
                type(bn) is nn.BatchNorm3d
                and bn.affine
                and bn.track_running_stats
                and isinstance(relu, nn.ReLU)
                and isinstance(pool, nn.MaxPool3d)
                and not pool.ceil_mode
                and not pool.return_indices
                and pool.dilation in (1, (1, 1, 1))
            ):
                fused = BatchNormReLUMaxPool3d.from_modules(bn, pool, backend)
                seq._modules[a], seq._modules[b], seq._modules[c] = fused, nn.Identity(), nn.Identity()


def _fuse_stem_convs(model: nn.Module, backend: str) -> None:
    """Replace every plain ``nn.Conv3d`` child the input-gradient kernel takes (:meth:`StemConv3d.qualifies`: T3D's
    conv0) by :class:`StemConv3d` over the same parameters; convs inside the fused modules are their op's weights and
    stay as they are."""
    fused_parents = [m for m in model.modules() if isinstance(m, _BackendModule)]
    inside = {id(c) for m in fused_parents for c in m.modules()}
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) not in inside and StemConv3d.qualifies(child):
                parent._modules[name] = StemConv3d.from_conv(child, backend)


def fuse(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Switch ``model`` to the fused ops, in place, keeping the weights and the state_dict keys: every TTL and
    dense block to ``backend`` (default: the fastest for the device), and every ``BatchNorm3d, ReLU, MaxPool3d``
    run in an ``nn.Sequential`` (T3D's stem) to :class:`BatchNormReLUMaxPool3d`, and every ``nn.Conv3d`` of 1-4 input
    channels with W stride 2 (conv0) to :class:`StemConv3d` (its input gradient); returns ``model``. A module whose
    op does not declare ``backend`` (e.g. "triton" for the stem) takes "auto"; a backend no op declares is an error."""
    fused = (_BackendModule, BatchNormReLUMaxPool3d, StemConv3d)
    ops = {"ttl", "dense_block", BatchNormReLUMaxPool3d._op, StemConv3d._op}
    if backend != "auto" and not any(backend in declared(op) for op in ops):
        names = sorted({name for op in ops for name in declared(op)})
        raise BackendError(f"backend: expected 'auto' or one of {names}, got {backend!r}")
    _fuse_stems(model, "auto")
    _fuse_stem_convs(model, "auto")
    for module in model.modules():
        if isinstance(module, fused):
            module.backend = backend if backend == "auto" or backend in declared(module._op) else "auto"
    return model


def autocast_support(
    model_or_ops: nn.Module | str | Iterable[str], device_type: str, dtype: torch.dtype
) -> tuple[bool, list[str]]:
    """Whether the fused ops that ``model_or_ops`` may call run under ``torch.autocast(device_type, dtype)``, and the
    reasons when they do not (empty when they do).

    ``model_or_ops``: a model (its :class:`TemporalTransition` / :class:`DenseBlock3d` modules are checked with the
    backend each resolves to on ``device_type``; one that runs plain PyTorch ops falls under autocast's own rules),
    or op names ("ttl", "t3d::dense_block"). A model without fused modules is supported.
    """
    if isinstance(model_or_ops, nn.Module):
        fused = (_BackendModule, BatchNormReLUMaxPool3d)
        uses = [(m._op, m.backend) for m in model_or_ops.modules() if isinstance(m, fused)]
    else:
        ops = [model_or_ops] if isinstance(model_or_ops, str) else list(model_or_ops)
        uses = [(op_declaration(op).op, "auto") for op in ops]
    device = torch.device(device_type)
    reasons = []
    for op, backend in dict.fromkeys(uses):
        try:
            plain = "direct" in get(op, resolve(op, backend, device)).impl
        except BackendError:  # the backend cannot run on this device type at all: the op's rule decides
            plain = False
        if not plain and dtype not in op_declaration(op).autocast.get(device_type, ()):
            reasons.append(f"t3d::{op}: no autocast rule for {str(dtype).removeprefix('torch.')} on {device_type}")
    return not reasons, reasons


def convert_sync_batchnorm(model: nn.Module, process_group: torch.distributed.ProcessGroup | None = None) -> nn.Module:
    """Synchronise every BatchNorm of ``model`` over ``process_group`` (None: the default group), as
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` does: the fused modules (:class:`TemporalTransition`,
    :class:`DenseBlock3d`) hand the group to their op, which all-reduces the BN statistics inside it; every other BN
    module becomes an ``nn.SyncBatchNorm`` sharing its parameters and buffers. Returns the converted model (the same
    object unless ``model`` is itself a BN module). Call before wrapping the model in DDP."""
    if isinstance(model, (_BackendModule, BatchNormReLUMaxPool3d)):
        model.sync_bn, model.process_group = True, process_group
        return model  # its BN modules belong to the op: they stay nn.BatchNorm3d (state holders)
    if isinstance(model, nn.modules.batchnorm._BatchNorm) and not isinstance(model, nn.SyncBatchNorm):
        out = nn.SyncBatchNorm(
            model.num_features, model.eps, model.momentum, model.affine, model.track_running_stats, process_group
        )
        if model.affine:
            out.weight, out.bias = model.weight, model.bias
        out.running_mean, out.running_var = model.running_mean, model.running_var
        out.num_batches_tracked = model.num_batches_tracked
        out.train(model.training)
        return out
    for name, child in model.named_children():
        converted = convert_sync_batchnorm(child, process_group)
        if converted is not child:
            model.add_module(name, converted)
    return model
