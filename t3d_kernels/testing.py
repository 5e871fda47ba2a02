"""Inputs of every op for tests and benchmarks: one builder per op, one set of sample inputs per op.

extension-cpp's pattern (``sample_inputs(device)``): the op tests, the hypothesis fuzz suites and the benchmarks all
build their arguments here, so a shape, layout or initialisation is defined once. Values are drawn in float64 on the
CPU from a seeded generator and then cast and moved, so a sample holds the same numbers (up to rounding) on every
device and dtype. Torch only (no test framework).

- :func:`ttl_input`, :func:`dense_block_input`: one :class:`SampleInput` of a given configuration.
- :func:`sample_inputs`: the hand-picked configurations of an op (odd shapes, every layout, both modes).
- :func:`run`: output, every gradient and the running statistics of a sample through one backend.
- :func:`backend_device_pairs`: the (backend, device) pairs this install can run an op on.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "LAYOUTS",
    "SampleInput",
    "backend_device_pairs",
    "dense_block_input",
    "run",
    "sample_inputs",
    "ttl_input",
    "with_layout",
]

# memory layouts of the input x; "expanded" has stride 0 along the batch (the samples repeat; along T for batch 1)
LAYOUTS = ("contiguous", "channels_last_3d", "non_contiguous", "expanded")


def _expanded_dim(shape: Sequence[int]) -> int:
    return 0 if shape[0] > 1 else 2


def with_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` (N, C, T, H, W) with the same values in memory layout ``layout`` (one of :data:`LAYOUTS`).

    "non_contiguous" is every other column of a tensor twice as wide (a strided view); "expanded" is a stride-0
    view along the batch (along T for batch 1), so it needs x to repeat along that dim (the builders draw it so).
    """
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last_3d":
        return x.contiguous(memory_format=torch.channels_last_3d)
    if layout == "non_contiguous":
        wide = x.new_zeros(*x.shape[:-1], 2 * x.shape[-1])
        wide[..., ::2] = x
        return wide[..., ::2]
    if layout == "expanded":
        dim = _expanded_dim(x.shape)
        return x.narrow(dim, 0, 1).expand(x.shape)
    raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")


@dataclass
class SampleInput:
    """Arguments of one call of an op: ``fn(*args, **kwargs, backend=...)`` with ``fn`` :func:`t3d_kernels.ttl` or
    :func:`t3d_kernels.ops.dense_block` (and, without ``backend``, their :mod:`t3d_kernels.reference` twins).

    ``differentiable``: the tensors that require grad, by argument name ("x", "bn_weight", "weights[1]",
    "layers[0].conv1_weight", ...); ``buffers``: the running statistics the op updates in training, by name.
    """

    op: str
    args: tuple
    kwargs: dict
    layout: str
    desc: str
    differentiable: dict[str, torch.Tensor] = field(repr=False)
    buffers: dict[str, torch.Tensor] = field(repr=False)

    @property
    def x(self) -> torch.Tensor:
        return self.args[0]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SampleInput:
        """A deep copy on ``device`` in ``dtype`` (floating tensors only), with the same layout and leaves."""
        memo: dict[int, torch.Tensor] = {}

        def convert(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in memo:
                v = t.detach().to(device=device or t.device, dtype=dtype or t.dtype, copy=True)
                if t is self.args[0]:
                    v = with_layout(v, self.layout)
                memo[id(t)] = v.requires_grad_(t.requires_grad)
            return memo[id(t)]

        def walk(obj):
            if isinstance(obj, torch.Tensor):
                return convert(obj)
            if isinstance(obj, (list, tuple)):
                return type(obj)(walk(o) for o in obj)
            return obj

        args = walk(self.args)
        return SampleInput(
            self.op,
            args,
            copy.copy(self.kwargs),
            self.layout,
            self.desc,
            {k: convert(v) for k, v in self.differentiable.items()},
            {k: convert(v) for k, v in self.buffers.items()},
        )

    def clone(self) -> SampleInput:
        return self.to()


def _draw(gen: torch.Generator, *size: int, scale: float = 1.0, shift: float = 0.0, uniform: bool = False):
    t = (
        torch.rand(size, generator=gen, dtype=torch.float64)
        if uniform
        else torch.randn(size, generator=gen, dtype=torch.float64)
    )
    return t * scale + shift


def _x(gen, shape: Sequence[int], layout: str, shift: float) -> torch.Tensor:
    if layout == "expanded":  # draw one sample (one frame for batch 1) and repeat it
        small = list(shape)
        small[_expanded_dim(shape)] = 1
        return _draw(gen, *small, shift=shift).expand(*shape)
    return _draw(gen, *shape, shift=shift)


def _norm(gen, c: int) -> list[torch.Tensor]:
    """(weight, bias, running_mean, running_var) of a BN of ``c`` channels: non-trivial affine and statistics, so
    every term of the BN backward matters."""
    return [
        _draw(gen, c, scale=1.0, shift=0.5, uniform=True),
        _draw(gen, c, scale=0.2),
        _draw(gen, c, scale=0.1),
        _draw(gen, c, scale=1.0, shift=0.5, uniform=True),
    ]


def _finish(op, args, kwargs, layout, desc, differentiable, buffers, device, dtype, requires_grad) -> SampleInput:
    sample = SampleInput(op, args, kwargs, layout, desc, differentiable, buffers)
    for t in differentiable.values():
        t.requires_grad_(requires_grad)
    return sample.to(device, dtype)


def ttl_input(
    shape: Sequence[int],
    branches: Sequence[Sequence[int]],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    layout: str = "contiguous",
    training: bool = True,
    pool: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    seed: int = 0,
    requires_grad: bool = True,
) -> SampleInput:
    """Arguments of :func:`t3d_kernels.ttl`.

    shape: (N, C_in, T, H, W); branches: one (C_i, depth_i, k) (a k x k spatial kernel) or (C_i, depth_i, kh, kw)
    per branch. x ~ N(0, 1); weights[i] ~ N(0, 2 / fan_in) (He), shape (C_i, C_in, depth_i, kh, kw).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    gen = torch.Generator().manual_seed(seed)
    c_in = shape[1]
    x = _x(gen, shape, layout, 0.0)
    gamma, beta, mean, var = _norm(gen, c_in)
    weights = []
    for spec in branches:
        c, d, kh, kw = (*spec, spec[-1]) if len(spec) == 3 else spec
        weights.append(_draw(gen, c, c_in, d, kh, kw, scale=(2.0 / (c_in * d * kh * kw)) ** 0.5))
    kwargs = dict(training=training, momentum=momentum, eps=eps, pool=pool)
    ks = "/".join(f"{w.shape[0]}x{w.shape[2]}x{w.shape[3]}x{w.shape[4]}" for w in weights)
    desc = f"ttl{tuple(shape)} branches {ks} pool={pool} {'train' if training else 'eval'} {layout}"
    diff = {"x": x, "bn_weight": gamma, "bn_bias": beta, **{f"weights[{i}]": w for i, w in enumerate(weights)}}
    args = (x, gamma, beta, mean, var, weights)
    buffers = {"running_mean": mean, "running_var": var}
    return _finish("ttl", args, kwargs, layout, desc, diff, buffers, device, dtype, requires_grad)


def dense_block_input(
    shape: Sequence[int],
    num_layers: int,
    growth_rate: int,
    bn_size: int,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    layout: str = "contiguous",
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    seed: int = 0,
    requires_grad: bool = True,
) -> SampleInput:
    """Arguments of :func:`t3d_kernels.ops.dense_block`: ``(x, layers)``.

    shape: (N, C_0, T, H, W); layer i: norm1 over C_0 + i*k channels, conv1_weight (bn_size*k, C_0 + i*k, 1, 1, 1),
    norm2 over bn_size*k, conv2_weight (k, bn_size*k, 3, 3, 3). x ~ N(0.5, 1) (a non-zero mean, as after a ReLU);
    conv weights ~ N(0, 2 / fan_in) (He).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    gen = torch.Generator().manual_seed(seed)
    c0 = shape[1]
    x = _x(gen, shape, layout, 0.5)
    b = bn_size * growth_rate
    layers, diff, buffers = [], {"x": x}, {}
    for i in range(num_layers):
        c = c0 + i * growth_rate
        norm1, norm2 = _norm(gen, c), _norm(gen, b)
        w1 = _draw(gen, b, c, 1, 1, 1, scale=(2.0 / c) ** 0.5)
        w2 = _draw(gen, growth_rate, b, 3, 3, 3, scale=(2.0 / (27 * b)) ** 0.5)
        layers.append((norm1, w1, norm2, w2))
        p = f"layers[{i}]"
        diff.update(
            {
                f"{p}.norm1.weight": norm1[0],
                f"{p}.norm1.bias": norm1[1],
                f"{p}.conv1_weight": w1,
                f"{p}.norm2.weight": norm2[0],
                f"{p}.norm2.bias": norm2[1],
                f"{p}.conv2_weight": w2,
            }
        )
        for norm, name in ((norm1, "norm1"), (norm2, "norm2")):
            buffers[f"{p}.{name}.running_mean"], buffers[f"{p}.{name}.running_var"] = norm[2], norm[3]
    kwargs = dict(training=training, momentum=momentum, eps=eps)
    desc = (
        f"dense_block{tuple(shape)} layers={num_layers} k={growth_rate} bn_size={bn_size} "
        f"{'train' if training else 'eval'} {layout}"
    )
    return _finish("dense_block", (x, layers), kwargs, layout, desc, diff, buffers, device, dtype, requires_grad)


# hand-picked configurations: odd T/H/W, depth > T, even depths, batch 1 and >= 3, channels not a multiple of 8
_TTL_CASES = [
    # ((N, C_in, T, H, W), branches, pool, layout, tiny)
    ((2, 5, 7, 9, 5), [(3, 1, 1), (4, 3, 3), (2, 6, 3)], True, "contiguous", False),  # T3D's depths, odd T/H/W
    ((1, 3, 3, 4, 6), [(3, 1, 1), (2, 4, 3), (1, 7, 5), (2, 2, 1)], True, "channels_last_3d", False),  # T < depth
    ((1, 3, 3, 4, 5), [(2, 1, 1), (2, 7, 1), (1, 2, 3)], True, "channels_last_3d", True),  # the same, fewer taps
    ((1, 20, 5, 6, 7), [(50, 1, 1), (17, 5, 3)], True, "contiguous", False),  # more than one vector block
    ((2, 6, 4, 5, 5), [(3, 1, 1), (4, 3, 3)], False, "non_contiguous", False),  # un-pooled concat
    ((2, 4, 3, 4, 4), [(2, 1, 1), (3, 3, 3)], False, "non_contiguous", True),  # the same, tiny
    ((1, 9, 2, 2, 3), [(1, 1, 1), (2, 3, 3)], True, "expanded", True),  # the smallest poolable clip
    ((2, 7, 4, 4, 5), [(8, 1, 1), (9, 3, 3), (8, 4, 3)], True, "contiguous", False),  # few positions, many channels
    ((1, 5, 3, 3, 3), [(4, 1, 1), (5, 3, 3)], False, "contiguous", True),  # GEMM path without pooling
    ((3, 6, 4, 6, 6), [(3, 1, 1), (3, 2, 3)], True, "expanded", False),  # batch >= 3, depths <= 2 (issue 11 bug 1)
    ((4, 5, 4, 4, 4), [(2, 1, 1), (2, 2, 3)], True, "non_contiguous", True),  # the same class, tiny
    ((1, 3, 3, 4, 5), [(3, 2, 3, 3), (2, 5, 1, 3)], False, "contiguous", True),  # a 1x3 spatial kernel
    ((2, 19, 9, 11, 7), [(5, 1, 1), (6, 3, 3), (5, 6, 3)], True, "channels_last_3d", False),
]
_DENSE_CASES = [
    # ((N, C_0, T, H, W), layers, growth, bn_size, layout, tiny)
    ((2, 5, 3, 4, 5), 3, 3, 2, "contiguous", True),  # odd T/H/W, several layers
    ((1, 7, 1, 3, 3), 1, 5, 3, "contiguous", True),  # batch 1, one layer, T = 1
    ((1, 6, 3, 5, 4), 2, 4, 2, "channels_last_3d", False),  # odd T > 1 at batch 1
    ((2, 4, 2, 3, 3), 2, 3, 2, "non_contiguous", True),
    ((3, 3, 2, 3, 2), 2, 2, 1, "expanded", True),
    ((1, 1, 2, 2, 3), 2, 1, 1, "channels_last_3d", True),  # one input channel, a bottleneck of 1
]


def sample_inputs(
    op: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    training: Sequence[bool] = (True, False),
    tiny: bool = False,
    requires_grad: bool = True,
    seed: int = 0,
) -> Iterator[SampleInput]:
    """The hand-picked sample inputs of ``op`` ("ttl" or "dense_block"), each in every mode of ``training``.

    ``tiny``: only the smallest configurations (for Triton under ``TRITON_INTERPRET=1``, whose time grows with the
    taps of a branch: at most 27).
    """
    common = dict(device=device, dtype=dtype, requires_grad=requires_grad, seed=seed)
    if op == "ttl":
        for shape, branches, pool, layout, small in _TTL_CASES:
            if small or not tiny:
                for mode in training:
                    yield ttl_input(shape, branches, layout=layout, training=mode, pool=pool, **common)
    elif op == "dense_block":
        for shape, layers, k, bn_size, layout, small in _DENSE_CASES:
            if small or not tiny:
                for mode in training:
                    yield dense_block_input(shape, layers, k, bn_size, layout=layout, training=mode, **common)
    else:
        raise ValueError(f"op: expected 'ttl' or 'dense_block', got {op!r}")


def _op(op: str):
    from . import ops

    return {"ttl": ops.ttl, "dense_block": ops.dense_block}[op]


def run(
    sample: SampleInput, backend: str, steps: int = 1, grad_seed: int = 1, fn: Callable | None = None
) -> dict[str, torch.Tensor]:
    """Run ``steps`` forward+backward calls of a copy of ``sample`` through ``backend`` (or through ``fn``, called
    as ``fn(*args, **kwargs)``, e.g. another plain-PyTorch formulation of the op).

    Returns, by name, "y" and "grad <name>" of every differentiable argument (of the last step, each step with a
    fresh seeded upstream gradient), and every running statistic after all steps. ``sample`` is not modified.
    """
    s = sample.clone()
    if fn is None:
        op = _op(s.op)
        fn = lambda *args, **kwargs: op(*args, **kwargs, backend=backend)  # noqa: E731
    names, leaves = list(s.differentiable), list(s.differentiable.values())
    out: dict[str, torch.Tensor] = {}
    for step in range(steps):
        y = fn(*s.args, **s.kwargs)
        out["y"] = y.detach()
        if leaves and y.requires_grad:
            gen = torch.Generator().manual_seed(grad_seed + step)
            gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.device, y.dtype)
            grads = torch.autograd.grad(y, leaves, gy)
            out.update({f"grad {n}": g for n, g in zip(names, grads)})
    out.update({n: b.detach().clone() for n, b in s.buffers.items()})
    return out


def backend_device_pairs(op: str, include_reference: bool = False) -> list[tuple[str, str]]:
    """Every (backend, device) pair this install runs ``op`` on: each built backend on the CPU and, where a GPU is
    present, on "cuda" (triton on the CPU only under ``TRITON_INTERPRET=1``)."""
    from .backends import backends, get

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [
        (name, device)
        for device in devices
        for name in backends(op)
        if (include_reference or name != "reference") and not get(op, name).not_supported_reasons(torch.device(device))
    ]
