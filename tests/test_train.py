"""Training and evaluation end to end on synthetic motion videos (t3d_tiny, 16x32x32 clips, a few steps):
loss goes down, 3D beats chance and a frame-averaging 2D baseline, exact resume, eval outputs, --init, checkpoints,
clear CLI errors."""

from __future__ import annotations

import csv
import json
import os
import random
import warnings

import numpy as np
import pytest
import torch
from _synthetic_fixtures import CLIP, keep_threads, make_dataset
from torch import nn

from t3d.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    load_model_weights,
    restore_rng_state,
    save_checkpoint,
)
from t3d.cli import main as cli_main
from t3d.models import t3d_tiny
from t3d.training import (
    StepOutput,
    TrainConfig,
    WarmupSchedule,
    amp_settings,
    fused_ops_support_autocast,
    make_optimizer,
)

# --threads 1: this 2-core machine is shared; one thread per process is also what makes runs reproducible
COMMON = ["--model", "t3d_tiny", "--clip", CLIP, "--batch-size", "8", "--threads", "1", "--no-progress"]


@pytest.fixture(autouse=True)
def _restore_threads():
    with keep_threads():
        yield


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> str:
    return make_dataset(str(tmp_path_factory.mktemp("data") / "syn"))


def _train(data, out, *extra):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = cli_main(["train", data, "--out", str(out), *COMMON, *extra])
    assert rc == 0
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def _eval(data, ckpt, out, *extra):
    assert (
        cli_main(
            ["eval", data, "--checkpoint", str(ckpt), "--out", str(out), "--threads", "1", "--workers", "0", *extra]
        )
        == 0
    )
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def trained_3d(synthetic, tmp_path_factory):
    """t3d_tiny trained 8 epochs x 4 steps on the fused backend ("auto")."""
    out = tmp_path_factory.mktemp("run3d")
    with keep_threads():
        log = _train(
            synthetic,
            out,
            "--epochs",
            "8",
            "--lr",
            "0.1",
            "--workers",
            "0",
            "--backend",
            "auto",
            "--val-split",
            "test",
            "--val-every",
            "4",
        )
    return out, log


# ---------------------------------------------------------------------------------------------- end to end
def test_training_lowers_loss_and_3d_beats_chance_and_2d_baseline(synthetic, trained_3d, tmp_path):
    out3d, log3d = trained_3d
    assert [r["epoch"] for r in log3d] == list(range(1, 9)) and log3d[-1]["step"] == 32
    first, last = log3d[0]["loss"], log3d[-1]["loss"]
    assert last < 0.5 * first, [r["loss"] for r in log3d]
    m3d = _eval(synthetic, out3d / "last.pt", tmp_path / "eval3d", "--clips", "3")
    # validation during training (--val-split test --val-every 4): after epochs 4 and 8, with the final weights
    assert [("val_video_top1" in r) for r in log3d] == [False] * 3 + [True] + [False] * 3 + [True]
    m_val = _eval(synthetic, out3d / "last.pt", tmp_path / "eval3d_1clip", "--clips", "1")
    assert log3d[-1]["val_video_top1"] == m_val["video_top1"]
    # the same budget for the frame-averaging 2D model: it is blind to frame order, and every test video has its
    # time-reversed twin in the other class, so it gets at most half of them right whatever it learns
    out2d = tmp_path / "run2d"
    _train(synthetic, out2d, "--model", "frame2d", "--epochs", "8", "--lr", "0.1", "--workers", "0")
    m2d = _eval(synthetic, out2d / "last.pt", tmp_path / "eval2d", "--clips", "3")
    assert m3d["videos"] == m2d["videos"] == 16
    assert m2d["video_top1"] <= 0.5
    assert m3d["video_top1"] >= 0.85, m3d  # chance is 0.5
    assert m3d["clip_top1"] >= 0.8, m3d


def test_eval_outputs(synthetic, trained_3d, tmp_path, capsys):
    out3d, _ = trained_3d
    m = _eval(synthetic, out3d / "last.pt", tmp_path / "ev", "--clips", "2", "--batch-size", "3")
    assert m["clips"] == 32 and m["videos"] == 16 and m["skipped"] == 0
    assert m["clip_top5"] == m["video_top5"] == 1.0  # 2 classes: top-5 is top-2
    with open(tmp_path / "ev" / "confusion.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["true\\predicted", "MoveRight", "MoveLeft"]
    counts = np.array([[int(v) for v in r[1:]] for r in rows[1:]])
    assert counts.sum(1).tolist() == [8, 8]  # 8 test videos per class
    assert counts.trace() / 16 == pytest.approx(m["video_top1"])
    with open(tmp_path / "ev" / "confusion.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "ev" / "predictions.csv") as f:
        assert len(list(csv.reader(f))) == 17
    assert "video top-1" in capsys.readouterr().out


def test_eval_three_crops_averages_every_view(synthetic, trained_3d, tmp_path, capsys):
    """`t3d eval --crops 3`: clips x 3 spatial crops per video (the 10x3 views), video score = mean over all views."""
    out3d, _ = trained_3d
    m = _eval(synthetic, out3d / "last.pt", tmp_path / "ev3", "--clips", "2", "--crops", "3")
    assert (m["clips"], m["videos"], m["crops"], m["clips_per_video"]) == (96, 16, 3, 2)
    assert m["video_top1"] >= 0.85, m
    assert "96 views" in capsys.readouterr().out

    from t3d.evaluate import evaluate

    class MeanOfView(nn.Module):  # logits [0, mean of the view]: the video score is a known function of the views
        def forward(self, x):
            return torch.stack([torch.zeros(len(x)), x.mean((1, 2, 3, 4))], 1)

    views = torch.randn(2, 2, 3, 3, 16, 4, 4)  # (videos, clips, crops, 3, T, H, W)
    batch = {"clips": views, "labels": torch.tensor([0, 1]), "indices": torch.tensor([0, 1]), "count": 2}
    result = evaluate(MeanOfView(), [batch], 2)
    per_view = torch.stack([torch.zeros(2, 6), views.flatten(1, 2).mean((2, 3, 4, 5))], -1).softmax(-1)
    assert result["clips"] == 12
    torch.testing.assert_close(result["video_scores"], per_view.mean(1))


def test_resume_after_interruption_is_bit_exact(synthetic, tmp_path):
    """Stop after 3 optimizer steps (mid-epoch, mid-accumulation boundaries), resume with DataLoader workers:
    the final weights equal an uninterrupted run's exactly (dropout, augmentation, shuffling all reproduced)."""
    args = [
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--accum-steps",
        "2",
        "--lr",
        "0.05",
        "--dropout",
        "0.3",
        "--backend",
        "reference",
        "--save-every",
        "2",
    ]
    _train(synthetic, tmp_path / "a", *args, "--workers", "0")
    _train(synthetic, tmp_path / "b", *args, "--workers", "2", "--max-steps", "3")
    mid = load_checkpoint(tmp_path / "b" / "last.pt")
    assert (mid["step"], mid["epoch"], mid["data"]["position"]) == (3, 0, 6)
    _train(synthetic, tmp_path / "b", *args, "--workers", "2", "--resume", "auto")
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert a["step"] == b["step"] == 8
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 8
    # resuming with another global batch is refused (the saved position counts batches)
    assert (
        cli_main(
            ["train", synthetic, "--out", str(tmp_path / "b"), *COMMON, *args, "--batch-size", "2", "--resume", "auto"]
        )
        == 2
    )
    # and the interrupted run really differed from a fresh start: the resumed weights are not the 3-step ones
    assert not torch.equal(mid["model"]["classifier.weight"], b["model"]["classifier.weight"])


def test_gradient_accumulation_equals_the_full_batch(synthetic, tmp_path):
    """Batch 4 x 2 accumulation steps == batch 8 (BN frozen, so both normalize alike): float32 summation order only."""
    args = ["--epochs", "1", "--lr", "0.05", "--freeze-bn", "--backend", "reference", "--workers", "0"]
    _train(synthetic, tmp_path / "full", *args, "--batch-size", "8")
    _train(synthetic, tmp_path / "accum", *args, "--batch-size", "4", "--accum-steps", "2")
    full, accum = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "accum" / "last.pt")
    assert full["step"] == accum["step"] == 4
    eps = torch.finfo(torch.float32).eps
    for k, v in full["model"].items():
        if v.is_floating_point():
            tol = 8 * eps * full["step"] * v.abs().max().item()
            assert (v - accum["model"][k]).abs().max().item() <= tol, k


def test_init_from_checkpoint_reinitialises_a_different_classifier(trained_3d, tmp_path, capsys):
    out3d, _ = trained_3d
    data4 = make_dataset(str(tmp_path / "syn4"), num_classes=4, train_per_class=2, test_per_class=1)
    _train(
        data4,
        tmp_path / "ft",
        "--init",
        str(out3d / "last.pt"),
        "--max-steps",
        "1",
        "--workers",
        "0",
        "--backend",
        "reference",
        "--lr",
        "0.001",
    )
    assert "re-initialised ['classifier.bias', 'classifier.weight']" in capsys.readouterr().out
    src, ft = load_checkpoint(out3d / "last.pt")["model"], load_checkpoint(tmp_path / "ft" / "last.pt")["model"]
    assert ft["classifier.weight"].shape == (4, src["features.norm5.weight"].numel())
    # one step at lr 1e-3 from the loaded weights: close to them (a fresh init would be far)
    assert (ft["features.conv0.weight"] - src["features.conv0.weight"]).abs().max() < 1e-2
    # a checkpoint of another architecture: a clear error listing the mismatches
    assert (
        cli_main(
            [
                "train",
                data4,
                "--out",
                str(tmp_path / "bad"),
                *COMMON,
                "--model",
                "frame2d",
                "--init",
                str(out3d / "last.pt"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "--init:" in err and "missing keys" in err and "unexpected keys" in err


# ---------------------------------------------------------------------------------------------- pieces
class _Regression(torch.utils.data.Dataset):
    """y = x @ w_true: indexed by the (index, sample_seed) pairs of EpochSampler."""

    def __init__(self, n: int = 24) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, item):
        index, _ = item
        return {"x": self.x[index], "y": self.y[index]}


def _mse_step(model, batch, device):
    pred = model(batch["x"].to(device)).squeeze(1)
    return StepOutput(torch.nn.functional.mse_loss(pred, batch["y"].to(device)), int(batch["y"].numel()))


def test_trainer_with_a_custom_step_function(tmp_path, capsys):
    """The reusable loop: any model, loader and step function; progress bar, accumulation, schedule, log."""
    from torch.utils.data import DataLoader

    from t3d.data import EpochSampler
    from t3d.training import Trainer, make_scheduler

    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    data = _Regression()
    sampler = EpochSampler(len(data), batch_size=4, seed=1)
    loader = DataLoader(data, batch_size=4, sampler=sampler, drop_last=True)
    cfg = TrainConfig(epochs=5, lr=0.05, accum_steps=2, warmup_steps=2, out_dir=str(tmp_path), log_every=1, seed=1)
    opt = make_optimizer(model, cfg)
    trainer = Trainer(
        model,
        opt,
        loader,
        step_fn=_mse_step,
        scheduler=make_scheduler(opt, cfg, 3),
        config=cfg,
        meta={"what": "regression"},
    )
    assert trainer.steps_per_epoch == 3
    history = trainer.fit()
    assert [r["step"] for r in history] == [3, 6, 9, 12, 15]
    assert history[-1]["loss"] < 0.2 * history[0]["loss"] and history[0]["acc"] is None
    assert history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine to 0 at the last step
    assert "loss=" in capsys.readouterr().err  # the tqdm bar's postfix
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["meta"]["what"] == "regression" and ckpt["epoch"] == 5 and ckpt["step"] == 15


def test_checkpoint_atomic_save_and_weights_only_load(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"a": torch.arange(3), "meta": {"x": [1, 2]}}, path)
    assert torch.equal(load_checkpoint(path)["a"], torch.arange(3))
    # a failing save (unpicklable object) leaves the previous file intact and no temp file behind
    with pytest.raises(Exception):  # noqa: B017 - pickling errors vary by Python version
        save_checkpoint({"a": torch.zeros(2), "f": lambda: 0}, path)
    assert torch.equal(load_checkpoint(path)["a"], torch.arange(3))
    assert os.listdir(tmp_path) == ["c.pt"]
    # weights_only=True: a pickled arbitrary object is refused, with the file's name
    torch.save({"obj": nn.Linear(2, 2)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt.* is not a loadable torch checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(FileNotFoundError, match="checkpoint: expected a checkpoint file"):
        load_checkpoint(tmp_path / "none.pt")


def test_rng_state_roundtrip(tmp_path):
    state = capture_rng_state()
    save_checkpoint({"rng": state}, tmp_path / "r.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_load_model_weights_rules(tmp_path):
    torch.manual_seed(0)
    src = t3d_tiny(num_classes=5, backend="reference")
    dst = t3d_tiny(num_classes=3, backend="reference")
    before = dst.classifier.weight.clone()
    report = load_model_weights(dst, {"model": {"module." + k: v for k, v in src.state_dict().items()}})
    assert report["reinitialized"] == ["classifier.bias", "classifier.weight"]
    assert torch.equal(dst.features.conv0.weight, src.features.conv0.weight)
    assert torch.equal(dst.classifier.weight, before)
    # a transferred-student export ({"student": state_dict} without classifier) loads too
    student = {k: v for k, v in src.state_dict().items() if not k.startswith("classifier.")}
    assert load_model_weights(dst, {"format": "x", "student": student})["reinitialized"] == [
        "classifier.bias",
        "classifier.weight",
    ]
    broken = dict(student)
    broken.pop("features.conv0.weight")
    broken["features.extra"] = torch.zeros(1)
    broken["features.norm5.weight"] = torch.zeros(7)
    with pytest.raises(
        ValueError,
        match=r"missing keys \(1\): \['features.conv0.weight'\].*unexpected keys \(1\): "
        r"\['features.extra'\].*wrong shapes \(1\): \['features.norm5.weight: model",
    ):
        load_model_weights(dst, broken)


def test_schedule_and_optimizer_defaults():
    cos = WarmupSchedule("cosine", total_steps=10, warmup_steps=2)
    assert [cos(s) for s in (0, 1)] == [0.5, 1.0]
    assert cos(2) == 1.0 and cos(6) == pytest.approx(0.5) and cos(10) == pytest.approx(0.0)
    step = WarmupSchedule("step", total_steps=30, milestones=(10, 20), gamma=0.1)
    assert [step(s) for s in (0, 9, 10, 25)] == pytest.approx([1, 1, 0.1, 0.01])
    opt = make_optimizer(nn.Linear(2, 2), TrainConfig())
    group = opt.param_groups[0]
    assert (group["momentum"], group["weight_decay"], group["nesterov"]) == (0.9, 1e-4, True)
    assert amp_settings("auto", torch.device("cpu")) == (False, None, False)
    assert amp_settings("bf16", torch.device("cpu")) == (True, torch.bfloat16, False)
    assert amp_settings("bf16", torch.device("cpu"), nn.Linear(2, 2)) == (True, torch.bfloat16, False)
    # the fused TTL / dense-block ops have no autocast rule (yet): explicit AMP is refused with a clear message
    if not fused_ops_support_autocast(t3d_tiny(backend="reference"), "cpu"):
        with pytest.raises(ValueError, match="--amp: bf16 autocast is not supported by this model's fused ops"):
            amp_settings("bf16", torch.device("cpu"), t3d_tiny(backend="reference"))
    assert amp_settings("fp16", torch.device("cpu")) == (True, torch.float16, True)  # loss scaling on CPU too
    with pytest.raises(ValueError, match="schedule: expected"):
        TrainConfig(schedule="linear")


def test_amp_policy_on_gpus(monkeypatch):
    """--amp auto on a GPU: bf16 where the GPU has it, else fp16 with loss scaling (the policy alone: no GPU here)."""
    import t3d.training.amp as amp

    model = t3d_tiny()
    monkeypatch.setattr(amp, "autocast_refusals", lambda m, device_type, dtype: [])
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert amp.amp_settings("auto", cuda, model) == (True, torch.bfloat16, False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert amp.amp_settings("auto", cuda, model) == (True, torch.float16, True)
    assert amp.amp_settings("fp16", cuda, model) == (True, torch.float16, True)
    assert amp.amp_settings("off", cuda, model) == (False, None, False)


@pytest.mark.parametrize("model,backend", [("frame2d", "auto"), ("t3d_tiny", "auto")])
def test_amp_bf16_trains_on_cpu(synthetic, tmp_path, capsys, model, backend):
    """`t3d train --amp bf16` on the CPU: trains, weights and BN statistics stay float32 (frame2d: finite loss). A
    model whose fused ops have no CPU autocast rule is refused with t3d_kernels' reasons instead of a crash.

    T3D's loss is not checked: in bf16 on this CPU it is not reproducible (PyTorch's CPU bf16 conv3d weight gradient
    varies from run to run at dense block 3's 2x2 planes, also on the reference backend) and was NaN in about 1 run
    of 10 (docs/training.md, section 6)."""
    argv = ["--model", model, "--backend", backend, "--amp", "bf16", "--max-steps", "2", "--workers", "0"]
    if model != "frame2d" and not fused_ops_support_autocast(t3d_tiny(backend=backend), "cpu"):
        assert cli_main(["train", synthetic, "--out", str(tmp_path / "x"), *COMMON, *argv]) == 2
        err = capsys.readouterr().err
        assert "--amp: bf16 autocast is not supported by this model's fused ops (t3d::" in err and "no autocast" in err
        return
    log = _train(synthetic, tmp_path / "bf16", *argv)
    assert log[-1]["step"] == 2
    if model == "frame2d":
        assert all(np.isfinite(r["loss"]) for r in log)
    state = load_checkpoint(tmp_path / "bf16" / "last.pt")["model"]
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}


def test_skipped_videos_are_counted_in_training(tmp_path, capfd):
    """A dataset with an empty, a corrupt and a too-short video trains; every epoch reports the 3 skipped, and each
    skip is one clean line (no Python warning with its source line)."""
    from _synthetic_fixtures import write_motion_video

    root = tmp_path / "mixed"
    for cls, n in (("a", 4), ("b", 5)):
        for v in range(n):
            write_motion_video(str(root / cls / f"good{v}.avi"), seed=v + (10 if cls == "b" else 0))
    (root / "a" / "empty.avi").write_bytes(b"")
    (root / "b" / "corrupt.avi").write_bytes(os.urandom(1024))
    write_motion_video(str(root / "b" / "short.avi"), frames=8)
    # 12 videos in 2 batches of 6: every video is drawn every epoch
    log = _train(
        str(root),
        tmp_path / "out",
        "--epochs",
        "2",
        "--batch-size",
        "6",
        "--workers",
        "1",
        "--backend",
        "reference",
        "--split",
        "all",
        "--hflip",
        "off",
    )
    assert [r["skipped"] for r in log] == [3, 3] and [r["clips"] for r in log] == [9, 9]
    err = capfd.readouterr().err.splitlines()
    assert sum(line.startswith("skipping video ") for line in err) == 6, err  # 3 per epoch, from the worker
    assert [line for line in err if line.startswith("epoch ")] == [
        f"epoch {e}: skipped 3 unreadable/too-short videos" for e in (1, 2)
    ]
    assert not [line for line in err if "Warning" in line or "warnings.warn" in line], err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["DATA_MISSING"], "data_dir: expected a dataset directory"),
        (["--split", "validation"], "--split: expected one of ['train', 'test'], got 'validation'"),
        (["--clip", "32x32x32"], "--clip: a clip of 32 frames at stride 1 spans 32 frames, longer than the videos"),
        (["--clip", "16x32"], "--clip: expected TxHxW"),
        (["--clip", "8x32x32"], "--clip: clip: expected (T, H, W) that survive the downsampling"),
        (["--model", "resnet50"], "--model: expected one of"),
        (["--resume", "MISSING.pt"], "checkpoint: expected a checkpoint file"),
        (["--fold", "5"], "--fold: expected an official split number 1..3, got 5"),
    ],
)
def test_cli_bad_arguments(synthetic, tmp_path, capsys, argv, message):
    data = synthetic
    if argv[0] == "DATA_MISSING":
        data, argv = str(tmp_path / "missing"), []
    argv = [str(tmp_path / a) if a.endswith(".pt") else a for a in argv]
    rc = cli_main(["train", data, "--out", str(tmp_path / "o"), *COMMON, "--workers", "0", *argv])
    assert rc == 2
    assert message in capsys.readouterr().err
