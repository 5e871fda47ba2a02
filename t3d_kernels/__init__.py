"""t3d-kernels: fused kernels for Temporal 3D ConvNets (T3D, Diba et al. 2017).

Ops: :func:`ttl` (multi-depth temporal convolution of the Temporal Transition Layer) and :func:`dense_block`
(concat-free DenseNet-3D block with shared batch statistics). Modules: :class:`TemporalTransition`,
:class:`DenseLayer3d`, :class:`DenseBlock3d`; :func:`fuse` switches a model's modules to the fused backends;
:func:`autocast_support` says whether a model's fused ops run under autocast; :func:`convert_sync_batchnorm`
synchronises every BN of a model, the fused ops' included. :mod:`t3d_kernels.reference` holds the
plain-PyTorch ground truth. Architecture: docs/design.md.
"""

from . import reference
from .backends import BackendError, backends
from .convert import autocast_support, convert_sync_batchnorm, fuse
from .nn import BatchNormReLUMaxPool3d, DenseBlock3d, DenseLayer3d, StemConv3d, TemporalTransition
from .ops import bn_relu_maxpool, dense_block, ttl

__version__ = "0.1.0"

__all__ = [
    "BatchNormReLUMaxPool3d",
    "BackendError",
    "DenseBlock3d",
    "DenseLayer3d",
    "StemConv3d",
    "TemporalTransition",
    "autocast_support",
    "backends",
    "bn_relu_maxpool",
    "convert_sync_batchnorm",
    "dense_block",
    "fuse",
    "reference",
    "ttl",
]
