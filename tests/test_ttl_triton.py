"""Triton backend of the fused TTL vs the reference: output and every gradient, train and eval, odd shapes.

The checks run in a subprocess with ``TRITON_INTERPRET=1`` set before triton is imported (Triton kernels then
run on the CPU), so this module never changes how other tests see triton. With a CUDA device the same checks
also run on it, compiled, plus fp16/bf16, and again through the CUDA C++ backend. Run directly:
``python tests/test_ttl_triton.py [--device cuda [--backend cuda]]``.

Tolerance (STYLE.md): the error of the kernel against the float64 reference may be at most twice the error of
PyTorch's own float32 computation of the same thing (the reference and the pool-first composite, whichever is
worse), plus two units of rounding at the result's magnitude: where PyTorch's float32 result happens to be
(nearly) exactly rounded, e.g. a per-channel sum of a few terms, a different summation order alone costs that.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

# (N, C_in, T, H, W, [(C_i, depth, kh, kw)], pool, training, split override, layout)
CASES = [
    # T3D-like: depths 1, 3, 6 with depth > T, odd T/H/W, batch 2, C_in not a multiple of 8
    (2, 5, 5, 5, 7, [(3, 1, 1, 1), (4, 3, 3, 3), (2, 6, 3, 3)], True, True, None, "contiguous"),
    # eval (running stats), even depth 4, split-K / split-M atomic paths forced
    (1, 8, 4, 6, 4, [(3, 1, 1, 1), (4, 3, 3, 3), (2, 4, 3, 3)], True, False, 3, "contiguous"),
    # no pooling, even depth 2, depth 5 > T, a 1x3 spatial kernel
    (1, 3, 3, 4, 5, [(3, 2, 3, 3), (2, 5, 1, 3)], False, True, None, "contiguous"),
    # depth 7 > T, odd everything, channels_last_3d input
    (1, 6, 3, 5, 3, [(5, 7, 3, 3), (2, 1, 1, 1)], True, True, None, "channels_last"),
    # non-contiguous input (a strided slice), eval, split paths
    (2, 4, 6, 3, 4, [(2, 3, 3, 3), (3, 2, 1, 1)], True, False, 2, "sliced"),
]


def _make(case, dtype, device, seed):
    n, c, t, h, w, specs, _, _, _, layout = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, t, h, w if layout != "sliced" else 2 * w, generator=gen, dtype=torch.float64)
    f64 = dict(generator=gen, dtype=torch.float64)
    bn = [torch.rand(c, **f64) + 0.5, 0.2 * torch.randn(c, **f64)]
    stats = [0.1 * torch.randn(c, **f64), torch.rand(c, **f64) + 0.5]
    ws = [torch.randn(ci, c, d, kh, kw, **f64) / (c * d * kh * kw) ** 0.5 for ci, d, kh, kw in specs]
    to_dev = lambda v: v.to(device=device, dtype=dtype)  # noqa: E731
    x = to_dev(x)
    if layout == "sliced":
        x = x[..., ::2]
    elif layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x, [to_dev(v) for v in bn], [to_dev(v) for v in stats], [to_dev(v) for v in ws]


def _run(case, dtype, device, backend, seed=0):
    """y, grads (x, bn weight, bn bias, *weights) and the updated running stats, through `backend`."""
    from t3d_kernels import reference
    from t3d_kernels.ops.ttl import ttl

    pool, training = case[6], case[7]
    x, bn, stats, ws = _make(case, dtype, device, seed)
    leaves = [x.detach().requires_grad_(), *(v.detach().requires_grad_() for v in bn + ws)]
    xr, bw, bb, *wr = leaves
    rm, rv = (s.clone() for s in stats)
    if backend == "reference":
        y = reference.ttl(xr, bw, bb, rm, rv, wr, training=training, pool=pool)
    else:
        y = ttl(xr, bw, bb, rm, rv, wr, training=training, pool=pool, backend=backend)
    gen = torch.Generator().manual_seed(seed + 1)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    grads = torch.autograd.grad(y, leaves, gy)
    names = ["y", "grad_x", "grad_bn_weight", "grad_bn_bias"] + [f"grad_weights[{i}]" for i in range(len(ws))]
    out = dict(zip(names, [y, *grads], strict=True))
    out["running_mean"], out["running_var"] = rm, rv
    return out


def check_case(case, device: str, dtype: torch.dtype, backend: str = "triton") -> list[str]:
    """Failures (empty when the backend matches the reference within tolerance)."""
    from t3d_kernels.triton import ttl as triton_ttl

    triton_ttl._split_override = case[8]
    try:
        exact = _run(case, torch.float64, "cpu", "reference")
        ours = _run(case, dtype, device, backend)
    finally:
        triton_ttl._split_override = None
    torch_own = [_run(case, dtype, device, b) for b in ("reference", "composite")]
    failures = []
    for name, ref in exact.items():
        got = ours[name]
        if got.shape != ref.shape or got.dtype != dtype:
            failures.append(f"{name}: expected {dtype} of shape {tuple(ref.shape)}, got {got.dtype} {tuple(got.shape)}")
            continue
        err = (got.double().cpu() - ref).abs().max().item()
        err_torch = max((o[name].double().cpu() - ref).abs().max().item() for o in torch_own)
        tol = 2 * err_torch + 2 * torch.finfo(dtype).eps * ref.abs().max().item()
        status = "ok" if err <= tol else "FAIL"
        print(f"  {status:4s} {name:18s} err {err:.2e}  torch's own {err_torch:.2e}  tol {tol:.2e}")
        if err > tol:
            failures.append(f"case {case}, {dtype}: {name} error {err:.3e} > tol {tol:.3e}")
    return failures


def main(argv: list[str]) -> int:
    device = argv[argv.index("--device") + 1] if "--device" in argv else "cpu"
    # --backend cuda checks the CUDA C++ backend with the same cases (on a GPU machine)
    backend = argv[argv.index("--backend") + 1] if "--backend" in argv else "triton"
    if device == "cuda":
        # compare exact fp32 arithmetic with the float64 reference (the kernels follow cudnn.allow_tf32)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    dtypes = [torch.float32] + ([torch.float16, torch.bfloat16] if device == "cuda" else [])
    failures = []
    for dtype in dtypes:
        for case in CASES:
            print(f"{backend} {device} {dtype} {case}")
            failures += check_case(case, device, dtype, backend)
    print("\n".join(failures) if failures else f"all {backend} TTL checks passed")
    return 1 if failures else 0


def _run_subprocess(extra_env: dict[str, str], args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, **extra_env}
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.triton
def test_triton_ttl_matches_reference_interpreted():
    pytest.importorskip("triton")
    proc = _run_subprocess({"TRITON_INTERPRET": "1"}, [])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    assert "all triton TTL checks passed" in proc.stdout


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_ttl_matches_reference_cuda():
    pytest.importorskip("triton")
    proc = _run_subprocess({"TRITON_INTERPRET": "0"}, ["--device", "cuda"])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernels_match_reference():
    """The same cases through the CUDA C++ backend (csrc/cuda/ttl_kernel.cu): fp32 on CUDA cores, fp16/bf16 on
    tensor cores."""
    from t3d_kernels import backends

    if "cuda" not in backends("ttl"):
        pytest.skip("t3d_kernels._C was built without the CUDA kernels")
    proc = _run_subprocess({"TRITON_INTERPRET": "0"}, ["--device", "cuda", "--backend", "cuda"])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]


if __name__ == "__main__":
    if "--device" not in sys.argv or "cpu" in sys.argv:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.exit(main(sys.argv))
