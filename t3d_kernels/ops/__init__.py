"""Registered custom ops (``torch.ops.t3d.*``) with fake implementations and autograd."""

from .bn_relu_maxpool import bn_relu_maxpool
from .dense_block import dense_block
from .stem_conv import stem_conv3d
from .ttl import ttl

__all__ = ["bn_relu_maxpool", "dense_block", "stem_conv3d", "ttl"]
