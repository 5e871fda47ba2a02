"""I3D inflation of 2D DenseNet weights into T3D (``t3d.inflate``).

The main check: on a clip of identical frames, every inflated stage (stem, each dense block, each TTL, norm5)
gives the 2D stage's output on that frame at every time step the temporal zero padding does not reach. Both
nets run in float64, so the comparison is exact up to float64 rounding (no float32 tolerance to choose).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from t3d.checkpoint import load_model_weights
from t3d.cli import main as cli_main
from t3d.inflate import (
    inflate_densenet2d_to_t3d,
    inflate_kernel,
    read_densenet2d_state,
    ttl_kernel_from_transition,
)
from t3d.models import DenseNet2d, t3d_tiny
from t3d_kernels import TemporalTransition

TINY = dict(block_config=(1, 2, 2, 1), growth_rate=8, num_init_features=16, bn_size=2)


def tiny_teacher(seed: int = 0) -> DenseNet2d:
    """The 2D twin of ``t3d_tiny`` with random BN affines and running statistics (so copying them matters)."""
    torch.manual_seed(seed)
    model = DenseNet2d(**TINY)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def repeat_frames(x2d: torch.Tensor, frames: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, frames, H, W): a clip whose frames are all ``x2d``."""
    return x2d.unsqueeze(2).expand(-1, -1, frames, -1, -1).contiguous()


def assert_interior_equal(out3d: torch.Tensor, out2d: torch.Tensor, valid: range, stage: str) -> None:
    assert len(valid) > 0, f"{stage}: no time step away from the padding; use a longer clip"
    for t in valid:
        torch.testing.assert_close(out3d[:, :, t], out2d, msg=lambda m, t=t: f"{stage}, time step {t}: {m}")


def ttl_valid_steps(ttl: TemporalTransition, frames: int) -> range:
    # pooled step j reads conv outputs 2j and 2j+1, whose windows reach (d-1)//2 frames back and the rest forward
    front = max((d - 1) // 2 for d in ttl.depths)
    back = max(d - 1 - (d - 1) // 2 for d in ttl.depths)
    return range(-(-front // 2), (frames - 2 - back) // 2 + 1)


@pytest.fixture(scope="module")
def inflated_pair():
    teacher = tiny_teacher().double()
    student = t3d_tiny(num_classes=5, backend="reference").double()
    inflate_densenet2d_to_t3d(teacher.state_dict(), student)
    return teacher, student.eval()


def test_each_stage_reproduces_2d_stage_on_identical_frames(inflated_pair):
    teacher, student = inflated_pair
    torch.manual_seed(1)
    image = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    f2, f3 = teacher.features, student.features
    with torch.no_grad():
        # stem: conv 3x7x7 stride 2, pad 1 in time, then max pool 3 (stride 1 in time). Conv step t reads
        # frames 2t-1..2t+1, so only t = 0 sees the padding; pool step t reads conv steps t-1..t+1.
        clip_frames = 32
        stem2d = f2.pool0(f2.relu0(f2.norm0(f2.conv0(image))))
        conv3d = f3.relu0(f3.norm0(f3.conv0(repeat_frames(image, clip_frames))))
        stem3d = f3.pool0(conv3d)
        assert stem3d.shape[2] == clip_frames // 2
        assert_interior_equal(stem3d, stem2d, range(2, clip_frames // 2 - 1), "stem")
        # the comparison is not vacuous: the padded first step differs
        assert not torch.allclose(conv3d[:, :, 0], f2.relu0(f2.norm0(f2.conv0(image))))

        x2d = stem2d
        frames = 12
        compared = ["stem"]
        for name, stage2d in f2.named_children():
            if not (name.startswith("denseblock") or name.startswith("transition") or name == "norm5"):
                continue
            stage3d = getattr(f3, name)
            out2d = stage2d(x2d)
            out3d = stage3d(repeat_frames(x2d, frames))
            if name.startswith("denseblock"):
                # each dense layer's 3x3x3 conv reaches one more frame into the padding
                margin = stage3d.num_layers
                valid = range(margin, frames - margin)
            elif name.startswith("transition"):
                assert out3d.shape[2] == frames // 2
                valid = ttl_valid_steps(stage3d, frames)
            else:
                valid = range(frames)
            assert_interior_equal(out3d, out2d, valid, name)
            compared.append(name)
            x2d = out2d
    assert compared == [
        "stem",
        "denseblock1",
        "transition1",
        "denseblock2",
        "transition2",
        "denseblock3",
        "transition3",
        "denseblock4",
        "norm5",
    ]


def test_inflated_kernels_sum_over_time_to_the_2d_kernel():
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    k = inflate_kernel(w, 5)
    assert k.shape == (4, 3, 5, 3, 3)
    torch.testing.assert_close(k.sum(2), w)
    torch.testing.assert_close(k[:, :, 0], k[:, :, 4])
    rows = torch.randn(4, 6, 1, 1, dtype=torch.float64)
    t = ttl_kernel_from_transition(rows, torch.Size((4, 6, 4, 3, 3)))
    torch.testing.assert_close(t.sum(2)[:, :, 1, 1], rows[:, :, 0, 0])
    off_centre = t.clone()
    off_centre[:, :, :, 1, 1] = 0
    assert off_centre.abs().max() == 0


def test_ttl_branches_take_consecutive_row_slices(inflated_pair):
    teacher, student = inflated_pair
    for i in (1, 2, 3):
        rows2d = teacher.state_dict()[f"features.transition{i}.conv.weight"][:, :, 0, 0]
        ttl = getattr(student.features, f"transition{i}")
        # each branch's kernel summed over its taps is the 1x1 weight: the concatenation restores the 2D conv
        centres = [b.weight.sum(2)[:, :, b.weight.shape[3] // 2, b.weight.shape[4] // 2] for b in ttl.branches]
        torch.testing.assert_close(torch.cat(centres), rows2d)
        # earlier branches take the remainder (TTL 2 of the tiny net: 14 channels -> 5, 5, 4)
        sizes = [b.out_channels for b in ttl.branches]
        assert sizes == sorted(sizes, reverse=True) and sum(sizes) == rows2d.shape[0]


def test_bn_parameters_and_statistics_are_copied(inflated_pair):
    teacher, student = inflated_pair
    s2, s3 = teacher.state_dict(), student.state_dict()
    for key in (
        "features.norm0.running_var",
        "features.denseblock2.denselayer2.norm2.weight",
        "features.transition1.norm.running_mean",
        "features.norm5.bias",
    ):
        assert torch.equal(s2[key], s3[key]), key


def test_classifier_copied_only_when_shapes_match():
    teacher = tiny_teacher()
    student = t3d_tiny(num_classes=1000)
    inflate_densenet2d_to_t3d(teacher.state_dict(), student)
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    student = t3d_tiny(num_classes=7)
    before = student.classifier.weight.clone()
    inflate_densenet2d_to_t3d(teacher.state_dict(), student)
    assert torch.equal(student.classifier.weight, before)
    with pytest.raises(ValueError, match="classifier.weight: expected"):
        inflate_densenet2d_to_t3d(teacher.state_dict(), t3d_tiny(num_classes=7), copy_classifier=True)


def test_bad_state_dicts_give_clear_errors():
    state = tiny_teacher().state_dict()
    student = t3d_tiny()
    missing = {k: v for k, v in state.items() if "denseblock3.denselayer2.conv1" not in k}
    with pytest.raises(ValueError, match=r"missing keys \(1\).*denseblock3\.denselayer2\.conv1\.weight"):
        inflate_densenet2d_to_t3d(missing, student)
    wrong = dict(state, **{"features.conv0.weight": torch.zeros(16, 3, 5, 5)})
    with pytest.raises(
        ValueError, match=r"wrong shapes.*features\.conv0\.weight: expected \(16, 3, 7, 7\), got \(16, 3, 5, 5\)"
    ):
        inflate_densenet2d_to_t3d(wrong, student)
    extra = dict(state, **{"features.denseblock4.denselayer2.conv1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected keys.*denseblock4.denselayer2"):
        inflate_densenet2d_to_t3d(extra, student)
    with pytest.raises(ValueError, match="model2d_state: expected a state_dict"):
        inflate_densenet2d_to_t3d([1, 2], student)
    with pytest.raises(ValueError, match="model2d_state: expected a state_dict"):
        inflate_densenet2d_to_t3d(dict(state, note="hello"), student)
    with pytest.raises(ValueError, match="ttl_channels=None"):
        inflate_densenet2d_to_t3d(state, t3d_tiny(ttl_channels=4))
    # DenseNet-121 weights do not fit the tiny net: a list of mismatches, not a crash inside a conv
    with torch.device("meta"):
        big = DenseNet2d().state_dict()
    with pytest.raises(ValueError, match="unexpected keys"):
        inflate_densenet2d_to_t3d(big, student)


def test_weights_files_old_keys_and_bad_files(tmp_path):
    teacher = tiny_teacher()
    # torchvision's pre-0.3 names ("norm.1") and no num_batches_tracked (files saved before PyTorch 0.4.1)
    old = {}
    for k, v in teacher.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        for part in ("norm1", "conv1", "norm2", "conv2"):
            k = k.replace(f".{part}.", f".{part[:-1]}.{part[-1]}.") if "denselayer" in k else k
        old[k] = v
    path = tmp_path / "old.pth"
    torch.save({"state_dict": old}, path)
    student = t3d_tiny(backend="reference")
    inflate_densenet2d_to_t3d(read_densenet2d_state(path), student)
    torch.testing.assert_close(
        student.features.denseblock1.denselayer1.conv2.weight.sum(2),
        teacher.features.denseblock1.denselayer1.conv2.weight,
    )
    not_a_state = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_state)
    with pytest.raises(ValueError, match="weights: expected a state_dict .* got list"):
        read_densenet2d_state(not_a_state)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a loadable torch state_dict"):
        read_densenet2d_state(garbage)
    with pytest.raises(FileNotFoundError, match="weights: expected a 2D DenseNet weights file"):
        read_densenet2d_state(tmp_path / "absent.pth")


def test_cli_inflate_writes_a_loadable_checkpoint(tmp_path, capsys):
    teacher = tiny_teacher()
    weights = tmp_path / "tiny2d.pth"
    torch.save(teacher.state_dict(), weights)
    out = tmp_path / "out" / "inflated.pt"
    assert (
        cli_main(["inflate", "--weights", str(weights), "--model", "t3d_tiny", "--num-classes", "5", "--out", str(out)])
        == 0
    )
    # `t3d train --init` reads it (load_model_weights): every tensor loads, the classifier too (5 classes)
    model = t3d_tiny(num_classes=5)
    report = load_model_weights(model, out)
    assert report["reinitialized"] == []
    torch.testing.assert_close(model.features.conv0.weight.sum(2), teacher.features.conv0.weight)
    # a file that does not fit is a clear CLI error, not a traceback
    assert cli_main(["inflate", "--weights", str(weights), "--model", "t3d121", "--out", str(out)]) == 2
    assert "does not match" in capsys.readouterr().err
