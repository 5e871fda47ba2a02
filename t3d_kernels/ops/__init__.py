"""Registered custom ops (``torch.ops.t3d.*``) with fake implementations and autograd."""

from .dense_block import dense_block
from .ttl import ttl

__all__ = ["dense_block", "ttl"]
