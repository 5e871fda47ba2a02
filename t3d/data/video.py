"""Reading frames: video files through PyAV, or folders of JPEG/PNG frames (one image per frame, sorted by name).

Frames come back as uint8 arrays (T, H, W, 3) in RGB. Every failure (unreadable container, no video stream, no
frame, fewer frames than asked) is a :class:`VideoReadError`, so datasets can skip the video and count it.

Decoding a clip of a video file (:func:`read_frames`): the stream's packets are indexed once per process (a demux
pass, no decoding: presentation timestamps and keyframes, cached per file), then the decoder seeks to the keyframe
at or before the clip's first frame and decodes only up to its last; frames are matched by their timestamps, so the
result is frame-exact. Streams whose timestamps cannot be trusted (missing or repeated timestamps, leading frames
before the first keyframe, or a decoder that does not return the frames the index announces) are decoded
sequentially from the start. FFmpeg converts to RGB and resizes to the requested short side in one step.
"""

from __future__ import annotations

import bisect
import functools
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "VIDEO_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "VideoReadError",
    "VideoTooShort",
    "FrameIndex",
    "frame_index",
    "is_video_path",
    "count_frames",
    "video_fps",
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
    """Number of frames: images in a frame folder, else the frames of the (cached) packet index when its timestamps
    are trustworthy, else the container's frame count (decoding to count when the container does not say).
    Raises :class:`VideoReadError`."""
    if os.path.isdir(path):
        return len(_frame_files(path))
    index = frame_index(path)
    if index.trusted:
        return len(index.pts)
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


def video_fps(path: str) -> float | None:
    """Frames per second of a video file (the stream's average rate, else FFmpeg's guess); None for a frame folder
    or a stream that states no rate. Raises :class:`VideoReadError`."""
    if os.path.isdir(path):
        return None
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoReadError(f"{path}: no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
    except VideoReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - PyAV/FFmpeg raise many error types for broken files
        raise VideoReadError(f"{path}: cannot read video ({type(exc).__name__}: {exc})") from exc
    return float(rate) if rate else None


def _frame_size(height: int, width: int, short_side: int | None) -> tuple[int, int]:
    """(H, W) with min(H, W) == short_side and the aspect kept (as :func:`t3d.data.transforms.resize_short_side`)."""
    if short_side is None or min(height, width) == short_side:
        return height, width
    scale = short_side / min(height, width)
    return max(short_side, round(height * scale)), max(short_side, round(width * scale))


@dataclass(frozen=True)
class FrameIndex:
    """What one demux pass tells about a video stream: ``pts[i]`` is the presentation timestamp of frame ``i``
    (display order), ``keyframes`` the sorted frame numbers of the keyframes (seek points), ``trusted`` whether the
    timestamps identify the frames (see the module docstring), ``reason`` why not."""

    pts: tuple[int, ...]
    keyframes: tuple[int, ...]
    trusted: bool
    reason: str = ""

    @functools.cached_property
    def frame_of(self) -> dict[int, int]:
        """Frame number of each presentation timestamp."""
        return {pts: i for i, pts in enumerate(self.pts)}

    def keyframe_at_or_before(self, frame: int) -> int:
        return self.keyframes[bisect.bisect_right(self.keyframes, frame) - 1]


def _build_index(container, stream) -> FrameIndex:
    packets = [(p.pts, p.is_keyframe) for p in container.demux(stream) if p.size and not p.is_discard]
    if not packets:
        return FrameIndex((), (), False, "no packet")
    if any(pts is None for pts, _ in packets):
        return FrameIndex((), (), False, "packets without timestamps")
    if not packets[0][1]:
        return FrameIndex((), (), False, "the stream does not start with a keyframe")
    order = sorted(range(len(packets)), key=lambda i: packets[i][0])
    pts = tuple(packets[i][0] for i in order)
    if any(a == b for a, b in zip(pts, pts[1:])):
        return FrameIndex(pts, (), False, "repeated timestamps")
    if pts[0] != packets[0][0]:
        # frames shown before the first keyframe (open GOP): a sequential decoder drops them
        return FrameIndex(pts, (), False, "frames before the first keyframe")
    keyframes = tuple(rank for rank, i in enumerate(order) if packets[i][1])
    return FrameIndex(pts, keyframes, True)


# Opening a container runs FFmpeg's stream probe, which for H.264 decodes several frames (to guess the decoder's
# reorder delay) that the read then decodes again: ~12 ms of CPU per open of a 720p stream, a tenth of a clip's
# cost. The index pass and the seeking decoder skip it (a 32-byte probe): they take the codec parameters from the
# container header, and every decoded frame's timestamp is checked against the index, so a stream the short probe
# misdescribes falls back to the sequential decoder, which opens with the full probe. Only for containers that
# declare their streams in a header (others, e.g. MPEG-PS, find their streams while probing).
_SHORT_PROBE = {"probesize": "32", "analyzeduration": "0"}
_HEADER_FORMATS = frozenset({"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi"})


def _open_probed_briefly(path: str):
    """``av.open(path)`` without the decoding stream probe when the container format allows it (see above)."""
    import av

    container = av.open(path, options=_SHORT_PROBE)
    if container.format.name in _HEADER_FORMATS and container.streams.video:
        return container
    container.close()
    return av.open(path)


# per process (each DataLoader worker has its own): a dataset reads several clips of the same files
_INDEX_CACHE: OrderedDict[tuple[str, int, int], FrameIndex] = OrderedDict()
_INDEX_CACHE_SIZE = 256


def _cache_key(path: str) -> tuple[str, int, int]:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise VideoReadError(f"{path}: cannot read video ({exc})") from exc
    return os.path.abspath(path), st.st_mtime_ns, st.st_size


def frame_index(path: str) -> FrameIndex:
    """The (cached) :class:`FrameIndex` of the first video stream of ``path``. Raises :class:`VideoReadError`."""
    key = _cache_key(path)
    index = _INDEX_CACHE.get(key)
    if index is not None:
        _INDEX_CACHE.move_to_end(key)
        return index
    try:
        with _open_probed_briefly(path) as container:
            if not container.streams.video:
                raise VideoReadError(f"{path}: no video stream")
            index = _build_index(container, container.streams.video[0])
    except VideoReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - PyAV/FFmpeg raise many error types for broken files
        raise VideoReadError(f"{path}: cannot read video ({type(exc).__name__}: {exc})") from exc
    _INDEX_CACHE[key] = index
    if len(_INDEX_CACHE) > _INDEX_CACHE_SIZE:
        _INDEX_CACHE.popitem(last=False)
    return index


class _Untrusted(Exception):
    """The decoder did not return the frames the index announced: decode sequentially instead."""


def _to_rgb(frame, short_side: int | None) -> np.ndarray:
    h, w = _frame_size(frame.height, frame.width, short_side)
    if (h, w) == (frame.height, frame.width):
        return frame.to_ndarray(format="rgb24")
    # one swscale pass: YUV -> RGB and the resize (bilinear, its support widened when shrinking: antialiased)
    return frame.to_ndarray(format="rgb24", width=w, height=h, interpolation="BILINEAR")


def _decoded_frames(container, stream, wanted_pts: set[int]):
    """The decoder's frames from the demuxer's position on. A packet that holds no wanted frame is decoded with
    ``skip_frame = NONREF``: the decoder drops it if no other frame is predicted from it (B-frames that are not
    references), so every frame it does return is the same as in a full decode."""
    codec = stream.codec_context
    for packet in container.demux(stream):
        codec.skip_frame = "DEFAULT" if packet.pts in wanted_pts else "NONREF"
        yield from codec.decode(packet)


def _decode_seeking(container, stream, index: FrameIndex, wanted: list[int], short_side: int | None) -> dict:
    """Frames ``wanted`` (sorted, unique, < len(index.pts)) by seeking to keyframes; raises :class:`_Untrusted`."""
    frames: dict[int, np.ndarray] = {}
    frame_of = index.frame_of
    wanted_pts = {index.pts[i] for i in wanted}
    pos = 0  # next entry of `wanted` still to decode
    while pos < len(wanted):
        key = index.keyframe_at_or_before(wanted[pos])
        container.seek(index.pts[key], stream=stream, backward=True, any_frame=False)
        last = key - 1  # the frame number of the last frame decoded since the seek
        for frame in _decoded_frames(container, stream, wanted_pts):
            if frame.pts is None:
                raise _Untrusted("decoded frame without a timestamp")
            number = frame_of.get(frame.pts)
            if number is None:
                raise _Untrusted(f"decoded timestamp {frame.pts} is not in the index")
            if number < key:  # the demuxer landed earlier, or leading frames of an open GOP
                continue
            # frames not wanted may be missing (skipped non-reference frames), the others come in display order
            if number <= last or number > wanted[pos]:
                raise _Untrusted(f"decoded frame {number} after frame {last}, index expected frame {wanted[pos]}")
            if frame.is_corrupt:
                raise _Untrusted(f"frame {number} decoded as corrupt after seeking")
            last = number
            if number < wanted[pos]:
                continue
            frames[number] = _to_rgb(frame, short_side)
            pos += 1
            # done, or a keyframe lies between here and the next wanted frame: seeking skips the frames between
            if pos == len(wanted) or index.keyframe_at_or_before(wanted[pos]) > number + 1:
                break
        else:
            raise _Untrusted(f"the stream ended at frame {last}, before frame {wanted[pos]}")
    return frames


def _decode_sequential(container, stream, wanted: list[int], short_side: int | None) -> tuple[dict, int]:
    """Frames ``wanted`` (sorted, unique) decoding from the start; also returns how many frames were decoded."""
    frames: dict[int, np.ndarray] = {}
    wanted_set, last, decoded = set(wanted), wanted[-1], 0
    for i, frame in enumerate(container.decode(stream)):
        decoded = i + 1
        if i in wanted_set:
            frames[i] = _to_rgb(frame, short_side)
        if i >= last:
            break
    return frames, decoded


def _open_stream(container, path: str, threads: int):
    if not container.streams.video:
        raise VideoReadError(f"{path}: no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    stream.codec_context.thread_count = threads
    return stream


def _read_video_file(path: str, wanted: list[int], short_side: int | None, decode: str, threads: int) -> dict:
    import av

    index = frame_index(path) if decode != "sequential" else None
    if index is not None and decode == "seek" and not index.trusted:
        raise VideoReadError(f"{path}: cannot seek frame-exactly ({index.reason})")
    if index is not None and index.trusted and wanted[-1] >= len(index.pts):
        n = len(index.pts)
        raise VideoTooShort(f"{path}: {n} frames, frame {wanted[-1]} needed", n)
    try:
        if index is not None and index.trusted:
            with _open_probed_briefly(path) as container:
                try:
                    return _decode_seeking(container, _open_stream(container, path, threads), index, wanted, short_side)
                except _Untrusted as exc:
                    if decode == "seek":
                        raise VideoReadError(f"{path}: cannot seek frame-exactly ({exc})") from None
                    # remembered: the next clips of this file go straight to sequential decoding
                    _INDEX_CACHE[_cache_key(path)] = FrameIndex(index.pts, index.keyframes, False, str(exc))
        # a fresh container: no decoder or demuxer state left from seeking
        with av.open(path) as container:
            frames, decoded = _decode_sequential(container, _open_stream(container, path, threads), wanted, short_side)
    except VideoReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - PyAV/FFmpeg raise many error types for broken files
        raise VideoReadError(f"{path}: cannot decode video ({type(exc).__name__}: {exc})") from exc
    if decoded == 0:
        raise VideoReadError(f"{path}: no decodable frame")
    if wanted[-1] not in frames:
        raise VideoTooShort(f"{path}: {decoded} frames decoded, frame {wanted[-1]} needed", decoded)
    return frames


def _read_frame_folder(path: str, wanted: list[int], short_side: int | None) -> dict:
    files = _frame_files(path)
    if wanted[-1] >= len(files):
        raise VideoTooShort(f"{path}: {len(files)} frames, frame {wanted[-1]} needed", len(files))
    from PIL import Image

    frames = {}
    for i in wanted:
        try:
            with Image.open(os.path.join(path, files[i])) as im:
                im = im.convert("RGB")
                h, w = _frame_size(im.height, im.width, short_side)
                if (h, w) != (im.height, im.width):
                    im = im.resize((w, h), Image.Resampling.BILINEAR)
                frames[i] = np.asarray(im)
        except Exception as exc:  # noqa: BLE001
            raise VideoReadError(f"{path}: cannot read frame {files[i]} ({exc})") from exc
    return frames


def read_frames(
    path: str,
    indices: Sequence[int],
    short_side: int | None = None,
    *,
    decode: str = "auto",
    threads: int = 0,
) -> np.ndarray:
    """Frames at ``indices`` (any order, repeats allowed) as uint8 (len(indices), H, W, 3) RGB.

    Args:
        path: a video file or a folder of image frames.
        indices: frame numbers (0-based, display order).
        short_side: resize (bilinear, antialiased) so that min(H, W) == short_side, in FFmpeg's conversion to RGB
            (or PIL's for frame folders); None keeps the stored size.
        decode: "auto" (seek to keyframes when the timestamps are trustworthy, else sequential), "seek" (a
            :class:`VideoReadError` instead of the sequential fallback) or "sequential" (from the first frame).
        threads: FFmpeg decoder threads (0: FFmpeg's choice).

    Raises :class:`VideoTooShort` when the video ends before the largest index, :class:`VideoReadError` on any
    other failure.
    """
    if len(indices) == 0:
        raise ValueError("indices: expected at least one frame index, got none")
    if min(indices) < 0:
        raise ValueError(f"indices: expected frame indices >= 0, got {min(indices)}")
    if decode not in ("auto", "seek", "sequential"):
        raise ValueError(f"decode: expected 'auto', 'seek' or 'sequential', got {decode!r}")
    if short_side is not None and short_side < 1:
        raise ValueError(f"short_side: expected a positive size or None, got {short_side}")
    wanted = sorted(set(int(i) for i in indices))
    if os.path.isdir(path):
        frames = _read_frame_folder(path, wanted, short_side)
    else:
        frames = _read_video_file(path, wanted, short_side, decode, threads)
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
