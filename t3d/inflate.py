"""I3D-style inflation of 2D DenseNet weights into a T3D model (``t3d inflate``), an alternative to the transfer.

Every 2D kernel (O, I, kh, kw) becomes a 3D kernel (O, I, d, kh, kw) by repeating it over the temporal depth d
and dividing by d (Carreira & Zisserman, I3D), so on a clip of identical frames each 3D conv gives the 2D conv's
output (away from the temporal zero padding). BatchNorm parameters and statistics are copied. A TTL has no 2D
counterpart of its own: the 2D transition's 1x1 conv (C//2 outputs) is split over the TTL's branches by output
rows (branch i takes its slice, earlier branches the remainder, exactly as the TTL splits C//2), and the 1x1
weight is placed at the spatial centre of each branch's d x k x k kernel, spread over the d taps (divided by d).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

import torch

from t3d_kernels import TemporalTransition

from .checkpoint import save_checkpoint
from .models import MODELS, T3D
from .models.densenet import (
    DenseNet2d,
    _describe,
    check_state_matches,
    normalize_densenet2d_state,
    read_densenet2d_state,
)

__all__ = [
    "add_parser",
    "densenet2d_like",
    "inflate_densenet2d_to_t3d",
    "inflate_kernel",
    "normalize_densenet2d_state",
    "read_densenet2d_state",
    "ttl_kernel_from_transition",
]


def inflate_kernel(weight2d: torch.Tensor, depth: int) -> torch.Tensor:
    """(O, I, kh, kw) -> (O, I, depth, kh, kw): the 2D kernel repeated over ``depth`` taps, divided by ``depth``."""
    return weight2d.unsqueeze(2).repeat(1, 1, depth, 1, 1) / depth


def ttl_kernel_from_transition(rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A TTL branch kernel of ``shape`` (C_i, C_in, d, k, k) from its rows (C_i, C_in, 1, 1) of the 2D transition's
    1x1 conv: the 1x1 weight sits at the spatial centre of every temporal tap, divided by d."""
    out = rows.new_zeros(shape)
    depth, kh, kw = shape[2], shape[3], shape[4]
    out[:, :, :, kh // 2, kw // 2] = rows[:, :, 0, 0].unsqueeze(2) / depth
    return out


def densenet2d_like(model3d: T3D, num_classes: int = 1000) -> DenseNet2d:
    """The 2D DenseNet with the hyper-parameters of ``model3d`` (block config, growth rate, stem width,
    bottleneck): the network whose weights inflate into it (DenseNet-121 for T3D-121)."""
    features = model3d.features
    blocks = [m for name, m in features.named_children() if name.startswith("denseblock")]
    block_config = tuple(block.num_layers for block in blocks)
    first = blocks[0].denselayer1
    growth_rate = first.conv2.out_channels
    return DenseNet2d(
        block_config,
        growth_rate=growth_rate,
        num_init_features=features.conv0.out_channels,
        bn_size=first.conv1.out_channels // growth_rate,
        num_classes=num_classes,
    )


def inflate_densenet2d_to_t3d(
    model2d_state: Mapping[str, torch.Tensor], model3d: T3D, copy_classifier: bool | None = None
) -> T3D:
    """Initialise ``model3d`` (a :class:`T3D`) in place from a 2D DenseNet state_dict (torchvision key names)
    whose block config, growth rate, stem width and bottleneck match (DenseNet-121 for T3D-121); returns it.

    - stem conv 7x7 -> 3x7x7, dense-layer convs 1x1 -> 1x1x1 and 3x3 -> 3x3x3: repeated over time, / depth;
    - every BatchNorm (norm0, dense layers, transitions, norm5): copied;
    - TTL branch i: rows [sum(C_<i), sum(C_<=i)) of the 2D transition's 1x1 conv at the spatial centre of
      its d x k x k kernel, / d (the TTL must split the 2D transition's C//2 outputs: the default
      ``ttl_channels=None``; the official 128-per-branch variant has no 2D counterpart and is refused);
    - classifier: copied when ``copy_classifier`` is True (shapes must match), skipped when False; None
      (default) copies it only when its shape matches (ImageNet's 1000 classes rarely do).

    Missing keys, unexpected keys, wrong shapes or a non-state_dict raise a ValueError that lists them.
    """
    if not isinstance(model3d, T3D):
        raise TypeError(f"model3d: expected a T3D model, got {type(model3d).__name__}")
    if not isinstance(model2d_state, Mapping):
        raise ValueError(
            f"model2d_state: expected a state_dict (a mapping of name -> tensor), got {_describe(model2d_state)}"
        )
    transitions = {name: m for name, m in model3d.features.named_children() if isinstance(m, TemporalTransition)}
    for name, ttl in transitions.items():
        if ttl.out_channels != ttl.in_channels // 2:
            raise ValueError(
                f"model3d: {name} has {ttl.out_channels} output channels but a 2D DenseNet transition has "
                f"{ttl.in_channels // 2} (theta = 0.5); inflation needs the default TTL channels (ttl_channels=None)"
            )
    state = normalize_densenet2d_state(model2d_state)
    with torch.device("meta"):  # only its key names and shapes are needed
        twin = densenet2d_like(model3d, num_classes=model3d.classifier.out_features)
    expected = {k: v.shape for k, v in twin.state_dict().items()}
    classifier_keys = ("classifier.weight", "classifier.bias")
    own = model3d.state_dict()
    # the 2D classifier is optional (the teacher's 1000 ImageNet classes): checked only when asked for
    classifier = {k: state.pop(k) for k in classifier_keys if k in state}
    if copy_classifier is not True:
        for key in classifier_keys:
            expected.pop(key)
    else:
        state.update(classifier)
    if copy_classifier is None and all(
        k in classifier and classifier[k].shape == own[k].shape for k in classifier_keys
    ):
        state.update(classifier)
        expected.update({k: own[k].shape for k in classifier_keys})
    check_state_matches(state, expected, "model2d_state")

    new_state = {}
    for key, target in own.items():
        parts = key.split(".")
        if key in classifier_keys and key not in state:
            continue
        elif len(parts) >= 3 and parts[1] in transitions and parts[2] == "branches":
            ttl = transitions[parts[1]]
            rows2d = state[f"features.{parts[1]}.conv.weight"]
            branch = int(parts[3])
            start = sum(b.out_channels for b in ttl.branches[:branch])
            rows = rows2d[start : start + target.shape[0]]
            new_state[key] = ttl_kernel_from_transition(rows, target.shape).to(target.dtype)
        elif target.dim() == 5:
            new_state[key] = inflate_kernel(state[key], target.shape[2]).to(target.dtype)
        else:
            new_state[key] = state[key].to(target.dtype).reshape(target.shape)
    model3d.load_state_dict(new_state, strict=False)
    return model3d


def _run(args: argparse.Namespace) -> int:
    if args.model not in MODELS:
        raise ValueError(f"--model: expected one of {sorted(MODELS)}, got {args.model!r}")
    model = MODELS[args.model](num_classes=args.num_classes)
    state = read_densenet2d_state(args.weights)
    inflate_densenet2d_to_t3d(state, model)
    meta = {"model": args.model, "num_classes": args.num_classes, "init": "inflated", "source": args.weights}
    # atomic write; {"model": state_dict} is what `t3d train --init` and `t3d transfer --init` read
    save_checkpoint({"format": "t3d-inflated", "version": 1, "model": model.state_dict(), "meta": meta}, args.out)
    print(f"inflated {args.weights} into {args.model} ({args.num_classes} classes) -> {args.out}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "inflate",
        help="initialise T3D from 2D DenseNet weights by I3D inflation",
        description="I3D-style inflation of a 2D DenseNet state_dict (torchvision key names) into a T3D model; "
        "writes a checkpoint that `t3d train --init` fine-tunes.",
    )
    p.add_argument("--weights", required=True, help="2D DenseNet weights file (torchvision densenet121 layout)")
    p.add_argument("--model", default="t3d121", help=f"T3D architecture: one of {sorted(MODELS)} (default t3d121)")
    p.add_argument("--num-classes", type=int, default=400, help="classes of the 3D model's classifier (default 400)")
    p.add_argument("--out", required=True, help="output checkpoint path")
    p.set_defaults(func=_run)
