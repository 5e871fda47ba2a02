"""T3D (DenseNet-3D + TTL) and the 2D DenseNet-121 teacher."""

from .densenet import (
    T3D,
    DenseNet2d,
    clip_stage_shapes,
    densenet121,
    load_densenet2d_weights,
    t3d_densenet121,
    t3d_densenet169,
    t3d_tiny,
)

MODELS = {"t3d121": t3d_densenet121, "t3d169": t3d_densenet169, "t3d_tiny": t3d_tiny}

__all__ = [
    "MODELS",
    "T3D",
    "DenseNet2d",
    "clip_stage_shapes",
    "densenet121",
    "load_densenet2d_weights",
    "t3d_densenet121",
    "t3d_densenet169",
    "t3d_tiny",
]
