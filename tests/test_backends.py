"""Declarative dispatch (``t3d_kernels.backends``): every op declares its backends; ``resolve`` says why it refuses;
``autocast_support`` answers from the declarations."""

from __future__ import annotations

import pytest
import torch

import t3d_kernels as tk
from t3d_kernels.backends import Backend, BackendError, declare, declared, get, op_declaration, resolve


@pytest.mark.parametrize("op", ["ttl", "dense_block"])
def test_every_op_declares_the_same_backend_names(op):
    assert declared(op) == ["reference", "composite", "cpu", "cuda", "triton"]
    decl = op_declaration(f"t3d::{op}")
    assert decl.op == op
    for order in decl.auto.values():  # auto always reaches a backend that runs everywhere
        assert "reference" in order


def test_resolve_names_each_refusal():
    with pytest.raises(BackendError, match=r"'cpu' for op 'ttl' cannot run on cpu: bfloat16 not supported"):
        resolve("ttl", "cpu", torch.device("cpu"), torch.bfloat16)
    # auto falls back to the first backend that takes the dtype
    assert resolve("dense_block", "auto", torch.device("cpu"), torch.bfloat16) == "composite"
    assert resolve("dense_block", "auto", torch.device("cpu"), torch.float32) in ("cpu", "composite")


def test_auto_error_lists_every_backend_and_why():
    """An op whose auto order cannot run an input lists each backend of the order with its reasons."""
    declare(
        "_probe",
        [
            Backend("only_cuda", ("cuda",)),
            Backend("fp64", dtypes=frozenset({torch.float64})),
            Backend("absent", built=lambda: "nvcc not found"),
        ],
        auto={"default": ("only_cuda", "fp64", "absent")},
    )
    with pytest.raises(BackendError) as err:
        resolve("_probe", "auto", torch.device("cpu"), torch.float32)
    msg = str(err.value)
    assert "only_cuda: runs on cuda, not cpu" in msg
    assert "fp64: float32 not supported" in msg
    assert "absent: not built (nvcc not found)" in msg
    assert "absent" not in tk.backends("_probe")


def test_backend_declarations_say_why_not_built():
    for op in ("ttl", "dense_block"):
        for name in declared(op):
            why = get(op, name).not_built_reason()
            assert (name in tk.backends(op)) == (why is None)
            assert why is None or why


def test_autocast_support_from_declarations():
    from t3d.models import MODELS

    model = MODELS["t3d_tiny"](num_classes=3)
    assert tk.autocast_support(model, "cpu", torch.float16) == (True, [])  # both half dtypes declared on CPU
    ok, reasons = tk.autocast_support(model, "cpu", torch.float64)  # a dtype no rule declares
    assert not ok and any("float64 on cpu" in r for r in reasons)
    # a model on the reference backend runs plain PyTorch ops: autocast's own rules apply
    assert tk.autocast_support(tk.fuse(model, "reference"), "cpu", torch.float16) == (True, [])
    assert tk.autocast_support(torch.nn.Linear(2, 2), "cuda", torch.float16) == (True, [])
    ok, reasons = tk.autocast_support(["t3d::ttl"], "cuda", torch.bfloat16)
    assert ok == (not reasons)
