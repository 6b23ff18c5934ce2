"""BFGS with a dense inverse-Hessian approximation and a weak Wolfe line search (small problems).

The approximation is a (p, p) matrix, p the number of parameters: O(p^2) memory and time per step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from ..errors import HyperparameterError
from ..losses import Loss
from ..tree import axpy, ravel
from .base import Array, Batch, Optimizer, StepInfo, Tree, is_number
from .dense_size import warn_if_too_large
from .schedules import Schedule, resolve
from .state import initial_count, method_state


@method_state("BFGS")
class BFGSState(NamedTuple):
    """Step count, the inverse-Hessian estimate H and the number of BFGS updates made."""

    count: Array
    inv_hessian: Array
    updates: Array

class BFGS(Optimizer):
    """BFGS: w <- w + t d with d = -H g, H the inverse-Hessian approximation (state
    ``"inv_hessian"``), for small problems.

    **Line search** (weak Wolfe, bisection/expansion as in Lewis and Overton 2013). With
    phi(t) = f(w + t d), all evaluations on the step's batch, start at t = ``initial_step``,
    lo = 0, hi = inf and repeat at most ``max_line_search`` times:

    * if the Armijo condition phi(t) <= phi(0) + c1 t g^T d fails (or phi(t) is not finite):
      hi = t;
    * elif the curvature condition g(t)^T d >= c2 g^T d fails: lo = t;
    * else stop: t satisfies both weak Wolfe conditions;
    * t = (lo + hi) / 2 if hi is finite, else 2 t.

    The step taken is the Wolfe point, or when none was found the last point that satisfied
    Armijo (lo); when no point satisfied Armijo, w is kept and H is reset to I.
    ``info.inner_iterations`` is the number of function-and-gradient evaluations.

    **Update**, with s = t d and y = g(t) - g, only when y^T s > 0 (skipped otherwise):

        H <- (I - r s y^T) H (I - r y s^T) + r s s^T,   r = 1 / (y^T s)
        (Nocedal and Wright 2006, eq. 6.17).

    H starts as I; right before the first update it is replaced by (y^T s / y^T y) I
    (Nocedal and Wright, eq. 6.20), so the first step is a gradient step found by the line
    search and later steps are scaled to the curvature. ``state["updates"]`` counts the updates.

    Parameters
    ----------
    apply, loss:
        The network ``apply(params, x)`` (or a residual function) and the
        :class:`~secondorder.losses.Loss`; the objective is the mean loss on the batch.
    c1, c2: float, default 1e-4 and 0.9
        The constants of the weak Wolfe conditions, 0 < c1 < c2 < 1 (Nocedal & Wright 2006,
        eqs. 3.6a-b).
    max_line_search: int, default 20
        The most function-and-gradient evaluations of one line search, >= 1.
    initial_step: float or schedule, default 1.0
        The first trial step t of every line search, > 0; a schedule (a callable
        ``t -> step`` of the step count t = 0, 1, ..., evaluated inside ``step`` eagerly, under
        ``jax.jit`` and under ``jax.vmap``) sets it at every step.

    State: a :class:`BFGSState` with the step count, H (p x p, memory p^2) and the number of
    updates. A non-finite loss, gradient or H keeps the old parameters and state.
    """

    State = BFGSState
    hyperparameters = {"c1": "(0, 1)", "c2": "(0, 1)", "max_line_search": "integer >= 1",
                       "initial_step": "> 0"}  # noqa: RUF012

    def __init__(self, apply: Callable, loss: Loss, *, c1: float = 1e-4, c2: float = 0.9,
                 max_line_search: int = 20, initial_step: float | Schedule = 1.0):
        super().__init__(apply, loss)
        if is_number(c1, c2) and not 0 < c1 < c2 < 1:
            raise HyperparameterError("BFGS needs 0 < c1 < c2 < 1")
        if int(max_line_search) < 1 or (is_number(initial_step) and not initial_step > 0):
            raise HyperparameterError("BFGS needs max_line_search >= 1 and initial_step > 0")
        self.c1, self.c2 = c1, c2
        self.max_line_search, self.initial_step = int(max_line_search), initial_step

    def __repr__(self) -> str:
        return f"BFGS(c1={self.c1}, c2={self.c2}, max_line_search={self.max_line_search})"

    def init(self, params: Tree) -> BFGSState:
        warn_if_too_large("BFGS", params, "updates it at every step, O(p^2) time",
                          factors=False)
        flat, _ = ravel(params)
        backend = self.backend(flat)
        dev = backend.device(flat)
        eye = backend.xp.eye(flat.shape[0], dtype=flat.dtype, device=dev)
        return BFGSState(initial_count(backend, dev), eye, self.scalar(params, 0.0))

    def step(self, params: Tree, state: BFGSState, batch: Batch
             ) -> tuple[Tree, BFGSState, StepInfo]:
        self.check_batch(params, state, batch)
        loss, grad = self.value_and_grad(params, batch)
        backend = self.backend(params)
        xp = backend.xp
        g, unravel = ravel(grad)
        h = state["inv_hessian"]
        d = -(h @ g)
        step_dir = unravel(d)
        slope = xp.sum(g * d)

        def evaluate(t: Array) -> tuple[Array, Array]:
            point = axpy(t, step_dir, params)
            value, gradient = self.value_and_grad(point, batch)
            return value, ravel(gradient)[0]

        def searching(carry: tuple) -> Any:
            k, _, _, _, done, _ = carry
            return xp.logical_and(xp.logical_not(done), k < self.max_line_search)

        def bisect(carry: tuple) -> tuple:
            k, t, lo, hi, _, g_lo = carry
            value, g_t = evaluate(t)
            armijo = value <= loss + self.c1 * t * slope  # False for NaN
            curvature = xp.sum(g_t * d) >= self.c2 * slope
            done = xp.logical_and(armijo, curvature)
            hi = xp.where(armijo, hi, t)
            lo = xp.where(armijo, t, lo)  # the last Armijo point (the Wolfe point when done)
            g_lo = xp.where(armijo, g_t, g_lo)
            t = xp.where(done, t, xp.where(xp.isfinite(hi), 0.5 * (lo + hi), 2.0 * t))
            return k + 1, t, lo, hi, done, g_lo

        dev = backend.device(g)
        init = (xp.asarray(0, device=dev),
                self.scalar(params, resolve(self.initial_step, state.count, params)),
                self.scalar(params, 0.0), self.scalar(params, float("inf")),
                xp.asarray(False, device=dev), g)
        evaluations, _, t, _, _, g_new = backend.while_loop(searching, bisect, init)

        s = t * d
        y = g_new - g
        ys = xp.sum(y * s)
        yy = xp.sum(y * y)
        update = ys > 0
        moved = t > 0
        r = 1.0 / xp.where(update, ys, xp.ones_like(ys))
        eye = xp.eye(g.shape[0], dtype=g.dtype, device=dev)
        first = state["updates"] == 0
        h0 = xp.where(first, (ys / xp.where(yy > 0, yy, xp.ones_like(yy))) * eye, h)
        hy = h0 @ y
        h_upd = (h0 - r * (s[:, None] * hy[None, :] + hy[:, None] * s[None, :])
                 + (r * r * xp.sum(y * hy) + r) * (s[:, None] * s[None, :]))
        h_new = xp.where(update, h_upd, xp.where(moved, h, eye))
        updates = xp.where(update, state["updates"] + 1.0,
                           xp.where(moved, state["updates"], xp.zeros_like(state["updates"])))

        new = axpy(t, step_dir, params)
        params, state, ok, step_norm = self.guard(
            params, state, new, BFGSState(state.count + 1, h_new, updates), loss, grad, h_new)
        return params, state, self.info(params, loss, step_norm, finite=ok,
                                        inner_iterations=evaluations)
