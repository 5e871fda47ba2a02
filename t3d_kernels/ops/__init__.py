"""Registered custom ops (``torch.ops.t3d.*``) with fake implementations and autograd."""

from .ttl import ttl

__all__ = ["ttl"]
