"""``Hessian``: the Hessian of the mean loss with respect to the parameters."""

from __future__ import annotations

from collections.abc import Callable

from ..backends import backend_of
from ..backends.bridge import for_autodiff
from ..linalg import LinearOperator, Structure
from ..linalg.operator import placement
from ..losses import Loss
from .base import Array, Tree, check_batch


class Hessian(LinearOperator):
    """H v = d/dt grad L(params + t v) at t = 0, forward over reverse, L the mean loss.

    The gradient map is linearised once (``linearize``) and the linearisation reused per product
    (B. A. Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation 6, 1994).

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
        x, y = batch
        backend = backend_of(params, x)
        if validate:  # optimisers skip it and reject non-finite steps through their guard
            check_batch(backend, x)
            loss.check(apply(params, x), y)
        self.apply, self.loss, self.params, self.x, self.y = apply, loss, params, x, y

        x_f, y_f = for_autodiff(backend, (x, y))

        def mean_loss(p: Tree) -> Array:
            return loss.value(apply(p, x_f), y_f)

        # the inner gradient on the backend of its argument: on CuPy that is torch's, inside
        # the outer linearisation (which runs on torch)
        self.gradient, self._hvp = backend.linearize(
            lambda p: backend_of(p).grad(mean_loss, p), params)
        s = Structure.of(params)
        super().__init__(s, s, *placement(params))

    def _matvec(self, v: Tree) -> Tree:
        return self._hvp(v)

    _rmatvec = _matvec

    def transpose(self) -> LinearOperator:
        return self
