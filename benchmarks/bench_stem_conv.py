"""Stem conv benchmark (``t3d::stem_conv3d``: T3D's conv0, 3 -> 64 channels, kernel (3, 7, 7), stride 2, padding
(1, 3, 3)) for a clip that requires grad: ``StemConv3d``'s op (ATen's forward and weight gradient, the cpu kernel's
input gradient) vs eager ``F.conv3d`` (oneDNN) and torch.compile of it, on the same inputs.

Only the backward differs (the forward is ATen's in both): the rows to read are backward and train. FLOPs are the
conv's own (2 * N * C_out * C_in * 147 * output positions per pass; backward twice that). Default shapes: conv0 of
T3D-121 at the clip 1x3x32x112x112, batch 1 and 4 (``cfg.batches``); ``--paper``: 32x224x224. ``--shape
stem_conv3d:N,C,T,H,W`` adds any clip (C of 1-4 takes the kernel).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .harness import BenchConfig, Case, Contender, Skip, clip_shapes, compiled, fused_backends

OP = "stem_conv3d"
OUT_CHANNELS, KERNEL, STRIDE, PADDING = 64, (3, 7, 7), (2, 2, 2), (1, 3, 3)


def _contenders(shape, cfg: BenchConfig) -> list[Contender]:
    from t3d_kernels.ops.stem_conv import stem_conv3d

    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    x = torch.randn(shape, generator=g).to(cfg.torch_device, cfg.torch_dtype).requires_grad_()
    fan_in = shape[1] * KERNEL[0] * KERNEL[1] * KERNEL[2]
    w = (torch.randn(OUT_CHANNELS, shape[1], *KERNEL, generator=g) / fan_in**0.5).to(cfg.torch_device, cfg.torch_dtype)
    w.requires_grad_()
    grads = [x, w]

    def eager(training: bool) -> torch.Tensor:
        return F.conv3d(x, w, None, STRIDE, PADDING)

    contenders = [Contender("eager", eager, grads, kind="baseline")]
    if cfg.compile:
        fn = compiled(functools.partial(F.conv3d, x, w, None, STRIDE, PADDING))
        contenders.append(Contender("compile", lambda training: fn(), grads, kind="compile"))
    for backend in fused_backends(OP, cfg):

        def fused(training: bool, backend: str = backend) -> torch.Tensor:
            return stem_conv3d(x, w, None, STRIDE, PADDING, backend=backend)

        contenders.append(Contender(f"fused[{backend}]", fused, grads, kind="fused"))
    return contenders


def conv_flops(shape) -> float:
    n, c, t, h, w = shape
    out = [(d + 2 * p - k) // s + 1 for d, k, s, p in zip((t, h, w), KERNEL, STRIDE, PADDING)]
    return 2.0 * n * OUT_CHANNELS * c * KERNEL[0] * KERNEL[1] * KERNEL[2] * out[0] * out[1] * out[2]


def cases(cfg: BenchConfig, specs: list[str] | None) -> list[Case]:
    """The stem conv cases: ``specs`` (``N,C,T,H,W`` strings) or T3D-121's conv0 at the default (or paper) clip."""
    try:
        import t3d_kernels  # noqa: F401
    except ImportError as exc:
        raise Skip(f"t3d_kernels is not importable ({exc})") from None
    if specs:
        shapes = clip_shapes(specs, OP)
    else:
        side = 224 if cfg.paper else 112
        shapes = [(f"conv0 b{n}", (n, 3, 32, side, side)) for n in cfg.batches]
    return [
        Case(
            op=OP,
            label=label,
            flops=conv_flops(shape),
            build=functools.partial(_contenders, shape, cfg),
            info={"input": list(shape), "kernel": list(KERNEL), "stride": list(STRIDE), "padding": list(PADDING)},
        )
        for label, shape in shapes
    ]


if __name__ == "__main__":  # `python -m benchmarks.bench_stem_conv [t3d-bench options]`
    import sys

    from .cli import main

    sys.exit(main(["--ops", OP, *sys.argv[1:]]))
