"""Backtracking line search: closed-form trial steps on quadratic and cubic phi, halving, the
failure modes (no descent, trials exhausted, non-finite phi), every backend and jax.jit."""

from __future__ import annotations

import math

import numpy as np
import pytest

from secondorder import backends
from secondorder.optim.line_search import backtracking, check_line_search

C1 = 1e-4


def polynomial(backend, coefficients):
    """phi(t) = sum_k c_k t^k on ``backend``, with (phi(0), phi'(0)) as 0-d float64 arrays."""
    def phi(t):
        out = backend.xp.zeros_like(t)
        for k, c in enumerate(coefficients):
            out = out + c * t**k
        return out

    scalar = lambda v: backend.asarray(np.asarray(v, dtype=np.float64))  # noqa: E731
    return phi, scalar(coefficients[0]), scalar(coefficients[1]), scalar


def search(backend, coefficients, initial=1.0, **kw):
    phi, phi0, slope, scalar = polynomial(backend, coefficients)
    res = backtracking(backend, phi, phi0, slope, scalar(initial), c1=C1, **kw)
    return (float(backend.to_numpy(res.step)), float(backend.to_numpy(res.value)),
            int(backend.to_numpy(res.evaluations)), bool(backend.to_numpy(res.accepted)))


def test_unit_step_accepted_when_armijo_holds(backend):
    # phi = 3 - t + t^2 / 4: phi(1) = 2.25 <= 3 - 1e-4
    for interpolation in ("halve", "cubic"):
        t, value, n, ok = search(backend, [3.0, -1.0, 0.25], interpolation=interpolation)
        assert (t, n, ok) == (1.0, 1, True)
        assert value == pytest.approx(2.25, rel=1e-15)


def test_quadratic_interpolation_is_exact_on_a_quadratic(backend):
    # phi = 1 - t + 2 t^2 (curvature 4): t = 1 fails, and the interpolated trial is the exact
    # minimiser -phi'(0) / phi''(0) = 1/4
    t, value, n, ok = search(backend, [1.0, -1.0, 2.0], interpolation="cubic")
    assert ok and n == 2
    assert t == pytest.approx(0.25, rel=1e-14)
    assert value == pytest.approx(1.0 - 0.25 + 2.0 / 16, rel=1e-14)


def test_cubic_interpolation_is_exact_on_a_cubic(backend):
    # phi = 5 - t + a t^3 with a = 400: t = 1 fails; the quadratic trial 1 / (2 a) is clipped up
    # to 0.1 and fails (Armijo needs t <= sqrt((1 - c1) / a) ~ 0.05); the cubic through the two
    # trials is phi itself, so the third trial is its minimiser sqrt(1 / (3 a)) ~ 0.0289,
    # inside the safeguard [0.01, 0.05], where Armijo holds.
    a = 400.0
    assert 1 / (2 * a) < 0.1 and 0.1 > math.sqrt((1 - C1) / a)
    expected = math.sqrt(1 / (3 * a))
    assert 0.01 < expected < 0.05 and a * expected**2 <= 1 - C1
    t, value, n, ok = search(backend, [5.0, -1.0, 0.0, a], interpolation="cubic")
    assert ok and n == 3
    assert t == pytest.approx(expected, rel=1e-12)
    assert value == pytest.approx(5.0 - expected + a * expected**3, rel=1e-14)


def test_cubic_interpolation_with_a_quadratic_term(backend):
    # phi = 2 - 3 t + b t^2 + a t^3; the accepted trial is the cubic's local minimiser
    # (-b + sqrt(b^2 - 3 a phi'(0))) / (3 a) whenever the first two trials fail and it lies in
    # the safeguard; check those preconditions on the NumPy side first
    a, b, s = 900.0, 40.0, -3.0
    phi = lambda t: 2 + s * t + b * t**2 + a * t**3  # noqa: E731
    armijo = lambda t: phi(t) <= 2 + C1 * t * s  # noqa: E731
    t1 = min(max(-s / (2 * (phi(1) - 2 - s)), 0.1), 0.5)
    expected = (-b + math.sqrt(b * b - 3 * a * s)) / (3 * a)
    assert not armijo(1.0) and not armijo(t1)
    assert 0.1 * t1 <= expected <= 0.5 * t1 and armijo(expected)
    t, _, n, ok = search(backend, [2.0, s, b, a], interpolation="cubic")
    assert ok and n == 3
    assert t == pytest.approx(expected, rel=1e-12)


def test_halving_counts_trials(backend):
    # phi = 1 - t + 5 t^2: Armijo holds for t <= 2 (1 - c1) / 10 ~ 0.2, first met at 1/8
    t, _, n, ok = search(backend, [1.0, -1.0, 5.0], interpolation="halve")
    assert (t, n, ok) == (0.125, 4, True)
    t, _, n, ok = search(backend, [1.0, -1.0, 5.0], interpolation="halve", shrink=0.3)
    assert (n, ok) == (3, True)
    assert t == pytest.approx(0.09, rel=1e-15)


@pytest.mark.parametrize("interpolation", ["halve", "cubic"])
def test_failures_return_a_zero_step(backend, interpolation):
    # an ascent direction: never accepted, phi(0) reported
    t, value, n, ok = search(backend, [1.0, 0.5, 1.0], interpolation=interpolation)
    assert (t, value, ok) == (0.0, 1.0, False)
    # trials exhausted: Armijo needs t <= ~2e-9, out of reach in 5 trials
    t, value, n, ok = search(backend, [1.0, -1.0, 1e9], interpolation=interpolation,
                             max_trials=5)
    assert (t, value, n, ok) == (0.0, 1.0, 5, False)


@pytest.mark.parametrize("interpolation", ["halve", "cubic"])
def test_non_finite_trials_are_rejected(backend, interpolation):
    # phi = 1 - t except NaN for t > 0.3: both rules fall back to halving, so 0.25 is taken
    xp = backend.xp

    def phi(t):
        return xp.where(t > 0.3, xp.full_like(t, float("nan")), 1.0 - t)

    scalar = lambda v: backend.asarray(np.asarray(v, dtype=np.float64))  # noqa: E731
    res = backtracking(backend, phi, scalar(1.0), scalar(-1.0), scalar(1.0),
                       interpolation=interpolation)
    assert float(backend.to_numpy(res.step)) == 0.25
    assert int(backend.to_numpy(res.evaluations)) == 3


def test_compiles_and_vectorises_under_jax():
    jax = pytest.importorskip("jax")
    b = backends.get("jax")
    jnp = b.xp

    def run(a):
        phi = lambda t: 5.0 - t + a * t**3  # noqa: E731
        return backtracking(b, phi, jnp.asarray(5.0), jnp.asarray(-1.0), jnp.asarray(1.0),
                            interpolation="cubic")

    a = jnp.asarray([400.0, 900.0, 0.5])
    res = jax.jit(jax.vmap(run))(a)
    for k, ak in enumerate([400.0, 900.0, 0.5]):
        eager = run(jnp.asarray(ak))
        assert float(res.step[k]) == pytest.approx(float(eager.step), rel=1e-15)
        assert int(res.evaluations[k]) == int(eager.evaluations)
    assert float(res.step[0]) == pytest.approx(math.sqrt(1 / 1200), rel=1e-12)


@pytest.mark.parametrize("kwargs", [{"interpolation": "quartic"}, {"c1": 0.0}, {"c1": 1.0},
                                    {"shrink": 1.0}, {"max_trials": 0}, {"initial": 0.0}])
def test_bad_settings_are_named(kwargs):
    settings = {"interpolation": "cubic", "c1": 1e-4, "shrink": 0.5, "max_trials": 30,
                "initial": 1.0} | kwargs
    with pytest.raises(ValueError, match="line search"):
        check_line_search(**settings)
