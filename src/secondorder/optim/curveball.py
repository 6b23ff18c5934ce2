"""CurveBall (Henriques et al. 2019, "Small Steps and Giant Leaps: Minimal Newton Solvers for
Deep Learning"): one interleaved step of a quadratic-model solver per parameter step, with
automatic momentum and learning rate. The algorithm, its parameters and its state are described
in the docstring of :class:`CurveBall` (``help(CurveBall)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from .._pytree import tree_map
from ..backends import backend_of
from ..errors import HyperparameterError
from ..losses import Loss
from ..tree import add
from .base import Array, Batch, Optimizer, StepInfo, Tree, is_number, select
from .directions import curveball_2x2, curveball_direction, curveball_quantities
from .schedules import Schedule, is_schedule, resolve, resolve_adaptation
from .state import every, initial_count, method_state
from .step_rules import apply_transform, check_transform, curveball_damping, init_transform

__all__ = ["CurveBall", "CurveBallState"]


@method_state("CurveBall")
class CurveBallState(NamedTuple):
    """Step count, the carried search direction z, the damping lambda and the update
    transform's state (``()`` without a transform)."""

    count: Array
    z: Tree
    damping: Array
    transform: Any = ()


class CurveBall(Optimizer):
    """CurveBall (Henriques et al. 2019, Algorithm 1): z <- rho z - beta Delta, w <- w + z.

    One step at parameters w, with the search direction z carried over from the previous step,
    on the batch (x, y): outputs f = apply(w, x), J the Jacobian of w -> f, H_L the Hessian and
    J_L the gradient of the mean loss with respect to f, lambda the damping::

        u = J z                                      (one JVP)
        Delta = J^T (H_L u + J_L) + lambda z         (one VJP)           eqs. 16-17
        v = J Delta                                  (one JVP)
        a = v^T H_L v + lambda |Delta|^2,   b = u^T H_L v + lambda z^T Delta,
        c = u^T H_L u + lambda |z|^2,       d = J_L^T v,   e = J_L^T u
        [beta; -rho] = [[a, b], [b, c]]^{-1} [d; e]                       eq. 18
        z <- rho z - beta Delta,   w <- w + z.

    (rho, beta) minimise the damped quadratic model along span(z, Delta). At the first step
    z = 0 makes the 2x2 matrix singular; its pseudo-inverse gives beta = d / a, rho = 0.

    Damping (Sec. 3, "automatic lambda hyper-parameter rescaling"): every ``lambda_interval``
    steps, gamma = (f(w + z) - f(w)) / (1/2 (rho e - beta d)) compares the loss change on the
    batch with the model's predicted change at the optimum of eq. 18; gamma > high multiplies
    lambda by ``lambda_factor``, gamma < low (or not finite) divides it by ``lambda_factor``,
    and lambda is floored at ``min_damping``. Cost with the GGN: the forward pass, two JVPs
    and one VJP per step, plus one loss evaluation per adaptation.

    Parameters
    ----------
    apply, loss:
        The network ``apply(params, x)`` and the :class:`~secondorder.losses.Loss`; the
        objective is the mean loss of ``apply(params, x)`` against ``y``.
    damping: float or schedule, default 10.0
        lambda (the paper uses 10, or 1 with batch normalisation). A number is the initial
        damping, adapted as above. A schedule (a callable ``t -> lambda_t`` of the step count
        t = 0, 1, ..., e.g. an optax schedule) sets lambda at every step and replaces the
        adaptation (as in kfac-jax).
    rho, beta: float, schedule or None, default None
        Fixed momentum and step (the paper's fixed-hyperparameter variant), numbers or
        schedules of the step count; give both or neither. None: from eq. 18 at every step.
    curvature: {"ggn", "hessian"}, default "ggn"
        H_L is the loss Hessian on the outputs and J^T H_L J the Gauss-Newton matrix (PSD for
        convex losses); "hessian" uses Hessian-vector products of the loss in the parameters
        instead (losing the PSD guarantee).
    adapt_damping: bool or None, default None
        Adapt lambda as above. None: adapt when rho and beta are automatic and the damping is a
        number. True with fixed rho and beta, or with a damping schedule, raises
        :class:`~secondorder.errors.HyperparameterError` (gamma needs the eq. 18 optimum; a
        schedule already sets lambda).
    lambda_interval: int, default 5
        Adapt every this many steps.
    lambda_factor: float, default 0.999
        The factor of the adaptation, in (0, 1].
    lambda_thresholds: (float, float), default (0.5, 1.5)
        The thresholds (low, high) on gamma.
    min_damping: float, default 0.0
        Floor on the adapted lambda.
    transform: optional
        An update transform (:mod:`secondorder.optim.transforms`: clipping, a schedule,
        momentum) applied to the step z before it is added to the parameters, w <- w + T(z);
        the carried direction z, the ratio gamma and the damping follow z itself.

    Schedules are evaluated at the state's step count inside ``step`` (eagerly, under
    ``jax.jit`` and under ``jax.vmap``); a rejected step keeps the count.

    State and info. The state is a :class:`CurveBallState`: the step count, z (a tree like the
    parameters), lambda (0-d; with a schedule, the value the last step used) and the
    transform's state (``()`` without one). ``info.extras`` holds ``rho``, ``beta`` and
    ``predicted`` (the model's predicted change 1/2 (rho e - beta d); NaN with fixed rho and
    beta). A non-finite loss or step keeps the old parameters and state and multiplies lambda
    by :attr:`Optimizer.damping_boost_on_failure` (not with a damping schedule).

    Assembled from :func:`~secondorder.optim.directions.curveball_direction` (Delta, the 2x2
    subproblem and the predicted change) and
    :func:`~secondorder.optim.step_rules.curveball_damping`.
    """

    State = CurveBallState
    hyperparameters = {"damping": ">= 0", "lambda_interval": "integer >= 1",
                       "lambda_factor": "(0, 1]", "min_damping": ">= 0"}  # noqa: RUF012
    info_extras = ("rho", "beta", "predicted")

    def __init__(self, apply: Callable, loss: Loss, *, damping: float | Schedule = 10.0,
                 rho: float | Schedule | None = None, beta: float | Schedule | None = None,
                 curvature: str = "ggn", adapt_damping: bool | None = None,
                 lambda_interval: int = 5,
                 lambda_factor: float = 0.999, lambda_thresholds: tuple[float, float] = (0.5, 1.5),
                 min_damping: float = 0.0, transform: Any = None):
        super().__init__(apply, loss)
        check_transform(transform, "CurveBall")
        if (rho is None) != (beta is None):
            raise HyperparameterError(
                "give both rho and beta (fixed variant) or neither (automatic)")
        if curvature not in ("ggn", "hessian"):
            raise HyperparameterError(
                f"curvature must be 'ggn' or 'hessian', got {curvature!r}")
        if int(lambda_interval) != lambda_interval or lambda_interval < 1:
            raise HyperparameterError(
                f"lambda_interval must be an integer >= 1, got {lambda_interval}")
        if (not isinstance(lambda_thresholds, tuple | list) or len(lambda_thresholds) != 2
                or any(isinstance(t, str | bytes) for t in lambda_thresholds)):
            raise HyperparameterError(
                f"CurveBall: lambda_thresholds={lambda_thresholds!r} is not valid; give two "
                "numbers (low, high) with low < high, e.g. (0.5, 1.5)")
        low, high = lambda_thresholds
        if is_number(low, high) and not low < high:
            raise HyperparameterError("lambda_thresholds must be (low, high) with low < high")
        if adapt_damping is None and rho is not None:
            adapt_damping = False
        adapt_damping = resolve_adaptation(adapt_damping, damping, "CurveBall")
        if adapt_damping and rho is not None:
            raise HyperparameterError(
                "damping adaptation needs the model's predicted change from the automatic "
                "rho and beta; use adapt_damping=False with fixed rho and beta"
            )
        self.damping, self.rho, self.beta = damping, rho, beta
        self.curvature = curvature
        self.adapt_damping, self.interval = adapt_damping, int(lambda_interval)
        self.factor, self.low, self.high = lambda_factor, low, high
        self.min_damping = min_damping
        self.transform = transform

    def init(self, params: Tree) -> CurveBallState:
        lam = self.scalar(params, 0.0 if is_schedule(self.damping) else self.damping)
        backend = backend_of(lam)
        count = initial_count(backend, backend.device(lam))
        if is_schedule(self.damping):  # the value the first step will use
            lam = resolve(self.damping, count, params)
        return CurveBallState(count, tree_map(lambda a: a * 0.0, params), lam,
                              init_transform(self.transform, params))

    def _quantities(self, params: Tree, z: Tree, lam: Array, batch: Batch) -> dict[str, Any]:
        """Delta and the coefficients a..e of eq. 18, plus the loss and gradient, by name
        (:func:`~secondorder.optim.directions.curveball_quantities`)."""
        q = curveball_quantities(self.apply, self.loss, params, z, lam, batch,
                                 curvature=self.curvature, coefficients=self.rho is None)
        if q.grad is None:  # the step does without it (one fused pullback); this view has it
            q = q._replace(grad=self.value_and_grad(params, batch)[1])
        return {k: v for k, v in q._asdict().items() if v is not None}

    #: (rho, beta) from eq. 18 (:func:`~secondorder.optim.directions.curveball_2x2`)
    solve_2x2 = staticmethod(curveball_2x2)

    def step(self, params: Tree, state: CurveBallState, batch: Batch
             ) -> tuple[Tree, CurveBallState, StepInfo]:
        backend = self.check_batch(params, state, batch)
        scheduled = is_schedule(self.damping)
        lam = resolve(self.damping, state.count, params) if scheduled else state.damping
        fixed = {}
        if self.rho is not None:
            fixed = {"rho": self.scalar(params, resolve(self.rho, state.count, params)),
                     "beta": self.scalar(params, resolve(self.beta, state.count, params))}
        q = curveball_direction(self.apply, self.loss, params, state.z, lam, batch,
                                curvature=self.curvature, **fixed)
        z_new = q.z
        checks = () if q.grad is None else (q.grad,)
        verdict, selected = None, False
        trial = add(params, z_new)
        if self.transform is None and not backend.is_concrete(q.loss):
            # traced: the guard's flag first, and the returned parameters formed once, as
            # select(ok, params + z, params); the damping update below evaluates the loss there,
            # at the trial parameters whenever the step is accepted (a rejected step keeps the
            # old state, so its damping update is discarded)
            verdict = self.verdict(q.loss, *checks, update=z_new)
            trial, selected = select(verdict[0], trial, params), True
        count = state.count + 1
        lam_new = lam
        if self.adapt_damping:
            def adapted(_: Any) -> Array:
                gamma = (self.objective(trial, batch) - q.loss) / q.predicted
                return curveball_damping(gamma, lam, self.factor, self.low, self.high,
                                         self.scalar(params, self.min_damping))

            lam_new = every(backend, count, self.interval, adapted, lambda _: lam, None)
        new_params, inner, update = trial, state.transform, z_new
        if self.transform is not None:
            new_params, update, inner = apply_transform(self.transform, z_new, inner, params)
        new_state = CurveBallState(count, z_new, lam_new, inner)
        params, state, ok, step_norm = self.guard(
            params, state, new_params, new_state, q.loss, *checks,
            damping_key=None if scheduled else "damping", update=update, verdict=verdict,
            selected=selected)
        extras = {"rho": q.rho, "beta": q.beta, "predicted": q.predicted}
        return params, state, self.info(params, q.loss, step_norm, state.damping, ok,
                                        extras=extras)
