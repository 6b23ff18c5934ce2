"""Curvature blocks: per-layer or per-tensor curvature with state (factor statistics by moving
average, cached inverses, roots or eigendecompositions) shared by K-FAC, Shampoo, TNT and K-BFGS.

One concept per module: :mod:`.state` (the typed state), :mod:`.statistics` (batch statistics
from taps or gradients), :mod:`.base` (the interface and the damping split), :mod:`.kronecker`,
:mod:`.dense`, :mod:`.conv` (layer blocks) and :mod:`.tensor` (per-mode blocks).
"""

from .base import SPLITS, BlockOperator, CurvatureBlock, split_damping
from .conv import ConvBlock
from .dense import DenseBlock
from .kronecker import KroneckerBlock
from .state import KINDS, BlockState, CacheKindError, EigenCache, FactorCache, factor_diagonals
from .statistics import kronecker_statistics, mode_statistics
from .tensor import TensorBlock

__all__ = [
    "KINDS",
    "SPLITS",
    "BlockOperator",
    "BlockState",
    "CacheKindError",
    "ConvBlock",
    "CurvatureBlock",
    "DenseBlock",
    "EigenCache",
    "FactorCache",
    "KroneckerBlock",
    "TensorBlock",
    "factor_diagonals",
    "kronecker_statistics",
    "mode_statistics",
    "split_damping",
]
