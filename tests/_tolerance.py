"""How the op tests and the fuzz suites judge a backend: against the float64 reference, with PyTorch's own error.

STYLE.md: a backend's error against the float64 reference may be at most ~2x the error of PyTorch's own float32
computation of the same float32 values (the reference and, for the pooled TTL, the pool-first algebra in plain
PyTorch ops, whichever errs more: both are PyTorch's way of computing it), plus a few units of rounding at the
result's magnitude (ULPS, per op): where PyTorch's float32 result happens to be (nearly) exactly rounded, any other
summation order alone costs that. The floor is what catches a kernel that sums K terms in one float32 chain (error
~K*eps*|term|, against ~sqrt(K) for blocked or cascaded sums).
- ttl on the CPU: 3. Measured (ulp of the result's magnitude beyond twice PyTorch's error): at most 1.7 for the cpu
  and composite backends over 300 examples of the fuzz suite's strategy per backend, 0.9 for triton (interpreted,
  40 tiny examples), and below 0 (within twice PyTorch's own error) for the cpu backend at the T3D-121 TTLs. The
  cpu kernels once summed in one chain and erred 37 ulp of max|y| at K = 13824 (TTL1 of T3D-121) where PyTorch
  errs 2; blocked, 2-3 (test_ttl.py's long reductions keep it so).
- dense_block, and any op on a GPU: 16, set when the TTL's chains needed it and not re-measured there.
A float64 run gets the float32 bound scaled by eps64/eps32, times 4: the float64 "exact" reference errs as much as
the backend does, and two summation orders' errors need not scale exactly with the unit roundoff (found: 2x failed
on the composite's BN-weight gradient by 10%). That is still ~1e-13 relative.

One trap (issue 11): a parameter's gradient is a sum over every position whose terms can cancel (of a conv weight
right before a training-mode BN it is ~0 in exact arithmetic: BN makes the layer scale-invariant; of a BN weight it is
sum(g * x_hat) with x_hat of mean 0), so its rounding error scales with the terms, not with the sum, even for
PyTorch itself: parameter gradients are judged against the largest parameter gradient of the op, not against
themselves. A running mean is judged against its magnitude plus the square root of its running variance (the spread
of the values it averages: found, a mean of 0.01 over values of ~1). The output, the input's gradient and the
running variances are judged against themselves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from hypothesis import settings

from t3d_kernels import reference, testing

EPS32 = torch.finfo(torch.float32).eps
# units of rounding at the result's magnitude that another summation order may cost (above), per op on the CPU
ULPS = {"ttl": 3, "dense_block": 16}
ULPS_ELSEWHERE = 16


def fuzz_examples(ci: int) -> int:
    """A suite's number of examples: ``ci`` in the CI profile, 10x in the thorough one (conftest.py)."""
    return ci * 10 if settings.get_current_profile_name() == "thorough" else ci


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """No TF32 on CUDA while comparing float32 with float64 (the kernels follow ``cudnn.allow_tf32`` as cuDNN does)."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def parameter_gradients(sample: testing.SampleInput) -> set[str]:
    """Names of the gradients of ``sample`` that are sums over all positions (every differentiable argument but x)."""
    return {f"grad {n}" for n in sample.differentiable if n != "x"}


def max_abs(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def judge(
    exact: dict[str, torch.Tensor],
    got: dict[str, torch.Tensor],
    torch_own: Sequence[dict[str, torch.Tensor]],
    dtype: torch.dtype,
    reductions: set[str] = frozenset(),
    label: str = "",
    ulps: float = ULPS_ELSEWHERE,
) -> list[str]:
    """Failures of ``got`` (a :func:`t3d_kernels.testing.run` in ``dtype``) against ``exact`` (the float64 reference
    of the same values). ``torch_own``: PyTorch's own float32 computations of those values (the worst one counts);
    ``reductions``: the names judged against the largest of them; ``ulps``: the op's floor (ULPS)."""
    grad_scale = max((max_abs(exact[k]) for k in reductions), default=0.0)
    factor = 1.0 if dtype != torch.float64 else 4 * torch.finfo(torch.float64).eps / EPS32
    eps = torch.finfo(dtype).eps if dtype in (torch.float16, torch.bfloat16) else EPS32
    failures = []
    for name, ref in exact.items():
        out = got.get(name)
        if out is None or out.shape != ref.shape or out.dtype != dtype:
            what = None if out is None else f"{out.dtype} {tuple(out.shape)}"
            failures.append(f"{label}{name}: expected {dtype} of shape {tuple(ref.shape)}, got {what}")
            continue
        err = max_abs(out.detach().double().cpu() - ref)
        err_torch = max(max_abs(own[name].double().cpu() - ref) for own in torch_own)
        scale = grad_scale if name in reductions else max_abs(ref)
        if name.endswith("running_mean"):  # a mean errs with the size of the values it averages, not of the mean
            scale += max_abs(exact[name[: -len("mean")] + "var"]) ** 0.5
        tol = factor * (2 * err_torch + ulps * eps * scale)
        if not err <= tol:  # also catches NaN
            failures.append(f"{label}{name}: error {err:.3e} > tol {tol:.3e} (torch's own float32 {err_torch:.3e})")
    return failures


def _ttl_pool_first(*args, pool: bool, **kwargs) -> torch.Tensor:
    return reference.ttl_pool_first(*args, **kwargs)


def check_backend(
    sample: testing.SampleInput,
    backend: str,
    device: str,
    dtype: torch.dtype,
    steps: int = 2,
) -> list[str]:
    """Output, every gradient and the running statistics after ``steps`` steps of ``backend`` on ``device`` in
    ``dtype``, against the float64 reference; ``sample`` holds the values (float32 on the CPU)."""
    half = dtype in (torch.float16, torch.bfloat16)
    # the values are those of the tested dtype; PyTorch's own error is that of float32 (of the dtype, on the device,
    # for fp16/bf16, which the CPU convolutions do not all take)
    values = sample.to("cpu", dtype if half else torch.float32)
    exact = testing.run(values.to(dtype=torch.float64), "reference", steps)
    own_values = values.to(device) if half else values
    torch_own = [testing.run(own_values, "reference", steps)]
    if sample.op == "ttl" and sample.kwargs["pool"]:  # the pool-first algebra rounds differently: PyTorch's too
        torch_own.append(testing.run(own_values, "reference", steps, fn=_ttl_pool_first))
    with exact_float32():
        got = testing.run(values.to(device, dtype), backend, steps)
    label = f"{backend} {device} {dtype} {sample.desc}: "
    ulps = ULPS[sample.op] if torch.device(device).type == "cpu" else ULPS_ELSEWHERE
    return judge(exact, got, torch_own, dtype, parameter_gradients(sample), label, ulps)
