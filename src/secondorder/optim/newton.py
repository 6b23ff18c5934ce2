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
from ..losses import Loss
from ..tree import axpy, scale
from .base import Array, Batch, Optimizer, StepInfo, Tree, is_number
from .dense_size import warn_if_too_large
from .directions import NEWTON_VARIANTS as VARIANTS
from .directions import dense_system, finite_or_zero, newton_direction
from .line_search import INTERPOLATIONS, check_line_search
from .schedules import Schedule, resolve
from .state import initial_count, method_state
from .step_rules import apply_transform, armijo_step, check_transform, fixed_step, init_transform

__all__ = ["VARIANTS", "Newton", "NewtonState", "dense_system", "finite_or_zero"]


@method_state("Newton")
class NewtonState(NamedTuple):
    """The step count and the update transform's state (``()`` without a transform)."""

    count: Array
    transform: Any = ()

class Newton(Optimizer):
    """Newton's method with the dense Hessian: w <- w + t d, d = -(H + damping I)^{-1} g.

    H is the Hessian and g the gradient of the mean loss on the batch; H is formed as a p x p
    matrix (p the number of parameters) and decomposed as H = Q diag(w) Q^T (``eigh``) at every
    step: memory p^2, time p^3, a baseline for problems with at most a few thousand parameters.
    The two variants are

    * ``"plain"``: d = -Q diag(1 / (w + damping)) Q^T g = -(H + damping I)^{-1} g (Newton's
      step with a Levenberg shift; not a descent direction where H + damping I is indefinite);
    * ``"abs"``: d = -Q diag(1 / (max(|w|, min_eigenvalue) + damping)) Q^T g, the "exact
      Hessian, absolute eigenvalues" baseline of the CurveBall paper (Henriques et al. 2019,
      Table 1; Nocedal & Wright Sec. 3.4): always a descent direction.

    The step length t is ``lr`` with ``line_search=None`` (the pure method). With
    ``line_search="halve"`` or ``"cubic"`` it is the first step from t = ``lr`` down that meets
    the Armijo condition f(w + t d) <= f(w) + c1 t g^T d (Nocedal & Wright eq. 3.4) on the
    step's batch, found by halving, or by quadratic then cubic interpolation (their Sec. 3.5),
    with at most ``max_line_search`` loss evaluations: the globalised Newton method of their
    Algorithm 3.2 with the absolute-value modification. When no trial passes, or d is not a
    descent direction (``"plain"`` with an indefinite H), the parameters are kept
    (``info.step_norm`` is 0).

    Parameters
    ----------
    apply, loss:
        The network ``apply(params, x)`` (or a residual function) and the
        :class:`~secondorder.losses.Loss`; the objective is the mean loss on the batch.
    damping: float or schedule, default 0.0
        The shift added to the eigenvalues, >= 0; a schedule (a callable ``t -> damping_t`` of
        the step count t = 0, 1, ...) sets it at every step (Newton does not adapt it).
    variant: {"plain", "abs"}, default "plain"
        As above.
    lr: float or schedule, default 1.0
        The step length t, or the first trial of the line search; > 0. A schedule of the step
        count sets it at every step.
    min_eigenvalue: float, default 1e-8
        The floor on |eigenvalue| of the ``"abs"`` variant; > 0.
    line_search: {None, "halve", "cubic"}, default None
        The Armijo backtracking rule, or None for the fixed step ``lr``.
    c1: float, default 1e-4
        The sufficient-decrease constant of the Armijo condition, in (0, 1).
    max_line_search: int, default 30
        The most loss evaluations of one line search.
    transform: optional
        An update transform (:mod:`secondorder.optim.transforms`, e.g.
        ``clip_by_global_norm(c)``, a schedule or momentum) applied to the step t d before it is
        added to the parameters, w <- w + T(t d); its state is the last field of the state.

    Schedules are evaluated at the state's step count inside ``step`` (eagerly, under
    ``jax.jit`` and under ``jax.vmap``); a rejected step keeps the count.

    State and info. The state is a :class:`NewtonState` (the step count and the transform's
    state). ``info.damping`` is the damping the step used and ``info.inner_iterations`` the
    number of loss evaluations of the line search. A non-finite loss, gradient, Hessian or
    direction keeps the old parameters and state.

    Assembled from :func:`~secondorder.optim.directions.dense_system`,
    :func:`~secondorder.optim.directions.newton_direction` and the step rules
    :func:`~secondorder.optim.step_rules.fixed_step` /
    :func:`~secondorder.optim.step_rules.armijo_step`.
    """

    State = NewtonState
    hyperparameters = {"damping": ">= 0", "lr": "> 0", "min_eigenvalue": "> 0", "c1": "(0, 1)",
                       "max_line_search": "integer >= 1"}  # noqa: RUF012

    def __init__(self, apply: Callable, loss: Loss, *, damping: float | Schedule = 0.0,
                 variant: str = "plain", lr: float | Schedule = 1.0,
                 min_eigenvalue: float = 1e-8,
                 line_search: str | None = None, c1: float = 1e-4, max_line_search: int = 30,
                 transform: Any = None):
        super().__init__(apply, loss)
        check_transform(transform, "Newton")
        if variant not in VARIANTS:
            raise HyperparameterError(f"unknown Newton variant {variant!r}: use 'plain' or 'abs'")
        if line_search is not None:
            if line_search not in INTERPOLATIONS:
                raise HyperparameterError(f"line_search must be None or one of {INTERPOLATIONS}, "
                                 f"got {line_search!r}")
            check_line_search(line_search, c1, 0.5, max_line_search, lr if is_number(lr) else 1)
        self.damping, self.variant, self.lr, self.min_eigenvalue = (damping, variant, lr,
                                                                    min_eigenvalue)
        self.line_search, self.c1, self.max_line_search = line_search, c1, int(max_line_search)
        self.transform = transform

    def __repr__(self) -> str:
        return (f"Newton(variant={self.variant!r}, damping={self.damping}, lr={self.lr}, "
                f"line_search={self.line_search!r})")

    def init(self, params: Tree) -> NewtonState:
        warn_if_too_large("Newton", params)
        leaf = self.scalar(params, 0.0)
        return NewtonState(initial_count(self.backend(leaf), self.backend(leaf).device(leaf)),
                           init_transform(self.transform, params))

    def step(self, params: Tree, state: NewtonState, batch: Batch
             ) -> tuple[Tree, NewtonState, StepInfo]:
        backend = self.check_batch(params, state, batch)
        system = dense_system(self.apply, self.loss, Hessian, params, batch)
        loss, g = system.loss, system.g
        damping = resolve(self.damping, state.count, params)
        d = newton_direction(g, system.sym, damping, variant=self.variant,
                             min_eigenvalue=self.scalar(params, self.min_eigenvalue))
        step = system.unravel(d)
        search = fixed_step(loss, self.scalar(params, resolve(self.lr, state.count, params)))
        if self.line_search is not None:
            search = armijo_step(backend, lambda p: self.objective(p, batch), params, step, loss,
                                 backend.xp.sum(g * d), search.step, c1=self.c1,
                                 max_trials=self.max_line_search,
                                 interpolation=self.line_search)
        t = search.step
        inner, update = state.transform, None
        if self.transform is None:
            new = axpy(t, step, params)
        else:
            new, update, inner = apply_transform(self.transform, scale(t, step), inner, params)
        params, state, ok, step_norm = self.guard(
            params, state, new, NewtonState(state.count + 1, inner), loss, system.grad,
            system.raw, d, update=update)
        return params, state, self.info(params, loss, step_norm, damping=damping,
                                        finite=ok, inner_iterations=search.evaluations)
