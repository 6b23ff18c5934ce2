"""``GGN``: the generalised Gauss-Newton matrix (1/m) sum_i J_i^T H_i J_i of the mean loss."""

from __future__ import annotations

from .base import Array, CurvatureOperator


class GGN(CurvatureOperator):
    """G = (1/m) J^T H J with H = blockdiag(H_i) the loss Hessians at the outputs.

    A product costs one JVP and one VJP; the forward pass is shared across products. PSD for
    convex losses; equal to the Hessian of the mean loss for a linear network.
    """

    def _output_space_product(self, u: Array) -> Array:
        return self.loss.hvp(self.outputs, self.y, u) / self.lin.batch_size
