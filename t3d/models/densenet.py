"""T3D (DenseNet-3D with Temporal Transition Layers, Diba et al. 2017, Table 1) and the 2D DenseNet teacher.

Both are built by one skeleton, :func:`_densenet_features`, so their module names line up with torchvision's
``densenet121`` key for key (``features.conv0``, ``features.denseblock1.denselayer1.norm1`` ...,
``features.transition1``, ``features.norm5``, ``classifier``); in T3D the transitions are TTLs.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from t3d_kernels import DenseBlock3d, TemporalTransition

from .pooling import DeterministicMaxPool3d

__all__ = [
    "T3D",
    "DenseNet2d",
    "clip_stage_shapes",
    "densenet121",
    "check_state_matches",
    "load_densenet2d_weights",
    "normalize_densenet2d_state",
    "read_densenet2d_state",
    "t3d_densenet121",
    "t3d_densenet169",
    "t3d_tiny",
]


class _DenseLayer2d(nn.Module):
    def __init__(self, in_channels: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class _DenseBlock2d(nn.Module):
    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", _DenseLayer2d(in_channels + i * growth_rate, growth_rate, bn_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.children():
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class _Transition2d(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            OrderedDict(
                norm=nn.BatchNorm2d(in_channels),
                relu=nn.ReLU(inplace=True),
                conv=nn.Conv2d(in_channels, out_channels, 1, bias=False),
                pool=nn.AvgPool2d(2, stride=2),
            )
        )


def _densenet_features(dims, block_config, growth_rate, num_init_features, bn_size, transition, backend):
    """The shared skeleton. ``transition(i, in_channels) -> (module, out_channels)`` builds transition i."""
    if dims == 3:
        stem = [
            ("conv0", nn.Conv3d(3, num_init_features, (3, 7, 7), stride=2, padding=(1, 3, 3), bias=False)),
            ("norm0", nn.BatchNorm3d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", DeterministicMaxPool3d(3, stride=(1, 2, 2), padding=1)),
        ]
    else:
        stem = [
            ("conv0", nn.Conv2d(3, num_init_features, 7, stride=2, padding=3, bias=False)),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(3, stride=2, padding=1)),
        ]
    features = nn.Sequential(OrderedDict(stem))
    channels = num_init_features
    for i, num_layers in enumerate(block_config):
        if dims == 3:
            block = DenseBlock3d(num_layers, channels, growth_rate, bn_size, backend=backend)
        else:
            block = _DenseBlock2d(num_layers, channels, growth_rate, bn_size)
        features.add_module(f"denseblock{i + 1}", block)
        channels += num_layers * growth_rate
        if i != len(block_config) - 1:
            module, channels = transition(i, channels)
            features.add_module(f"transition{i + 1}", module)
    features.add_module("norm5", nn.BatchNorm3d(channels) if dims == 3 else nn.BatchNorm2d(channels))
    return features, channels


def _init_weights(model: nn.Module) -> None:
    # torchvision's DenseNet initialisation
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
            nn.init.constant_(m.bias, 0)


def clip_stage_shapes(clip: Sequence[int], num_stages: int = 4) -> list[tuple[str, tuple[int, int, int]]]:
    """(T, H, W) after the stem conv, the stem pool and each TTL, for a clip (T, H, W); raises ValueError when
    the clip does not survive the downsampling."""
    t, h, w = (int(v) for v in clip)
    shapes = []

    def conv_out(size, k, s, p):
        return (size + 2 * p - k) // s + 1

    t, h, w = conv_out(t, 3, 2, 1), conv_out(h, 7, 2, 3), conv_out(w, 7, 2, 3)
    shapes.append(("stem", (t, h, w)))
    t, h, w = conv_out(t, 3, 1, 1), conv_out(h, 3, 2, 1), conv_out(w, 3, 2, 1)
    shapes.append(("pool0", (t, h, w)))
    for i in range(num_stages - 1):
        t, h, w = t // 2, h // 2, w // 2
        shapes.append((f"transition{i + 1}", (t, h, w)))
    if min(t, h, w) < 1 or min(clip) < 1:
        raise ValueError(
            f"clip: expected (T, H, W) that survive the downsampling (T halved {num_stages} times, H and W by 2^"
            f"{num_stages + 1}; e.g. T >= {2**num_stages}, H, W >= {2 ** (num_stages + 1)}), got {tuple(clip)}"
        )
    return shapes


class T3D(nn.Module):
    """Temporal 3D ConvNet: DenseNet-3D whose transitions are Temporal Transition Layers.

    Input (N, 3, T, H, W); output logits (N, num_classes). :meth:`forward_features` gives the pooled feature
    (N, num_features): 1024 for T3D-121, 1664 for T3D-169.

    Args:
        block_config: layers per dense block.
        ttl_depths: temporal depths of each TTL's branches.
        ttl_channels: None for DenseNet's compression (theta = 0.5 of the input, split evenly over the
            branches), or an int of channels per branch (128 in the official code).
        backend: backend of the TTLs and dense blocks ("auto", "reference", ...).
    """

    def __init__(
        self,
        block_config: Sequence[int] = (6, 12, 24, 16),
        growth_rate: int = 32,
        num_init_features: int = 64,
        bn_size: int = 4,
        ttl_depths: Sequence[Sequence[int]] = ((1, 3, 6), (1, 3, 4), (1, 3, 4)),
        ttl_channels: int | None = None,
        num_classes: int = 400,
        dropout: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if len(ttl_depths) != len(block_config) - 1:
            raise ValueError(
                f"ttl_depths: expected {len(block_config) - 1} entries (one per transition), got {len(ttl_depths)}"
            )
        self.num_stages = len(block_config)

        def transition(i, channels):
            depths = ttl_depths[i]
            if ttl_channels is None:
                ttl = TemporalTransition(channels, channels // 2, depths, backend=backend)
            else:
                ttl = TemporalTransition(channels, depths=depths, branch_channels=ttl_channels, backend=backend)
            return ttl, ttl.out_channels

        self.features, self.num_features = _densenet_features(
            3, block_config, growth_rate, num_init_features, bn_size, transition, backend
        )
        self.dropout = dropout
        self.classifier = nn.Linear(self.num_features, num_classes)
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != 3:
            raise ValueError(f"x: expected a clip batch (N, 3, T, H, W), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point clip batch, got dtype {x.dtype}")
        clip_stage_shapes(x.shape[2:], self.num_stages)
        f = F.relu(self.features(x))
        return F.adaptive_avg_pool3d(f, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.forward_features(x)
        return self.classifier(F.dropout(f, self.dropout, self.training))


def t3d_densenet121(num_classes: int = 400, **kwargs) -> T3D:
    """T3D-121: blocks (6, 12, 24, 16), TTL depths (1,3,6), (1,3,4), (1,3,4); 1024-d feature."""
    return T3D((6, 12, 24, 16), num_classes=num_classes, **kwargs)


def t3d_densenet169(num_classes: int = 400, **kwargs) -> T3D:
    """T3D-169: blocks (6, 12, 32, 32); 1664-d feature."""
    return T3D((6, 12, 32, 32), num_classes=num_classes, **kwargs)


def t3d_tiny(num_classes: int = 10, **kwargs) -> T3D:
    """A tiny T3D for tests and demos: same structure, 4 stages of 1-2 layers, growth rate 8."""
    kwargs.setdefault("growth_rate", 8)
    kwargs.setdefault("num_init_features", 16)
    kwargs.setdefault("bn_size", 2)
    return T3D((1, 2, 2, 1), num_classes=num_classes, **kwargs)


class DenseNet2d(nn.Module):
    """2D DenseNet (torchvision's layout and key names); input (N, 3, H, W), :meth:`forward_features` (N, 1024)."""

    def __init__(
        self,
        block_config: Sequence[int] = (6, 12, 24, 16),
        growth_rate: int = 32,
        num_init_features: int = 64,
        bn_size: int = 4,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()

        def transition(i, channels):
            return _Transition2d(channels, channels // 2), channels // 2

        self.features, self.num_features = _densenet_features(
            2, block_config, growth_rate, num_init_features, bn_size, transition, None
        )
        self.classifier = nn.Linear(self.num_features, num_classes)
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        f = F.relu(self.features(x))
        return F.adaptive_avg_pool2d(f, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


def densenet121(num_classes: int = 1000) -> DenseNet2d:
    """2D DenseNet-121 whose state_dict is key for key torchvision's ``densenet121`` (the transfer teacher)."""
    return DenseNet2d((6, 12, 24, 16), num_classes=num_classes)


# torchvision's checkpoints before 0.3 named layers "norm.1" instead of "norm1"
_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def load_densenet2d_weights(model: DenseNet2d, path: str | os.PathLike, strict_classifier: bool = False) -> DenseNet2d:
    """Load a torchvision-format DenseNet state_dict file into ``model`` (``weights_only=True``).

    Reads the file with :func:`read_densenet2d_state`. The classifier is loaded only if its shape matches (the
    teacher does not use it) unless ``strict_classifier``. Missing or unexpected keys and wrong shapes raise a
    ValueError that lists them.
    """
    state = read_densenet2d_state(path)
    own = model.state_dict()
    if not strict_classifier:
        for key in ("classifier.weight", "classifier.bias"):
            if key in state and state[key].shape != own[key].shape:
                del state[key]
            state.setdefault(key, own[key])
    check_state_matches(state, {k: v.shape for k, v in own.items()}, f"weights {os.fspath(path)!r}")
    model.load_state_dict(state)
    return model


def _fill_num_batches_tracked(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # checkpoints saved before PyTorch 0.4.1 (torchvision's DenseNet files among them) have no
    # num_batches_tracked; PyTorch itself fills it with 0 when loading them, so do the same
    for key in list(state):
        if key.endswith(".running_var"):
            tracked = key[: -len("running_var")] + "num_batches_tracked"
            state.setdefault(tracked, torch.tensor(0, dtype=torch.long))
    return state


def read_densenet2d_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a torchvision-format DenseNet weights file (``weights_only=True``) into a plain state_dict.

    Accepts a bare state_dict or one under "state_dict"/"model"; renames torchvision's pre-0.3 keys
    ("norm.1" -> "norm1"), strips a DDP "module." prefix and fills a missing ``num_batches_tracked`` with 0.
    Not a file / not loadable / not a dict of tensors raise a clear error naming ``path``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights: expected a 2D DenseNet weights file, got {path!r} (no such file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the same user error: a bad file
        raise ValueError(f"weights: {path!r} is not a loadable torch state_dict file ({exc})") from exc
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"weights: expected a state_dict (a dict of name -> tensor) in {path!r}, got {_describe(state)}"
        )
    return normalize_densenet2d_state(state)


def normalize_densenet2d_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Today's torchvision key names for a DenseNet state_dict: pre-0.3 names ("norm.1" -> "norm1"), no DDP
    "module." prefix, ``num_batches_tracked`` filled with 0 where missing (files saved before PyTorch 0.4.1)."""
    state = {_OLD_KEY.sub(lambda m: m.group(1) + m.group(2), k).removeprefix("module."): v for k, v in state.items()}
    return _fill_num_batches_tracked(state)


def _describe(obj: object) -> str:
    if isinstance(obj, dict):
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        return f"a dict with non-tensor values under {bad[:4]}" if bad else "an empty dict"
    return type(obj).__name__


def check_state_matches(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], what: str) -> None:
    """Raise a ValueError listing missing keys, unexpected keys and wrong shapes of ``state`` against
    ``expected`` (key -> shape). ``what`` names the source in the message."""
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{what}: expected a state_dict (a mapping of name -> tensor), got {_describe(state)}")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: expected {tuple(expected[k])}, got {tuple(state[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k])
    ]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
            if items:
                parts.append(f"{label} ({len(items)}): {items[:6]}{' ...' if len(items) > 6 else ''}")
        raise ValueError(f"{what}: does not match the 2D DenseNet the model needs: " + "; ".join(parts))
