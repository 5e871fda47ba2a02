"""T3D (DenseNet-3D + TTL), the 2D DenseNet-121 teacher, the frame-averaging 2D baseline and the registry by name."""

from .baselines import FrameAverage2d, frame2d
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
from .registry import MODELS, build_model, model_registry

__all__ = [
    "MODELS",
    "T3D",
    "DenseNet2d",
    "FrameAverage2d",
    "build_model",
    "clip_stage_shapes",
    "densenet121",
    "frame2d",
    "load_densenet2d_weights",
    "model_registry",
    "t3d_densenet121",
    "t3d_densenet169",
    "t3d_tiny",
]
