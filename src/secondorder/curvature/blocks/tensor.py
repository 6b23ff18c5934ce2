"""``TensorBlock``: per-mode (Shampoo / TNT) statistics of any parameter tensor."""

from __future__ import annotations

from typing import Any

from ...backends import backend_of
from ...errors import ShapeError
from .base import CurvatureBlock
from .statistics import mode_statistics

Array = Any


class TensorBlock(CurvatureBlock):
    """Per-mode curvature of a k-way parameter tensor W of shape (n_1, ..., n_k):

        G_i <- beta G_i + (1 - beta) mat_i(G) mat_i(G)^T,    preconditioner (x)_i (G_i + eps I)^p,

    applied by mode products, W -> W x_1 (G_1 + eps I)^p ... x_k (G_k + eps I)^p. Shampoo
    (V. Gupta, T. Koren and Y. Singer, ICML 2018) caches the inverse 2k-th roots,
    p = -1/(2k) (``update_cache``'s default, kind ``"root"``, by eigendecomposition or the
    coupled Newton iteration); TNT (Y. Ren and D. Goldfarb, "Tensor normal training for deep
    learning models", NeurIPS 2021) caches inverses (``kind="inverse"``) of
    normalised factors. The damping eps is
    added to every factor (split ``"each"``, the default here).

    Parameters: ``shape`` (the tensor's shape, at least one axis). Batch statistics take a
    gradient (or sampled gradient) tensor of that shape.
    """

    default_kind = "root"
    default_split = "each"

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(int(s) for s in shape)
        if not self.shape:
            raise ShapeError(
                "TensorBlock needs a tensor with at least one axis; precondition scalars "
                "elementwise (e.g. reshape them to (1,))"
            )
        self.dims = self.shape

    def __repr__(self) -> str:
        return f"TensorBlock({self.shape})"

    def default_power(self) -> float:
        """-1/(2k) for a k-way tensor: Shampoo's inverse 2k-th roots."""
        return -1.0 / (2 * len(self.shape))

    def param_like(self, like: Array) -> Array:
        backend = backend_of(like)
        return backend.xp.zeros(self.shape, dtype=like.dtype, device=backend.device(like))

    def _to_tensor(self, v: Array) -> Array:
        if tuple(v.shape) != self.shape:
            raise ShapeError(f"TensorBlock{self.shape} got a tensor of shape {tuple(v.shape)}")
        return v

    def _from_tensor(self, t: Array) -> Array:
        return t

    def batch_statistics(self, grad: Array) -> tuple[Array, ...]:
        """``(G_1, ..., G_k)`` of one gradient tensor (:func:`~.statistics.mode_statistics`)."""
        if tuple(grad.shape) != self.shape:
            raise ShapeError(
                f"TensorBlock{self.shape} got a gradient of shape {tuple(grad.shape)}"
            )
        return mode_statistics(grad)
