"""The exact (non-quadratic) softmax cross-entropy prox-linear problem through its dual on the
simplex (``exact_logistic_dual_direction``, ``ProxLinear(solver="exact-dual")``), against the
primal problem (sheet eq. 3, evaluated at w - d) solved independently by dense Newton in NumPy.

Scaling (``secondorder.optim.prox_linear``): sum form with gt = gamma / m,
primal P(d) = sum_i l_i(f_i - J_i d) + m/(2 gamma) |d|^2,
dual Phi(mu) = sum_i <mu_i, log mu_i> - <mu - Y, F> + (gt/2) |J^T (mu - Y)|^2, P* = -Phi*."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_close, back, raveled, softmax, to
from secondorder import backends, tree
from secondorder.curvature import Linearization
from secondorder.losses import MSE, SoftmaxCrossEntropy
from secondorder.models import MLP
from secondorder.optim import ProxLinear
from secondorder.optim.prox_linear import (
    exact_logistic_dual_direction,
    project_simplex_rows,
    prox_linear_direction,
)

GAMMA = 0.7
LOSS = SoftmaxCrossEntropy()
MODEL = MLP([3, 5, 3])  # p = 38, m k = 18


def problem(seed=0, m=6):
    rng = np.random.default_rng(seed)
    x = 2.0 * rng.standard_normal((m, 3))
    y = np.eye(3)[rng.integers(0, 3, m)]
    params = MODEL.init(seed, "numpy")
    params = tree.map(lambda a: a + 0.3 * rng.standard_normal(a.shape), params)
    return params, x, y


def dense(params, x):
    lin = Linearization(MODEL.apply, params, x)
    flat, unravel = tree.ravel(params)
    jac = np.stack([np.asarray(lin.jvp(unravel(e))).ravel() for e in np.eye(flat.size)], axis=1)
    return jac, np.asarray(lin.outputs)


def primal_value(d, jac, f, y, m, gamma=GAMMA):
    z = f - (jac @ d).reshape(f.shape)
    zmax = z.max(axis=1)
    lse = zmax + np.log(np.exp(z - zmax[:, None]).sum(axis=1))
    return (lse - (z * y).sum(axis=1)).sum() + m / (2 * gamma) * d @ d


def primal_newton(jac, f, y, m, gamma=GAMMA, iterations=50):
    """argmin_d P(d) by damped-free Newton (P is strongly convex and smooth; p = 38)."""
    k = f.shape[1]
    d = np.zeros(jac.shape[1])
    for _ in range(iterations):
        s = softmax(f - (jac @ d).reshape(f.shape))
        grad = -jac.T @ (s - y).ravel() + (m / gamma) * d
        big_h = np.zeros((m * k, m * k))
        for i in range(m):
            big_h[i * k:(i + 1) * k, i * k:(i + 1) * k] = np.diag(s[i]) - np.outer(s[i], s[i])
        hess = jac.T @ big_h @ jac + (m / gamma) * np.eye(jac.shape[1])
        d = d - np.linalg.solve(hess, grad)
    return d


def dual_value(mu, jac, f, y, m, gamma=GAMMA):
    ja = jac.T @ (mu - y).ravel()
    return (np.sum(mu * np.log(mu)) - np.sum((mu - y) * f) + 0.5 * gamma / m * ja @ ja)


def run(backend, steps, seed=0, **kw):
    params, x, y = problem(seed)
    batch = (to(backend, x), to(backend, y))
    return exact_logistic_dual_direction(MODEL.apply, LOSS, to(backend, params), batch,
                                         gamma=GAMMA, steps=steps, **kw)


def test_projection_onto_simplex(backend, rng):
    v = 3.0 * rng.standard_normal((7, 5))
    v[0] = [0.2, 0.2, 0.2, 0.2, 0.2]  # already inside
    v[1] = [5.0, 0.0, 0.0, 0.0, 0.0]  # a vertex
    mu = back(backend, project_simplex_rows(to(backend, v)))
    assert np.all(mu >= 0) and np.allclose(mu.sum(axis=1), 1.0, atol=1e-14, rtol=0)
    assert np.allclose(mu[0], 0.2, atol=1e-15) and np.allclose(mu[1], [1, 0, 0, 0, 0])
    # optimality (KKT): v - mu = tau on the support, <= tau off it
    for row, proj in zip(v, mu):
        tau = (row - proj)[proj > 0]
        assert np.ptp(tau) <= 1e-13
        assert np.all(row[proj == 0] <= tau[0] + 1e-13)


def test_strong_duality_against_primal_newton(ad_backend):
    params, x, y = problem()
    m = x.shape[0]
    jac, f = dense(params, x)
    d_primal = primal_newton(jac, f, y, m)
    res = run(ad_backend, 300)
    mu = back(ad_backend, res.alpha) + y
    d = raveled(ad_backend, res.direction)
    p_star = primal_value(d_primal, jac, f, y, m)
    phi = dual_value(mu, jac, f, y, m)
    assert abs(p_star + phi) <= 1e-6 * max(1.0, abs(p_star)), (p_star, phi)
    assert_close(d, d_primal, rtol=1e-5)
    assert_close(d, GAMMA / m * jac.T @ (mu - y).ravel(), rtol=1e-10)
    # the dual optimum is mu_i = softmax(f_i - J_i d)
    assert np.max(np.abs(mu - softmax(f - (jac @ d_primal).reshape(f.shape)))) <= 1e-5
    # rows stay in the simplex (strictly positive here), the dual gap closes
    assert np.all(mu > 0) and np.allclose(mu.sum(axis=1), 1.0, atol=1e-12, rtol=0)
    assert float(back(ad_backend, res.residual)) <= 1e-5
    # beta = G - alpha and the gradient record J^T G
    g = softmax(f) - y
    assert_close(back(ad_backend, res.beta), g - (mu - y), rtol=1e-12)
    assert_close(raveled(ad_backend, res.grad), jac.T @ g.ravel(), rtol=1e-10)


def test_dual_objective_monotone_and_rows_in_simplex(ad_backend):
    params, x, y = problem(seed=1)
    m = x.shape[0]
    jac, f = dense(params, x)
    values = []
    for steps in (0, 1, 3, 10, 30):
        res = run(ad_backend, steps, seed=1)
        mu = back(ad_backend, res.alpha) + y
        assert np.all(mu >= 0) and np.allclose(mu.sum(axis=1), 1.0, atol=1e-12, rtol=0)
        values.append(dual_value(np.maximum(mu, 1e-300), jac, f, y, m))
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:])), values
    # zero steps: mu = softmax(F), d = gamma grad h (the gradient step)
    res0 = run(ad_backend, 0, seed=1)
    g = softmax(f) - y
    assert_close(raveled(ad_backend, res0.direction), GAMMA / m * jac.T @ g.ravel(), rtol=1e-12)


@pytest.mark.parametrize("seed", [0, 2])
def test_descent_direction(ad_backend, seed):
    params, x, y = problem(seed)
    for steps in (5, 200):
        res = run(ad_backend, steps, seed=seed)
        d = raveled(ad_backend, res.direction)
        grad_h = raveled(ad_backend, res.grad) / x.shape[0]
        assert d @ grad_h > 0


def test_fixed_step_size(ad_backend):
    """A small fixed step also converges (no backtracking)."""
    params, x, y = problem()
    m = x.shape[0]
    jac, f = dense(params, x)
    d_primal = primal_newton(jac, f, y, m)
    res = run(ad_backend, 400, step_size=0.05)
    assert_close(raveled(ad_backend, res.direction), d_primal, rtol=1e-5)


def test_agree_across_backends(ad_backend):
    ref = backends.get("numpy")
    for kw in ({}, {"step_size": 0.05}):
        a = run(ad_backend, 25, **kw)
        b = run(ref, 25, **kw)
        assert_close(raveled(ad_backend, a.direction), raveled(ref, b.direction), rtol=1e-10)
        assert_close(back(ad_backend, a.alpha), back(ref, b.alpha), rtol=1e-10)


def test_prox_linear_option(ad_backend):
    params, x, y = problem()
    p, batch = to(ad_backend, params), (to(ad_backend, x), to(ad_backend, y))
    via = prox_linear_direction(MODEL.apply, LOSS, p, batch, gamma=GAMMA, inner_steps=20,
                                solver="exact-dual")
    direct = run(ad_backend, 20)
    assert_close(raveled(ad_backend, via.direction), raveled(ad_backend, direct.direction), rtol=0)
    opt = ProxLinear(MODEL.apply, LOSS, solver="exact-dual", inner_steps=20, gamma=GAMMA)
    new, _, info = opt.step(p, opt.init(p), batch)
    expected = tree.ravel(params)[0] - raveled(ad_backend, direct.direction)
    assert_close(raveled(ad_backend, new), expected, rtol=1e-12)
    assert bool(info.finite)
    arm = ProxLinear(MODEL.apply, LOSS, solver="exact-dual", inner_steps=20, update="armijo")
    new, _, info = arm.step(p, arm.init(p), batch)
    assert float(back(ad_backend, LOSS.value(MODEL.apply(new, batch[0]), batch[1]))) < \
        float(back(ad_backend, info.loss))


def test_jit_step_compiles():
    jax = pytest.importorskip("jax")
    b = backends.get("jax")
    for config in ({}, {"update": "armijo"}):
        opt = ProxLinear(MODEL.apply, LOSS, solver="exact-dual", inner_steps=10, **config)
        params, x, y = problem()
        p, batch = to(b, params), (to(b, x), to(b, y))
        state = opt.init(p)
        new, _, info = jax.jit(opt.step)(p, state, batch)
        eager, _, _ = opt.step(p, state, batch)
        assert_close(raveled(b, new), raveled(b, eager), rtol=1e-10)
        assert bool(info.finite)


def test_needs_softmax_cross_entropy():
    with pytest.raises(ValueError, match="SoftmaxCrossEntropy"):
        ProxLinear(MODEL.apply, MSE(), solver="exact-dual")
    params, x, y = problem()
    with pytest.raises(ValueError, match="SoftmaxCrossEntropy"):
        exact_logistic_dual_direction(MODEL.apply, MSE(), params, (x, y), gamma=1.0)
