"""T3D-121/169 and the 2D DenseNet teacher: shapes per stage, parameter counts, key names, bad input, `t3d info`."""

from __future__ import annotations

import pytest
import torch

from t3d.cli import main as cli_main
from t3d.info import model_summary
from t3d.models import (
    DenseNet2d,
    clip_stage_shapes,
    densenet121,
    load_densenet2d_weights,
    t3d_densenet121,
    t3d_densenet169,
    t3d_tiny,
)

# DESIGN.md section 1, outputs at a 32x224x224 clip (channels, T, H, W) per stage
TABLE_121 = {
    "conv0": (64, 16, 112, 112),
    "pool0": (64, 16, 56, 56),
    "denseblock1": (256, 16, 56, 56),
    "transition1": (128, 8, 28, 28),
    "denseblock2": (512, 8, 28, 28),
    "transition2": (256, 4, 14, 14),
    "denseblock3": (1024, 4, 14, 14),
    "transition3": (512, 2, 7, 7),
    "denseblock4": (1024, 2, 7, 7),
}
TABLE_169 = dict(TABLE_121, denseblock3=(1280, 4, 14, 14), transition3=(640, 2, 7, 7), denseblock4=(1664, 2, 7, 7))


@pytest.mark.parametrize(
    "factory,table,features", [(t3d_densenet121, TABLE_121, 1024), (t3d_densenet169, TABLE_169, 1664)]
)
def test_stage_shapes_at_paper_clip(factory, table, features):
    with torch.device("meta"):
        model = factory(num_classes=400, backend="reference")
    summary = model_summary(model, (32, 224, 224))
    shapes = {s["stage"]: s["shape"][1:] for s in summary["stages"]}
    for stage, expected in table.items():
        assert shapes[stage] == expected, stage
    assert summary["logits"] == (1, 400)
    assert model.num_features == features
    with torch.device("meta"):
        assert model.forward_features(torch.empty(2, 3, 32, 224, 224)).shape == (2, features)


def _bn(c):
    return 2 * c


def expected_params(
    block_config, num_classes=400, k=32, bn_size=4, init=64, ttl_depths=((1, 3, 6), (1, 3, 4), (1, 3, 4))
):
    """Parameter count from the architecture's formulas (independent of the model code)."""
    total = 3 * init * 3 * 7 * 7 + _bn(init)
    c = init
    for i, layers in enumerate(block_config):
        for j in range(layers):
            cin = c + j * k
            total += _bn(cin) + cin * bn_size * k + _bn(bn_size * k) + bn_size * k * k * 27
        c += layers * k
        if i < len(block_config) - 1:
            depths = ttl_depths[i]
            out = c // 2
            parts = [out // len(depths) + (1 if b < out % len(depths) else 0) for b in range(len(depths))]
            total += _bn(c) + sum(p * c * d * (1 if d == 1 else 9) for p, d in zip(parts, depths))
            c = out
    return total + _bn(c) + c * num_classes + num_classes


def test_parameter_counts():
    m121, m169 = t3d_densenet121(), t3d_densenet169()
    assert sum(p.numel() for p in m121.parameters()) == expected_params((6, 12, 24, 16)) == 25_815_184
    assert sum(p.numel() for p in m169.parameters()) == expected_params((6, 12, 32, 32)) == 39_356_816
    # torchvision's densenet121 has 7,978,856 parameters
    assert sum(p.numel() for p in densenet121().parameters()) == 7_978_856


def test_ttl_channels_option():
    m = t3d_densenet121(ttl_channels=128)
    ttl = m.features.transition1
    assert [b.weight.shape[0] for b in ttl.branches] == [128, 128, 128]
    assert m.features.denseblock2.in_channels == 384


def test_tiny_forward_backward():
    torch.manual_seed(0)
    model = t3d_tiny(num_classes=4)
    x = torch.randn(2, 3, 16, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 4)
    logits.logsumexp(1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def _torchvision_style_state(model: DenseNet2d):
    """A state_dict with torchvision's key names, written out by hand from its naming scheme."""
    state = {}
    layers = (6, 12, 24, 16)
    c = 64

    def bn(prefix, n):
        state.update(
            {
                f"{prefix}.weight": torch.rand(n),
                f"{prefix}.bias": torch.rand(n),
                f"{prefix}.running_mean": torch.rand(n),
                f"{prefix}.running_var": torch.rand(n) + 0.5,
                f"{prefix}.num_batches_tracked": torch.tensor(0),
            }
        )

    state["features.conv0.weight"] = torch.randn(64, 3, 7, 7)
    bn("features.norm0", 64)
    for b, n in enumerate(layers, 1):
        for j in range(1, n + 1):
            p = f"features.denseblock{b}.denselayer{j}"
            cin = c + (j - 1) * 32
            bn(f"{p}.norm1", cin)
            state[f"{p}.conv1.weight"] = torch.randn(128, cin, 1, 1)
            bn(f"{p}.norm2", 128)
            state[f"{p}.conv2.weight"] = torch.randn(32, 128, 3, 3)
        c += n * 32
        if b < 4:
            bn(f"features.transition{b}.norm", c)
            state[f"features.transition{b}.conv.weight"] = torch.randn(c // 2, c, 1, 1)
            c //= 2
    bn("features.norm5", c)
    state["classifier.weight"] = torch.randn(1000, c)
    state["classifier.bias"] = torch.randn(1000)
    return state


def test_densenet2d_loads_torchvision_keys(tmp_path):
    model = densenet121()
    state = _torchvision_style_state(model)
    assert set(state) == set(model.state_dict())
    path = tmp_path / "densenet121.pth"
    torch.save(state, path)
    load_densenet2d_weights(model, path)
    torch.testing.assert_close(model.features.norm5.running_var, state["features.norm5.running_var"])
    assert model.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 1024)
    # old torchvision names ("norm.1") are accepted
    # old torchvision files: "norm.1" names and no num_batches_tracked
    old = {k.replace("denselayer1.norm1", "denselayer1.norm.1"): v for k, v in state.items() if "num_batches" not in k}
    torch.save(old, path)
    load_densenet2d_weights(model, path)


def test_densenet2d_bad_weight_files(tmp_path):
    model = densenet121()
    state = _torchvision_style_state(model)
    cases = {
        "missing": {k: v for k, v in state.items() if "denselayer3" not in k},
        "unexpected": dict(state, **{"features.extra.weight": torch.zeros(1)}),
        "shape": dict(state, **{"features.conv0.weight": torch.zeros(64, 3, 5, 5)}),
    }
    patterns = {"missing": "missing keys", "unexpected": "unexpected keys", "shape": "wrong shapes.*conv0"}
    for name, bad in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(bad, path)
        with pytest.raises(ValueError, match=patterns[name]):
            load_densenet2d_weights(model, path)
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="expected a state_dict"):
        load_densenet2d_weights(model, path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_densenet2d_weights(model, tmp_path / "absent.pth")


def test_3d_names_line_up_with_2d():
    """Every 2D key has its 3D counterpart under the same name (transitions: norm -> TTL norm, conv -> branches)."""
    keys3d = set(t3d_densenet121().state_dict())
    for key in densenet121().state_dict():
        if ".transition" in key and ".conv." in key:
            prefix = key.split(".conv.")[0]
            assert f"{prefix}.branches.0.weight" in keys3d, key
        else:
            assert key in keys3d, key


@pytest.mark.parametrize(
    "shape,dtype,pattern",
    [
        ((1, 3, 32, 64), torch.float32, "x: expected a clip batch"),
        ((1, 4, 16, 32, 32), torch.float32, "x: expected a clip batch"),
        ((1, 3, 8, 32, 32), torch.float32, "clip: expected"),
        ((1, 3, 16, 20, 32), torch.float32, "clip: expected"),
    ],
)
def test_bad_model_input(shape, dtype, pattern):
    model = t3d_tiny()
    with pytest.raises(ValueError, match=pattern):
        model(torch.zeros(shape, dtype=dtype))


def test_integer_clip_rejected():
    with pytest.raises(TypeError, match="floating"):
        t3d_tiny()(torch.zeros(1, 3, 16, 32, 32, dtype=torch.int64))


def test_bad_ttl_depth_config():
    with pytest.raises(ValueError, match="depths"):
        t3d_tiny(ttl_depths=((1, 0), (1, 3), (1, 3)))
    with pytest.raises(ValueError, match="ttl_depths"):
        t3d_tiny(ttl_depths=((1, 3),))


def test_clip_stage_shapes():
    shapes = dict(clip_stage_shapes((32, 112, 112)))
    assert shapes["transition1"] == (8, 14, 14) and shapes["transition3"] == (2, 3, 3)
    assert dict(clip_stage_shapes((16, 32, 32)))["transition3"] == (1, 1, 1)


def test_cli_info(capsys):
    assert cli_main(["info", "--model", "t3d121", "--clip", "32x224x224"]) == 0
    out = capsys.readouterr().out
    assert "transition1" in out and "(1, 128, 8, 28, 28)" in out and "25,815,184" in out
    # 2 x multiply-adds of every conv and the classifier at 32x224x224 (dense blocks and TTLs included)
    assert "GFLOPs per clip: 260.99 (TTLs 141.66); with the fused TTL algebra: 137.04" in out
    assert cli_main(["info", "--clip", "8x20x20"]) == 2
    assert "clip: expected" in capsys.readouterr().err
    assert cli_main(["info", "--clip", "32x224"]) == 2
