"""``GGN``: the generalised Gauss-Newton matrix (1/m) sum_i J_i^T H_i J_i of the mean loss."""

from __future__ import annotations

from collections.abc import Callable

from ..losses import Loss
from .base import Array, CurvatureOperator, Tree


class GGN(CurvatureOperator):
    """G = (1/m) J^T H J with H = blockdiag(H_i) the loss Hessians at the outputs.

    A product costs one JVP and one VJP; the forward pass is shared across products. PSD for
    convex losses; equal to the Hessian of the mean loss for a linear network.
    """

    def __init__(self, apply: Callable, loss: Loss, params: Tree, batch: tuple[Array, Array], *,
                 validate: bool = True):
        super().__init__(apply, loss, params, batch, validate=validate)
        self._loss_hvp = loss.hvp_at(self.outputs, self.y)  # H at the fixed outputs, built once

    def _output_space_product(self, u: Array) -> Array:
        return self._loss_hvp(u) / self.lin.batch_size
