"""Levenberg-Marquardt with the dense generalised Gauss-Newton matrix (small problems only).

The GGN is formed explicitly as a (p, p) matrix, p the number of parameters, and the damped
system solved directly at every step: O(p^2) memory and O(p^3) time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from ..curvature import GGN
from ..errors import HyperparameterError
from ..losses import Loss
from ..tree import add, ravel
from .base import Array, Batch, Optimizer, StepInfo, Tree, adapt_damping, is_number, select
from .newton import dense_system
from .state import initial_count, method_state

SCALINGS = ("more", "identity")


@method_state("LevenbergMarquardt")
class LevenbergMarquardtState(NamedTuple):
    """Step count, the damping lambda and Moré's running diagonal scale."""

    count: Array
    damping: Array
    scale: Array

class LevenbergMarquardt(Optimizer):
    """Damped Gauss-Newton steps with the damping adapted by the reduction ratio.

    With g the gradient and G = (1/m) J^T H J the GGN of the mean loss f on the batch, each step
    solves (G + lambda D) d = -g and compares the actual with the predicted decrease, both on the
    same batch:

        rho = (f(w) - f(w + d)) / (-(g^T d + 1/2 d^T G d)).

    * the step is accepted (w <- w + d) if rho > 0, otherwise w is kept;
    * lambda <- lambda * ``decrease`` if rho > 3/4, lambda <- lambda * ``increase`` if rho < 1/4,
      then lambda is clipped to [``min_damping``, ``max_damping``].

    The thresholds 1/4 and 3/4 are Moré's (1978); the defaults ``increase=2`` and
    ``decrease=1/3`` are the factors of Nielsen's (1999) widely used rule. A trial point with a
    non-finite loss, or a non-positive predicted decrease (g = 0), counts as rho = -inf
    (rejected, lambda increased).

    ``scaling="more"`` is Moré's scale-invariant damping: D = diag(max over the steps so far of
    diag(G)) (kept in the state as ``"scale"``; entries still 0 are replaced by 1, as MINPACK
    does for zero Jacobian columns). ``scaling="identity"`` uses D = I (classical LM).
    ``info.damping`` is lambda after the update. Memory p^2, time p^3 per step.
    """

    State = LevenbergMarquardtState

    def __init__(self, apply: Callable, loss: Loss, *, damping: float = 1.0,
                 scaling: str = "more", increase: float = 2.0, decrease: float = 1.0 / 3.0,
                 min_damping: float = 1e-10, max_damping: float = 1e10):
        super().__init__(apply, loss)
        if scaling not in SCALINGS:
            raise HyperparameterError(f"unknown scaling {scaling!r}: use 'more' or 'identity'")
        if is_number(min_damping, damping, max_damping) and not (
                0 < min_damping <= damping <= max_damping):
            raise HyperparameterError(
                "LevenbergMarquardt needs 0 < min_damping <= damping <= max_damping")
        if is_number(increase, decrease) and not (increase > 1 and 0 < decrease < 1):
            raise HyperparameterError("LevenbergMarquardt needs increase > 1 and 0 < decrease < 1")
        self.damping, self.scaling = damping, scaling
        self.increase, self.decrease = increase, decrease
        self.min_damping, self.max_damping = min_damping, max_damping

    def __repr__(self) -> str:
        return f"LevenbergMarquardt(damping={self.damping}, scaling={self.scaling!r})"

    def init(self, params: Tree) -> LevenbergMarquardtState:
        flat, _ = ravel(params)
        backend = self.backend(flat)
        return LevenbergMarquardtState(initial_count(backend, backend.device(flat)),
                                       self.scalar(params, self.damping),
                                       backend.xp.zeros_like(flat))

    def step(self, params: Tree, state: LevenbergMarquardtState, batch: Batch
             ) -> tuple[Tree, LevenbergMarquardtState, StepInfo]:
        self.check_state(params, state)
        loss, grad, g, unravel, ggn, gmat = dense_system(self, GGN, params, batch)
        xp = self.backend(params).xp
        lam = state["damping"]

        scale = state["scale"]
        if self.scaling == "more":
            scale = xp.maximum(scale, xp.linalg.diagonal(gmat))
            diag = xp.where(scale > 0, scale, xp.ones_like(scale))
        else:
            diag = xp.ones_like(scale)
        system = gmat + lam * (xp.eye(g.shape[0], dtype=g.dtype, device=self.backend(g).device(g))
                               * diag[None, :])
        d = -xp.linalg.solve(system, g[:, None])[:, 0]

        trial = add(params, unravel(d))
        new_loss = self.objective(trial, batch)
        predicted = -(xp.sum(g * d) + 0.5 * xp.sum(d * (gmat @ d)))
        ratio = (loss - new_loss) / xp.where(predicted > 0, predicted, xp.ones_like(predicted))
        minus_inf = self.scalar(params, -float("inf"))
        rho = xp.where(xp.logical_and(predicted > 0, xp.isfinite(new_loss)), ratio, minus_inf)

        accept = rho > 0
        new = select(accept, trial, params)
        lam = adapt_damping(rho, lam, self.increase, self.decrease)
        lam = xp.clip(lam, min=self.min_damping, max=self.max_damping)
        params, state, ok, step_norm = self.guard(
            params, state, new, LevenbergMarquardtState(state.count + 1, lam, scale), loss,
            grad, ggn, d, damping_key="damping")
        return params, state, self.info(params, loss, step_norm, damping=state.damping,
                                        finite=ok, extras={"rho": rho, "predicted": -predicted})
