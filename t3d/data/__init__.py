"""Video data for training and evaluation: datasets (UCF101, HMDB51, Kinetics, class folders), PyAV / JPEG-folder
decoding, clip sampling, tensor transforms, a resumable distributed sampler and a DataLoader that skips bad videos.

Typical use::

    from t3d.data import ClipTransform, EpochSampler, build_dataset, make_loader

    ds = build_dataset("UCF101", split="train", fold=1, clip_len=16, transform=ClipTransform((112, 112)))
    sampler = EpochSampler(len(ds), batch_size=8, seed=0)
    loader = make_loader(ds, 8, sampler=sampler, workers=4, seed=0)
    for batch in loader:   # {"clips": (8, 3, 16, 112, 112), "labels": (8,), "count", "skipped", ...}
        ...
"""

from .datasets import (
    FORMATS,
    SkippedSample,
    VideoDataset,
    VideoRecord,
    build_dataset,
    dataset_hints,
    detect_format,
    find_records,
)
from .loader import collate_clips, make_loader, seed_worker
from .sampler import EpochSampler, sample_seed
from .transforms import IMAGENET_MEAN, IMAGENET_STD, ClipTransform
from .video import VideoReadError, VideoTooShort, count_frames, read_frames, write_video

__all__ = [
    "FORMATS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ClipTransform",
    "EpochSampler",
    "SkippedSample",
    "VideoDataset",
    "VideoReadError",
    "VideoRecord",
    "VideoTooShort",
    "build_dataset",
    "collate_clips",
    "count_frames",
    "dataset_hints",
    "detect_format",
    "find_records",
    "make_loader",
    "read_frames",
    "sample_seed",
    "seed_worker",
    "write_video",
]
