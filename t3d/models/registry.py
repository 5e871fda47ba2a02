"""The models ``--model`` accepts, by name: the T3D family and the frame-averaging 2D baseline."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .baselines import frame2d
from .densenet import t3d_densenet121, t3d_densenet169, t3d_tiny

# the T3D family: 3D DenseNets with TTLs (fused ops inside)
MODELS: dict[str, Callable[..., nn.Module]] = {
    "t3d121": t3d_densenet121,
    "t3d169": t3d_densenet169,
    "t3d_tiny": t3d_tiny,
}


def model_registry() -> dict[str, Callable[..., nn.Module]]:
    """Every model ``build_model`` builds: :data:`MODELS` plus the frame-averaging 2D baseline ``frame2d``."""
    return {**MODELS, "frame2d": frame2d}


def build_model(name: str, num_classes: int, backend: str = "auto", dropout: float = 0.0) -> nn.Module:
    """The model ``name`` (a key of :func:`model_registry`) with ``num_classes`` outputs; ``backend`` picks the
    implementation of the fused ops, ``dropout`` (T3D only) applies before the classifier."""
    registry = model_registry()
    if name not in registry:
        raise ValueError(f"--model: expected one of {sorted(registry)}, got {name!r}")
    kwargs: dict[str, Any] = {"num_classes": num_classes, "backend": backend}
    if dropout and name != "frame2d":
        kwargs["dropout"] = dropout
    return registry[name](**kwargs)
