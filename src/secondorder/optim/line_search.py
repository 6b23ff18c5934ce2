"""Backtracking line search on the Armijo condition, by halving or by cubic interpolation.

With phi(t) = f(w + t d), phi(0) = f(w) and slope phi'(0) = g^T d < 0, the search tries
t_0 = ``initial`` and then shorter steps until the sufficient-decrease (Armijo) condition

    phi(t) <= phi(0) + c1 t phi'(0)                         (Nocedal & Wright 2006, eq. 3.4)

holds, at most ``max_trials`` evaluations of phi in all (Algorithm 3.1 of the same book). The
next trial after a failed t_k is

* ``"halve"``: t_{k+1} = shrink t_k;
* ``"cubic"`` (their Section 3.5): at k = 0 the minimiser of the quadratic through phi(0),
  phi'(0) and phi(t_0),

      t_1 = -phi'(0) t_0^2 / (2 (phi(t_0) - phi(0) - phi'(0) t_0)),

  and for k >= 1 the minimiser of the cubic a t^3 + b t^2 + phi'(0) t + phi(0) through
  phi(t_{k-1}) and phi(t_k): with r_j = phi(t_j) - phi(0) - phi'(0) t_j,

      [a; b] = 1 / (t_k - t_{k-1}) [[1/t_k^2, -1/t_{k-1}^2], [-t_{k-1}/t_k^2, t_k/t_{k-1}^2]]
               [r_k; r_{k-1}],
      t_{k+1} = (-b + sqrt(b^2 - 3 a phi'(0))) / (3 a) = -phi'(0) / (b + sqrt(b^2 - 3 a phi'(0)))

  (the second form also covers a = 0). Either way t_{k+1} is clipped to [0.1 t_k, 0.5 t_k]
  (the safeguard of Section 3.5), and a non-finite phi(t_k) or interpolant gives 0.5 t_k.

A non-finite phi(t) counts as a failed trial. The loop is a backend ``while_loop``, so it
compiles under ``jax.jit`` and vectorises under ``jax.vmap``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from ..backends import Backend
from ..errors import HyperparameterError

Array = Any
INTERPOLATIONS = ("halve", "cubic")
#: the interval [low t_k, high t_k] an interpolated trial is clipped to (Section 3.5)
SAFEGUARD = (0.1, 0.5)


class LineSearchResult(NamedTuple):
    step: Array  #: the accepted t, or 0 when no trial satisfied Armijo (or phi'(0) >= 0)
    value: Array  #: phi at the accepted t (phi(0) when the search failed)
    evaluations: Array  #: number of evaluations of phi
    accepted: Array  #: 0-d bool: a step satisfying Armijo was found


def check_line_search(interpolation: str, c1: float, shrink: float, max_trials: int,
                      initial: float) -> None:
    """Raise :class:`~secondorder.errors.HyperparameterError` for settings
    :func:`backtracking` cannot use."""
    if interpolation not in INTERPOLATIONS:
        raise HyperparameterError(f"line search interpolation must be one of {INTERPOLATIONS}, "
                         f"got {interpolation!r}")
    if not (0 < c1 < 1 and 0 < shrink < 1 and int(max_trials) >= 1 and initial > 0):
        raise HyperparameterError("a backtracking line search needs 0 < c1 < 1, 0 < shrink < 1, "
                         "max_trials >= 1 and an initial step > 0")


def backtracking(backend: Backend, phi: Callable[[Array], Array], phi0: Array, slope: Array,
                 initial: Array, *, c1: float = 1e-4, max_trials: int = 30,
                 interpolation: str = "halve", shrink: float = 0.5) -> LineSearchResult:
    """The first trial step satisfying Armijo (see the module docstring).

    ``phi`` maps a 0-d step to the 0-d objective; ``phi0``, ``slope`` and ``initial`` are 0-d
    arrays of the parameters' dtype. When ``slope >= 0`` (not a descent direction) the search
    still evaluates its trials but reports failure, so that the caller keeps its parameters.
    """
    xp = backend.xp
    inf = xp.full_like(phi0, float("inf"))
    low, high = SAFEGUARD

    def value_at(t: Array) -> Array:
        value = phi(t)
        return xp.where(xp.isfinite(value), value, inf)

    def failing(t: Array, value: Array) -> Array:
        return value > phi0 + c1 * t * slope

    def next_trial(t: Array, value: Array, t_prev: Array, value_prev: Array,
                   first: Array) -> Array:
        if interpolation == "halve":
            return shrink * t
        r = value - phi0 - slope * t
        quadratic = -slope * t * t / (2.0 * r)
        r_prev = value_prev - phi0 - slope * t_prev
        scale = 1.0 / (t - t_prev)
        a = scale * (r / (t * t) - r_prev / (t_prev * t_prev))
        b = scale * (-t_prev * r / (t * t) + t * r_prev / (t_prev * t_prev))
        disc = b * b - 3.0 * a * slope
        cubic = -slope / (b + xp.sqrt(xp.where(disc > 0, disc, xp.zeros_like(disc))))
        candidate = xp.where(first, quadratic, cubic)
        usable = xp.logical_and(xp.isfinite(candidate), xp.isfinite(value))
        usable = xp.logical_and(usable, xp.logical_or(first, disc >= 0))
        clipped = xp.minimum(xp.maximum(candidate, low * t), high * t)
        return xp.where(usable, clipped, high * t)

    def cond(carry: tuple) -> Array:
        t, value, n, _, _ = carry
        return xp.logical_and(failing(t, value), n < max_trials)

    def body(carry: tuple) -> tuple:
        t, value, n, t_prev, value_prev = carry
        t_next = next_trial(t, value, t_prev, value_prev, n == 1)
        return t_next, value_at(t_next), n + 1, t, value

    one = xp.asarray(1, device=backend.device(phi0))
    t0 = initial
    # (t_prev, value_prev) start as (2 t0, phi0): unused at k = 0, and finite so that the
    # discarded cubic branch stays free of division by zero
    t, value, n, _, _ = backend.while_loop(cond, body, (t0, value_at(t0), one, 2.0 * t0, phi0))
    accepted = xp.logical_and(xp.logical_not(failing(t, value)), slope < 0)
    zero = xp.zeros_like(t)
    return LineSearchResult(xp.where(accepted, t, zero), xp.where(accepted, value, phi0), n,
                            accepted)
