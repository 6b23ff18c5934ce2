"""Newton's method with the dense Hessian of the mean loss (small problems only).

The Hessian is formed explicitly as a (p, p) matrix, p the number of parameters, from p
Hessian-vector products, and decomposed with ``eigh`` at every step: O(p^2) memory and O(p^3)
time, so this is a baseline for problems with at most a few thousand parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from ..curvature import Hessian
from ..errors import HyperparameterError
from ..linalg import eigh
from ..losses import Loss
from ..tree import axpy, ravel
from .base import Array, Batch, Optimizer, StepInfo, Tree, is_number
from .line_search import INTERPOLATIONS, backtracking, check_line_search
from .state import initial_count, method_state

VARIANTS = ("plain", "abs")


def dense_system(opt: Optimizer, operator: Callable, params: Tree, batch: Batch
                 ) -> tuple[Array, Tree, Array, Callable, Array, Array]:
    """What the dense small-problem methods share: ``(loss, grad, g, unravel, raw, sym)`` with
    g the flat gradient, ``raw`` the dense curvature of ``operator(apply, loss, params, batch)``
    (built without validation: a non-finite batch gives non-finite entries, which the caller
    passes to the guard) and ``sym`` its symmetric part with non-finite entries zeroed (safe to
    decompose)."""
    loss, grad = opt.value_and_grad(params, batch)
    xp = opt.backend(params).xp
    g, unravel = ravel(grad)
    raw = operator(opt.apply, opt.loss, params, batch, validate=False).to_dense()
    sym = finite_or_zero(0.5 * (raw + xp.linalg.matrix_transpose(raw)))
    return loss, grad, g, unravel, raw, sym


def finite_or_zero(a: Array) -> Array:
    """``a`` with its non-finite entries replaced by 0, so that a decomposition or solve never
    raises; the raw array is checked by the guard, which then rejects the step."""
    xp = _xp(a)
    return xp.where(xp.isfinite(a), a, xp.zeros_like(a))


def _xp(a: Array) -> Any:
    return Optimizer.backend(a).xp


@method_state("Newton")
class NewtonState(NamedTuple):
    """Newton keeps no state but its step count."""

    count: Array

class Newton(Optimizer):
    """w <- w + t d with d = -(H + damping I)^{-1} g, H the dense Hessian of the mean loss.

    With H = Q diag(w) Q^T (``eigh``), the two variants are

    * ``"plain"``: d = -Q diag(1 / (w + damping)) Q^T g, i.e. -(H + damping I)^{-1} g (not a
      descent direction where H + damping I is indefinite);
    * ``"abs"``: d = -Q diag(1 / (max(|w|, min_eigenvalue) + damping)) Q^T g, the "exact Hessian,
      absolute eigenvalues" baseline of the CurveBall paper (Table 1): always a descent direction.

    The step length t is ``lr`` with ``line_search=None`` (the pure method). With
    ``line_search="halve"`` or ``"cubic"`` it is the first step from t = ``lr`` down that meets
    the Armijo condition f(w + t d) <= f(w) + c1 t g^T d on the step's batch, found by
    :func:`~secondorder.optim.line_search.backtracking` (halving, or quadratic then cubic
    interpolation; at most ``max_line_search`` loss evaluations): the globalised Newton method
    of Nocedal and Wright (2006), Algorithm 3.2 with the absolute-value modification. When no
    trial passes, or d is not a descent direction (``"plain"`` with an indefinite H), the
    parameters are kept (``info.step_norm`` is 0). ``info.inner_iterations`` counts the loss
    evaluations of the search.

    The state is empty; ``info.damping`` is the fixed ``damping``. Memory p^2, time p^3 per step.
    """

    State = NewtonState

    def __init__(self, apply: Callable, loss: Loss, *, damping: float = 0.0,
                 variant: str = "plain", lr: float = 1.0, min_eigenvalue: float = 1e-8,
                 line_search: str | None = None, c1: float = 1e-4, max_line_search: int = 30):
        super().__init__(apply, loss)
        if variant not in VARIANTS:
            raise HyperparameterError(f"unknown Newton variant {variant!r}: use 'plain' or 'abs'")
        if is_number(damping, lr, min_eigenvalue) and (damping < 0 or lr <= 0
                                                       or min_eigenvalue <= 0):
            raise HyperparameterError("Newton needs damping >= 0, lr > 0 and min_eigenvalue > 0")
        if line_search is not None:
            if line_search not in INTERPOLATIONS:
                raise HyperparameterError(f"line_search must be None or one of {INTERPOLATIONS}, "
                                 f"got {line_search!r}")
            check_line_search(line_search, c1, 0.5, max_line_search, lr if is_number(lr) else 1)
        self.damping, self.variant, self.lr, self.min_eigenvalue = (damping, variant, lr,
                                                                    min_eigenvalue)
        self.line_search, self.c1, self.max_line_search = line_search, c1, int(max_line_search)

    def __repr__(self) -> str:
        return (f"Newton(variant={self.variant!r}, damping={self.damping}, lr={self.lr}, "
                f"line_search={self.line_search!r})")

    def init(self, params: Tree) -> NewtonState:
        leaf = self.scalar(params, 0.0)
        return NewtonState(initial_count(self.backend(leaf), self.backend(leaf).device(leaf)))

    def step(self, params: Tree, state: NewtonState, batch: Batch
             ) -> tuple[Tree, NewtonState, StepInfo]:
        self.check_state(params, state)
        loss, grad, g, unravel, hess, sym = dense_system(self, Hessian, params, batch)
        xp = self.backend(params).xp
        w, q = eigh(sym)
        if self.variant == "abs":
            w = xp.maximum(xp.abs(w), self.scalar(params, self.min_eigenvalue))
        d = -(q @ ((xp.linalg.matrix_transpose(q) @ g) / (w + self.damping)))
        step = unravel(d)
        t, evaluations = self.scalar(params, self.lr), 0
        if self.line_search is not None:
            search = backtracking(
                self.backend(params),
                lambda s: self.objective(axpy(s, step, params), batch),
                loss, xp.sum(g * d), t, c1=self.c1, max_trials=self.max_line_search,
                interpolation=self.line_search)
            t, evaluations = search.step, search.evaluations
        new = axpy(t, step, params)
        params, state, ok, step_norm = self.guard(params, state, new,
                                                  NewtonState(state.count + 1), loss, grad,
                                                  hess, d)
        return params, state, self.info(params, loss, step_norm, damping=self.damping,
                                        finite=ok, inner_iterations=evaluations)
