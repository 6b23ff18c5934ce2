"""CurveBall: the 2x2 system, descent, Theorem A.1's convergence region, damping rule, and the
common optimiser contract (cross-backend agreement, jit, non-finite guard)."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_close, back, to
from secondorder import backends, losses, tree
from secondorder.models import MLP
from secondorder.optim import CurveBall

pytest.importorskip("autograd")


def _mlp_problem(rng, backend):
    model = MLP([3, 5, 2], "tanh")
    x, y = rng.standard_normal((8, 3)), rng.standard_normal((8, 2))
    return model, model.init(0, backend), (to(backend, x), to(backend, y))


@pytest.mark.parametrize("seed", range(5))
def test_closed_form_matches_brute_force_2x2(seed):
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((2, 2))
    (a, b), (_, c) = m @ m.T + 0.1 * np.eye(2)
    d, e = rng.standard_normal(2)

    def model(rho, beta):  # predicted change of z = rho z - beta Delta (eq. 18's objective)
        return rho * e - beta * d + 0.5 * (rho**2 * c - 2 * rho * beta * b + beta**2 * a)

    # brute force: minimise over a fine grid around the stationary point of a dense solve
    beta0, neg_rho0 = np.linalg.solve(np.array([[a, b], [b, c]]), [d, e])
    grid = np.linspace(-1, 1, 401)
    rr, bb = np.meshgrid(-neg_rho0 + 0.01 * grid, beta0 + 0.01 * grid)
    k = np.argmin(model(rr, bb))
    nb = backends.get("numpy")
    rho, beta = CurveBall.solve_2x2(*(nb.asarray(np.float64(t)) for t in (a, b, c, d, e)))
    assert abs(float(rho) - rr.flat[k]) <= 5e-5 and abs(float(beta) - bb.flat[k]) <= 5e-5
    # eq. 25, the row-swapped form, gives the same solution
    rho25, beta25 = np.linalg.solve(np.array([[c, b], [b, a]]), [e, d]) * np.array([-1, 1])
    assert abs(float(rho) - rho25) <= 1e-12 * (1 + abs(rho25))
    assert abs(float(beta) - beta25) <= 1e-12 * (1 + abs(beta25))


def test_first_step_uses_the_pseudo_inverse():
    nb = backends.get("numpy")
    a, d = nb.asarray(np.float64(2.0)), nb.asarray(np.float64(3.0))
    zero = nb.asarray(np.float64(0.0))
    rho, beta = CurveBall.solve_2x2(a, zero, zero, d, zero)
    assert float(rho) == 0.0 and float(beta) == 1.5


def test_new_direction_is_a_descent_direction(ad_backend, rng):
    model, params, batch = _mlp_problem(rng, ad_backend)
    opt = CurveBall(model, losses.MSE(), damping=0.5)
    for _ in range(3):
        z = tree.map(lambda a: ad_backend.asarray(rng.standard_normal(a.shape)), params)
        q = opt._quantities(params, z, opt.scalar(params, 0.5), batch)
        rho, beta = opt.solve_2x2(q["a"], q["b"], q["c"], q["d"], q["e"])
        z_new = tree.map(lambda zi, di, r=rho, s=beta: r * zi - s * di, z, q["delta"])
        assert float(tree.vdot(q["grad"], z_new)) < 0  # Theorem A.2: J^T z < 0


def _quadratic(rng, n=4):
    x = rng.standard_normal((32, n))
    w_star = rng.standard_normal(n)
    return MLP([n, 1]), x, (x @ w_star)[:, None]


@pytest.mark.parametrize("seed", range(6))
def test_theorem_a1_convergence_region(seed):
    rng = np.random.default_rng(seed)
    model, x, y = _quadratic(rng)
    xb = np.hstack([x, np.ones((32, 1))])
    h = np.linalg.eigvalsh(xb.T @ xb / 32)  # Hessian of the mean squared error in (w, b)
    beta = rng.uniform(0.2, 1.5) / h.max()
    inside = 0.5 * (1.5 * beta * h.max() - 1 + 1 + beta * h.min())
    outside = 1 + beta * h.min() + 0.3
    for rho, converges in ((inside, True), (outside, False)):
        region = 1.5 * beta * h.max() - 1 < rho < 1 + beta * h.min()
        assert region == converges
        # the per-eigenvalue transition matrices R_i of Theorem A.1
        radius = max(max(abs(np.linalg.eigvals(np.array(
            [[rho - beta * hi, -beta * hi], [rho - beta * hi, 1 - beta * hi]])))) for hi in h)
        assert (radius < 1) == converges
        nb = backends.get("numpy")
        opt = CurveBall(model, losses.MSE(), rho=rho, beta=beta, damping=0.0)
        params = model.init(1, nb)
        state = opt.init(params)
        start = float(opt.objective(params, (x, y)))
        for _ in range(300):
            params, state, info = opt.step(params, state, (x, y))
        final = float(opt.objective(params, (x, y)))
        if converges:
            assert final <= 1e-10 * start
        else:
            assert not (final <= start) or not bool(info.finite)


def test_damping_rule(ad_backend, rng):
    model, params, batch = _mlp_problem(rng, ad_backend)
    opt = CurveBall(model, losses.MSE(), damping=2.0, lambda_interval=1, lambda_factor=0.9)
    state = opt.init(params)
    for _ in range(4):
        lam = float(state["damping"])
        q = opt._quantities(params, state["z"], state["damping"], batch)
        rho, beta = opt.solve_2x2(q["a"], q["b"], q["c"], q["d"], q["e"])
        predicted = 0.5 * (float(rho) * float(q["e"]) - float(beta) * float(q["d"]))
        new_params, state, info = opt.step(params, state, batch)
        gamma = (float(opt.objective(new_params, batch)) - float(q["loss"])) / predicted
        expected = lam * 0.9 if gamma > 1.5 else (lam / 0.9 if gamma < 0.5 else lam)
        assert abs(float(state["damping"]) - expected) <= 1e-12 * expected
        params = new_params


def test_extras_report_the_models_predicted_change(ad_backend, rng):
    """On least squares the GGN is the Hessian, so the loss change of a step s = z' is exactly
    the undamped quadratic model: f(w + s) - f(w) = predicted - lambda |s|^2 / 2, with predicted
    the damped model's change that info.extras reports (and rho, beta those of the step)."""
    model, x, y = _quadratic(rng)
    loss = losses.MSE()
    params = model.init(0, ad_backend)
    batch = (to(ad_backend, x), to(ad_backend, y))
    opt = CurveBall(model, loss, damping=0.3, adapt_damping=False)
    state = opt.init(params)
    for _ in range(3):
        z_old = state.z
        new_params, new_state, info = opt.step(params, state, batch)
        rho, beta, predicted = (float(info.extras[k]) for k in ("rho", "beta", "predicted"))
        s = new_state.z
        change = float(opt.objective(new_params, batch)) - float(opt.objective(params, batch))
        lam = float(state.damping)
        assert change == pytest.approx(predicted - 0.5 * lam * float(tree.vdot(s, s)),
                                       rel=1e-9, abs=1e-14)
        q = opt._quantities(params, z_old, state.damping, batch)
        expected_z = tree.map(lambda zi, di, r=rho, b=beta: r * zi - b * di, z_old, q["delta"])
        assert_close(s, back(ad_backend, expected_z), rtol=1e-12, backend=ad_backend)
        params, state = new_params, new_state
