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

Training runs on :class:`t3d.train.Trainer` (progress bars, AMP, gradient accumulation, atomic checkpoints, exact
resume, DDP under torchrun). The student is exported as a file that ``t3d train --init`` fine-tunes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_checkpoint, save_checkpoint
from .inflate import check_state_matches, densenet2d_like, normalize_densenet2d_state, read_densenet2d_state
from .models import T3D, DenseNet2d, densenet121
from .train import StepOutput, add_optimization_args

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TEACHERS",
    "EXPORT_FORMAT",
    "FrozenTeacher",
    "TransferHead",
    "TransferModel",
    "TransferStep",
    "build_teacher",
    "sample_negatives",
    "export_student",
    "export_from_checkpoint",
]

# what the torchvision ImageNet weights expect: RGB in [0, 1], normalised per channel with these
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

EXPORT_FORMAT = "t3d-transfer-student"


def _densenet169() -> DenseNet2d:
    return DenseNet2d((6, 12, 32, 32))


# teacher architectures; "auto" is the 2D twin of the student (DenseNet-121 for T3D-121, the tiny one for t3d_tiny)
TEACHERS: dict[str, Callable[[], DenseNet2d]] = {"densenet121": densenet121, "densenet169": _densenet169}


class FrozenTeacher(nn.Module):
    """The frozen 2D teacher: clip (N, 3, T, H, W) -> frame features averaged over the frames (N, F).

    Args:
        model2d: a 2D DenseNet with ImageNet weights (``forward_features`` -> (N, F)).
        input_mean, input_std: the per-channel normalisation the clips arrive with. The teacher undoes it and
            applies ImageNet's (RGB in [0, 1], :data:`IMAGENET_MEAN`/:data:`IMAGENET_STD`); the default assumes
            the clips already use ImageNet's normalisation.
        frames: use this many frames, evenly spaced over the clip (None: every frame, as in the paper).
        chunk: at most this many frames per teacher forward (bounds memory at large clips and batches).

    The module stays in eval mode whatever ``.train()`` is called with; its parameters never require grad.
    """

    def __init__(
        self,
        model2d: DenseNet2d,
        input_mean: Sequence[float] = IMAGENET_MEAN,
        input_std: Sequence[float] = IMAGENET_STD,
        frames: int | None = None,
        chunk: int = 256,
    ) -> None:
        super().__init__()
        if frames is not None and frames < 1:
            raise ValueError(f"frames: expected None (all frames) or an integer >= 1, got {frames}")
        if chunk < 1:
            raise ValueError(f"chunk: expected an integer >= 1, got {chunk}")
        self.model = model2d
        self.model.requires_grad_(False)
        self.frames, self.chunk = frames, chunk
        self.feature_dim = model2d.num_features
        in_mean, in_std = torch.tensor(input_mean), torch.tensor(input_std)
        im_mean, im_std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        # x_imagenet = (x * in_std + in_mean - im_mean) / im_std = x * scale + shift
        self.register_buffer("scale", (in_std / im_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((in_mean - im_mean) / im_std).view(1, 3, 1, 1), persistent=False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        # frozen: BN uses the ImageNet running statistics and never updates them
        return super().train(False)

    def frame_indices(self, num_frames: int) -> torch.Tensor:
        """The frames of a T-frame clip the teacher sees: all of them, or ``frames`` evenly spaced."""
        if self.frames is None or self.frames >= num_frames:
            return torch.arange(num_frames)
        return torch.linspace(0, num_frames - 1, self.frames).round().long()

    @torch.no_grad()
    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """clips: (N, 3, T, H, W), normalised with ``input_mean``/``input_std`` -> (N, F) float32."""
        if clips.dim() != 5 or clips.shape[1] != 3:
            raise ValueError(f"clips: expected (N, 3, T, H, W), got shape {tuple(clips.shape)}")
        n, _, t, h, w = clips.shape
        idx = self.frame_indices(t).to(clips.device)
        frames = clips.index_select(2, idx).transpose(1, 2).reshape(-1, 3, h, w)
        frames = frames * self.scale.to(frames.dtype) + self.shift.to(frames.dtype)
        feats = torch.cat([self.model.forward_features(part) for part in frames.split(self.chunk)])
        return feats.float().view(n, len(idx), -1).mean(1)


class TransferHead(nn.Module):
    """The match / no-match head: (N, dim2d + dim3d) -> fc 512 -> ReLU -> fc 128 -> ReLU -> fc 2, logits (N, 2).

    Class 1 is "match" (same video, same time), class 0 "no match". ``dropout`` (probability) follows each ReLU.
    """

    def __init__(self, dim2d: int, dim3d: int, hidden: Sequence[int] = (512, 128), dropout: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
        layers: list[tuple[str, nn.Module]] = []
        width = dim2d + dim3d
        for i, h in enumerate(hidden):
            layers += [(f"fc{i + 1}", nn.Linear(width, h)), (f"relu{i + 1}", nn.ReLU(inplace=True))]
            if dropout > 0:
                layers.append((f"drop{i + 1}", nn.Dropout(dropout)))
            width = h
        layers.append((f"fc{len(hidden) + 1}", nn.Linear(width, 2)))
        self.layers = nn.Sequential(OrderedDict(layers))
        self.dim2d, self.dim3d = dim2d, dim3d

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.layers(pairs)


class TransferModel(nn.Module):
    """What trains: the T3D student and the head, in one module (one optimizer, one checkpoint, one DDP wrap).

    The student's classifier plays no part in the transfer; it is frozen so DDP sees no unused parameters.
    """

    def __init__(self, student: T3D, head: TransferHead) -> None:
        super().__init__()
        if head.dim3d != student.num_features:
            raise ValueError(f"head: expected a 3D input of {student.num_features} features, got {head.dim3d}")
        self.student, self.head = student, head
        self.student.classifier.requires_grad_(False)

    def forward(self, clips: torch.Tensor, teacher_features: torch.Tensor, partners: torch.Tensor) -> torch.Tensor:
        """clips (N, 3, T, H, W), teacher_features (N, F2) of the same clips, partners (N,) the index of a clip of
        another video for each clip -> logits (2N, 2): rows [0, N) the positive pairs (teacher i, student i),
        rows [N, 2N) the negative pairs (teacher partners[i], student i)."""
        student = self.student.forward_features(clips)
        teacher = teacher_features.to(student.dtype)
        pos = torch.cat([teacher, student], 1)
        neg = torch.cat([teacher.index_select(0, partners), student], 1)
        return self.head(torch.cat([pos, neg]))


def sample_negatives(video_ids: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """For each clip i, a clip j of the batch from another video (uniformly among those), drawn with ``generator``.

    video_ids: (N,) integers, the video each clip comes from (clips of the same video share an id).
    Returns partners (N,) long with ``video_ids[partners] != video_ids`` everywhere. A batch in which some clip
    has no clip of another video (e.g. all from one video) is a ValueError.
    """
    ids = torch.as_tensor(video_ids).flatten().cpu()
    if ids.numel() < 2:
        raise ValueError(
            f"video_ids: a negative pair needs clips of at least 2 videos per batch, got {ids.numel()} clip"
        )
    other = ids.view(-1, 1) != ids.view(1, -1)
    if not bool(other.any(1).all()):
        raise ValueError(
            f"video_ids: every clip needs a clip of another video in its batch to form a negative pair, got ids "
            f"{ids.tolist()[:16]}; use a larger batch or more videos"
        )
    return torch.multinomial(other.double(), 1, generator=generator).view(-1)


def _batch_seed(ids: torch.Tensor, batch: Mapping[str, Any], base_seed: int) -> int:
    # the negatives depend only on the batch (its ordered clips and, when given, their per-sample seeds) and the
    # run's seed: the same draw in a resumed run as in an uninterrupted one, and no draw from the global RNG
    data = ids.numpy().tobytes()
    if batch.get("seeds") is not None:
        data += torch.as_tensor(batch["seeds"]).cpu().numpy().tobytes()
    digest = hashlib.blake2b(data + str(base_seed).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class TransferStep:
    """The Trainer's step function for the transfer: ``step(model, batch, device) -> StepOutput``.

    ``batch`` holds "clips" (N, 3, T, H, W) and either "video" (N,) video ids or "indices" (N,) dataset indices
    (mapped to video ids by ``video_of``, (len(dataset),) int64; without it every index is its own video), and
    optionally "seeds" (per-sample seeds, mixed into the negative draw). The loss is the cross-entropy over the N
    positive and N negative pairs. ``count`` is N clips (so clips/s stays clips/s) and ``correct`` is half the
    pairs classified right, so the Trainer's accuracy is the match / no-match accuracy over the 2N pairs.
    """

    def __init__(self, teacher: FrozenTeacher, seed: int = 0, video_of: torch.Tensor | None = None) -> None:
        self.teacher, self.seed = teacher, seed
        self.video_of = None if video_of is None else torch.as_tensor(video_of, dtype=torch.int64).cpu()

    def video_ids(self, batch: Mapping[str, Any]) -> torch.Tensor:
        if batch.get("video") is not None:
            return torch.as_tensor(batch["video"], dtype=torch.int64).cpu()
        indices = torch.as_tensor(batch["indices"], dtype=torch.int64).cpu()
        return indices if self.video_of is None else self.video_of[indices]

    def __call__(self, model: nn.Module, batch: Mapping[str, Any], device: torch.device) -> StepOutput:
        clips = batch["clips"].to(device, non_blocking=True)
        ids = self.video_ids(batch)
        n = clips.shape[0]
        if ids.numel() != n:
            raise ValueError(f"batch: expected one video id per clip ({n}), got {ids.numel()}")
        teacher_features = self.teacher(clips)
        if bool((ids == ids[0]).all()):
            # every clip of this batch comes from one video (bad videos were dropped): no negative exists. Run
            # the graph with a zero loss so every process (DDP) still takes part in the step, and count nothing.
            logits = model(clips, teacher_features, torch.arange(n, device=device))
            return StepOutput(logits.float().sum() * 0.0, 0, 0)
        generator = torch.Generator().manual_seed(_batch_seed(ids, batch, self.seed))
        partners = sample_negatives(ids, generator).to(device)
        logits = model(clips, teacher_features, partners)
        labels = torch.cat([torch.ones(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)]).to(device)
        loss = F.cross_entropy(logits.float(), labels)
        correct_pairs = int((logits.argmax(1) == labels).sum())
        return StepOutput(loss, n, correct_pairs / 2)


def build_teacher(
    student: T3D,
    weights: str | os.PathLike | Mapping[str, torch.Tensor],
    arch: str = "auto",
    **kwargs: Any,
) -> FrozenTeacher:
    """The frozen teacher for ``student``: a 2D DenseNet of ``arch`` ("auto": the student's 2D twin,
    DenseNet-121 for T3D-121; or a name in :data:`TEACHERS`) loaded from ``weights`` (a file or a state_dict
    with torchvision key names; the ImageNet classifier is not needed). ``kwargs`` go to :class:`FrozenTeacher`.
    Missing keys, unexpected keys, wrong shapes or a file that is not a state_dict are a clear ValueError."""
    if arch == "auto":
        model2d = densenet2d_like(student)
    elif arch in TEACHERS:
        model2d = TEACHERS[arch]()
    else:
        raise ValueError(f"teacher arch: expected 'auto' or one of {sorted(TEACHERS)}, got {arch!r}")
    what = "teacher weights"
    if isinstance(weights, Mapping):
        if not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise ValueError(
                "teacher weights: expected a state_dict (a mapping of name -> tensor), got non-tensor values"
            )
        state = normalize_densenet2d_state(weights)
    else:
        state = read_densenet2d_state(weights)
        what = f"teacher weights {os.fspath(weights)!r}"
    own = model2d.state_dict()
    # the teacher's classifier (ImageNet's 1000 classes) is never used: load it only if present and fitting
    classifier = {k: state.pop(k) for k in ("classifier.weight", "classifier.bias") if k in state}
    expected = {k: v.shape for k, v in own.items() if not k.startswith("classifier.")}
    check_state_matches(state, expected, what)
    if all(k in classifier and classifier[k].shape == own[k].shape for k in ("classifier.weight", "classifier.bias")):
        state.update(classifier)
    model2d.load_state_dict(state, strict=False)
    return FrozenTeacher(model2d, **kwargs)


def export_student(model: TransferModel | T3D, path: str | os.PathLike, meta: Mapping[str, Any] | None = None) -> str:
    """Write the student's weights (without its unused classifier) atomically to ``path`` as
    ``{"format": EXPORT_FORMAT, "version": 1, "student": state_dict, "meta": meta}``; ``t3d train --init`` loads
    it (the fine-tune classifier starts fresh). Returns the path."""
    student = model.student if isinstance(model, TransferModel) else model
    state = {k: v.detach().cpu() for k, v in student.state_dict().items() if not k.startswith("classifier.")}
    return save_checkpoint({"format": EXPORT_FORMAT, "version": 1, "student": state, "meta": dict(meta or {})}, path)


def export_from_checkpoint(checkpoint: str | os.PathLike, path: str | os.PathLike) -> str:
    """Export the student of a ``t3d transfer`` training checkpoint (e.g. ``runs/x/last.pt``) to ``path``."""
    ckpt = load_checkpoint(checkpoint)
    model_state = ckpt.get("model")
    if not isinstance(model_state, Mapping) or not any(k.startswith("student.") for k in model_state):
        raise ValueError(
            f"checkpoint: expected a t3d transfer checkpoint (keys 'student.*'), got {os.fspath(checkpoint)!r}"
        )
    state = {
        k.removeprefix("student."): v
        for k, v in model_state.items()
        if k.startswith("student.") and not k.startswith("student.classifier.")
    }
    meta = dict(ckpt.get("meta") or {})
    return save_checkpoint({"format": EXPORT_FORMAT, "version": 1, "student": state, "meta": meta}, path)


# ------------------------------------------------------------------------------------------------ data
# UCF101/HMDB-style names "v_<Class>_g<group>_c<clip>": clips of one group are cut from one source video
_UCF_GROUP = re.compile(r"^(v_.+_g\d+)_c\d+$")


def video_key(path: str) -> str:
    """The source video a file belongs to: UCF101's "v_X_g08_c03" -> "v_X_g08" (clips c01..c07 of a group are
    cut from one YouTube video, so they must never be each other's negatives); any other name is its own video."""
    stem = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    match = _UCF_GROUP.match(stem)
    return os.path.join(os.path.dirname(os.path.normpath(path)), match.group(1)) if match else os.path.normpath(path)


def find_unlabeled_videos(root: str | os.PathLike) -> list[str]:
    """Every video under ``root``, recursively: video files (by extension) and folders of JPEG/PNG frames."""
    from .data.video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data_dir: expected a directory of videos, got {root!r} (no such directory)")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if filenames and all(f.lower().endswith(IMAGE_EXTENSIONS) for f in filenames):
            found.append(dirpath)  # a frame folder is one video
            dirnames.clear()
            continue
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(VIDEO_EXTENSIONS)]
    if not found:
        raise FileNotFoundError(
            f"data_dir: no videos under {root!r} (looked for {', '.join(VIDEO_EXTENSIONS)} files and frame folders)"
        )
    return found


def video_ids(paths: Sequence[str]) -> torch.Tensor:
    """(len(paths),) int64: one id per source video (see :func:`video_key`), dataset index -> video id."""
    keys: dict[str, int] = {}
    return torch.tensor([keys.setdefault(video_key(p), len(keys)) for p in paths], dtype=torch.int64)


# ------------------------------------------------------------------------------------------------ t3d transfer CLI
def build_transfer_dataset(args: argparse.Namespace, clip: tuple[int, int, int], transform: Any) -> Any:
    """The unlabeled training clips: every video under DATA_DIR (``--format videos``), or one split of a labelled
    layout (labels unused)."""
    from .data import VideoDataset, VideoRecord, build_dataset

    if args.format == "videos":
        paths = find_unlabeled_videos(args.data_dir)
        dataset = VideoDataset(
            [VideoRecord(p, 0) for p in paths], ["video"], clip[0], args.frame_stride, "train", 1, transform, args.seed
        )
        dataset.check_clip_fits()
        return dataset
    return build_dataset(
        args.data_dir,
        format=args.format,
        split=args.split,
        fold=args.fold,
        annotations=args.annotations,
        clip_len=clip[0],
        frame_stride=args.frame_stride,
        mode="train",
        transform=transform,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    from .checkpoint import load_model_weights
    from .data import ClipTransform, EpochSampler, dataset_hints, make_loader
    from .distributed import cleanup, init_distributed
    from .models import MODELS, clip_stage_shapes
    from .train import TrainConfig, Trainer, make_optimizer, make_scheduler, parse_clip, seed_everything

    clip = parse_clip(args.clip)
    if args.model not in MODELS:
        raise ValueError(f"--model: expected a T3D model, one of {sorted(MODELS)}, got {args.model!r}")
    try:
        clip_stage_shapes(clip)
    except ValueError as exc:
        raise ValueError(f"--clip: {exc}") from exc
    if args.batch_size < 2:
        raise ValueError(
            f"--batch-size: expected >= 2 (a negative pair needs a clip of another video), got {args.batch_size}"
        )
    if args.resume and args.init:
        raise ValueError("--resume and --init: expected at most one (resume continues a run, init starts a new one)")
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = init_distributed(args.device)
    try:
        hflip = bool(dataset_hints(args.data_dir).get("hflip", True)) if args.hflip == "auto" else args.hflip == "on"
        transform = ClipTransform(clip[1:], resize=args.resize, train=True, hflip=hflip)
        dataset = build_transfer_dataset(args, clip, transform)
        video_of = video_ids([r.path for r in dataset.records])
        seed_everything(args.seed)
        student = MODELS[args.model](num_classes=1, backend=args.backend)
        if args.init:
            report = load_model_weights(student, args.init)
            if ctx.is_main:
                print(f"--init: student initialised from {args.init} ({len(report['loaded'])} tensors)")
        mean = tuple(float(v) for v in transform.mean.flatten())
        std = tuple(float(v) for v in transform.std.flatten())
        teacher = build_teacher(
            student,
            args.teacher_weights,
            args.teacher,
            input_mean=mean,
            input_std=std,
            frames=args.teacher_frames,
            chunk=args.teacher_chunk,
        ).to(ctx.device)
        head = TransferHead(teacher.feature_dim, student.num_features, dropout=args.head_dropout)
        model = TransferModel(student, head)
        config = TrainConfig(
            epochs=args.epochs,
            lr=args.lr,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            nesterov=not args.no_nesterov,
            schedule=args.schedule,
            warmup_steps=args.warmup_steps,
            accum_steps=args.accum_steps,
            amp=args.amp,
            grad_clip=args.grad_clip,
            save_every=args.save_every,
            max_steps=args.max_steps,
            out_dir=args.out,
            seed=args.seed,
            progress=not args.no_progress,
        )
        sampler = EpochSampler(len(dataset), args.batch_size, args.seed, rank=ctx.rank, world_size=ctx.world_size)
        loader = make_loader(
            dataset,
            args.batch_size,
            sampler=sampler,
            workers=args.workers,
            seed=args.seed,
            pin_memory=ctx.device.type == "cuda",
        )
        optimizer = make_optimizer(model, config)
        scheduler = make_scheduler(optimizer, config, sampler.batches_per_epoch // config.accum_steps)
        meta = {
            "task": "transfer",
            "model": args.model,
            "backend": args.backend,
            "clip": list(clip),
            "frame_stride": args.frame_stride,
            "resize": transform.resize,
            "teacher": args.teacher,
            "teacher_weights": os.path.abspath(args.teacher_weights),
            "teacher_frames": args.teacher_frames,
            "data_dir": os.path.abspath(args.data_dir),
            "videos": len(dataset),
            "world_size": ctx.world_size,
            "global_batch": args.batch_size * ctx.world_size * config.accum_steps,
        }
        trainer = Trainer(
            model,
            optimizer,
            loader,
            step_fn=TransferStep(teacher, args.seed, video_of),
            scheduler=scheduler,
            config=config,
            ctx=ctx,
            meta=meta,
        )
        resume = args.resume
        if resume == "auto":
            candidate = os.path.join(args.out, "last.pt")
            resume = candidate if os.path.isfile(candidate) else None
        if resume:
            trainer.resume(resume)
            if ctx.is_main:
                print(
                    f"resumed from {resume}: epoch {trainer.epoch + 1}, step {trainer.step}, batch {trainer.position}"
                )
        if ctx.is_main:
            print(
                f"transfer {args.teacher} teacher ({teacher.feature_dim}-d, frozen) -> {args.model} student on "
                f"{len(dataset)} videos ({int(video_of.max()) + 1} sources), clip {args.clip}, global batch "
                f"{meta['global_batch']} ({ctx.world_size} process(es), device {ctx.device}), "
                f"{trainer.steps_per_epoch} steps/epoch; accuracy = match/no-match over balanced pairs"
            )
        history = trainer.fit()
        export = args.export or os.path.join(args.out, "student.pt")
        if ctx.is_main:
            export_student(model, export, {**meta, "step": trainer.step, "epoch": trainer.epoch})
            last = f", last epoch loss {history[-1]['loss']:.4f} acc {history[-1]['acc']:.3f}" if history else ""
            print(f"done: step {trainer.step}{last}; student exported to {export} (t3d train --init {export})")
    finally:
        cleanup(ctx)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from .data import FORMATS

    p = sub.add_parser(
        "transfer",
        help="2D->3D supervision transfer: train T3D on unlabeled videos from a frozen 2D DenseNet",
        description="The T3D paper's supervision transfer (section 3.2): a frozen 2D DenseNet (ImageNet weights) and "
        "the T3D student see the same clip; a head learns match / no match (same video vs different videos) and "
        "only the student and the head train. Writes OUT/last.pt (resumable) and OUT/student.pt for "
        "`t3d train --init`. Multi-process: torchrun --nproc_per_node N -m t3d transfer ...",
    )
    p.add_argument("data_dir", help="videos to learn from: any folder (searched recursively), labels unused")
    p.add_argument("--teacher-weights", required=True, help="2D DenseNet weights file (torchvision key names)")
    p.add_argument(
        "--teacher",
        default="auto",
        choices=("auto", *TEACHERS),
        help="teacher architecture (auto: the 2D twin of --model, DenseNet-121 for t3d121)",
    )
    p.add_argument(
        "--teacher-frames",
        type=int,
        default=None,
        help="frames per clip the teacher sees, evenly spaced (default: all, as the paper)",
    )
    p.add_argument("--teacher-chunk", type=int, default=256, help="frames per teacher forward (bounds memory)")
    p.add_argument("--out", required=True, help="output directory (last.pt, log.jsonl, student.pt)")
    p.add_argument("--export", default=None, help="where to write the student (default OUT/student.pt)")
    p.add_argument(
        "--format",
        default="videos",
        choices=("videos", *FORMATS),
        help="videos: every video under DATA_DIR (default); or a labelled layout's --split",
    )
    p.add_argument("--split", default="train", help="split of a labelled layout (default train)")
    p.add_argument("--fold", type=int, default=1, help="official split number of UCF101/HMDB51 (1..3)")
    p.add_argument("--annotations", default=None, help="Kinetics CSV (default: DATA_DIR/<split>.csv)")
    p.add_argument("--model", default="t3d121", help="student: t3d121, t3d169 or t3d_tiny (default t3d121)")
    p.add_argument("--init", default=None, help="initialise the student from a checkpoint (e.g. t3d inflate's)")
    p.add_argument("--clip", default="16x112x112", help="frames x crop height x crop width (default 16x112x112)")
    p.add_argument("--frame-stride", type=int, default=1, help="temporal stride between sampled frames")
    p.add_argument("--resize", type=int, default=None, help="short side before cropping (default 8/7 of the crop)")
    p.add_argument(
        "--hflip",
        default="auto",
        choices=("auto", "on", "off"),
        help="random horizontal flip (auto: on unless the dataset declares otherwise)",
    )
    p.add_argument("--head-dropout", type=float, default=0.0, help="dropout after each ReLU of the head")
    add_optimization_args(p, batch_size=32, batch_help="(paper: 32)", lr_help="(paper: 0.1)")
    p.add_argument(
        "--amp",
        default="auto",
        choices=("auto", "off", "bf16", "fp16"),
        help="mixed precision (auto: bf16/fp16 on CUDA, off on CPU)",
    )
    p.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm to this value")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N optimizer steps (and each epoch)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps (checkpoint written)")
    p.add_argument("--resume", default=None, help="checkpoint to continue from, or 'auto' (OUT/last.pt if present)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default 2)")
    p.add_argument("--backend", default="auto", help="backend of the TTLs and dense blocks (auto, reference, ...)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar and no per-epoch lines")
    p.set_defaults(func=run)
