"""TTL benchmark: the fused op vs the eager reference (oneDNN / cuDNN), torch.compile of it, and the pool-first
algebra in plain PyTorch ops; all on the same inputs.

Default shapes: the three TTLs of T3D-121 at the clip 1x3x32x112x112, batch 1 and 4 (``cfg.batches``);
``--paper``: at the paper's 32x224x224. ``--shape ttl:N,C,T,H,W:DEPTHS:OUT`` (e.g. ``ttl:1,256,16,28,28:1,3,6:128``)
adds any shape; OUT is the total output channels, split evenly over the branches.
"""

from __future__ import annotations

import functools

import torch

from .harness import BenchConfig, Case, Contender, Skip, compiled, fused_backends, parse_ints

OP = "ttl"

# (name, (C, T, H, W) at clip 32x112x112, depths, out channels) of T3D-121; the paper's clip doubles H and W
T3D121_TTLS = [
    ("TTL1", (256, 16, 28, 28), (1, 3, 6), 128),
    ("TTL2", (512, 8, 14, 14), (1, 3, 4), 256),
    ("TTL3", (1024, 4, 7, 7), (1, 3, 4), 512),
]


def parse_spec(spec: str) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """``"N,C,T,H,W:DEPTHS:OUT"`` -> ((N, C, T, H, W), depths, out)."""
    parts = spec.split(":")
    if len(parts) != 3:
        raise ValueError(
            f"--shape: expected ttl:N,C,T,H,W:DEPTHS:OUT (e.g. ttl:1,256,16,28,28:1,3,6:128), got {spec!r}"
        )
    shape = parse_ints(parts[0], "--shape ttl input N,C,T,H,W")
    if len(shape) != 5:
        raise ValueError(f"--shape: expected 5 input sizes N,C,T,H,W, got {parts[0]!r}")
    depths = parse_ints(parts[1], "--shape ttl depths")
    (out,) = parse_ints(parts[2], "--shape ttl OUT channels")
    if out < len(depths):
        raise ValueError(f"--shape: expected OUT >= number of branches ({len(depths)}), got {out}")
    return shape, depths, out


def ttl_flops(shape: tuple[int, ...], depths: tuple[int, ...], out: int, kernel: int = 3) -> float:
    """Forward FLOPs of the reference TTL (stride-1 convs at full resolution; BN, ReLU and pooling are not
    counted): sum over branches of 2 * N*T*H*W * C_i * C_in * d_i * kh * kw."""
    from t3d_kernels.nn import split_channels

    n, c, t, h, w = shape
    total = 0.0
    for c_out, d in zip(split_channels(out, len(depths)), depths, strict=True):
        taps = d if d == 1 else d * kernel * kernel
        total += 2.0 * n * t * h * w * c_out * c * taps
    return total


def pool_first_flops(shape: tuple[int, ...], depths: tuple[int, ...], out: int, kernel: int = 3) -> float:
    """Forward FLOPs of the pool-first algebra (the fused backends and the "pool-first" contender): the same convs
    evaluated only at the pooled output positions, N*(T//2)*(H//2)*(W//2): 1/8 of :func:`ttl_flops` for even sizes."""
    n, c, t, h, w = shape
    return ttl_flops((n, c, t // 2, h // 2, w // 2), depths, out, kernel)


def _inputs(shape, depths, out, cfg: BenchConfig):
    """(x, bn_weight, bn_bias, running_mean, running_var, weights) of the TTL, from the op's one input builder
    (:func:`t3d_kernels.testing.ttl_input`: the tests' inputs too); x and the parameters require grad."""
    from t3d_kernels.nn import split_channels
    from t3d_kernels.testing import ttl_input

    branches = [(c, d, 1 if d == 1 else 3) for c, d in zip(split_channels(out, len(depths)), depths, strict=True)]
    return ttl_input(shape, branches, device=cfg.torch_device, dtype=cfg.torch_dtype, seed=cfg.seed).args


def _contenders(shape, depths, out, cfg: BenchConfig) -> list[Contender]:
    import t3d_kernels
    from t3d_kernels import reference

    x, bn_weight, bn_bias, running_mean, running_var, weights = _inputs(shape, depths, out, cfg)
    grads = [x, bn_weight, bn_bias, *weights]
    args = (x, bn_weight, bn_bias, running_mean, running_var, weights)

    def eager(training: bool) -> torch.Tensor:
        return reference.ttl(*args, training=training)

    def pool_first(training: bool) -> torch.Tensor:
        return reference.ttl_pool_first(*args, training=training)

    contenders = [Contender("eager", eager, grads, kind="baseline")]
    if cfg.compile:
        # a fresh compiled function per case: its guards (training, grad mode) give one compile per pass
        compiled_ttl = compiled(functools.partial(reference.ttl, *args))
        contenders.append(Contender("compile", compiled_ttl, grads, kind="compile"))
    useful = pool_first_flops(shape, depths, out)
    contenders.append(Contender("pool-first", pool_first, grads, kind="other", flops=useful))
    for backend in fused_backends(OP, cfg):

        def fused(training: bool, backend: str = backend) -> torch.Tensor:
            return t3d_kernels.ttl(*args, training=training, backend=backend)

        contenders.append(Contender(f"fused[{backend}]", fused, grads, kind="fused", flops=useful))
    return contenders


def cases(cfg: BenchConfig, specs: list[str] | None) -> list[Case]:
    """The TTL cases: ``specs`` (``N,C,T,H,W:DEPTHS:OUT`` strings) or the T3D-121 shapes."""
    try:
        import t3d_kernels  # noqa: F401
    except ImportError as exc:
        raise Skip(f"t3d_kernels is not importable ({exc})") from None
    if specs:
        shapes = [
            (f"({','.join(map(str, s))}) d={','.join(map(str, d))}", s, d, o) for s, d, o in map(parse_spec, specs)
        ]
    else:
        scale = 2 if cfg.paper else 1
        shapes = [
            (f"{name} b{n}", (n, c, t, h * scale, w * scale), depths, out)
            for n in cfg.batches
            for name, (c, t, h, w), depths, out in T3D121_TTLS
        ]
    result = []
    for label, shape, depths, out in shapes:
        n, c, t, h, w = shape
        if t < 2 or h < 2 or w < 2:
            raise ValueError(f"--shape: expected T, H, W >= 2 (the TTL pools by 2), got {shape}")
        result.append(
            Case(
                op=OP,
                label=label,
                flops=ttl_flops(shape, depths, out),
                build=functools.partial(_contenders, shape, depths, out, cfg),
                # the TTL's 3x3x3 conv as one GEMM (positions x C_in*27 x all output channels; positions capped:
                # the rate no longer grows beyond a few thousand rows)
                roof_gemm=(min(n * t * h * w, 4096), c * 27, out),
                # and oneDNN's / cuDNN's own rate on that conv (faster than MKL's sgemm on AMD CPUs)
                roof_conv=(c, out, 3, t, h, w),
                info={"input": list(shape), "depths": list(depths), "out_channels": out},
            )
        )
    return result


if __name__ == "__main__":  # `python -m benchmarks.bench_ttl [t3d-bench options]`: the TTL rows of the suite
    import sys

    from .cli import main

    sys.exit(main(["--ops", "ttl", *sys.argv[1:]]))
