"""t3d: the T3D model (DenseNet-3D with Temporal Transition Layers), data, transfer, training and CLI."""

__version__ = "0.1.0"
