"""The fused dense block (``t3d::dense_block``) against the plain-PyTorch reference, on every backend.

Through ``DenseBlock3d`` (several training steps, so running statistics and ``num_batches_tracked`` are
compared after updates) and through the registered op (gradcheck, opcheck, torch.compile, bad input).

Tolerance (STYLE.md): against the float64 reference, a float32 backend may err at most twice as much as PyTorch's
own float32 reference does, plus two units of rounding at the result's magnitude (a per-channel sum of a few
terms can be exactly rounded in one order and not in another). float64 backends must agree to ~1e-10 relative.

The Triton backend runs in a subprocess with ``TRITON_INTERPRET=1`` set before triton is imported, so this module
never changes how other tests see triton: ``python tests/test_dense_block.py [--device cuda] [--backend cuda]``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

# (N, C_0, layers, growth k, bn_size, (T, H, W), layout)
CASES = [
    # channels not a multiple of 8, odd T/H/W, several layers
    (2, 5, 3, 3, 2, (3, 4, 5), "contiguous"),
    # batch 1, one layer, T = 1
    (1, 7, 1, 5, 3, (1, 3, 3), "contiguous"),
    # batch 1, odd T > 1 (the CPU backend splits T in two for oneDNN's weight gradient), channels_last_3d input
    (1, 6, 2, 4, 2, (3, 5, 4), "channels_last"),
    # non-contiguous input (a strided slice)
    (2, 4, 2, 3, 2, (2, 3, 3), "sliced"),
]
STEPS = 3  # training steps before comparing running statistics


def _block(case, dtype, backend, seed=0):
    from t3d_kernels.nn import DenseBlock3d

    n, c0, layers, k, bn_size, _, _ = case
    torch.manual_seed(seed)
    block = DenseBlock3d(layers, c0, k, bn_size, backend=backend)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # non-trivial affine and running statistics, so every term of the BN backward is exercised
        for name, p in block.named_parameters():
            if "norm" in name:
                p.copy_(
                    (torch.rand(p.shape, generator=gen) + 0.5)
                    if name.endswith("weight")
                    else torch.randn(p.shape, generator=gen) * 0.2
                )
        for name, b in block.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
    return block.to(dtype)


def _input(case, dtype, device, seed):
    n, c0, _, _, _, (t, h, w), layout = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c0, t, h, 2 * w if layout == "sliced" else w, generator=gen, dtype=torch.float64)
    x = (x + 0.5).to(device=device, dtype=dtype)  # a non-zero mean, as after a ReLU
    if layout == "sliced":
        x = x[..., ::2]
    elif layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x


def run_block(case, dtype, backend, training=True, device="cpu"):
    """Output, every gradient and every buffer after STEPS steps (training) or one (eval), by name."""
    block = _block(case, dtype, backend).to(device).train(training)
    out = {}
    for step in range(STEPS if training else 1):
        x = _input(case, dtype, device, seed=10 + step).requires_grad_()
        block.zero_grad()
        y = block(x)
        gen = torch.Generator().manual_seed(20 + step)
        gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        y.backward(gy)
    out["y"] = y
    out["grad_x"] = x.grad
    for name, p in block.named_parameters():
        out[f"grad {name}"] = p.grad
    for name, b in block.named_buffers():
        out[name] = b
    return out


def compare(case, dtype, backend, training, device="cpu") -> list[str]:
    """Failures of ``backend`` against the float64 reference (empty when within tolerance)."""
    exact = run_block(case, torch.float64, "reference", training)
    ours = run_block(case, dtype, backend, training, device)
    torch_own = run_block(case, dtype, "reference", training) if dtype != torch.float64 else None
    failures = []
    for name, ref in exact.items():
        got = ours[name]
        if got is None or got.shape != ref.shape:
            failures.append(
                f"{name}: expected shape {tuple(ref.shape)}, got {None if got is None else tuple(got.shape)}"
            )
            continue
        if not ref.is_floating_point():
            if not torch.equal(got.cpu(), ref):
                failures.append(f"{name}: expected {ref.tolist()}, got {got.tolist()}")
            continue
        err = (got.double().cpu() - ref).abs().max().item()
        scale = ref.abs().max().item()
        if torch_own is None:
            tol = 1e-10 * max(scale, 1.0)
        else:
            err_torch = (torch_own[name].double() - ref).abs().max().item()
            tol = 2 * err_torch + 2 * torch.finfo(dtype).eps * scale
        if not err <= tol:
            failures.append(
                f"{backend} {dtype} training={training} case {case}: {name} error {err:.3e} > tol {tol:.3e}"
            )
    return failures


def _cpu_backends() -> list[str]:
    from t3d_kernels import backends

    return [b for b in backends("dense_block") if b in ("composite", "cpu")]


BACKENDS = ["composite", "cpu"]


def _need(backend):
    if backend not in _cpu_backends():
        pytest.skip(f"dense_block backend {backend!r} not built here")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_matches_reference(case, training, dtype, backend):
    _need(backend)
    failures = compare(case, dtype, backend, training)
    assert not failures, "\n".join(failures)


def _functional_args(dtype=torch.float64, n=2, c0=3, layers=2, k=2, bn_size=2, shape=(2, 3, 2), seed=0):
    """(x, layers) for the functional form; the tensors need gradients."""
    gen = torch.Generator().manual_seed(seed)
    f = dict(generator=gen, dtype=dtype)
    x = torch.randn(n, c0, *shape, **f) + 0.3
    spec = []
    c = c0
    for _ in range(layers):
        b = bn_size * k
        norm1 = [
            torch.rand(c, **f) + 0.5,
            0.2 * torch.randn(c, **f),
            0.1 * torch.randn(c, **f),
            torch.rand(c, **f) + 0.5,
        ]
        norm2 = [
            torch.rand(b, **f) + 0.5,
            0.2 * torch.randn(b, **f),
            0.1 * torch.randn(b, **f),
            torch.rand(b, **f) + 0.5,
        ]
        w1 = torch.randn(b, c, 1, 1, 1, **f) / c**0.5
        w2 = torch.randn(k, b, 3, 3, 3, **f) / (27 * b) ** 0.5
        spec.append((norm1, w1, norm2, w2))
        c += k
    return x, spec


def _op_args(x, spec, training, backend):
    cols = [[layer[0][j] for layer in spec] for j in range(4)]
    cols2 = [[layer[2][j] for layer in spec] for j in range(4)]
    return (
        x,
        *cols[:2],
        *cols[2:],
        [s[1] for s in spec],
        *cols2[:2],
        *cols2[2:],
        [s[3] for s in spec],
        training,
        1e-5,
        backend,
        "",  # no process group
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck(backend, training):
    _need(backend)
    from t3d_kernels.ops.dense_block import dense_block

    x, spec = _functional_args(layers=2, shape=(2, 2, 3))
    params = [x] + [
        t for layer in spec for t in (layer[0][0], layer[0][1], layer[1], layer[2][0], layer[2][1], layer[3])
    ]

    def fn(*leaves):
        it = iter(leaves[1:])
        layers = []
        for norm1, _, norm2, _ in spec:
            g1, b1, w1, g2, b2, w2 = (next(it) for _ in range(6))
            layers.append(
                ((g1, b1, norm1[2].clone(), norm1[3].clone()), w1, (g2, b2, norm2[2].clone(), norm2[3].clone()), w2)
            )
        return dense_block(leaves[0], layers, training=training, backend=backend)

    leaves = [p.detach().requires_grad_() for p in params]
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    _need(backend)
    import t3d_kernels.ops.dense_block  # noqa: F401  (registers the ops)

    for training in (True, False):
        x, spec = _functional_args(dtype=torch.float32)
        args = _op_args(x, spec, training, backend)
        for t in (x, *args[1], *args[2], *args[5], *args[6], *args[7], *args[10]):
            t.requires_grad_()
        torch.library.opcheck(torch.ops.t3d.dense_block.default, args)
        with torch.no_grad():
            y, m1, v1, m2, v2 = torch.ops.t3d.dense_block(*args)
        plain = lambda ts: [t.detach() for t in ts]  # noqa: E731
        bargs = (
            torch.randn_like(y),
            y,
            m1,
            v1,
            m2,
            v2,
            *map(plain, (args[1], args[2], args[5], args[6], args[7], args[10])),
            training,
            1e-5,
            backend,
            "",
        )
        torch.library.opcheck(torch.ops.t3d.dense_block_backward.default, bargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    _need(backend)
    from t3d_kernels.nn import DenseBlock3d

    torch._dynamo.reset()
    block = DenseBlock3d(2, 3, 2, 2, backend=backend).train()
    twin = DenseBlock3d(2, 3, 2, 2, backend=backend).train()
    twin.load_state_dict(block.state_dict())
    x = torch.randn(2, 3, 2, 3, 3)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y_eager = twin(x)
    torch.testing.assert_close(y, y_eager)
    for (name, a), b in zip(block.named_buffers(), twin.buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while ``fn`` runs, each storage counted once."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_memory_is_the_buffer(backend):
    """What the fused block keeps for backward is its output buffer, the statistics and the parameters: O(L)."""
    _need(backend)
    from t3d_kernels.nn import DenseBlock3d

    block = DenseBlock3d(4, 8, 4, 2, backend=backend).train()
    x = torch.randn(2, 8, 3, 4, 4, requires_grad=True)
    params = sum(p.numel() * p.element_size() for p in block.parameters())
    out = {}
    fused = _saved_bytes(lambda: out.setdefault("y", block(x)))
    y = out["y"]
    stats = 2 * sum(m.norm1.num_features + m.norm2.num_features for m in block.layers()) * 4
    assert fused == y.numel() * 4 + stats + params
    block.backend = "reference"
    naive = _saved_bytes(lambda: block(x))
    assert naive > 2 * fused


def test_fuse_switches_dense_blocks():
    from t3d_kernels import fuse
    from t3d_kernels.nn import DenseBlock3d

    model = torch.nn.Sequential(DenseBlock3d(1, 4, 2, 2, backend="reference"))
    fuse(model, "composite")
    assert model[0].backend == "composite"
    assert list(model[0].state_dict()) == list(DenseBlock3d(1, 4, 2, 2).state_dict())


def test_bad_input_errors():
    from t3d_kernels import BackendError
    from t3d_kernels.nn import DenseBlock3d
    from t3d_kernels.ops.dense_block import dense_block

    x, spec = _functional_args(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"x: expected a 5-D tensor"):
        dense_block(x[0], spec, backend="composite")
    with pytest.raises(ValueError, match=r"layers\[1\]\.conv1_weight: expected shape \(B, 5, 1, 1, 1\)"):
        bad = list(spec)
        bad[1] = (spec[1][0], spec[1][1][:, :4], spec[1][2], spec[1][3])
        dense_block(x, bad, backend="composite")
    with pytest.raises(TypeError, match=r"layers\[0\]\.conv2_weight: expected dtype torch\.float32"):
        bad = [(spec[0][0], spec[0][1], spec[0][2], spec[0][3].double()), spec[1]]
        dense_block(x, bad, backend="composite")
    with pytest.raises(ValueError, match=r"layers\[0\]\.norm1\.weight: expected a tensor on cpu"):
        norm1 = [spec[0][0][0].to("meta"), *spec[0][0][1:]]
        dense_block(x, [(norm1, *spec[0][1:]), spec[1]], backend="composite")
    with pytest.raises(ValueError, match=r"layers\[0\]\.norm2\.running_var: expected shape \(4,\)"):
        norm2 = [*spec[0][2][:3], spec[0][2][3][:3]]
        dense_block(x, [(spec[0][0], spec[0][1], norm2, spec[0][3]), spec[1]], backend="composite")
    with pytest.raises(ValueError, match=r"x: expected a 5-D tensor"):
        DenseBlock3d(1, 3, 2, 2, backend="composite")(torch.randn(3, 2, 2, 2))
    with pytest.raises(BackendError, match=r"backend: expected 'auto' or one of"):
        DenseBlock3d(1, 3, 2, 2, backend="nope")
    block = DenseBlock3d(1, 3, 2, 2, backend="composite")
    with pytest.raises(ValueError, match=r"layers\[0\]\.conv1_weight: expected shape \(B, 5, 1, 1, 1\)"):
        block(torch.randn(1, 5, 2, 2, 2))


# --------------------------------------------------------------------------------------------------------
# Triton (interpreted on CPU, in a subprocess) and the CUDA backends
# --------------------------------------------------------------------------------------------------------

TRITON_CASES = [CASES[0], CASES[1], CASES[3]]


def main(argv: list[str]) -> int:
    device = argv[argv.index("--device") + 1] if "--device" in argv else "cpu"
    backend = argv[argv.index("--backend") + 1] if "--backend" in argv else "triton"
    if device == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    failures = []
    for case in TRITON_CASES:
        for training in (True, False):
            print(f"{backend} {device} float32 training={training} {case}", flush=True)
            failures += compare(case, torch.float32, backend, training, device)
    if backend == "triton":
        from t3d_kernels.triton import dense_block as triton_dense_block

        # the split-K path of conv1's weight gradient (taken on big shapes only), forced on a tiny one
        triton_dense_block._split_override = 2
        try:
            print(f"{backend} {device} float32 split-K {TRITON_CASES[-1]}", flush=True)
            failures += compare(TRITON_CASES[-1], torch.float32, backend, True, device)
        finally:
            triton_dense_block._split_override = None
    print("\n".join(failures) if failures else f"all {backend} dense block checks passed")
    return 1 if failures else 0


def _run_subprocess(extra_env: dict[str, str], args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, **extra_env}
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.triton
def test_triton_dense_block_interpreted():
    pytest.importorskip("triton")
    proc = _run_subprocess({"TRITON_INTERPRET": "1"}, [])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    assert "all triton dense block checks passed" in proc.stdout


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_dense_block_cuda(backend):
    from t3d_kernels import backends

    if backend not in backends("dense_block"):
        pytest.skip(f"{backend} not built")
    proc = _run_subprocess({"TRITON_INTERPRET": "0"}, ["--device", "cuda", "--backend", backend])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # run as a script from a checkout without an installed package
    if "--device" not in sys.argv or "cpu" in sys.argv:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.exit(main(sys.argv))
