"""Video data: synthetic generator, decoding (PyAV, JPEG folders), dataset layouts, clip sampling, transforms,
sampler, skipping of corrupt/empty/too-short videos, clear errors on bad arguments."""

from __future__ import annotations

import json
import os
import random
import sys
import warnings

import numpy as np
import pytest
import torch
from _synthetic_fixtures import make_dataset, write_motion_video

from t3d.cli import main as cli_main
from t3d.data import (
    ClipTransform,
    EpochSampler,
    SkippedSample,
    VideoDataset,
    VideoRecord,
    build_dataset,
    collate_clips,
    count_frames,
    detect_format,
    find_records,
    make_loader,
    read_frames,
)
from t3d.data.datasets import uniform_starts


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> str:
    return make_dataset(str(tmp_path_factory.mktemp("data") / "syn"))


# ---------------------------------------------------------------------------------------------- synthetic data
def test_make_synthetic_writes_ucf101_layout(tmp_path, capsys):
    root = str(tmp_path / "syn4")
    assert cli_main(["make-synthetic", root, "--classes", "4", "--train-per-class", "2", "--test-per-class", "1"]) == 0
    assert "wrote 8 train + 4 test videos" in capsys.readouterr().out
    lists = os.path.join(root, "ucfTrainTestlist")
    with open(os.path.join(lists, "classInd.txt")) as f:
        assert f.read().split() == ["1", "MoveRight", "2", "MoveLeft", "3", "MoveDown", "4", "MoveUp"]
    with open(os.path.join(lists, "trainlist01.txt")) as f:
        train = [line.split() for line in f]
    with open(os.path.join(lists, "testlist01.txt")) as f:
        test = [line.split() for line in f]
    assert len(train) == 8 and all(len(t) == 2 for t in train) and len(test) == 4 and all(len(t) == 1 for t in test)
    assert {t[0] for t in train}.isdisjoint({t[0] for t in test})
    for rel, label in train:
        cls = rel.split("/")[0]
        assert ["MoveRight", "MoveLeft", "MoveDown", "MoveUp"][int(label) - 1] == cls
        assert os.path.isfile(os.path.join(root, rel)) and count_frames(os.path.join(root, rel)) == 20
    assert json.load(open(os.path.join(root, "t3d_dataset.json")))["hflip"] is False
    assert detect_format(root) == "ucf101"
    # refuses to write into a non-empty directory
    assert cli_main(["make-synthetic", root]) == 2
    assert "not an empty directory" in capsys.readouterr().err


def test_missing_optional_dependency_is_a_clear_error(tmp_path, capsys, monkeypatch):
    # PyAV absent (None in sys.modules makes `import av` fail as if it were not installed): exit 2, and the message
    # names the package and the extra that installs it, instead of a traceback
    monkeypatch.setitem(sys.modules, "av", None)
    assert cli_main(["make-synthetic", str(tmp_path / "syn")]) == 2
    err = capsys.readouterr().err
    assert "t3d make-synthetic: error: this command needs the optional package 'av'" in err
    assert "pip install 't3d-kernels[video]'" in err


def test_cli_optional_package_map_matches_pyproject_extras():
    """t3d.cli.OPTIONAL (the extra its error message names) says what pyproject.toml's extras install."""
    import ast
    import re

    from t3d.cli import OPTIONAL

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml")) as f:  # tomllib is 3.11+; the extras are one-line lists
        table = f.read().split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    extras = {m[1]: ast.literal_eval(m[2]) for m in re.finditer(r"^(\w+) = (\[.*\])$", table, re.M)}
    for package, extra in OPTIONAL.items():
        names = {re.split(r"[<>=!~\[ ]", req, maxsplit=1)[0] for req in extras[extra]}
        assert package in names, f"OPTIONAL[{package!r}] = {extra!r}, but extra {extra!r} is {extras[extra]}"


def test_synthetic_twins_are_time_reversed(synthetic):
    """Every MoveLeft video is the time reversal of a MoveRight one: a frame-order-blind model cannot separate them."""
    right = os.path.join(synthetic, "MoveRight", "v_MoveRight_g01_c01.avi")
    left = os.path.join(synthetic, "MoveLeft", "v_MoveLeft_g01_c01.avi")
    a = read_frames(right, list(range(20))).astype(np.float32)
    b = read_frames(left, list(range(20))).astype(np.float32)
    assert np.abs(a - b[::-1]).mean() < 3.0  # equal up to the codec's loss
    assert np.abs(a - b).mean() > 3 * np.abs(a - b[::-1]).mean()  # and not simply equal


def test_decode_matches_written_frames(tmp_path):
    video = write_motion_video(str(tmp_path / "v.avi"), frames=18, size=40, seed=3)
    assert count_frames(str(tmp_path / "v.avi")) == 18
    frames = read_frames(str(tmp_path / "v.avi"), [5, 0, 17, 5])
    assert frames.shape == (4, 40, 40, 3) and frames.dtype == np.uint8
    for got, i in zip(frames, [5, 0, 17, 5], strict=True):
        assert np.abs(got.astype(np.float32) - video[i].astype(np.float32)).mean() < 6.0  # mpeg4 is lossy


def test_jpeg_frame_folders(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        for v in range(2):
            d = tmp_path / "frames" / cls / f"video{v}"
            d.mkdir(parents=True)
            for t in range(17):
                Image.fromarray(rng.integers(0, 255, (36, 48, 3), dtype=np.uint8)).save(d / f"img_{t + 1:05d}.jpg")
    root = str(tmp_path / "frames")
    assert detect_format(root) == "folder"
    ds = build_dataset(root, split="all", clip_len=16, transform=ClipTransform((32, 32), train=True))
    assert ds.classes == ["a", "b"] and len(ds) == 4
    sample = ds[(1, 123)]
    assert sample["clip"].shape == (3, 16, 32, 32) and sample["label"] == 0
    assert torch.equal(sample["clip"], ds[(1, 123)]["clip"])  # same seed, same clip and crop


# ---------------------------------------------------------------------------------------------- layouts
def _touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").close()


def test_hmdb51_split_files(tmp_path):
    root = tmp_path / "hmdb"
    for cls in ("brush_hair", "cartwheel"):
        lines = []
        for i, tag in enumerate(["1", "1", "2", "0"]):
            name = f"{cls}_{i}.avi"
            _touch(str(root / cls / name))
            lines.append(f"{name} {tag} \n")
        (root / "testTrainMulti_7030_splits").mkdir(exist_ok=True)
        (root / "testTrainMulti_7030_splits" / f"{cls}_test_split1.txt").write_text("".join(lines))
    assert detect_format(str(root)) == "hmdb51"
    train, classes = find_records(str(root), "hmdb51", "train", 1)
    test, _ = find_records(str(root), "hmdb51", "test", 1)
    assert classes == ["brush_hair", "cartwheel"]
    assert sorted(os.path.basename(r.path) for r in train) == [
        "brush_hair_0.avi",
        "brush_hair_1.avi",
        "cartwheel_0.avi",
        "cartwheel_1.avi",
    ]
    assert [(os.path.basename(r.path), r.label) for r in test] == [("brush_hair_2.avi", 0), ("cartwheel_2.avi", 1)]
    with pytest.raises(ValueError, match="--split: expected one of"):
        find_records(str(root), "hmdb51", "validation", 1)
    with pytest.raises(ValueError, match="--fold: expected an official split number 1..3, got 4"):
        find_records(str(root), "hmdb51", "train", 4)
    with pytest.raises(FileNotFoundError, match="_test_split2"):
        find_records(str(root), "hmdb51", "train", 2)


def test_kinetics_csv(tmp_path, capsys):
    root = tmp_path / "kinetics"
    rows = {
        "train": [("abseiling", "aaa", 10, 20), ("zumba", "bbb", 0, 10), ("abseiling", "ccc", 5, 15)],
        "val": [("zumba", "ddd", 3, 13), ("zumba", "missing", 0, 10)],
    }
    (root / "annotations").mkdir(parents=True)
    for split, rs in rows.items():
        text = "label,youtube_id,time_start,time_end,split\n"
        for label, yid, s, e in rs:
            text += f"{label},{yid},{s},{e},{split}\n"
            if yid != "missing":
                _touch(str(root / split / label / f"{yid}_{s:06d}_{e:06d}.mp4"))
        (root / "annotations" / f"{split}.csv").write_text(text)
    assert detect_format(str(root)) == "kinetics"
    train, classes = find_records(str(root), "kinetics", "train")
    assert classes == ["abseiling", "zumba"] and len(train) == 3
    capsys.readouterr()
    val, classes_val = find_records(str(root), "kinetics", "val")
    assert "1 videos of split 'val' listed but missing" in capsys.readouterr().err
    assert classes_val == classes
    assert [(os.path.basename(r.path), r.label) for r in val] == [("ddd_000003_000013.mp4", 1)]


def test_bad_arguments_give_clear_errors(synthetic, tmp_path):
    with pytest.raises(FileNotFoundError, match="data_dir: expected a dataset directory, got .*no such directory"):
        build_dataset(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"--split: expected one of \['train', 'test'\], got 'validation'"):
        build_dataset(synthetic, split="validation")
    with pytest.raises(ValueError, match="--format: expected one of"):
        build_dataset(synthetic, format="youtube8m")
    with pytest.raises(FileNotFoundError, match="trainlist02"):
        build_dataset(synthetic, fold=2)
    with pytest.raises(
        ValueError,
        match="--clip: a clip of 32 frames at stride 1 spans 32 frames, longer than the "
        r"videos \(longest of .* probed: 20 frames\)",
    ):
        build_dataset(synthetic, clip_len=32)
    with pytest.raises(ValueError, match="spans 39 frames"):
        build_dataset(synthetic, clip_len=20, frame_stride=2)


# ---------------------------------------------------------------------------------------------- sampling
def test_test_mode_uniform_clips(synthetic):
    transform = ClipTransform((32, 32), train=False)
    ds = build_dataset(synthetic, split="test", clip_len=16, num_clips=3, transform=transform)
    assert ds.mode == "test"
    sample = ds[0]
    assert sample["clip"].shape == (3, 3, 16, 32, 32)
    assert torch.equal(sample["clip"], ds[(0, 999)]["clip"])  # no randomness at test time
    # starts from the first to the last possible frame, symmetric in time (a reversed video gives reversed clips)
    assert uniform_starts(20, 16, 3) == [0, 2, 4] and uniform_starts(20, 16, 1) == [2]
    assert uniform_starts(31, 16, 4) == [0, 5, 10, 15]


def test_train_clips_depend_only_on_sample_seed(synthetic):
    ds = build_dataset(synthetic, split="train", clip_len=16, transform=ClipTransform((32, 32), hflip=True))
    a, b, c = ds[(3, 11)]["clip"], ds[(3, 11)]["clip"], ds[(3, 12)]["clip"]
    assert a.shape == (3, 16, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)


def test_clip_transform():
    frames = np.random.default_rng(0).integers(0, 255, (16, 48, 64, 3), dtype=np.uint8)
    t = ClipTransform((32, 32), resize=40, train=False, mean=(0, 0, 0), std=(1, 1, 1))
    out = t(frames)
    assert out.shape == (3, 16, 32, 32) and out.dtype == torch.float32
    assert 0 <= float(out.min()) and float(out.max()) <= 1
    # training with hflip: each draw is the (only possible) 40x40 crop or its mirror, and both occur
    t_train = ClipTransform((40, 40), resize=40, train=True, hflip=True, mean=(0, 0, 0), std=(1, 1, 1))
    base = torch.from_numpy(frames[:, :40, :40]).permute(3, 0, 1, 2).float() / 255
    draws = [t_train(frames[:, :40, :40], random.Random(s)) for s in range(20)]
    kinds = {"plain" if torch.allclose(d, base) else "flip" if torch.allclose(d, base.flip(-1)) else "?" for d in draws}
    assert kinds == {"plain", "flip"}
    with pytest.raises(ValueError, match="resize: expected a short side >= the crop"):
        ClipTransform((32, 32), resize=30)


def test_epoch_sampler_order_resume_and_shards():
    s = EpochSampler(23, batch_size=3, seed=5)
    assert s.batches_per_epoch == 7
    s.set_epoch(0)
    e0 = list(s)
    assert len(e0) == 21 == len(s) and len({i for i, _ in e0}) == 21
    s.set_epoch(0)
    assert list(s) == e0  # deterministic
    s.set_epoch(1)
    assert [i for i, _ in s] != [i for i, _ in e0]
    s.set_epoch(0, start_batch=4)
    assert list(s) == e0[12:] and len(s) == 9  # resume mid-epoch: the remaining batches, same seeds
    # 2 processes with batch 3 see exactly the global batches of 1 process with batch 6
    single = EpochSampler(23, batch_size=6, seed=5)
    single.set_epoch(2)
    ranks = [EpochSampler(23, batch_size=3, seed=5, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.set_epoch(2)
    a, b = list(ranks[0]), list(ranks[1])
    merged = [x for j in range(single.batches_per_epoch) for x in a[3 * j : 3 * j + 3] + b[3 * j : 3 * j + 3]]
    assert merged == list(single)
    with pytest.raises(ValueError, match="global batch .* is larger than the dataset"):
        EpochSampler(5, batch_size=3, world_size=2)


# ---------------------------------------------------------------------------------------------- bad videos
def _dataset_with_bad_videos(tmp_path) -> str:
    root = tmp_path / "mixed"
    for cls in ("a", "b"):
        for v in range(3):
            write_motion_video(str(root / cls / f"good{v}.avi"), frames=20, seed=v + (10 if cls == "b" else 0))
    (root / "a" / "empty.avi").write_bytes(b"")
    (root / "b" / "corrupt.mp4").write_bytes(os.urandom(2048))
    write_motion_video(str(root / "b" / "short.avi"), frames=8, seed=99)
    return str(root)


def test_corrupt_empty_and_short_videos_are_skipped_and_counted(tmp_path, capfd):
    root = _dataset_with_bad_videos(tmp_path)
    ds = build_dataset(root, split="all", clip_len=16, transform=ClipTransform((32, 32)))
    assert len(ds) == 9
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = [ds[i] for i in range(len(ds))]
    skipped = [s for s in samples if isinstance(s, SkippedSample)]
    assert sorted(os.path.basename(s.path) for s in skipped) == ["corrupt.mp4", "empty.avi", "short.avi"]
    assert "a clip needs 16" in next(s.reason for s in skipped if s.path.endswith("short.avi"))
    # one clean line per skipped video on stderr, not a Python warning with its source line
    assert not [w for w in caught if "skipping" in str(w.message)]
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 3 and all(line.startswith("skipping video ") for line in lines), lines
    named = {os.path.basename(line.split(":")[0].split()[-1]) for line in lines}
    assert named == {"corrupt.mp4", "empty.avi", "short.avi"}
    # through a DataLoader with workers: the collate function drops and counts them, nothing crashes
    sampler = EpochSampler(len(ds), batch_size=3, seed=0)
    loader = make_loader(ds, 3, sampler=sampler, workers=2, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(loader)
    assert sum(b["skipped"] for b in batches) == 3 and sum(b["count"] for b in batches) == 6
    assert all(b["clips"] is None or b["clips"].shape[0] == b["count"] for b in batches)


def test_collate_all_skipped():
    out = collate_clips([SkippedSample("x", "bad"), SkippedSample("y", "bad")])
    assert out["clips"] is None and out["count"] == 0 and out["skipped"] == 2 and out["labels"].shape == (0,)


def test_video_dataset_argument_checks():
    with pytest.raises(ValueError, match="mode: expected 'train' or 'test'"):
        VideoDataset([VideoRecord("x.avi", 0)], ["a"], mode="val")
    with pytest.raises(ValueError, match="records: expected at least one video"):
        VideoDataset([], ["a"])
