"""Regression tests of bugs that shipped, each covering the bug's whole class rather than the one shape reported.

1. CPU TTL, silently wrong (issue 11): the box pass of the cpu backend kept the spatial plane of the frame after
   the current one as a cache for the next iteration; at a sample's last frame that plane is the sample's padding,
   yet it was reused as frame 0 of the next sample. With temporal front padding 0 (every depth <= 2) frame 0 is real
   data, so whenever a thread's share of (sample, frame) pairs crossed a sample boundary (batch >= 3 with 2 threads,
   batch >= 2 with 1 thread) outputs and gradients were off by 15-86%. Covered here: every depth set whose front
   padding is 0, batches 1-5, 1 and 2 threads, pooled and not, train and eval, output and every gradient.
2. BN freezing missed fused dense blocks (issue 11): the fused block read the block's training flag, not its BN
   modules'. Covered: every way of freezing (``freeze_batchnorm``, ``bn.eval()`` on the norms, a partial freeze)
   on every backend that runs here.
3. NaN losses in ``t3d train --amp bf16`` on CPU (issue 13): PyTorch 2.13's CPU bfloat16 conv3d weight gradient is
   garbage (1e30+, inf, NaN, different on each call) for inputs of T = 2 frames with a temporal kernel of 3 and
   padding 1, which T3D's last dense block has at a 16-frame clip (t3d_tiny at 16x32x32: NaN loss in 3 of 8 runs).
   The composite algorithms now take that weight gradient in float32 (t3d_kernels/composite/conv.py). Covered: the
   dense block and the TTL at T = 1-4 under bf16 autocast, every gradient against float64, twice (bit-equal), and a
   t3d_tiny training step at the clip that failed.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import t3d_kernels as tk
from t3d.models import t3d_tiny
from t3d_kernels import reference
from t3d_kernels.testing import backend_device_pairs

# depth sets whose largest front padding (d-1)//2 is 0, plus two with a depth 3 (front padding 1) as contrast
DEPTH_SETS = [(1,), (2,), (1, 1), (1, 2), (2, 1), (2, 2), (1, 2, 2), (1, 1, 2, 2), (1, 3), (2, 3)]


def _cpu_backends(op: str) -> list[str]:
    """Fused backends of ``op`` that run on CPU tensors in this process (triton only under TRITON_INTERPRET=1)."""
    return [name for name, device in backend_device_pairs(op) if device == "cpu"]


def _ttl_case(n, c, t, h, w, depths, kernel, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, t, h, w, generator=g, dtype=torch.float64)
    weights = [
        torch.randn(2 + i, c, d, *((1, 1) if d == 1 else (kernel, kernel)), generator=g, dtype=torch.float64)
        for i, d in enumerate(depths)
    ]
    gamma = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    beta = torch.randn(c, generator=g, dtype=torch.float64) * 0.5
    mean = torch.randn(c, generator=g, dtype=torch.float64) * 0.1
    var = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    return x, gamma, beta, mean, var, weights


def _ttl_run(backend, x, gamma, beta, mean, var, weights, training, pool):
    leaves = [v.clone().requires_grad_() for v in (x, gamma, beta, *weights)]
    rm, rv = mean.clone(), var.clone()
    if backend == "reference":
        y = reference.ttl(leaves[0], leaves[1], leaves[2], rm, rv, leaves[3:], training, 0.1, 1e-5, pool)
    else:
        y = tk.ttl(leaves[0], leaves[1], leaves[2], rm, rv, leaves[3:], training=training, pool=pool, backend=backend)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=y.dtype)
    return [y.detach(), *torch.autograd.grad(y, leaves, gy), rm, rv]


@pytest.mark.parametrize("threads", [1, 2])
# triton (interpreted on CPU) is too slow for this many cases; the fuzz suite runs this class on it at tiny shapes
@pytest.mark.parametrize("backend", [b for b in _cpu_backends("ttl") if b != "triton"])
def test_ttl_batch_crossing_samples_every_shallow_depth_set(backend, threads):
    """Bug 1's whole class: all shallow depth sets x batch 1-5 x pool x mode, on 1 and 2 threads (the thread
    count decides where at::parallel_for splits the (sample, frame) range)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        failures = []
        configs = itertools.product(DEPTH_SETS, (1, 2, 3, 4, 5), (True, False), (True, False))
        for i, (depths, n, pool, training) in enumerate(configs):
            t, h, w = (4, 5, 6) if i % 2 else (3, 6, 4)
            case = _ttl_case(n, 5, t, h, w, depths, 3, seed=i)
            want = _ttl_run("reference", *case, training, pool)
            got = _ttl_run(backend, *case, training, pool)
            names = ["y", "grad_x", "grad_gamma", "grad_beta"] + [f"grad_w{j}" for j in range(len(depths))]
            names += ["running_mean", "running_var"]
            for name, a, b in zip(names, got, want):
                if not torch.allclose(a, b, rtol=1e-9, atol=1e-10 * max(1.0, b.abs().max().item())):
                    rel = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                    failures.append(f"depths={depths} N={n} pool={pool} training={training} {name}: rel {rel:.2e}")
        assert not failures, f"{len(failures)} mismatches, e.g.\n" + "\n".join(failures[:10])
    finally:
        torch.set_num_threads(before)


def test_ttl_module_reported_shape():
    """The exact configuration reported: TemporalTransition(16, 6, depths=(1,)) at (3, 16, 4, 6, 6), float32."""
    torch.manual_seed(0)
    m = tk.TemporalTransition(16, 6, depths=(1,), backend="cpu").train()
    ref = tk.TemporalTransition(16, 6, depths=(1,), backend="reference").train()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(3, 16, 4, 6, 6)
    y, y_ref = m(x), ref(x)
    err = ((y - y_ref).abs().max() / y_ref.abs().max()).item()
    assert err < 1e-5, f"relative error {err:.3e}"
    torch.testing.assert_close(m.norm.running_mean, ref.norm.running_mean)


# ------------------------------------------------------------------------------------------------------------
# 2. BN modules are the one source of truth of the fused ops' mode
# ------------------------------------------------------------------------------------------------------------


def _freeze_all(model):
    from t3d.training import freeze_batchnorm

    freeze_batchnorm(model)


def _freeze_norms_by_hand(model):
    # what other libraries' freeze helpers do: .eval() on every BatchNorm module, nothing else
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.eval()


def _bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}


def _tiny(backend):
    torch.manual_seed(0)
    model = t3d_tiny(num_classes=3).double()
    return tk.fuse(model, backend)


@pytest.mark.parametrize("freeze", [_freeze_all, _freeze_norms_by_hand], ids=["freeze_batchnorm", "bn_eval"])
@pytest.mark.parametrize("backend", ["reference", *_cpu_backends("dense_block")])
def test_frozen_bn_freezes_fused_ops(backend, freeze):
    """After model.train() + freezing, a training step changes no running statistic, and the output equals the
    model in eval mode (running statistics used), on every backend."""
    model = _tiny(backend).train()
    freeze(model)
    before = _bn_state(model)
    x = torch.randn(2, 3, 16, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    y_train = model(x)
    y_train.square().mean().backward()
    after_forward = _bn_state(model)
    changed = [k for k in before if not torch.equal(before[k], after_forward[k])]
    assert not changed, f"{len(changed)} running-statistic tensors changed with frozen BN: {changed[:5]}"
    model.eval()
    torch.testing.assert_close(y_train.detach(), model(x).detach(), rtol=1e-12, atol=1e-12)
    model.train()
    freeze(model)
    opt.step()
    model(x)
    changed = [k for k, v in _bn_state(model).items() if not torch.equal(before[k], v)]
    assert not changed, f"running statistics changed on the second step: {changed[:5]}"


@pytest.mark.parametrize("backend", _cpu_backends("dense_block"))
def test_partially_frozen_block_matches_reference(backend):
    """Only the first BN of every dense layer frozen (a mixed block): output, every gradient and the running
    statistics equal the reference backend in the same state."""
    results = []
    for name in ("reference", backend):
        model = _tiny(name).train()
        for m in model.modules():
            if isinstance(m, tk.DenseLayer3d):
                m.norm1.eval()
        x = torch.randn(2, 3, 16, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        y = model(x)
        y.square().mean().backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        results.append((y.detach(), grads, _bn_state(model)))
    (y0, g0, s0), (y1, g1, s1) = results
    torch.testing.assert_close(y1, y0, rtol=1e-9, atol=1e-11)
    for k in g0:
        scale = max(g.abs().max().item() for g in g0.values())  # ~0 gradients (scale invariance): vs the largest
        atol = 1e-10 * scale
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-8, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
    for k in s0:
        tol = 1e-9
        torch.testing.assert_close(s1[k], s0[k], rtol=tol, atol=tol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("backend", ["reference", *_cpu_backends("ttl")])
def test_bn_momentum_none_is_cumulative_average(backend):
    """``momentum=None`` (cumulative moving average, PyTorch's semantics) on a TTL and a dense block."""
    torch.manual_seed(0)
    ttl = tk.TemporalTransition(6, 4, depths=(1, 3), backend=backend).double().train()
    block = tk.DenseBlock3d(2, 5, growth_rate=3, bn_size=2, backend=backend).double().train()
    for bn in [ttl.norm, *(m for m in block.modules() if isinstance(m, torch.nn.BatchNorm3d))]:
        bn.momentum = None
    xs = [torch.randn(2, 6, 4, 4, 4, dtype=torch.float64) for _ in range(3)]
    for x in xs:
        ttl(x)
    stacked = torch.stack([x.mean((0, 2, 3, 4)) for x in xs])
    torch.testing.assert_close(ttl.norm.running_mean, stacked.mean(0), rtol=1e-12, atol=1e-12)
    assert int(ttl.norm.num_batches_tracked) == 3
    x = torch.randn(2, 5, 3, 4, 4, dtype=torch.float64)
    block(x)
    block(x)
    first = block.denselayer1.norm1
    tol = 1e-12
    torch.testing.assert_close(first.running_mean, x.mean((0, 2, 3, 4)), rtol=tol, atol=tol)
    assert int(first.num_batches_tracked) == 2


# --------------------------------------------------------------------------------------------------------
# 3. CPU bfloat16 conv3d weight gradient at T = 2 (PyTorch), behind the fused ops' bf16 autocast
# --------------------------------------------------------------------------------------------------------

BF16 = torch.finfo(torch.bfloat16).eps


def _bf16_run(fn, leaves64, gy):
    """fn(*leaves) and its gradients under CPU bf16 autocast, from float32 copies of ``leaves64``; as float64."""
    leaves = [t.detach().float().requires_grad_() for t in leaves64]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fn(*leaves)
    return [y.double(), *(g.double() for g in torch.autograd.grad(y, leaves, gy.to(y.dtype)))]


def _check_bf16(fn, ref, leaves64, gy, what):
    """fn under bf16 autocast: twice bit-equal, and its output and every gradient against ``ref`` in float64 within
    twice the error of ``ref`` itself under the same autocast (PyTorch's own bf16 error) -- or, where PyTorch's own
    result is itself broken (non-finite or beyond the value's scale: the bug), 32 bf16 roundings of the scale. The
    bug gave 1e30 and beyond. Gradients are measured against the largest one, since a conv weight right before a BN
    has a gradient that is ~0 in exact arithmetic (the layer is scale-invariant), so its own size is no measure."""
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves64]
    y64 = ref(*ref_leaves)
    want = [y64.detach(), *torch.autograd.grad(y64, ref_leaves, gy)]
    own = _bf16_run(ref, leaves64, gy)
    first, second = _bf16_run(fn, leaves64, gy), _bf16_run(fn, leaves64, gy)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True)), f"{what}: not deterministic"
    grad_scale = max(g.abs().max().item() for g in want[1:])
    for i, (a, o, b) in enumerate(zip(first, own, want, strict=True)):
        scale = b.abs().max().item() if i == 0 else grad_scale
        own_err = (o - b).abs().max().item()
        own_err = own_err if own_err < scale else 0.0  # also NaN -> 0
        err, bound = (a - b).abs().max().item(), max(2 * own_err, 32 * BF16 * scale)
        assert err <= bound, f"{what}: output/gradient {i}: error {err:.3e} > bound {bound:.3e} (scale {scale:.3e})"


@pytest.mark.parametrize("t", [1, 2, 3, 4])
@pytest.mark.parametrize("backend", ["composite", "auto"])
def test_dense_block_bf16_autocast_weight_gradients_at_short_clips(backend, t):
    torch.manual_seed(0)
    # layers, C_0, growth, bn_size: conv2 is (8, 16, 3, 3, 3), as in t3d_tiny (the bug needs enough channels)
    block = tk.DenseBlock3d(2, 16, 8, 2, backend=backend)
    leaves64 = [torch.randn(2, 16, t, 3, 3, dtype=torch.float64), *(p.detach().double() for p in block.parameters())]
    gy = torch.randn(2, 32, t, 3, 3, dtype=torch.float64)

    names = [name for name, _ in block.named_parameters()]

    def fn(name):
        def call(x, *params):
            block.backend = name
            return torch.func.functional_call(block.to(x.dtype), dict(zip(names, params, strict=True)), (x,))

        return call

    _check_bf16(fn(backend), fn("reference"), leaves64, gy, f"dense block {backend} T={t}")


@pytest.mark.parametrize("t", [2, 3, 4])
@pytest.mark.parametrize("backend", ["composite", "auto"])
def test_ttl_bf16_autocast_weight_gradients_at_short_clips(backend, t):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, t, 4, 4, generator=g, dtype=torch.float64)
    weights = [torch.randn(8, 16, d, k, k, generator=g, dtype=torch.float64) / (16 * d * k * k) ** 0.5
               for d, k in ((1, 1), (3, 3), (2, 3))]  # fmt: skip
    gamma = torch.rand(16, generator=g, dtype=torch.float64) + 0.5
    beta = torch.randn(16, generator=g, dtype=torch.float64)
    gy = torch.randn(2, 24, t // 2, 2, 2, generator=g, dtype=torch.float64)

    def fn(name):
        def call(x_, gamma_, beta_, *ws):
            rm, rv = torch.zeros(16, dtype=x_.dtype), torch.ones(16, dtype=x_.dtype)
            return tk.ttl(x_, gamma_, beta_, rm, rv, list(ws), training=True, backend=name)

        return call

    _check_bf16(fn(backend), fn("reference"), [x, gamma, beta, *weights], gy, f"ttl {backend} T={t}")


def test_t3d_tiny_bf16_training_step_at_the_clip_that_gave_nan():
    torch.manual_seed(0)
    model = t3d_tiny(num_classes=4, backend="reference")
    tk.fuse(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    x, labels = torch.randn(8, 3, 16, 32, 32, generator=g), torch.randint(0, 4, (8,), generator=g)
    runs = []
    for _ in range(2):
        model.load_state_dict(state)
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), labels)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        assert torch.isfinite(loss) and all(torch.isfinite(gr).all() for gr in grads)
        runs.append(grads)
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True)), "bf16 training step not deterministic"


# --------------------------------------------------------------------------------------------------------
# 4. The CPU TTL's per-thread source workspace (kept between calls: no page faults of a fresh 23 MB tensor)
# --------------------------------------------------------------------------------------------------------


def test_ttl_cpu_workspace_reuse_keeps_every_result_intact():
    """Calls of growing, shrinking and mixed-dtype shapes, forwards and backwards interleaved, share one
    workspace; each result (kept alive across the later calls) must still equal its reference afterwards."""
    if "cpu" not in _cpu_backends("ttl"):
        pytest.skip("the cpu backend of ttl is not built")
    shapes = [(2, 6, 4, 6, 6), (1, 9, 6, 8, 10), (3, 5, 3, 4, 4), (1, 9, 6, 8, 10), (2, 7, 5, 7, 5)]
    kept = []
    for i, shape in enumerate(shapes):
        case = _ttl_case(*shape, depths=(1, 3), kernel=3, seed=100 + i)
        if i % 2:  # float32 calls between the float64 ones: same buffer, another element type
            case = tuple(v.float() if torch.is_tensor(v) else [w.float() for w in v] for v in case)
        kept.append((case, _ttl_run("cpu", *case, True, True)))
    for case, got in kept:
        want = _ttl_run("reference", *case, True, True)
        for a, b in zip(got, want):
            tol = 1e-9 if a.dtype == torch.float64 else 1e-4
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))


def test_ttl_cpu_concurrent_calls_from_two_threads():
    """Two Python threads calling the op at once each get their own workspace (no shared buffer raced)."""
    import threading

    if "cpu" not in _cpu_backends("ttl"):
        pytest.skip("the cpu backend of ttl is not built")
    cases = [_ttl_case(2, 6, 4, 6, 6, depths=(1, 3), kernel=3, seed=s) for s in (1, 2)]
    results: dict[int, list] = {}

    def work(k):
        results[k] = [_ttl_run("cpu", *cases[k], True, True) for _ in range(20)]

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in (0, 1):
        want = _ttl_run("reference", *cases[k], True, True)
        for got in results[k]:
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * max(1.0, b.abs().max().item()))
