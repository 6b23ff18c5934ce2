"""GroupedNewton's cubic step against a 50-digit solution of the same small problem.

The step minimises T(eta) = -eta^T g + 1/2 eta^T H eta + (lambda/6) |D eta|^3; its global
minimiser is the stationary point eta = (H + (lambda/2) r D^2)^{-1} g, r = |D eta|, with
H + (lambda/2) r D^2 PSD. The reference solves that with mpmath (Cholesky solves of M(r),
bisection on r then the secant method, 50 digits), independently of the float64 solver. Groups
whose third-derivative summary is 0 (a loss quadratic in the group: MSE and a whole last layer)
are where the earlier floor-and-rescale lost up to 1e-4; the solver must agree to 1e-10 there too.
"""

from __future__ import annotations

import numpy as np
import pytest

from secondorder import backends
from secondorder.errors import BackendUnavailableError
from secondorder.optim.grouped_newton import cubic_step

DIGITS = 50


def _mp():
    return pytest.importorskip("mpmath")


def reference_step(g, h, d, lam):
    """eta (as float64) minimising T for the diagonal D = diag(d) (d >= 0, not floored), by
    mpmath at ``DIGITS`` digits."""
    mpmath = _mp()
    mp = mpmath.mp
    with mpmath.workdps(DIGITS):
        size = len(g)
        G = mp.matrix([mp.mpf(float(v)) for v in g])
        H = mp.matrix([[mp.mpf(float(h[i][j] + h[j][i])) / 2 for j in range(size)]
                       for i in range(size)])
        D2 = [mp.mpf(float(v)) ** 2 for v in d]
        half = mp.mpf(float(lam)) / 2

        def eta_of(r):
            """M(r)^{-1} g, or None when M(r) is not positive definite."""
            m = H.copy()
            for i in range(size):
                m[i, i] += half * r * D2[i]
            try:
                low = mp.cholesky(m)
            except ValueError:
                return None
            return mp.cholesky_solve(m, G) if low is not None else None

        def dnorm(eta):
            return mp.sqrt(mp.fsum(D2[i] * eta[i] ** 2 for i in range(size)))

        def above(r):  # the root lies above r
            eta = eta_of(r)
            return eta is None or dnorm(eta) > r

        hi = mp.mpf(1)
        while above(hi):
            hi *= 2
        lo = mp.mpf(0)
        for _ in range(400):
            mid = (lo + hi) / 2
            if above(mid):
                lo = mid
            else:
                hi = mid
            if hi - lo < mp.mpf(10) ** (-DIGITS + 5) * hi:
                break
        r = hi
        eta = eta_of(r)
        # stationarity residual of the reference itself (50 digits)
        m = H.copy()
        rr = dnorm(eta)
        for i in range(size):
            m[i, i] += half * rr * D2[i]
        res = mp.norm(m * eta - G) / mp.norm(G)
        assert res < mp.mpf(10) ** (-30), res
        return np.array([float(v) for v in eta])


def _floored(d3, d_floor):
    d = np.abs(np.asarray(d3, dtype=np.float64)) ** (1.0 / 3.0)
    return np.maximum(d, d_floor * d.max())


def _random_problem(rng, size, *, shift=0.0):
    a = rng.standard_normal((size, size))
    h = a @ a.T / size + shift * np.eye(size)
    return rng.standard_normal(size), h


# The summaries (g_bar, H_bar, D3) of two refreshes of GroupedNewton on teacher-student (MLP
# 8-32-1, MSE, canonical partition, lambda_int = 10): the last layer's weights and bias have
# D3 = 0. The earlier floor-and-rescale solver was off by 1.3e-4 and 6.0e-5 (relative, max norm)
# from the 50-digit solution here, with stationarity residuals 7.9e-7 and 1.5e-5.
TEACHER_STUDENT = [
    (np.array([0.023501091189941294, 0.40355623586659495, 0.03938668468243263,
               1.4820835603245417]),
     np.array([[0.011094588356530532, 0.007075019791436139, 0.021167723450570518,
                0.0260101093621051],
               [0.007075019791436141, 0.1948023689363983, 0.017093848341427874,
                0.769771880061915],
               [0.02116772345057052, 0.017093848341427863, 0.03938668468243262,
                0.030347559692560765],
               [0.026010109362105103, 0.769771880061915, 0.030347559692560762,
                3.122149198478133]]),
     np.array([-0.00011058958629122322, -0.050268136979826475, 0.0, 0.0])),
    (np.array([0.0017845125760049259, 0.006721630132468561, 0.003167768658023346,
               -0.009092109485752026]),
     np.array([[0.0008465047935733135, -0.0006048643313178283, 0.001542145447721632,
                -0.0006941850008275222],
               [-0.0006048643313178283, 0.015500484569091318, -0.0014591642186307543,
                0.02501179132483639],
               [0.001542145447721632, -0.0014591642186307545, 0.002868788968278587,
                -0.0016214717387943178],
               [-0.0006941850008275219, 0.025011791324836385, -0.0016214717387943176,
                0.0728064805340275]]),
     np.array([1.546157409725502e-06, 1.542641250761084e-04, 0.0, 0.0])),
]


def _cases():
    """(name, g, H, d3, lambda, d_floor): the configurations the step must solve to 1e-10."""
    rng = np.random.default_rng(7)
    out = [(f"teacher-student-{i}", g, h, d3, 10.0, 1e-5)
           for i, (g, h, d3) in enumerate(TEACHER_STUDENT)]
    g, h = _random_problem(rng, 5)
    out.append(("pd-all-d", g, h, rng.standard_normal(5), 1.0, 1e-5))
    g, h = _random_problem(rng, 5, shift=-0.8)
    out.append(("indefinite-all-d", g, h, rng.standard_normal(5), 3.0, 1e-5))
    # exact zeros, not floored (d_floor = 0): D is singular, the zero groups' block of H is PD
    g, h = _random_problem(rng, 6, shift=0.3)
    out.append(("mixed-zero-unfloored", g, h, np.array([2.0, 0.0, -0.5, 0.0, 1e-3, 0.0]),
                2.0, 0.0))
    out.append(("mixed-zero-floored", g, h, np.array([2.0, 0.0, -0.5, 0.0, 1e-3, 0.0]),
                2.0, 1e-5))
    out.append(("one-nonzero", g, h, np.array([0.0, 0.0, 0.0, 0.0, 0.0, 3.0]), 0.5, 0.0))
    out.append(("tiny-d", g, h, np.array([1.0, 1e-24, 1e-30, 2.0, 1e-27, 0.5]), 1.0, 0.0))
    # indefinite H whose negative direction lies in the groups with D3 != 0
    h = np.diag([-1.0, 2.0, 0.5, 3.0]) + 0.1 * np.ones((4, 4))
    out.append(("indefinite-mixed-zero", np.array([0.3, -1.0, 0.2, 0.7]), h,
                np.array([1.0, 0.0, 0.0, 0.0]), 4.0, 0.0))
    # near the hard case: g almost orthogonal to the most negative direction, so the root sits
    # just above the PSD boundary r_min = 2 / lambda (M(r*) has eigenvalue ~ 1e-4 against 3)
    h = np.diag([-1.0, 2.0, 3.0])
    out.append(("near-hard-case", np.array([1e-4, 1.0, -1.0]), h, np.array([1.0, 1.0, 1.0]),
                1.0, 0.0))
    out.append(("near-hard-case-mixed-zero", np.array([1e-4, 1.0, -1.0]), h,
                np.array([1.0, 1.0, 0.0]), 1.0, 0.0))
    # badly scaled groups: D spans 1e-4..1e2, H spans 1e-6..1e2
    scale = np.array([1e-3, 1.0, 10.0, 1e-1])
    g, h = _random_problem(rng, 4, shift=0.5)
    out.append(("badly-scaled", g * scale, h * np.outer(scale, scale),
                np.array([1e-12, 1e6, 0.0, 8.0]), 7.0, 0.0))
    return out


CASES = _cases()


def _stationarity(g, h, d, lam, eta):
    r = np.sqrt(np.sum((d * eta) ** 2))
    return (h + 0.5 * lam * r * np.diag(d**2)) @ eta - g, r


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cubic_step_matches_50_digit_solution(case):
    _, g, h, d3, lam, d_floor = case
    eta, ok, iters, residual = cubic_step(g, h, d3, lam, d_floor=d_floor)
    assert bool(ok)
    d = _floored(d3, d_floor)
    ref = reference_step(g, h, d, lam)
    err = np.max(np.abs(eta - ref)) / np.max(np.abs(ref))
    assert err < 1e-10, err
    # the reported residual and an independent one: machine precision (the floor-and-rescale
    # solver reached 2e-5 on the teacher-student summaries)
    res, r = _stationarity(g, h, d, lam, eta)
    assert np.linalg.norm(res) / np.linalg.norm(g) < 1e-13
    assert float(residual) < 1e-13
    # the global minimiser's branch: H + (lambda/2) r D^2 is PSD
    assert np.linalg.eigvalsh(h + 0.5 * lam * r * np.diag(d**2))[0] > -1e-12


def test_floor_is_a_small_perturbation_not_a_rescale():
    # with D3 = 0 groups, the floored and the unfloored problems differ by O(d_floor^2 ...) only
    g, h, d3 = TEACHER_STUDENT[0]
    a = cubic_step(g, h, d3, 10.0, d_floor=1e-5)[0]
    b = cubic_step(g, h, d3, 10.0, d_floor=0.0)[0]
    assert np.max(np.abs(a - b)) / np.max(np.abs(b)) < 1e-8


def test_unbounded_below_is_reported_not_solved():
    # the group with D3 = 0 has negative curvature and no floor: T is unbounded below
    h = np.diag([-1.0, 2.0])
    eta, ok, _, _ = cubic_step(np.array([1.0, 1.0]), h, np.array([0.0, 1.0]), 1.0, d_floor=0.0)
    assert not bool(ok) and np.all(np.isnan(eta))
    # a floor makes it bounded and the step is taken
    eta, ok, _, _ = cubic_step(np.array([1.0, 1.0]), h, np.array([0.0, 1.0]), 1.0, d_floor=0.1)
    assert bool(ok)
    ref = reference_step(np.array([1.0, 1.0]), h, _floored([0.0, 1.0], 0.1), 1.0)
    assert np.max(np.abs(eta - ref)) / np.max(np.abs(ref)) < 1e-10


@pytest.mark.parametrize("name", ["torch", "jax"])
def test_cubic_step_on_other_backends_matches_the_reference(name):
    try:
        backend = backends.get(name)
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))
    if not backend.supports_float64():
        pytest.skip(f"{name} without float64")
    _, g, h, d3, lam, d_floor = CASES[0]
    arrays = [backend.asarray(a, dtype="float64") for a in (g, h, d3)]
    eta, ok, _, residual = cubic_step(*arrays, lam, d_floor=d_floor)
    assert bool(backend.to_numpy(ok))
    ref = reference_step(g, h, _floored(d3, d_floor), lam)
    eta = backend.to_numpy(eta)
    assert np.max(np.abs(eta - ref)) / np.max(np.abs(ref)) < 1e-10
    assert float(backend.to_numpy(residual)) < 1e-13
