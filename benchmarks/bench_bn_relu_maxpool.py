"""Fused stem benchmark (``t3d::bn_relu_maxpool``: BN -> ReLU -> MaxPool3d(3, stride (1, 2, 2), padding 1), T3D's
norm0/relu0/pool0): the fused op vs the eager reference (ATen's batch_norm, relu and max_pool3d) and torch.compile
of it, on the same inputs.

The op is memory-bound (no FLOPs are counted: GFLOP/s columns stay empty); its floor is one read of x forward and
one read of x plus one write of grad_x backward. Default shapes: the stem of T3D-121 at the clip 1x3x32x112x112
(x: N x 64 x 16 x 56 x 56), batch 1 and 4 (``cfg.batches``); ``--paper``: 32x224x224. ``--shape
bn_relu_maxpool:N,C,T,H,W`` adds any shape.
"""

from __future__ import annotations

import functools

import torch

from .harness import BenchConfig, Case, Contender, Skip, clip_shapes, compiled, fused_backends

OP = "bn_relu_maxpool"
GEOMETRY = ((3, 3, 3), (1, 2, 2), (1, 1, 1))


def _contenders(shape, cfg: BenchConfig) -> list[Contender]:
    from t3d_kernels import reference
    from t3d_kernels.ops.bn_relu_maxpool import bn_relu_maxpool

    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    c = shape[1]
    x = torch.randn(shape, generator=g).to(cfg.torch_device, cfg.torch_dtype).requires_grad_()
    gamma = (torch.rand(c, generator=g) + 0.5).to(cfg.torch_device, cfg.torch_dtype).requires_grad_()
    beta = torch.randn(c, generator=g).to(cfg.torch_device, cfg.torch_dtype).requires_grad_()
    mean = torch.zeros(c, device=cfg.torch_device, dtype=cfg.torch_dtype)
    var = torch.ones(c, device=cfg.torch_device, dtype=cfg.torch_dtype)
    grads = [x, gamma, beta]

    def eager(training: bool) -> torch.Tensor:
        return reference.bn_relu_maxpool(x, gamma, beta, mean, var, *GEOMETRY, training=training)

    contenders = [Contender("eager", eager, grads, kind="baseline")]
    if cfg.compile:
        fn = compiled(functools.partial(reference.bn_relu_maxpool, x, gamma, beta, mean, var, *GEOMETRY))
        contenders.append(Contender("compile", fn, grads, kind="compile"))
    for backend in fused_backends(OP, cfg):

        def fused(training: bool, backend: str = backend) -> torch.Tensor:
            return bn_relu_maxpool(x, gamma, beta, mean, var, *GEOMETRY, training=training, backend=backend)

        contenders.append(Contender(f"fused[{backend}]", fused, grads, kind="fused"))
    return contenders


def cases(cfg: BenchConfig, specs: list[str] | None) -> list[Case]:
    """The stem cases: ``specs`` (``N,C,T,H,W`` strings) or T3D-121's stem at the default (or paper) clip."""
    try:
        import t3d_kernels  # noqa: F401
    except ImportError as exc:
        raise Skip(f"t3d_kernels is not importable ({exc})") from None
    if specs:
        shapes = clip_shapes(specs, OP)
    else:
        side = 112 if cfg.paper else 56
        shapes = [(f"stem b{n}", (n, 64, 16, side, side)) for n in cfg.batches]
    return [
        Case(
            op=OP, label=label, flops=0.0, build=functools.partial(_contenders, shape, cfg), info={"input": list(shape)}
        )
        for label, shape in shapes
    ]


if __name__ == "__main__":  # `python -m benchmarks.bench_bn_relu_maxpool [t3d-bench options]`
    import sys

    from .cli import main

    sys.exit(main(["--ops", OP, *sys.argv[1:]]))
