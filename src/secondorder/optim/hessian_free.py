"""Hessian-free optimisation (Martens 2010): truncated Newton with CG on a damped curvature.

The algorithm, its parameters and its state are described in the docstring of
:class:`HessianFree` (``help(HessianFree)``). Implementation notes:

CG mode. CG runs in fixed-iteration mode (``tol=None``, ``maxiter=cg_iters``) with the absolute
floor ``atol = cg_tol ||g||`` (the threshold tolerance mode would use, ``cg_tol ||b||``): on JAX
the loop is a ``fori_loop`` of static length, so the jitted step has one static shape and trip
count (and is reverse-differentiable), while the iterates freeze once the relative residual falls
under ``cg_tol``; eager backends leave the loop there. The backtracking candidates are a Python
loop over the static ``save_at`` tuple, unrolled at trace time, not a data-dependent loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

from .. import random
from .._pytree import tree_map
from ..backends import backend_of
from ..errors import HyperparameterError
from ..losses import Loss
from ..tree import add, scale, vdot
from .base import Array, Batch, Optimizer, StepInfo, Tree, is_number, select
from .directions import CURVATURES, curvature_operator, damped_cg_direction
from .schedules import Schedule, is_schedule, resolve, resolve_adaptation
from .state import initial_count, method_state
from .step_rules import (
    apply_transform,
    best_cg_iterate,
    check_transform,
    init_transform,
    more_damping,
    reduction_ratio,
    zero_where_rejected,
)

__all__ = ["CURVATURES", "HessianFree", "HessianFreeState", "backtrack_points"]


def backtrack_points(cg_iters: int, base: float) -> tuple[int, ...]:
    """The CG iteration counts ceil(base^k) <= cg_iters, k = 0, 1, ..., and cg_iters itself,
    increasing and without repeats."""
    points, k = set(), 0
    while True:
        n = math.ceil(base**k)
        if n > cg_iters:
            break
        points.add(n)
        k += 1
    points.add(cg_iters)
    return tuple(sorted(points))


@method_state("HessianFree")
class HessianFreeState(NamedTuple):
    """Step count, the previous CG solution (warm start), the damping lambda and the random
    key of the Monte-Carlo Fisher (split every step; unused by the other curvatures)."""

    count: Array
    direction: Tree
    damping: Array
    key: Array
    transform: Any = ()


class HessianFree(Optimizer):
    """Martens' (2010) Hessian-free method: truncated Newton steps from conjugate gradients on
    a damped curvature matrix (Algorithm 1 of the paper).

    One step at parameters w on a batch (x, y), with f the mean loss on the batch, g = grad f(w)
    and lambda the damping:

    1. B = C + lambda I, with C the generalised Gauss-Newton matrix J^T H_L J
       (``curvature="ggn"``; positive semi-definite for convex losses), the Hessian
       (``curvature="hessian"``) or the one-sample Monte-Carlo Fisher (``curvature="fisher"``:
       J^T g~ g~^T J / m with g~ the loss gradients at targets drawn from the model, an unbiased
       estimate of the GGN for the losses here). One linearisation of the network is shared by
       every product; the Fisher's targets come from a random key in the state, split at every
       step (a jitted step draws new targets every step; every backend draws the same).
    2. CG on B d = -g, started from ``warm_start_decay`` times the previous CG solution (Sec.
       4.5), at most ``cg_iters`` iterations, leaving early once ||B d + g|| <= cg_tol ||g||.
    3. CG-iterate backtracking (Sec. 4.6): the iterates after ceil(backtrack_base^k) <=
       ``cg_iters`` iterations, and the last, are kept, and the one with the lowest batch
       objective f(w + lr d_i) is taken (every candidate is evaluated and ties go to the later
       iterate, so the choice is never worse than Martens' backward walk).
    4. The step s = lr d is taken only if f(w + s) < f(w); otherwise w is kept.
    5. Damping (Sec. 4.1, the Levenberg-Marquardt heuristic): the reduction ratio
       rho = (f(w + s) - f(w)) / q(s), with q(s) = g^T s + 1/2 s^T C s the *undamped*
       quadratic model; rho < 1/4: lambda <- ``increase`` lambda; rho > 3/4:
       lambda <- ``decrease`` lambda (Martens: 3/2 and 2/3). A model that predicts no decrease
       or a non-finite f(w + s) counts as rho = -inf. The damping is updated whether or not the
       step is accepted.

    Parameters
    ----------
    apply, loss:
        The network ``apply(params, x)`` and the :class:`~secondorder.losses.Loss`; the
        objective is the mean loss of ``apply(params, x)`` against ``y``.
    curvature: {"ggn", "hessian", "fisher"}, default "ggn"
        The matrix C.
    damping: float or schedule, default 1.0
        lambda. A number is the initial damping, adapted by step 5. A schedule (a callable
        ``t -> lambda_t`` of the step count t = 0, 1, ..., e.g. an optax schedule) sets the
        damping at every step and replaces the adaptation (as in kfac-jax).
    cg_iters: int, default 50
        The most CG iterations per step.
    cg_tol: float or None, default 5e-4
        Relative residual at which CG stops early; 0 or None runs all ``cg_iters``.
    warm_start_decay: float, default 0.95
        Factor on the previous CG solution that starts CG, in [0, 1] (0: start from 0).
    backtrack: bool, default True
        CG-iterate backtracking (step 3); False takes the last iterate.
    backtrack_base: float, default 1.3
        The base of the saved iteration counts ceil(base^k); must be > 1.
    increase, decrease: float, default 1.5 and 2/3
        The damping factors of step 5 (increase >= 1, 0 < decrease <= 1).
    lr: float or schedule, default 1.0
        Step length on the CG direction, s = lr d; a schedule of the step count sets it at
        every step.
    seed: int, default 0
        Seed of the random key in the state (used by ``curvature="fisher"`` only).
    adapt_damping: bool or None, default None
        Whether step 5 adapts lambda. None: adapt unless ``damping`` is a schedule; False keeps
        a number fixed; True with a schedule raises
        :class:`~secondorder.errors.HyperparameterError`.
    transform: optional
        An update transform (:mod:`secondorder.optim.transforms`: clipping, momentum, a
        schedule) applied to the step taken (s if accepted, 0 if not) before it is added to the
        parameters; the damping, the reduction ratio and the warm start follow s and d.

    Schedules are evaluated at the state's step count inside ``step`` (eagerly, under
    ``jax.jit`` and under ``jax.vmap``); a rejected step keeps the count.

    State and info. The state is a :class:`HessianFreeState`: the step count, the previous CG
    solution (a tree like the parameters), the damping (0-d; with a schedule, the value the last
    step used), the random key (int32, shape (2,)) and the transform's state (``()`` without
    one). ``info.extras`` has the reduction ratio ``rho`` and the model's change ``model``;
    ``info.inner_iterations`` counts CG iterations and ``info.inner_residual`` is ||B d + g||.
    A non-finite loss, gradient, CG solution or new parameters keeps the old parameters and
    state and multiplies the damping by :attr:`Optimizer.damping_boost_on_failure` (not with a
    damping schedule); on eager backends a batch the curvature operators refuse as non-finite
    is handled the same way.

    Assembled from :func:`~secondorder.optim.directions.curvature_operator`,
    :func:`~secondorder.optim.directions.damped_cg_direction` and the step rules
    :func:`~secondorder.optim.step_rules.best_cg_iterate`,
    :func:`~secondorder.optim.step_rules.reduction_ratio` and
    :func:`~secondorder.optim.step_rules.more_damping`.
    """

    State = HessianFreeState
    hyperparameters = {"damping": ">= 0", "cg_iters": "integer >= 1", "cg_tol": ">= 0",
                       "warm_start_decay": "[0, 1]", "backtrack_base": "> 1",
                       "increase": ">= 1", "decrease": "(0, 1]", "lr": "> 0",
                       "seed": "integer >= 0"}  # noqa: RUF012
    info_extras = ("rho", "model")

    def __init__(self, apply: Callable, loss: Loss, *, curvature: str = "ggn",
                 damping: float | Schedule = 1.0, cg_iters: int = 50,
                 cg_tol: float | None = 5e-4, warm_start_decay: float = 0.95,
                 backtrack: bool = True, backtrack_base: float = 1.3, increase: float = 1.5,
                 decrease: float = 2 / 3, lr: float | Schedule = 1.0, seed: int = 0,
                 adapt_damping: bool | None = None, transform: Any = None):
        super().__init__(apply, loss)
        check_transform(transform, "HessianFree")
        #: whether Moré's rule adapts the damping (off with a damping schedule)
        self.adapt_damping = resolve_adaptation(adapt_damping, damping, "HessianFree")
        if curvature not in CURVATURES:
            raise HyperparameterError(
                f"curvature must be one of {sorted(CURVATURES)}, got {curvature!r}")
        if is_number(damping) and not damping >= 0:
            raise HyperparameterError(f"HessianFree needs damping >= 0, got {damping}")
        if int(cg_iters) != cg_iters or cg_iters < 1:
            raise HyperparameterError(f"cg_iters must be a positive integer, got {cg_iters}")
        if cg_tol is not None and not cg_tol >= 0:
            raise HyperparameterError(f"cg_tol must be >= 0 or None, got {cg_tol}")
        if not 0 <= warm_start_decay <= 1:
            raise HyperparameterError(
                f"warm_start_decay must lie in [0, 1], got {warm_start_decay}")
        if backtrack and not backtrack_base > 1:
            raise HyperparameterError(f"backtrack_base must be > 1, got {backtrack_base}")
        if not (increase >= 1 and 0 < decrease <= 1):
            raise HyperparameterError("HessianFree needs increase >= 1 and 0 < decrease <= 1")
        if is_number(lr) and not lr > 0:
            raise HyperparameterError(f"lr must be > 0, got {lr}")
        self.curvature = curvature
        self.damping = float(damping) if is_number(damping) else damping
        self.cg_iters = int(cg_iters)
        self.cg_tol = 0.0 if cg_tol is None else float(cg_tol)
        self.warm_start_decay = float(warm_start_decay)
        self.backtrack = bool(backtrack)
        self.backtrack_base = float(backtrack_base)
        self.increase, self.decrease = float(increase), float(decrease)
        self.lr = float(lr) if is_number(lr) else lr
        #: seed of the random key in the state (``curvature="fisher"`` only)
        self.seed = int(seed)
        self.transform = transform
        #: CG iteration counts whose iterates are candidates for the step
        self.save_at = (backtrack_points(self.cg_iters, self.backtrack_base) if self.backtrack
                        else (self.cg_iters,))

    def __repr__(self) -> str:
        return (f"HessianFree(curvature={self.curvature!r}, damping={self.damping}, "
                f"cg_iters={self.cg_iters}, cg_tol={self.cg_tol}, backtrack={self.backtrack})")

    def init(self, params: Tree) -> HessianFreeState:
        lam = self.scalar(params, 0.0 if is_schedule(self.damping) else self.damping)
        backend = backend_of(lam)
        dev = backend.device(lam)
        count = initial_count(backend, dev)
        if is_schedule(self.damping):  # the value the first step will use
            lam = resolve(self.damping, count, params)
        return HessianFreeState(count, tree_map(lambda a: a * 0.0, params),
                                lam, random.key(self.seed, backend, dev),
                                init_transform(self.transform, params))

    def step(self, params: Tree, state: HessianFreeState, batch: Batch
             ) -> tuple[Tree, HessianFreeState, StepInfo]:
        self.check_batch(params, state, batch)
        loss, grad = self.value_and_grad(params, batch)
        scheduled = is_schedule(self.damping)
        lam = resolve(self.damping, state.count, params) if scheduled else state.damping
        lr = resolve(self.lr, state.count, params)
        op, next_key = curvature_operator(self.curvature, self.apply, self.loss, params, batch,
                                          state.key)
        direction, cg_info = damped_cg_direction(
            op.matvec, grad, lam, state.direction, warm_start_decay=self.warm_start_decay,
            maxiter=self.cg_iters, tol=self.cg_tol, save_at=self.save_at)

        def objective(p: Tree) -> Array:
            return self.objective(p, batch)

        best_value, best = best_cg_iterate(objective, params, cg_info.saved, lr)
        # reduction ratio against the undamped quadratic model of the step s = lr d
        step = scale(lr, best)
        model = vdot(grad, step) + 0.5 * vdot(step, op.matvec(step))
        rho = reduction_ratio(best_value, loss, model, nonfinite_fails=True)
        new_lam = (more_damping(rho, lam, self.increase, self.decrease) if self.adapt_damping
                   else lam)

        accept = best_value < loss
        inner, update = state.transform, None
        if self.transform is None:
            new_params = select(accept, add(params, step), params)
        else:
            new_params, update, inner = apply_transform(
                self.transform, zero_where_rejected(accept, step), inner, params)
        new_state = HessianFreeState(state.count + 1, direction, new_lam, next_key, inner)
        # the model value holds a curvature product: a NaN curvature stops CG at its finite
        # warm start, so direction alone would pass the guard with a step never solved for
        params, state, ok, step_norm = self.guard(params, state, new_params, new_state, loss,
                                                  grad, direction, model,
                                                  damping_key=None if scheduled else "damping",
                                                  update=update)
        return params, state, self.info(params, loss, step_norm, state.damping, ok,
                                        cg_info.iterations, cg_info.residual_norm,
                                        extras={"rho": rho, "model": model})
