"""Runs the CPU kernels under the instruction-set cap of the environment (T3D_CPU_ISA) and saves what they computed.

``python tests/_isa_worker.py OUT``: for hand-picked TTL and dense-block inputs (the samples of t3d_kernels.testing
and T3D-sized ones that take the register tiles' full width, the few-position GEMM path and the Winograd conv) and
the stem ops, the failures against the float64 reference (judged as tests/_tolerance.py judges every backend) and
the outputs, gradients and running statistics of each, the Winograd conv's and the stem conv input gradient's
outputs alone, and the vector path the extension reports (_C.cpu_isa()), to OUT (torch.save).
tests/test_cpu_isa.py compares them across caps.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from _tolerance import check_backend, exact_float32  # noqa: E402

from t3d_kernels import testing  # noqa: E402


def samples() -> list[testing.SampleInput]:
    out = list(testing.sample_inputs("ttl", training=(True,)))
    out += list(testing.sample_inputs("dense_block", training=(True,), tiny=True))
    # T3D-like: 48-wide column blocks and several row tiles; few positions (the GEMM path); a Winograd-sized layer
    out.append(testing.ttl_input((1, 96, 8, 14, 14), [(40, 1, 1), (40, 3, 3), (40, 6, 3)], seed=1))
    out.append(testing.ttl_input((2, 64, 4, 3, 3), [(32, 1, 1), (32, 3, 3), (32, 4, 3)], seed=2))
    out.append(testing.dense_block_input((1, 64, 16, 28, 28), 1, 32, 4, seed=3))
    return out


def stem_failures() -> list[str]:
    """The stem ops' own float32 checks (tests/test_stem_conv.py, tests/test_bn_relu_maxpool.py) on their shapes."""
    import test_bn_relu_maxpool as pool
    import test_stem_conv as stem

    checks = [
        lambda shape=shape, t=t: pool.test_float32_within_torch_error("cpu", t, shape)
        for shape in pool.F32_SHAPES
        for t in (True, False)
    ]
    checks += [
        lambda: stem.check_float32(1, 3, 8, 32, 32, 16, **stem.T3D_STEM),
        lambda: stem.check_float32(2, 3, 5, 19, 37, 24, **stem.T3D_STEM),
        lambda: stem.check_float32(1, 3, 4, 9, 130, 8, **stem.T3D_STEM, seed=154),
        lambda: stem.check_float32(1, 2, 4, 9, 300, 8, (3, 5, 5), (1, 1, 2), (1, 2, 2)),
    ]
    failures = []
    for check in checks:
        try:
            check()
        except AssertionError as exc:
            failures.append(str(exc))
    return failures


# (N, C, K, T, H, W): a partial last block and clipped tiles; two passes of input channels and rows of two pieces;
# a T3D block-2 layer
WINOGRAD_SHAPES = [(2, 5, 7, 3, 4, 5), (1, 33, 13, 4, 6, 35), (1, 64, 32, 8, 14, 14)]


def winograd_results() -> dict[str, torch.Tensor]:
    """The Winograd conv and its weight gradient alone, where this cap runs them (AVX2 or AVX-512): the float64
    checks are tests/test_winograd.py's; these are for comparing the paths' bits."""
    from t3d_kernels import _C

    out = {}
    for n, c, k, t, h, w in WINOGRAD_SHAPES:
        gen = torch.Generator().manual_seed(n + c + k)
        x, wt = torch.randn(n, c, t, h, w, generator=gen), torch.randn(k, c, 3, 3, 3, generator=gen)
        if not _C._winograd_applies(x, wt):
            continue
        gy = torch.randn(n, k, t, h, w, generator=gen)
        out[f"{(n, c, k, t, h, w)} y"] = _C._winograd_conv3x3x3(x, wt, None)
        out[f"{(n, c, k, t, h, w)} grad_w"] = _C._winograd_conv3x3x3_grad_weight(x, gy)
    return out


# the stem conv's input gradient (N, C, T, H, W, O, kernel, stride, padding): T3D's conv0 at a small size, a row end
# inside a vector and 4 channels (one vector per phase on AVX2), another geometry
STEM_GRAD_SHAPES = [
    ((1, 3, 8, 32, 32, 16), (3, 7, 7), (2, 2, 2), (1, 3, 3)),
    ((2, 3, 5, 19, 37, 24), (3, 7, 7), (2, 2, 2), (1, 3, 3)),
    ((1, 4, 4, 9, 45, 8), (3, 5, 5), (1, 1, 2), (1, 2, 2)),
    ((1, 1, 3, 6, 11, 5), (2, 3, 4), (1, 2, 2), (1, 0, 2)),
]


def stem_grad_results() -> dict[str, torch.Tensor]:
    """The stem conv's input-gradient kernel alone on float32 (its float64 checks are tests/test_stem_conv.py's), for
    comparing the paths' bits."""
    import test_stem_conv as stem

    out = {}
    for shape, k, s, p in STEM_GRAD_SHAPES:
        x, w, gy = stem.case(*shape, k=k, s=s, p=p, seed=sum(shape), dtype=torch.float32)
        out[str((shape, k, s, p))] = stem.kernel(gy, w, x.shape, s, p)
    return out


def main(path: str) -> None:
    from t3d_kernels import _C

    torch.set_num_threads(2)
    failures, results = [], {}
    for s in samples():
        failures += check_backend(s, "cpu", "cpu", torch.float32, steps=1)
        with exact_float32():
            results[s.desc] = testing.run(s, "cpu")
    failures += stem_failures()
    torch.save(
        {
            "isa": _C.cpu_isa(),
            "failures": failures,
            "results": results,
            "winograd": winograd_results(),
            "stem_grad": stem_grad_results(),
        },
        path,
    )


if __name__ == "__main__":
    main(sys.argv[1])
