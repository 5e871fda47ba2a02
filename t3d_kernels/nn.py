"""Modules over the ops: ``TemporalTransition``, ``DenseLayer3d``, ``DenseBlock3d`` and :func:`fuse`.

Parameters and state_dict keys never depend on the backend: the backend is a plain attribute.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backends import BackendError, declared, resolve
from .composite import sync
from .ops.bn_relu_maxpool import bn_relu_maxpool
from .ops.dense_block import dense_block
from .ops.stem_conv import conv3d_input_grad_applies, stem_conv3d
from .ops.ttl import ttl

__all__ = [
    "BatchNormReLUMaxPool3d",
    "TemporalTransition",
    "DenseLayer3d",
    "DenseBlock3d",
    "bn_mode",
    "split_channels",
]


def split_channels(total: int, parts: int) -> list[int]:
    """Split ``total`` channels evenly over ``parts`` branches; earlier branches take the remainder."""
    if parts < 1 or total < parts:
        raise ValueError(f"out_channels: expected at least one channel per branch ({parts}), got {total}")
    base, rem = divmod(total, parts)
    return [base + (1 if i < rem else 0) for i in range(parts)]


def _check_backend(op: str, backend: str) -> str:
    if backend != "auto" and backend not in declared(op):
        raise BackendError(f"backend: expected 'auto' or one of {sorted(declared(op))}, got {backend!r}")
    return backend


class _BackendModule(nn.Module):
    """A module over a fused op: ``backend`` picks the implementation; ``sync_bn`` (set by
    :func:`convert_sync_batchnorm`) synchronises the op's BN statistics in training over ``process_group`` (None: the
    default group). None of them is a parameter or buffer: the state_dict never depends on them."""

    _op = ""
    sync_bn = False
    process_group: torch.distributed.ProcessGroup | None = None

    def _group(self) -> torch.distributed.ProcessGroup | None:
        """The group the op synchronises over, or None (per-process statistics)."""
        if not self.sync_bn:
            return None
        return self.process_group if self.process_group is not None else torch.distributed.group.WORLD

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = _check_backend(self._op, value)

    def extra_repr(self) -> str:
        return f"backend={self._backend!r}"


class TemporalTransition(_BackendModule):
    """Temporal Transition Layer (T3D): shared BN-ReLU, parallel convs of several temporal depths, concat,
    AvgPool3d(2).

    Args:
        in_channels: C_in of the input (N, C_in, T, H, W).
        out_channels: total output channels, split evenly over the branches (earlier branches take the
            remainder). Ignored when ``branch_channels`` is given.
        depths: temporal depth of each branch. A depth-1 branch is a 1x1x1 conv, the others d x k x k.
        branch_channels: channels per branch (an int for all, or one per branch), e.g. 128 as the
            official T3D code.
        kernel_size: spatial kernel (odd) of the branches of depth > 1.
        pool: apply the 2x2x2 average pooling (output (N, C_out, T//2, H//2, W//2)).
        backend: "auto" or a name from :func:`t3d_kernels.backends`.
    """

    _op = "ttl"

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        depths: Sequence[int] = (1, 3, 6),
        *,
        branch_channels: int | Sequence[int] | None = None,
        kernel_size: int = 3,
        pool: bool = True,
        eps: float = 1e-5,
        momentum: float = 0.1,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        depths = tuple(int(d) for d in depths)
        if not depths or min(depths) < 1:
            raise ValueError(f"depths: expected a non-empty sequence of integers >= 1, got {depths}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: expected an odd integer >= 1, got {kernel_size}")
        if branch_channels is None:
            if out_channels is None:
                raise ValueError("out_channels: expected an integer (or pass branch_channels), got None")
            channels = split_channels(out_channels, len(depths))
        elif isinstance(branch_channels, int):
            channels = [branch_channels] * len(depths)
        else:
            channels = list(branch_channels)
            if len(channels) != len(depths):
                raise ValueError(f"branch_channels: expected {len(depths)} values (one per depth), got {channels}")
        self.in_channels, self.out_channels, self.depths, self.pool = in_channels, sum(channels), depths, pool
        self.norm = nn.BatchNorm3d(in_channels, eps=eps, momentum=momentum)
        self.branches = nn.ModuleList(
            nn.Conv3d(in_channels, c, (d, 1, 1) if d == 1 else (d, kernel_size, kernel_size), bias=False)
            for c, d in zip(channels, depths)
        )
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.norm
        training, momentum = bn_mode(bn)
        return ttl(
            x,
            bn.weight,
            bn.bias,
            bn.running_mean,
            bn.running_var,
            [b.weight for b in self.branches],
            training=training,
            momentum=momentum,
            eps=bn.eps,
            pool=self.pool,
            backend=self.backend,
            process_group=self._group(),
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, depths={self.depths}, pool={self.pool}, " + super().extra_repr()
        )


def _bn_args(bn: nn.BatchNorm3d):
    return bn.weight, bn.bias, bn.running_mean, bn.running_var


def bn_mode(bn: nn.modules.batchnorm._BatchNorm) -> tuple[bool, float]:
    """``(use batch statistics?, running-stat momentum)`` of one BN module, decided as ``nn.BatchNorm3d`` decides
    it, and counts the batch in ``num_batches_tracked`` when it will update its running stats.

    The BN module is the one source of truth of its mode: a fused op reads it here, never the mode of the module
    that holds it, so freezing the BN modules (``bn.eval()``, any freeze helper) freezes the fused ops too.
    ``momentum=None`` is the cumulative average (1 / batches seen), as in PyTorch.
    """
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    training = bn.training or (bn.running_mean is None and bn.running_var is None)
    return training, momentum


def _bn_relu(x: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """relu(bn(x)) in the BN module's own mode (:func:`bn_mode`), as the module itself would compute it."""
    training, momentum = bn_mode(bn)
    return F.relu(F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training, momentum, bn.eps))


class DenseLayer3d(nn.Module):
    """One DenseNet-3D layer (torchvision's names): norm1-relu1-conv1 (1x1x1 to bn_size*k), norm2-relu2-conv2
    (3x3x3 to k). Input (N, C, T, H, W), output the k new channels (N, k, T, H, W)."""

    def __init__(self, in_channels: int, growth_rate: int = 32, bn_size: int = 4, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm3d(in_channels, eps=eps)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv3d(in_channels, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm3d(bn_size * growth_rate, eps=eps)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv3d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # each BN in its own mode (a frozen norm1 with a training norm2 is a valid state)
        h = F.conv3d(_bn_relu(x, self.norm1), self.conv1.weight)
        z = _bn_relu(h, self.norm2)
        return F.conv3d(z, self.conv2.weight, padding=tuple(s // 2 for s in self.conv2.weight.shape[2:]))


class DenseBlock3d(_BackendModule):
    """DenseNet-3D dense block: output ``cat([x, f_1, ..., f_L])`` of (N, C_0 + L*k, T, H, W).

    Children are ``denselayer1`` ... ``denselayerL`` (torchvision's names).
    """

    _op = "dense_block"

    def __init__(
        self,
        num_layers: int,
        in_channels: int,
        growth_rate: int = 32,
        bn_size: int = 4,
        eps: float = 1e-5,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers: expected an integer >= 1, got {num_layers}")
        self.in_channels, self.growth_rate, self.num_layers = in_channels, growth_rate, num_layers
        self.out_channels = in_channels + num_layers * growth_rate
        for i in range(num_layers):
            self.add_module(
                f"denselayer{i + 1}", DenseLayer3d(in_channels + i * growth_rate, growth_rate, bn_size, eps)
            )
        self.backend = backend

    def layers(self) -> list[DenseLayer3d]:
        return [m for m in self.children() if isinstance(m, DenseLayer3d)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = self.layers()
        norms = [bn for layer in layers for bn in (layer.norm1, layer.norm2)]
        # The fused op runs every BN of the block in one mode with one momentum and eps; the BN modules decide it.
        # A block whose norms disagree (some frozen, some training) runs layer by layer, each BN in its own mode.
        uniform = (
            len({(bn.training, bn.momentum, bn.eps, bn.track_running_stats) for bn in norms}) == 1
            and norms[0].track_running_stats
        )
        group = self._group()
        if not uniform and group is not None and any(bn.training for bn in norms):
            raise ValueError(
                "DenseBlock3d: a synchronised block (process_group set) needs all its BN modules in one mode; some "
                "are frozen and some train"
            )
        synced = group is not None and bool(sync.group_name(group)) and norms[0].training
        fused = resolve("dense_block", self.backend, x.device, x.dtype, group=synced)
        if not uniform or fused == "reference":
            features = [x]
            for layer in layers:
                features.append(layer(torch.cat(features, 1)))
            return torch.cat(features, 1)
        modes = [bn_mode(bn) for bn in norms]
        training, momentum = modes[0]
        return dense_block(
            x,
            [(_bn_args(m.norm1), m.conv1.weight, _bn_args(m.norm2), m.conv2.weight) for m in layers],
            training=training,
            momentum=momentum,
            eps=norms[0].eps,
            backend=self.backend,
            process_group=self._group(),
        )


class BatchNormReLUMaxPool3d(nn.BatchNorm3d):
    """``BatchNorm3d -> ReLU -> MaxPool3d`` (T3D's stem: norm0, relu0, pool0) as one fused op.

    A ``BatchNorm3d`` with the pool's geometry: same parameters, buffers and state_dict keys as the BN it replaces,
    and it is what BN freezing finds (``isinstance(m, nn.BatchNorm3d)``; its mode is its own ``training`` flag).
    :func:`fuse` builds it from an ``nn.Sequential`` stem with :meth:`from_modules`. Input (N, C, T, H, W).
    """

    _op = "bn_relu_maxpool"
    sync_bn = False
    process_group: torch.distributed.ProcessGroup | None = None

    def __init__(
        self,
        num_features: int,
        kernel_size: int | Sequence[int] = 3,
        stride: int | Sequence[int] = (1, 2, 2),
        padding: int | Sequence[int] = 1,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        backend: str = "auto",
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.backend = backend

    backend = _BackendModule.backend

    @classmethod
    def from_modules(cls, bn: nn.BatchNorm3d, pool: nn.MaxPool3d, backend: str = "auto") -> BatchNormReLUMaxPool3d:
        """The fused module over ``bn``'s own parameter and buffer tensors (an optimizer built before keeps
        working); ``pool`` must be a plain max pool (no dilation, floor mode)."""
        if not isinstance(bn, nn.BatchNorm3d) or not bn.affine or not bn.track_running_stats:
            raise ValueError(f"bn: expected an affine BatchNorm3d tracking running stats, got {bn!r}")
        if (
            not isinstance(pool, nn.MaxPool3d)
            or pool.ceil_mode
            or pool.return_indices
            or pool.dilation not in (1, (1, 1, 1))
        ):
            raise ValueError(f"pool: expected a MaxPool3d without dilation, ceil_mode or return_indices, got {pool!r}")
        stride = pool.stride if pool.stride is not None else pool.kernel_size
        fused = cls(bn.num_features, pool.kernel_size, stride, pool.padding, bn.eps, bn.momentum, backend)
        fused.weight, fused.bias = bn.weight, bn.bias  # the same Parameter objects
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(fused, name, getattr(bn, name))
        fused.train(bn.training)
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        training, momentum = bn_mode(self)
        return bn_relu_maxpool(
            x,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            self.kernel_size,
            self.stride,
            self.padding,
            training=training,
            momentum=momentum,
            eps=self.eps,
            backend=self.backend,
            process_group=_BackendModule._group(self),
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"backend={self._backend!r}"
        )


class StemConv3d(nn.Conv3d):
    """An ``nn.Conv3d`` whose input gradient runs ``t3d::stem_conv3d``'s cpu kernel (1-4 input channels, W stride 2:
    a video net's first conv, T3D's conv0); forward, weight and bias gradients stay ATen's, and so does everything
    when the input needs no gradient (a training clip) or the conv does not qualify. Same parameters and state_dict
    keys as the ``nn.Conv3d`` it replaces: :func:`fuse` builds it with :meth:`from_conv`."""

    _op = "stem_conv3d"
    backend = _BackendModule.backend

    @staticmethod
    def qualifies(conv: nn.Module) -> bool:
        """Whether ``conv`` is a plain ``nn.Conv3d`` the input-gradient kernel takes."""
        return (
            type(conv) is nn.Conv3d
            and conv.groups == 1
            and tuple(conv.dilation) == (1, 1, 1)
            and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str)
            and conv3d_input_grad_applies([1, conv.in_channels, 1, 1, 1], conv.weight, conv.stride)
        )

    @classmethod
    def from_conv(cls, conv: nn.Conv3d, backend: str = "auto") -> StemConv3d:
        """The module over ``conv``'s own parameter tensors (an optimizer built before keeps working)."""
        if not cls.qualifies(conv):
            raise ValueError(
                f"conv: expected an nn.Conv3d with 1-4 input channels, W stride 2, groups 1, no dilation and zero "
                f"padding, got {conv!r}"
            )
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        for name in (
            "in_channels",
            "out_channels",
            "kernel_size",
            "stride",
            "padding",
            "dilation",
            "transposed",
            "output_padding",
            "groups",
            "padding_mode",
            "_reversed_padding_repeated_twice",
        ):
            setattr(out, name, getattr(conv, name))
        out.weight, out.bias = conv.weight, conv.bias  # the same Parameter objects
        out.train(conv.training)
        out.backend = backend
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stem_conv3d(x, self.weight, self.bias, self.stride, self.padding, self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self._backend!r}"
