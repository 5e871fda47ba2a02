"""The fused dense block (``t3d::dense_block``) against the plain-PyTorch reference, on every (backend, device) pair.

Through the functional op on every sample input of ``t3d_kernels.testing`` (output, every gradient and the running
statistics after two steps, tests/_tolerance.py), through ``DenseBlock3d`` (several training steps, so running
statistics and ``num_batches_tracked`` are compared after updates) and through the registered op (gradcheck,
opcheck, torch.compile, bad input). The triton backend runs under ``TRITON_INTERPRET=1`` on a machine without CUDA
(conftest.py), in this process; on a GPU machine every pair also runs on "cuda".
"""

from __future__ import annotations

import pytest
import torch
from _tolerance import check_backend, exact_float32

from t3d_kernels import testing

PAIRS = testing.backend_device_pairs("dense_block")
PAIR_IDS = [f"{b}-{d}" for b, d in PAIRS]
INTERPRETED = {("triton", "cpu")}  # Triton's interpreter: tiny shapes only
STEPS = 3  # training steps of the module test before comparing running statistics


def _samples(backend, device):
    return list(testing.sample_inputs("dense_block", tiny=(backend, device) in INTERPRETED))


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", range(len(_samples("reference", "cpu"))))
def test_matches_reference(backend, device, dtype, case):
    samples = _samples(backend, device)
    if case >= len(samples):
        pytest.skip("a larger sample than the Triton interpreter runs")
    failures = check_backend(samples[case], backend, device, dtype)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_matches_reference_over_steps(backend, device, training):
    """DenseBlock3d on ``backend`` and on the reference, float64: every buffer (running statistics,
    num_batches_tracked) and every gradient after several steps."""
    from t3d_kernels.nn import DenseBlock3d

    torch.manual_seed(0)
    ref = DenseBlock3d(2, 5, 3, 2, backend="reference").double().train(training)
    fused = DenseBlock3d(2, 5, 3, 2, backend=backend).double().to(device).train(training)
    fused.load_state_dict(ref.state_dict())
    for step in range(STEPS if training else 1):
        x = torch.randn(2, 5, 3, 2, 3, dtype=torch.float64) * (step + 1) + 0.5
        gy = torch.randn(2, 11, 3, 2, 3, dtype=torch.float64)
        ref(x).backward(gy)
        fused(x.to(device)).backward(gy.to(device))
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key].cpu(), value, msg=lambda m, key=key: f"{key}: {m}")
    for (name, pa), pb in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(pb.grad.cpu(), pa.grad, msg=lambda m, name=name: f"{name}.grad: {m}")


def _functional_args(dtype=torch.float64, n=2, c0=3, layers=2, k=2, bn_size=2, shape=(2, 3, 2), seed=0, device="cpu"):
    """(x, layers) of testing.dense_block_input for the functional form; nothing requires grad."""
    sample = testing.dense_block_input(
        (n, c0, *shape), layers, k, bn_size, dtype=dtype, seed=seed, device=device, requires_grad=False
    )
    return sample.args


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


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck(backend, device, training):
    from t3d_kernels.ops.dense_block import dense_block

    x, spec = _functional_args(layers=2, shape=(2, 2, 3), device=device)
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


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck(backend, device, training):
    import t3d_kernels.ops.dense_block  # noqa: F401  (registers the ops)

    with exact_float32():
        x, spec = _functional_args(dtype=torch.float32, device=device)
        args = _op_args(x, spec, training, backend)
        for t in (x, *args[1], *args[2], *args[5], *args[6], *args[7], *args[10]):
            t.requires_grad_()
        torch.library.opcheck(torch.ops.t3d.dense_block.default, args)
        with torch.no_grad():
            y, m1, v1, m2, v2, saved_h = torch.ops.t3d.dense_block(*args)
        plain = lambda ts: [t.detach() for t in ts]  # noqa: E731
        bargs = (
            torch.randn_like(y),
            y,
            m1,
            v1,
            m2,
            v2,
            saved_h,
            *map(plain, (args[1], args[2], args[5], args[6], args[7], args[10])),
            training,
            1e-5,
            backend,
            "",
        )
        torch.library.opcheck(torch.ops.t3d.dense_block_backward.default, bargs)


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_torch_compile_fullgraph(backend, device):
    from t3d_kernels.nn import DenseBlock3d

    torch._dynamo.reset()
    block = DenseBlock3d(2, 3, 2, 2, backend=backend).train().to(device)
    twin = DenseBlock3d(2, 3, 2, 2, backend=backend).train().to(device)
    twin.load_state_dict(block.state_dict())
    x = torch.randn(2, 3, 2, 3, 3, device=device)
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


@pytest.mark.parametrize("backend,device", [p for p in PAIRS if p not in INTERPRETED])
def test_saved_memory_is_the_buffer(backend, device):
    """What the fused block keeps for backward is its output buffer, the statistics and the parameters, and on the
    CPU kernel the bottleneck h (before BN2) of the layers with C_i >= 2 B_i (here the last two of four): O(L)."""
    from t3d_kernels.nn import DenseBlock3d

    block = DenseBlock3d(4, 8, 4, 2, backend=backend).train().to(device)
    x = torch.randn(2, 8, 3, 4, 4, requires_grad=True, device=device)
    params = sum(p.numel() * p.element_size() for p in block.parameters())
    out = {}
    fused = _saved_bytes(lambda: out.setdefault("y", block(x)))
    y = out["y"]
    stats = 2 * sum(m.norm1.num_features + m.norm2.num_features for m in block.layers()) * 4
    kept_h = 0
    if backend == "cpu":
        widths = [m.norm2.num_features for m in block.layers() if m.norm1.num_features >= 2 * m.norm2.num_features]
        assert len(widths) == 2
        kept_h = x.numel() // x.shape[1] * sum(widths) * 4
    assert fused == y.numel() * 4 + stats + params + kept_h
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
    # found by the fuzz suite: the fused backends normalized one value per channel to a constant (PyTorch raises)
    for backend, device in PAIRS:
        one = testing.dense_block_input((1, 3, 1, 1, 1), 2, 2, 2, device=device, requires_grad=False)
        with pytest.raises(ValueError, match="x: batch norm in training needs more than one value per channel"):
            dense_block(*one.args, training=True, backend=backend)
        dense_block(*one.args, training=False, backend=backend)


@pytest.mark.triton
@pytest.mark.parametrize("backend,device", [p for p in PAIRS if p[0] == "triton"])
def test_triton_forced_split_k(backend, device):
    """The split-K path of conv1's weight gradient (taken on big shapes only), forced on a tiny one."""
    from t3d_kernels.triton import dense_block as triton_dense_block

    sample = next(s for s in testing.sample_inputs("dense_block", tiny=True) if s.layout == "non_contiguous")
    triton_dense_block._split_override = 2
    try:
        failures = check_backend(sample, backend, device, torch.float32)
    finally:
        triton_dense_block._split_override = None
    assert not failures, "\n".join(failures)


@pytest.mark.skipif(("cpu", "cpu") not in PAIRS, reason="the cpu dense block kernel is not built")
def test_cpu_input_gradient_in_sample_groups():
    """The cpu kernel's conv2 input gradient by per-sample oneDNN calls into one buffer, taken when a sample's
    gradient exceeds half of kGradInputCallBytes (csrc/cpu/dense_block_kernel.cpp): 2 samples of 128 bottleneck
    channels x 8x33x33 (4.5 MB each)."""
    sample = testing.dense_block_input((2, 8, 8, 33, 33), 1, 32, 4, seed=3)
    failures = check_backend(sample, "cpu", "cpu", torch.float32, steps=1)
    assert not failures, "\n".join(failures)


@pytest.mark.skipif(("cpu", "cpu") not in PAIRS, reason="the cpu dense block kernel is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_cpu_backward_with_and_without_kept_h(dtype):
    """The cpu kernel keeps in training the h of the layers with C_i >= 2 B_i (saved_h; here layers 1 and 2 of 3:
    C_i = 6, 8, 10, B = 4) and its backward skips their recompute; without saved_h it recomputes every h (the eval
    path, also reached in training by a caller that passes none): both gradients agree, and those of the mixed
    block match the reference."""
    from t3d_kernels import _ext

    x, spec = _functional_args(dtype=dtype, c0=6, layers=3)
    args = _op_args(x, spec, True, "cpu")[:11]
    y, m1, v1, m2, v2, saved_h = _ext.load().dense_block_forward(*args, True, 1e-5)
    assert saved_h.shape == (x.numel() // x.shape[1] * 2 * 4,)
    grad_y = torch.randn_like(y)
    params = (args[1], args[2], args[5], args[6], args[7], args[10])
    kept = _ext.load().dense_block_backward(grad_y, y, m1, v1, m2, v2, *params, True, 1e-5, saved_h=saved_h)
    recomputed = _ext.load().dense_block_backward(grad_y, y, m1, v1, m2, v2, *params, True, 1e-5)
    torch.testing.assert_close(kept[0], recomputed[0])
    for a, b in zip(kept[1:], recomputed[1:], strict=True):
        for ga, gb in zip(a, b, strict=True):
            torch.testing.assert_close(ga, gb)
    with pytest.raises(RuntimeError, match=r"saved_h: expected \d+ elements"):
        _ext.load().dense_block_backward(grad_y, y, m1, v1, m2, v2, *params, True, 1e-5, saved_h=saved_h[1:])
    sample = testing.dense_block_input((2, 6, 2, 3, 2), 3, 2, 2, seed=5)
    failures = check_backend(sample, "cpu", "cpu", dtype, steps=1)
    assert not failures, "\n".join(failures)
