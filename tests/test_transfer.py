"""2D -> 3D supervision transfer (``t3d.transfer``): frozen teacher, pair sampling, head, training, export, CLI.

Tiny nets throughout: the 2D teacher is the 2D twin of ``t3d_tiny`` (blocks (1, 2, 2, 1), growth 8), clips 16x32x32.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from t3d.checkpoint import load_model_weights
from t3d.cli import main as cli_main
from t3d.data import EpochSampler, collate_clips, make_loader
from t3d.models import DenseNet2d, t3d_tiny
from t3d.training import TrainConfig, Trainer, make_optimizer
from t3d.transfer import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FrozenTeacher,
    TransferHead,
    TransferModel,
    TransferStep,
    build_teacher,
    export_from_checkpoint,
    export_student,
    find_unlabeled_videos,
    sample_negatives,
    video_ids,
    video_key,
)

TINY = dict(block_config=(1, 2, 2, 1), growth_rate=8, num_init_features=16, bn_size=2)
CLIP = (16, 32, 32)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # these nets are tiny: a second thread gains nothing, and on a busy machine OpenMP spin-waiting makes
    # oversubscribed threads many times slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_teacher_2d(seed: int = 0) -> DenseNet2d:
    torch.manual_seed(seed)
    return DenseNet2d(**TINY)


class ColourVideos(torch.utils.data.Dataset):
    """In-memory "videos" told apart by colour: item i is a noisy clip of video ``i % videos``, whose frames are
    its own solid colour (so the match / no-match task is learnable in a few dozen steps). Items as
    :class:`t3d.data.VideoDataset`'s: {"clip", "label", "index"}, indexable by (index, sample_seed)."""

    def __init__(self, videos: int = 4, repeats: int = 2, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.colours = torch.rand(videos, 3, generator=g)
        self.videos, self.length = videos, videos * repeats
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)

    def __len__(self) -> int:
        return self.length

    def clip(self, video: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        x = self.colours[video].view(3, 1, 1, 1) + 0.1 * torch.randn(3, *CLIP, generator=g)
        return (x.clamp(0, 1) - self.mean) / self.std

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (int(item), int(item))
        return {"clip": self.clip(index % self.videos, seed), "label": 0, "index": index}

    @property
    def video_of(self) -> torch.Tensor:
        return torch.arange(self.length) % self.videos


def make_transfer(seed: int = 0, dropout: float = 0.0):
    teacher = FrozenTeacher(tiny_teacher_2d(seed))
    torch.manual_seed(seed + 1)
    student = t3d_tiny(num_classes=1, backend="reference")
    model = TransferModel(student, TransferHead(teacher.feature_dim, student.num_features, dropout=dropout))
    return teacher, model


def make_trainer(model, teacher, dataset, steps: int, out_dir=None, seed: int = 0) -> Trainer:
    config = TrainConfig(
        epochs=steps * 4 // len(dataset), lr=0.1, schedule="constant", out_dir=out_dir, seed=seed, progress=False
    )
    sampler = EpochSampler(len(dataset), batch_size=4, seed=seed)
    loader = make_loader(dataset, 4, sampler=sampler, seed=seed)
    return Trainer(
        model,
        make_optimizer(model, config),
        loader,
        step_fn=TransferStep(teacher, seed, dataset.video_of),
        config=config,
    )


def pair_accuracy(model, teacher, dataset: ColourVideos, batches: int = 8) -> float:
    """Match / no-match accuracy in eval mode on fresh clips: every batch holds each video once (2 pairs each)."""
    step = TransferStep(teacher, seed=123)
    model.eval()
    correct = count = 0
    with torch.no_grad():
        for b in range(batches):
            videos = torch.randperm(dataset.videos, generator=torch.Generator().manual_seed(b))
            clips = torch.stack([dataset.clip(int(v), 10_000 + b * 100 + int(v)) for v in videos])
            out = step(model, {"clips": clips, "video": videos}, torch.device("cpu"))
            correct, count = correct + out.correct, count + out.count
    model.train()
    return correct / count


@pytest.fixture(scope="module")
def trained():
    """One short transfer run (60 steps of 4 clips, 4 colour videos), with snapshots from before it."""
    dataset = ColourVideos(videos=4, repeats=1)
    teacher, model = make_transfer()
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in model.student.state_dict().items()}
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    accuracy_before = pair_accuracy(model, teacher, dataset)
    trainer = make_trainer(model, teacher, dataset, steps=60)
    history = trainer.fit()
    return {
        "dataset": dataset,
        "teacher": teacher,
        "model": model,
        "trainer": trainer,
        "history": history,
        "teacher_before": teacher_before,
        "student_before": student_before,
        "head_before": head_before,
        "accuracy_before": accuracy_before,
        "accuracy_after": pair_accuracy(model, teacher, dataset),
    }


def test_teacher_is_bit_identical_after_training_while_student_and_head_change(trained):
    teacher, model = trained["teacher"], trained["model"]
    assert trained["trainer"].step == 60
    after = teacher.state_dict()
    assert after.keys() == trained["teacher_before"].keys()
    # parameters AND buffers (BN running statistics, num_batches_tracked) untouched, bit for bit
    buffers = [k for k in after if "running_" in k or "num_batches" in k]
    assert len(buffers) > 10
    for key, value in trained["teacher_before"].items():
        assert torch.equal(after[key], value), f"teacher {key} changed"
    assert not teacher.training and all(not m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    changed = [k for k, v in model.student.state_dict().items() if not torch.equal(v, trained["student_before"][k])]
    assert any(k.endswith("conv0.weight") for k in changed) and any("transition3.branches" in k for k in changed)
    assert all(not torch.equal(v, trained["head_before"][k]) for k, v in model.head.state_dict().items())
    # the optimizer holds only student and head parameters
    optimized = {id(p) for group in trained["trainer"].optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    assert optimized <= {id(p) for p in model.parameters()}


def test_match_accuracy_rises_above_chance(trained):
    # chance is 0.5 (balanced pairs); 64 pairs evaluated, so 0.7 is > 3 standard deviations above chance
    assert trained["accuracy_before"] < 0.7
    assert trained["accuracy_after"] >= 0.7, trained["accuracy_after"]
    assert trained["history"][-1]["loss"] < trained["history"][0]["loss"]


def test_teacher_stays_in_eval_mode():
    teacher = FrozenTeacher(tiny_teacher_2d())
    teacher.train()
    assert not teacher.training and not teacher.model.features.norm0.training
    x = torch.randn(2, 3, 4, 32, 32, requires_grad=True)
    assert not teacher(x).requires_grad  # no graph through the teacher


def test_teacher_averages_frame_features_in_imagenet_normalisation():
    model2d = tiny_teacher_2d().eval()
    # clips arriving with another normalisation are mapped to ImageNet's before the teacher sees them
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
    teacher = FrozenTeacher(model2d, input_mean=mean, input_std=std).double()
    raw = torch.rand(2, 3, 5, 32, 32, dtype=torch.float64)  # RGB in [0, 1]
    m, s = torch.tensor(mean).view(1, 3, 1, 1, 1), torch.tensor(std).view(1, 3, 1, 1, 1)
    im_m, im_s = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = torch.stack(
            [
                torch.stack([model2d.forward_features((raw[n : n + 1, :, t] - im_m) / im_s)[0] for t in range(5)]).mean(
                    0
                )
                for n in range(2)
            ]
        )
    torch.testing.assert_close(teacher((raw - m) / s), expected.float())
    assert FrozenTeacher(model2d, frames=3).frame_indices(16).tolist() == [0, 8, 15]


def test_negatives_never_pair_a_video_with_itself_and_cover_all_others():
    ids = torch.tensor([0, 0, 1, 1, 2, 5, 5, 5])
    seen = set()
    for seed in range(200):
        partners = sample_negatives(ids, torch.Generator().manual_seed(seed))
        assert partners.shape == ids.shape
        assert bool((ids[partners] != ids).all())
        seen.update(zip(range(len(ids)), partners.tolist(), strict=True))
    # every allowed (clip, partner) pair is drawn at some point: uniform over the other videos' clips
    allowed = {(i, j) for i in range(len(ids)) for j in range(len(ids)) if ids[i] != ids[j]}
    assert seen == allowed
    with pytest.raises(ValueError, match="at least 2 videos"):
        sample_negatives(torch.tensor([3]))
    with pytest.raises(ValueError, match="another video"):
        sample_negatives(torch.tensor([4, 4, 4]))


def test_step_pairs_are_balanced_and_deterministic():
    teacher, model = make_transfer()
    step = TransferStep(teacher, seed=0, video_of=torch.tensor([0, 0, 1, 2, 3, 3]))
    dataset = ColourVideos(videos=6, repeats=1)
    batch = collate_clips([dataset[i] for i in (0, 1, 2, 5)])
    seen_partners = []
    model_calls = []

    def spy(clips, teacher_features, partners):
        model_calls.append((clips.shape[0], teacher_features.shape))
        seen_partners.append(partners)
        return model(clips, teacher_features, partners)

    out = step(spy, batch, torch.device("cpu"))
    assert out.count == 4 and 0 <= out.correct <= 4
    partners = seen_partners[0]
    ids = torch.tensor([0, 0, 1, 3])  # video_of of indices 0, 1, 2, 5
    assert bool((ids[partners] != ids).all())  # indices 0 and 1 are clips of the same video: never paired
    assert model_calls[0] == (4, torch.Size([4, teacher.feature_dim]))
    # the same batch draws the same negatives (resume and DDP do not depend on the global RNG)
    step(spy, batch, torch.device("cpu"))
    assert torch.equal(seen_partners[0], seen_partners[1])
    # a batch from a single video has no negative: zero loss, nothing counted
    out = step(model, collate_clips([dataset[i] for i in (0, 1)]), torch.device("cpu"))
    assert out.count == 0 and float(out.loss.detach()) == 0.0


def test_model_logits_are_positives_then_negatives():
    teacher, model = make_transfer()
    model.eval()
    clips = ColourVideos(videos=3, repeats=1)
    x = torch.stack([clips[i]["clip"] for i in range(3)])
    with torch.no_grad():
        f2 = teacher(x)
        logits = model(x, f2, torch.tensor([2, 0, 1]))
        f3 = model.student.forward_features(x)
        torch.testing.assert_close(logits[:3], model.head(torch.cat([f2, f3], 1)))
        torch.testing.assert_close(logits[3:], model.head(torch.cat([f2[[2, 0, 1]], f3], 1)))


def test_head_layout():
    head = TransferHead(1024, 1024, dropout=0.5)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(512, 2048), (128, 512), (2, 128)]
    assert sum(isinstance(m, nn.ReLU) for m in head.modules()) == 2
    assert sum(isinstance(m, nn.Dropout) for m in head.modules()) == 2
    assert not any(isinstance(m, nn.Dropout) for m in TransferHead(4, 4).modules())
    with pytest.raises(ValueError, match="dropout"):
        TransferHead(4, 4, dropout=1.5)


def test_resume_continues_exactly(tmp_path):
    # 12 clips of 4 videos (repeated videos in a batch), 3 steps per epoch, interrupted mid-epoch after step 4
    dataset = ColourVideos(videos=4, repeats=3)
    teacher, model = make_transfer(seed=3, dropout=0.3)
    straight = make_trainer(model, teacher, dataset, steps=6, seed=3)
    straight.fit()

    teacher, model = make_transfer(seed=3, dropout=0.3)
    first = make_trainer(model, teacher, dataset, steps=6, out_dir=str(tmp_path), seed=3)
    first.config.max_steps = 4
    first.fit()
    assert first.step == 4 and first.position == 1
    torch.manual_seed(1234)  # the checkpoint must restore the RNG (head dropout draws from it)
    _, model = make_transfer(seed=99, dropout=0.3)  # other initial weights: all must come from the checkpoint
    teacher = FrozenTeacher(tiny_teacher_2d(3))
    second = make_trainer(model, teacher, dataset, steps=6, out_dir=str(tmp_path), seed=3)
    second.resume(tmp_path / "last.pt")
    second.fit()
    assert second.step == straight.step == 6
    for (key, a), b in zip(
        straight.raw_model.state_dict().items(), second.raw_model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), key


def test_export_loads_for_fine_tuning(trained, tmp_path):
    model = trained["model"]
    path = export_student(model, tmp_path / "student.pt", {"model": "t3d_tiny"})
    finetune = t3d_tiny(num_classes=7)
    report = load_model_weights(finetune, path)
    assert report["reinitialized"] == ["classifier.bias", "classifier.weight"]
    for key, value in model.student.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(finetune.state_dict()[key], value), key
    # the same from a transfer training checkpoint
    trainer = trained["trainer"]
    trainer.out_dir = str(tmp_path)
    trainer.save("transfer.pt")
    again = export_from_checkpoint(tmp_path / "transfer.pt", tmp_path / "again.pt")
    load_model_weights(t3d_tiny(num_classes=3), again)
    with pytest.raises(ValueError, match="transfer checkpoint"):
        export_from_checkpoint(path, tmp_path / "x.pt")


def test_bad_teacher_weights_give_clear_errors(tmp_path):
    student = t3d_tiny()
    state = tiny_teacher_2d().state_dict()
    missing = {k: v for k, v in state.items() if not k.startswith("features.norm5.")}
    with pytest.raises(ValueError, match=r"teacher weights: .*missing keys \(5\).*features\.norm5"):
        build_teacher(student, missing, arch="matching")
    wrong = dict(state, **{"features.denseblock1.denselayer1.conv1.weight": torch.zeros(16, 16, 3, 3)})
    with pytest.raises(ValueError, match=r"wrong shapes.*denselayer1\.conv1\.weight: expected \(16, 16, 1, 1\)"):
        build_teacher(student, wrong, arch="matching")
    bad_file = tmp_path / "bad.pth"
    torch.save({"features.conv0.weight": [1, 2, 3]}, bad_file)
    with pytest.raises(ValueError, match="expected a state_dict"):
        build_teacher(student, bad_file, arch="matching")
    with pytest.raises(ValueError, match="expected a state_dict .* got list"):
        torch.save([1], bad_file)
        build_teacher(student, bad_file, arch="matching")
    with pytest.raises(ValueError, match="teacher arch: expected 'matching' or one of"):
        build_teacher(student, state, arch="resnet50")
    # DenseNet-121 asked for, tiny weights given: the mismatch is listed, not a crash
    with pytest.raises(ValueError, match="missing keys"):
        build_teacher(student, state, arch="densenet121")
    # DDP-saved ("module.") and pre-PyTorch-0.4.1 (no num_batches_tracked) state dicts are accepted
    legacy = {"module." + k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert torch.equal(
        build_teacher(student, legacy, arch="matching").model.features.norm5.weight, state["features.norm5.weight"]
    )
    # the ImageNet classifier is optional
    teacher = build_teacher(
        student, {k: v for k, v in state.items() if not k.startswith("classifier.")}, arch="matching"
    )
    assert torch.equal(teacher.model.features.conv0.weight, state["features.conv0.weight"])


def test_paper_teacher_for_any_student(tmp_path, capsys):
    """The default teacher is the paper's 2D DenseNet-121 whatever the student (t3d_tiny here, a 23-d feature): the
    head concatenates 1024 + 23; `t3d transfer --model t3d_tiny --teacher-weights densenet121.pth` trains a step."""
    from t3d.models import densenet121

    torch.manual_seed(0)
    weights = tmp_path / "densenet121.pth"
    torch.save(densenet121().state_dict(), weights)
    student = t3d_tiny()
    teacher = build_teacher(student, weights)
    assert teacher.feature_dim == 1024 and student.num_features == 23
    model = TransferModel(student, TransferHead(teacher.feature_dim, student.num_features))
    assert model.head.layers.fc1.in_features == 1024 + 23
    clips = torch.randn(2, 3, *CLIP)
    assert model(clips, teacher(clips), torch.tensor([1, 0])).shape == (4, 2)
    # the CLI: densenet121 by default; `matching` asks for the student's 2D twin, which these weights are not
    data = tmp_path / "syn"
    assert t3d(f"make-synthetic {data} --classes 2 --train-per-class 2 --test-per-class 1 --frames 16 --size 32") == 0
    args = f"transfer {data} --teacher-weights {weights} --format ucf101 --model t3d_tiny --clip 16x32x32 "
    args += "--batch-size 2 --max-steps 1 --workers 0 --no-progress"
    assert t3d(f"{args} --out {tmp_path}/tr") == 0
    assert "transfer densenet121 teacher (1024-d, frozen) -> t3d_tiny student" in capsys.readouterr().out
    assert t3d(f"{args} --out {tmp_path}/tr2 --teacher matching") == 2
    assert "unexpected keys" in capsys.readouterr().err


def test_unlabeled_videos_and_source_groups(tmp_path):
    for rel in ("a/v_Run_g01_c01.avi", "a/v_Run_g01_c02.avi", "a/v_Run_g02_c01.avi", "b/clip.mp4", "b/notes.txt"):
        os.makedirs(tmp_path / os.path.dirname(rel), exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    os.makedirs(tmp_path / "c" / "frames")
    for i in range(3):
        (tmp_path / "c" / "frames" / f"{i:05d}.jpg").write_bytes(b"")
    found = find_unlabeled_videos(tmp_path)
    assert [os.path.relpath(p, tmp_path) for p in found] == [
        "a/v_Run_g01_c01.avi",
        "a/v_Run_g01_c02.avi",
        "a/v_Run_g02_c01.avi",
        "b/clip.mp4",
        "c/frames",
    ]
    # UCF101 clips c01, c02 of group g01 are cut from one source video: one id
    assert video_ids(found).tolist() == [0, 0, 1, 2, 3]
    assert video_key("x/v_Run_g01_c02.avi") == video_key("x/v_Run_g01_c01.avi") != video_key("y/v_Run_g01_c01.avi")
    os.makedirs(tmp_path / "empty" / "sub")
    with pytest.raises(FileNotFoundError, match="no videos under"):
        find_unlabeled_videos(tmp_path / "empty")


def t3d(command: str) -> int:
    """Run ``t3d <command>`` in this process (paths must not contain spaces)."""
    return cli_main(command.split())


@pytest.mark.slow
def test_cli_inflate_transfer_finetune_eval(tmp_path, capsys):
    """The docs' pipeline on synthetic data: make-synthetic -> (inflate) -> transfer -> train --init -> eval."""
    data, weights = tmp_path / "syn", tmp_path / "tiny2d.pth"
    torch.save(tiny_teacher_2d().state_dict(), weights)
    assert t3d(f"make-synthetic {data} --classes 2 --train-per-class 2 --test-per-class 1 --frames 16 --size 32") == 0
    common = "--model t3d_tiny --clip 16x32x32 --workers 0 --no-progress"
    # the two ways combined: the student starts from the inflated teacher, then the transfer trains it
    assert t3d(f"inflate --weights {weights} --model t3d_tiny --num-classes 2 --out {tmp_path}/inflated.pt") == 0
    transfer = f"transfer {data} --teacher-weights {weights} --teacher matching --out {tmp_path}/tr --batch-size 2"
    transfer += " --format ucf101"
    assert t3d(f"{transfer} --max-steps 2 --init {tmp_path}/inflated.pt {common}") == 0
    out = capsys.readouterr().out
    assert "student initialised from" in out and "student exported" in out
    student = tmp_path / "tr" / "student.pt"
    assert student.is_file() and (tmp_path / "tr" / "last.pt").is_file()
    assert t3d(f"train {data} --init {student} --out {tmp_path}/ft --batch-size 2 --max-steps 1 {common}") == 0
    assert "--init: loaded" in capsys.readouterr().out
    assert t3d(f"eval {data} --checkpoint {tmp_path}/ft/last.pt --split test --out {tmp_path}/ev --workers 0") == 0
    assert (tmp_path / "ev" / "metrics.json").is_file()
    # resuming the transfer run continues it (one more step) and exports again
    before = student.stat().st_mtime_ns
    assert t3d(f"{transfer} --max-steps 3 --resume auto {common}") == 0
    assert "resumed from" in capsys.readouterr().out and student.stat().st_mtime_ns != before
    # bad input: a clear CLI error, not a traceback
    assert t3d(f"transfer {tmp_path}/absent --teacher-weights {weights} --out {tmp_path}/x {common}") == 2
    assert "data_dir" in capsys.readouterr().err
    assert t3d(f"{transfer} --batch-size 1 {common}") == 2
    assert "--batch-size" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_gloo_transfer_equals_gradient_accumulation(tmp_path):
    """torchrun, 2 processes x batch 2 == 1 process x batch 2 x 2 accumulation steps, bitwise on every parameter:
    each process draws its negatives among its own clips, exactly as each micro-batch does."""
    import sys

    from _synthetic_fixtures import torchrun

    from t3d.checkpoint import load_checkpoint
    from t3d.synthetic import make_synthetic

    data, weights = str(tmp_path / "syn"), str(tmp_path / "tiny2d.pth")
    make_synthetic(data, num_classes=2, train_per_class=4, test_per_class=1, frames=16, size=32)
    torch.save(tiny_teacher_2d().state_dict(), weights)
    args = f"transfer {data} --teacher-weights {weights} --teacher matching --format ucf101 --model t3d_tiny "
    args += "--backend reference "
    args += "--clip 16x32x32 --batch-size 2 --max-steps 2 --threads 1 --workers 0 --no-progress"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "t3d"]
    proc = torchrun([*cmd, *args.split(), "--out", str(tmp_path / "ddp")], env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "global batch 4 (2 process(es)" in proc.stdout
    assert t3d(f"{args} --accum-steps 2 --out {tmp_path}/accum") == 0
    # rank 0 alone writes
    assert sorted(os.listdir(tmp_path / "ddp")) == ["last.pt", "log.jsonl", "student.pt"]
    ddp_ckpt, accum_ckpt = (load_checkpoint(tmp_path / run / "last.pt") for run in ("ddp", "accum"))
    assert ddp_ckpt["step"] == accum_ckpt["step"] == 2 and ddp_ckpt["meta"]["world_size"] == 2
    ddp, accum = ddp_ckpt["model"], accum_ckpt["model"]
    params = [k for k, v in ddp.items() if v.is_floating_point() and "running_" not in k]
    assert any(k.startswith("head.") for k in params) and any(k.startswith("student.features") for k in params)
    for k in params:
        assert torch.equal(ddp[k], accum[k]), k
    # gradients flowed: the momentum buffers of the optimizer are non-zero
    momentum = [s["momentum_buffer"] for s in ddp_ckpt["optimizer"]["state"].values()]
    assert momentum and all(m.abs().sum() > 0 for m in momentum)
