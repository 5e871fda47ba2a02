"""t3d_kernels.testing: the one input builder per op that tests and benchmarks share."""

from __future__ import annotations

import pytest
import torch

from t3d_kernels import testing


@pytest.mark.parametrize("layout", testing.LAYOUTS)
@pytest.mark.parametrize("shape", [(3, 4, 5, 6, 7), (1, 4, 5, 6, 7)])
def test_layouts_keep_values_and_have_their_strides(layout, shape):
    s = testing.ttl_input(shape, [(2, 3, 3)], layout=layout, dtype=torch.float64)
    x = s.x
    assert x.shape == shape and x.requires_grad and x.is_leaf
    if layout == "contiguous":
        assert x.is_contiguous()
    elif layout == "channels_last_3d":
        assert x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
    elif layout == "non_contiguous":
        assert not x.is_contiguous() and x.stride(-1) == 2
    else:
        assert 0 in x.stride()
    torch.testing.assert_close(testing.with_layout(x.detach(), layout), x.detach(), rtol=0, atol=0)
    # a copy in another dtype keeps the layout, the values (rounded) and which tensors are leaves
    f = s.to(dtype=torch.float32)
    assert f.x.stride() == x.stride() and f.x.dtype == torch.float32 and f.x.requires_grad
    torch.testing.assert_close(f.x.double(), x.detach(), rtol=1e-7, atol=1e-7)
    assert set(f.differentiable) == set(s.differentiable) and all(t.requires_grad for t in f.differentiable.values())


def test_same_values_on_every_dtype_and_seed_changes_them():
    a = testing.dense_block_input((2, 3, 2, 3, 3), 2, 2, 2, dtype=torch.float64, seed=4)
    b = testing.dense_block_input((2, 3, 2, 3, 3), 2, 2, 2, dtype=torch.float32, seed=4)
    c = testing.dense_block_input((2, 3, 2, 3, 3), 2, 2, 2, dtype=torch.float64, seed=5)
    for name, t in a.differentiable.items():
        torch.testing.assert_close(b.differentiable[name].double(), t.detach(), rtol=1e-7, atol=1e-7)
    assert not torch.equal(a.x, c.x)


@pytest.mark.parametrize("op", ["ttl", "dense_block"])
def test_sample_inputs_run_through_the_reference(op):
    samples = list(testing.sample_inputs(op, dtype=torch.float64))
    tiny = list(testing.sample_inputs(op, dtype=torch.float64, tiny=True))
    assert len(tiny) < len(samples)
    assert {s.layout for s in samples} == set(testing.LAYOUTS) == {s.layout for s in tiny}
    assert {s.kwargs["training"] for s in samples} == {True, False}
    for s in samples:
        out = testing.run(s, "reference", steps=2)
        assert {f"grad {n}" for n in s.differentiable} | set(s.buffers) | {"y"} == set(out)
        for name, t in s.differentiable.items():
            assert out[f"grad {name}"].shape == t.shape, name
        # the sample itself is untouched: its running statistics are still the initial ones
        if s.kwargs["training"]:
            assert any(not torch.equal(out[n], b) for n, b in s.buffers.items())


def test_bad_layout_and_op_are_clear_errors():
    with pytest.raises(ValueError, match="layout: expected one of"):
        testing.ttl_input((1, 2, 2, 2, 2), [(1, 1, 1)], layout="nope")
    with pytest.raises(ValueError, match="op: expected 'ttl' or 'dense_block'"):
        next(testing.sample_inputs("conv"))


def test_backend_device_pairs_are_built_and_runnable():
    import t3d_kernels as tk

    for op in ("ttl", "dense_block"):
        pairs = testing.backend_device_pairs(op)
        assert ("composite", "cpu") in pairs and all(b in tk.backends(op) for b, _ in pairs)
        assert ("reference", "cpu") in testing.backend_device_pairs(op, include_reference=True)
