"""Step rules: how far to go along a direction, whether to take the step, and how the damping
follows the result.

=====================================  =========================================================
:func:`fixed_step`                     t = lr, no evaluation
:func:`armijo_step`                    the first t from ``initial`` down with
                                       f(w + t d) <= f(w) + c1 t g^T d, by halving or
                                       quadratic/cubic interpolation (Nocedal & Wright 2006,
                                       Alg. 3.1 and Sec. 3.5; :mod:`.line_search`)
:func:`best_cg_iterate`                Hessian-free's CG-iterate backtracking: the saved CG
                                       iterate d_i with the lowest f(w + lr d_i) (Martens 2010,
                                       Sec. 4.6)
:func:`reduction_ratio`                rho = (f(w + s) - f(w)) / (m(s) - m(0)), the actual over
                                       the model's predicted change
:func:`more_damping`                   Moré's (1978) rule: lambda * increase if rho < 1/4,
                                       lambda * decrease if rho > 3/4 (Levenberg-Marquardt,
                                       Hessian-free), optionally clipped
:func:`curveball_damping`              CurveBall's rule (Henriques et al. 2019, Sec. 4):
                                       lambda / factor if gamma < low (or not finite),
                                       lambda * factor if gamma > high
:func:`apply_transform`                the optional update transform on the step a method takes
:func:`transform_gradient`             the optional update transform on the gradient a method
                                       preconditions (K-FAC, Shampoo, TNT, K-BFGS)
=====================================  =========================================================

All are backend-generic and compile under ``jax.jit`` (the line search is a backend
``while_loop``; the CG-iterate choice is a Python loop over a static tuple, unrolled at trace
time).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .._pytree import tree_map
from ..backends import Backend, backend_of
from ..errors import HyperparameterError
from ..tree import add, axpy
from .base import adapt_damping, select
from .line_search import LineSearchResult, backtracking

Tree = Any
Array = Any

__all__ = [
    "apply_transform",
    "armijo_step",
    "best_cg_iterate",
    "check_transform",
    "curveball_damping",
    "fixed_step",
    "init_transform",
    "more_damping",
    "reduction_ratio",
    "transform_gradient",
    "zero_where_rejected",
]


def fixed_step(like: Array, lr: Any) -> LineSearchResult:
    """t = ``lr`` as a :class:`~.line_search.LineSearchResult` (no evaluation; ``value`` NaN,
    ``accepted`` true). ``like`` is a 0-d array giving the dtype and device."""
    backend = backend_of(like)
    xp = backend.xp
    t = lr if hasattr(lr, "shape") else xp.asarray(lr, dtype=like.dtype,
                                                    device=backend.device(like))
    dev = backend.device(like)
    return LineSearchResult(t, xp.full_like(like, float("nan")), xp.asarray(0, device=dev),
                            xp.asarray(True, device=dev))


def armijo_step(backend: Backend, objective: Callable[[Tree], Array], params: Tree,
                direction: Tree, value: Array, slope: Array, initial: Array, *,
                c1: float = 1e-4, max_trials: int = 30, interpolation: str = "halve",
                shrink: float = 0.5) -> LineSearchResult:
    """Backtracking on phi(t) = f(w + t d) from t = ``initial`` until the Armijo condition
    phi(t) <= phi(0) + c1 t g^T d holds (``value`` = f(w), ``slope`` = g^T d < 0):
    :func:`~.line_search.backtracking` with ``interpolation`` "halve" or "cubic". The step is 0
    when no trial passes or d is not a descent direction."""
    return backtracking(backend, lambda t: objective(axpy(t, direction, params)), value, slope,
                        initial, c1=c1, max_trials=max_trials, interpolation=interpolation,
                        shrink=shrink)


def best_cg_iterate(objective: Callable[[Tree], Array], params: Tree,
                    candidates: Sequence[Tree], lr: Any) -> tuple[Array, Tree]:
    """``(f(w + lr d*), d*)``: among the CG iterates ``candidates`` (in iteration order) the one
    with the lowest batch objective f(w + lr d_i), non-finite values counting as +inf.

    Martens (2010) walks backwards from the last iterate and stops at the first that does not
    improve; here every candidate is evaluated (their number is static and small) from the last
    backwards, ties going to the later iterate, so the choice is never worse than Martens' and
    needs no data-dependent loop under ``jax.jit``."""
    best_value, best = None, None
    for candidate in reversed(candidates):
        value = objective(axpy(lr, candidate, params))
        xp = backend_of(value).xp
        value = xp.where(xp.isfinite(value), value, xp.full_like(value, float("inf")))
        if best is None:
            best_value, best = value, candidate
            continue
        better = value < best_value
        best = select(better, candidate, best)
        best_value = xp.where(better, value, best_value)
    return best_value, best


def reduction_ratio(new_value: Array, value: Array, model: Array, *,
                    nonfinite_fails: bool = False) -> Array:
    """rho = (f(w + s) - f(w)) / q(s), the actual change over the quadratic model's predicted
    change q(s) = g^T s + 1/2 s^T C s.

    A model that predicts no decrease (q(s) >= 0, or NaN) or a non-finite f(w + s) gives
    rho = -inf (a failed step). ``nonfinite_fails=True`` (Hessian-free) also turns every other
    non-finite ratio (+inf from a vanishing q(s), NaN from a non-finite f(w)) into -inf;
    with False (Levenberg-Marquardt) they are kept and Moré's rule treats them as they come."""
    xp = backend_of(model).xp
    decrease = model < 0
    ok = xp.logical_and(decrease, xp.isfinite(new_value))
    minus_inf = xp.full_like(model, -float("inf"))
    rho = xp.where(ok, (new_value - value) / xp.where(decrease, model, xp.ones_like(model)),
                   minus_inf)
    if nonfinite_fails:
        rho = xp.where(xp.isfinite(rho), rho, minus_inf)
    return rho


def more_damping(rho: Array, damping: Array, increase: Any, decrease: Any, *,
                 min_damping: Any = None, max_damping: Any = None) -> Array:
    """Moré's (1978) damping update: lambda * ``increase`` if rho < 1/4, lambda * ``decrease``
    if rho > 3/4, else unchanged (also for NaN), then clipped to [min_damping, max_damping]
    where those are given."""
    lam = adapt_damping(rho, damping, increase, decrease)
    if min_damping is None and max_damping is None:
        return lam
    return backend_of(lam).xp.clip(lam, min=min_damping, max=max_damping)


def curveball_damping(gamma: Array, damping: Array, factor: Any, low: Any, high: Any,
                      min_damping: Array) -> Array:
    """CurveBall's damping update from the reduction ratio gamma: lambda / ``factor`` if
    gamma < ``low`` or gamma is not finite, lambda * ``factor`` if gamma > ``high`` (+inf
    included), else unchanged; floored at ``min_damping`` (a 0-d array)."""
    xp = backend_of(damping).xp
    up = xp.logical_or(gamma < low, xp.logical_not(xp.isfinite(gamma)))
    grown = xp.where(up, damping / factor, damping)
    return xp.maximum(xp.where(gamma > high, damping * factor, grown), min_damping)


# ---------------------------------------------------------------------------- transforms
def check_transform(transform: Any, method: str) -> None:
    """Raise :class:`~secondorder.errors.HyperparameterError` unless ``transform`` is None or
    has callable ``init`` and ``update`` (an optax-shaped update transform)."""
    if transform is None:
        return
    if not (callable(getattr(transform, "init", None))
            and callable(getattr(transform, "update", None))):
        raise HyperparameterError(
            f"{method}(transform=...) takes an update transform with init(params) and "
            f"update(updates, state, params), e.g. secondorder.optim.transforms."
            f"clip_by_global_norm(1.0) or chain(...); got {transform!r}")


def init_transform(transform: Any, params: Tree) -> Any:
    """The transform's initial state, or () without a transform."""
    return () if transform is None else transform.init(params)


def transform_gradient(transform: Any, grad: Tree, state: Any, params: Tree
                       ) -> tuple[Tree, Any]:
    """``(T(g), new_state)``: the gradient through the user's transform before the method
    uses it (``(g, state)`` without a transform): torch's ``clip_grad_norm_`` before
    ``optimizer.step()``."""
    if transform is None:
        return grad, state
    return transform.update(grad, state, params)


def apply_transform(transform: Any, step: Tree, state: Any, params: Tree
                    ) -> tuple[Tree, Tree, Any]:
    """``(new_params, update, new_state)``: the update u = T(s) of the step s the method would
    take, added to the parameters, w + u. The transform sees s as the method computed it (a
    rejected step is s = 0); the method's own damping, warm start and acceptance test follow s,
    not u."""
    update, state = transform.update(step, state, params)
    return add(params, update), update, state


def zero_where_rejected(accept: Array, step: Tree) -> Tree:
    """``step`` where the 0-d ``accept`` holds, zeros elsewhere (the step a rejection takes)."""
    xp = backend_of(accept).xp
    return tree_map(lambda a: xp.where(accept, a, xp.zeros_like(a)), step)
