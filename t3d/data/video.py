"""Reading frames: video files through PyAV, or folders of JPEG/PNG frames (one image per frame, sorted by name).

Frames come back as uint8 arrays (T, H, W, 3) in RGB. Every failure (unreadable container, no video stream, no
frame, fewer frames than asked) is a :class:`VideoReadError`, so datasets can skip the video and count it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

__all__ = [
    "VIDEO_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "VideoReadError",
    "VideoTooShort",
    "is_video_path",
    "count_frames",
    "read_frames",
    "write_video",
]

VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".webm", ".mov", ".mpg", ".mpeg", ".m4v", ".flv")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class VideoReadError(RuntimeError):
    """A video (file or frame folder) could not be read."""


class VideoTooShort(VideoReadError):
    """The video has fewer frames than a clip needs; ``num_frames`` is what it really has."""

    def __init__(self, message: str, num_frames: int) -> None:
        super().__init__(message)
        self.num_frames = num_frames


def _frame_files(path: str) -> list[str]:
    return sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))


def is_video_path(path: str) -> bool:
    """A video file (by extension) or a directory holding image frames."""
    if os.path.isdir(path):
        return any(f.lower().endswith(IMAGE_EXTENSIONS) for f in os.listdir(path))
    return path.lower().endswith(VIDEO_EXTENSIONS)


def count_frames(path: str) -> int:
    """Number of frames: images in a frame folder, else the container's frame count (decoding to count when the
    container does not say). Raises :class:`VideoReadError`."""
    if os.path.isdir(path):
        return len(_frame_files(path))
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoReadError(f"{path}: no video stream")
            stream = container.streams.video[0]
            if stream.frames and stream.frames > 0:
                return int(stream.frames)
            return sum(1 for _ in container.decode(stream))
    except VideoReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - PyAV/FFmpeg raise many error types for broken files
        raise VideoReadError(f"{path}: cannot read video ({type(exc).__name__}: {exc})") from exc


def read_frames(path: str, indices: Sequence[int]) -> np.ndarray:
    """Frames at ``indices`` (any order, repeats allowed) as uint8 (len(indices), H, W, 3) RGB.

    Video files are decoded sequentially up to the largest index (clips are short and start anywhere; seeking in
    the codecs of UCF101/HMDB51 is not frame-exact). Raises :class:`VideoTooShort` when the video ends before the
    largest index, :class:`VideoReadError` on any other failure.
    """
    if len(indices) == 0:
        raise ValueError("indices: expected at least one frame index, got none")
    if min(indices) < 0:
        raise ValueError(f"indices: expected frame indices >= 0, got {min(indices)}")
    wanted = sorted(set(int(i) for i in indices))
    last = wanted[-1]
    if os.path.isdir(path):
        files = _frame_files(path)
        if last >= len(files):
            raise VideoTooShort(f"{path}: {len(files)} frames, frame {last} needed", len(files))
        from PIL import Image

        frames = {}
        for i in wanted:
            try:
                with Image.open(os.path.join(path, files[i])) as im:
                    frames[i] = np.asarray(im.convert("RGB"))
            except Exception as exc:  # noqa: BLE001
                raise VideoReadError(f"{path}: cannot read frame {files[i]} ({exc})") from exc
    else:
        import av

        frames = {}
        wanted_set = set(wanted)
        decoded = 0
        try:
            with av.open(path) as container:
                if not container.streams.video:
                    raise VideoReadError(f"{path}: no video stream")
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                for i, frame in enumerate(container.decode(stream)):
                    decoded = i + 1
                    if i in wanted_set:
                        frames[i] = frame.to_ndarray(format="rgb24")
                    if i >= last:
                        break
        except VideoReadError:
            raise
        except Exception as exc:  # noqa: BLE001 - PyAV/FFmpeg raise many error types for broken files
            raise VideoReadError(f"{path}: cannot decode video ({type(exc).__name__}: {exc})") from exc
        if decoded == 0:
            raise VideoReadError(f"{path}: no decodable frame")
        if last not in frames:
            raise VideoTooShort(f"{path}: {decoded} frames decoded, frame {last} needed", decoded)
    shapes = {f.shape for f in frames.values()}
    if len(shapes) != 1:
        raise VideoReadError(f"{path}: frames of different sizes {sorted(shapes)}")
    return np.stack([frames[int(i)] for i in indices])


def write_video(path: str, frames: np.ndarray, fps: int = 25, codec: str = "mpeg4", bit_rate: int = 4_000_000) -> None:
    """Write uint8 RGB frames (T, H, W, 3) (H, W even) as a video file with PyAV (mpeg4 in .avi, as UCF101)."""
    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames: expected uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"frames: expected even height and width (yuv420p), got {h}x{w}")
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.bit_rate = bit_rate
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
