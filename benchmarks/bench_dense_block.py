"""Dense block benchmark: the fused op (one buffer, shared statistics, recompute) vs the naive eager block (cat +
BN + ReLU + oneDNN/cuDNN convs per layer) and torch.compile of it; all on the same inputs.

The activation memory kept for backward (``saved_mb``: saved tensors, deduplicated by storage, inputs and
parameters excluded) is the point of the fused block: O(L) against the naive block's O(L^2).

Default shapes: the first three dense blocks of T3D-121 at the clip 1x3x32x112x112 (growth 32, bn_size 4),
batch 1 and 4 (``cfg.batches``); ``--paper`` doubles H and W. ``--shape dense_block:N,C0,T,H,W:LAYERS`` adds any
shape (e.g. ``dense_block:1,64,16,28,28:6``).
"""

from __future__ import annotations

import functools

import torch

from .harness import BenchConfig, Case, Contender, Skip, compiled, fused_backends, parse_ints

OP = "dense_block"
GROWTH, BN_SIZE = 32, 4

# (name, (C_0, T, H, W) at clip 32x112x112, layers) of T3D-121; the paper's clip doubles H and W
T3D121_BLOCKS = [
    ("block1", (64, 16, 28, 28), 6),
    ("block2", (128, 8, 14, 14), 12),
    ("block3", (256, 4, 7, 7), 24),
]


def parse_spec(spec: str) -> tuple[tuple[int, ...], int]:
    """``"N,C0,T,H,W:LAYERS"`` -> ((N, C0, T, H, W), layers)."""
    parts = spec.split(":")
    if len(parts) != 2:
        raise ValueError(f"--shape: expected dense_block:N,C0,T,H,W:LAYERS (e.g. 1,64,16,28,28:6), got {spec!r}")
    shape = parse_ints(parts[0], "--shape dense_block input N,C0,T,H,W")
    if len(shape) != 5:
        raise ValueError(f"--shape: expected 5 input sizes N,C0,T,H,W, got {parts[0]!r}")
    (layers,) = parse_ints(parts[1], "--shape dense_block LAYERS")
    return shape, layers


def dense_block_flops(shape: tuple[int, ...], layers: int, growth: int = GROWTH, bn_size: int = BN_SIZE) -> float:
    """Forward FLOPs of the convs of the block (BN, ReLU, cat not counted): per layer
    2*N*T*H*W*(B*C_i + k*B*27), B = bn_size*k, C_i = C_0 + i*k."""
    n, c0, t, h, w = shape
    p = n * t * h * w
    b = bn_size * growth
    return sum(2.0 * p * (b * (c0 + i * growth) + growth * b * 27) for i in range(layers))


def make_inputs(shape, layers, cfg: BenchConfig) -> tuple[torch.Tensor, list, list[torch.Tensor]]:
    """(x, layers, tensors requiring grad) of the block (growth 32, bn_size 4), from the op's one input builder
    (:func:`t3d_kernels.testing.dense_block_input`: the tests' inputs too)."""
    from t3d_kernels.testing import dense_block_input

    device, dtype = cfg.torch_device, cfg.torch_dtype
    sample = dense_block_input(shape, layers, GROWTH, BN_SIZE, device=device, dtype=dtype, seed=cfg.seed)
    x, spec = sample.args
    return x, spec, list(sample.differentiable.values())


def _contenders(shape, layers, cfg: BenchConfig) -> list[Contender]:
    from t3d_kernels import reference
    from t3d_kernels.ops.dense_block import dense_block

    x, spec, grads = make_inputs(shape, layers, cfg)

    def eager(training: bool) -> torch.Tensor:
        return reference.dense_block(x, spec, training=training)

    contenders = [Contender("eager", eager, grads, kind="baseline")]
    if cfg.compile:
        compiled_block = compiled(functools.partial(reference.dense_block, x, spec))
        contenders.append(Contender("compile", compiled_block, grads, kind="compile"))
    for backend in fused_backends(OP, cfg):

        def fused(training: bool, backend: str = backend) -> torch.Tensor:
            return dense_block(x, spec, training=training, backend=backend)

        contenders.append(Contender(f"fused[{backend}]", fused, grads, kind="fused"))
    return contenders


def cases(cfg: BenchConfig, specs: list[str] | None) -> list[Case]:
    """The dense block cases: ``specs`` (``N,C0,T,H,W:LAYERS`` strings) or the T3D-121 blocks."""
    try:
        import t3d_kernels  # noqa: F401
    except ImportError as exc:
        raise Skip(f"t3d_kernels is not importable ({exc})") from None
    if specs:
        shapes = [(f"({','.join(map(str, s))}) L={layers}", s, layers) for s, layers in map(parse_spec, specs)]
    else:
        scale = 2 if cfg.paper else 1
        shapes = [
            (f"{name} b{n}", (n, c0, t, h * scale, w * scale), layers)
            for n in cfg.batches
            for name, (c0, t, h, w), layers in T3D121_BLOCKS
        ]
    result = []
    for label, shape, layers in shapes:
        n, c0, t, h, w = shape
        result.append(
            Case(
                op=OP,
                label=label,
                flops=dense_block_flops(shape, layers),
                build=functools.partial(_contenders, shape, layers, cfg),
                # the 3x3x3 conv of a layer as one GEMM: positions x B*27 x k (positions capped)
                roof_gemm=(min(n * t * h * w, 4096), BN_SIZE * GROWTH * 27, GROWTH),
                # and the vendor's own rate on that conv (MKL's sgemm of N = 32 runs far below oneDNN's conv)
                roof_conv=(BN_SIZE * GROWTH, GROWTH, 3, t, h, w),
                info={"input": list(shape), "layers": layers, "growth": GROWTH, "bn_size": BN_SIZE},
            )
        )
    return result


if __name__ == "__main__":  # `python -m benchmarks.bench_dense_block [t3d-bench options]`: the dense-block rows
    import sys

    from .cli import main

    sys.exit(main(["--ops", "dense_block", *sys.argv[1:]]))
