"""2D -> 3D supervision transfer (T3D paper, Diba et al. 2017, section 3.2): ``t3d transfer``.

A frozen 2D DenseNet (the teacher, ImageNet weights from a file) and the T3D student look at the same stretch of
video: the teacher at its frames (each frame -> feature, averaged over the frames), the student at the clip. A
small head sees the concatenated (2D feature, 3D feature) and answers "same video at the same time?" (match) or
"different videos" (no match). Solving this with a frozen teacher forces the student to produce features that
carry what the teacher's features carry: the 2D net's knowledge moves into the 3D net without labels.

- Positive pair: the teacher's frames and the student's clip are the same clip of one video.
- Negative pair: the teacher's frames of another clip of a *different* video (never the same video), drawn afresh
  at every step; each step has exactly one positive and one negative per clip (balanced).
- Only the student and the head train; the teacher is in eval mode, has ``requires_grad=False``, runs under
  ``torch.no_grad()`` and is never given to the optimizer.

Training runs on :class:`t3d.training.Trainer` (progress bars, AMP, gradient accumulation, atomic checkpoints,
exact resume, DDP under torchrun). The student is exported as a file that ``t3d train --init`` fine-tunes.

Modules: :mod:`.teacher` (the frozen 2D net), :mod:`.matching` (head, trained module, negatives, step function),
:mod:`.videos` (unlabeled videos and their sources), :mod:`.export` (the student file), :mod:`.command` (the CLI).
"""

from .command import add_parser, build_transfer_dataset, run
from .export import EXPORT_FORMAT, export_from_checkpoint, export_student
from .matching import TransferHead, TransferModel, TransferStep, sample_negatives
from .teacher import IMAGENET_MEAN, IMAGENET_STD, TEACHERS, FrozenTeacher, build_teacher
from .videos import find_unlabeled_videos, video_ids, video_key

__all__ = [
    "EXPORT_FORMAT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TEACHERS",
    "FrozenTeacher",
    "TransferHead",
    "TransferModel",
    "TransferStep",
    "add_parser",
    "build_teacher",
    "build_transfer_dataset",
    "export_from_checkpoint",
    "export_student",
    "find_unlabeled_videos",
    "run",
    "sample_negatives",
    "video_ids",
    "video_key",
]
