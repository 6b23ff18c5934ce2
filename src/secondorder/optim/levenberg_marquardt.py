"""Levenberg-Marquardt with the dense generalised Gauss-Newton matrix (small problems only).

The GGN is formed explicitly as a (p, p) matrix, p the number of parameters, and the damped
system solved directly at every step: O(p^2) memory and O(p^3) time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from ..curvature import GGN
from ..errors import HyperparameterError
from ..losses import Loss
from ..tree import add, ravel
from .base import Array, Batch, Optimizer, StepInfo, Tree, is_number, select
from .dense_size import warn_if_too_large
from .directions import dense_system, newton_direction
from .schedules import Schedule, is_schedule, resolve, resolve_adaptation
from .state import initial_count, method_state
from .step_rules import (
    apply_transform,
    check_transform,
    init_transform,
    more_damping,
    reduction_ratio,
    zero_where_rejected,
)

SCALINGS = ("more", "identity")


@method_state("LevenbergMarquardt")
class LevenbergMarquardtState(NamedTuple):
    """Step count, the damping lambda, Moré's running diagonal scale and the update
    transform's state (``()`` without a transform)."""

    count: Array
    damping: Array
    scale: Array
    transform: Any = ()

class LevenbergMarquardt(Optimizer):
    """Levenberg-Marquardt: damped Gauss-Newton steps with the damping adapted by the
    reduction ratio (Moré 1978), with the dense Gauss-Newton matrix (small problems only).

    With g the gradient and G = (1/m) J^T H_L J the generalised Gauss-Newton matrix of the mean
    loss f on the batch (formed as a p x p matrix: memory p^2, time p^3 per step), each step
    solves

        (G + lambda D) d = -g

    and compares the actual with the predicted decrease, both on the same batch:

        rho = (f(w) - f(w + d)) / (-(g^T d + 1/2 d^T G d)).

    * the step is accepted (w <- w + d) if rho > 0, otherwise w is kept;
    * lambda <- lambda * ``decrease`` if rho > 3/4, lambda <- lambda * ``increase`` if
      rho < 1/4, then lambda is clipped to [``min_damping``, ``max_damping``].

    The thresholds 1/4 and 3/4 are Moré's (1978); the defaults ``increase=2`` and
    ``decrease=1/3`` are the factors of Nielsen's (1999) widely used rule. A trial point with a
    non-finite loss, or a non-positive predicted decrease (g = 0), counts as rho = -inf
    (rejected, lambda increased).

    Parameters
    ----------
    apply, loss:
        The network ``apply(params, x)`` (or a residual function) and the
        :class:`~secondorder.losses.Loss`; the objective is the mean loss on the batch.
    damping: float or schedule, default 1.0
        lambda. A number is the initial damping, adapted as above. A schedule (a callable
        ``t -> lambda_t`` of the step count t = 0, 1, ..., e.g. an optax schedule) sets lambda at
        every step and replaces the adaptation (as in kfac-jax); it is not clipped.
    scaling: {"more", "identity"}, default "more"
        D. ``"more"`` is Moré's scale-invariant damping: D = diag(max over the steps so far of
        diag(G)) (kept in the state as ``scale``; entries still 0 are replaced by 1, as MINPACK
        does for zero Jacobian columns). ``"identity"`` uses D = I (classical LM).
    increase, decrease: float, default 2.0 and 1/3
        The damping factors (increase > 1, 0 < decrease < 1).
    min_damping, max_damping: float, default 1e-10 and 1e10
        The interval the adapted lambda is clipped to.
    adapt_damping: bool or None, default None
        Whether lambda is adapted. None: adapt unless ``damping`` is a schedule; False keeps a
        number fixed; True with a schedule raises
        :class:`~secondorder.errors.HyperparameterError`.
    transform: optional
        An update transform (:mod:`secondorder.optim.transforms`) applied to the step the rule
        takes (d if accepted, 0 if not) before it is added to the parameters; the ratio rho and
        the damping follow d itself.

    Schedules are evaluated at the state's step count inside ``step`` (eagerly, under
    ``jax.jit`` and under ``jax.vmap``); a rejected step keeps the count.

    State and info. The state is a :class:`LevenbergMarquardtState`: the step count, lambda
    (0-d; with a schedule, the value the last step used), Moré's running scale and the
    transform's state. ``info.damping`` is lambda after the update; ``info.extras`` holds
    ``rho`` and ``predicted`` (g^T d + 1/2 d^T G d). A non-finite loss, gradient or GGN keeps
    the old parameters and state and multiplies lambda by
    :attr:`Optimizer.damping_boost_on_failure` (not with a damping schedule).

    Assembled from :func:`~secondorder.optim.directions.dense_system`,
    :func:`~secondorder.optim.directions.newton_direction` (``method="solve"`` with the scale
    D), :func:`~secondorder.optim.step_rules.reduction_ratio` and
    :func:`~secondorder.optim.step_rules.more_damping`.
    """

    State = LevenbergMarquardtState
    param_dtypes = ("float32", "float64")
    hyperparameters = {"damping": "> 0", "increase": "> 1", "decrease": "(0, 1)",
                       "min_damping": "> 0", "max_damping": "> 0"}  # noqa: RUF012
    info_extras = ("rho", "predicted")

    def __init__(self, apply: Callable, loss: Loss, *, damping: float | Schedule = 1.0,
                 scaling: str = "more", increase: float = 2.0, decrease: float = 1.0 / 3.0,
                 min_damping: float = 1e-10, max_damping: float = 1e10,
                 adapt_damping: bool | None = None, transform: Any = None):
        super().__init__(apply, loss)
        check_transform(transform, "LevenbergMarquardt")
        #: whether Moré's rule adapts the damping (off with a damping schedule)
        self.adapt_damping = resolve_adaptation(adapt_damping, damping, "LevenbergMarquardt")
        if scaling not in SCALINGS:
            raise HyperparameterError(f"unknown scaling {scaling!r}: use 'more' or 'identity'")
        if is_number(min_damping, damping, max_damping) and not (
                0 < min_damping <= damping <= max_damping):
            raise HyperparameterError(
                "LevenbergMarquardt needs 0 < min_damping <= damping <= max_damping")
        self.damping, self.scaling = damping, scaling
        self.increase, self.decrease = increase, decrease
        self.min_damping, self.max_damping = min_damping, max_damping
        self.transform = transform

    def __repr__(self) -> str:
        return f"LevenbergMarquardt(damping={self.damping}, scaling={self.scaling!r})"

    def init(self, params: Tree) -> LevenbergMarquardtState:
        warn_if_too_large("LevenbergMarquardt", params)
        flat, _ = ravel(params)
        backend = self.backend(flat)
        count = initial_count(backend, backend.device(flat))
        return LevenbergMarquardtState(count,
                                       self.scalar(params, resolve(self.damping, count, params)),
                                       backend.xp.zeros_like(flat),
                                       init_transform(self.transform, params))

    def step(self, params: Tree, state: LevenbergMarquardtState, batch: Batch
             ) -> tuple[Tree, LevenbergMarquardtState, StepInfo]:
        backend = self.check_batch(params, state, batch)
        xp = backend.xp
        system = dense_system(self.apply, self.loss, GGN, params, batch)
        loss, g, gmat = system.loss, system.g, system.sym
        scheduled = is_schedule(self.damping)
        lam = resolve(self.damping, state.count, params) if scheduled else state.damping

        scale = state.scale
        if self.scaling == "more":
            scale = xp.maximum(scale, xp.linalg.diagonal(gmat))
            diag = xp.where(scale > 0, scale, xp.ones_like(scale))
        else:
            diag = xp.ones_like(scale)
        d = newton_direction(g, gmat, lam, method="solve", diag=diag)

        step = system.unravel(d)
        trial = add(params, step)
        model = xp.sum(g * d) + 0.5 * xp.sum(d * (gmat @ d))
        rho = reduction_ratio(self.objective(trial, batch), loss, model)
        accept = rho > 0
        if self.adapt_damping:
            lam = more_damping(rho, lam, self.increase, self.decrease,
                               min_damping=self.min_damping, max_damping=self.max_damping)
        inner, update = state.transform, None
        if self.transform is None:
            new = select(accept, trial, params)
        else:
            new, update, inner = apply_transform(self.transform,
                                                 zero_where_rejected(accept, step), inner,
                                                 params)
        params, state, ok, step_norm = self.guard(
            params, state, new, LevenbergMarquardtState(state.count + 1, lam, scale, inner),
            loss, system.grad, system.raw, d, damping_key=None if scheduled else "damping",
            update=update)
        return params, state, self.info(params, loss, step_norm, damping=state.damping,
                                        finite=ok, extras={"rho": rho, "predicted": model})
