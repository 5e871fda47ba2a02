"""`t3d export`: torch.export (.pt2) loads back and matches; ONNX has standard operators only, keeps the pool-first
TTL (AveragePool of stride 1, stride-2 branch Convs) and matches the eager model in onnxruntime (<= 1e-4 relative)
at several batch sizes, for t3d_tiny and T3D-121; torch.hub loads local weights."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
import torch

from t3d.cli import main as cli_main
from t3d.models import t3d_densenet121, t3d_tiny

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from t3d.export import STANDARD_DOMAINS, export_onnx, export_pt2  # noqa: E402

CLIP = (16, 32, 32)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _randomize_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BN statistics and affine (a fresh model's identity BN would hide folding mistakes)."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=gen) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=gen) * 0.4 + 0.8)
            m.bias.data.copy_(torch.rand(c, generator=gen) * 0.2 - 0.1)
    return model.eval()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _check_onnx(model: torch.nn.Module, path: str, batches=(1, 3)) -> Counter:
    proto = export_onnx(model, CLIP, path)
    ops = Counter(n.op_type for n in proto.graph.node)
    assert {n.domain for n in proto.graph.node} <= set(STANDARD_DOMAINS) and not proto.functions
    onnx.checker.check_model(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for n in batches:  # the batch dimension is dynamic
        x = torch.randn(n, 3, *CLIP, generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            expected = model(x).numpy()
        (out,) = session.run(None, {"clips": x.numpy()})
        assert out.shape == expected.shape
        assert _rel(out, expected) <= 1e-4
    return ops


def _pool_first_ttls(path: str) -> list[dict]:
    """For each stride-1 2x2x2 AveragePool: the Convs reading it (through a Slice) and their strides."""
    model = onnx.load(path)
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found = []
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "AveragePool" and list(attrs.get("strides", [])) == [1, 1, 1]:
            convs = [c for s in consumers[node.output[0]] if s.op_type == "Slice" for c in consumers[s.output[0]]]
            strides = [
                list(onnx.helper.get_attribute_value(a)) for c in convs for a in c.attribute if a.name == "strides"
            ]
            found.append({"kinds": {c.op_type for c in convs}, "strides": strides})
    return found


def test_onnx_tiny_keeps_the_pool_first_ttl_and_matches(tmp_path):
    torch.manual_seed(0)
    model = _randomize_bn(t3d_tiny(num_classes=5))
    path = str(tmp_path / "tiny.onnx")
    ops = _check_onnx(model, path)
    ttls = _pool_first_ttls(path)
    assert len(ttls) == 3  # t3d_tiny has three TTLs
    for ttl in ttls:
        assert ttl["kinds"] == {"Conv"} and ttl["strides"] == [[2, 2, 2]] * 3
    # no full-resolution pooling after the branches: the only other pools are the stem's max pool
    assert ops["AveragePool"] == 3 and ops["MaxPool"] == 1


def test_naive_export_of_the_reference_model_pools_after_the_convs(tmp_path):
    torch.manual_seed(0)
    fused = _randomize_bn(t3d_tiny(num_classes=5))
    naive = t3d_tiny(num_classes=5, backend="reference").eval()
    naive.load_state_dict(fused.state_dict())
    path = str(tmp_path / "naive.onnx")
    _check_onnx(naive, path, batches=(2,))
    assert _pool_first_ttls(path) == []


@pytest.mark.slow
def test_onnx_t3d121_matches_in_onnxruntime(tmp_path):
    torch.manual_seed(0)
    model = _randomize_bn(t3d_densenet121(num_classes=7))
    path = str(tmp_path / "t3d121.onnx")
    _check_onnx(model, path, batches=(1, 2))
    assert len(_pool_first_ttls(path)) == 3


def test_pt2_loads_back_with_a_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    model = _randomize_bn(t3d_tiny(num_classes=4))
    path = str(tmp_path / "tiny.pt2")
    export_pt2(model, CLIP, path)
    program = torch.export.load(path)
    targets = {str(node.target) for node in program.graph.nodes}
    assert {"t3d.ttl.default", "t3d.dense_block.default"} <= targets  # the fused ops, not decomposed
    module = program.module()
    for n in (1, 3, 5):
        x = torch.randn(n, 3, *CLIP)
        with torch.no_grad():
            torch.testing.assert_close(module(x), model(x), rtol=1e-5, atol=1e-6)


def _checkpoint(tmp_path) -> str:
    torch.manual_seed(0)
    model = _randomize_bn(t3d_tiny(num_classes=3))
    path = str(tmp_path / "last.pt")
    meta = {"model": "t3d_tiny", "classes": ["a", "b", "c"], "clip": list(CLIP), "resize": 36}
    torch.save({"format": "t3d-checkpoint", "model": model.state_dict(), "meta": meta}, path)
    return path


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_cli_export(tmp_path, capsys, fmt):
    ckpt = _checkpoint(tmp_path)
    out = str(tmp_path / "out" / f"model.{fmt}")
    assert cli_main(["export", ckpt, "--format", fmt, "--out", out]) == 0
    assert os.path.isfile(out) and f"wrote {out}" in capsys.readouterr().out
    x = torch.randn(2, 3, *CLIP)
    expected = torch.hub.load(REPO, "t3d_tiny", source="local", weights=ckpt)(x).detach()
    if fmt == "pt2":
        got = torch.export.load(out).module()(x).detach().numpy()
    else:
        (got,) = ort.InferenceSession(out, providers=["CPUExecutionProvider"]).run(None, {"clips": x.numpy()})
    assert _rel(got, expected.numpy()) <= 1e-4


def test_hub_loads_local_weights_only(tmp_path):
    torch.manual_seed(0)
    model = t3d_densenet121(num_classes=11).eval()
    path = str(tmp_path / "t3d121.pt")
    torch.save(model.state_dict(), path)
    loaded = torch.hub.load(REPO, "t3d121", source="local", weights=path)
    assert not loaded.training and loaded.classifier.out_features == 11
    x = torch.randn(1, 3, *CLIP)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    hub_meta = torch.hub.load(REPO, "t3d_tiny", source="local", weights=_checkpoint(tmp_path)).t3d_meta
    assert hub_meta["classes"] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="local weights file"):
        torch.hub.load(REPO, "t3d121", source="local", weights="https://example.com/t3d121.pt")
