"""Prox-linear directions (primal and dual Gauss-Newton) against dense NumPy oracles, and the
checkable facts of the prox-linear sheet (``../shared/specs/prox_linear_dual.md``).

Scaling used throughout (see ``secondorder.optim.prox_linear``): the batch objective is the mean
loss h = (1/m) sum_i l_i; the sheet's sum-form formulas hold with gt = gamma / m, and
d = (J^T H J + (m/gamma) I)^{-1} J^T G."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_close, back, raveled, to
from secondorder import backends, tree
from secondorder.curvature import Linearization
from secondorder.losses import MSE, SigmoidBCE, SoftmaxCrossEntropy
from secondorder.models import MLP
from secondorder.optim import SGD, Adam, ProxLinear
from secondorder.optim.prox_linear import (
    dual_direction,
    primal_direction,
    prox_linear_direction,
    soft_threshold,
)

GAMMA = 0.7
LOSSES = {"mse": MSE(), "softmax": SoftmaxCrossEntropy(), "bce": SigmoidBCE()}
MODEL = MLP([3, 5, 3])  # p = 20 + 18 = 38; m k = 18 for m = 6


def problem(name, seed=0, m=6):
    rng = np.random.default_rng(seed)
    x = 2.0 * rng.standard_normal((m, 3))
    if name == "mse":
        y = rng.standard_normal((m, 3))
    elif name == "softmax":
        y = np.eye(3)[rng.integers(0, 3, m)]
    else:
        y = (rng.random((m, 3)) < 0.5).astype(np.float64)
    params = MODEL.init(seed, "numpy")
    params = tree.map(lambda a: a + 0.3 * rng.standard_normal(a.shape), params)
    return params, x, y


def dense_parts(name, params, x, y):
    """Dense J (m k, p), f, G, blockdiag H, P and H^+ from the NumPy backend."""
    loss = LOSSES[name]
    lin = Linearization(MODEL.apply, params, x)
    flat, unravel = tree.ravel(params)
    p = flat.size
    cols = [np.asarray(lin.jvp(unravel(e))).ravel() for e in np.eye(p)]
    jac = np.stack(cols, axis=1)
    f = np.asarray(lin.outputs)
    g = np.asarray(loss.grad(f, y))
    hs = np.asarray(loss.hessian(f, y))
    m, k = f.shape
    big_h = np.zeros((m * k, m * k))
    for i in range(m):
        big_h[i * k:(i + 1) * k, i * k:(i + 1) * k] = hs[i]
    return jac, f, g, big_h, loss


def dense_direction(jac, g, big_h, m, gamma=GAMMA):
    p = jac.shape[1]
    a = jac.T @ big_h @ jac + (m / gamma) * np.eye(p)
    return np.linalg.solve(a, jac.T @ g.ravel())


def run(backend, name, solver, steps, seed=0, scaled=False, gamma=GAMMA, m=6, lin=None):
    params, x, y = problem(name, seed, m)
    if lin is None:
        lin = Linearization(MODEL.apply, to(backend, params), to(backend, x))
    fn = dual_direction if solver == "dual" else primal_direction
    kw = {"scaled": scaled} if solver == "dual" else {}
    return fn(lin, LOSSES[name], to(backend, y), gamma=gamma, inner_steps=steps, **kw)


# ------------------------------------------------------------------------------ directions


@pytest.mark.parametrize("name", ["mse", "softmax", "bce"])
@pytest.mark.parametrize("variant", ["primal", "dual", "dual_scaled"])
def test_directions_match_dense_solution(ad_backend, name, variant):
    params, x, y = problem(name)
    jac, f, g, big_h, _ = dense_parts(name, params, x, y)
    expected = dense_direction(jac, g, big_h, x.shape[0])
    solver = "primal" if variant == "primal" else "dual"
    steps = 200 if solver == "primal" else 60
    res = run(ad_backend, name, solver, steps, scaled=variant == "dual_scaled")
    assert_close(raveled(ad_backend, res.direction), expected, rtol=1e-8)


@pytest.mark.parametrize("name", ["mse", "softmax"])
def test_strong_duality(ad_backend, name):
    """Primal optimum of the quadratic-model prox-linear problem = - dual optimum, with the
    dual written with the closed-form conjugate of the quadratic model (Lemma 7 / Prop. 8)."""
    params, x, y = problem(name)
    m = x.shape[0]
    jac, f, g, big_h, loss = dense_parts(name, params, x, y)
    res = run(ad_backend, name, "dual", 60)
    d = raveled(ad_backend, res.direction)
    alpha = back(ad_backend, res.alpha).ravel()
    beta = back(ad_backend, res.beta).ravel()
    lvals = np.asarray(loss.per_sample(f, y))
    jd = jac @ d
    primal = lvals.sum() - g.ravel() @ jd + 0.5 * jd @ big_h @ jd + m / (2 * GAMMA) * d @ d
    hplus = np.linalg.pinv(big_h, rcond=1e-12)
    gt = GAMMA / m
    ja = jac.T @ alpha
    dual = -lvals.sum() + 0.5 * beta @ hplus @ beta + 0.5 * gt * ja @ ja
    assert abs(primal + dual) <= 1e-9 * max(1.0, abs(primal))
    # beta lies in range(H) and d = (gamma/m) J^T alpha
    assert np.linalg.norm(beta - big_h @ hplus @ beta) <= 1e-10 * max(1.0, np.linalg.norm(beta))
    assert_close(d, gt * ja, rtol=1e-10)


@pytest.mark.parametrize("scaled", [False, True])
def test_cg_iterates_satisfy_constraint(ad_backend, scaled):
    params, x, _ = problem("softmax")
    lin = Linearization(MODEL.apply, to(ad_backend, params), to(ad_backend, x))
    for tau in (2, 5, 8) if scaled else range(1, 9):
        res = run(ad_backend, "softmax", "dual", tau, scaled=scaled, lin=lin)
        beta = back(ad_backend, res.beta)
        assert np.max(np.abs(beta.sum(axis=1))) <= 1e-12 * max(1.0, np.abs(beta).max())


@pytest.mark.parametrize("name", ["softmax"])
def test_descent_for_every_inner_step_count(ad_backend, name):
    params, x, y = problem(name, seed=3)
    loss = LOSSES[name]
    grad = raveled(ad_backend, backends.get(ad_backend.name).grad(
        lambda p: loss.value(MODEL.apply(p, to(ad_backend, x)), to(ad_backend, y)),
        to(ad_backend, params)))
    dual_slopes, primal_slopes = [], []
    lin = Linearization(MODEL.apply, to(ad_backend, params), to(ad_backend, x))
    for tau in range(11):
        d_dual = raveled(ad_backend, run(ad_backend, name, "dual", tau, seed=3, lin=lin).direction)
        d_primal = raveled(ad_backend, run(ad_backend, name, "primal", tau, seed=3,
                                        lin=lin).direction)
        if tau == 0:
            assert_close(d_dual, GAMMA * grad, rtol=1e-12)
            assert np.linalg.norm(d_primal) == 0.0
        dual_slopes.append(d_dual @ grad)
        primal_slopes.append(d_primal @ grad)
    scale = abs(dual_slopes[0])
    assert min(dual_slopes) >= 0 and min(primal_slopes) >= 0
    assert all(b <= a + 1e-12 * scale for a, b in zip(dual_slopes, dual_slopes[1:]))
    assert all(b >= a - 1e-12 * scale for a, b in zip(primal_slopes, primal_slopes[1:]))


@pytest.mark.parametrize("solver", ["dual", "primal"])
def test_zero_direction_at_stationary_point(ad_backend, solver):
    params, x, _ = problem("softmax")
    f = np.asarray(MODEL.apply(params, x))
    s = np.exp(f - f.max(axis=1, keepdims=True))
    y = s / s.sum(axis=1, keepdims=True)  # targets = predictions: grad h = 0
    lin = Linearization(MODEL.apply, to(ad_backend, params), to(ad_backend, x))
    fn = dual_direction if solver == "dual" else primal_direction
    res = fn(lin, LOSSES["softmax"], to(ad_backend, y), gamma=GAMMA, inner_steps=5)
    assert np.linalg.norm(raveled(ad_backend, res.direction)) <= 1e-14
    # and non-zero away from it
    assert np.linalg.norm(raveled(ad_backend, run(ad_backend, "softmax", solver, 5).direction)) > 0


def test_directions_agree_across_backends(ad_backend):
    ref = backends.get("numpy")
    for name in ("mse", "softmax", "bce"):
        for solver, scaled in (("dual", False), ("dual", True), ("primal", False)):
            a = raveled(ad_backend, run(ad_backend, name, solver, 4, scaled=scaled).direction)
            b = raveled(ref, run(ref, name, solver, 4, scaled=scaled).direction)
            assert_close(a, b, rtol=1e-10)


# ------------------------------------------------------------------------------ conjugates


def test_closed_form_conjugates(rng):
    y = rng.standard_normal((4, 3))
    a = rng.standard_normal((4, 3))
    mse = MSE()
    # squared: the sup of <a, f> - 1/2|f - y|^2 is attained at f = y + a
    fstar = y + a
    value = np.sum(a * fstar, axis=1) - mse.per_sample(fstar, y)
    assert_close(mse.conjugate(a, y), value, rtol=1e-13)
    for _ in range(5):
        f = fstar + 0.1 * rng.standard_normal(fstar.shape)
        assert np.all(np.sum(a * f, axis=1) - mse.per_sample(f, y) <= value + 1e-12)
    # softmax CE: mu = y + a in the simplex, sup attained at f = log mu (up to a constant shift)
    ce = SoftmaxCrossEntropy()
    labels = np.eye(3)[[0, 2, 1, 1]]
    mu = rng.dirichlet(np.ones(3), size=4)
    a = mu - labels
    f = np.log(mu)
    value = np.sum(a * f, axis=1) - ce.per_sample(f, labels)
    assert_close(ce.conjugate(a, labels), value, rtol=1e-12)
    assert_close(value, np.sum(mu * np.log(mu), axis=1), rtol=1e-12)
    for _ in range(5):
        g = f + 0.1 * rng.standard_normal(f.shape)
        assert np.all(np.sum(a * g, axis=1) - ce.per_sample(g, labels) <= value + 1e-12)
    # off the simplex the conjugate is +inf
    assert np.all(np.isinf(ce.conjugate(a + 0.1, labels)))


def test_lemma7_and_prop8(rng):
    # Lemma 7: (1/2 w^T A w)^* (v) = 1/2 v^T A^+ v on range(A), +inf elsewhere
    b = rng.standard_normal((5, 3))
    a = b @ b.T  # PSD, rank 3
    ap = np.linalg.pinv(a)
    v = a @ rng.standard_normal(5)
    w = ap @ v  # maximiser of <v, w> - 1/2 w^T A w
    sup = v @ w - 0.5 * w @ a @ w
    assert abs(sup - 0.5 * v @ ap @ v) <= 1e-12 * abs(sup)
    for _ in range(5):
        u = w + 0.1 * rng.standard_normal(5)
        assert v @ u - 0.5 * u @ a @ u <= sup + 1e-12
    null = np.linalg.svd(a)[0][:, -1]
    vo = v + null
    assert (vo @ (100 * null) - 0) > 10  # unbounded along the null space: +inf
    # Prop. 8: the conjugate of the quadratic model of softmax CE at f is, with
    # beta = alpha - grad l(f): <alpha, f> - l(f) + 1/2 <beta, D^{-1} beta> if 1^T beta = 0
    ce = SoftmaxCrossEntropy()
    f = rng.standard_normal((1, 4))
    y = np.eye(4)[[1]]
    g = ce.grad(f, y)[0]
    h = ce.hessian(f, y)[0]
    s = np.exp(f[0]) / np.exp(f[0]).sum()
    beta = rng.standard_normal(4)
    beta -= beta.mean()
    alpha = g + beta
    hp = np.linalg.pinv(h)
    u = f[0] + hp @ beta  # maximiser of <alpha, u> - q(u)
    q = ce.per_sample(f, y)[0] + g @ (u - f[0]) + 0.5 * (u - f[0]) @ h @ (u - f[0])
    sup = alpha @ u - q
    closed = alpha @ f[0] - ce.per_sample(f, y)[0] + 0.5 * beta @ (beta / s)
    assert abs(sup - closed) <= 1e-12 * max(1.0, abs(sup))
    # the pseudo-inverse is P D^{-1} P with P = I - (1/k) 1 1^T
    proj = np.eye(4) - np.ones((4, 4)) / 4
    assert_close(hp, proj @ np.diag(1 / s) @ proj, rtol=1e-10)
    assert_close(ce.pinv_hvp(f, y, beta[None, :])[0], hp @ beta, rtol=1e-10)


# ------------------------------------------------------------------------------ linear model


def linear_apply(params, x):
    return x @ params["w"].T


def test_linear_model_gram_and_sdca(ad_backend, rng):
    m, n, k = 5, 4, 3
    x = rng.standard_normal((m, n))
    params = {"w": rng.standard_normal((k, n))}
    lin = Linearization(linear_apply, to(ad_backend, params), to(ad_backend, x))
    v = rng.standard_normal((m, k))
    kmat = x @ x.T
    assert_close(lin.jvp(lin.vjp(to(ad_backend, v))), kmat @ v, backend=ad_backend)
    # SDCA: m = 1, squared loss: alpha = sigma / (1 + sigma) (f - y), sigma = 1/(gamma |x|^2)
    x1, y1 = x[:1], rng.standard_normal((1, k))
    lin1 = Linearization(linear_apply, to(ad_backend, params), to(ad_backend, x1))
    res = dual_direction(lin1, MSE(), to(ad_backend, y1), gamma=GAMMA, inner_steps=3)
    sigma = 1.0 / (GAMMA * x1[0] @ x1[0])
    expected = sigma / (1 + sigma) * (x1 @ params["w"].T - y1)
    assert_close(res.alpha, expected, rtol=1e-12, backend=ad_backend)


# ------------------------------------------------------------------------------ l1 variant


def test_soft_threshold_is_the_l1_prox(backend, rng):
    z = rng.standard_normal(50)
    t = 0.4
    out = back(backend, soft_threshold(to(backend, z), t))
    grid = np.linspace(-4, 4, 80001)
    brute = np.array([grid[np.argmin(0.5 * (grid - zi) ** 2 + t * np.abs(grid))] for zi in z])
    assert np.max(np.abs(out - brute)) <= 1e-4
    assert_close(out, np.sign(z) * np.maximum(np.abs(z) - t, 0), rtol=1e-15)


def test_l1_step_is_algorithm3(ad_backend):
    params, x, y = problem("softmax")
    lam = 0.05
    opt = ProxLinear(MODEL.apply, LOSSES["softmax"], gamma=GAMMA, inner_steps=3, l1=lam)
    bp, bx, by = to(ad_backend, params), to(ad_backend, x), to(ad_backend, y)
    new, _, info = opt.step(bp, opt.init(bp), (bx, by))
    d = prox_linear_direction(MODEL.apply, LOSSES["softmax"], bp, (bx, by), gamma=GAMMA,
                              inner_steps=3).direction
    expected = soft_threshold(tree.sub(back(ad_backend, bp), back(ad_backend, d)), GAMMA * lam)
    assert_close(raveled(ad_backend, new), tree.ravel(expected)[0], rtol=1e-12)
    assert bool(info.finite)


# ------------------------------------------------------------------------------ optimiser


@pytest.mark.parametrize("solver", ["dual", "primal"])
def test_armijo_decreases_batch_loss(ad_backend, solver):
    params, x, y = problem("softmax", seed=1)
    opt = ProxLinear(MODEL.apply, LOSSES["softmax"], solver=solver, update="armijo",
                     inner_steps=3)
    p, batch = to(ad_backend, params), (to(ad_backend, x), to(ad_backend, y))
    state = opt.init(p)
    losses = []
    for _ in range(4):
        p, state, info = opt.step(p, state, batch)
        losses.append(float(back(ad_backend, info.loss)))
        assert bool(info.finite)
    final = float(back(ad_backend, opt.objective(p, batch)))
    assert final < losses[0] and all(b <= a for a, b in zip(losses, losses[1:]))


def test_direction_handed_to_sgd_tends_to_sgd(ad_backend):
    params, x, y = problem("mse", seed=2)
    p, batch = to(ad_backend, params), (to(ad_backend, x), to(ad_backend, y))
    sgd = SGD(MODEL.apply, LOSSES["mse"], lr=0.1, momentum=0.9)
    wrapped = ProxLinear(MODEL.apply, LOSSES["mse"], gamma=1e-9, inner_steps=2,
                         optimizer=SGD(MODEL.apply, LOSSES["mse"], lr=0.1, momentum=0.9))
    a, _, _ = sgd.step(p, sgd.init(p), batch)
    b, state, info = wrapped.step(p, wrapped.init(p), batch)
    assert_close(raveled(ad_backend, b), raveled(ad_backend, a), rtol=1e-7)
    assert "inner" in state._fields and bool(info.finite)
    adam = ProxLinear(MODEL.apply, LOSSES["mse"], gamma=1.0, inner_steps=2,
                      optimizer=Adam(MODEL.apply, LOSSES["mse"], lr=1e-2))
    q, _, info = adam.step(p, adam.init(p), batch)
    assert bool(info.finite) and float(back(ad_backend, info.step_norm)) > 0


def test_non_finite_batch_keeps_params(ad_backend):
    params, x, y = problem("softmax")
    x = x.copy()
    x[0, 0] = np.nan
    p = to(ad_backend, params)
    for update in ("spl", "armijo"):
        opt = ProxLinear(MODEL.apply, LOSSES["softmax"], update=update, inner_steps=2)
        new, _, info = opt.step(p, opt.init(p), (to(ad_backend, x), to(ad_backend, y)))
        assert not bool(info.finite)
        assert_close(raveled(ad_backend, new), tree.ravel(params)[0], rtol=0)


@pytest.mark.parametrize("config", [
    {"solver": "dual"}, {"solver": "dual", "scaled": True}, {"solver": "primal"},
    {"solver": "dual", "update": "armijo"}, {"solver": "dual", "l1": 1e-3},
    {"solver": "dual", "optimizer": "adam"},
])
def test_jit_step_compiles(config):
    jax = pytest.importorskip("jax")
    b = backends.get("jax")
    config = dict(config)
    if config.get("optimizer") == "adam":
        config["optimizer"] = Adam(MODEL.apply, LOSSES["softmax"], lr=1e-2)
    opt = ProxLinear(MODEL.apply, LOSSES["softmax"], inner_steps=3, **config)
    params, x, y = problem("softmax")
    p, batch = to(b, params), (to(b, x), to(b, y))
    state = opt.init(p)
    new, _, info = jax.jit(opt.step)(p, state, batch)
    eager, _, _ = opt.step(p, state, batch)
    assert_close(raveled(b, new), raveled(b, eager), rtol=1e-10)
    assert bool(info.finite)
    bad = (b.asarray(np.where(np.arange(x.size).reshape(x.shape) == 0, np.nan, x)), batch[1])
    kept, _, info = jax.jit(opt.step)(p, state, bad)
    assert not bool(info.finite)
    assert_close(raveled(b, kept), tree.ravel(params)[0], rtol=0)


def test_invalid_arguments():
    with pytest.raises(ValueError):
        ProxLinear(MODEL.apply, MSE(), solver="nope")
    with pytest.raises(ValueError):
        ProxLinear(MODEL.apply, MSE(), update="nope")
    with pytest.raises(ValueError):
        ProxLinear(MODEL.apply, MSE(), gamma=-1.0)
    with pytest.raises(ValueError):
        ProxLinear(MODEL.apply, MSE(), update="armijo", l1=0.1)
    with pytest.raises(ValueError):
        ProxLinear(MODEL.apply, MSE(), solver="primal", scaled=True)
