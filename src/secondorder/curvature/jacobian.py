"""``Jacobian``: J of params -> network outputs on a batch, as an operator (m, k) <- params."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..linalg import LinearOperator, Structure
from ..linalg.operator import placement
from .base import Array, Linearization, Tree


class Jacobian(LinearOperator):
    """J v by one JVP, J^T u by one VJP (with the forward pass saved at construction).

    Rows are ordered sample by sample: the output space is the (m, k) array of outputs.
    """

    def __init__(self, apply: Callable[[Tree, Array], Array], params: Tree, x: Array):
        self.lin = Linearization(apply, params, x)
        super().__init__(Structure.of(params), Structure.of(self.lin.outputs), *placement(params))

    @property
    def outputs(self) -> Any:
        return self.lin.outputs

    def _matvec(self, v: Tree) -> Array:
        return self.lin.jvp(v)

    def _rmatvec(self, u: Array) -> Tree:
        return self.lin.vjp(u)


class Gram(LinearOperator):
    """The output-space Gram operator J J^T on (m, k) arrays: u -> J (J^T u).

    This is the (m k) x (m k) matrix of the dual form of the Gauss-Newton / prox-linear subproblem:
    J_S J_S^* with J_S u = (J_1 u, ..., J_m u) and J_S^* v = sum_j J_j^* v_j.
    """

    def __init__(self, apply: Callable[[Tree, Array], Array], params: Tree, x: Array):
        self.lin = Linearization(apply, params, x)
        s = Structure.of(self.lin.outputs)
        super().__init__(s, s, *placement(params))

    @property
    def outputs(self) -> Any:
        return self.lin.outputs

    def _matvec(self, u: Array) -> Array:
        return self.lin.jvp(self.lin.vjp(u))

    _rmatvec = _matvec

    def transpose(self) -> LinearOperator:
        return self
