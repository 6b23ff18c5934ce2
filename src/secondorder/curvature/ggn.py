"""``GGN``: the generalised Gauss-Newton matrix (1/m) sum_i J_i^T H_i J_i of the mean loss."""

from __future__ import annotations

from collections.abc import Callable

from ..losses import Loss
from .base import Array, CurvatureOperator, Tree


class GGN(CurvatureOperator):
    """G = (1/m) J^T H J with H = blockdiag(H_i) the loss Hessians at the outputs.

    A product costs one JVP and one VJP; the forward pass is shared across products. PSD for
    convex losses; equal to the Hessian of the mean loss for a linear network (N. N.
    Schraudolph, "Fast curvature matrix-vector products for second-order gradient descent",
    Neural Computation 14, 2002).

    Parameters
    ----------
    apply:
        The network ``apply(params, x) -> (m, k) outputs`` (a :class:`~secondorder.models.Model`
        or any function of that signature).
    loss:
        A :class:`~secondorder.losses.Loss` of the outputs and targets, averaged over the batch.
    params:
        The parameter tree at which the curvature is taken; the operator acts on trees of its
        structure or on their flat coordinates.
    batch:
        ``(x, y)``: inputs and targets.
    validate:
        Check the batch for NaN/inf and the targets against the loss (default True).
    """

    def __init__(self, apply: Callable, loss: Loss, params: Tree, batch: tuple[Array, Array], *,
                 validate: bool = True):
        super().__init__(apply, loss, params, batch, validate=validate)
        self._loss_hvp = loss.hvp_at(self.outputs, self.y)  # H at the fixed outputs, built once

    def _output_space_product(self, u: Array) -> Array:
        return self._loss_hvp(u) / self.lin.batch_size
