"""Dense second-order baselines (Newton, Levenberg-Marquardt, BFGS) against NumPy oracles."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from helpers import assert_close, back, to
from secondorder import backends
from secondorder.backends import backend_of
from secondorder.losses import MSE
from secondorder.models import MLP
from secondorder.optim import BFGS, LevenbergMarquardt, Newton

SQRT2 = math.sqrt(2.0)


# ----------------------------------------------------------------- Rosenbrock as a residual model
def rosenbrock_apply(params, x):
    """r = sqrt(2) (1 - u, 10 (v - u^2)) as a (1, 2) output: the mean MSE against 0 is
    1/2 ||r||^2 = (1 - u)^2 + 100 (v - u^2)^2 = R(u, v)."""
    xp = backend_of(params).xp
    u, v = params[0], params[1]
    return xp.reshape(SQRT2 * xp.stack([1.0 - u, 10.0 * (v - u * u)]), (1, 2))


def rosen(p):
    u, v = p
    return (1 - u) ** 2 + 100 * (v - u * u) ** 2


def rosen_grad(p):
    u, v = p
    return np.array([-2 * (1 - u) - 400 * u * (v - u * u), 200 * (v - u * u)])


def rosen_hess(p):
    u, v = p
    return np.array([[2 - 400 * v + 1200 * u * u, -400 * u], [-400 * u, 200.0]])


def rosen_residual_jacobian(p):
    u, v = p
    r = SQRT2 * np.array([1 - u, 10 * (v - u * u)])
    jac = SQRT2 * np.array([[-1.0, 0.0], [-20 * u, 10.0]])
    return r, jac


def rosen_batch(backend):
    return to(backend, (np.zeros((1, 1)), np.zeros((1, 2))))


# ----------------------------------------------------------------- a tiny MLP problem
METHODS = {
    "newton": lambda apply: Newton(apply, MSE(), variant="plain", damping=1.0),
    "newton-abs": lambda apply: Newton(apply, MSE(), variant="abs", damping=0.1),
    # damped: undamped abs-Newton on this MLP's singular Hessian divides by the 1e-8 eigenvalue
    # floor, and its runs differ across frameworks by ~1e-5 after 10 steps, search or not
    "newton-abs-cubic": lambda apply: Newton(apply, MSE(), variant="abs", damping=1e-2,
                                             line_search="cubic"),
    "lm": lambda apply: LevenbergMarquardt(apply, MSE()),
    "lm-identity": lambda apply: LevenbergMarquardt(apply, MSE(), scaling="identity"),
    "bfgs": lambda apply: BFGS(apply, MSE()),
}


def mlp_problem(backend):
    model = MLP([3, 4, 2])
    data = np.random.default_rng(0)
    x, y = data.standard_normal((6, 3)), data.standard_normal((6, 2))
    return model, model.init(0, backend=backend), to(backend, (x, y))


def run(method, backend, steps):
    """(params, state, info) after each of ``steps`` steps, converted to NumPy."""
    model, params, batch = mlp_problem(backend)
    opt = METHODS[method](model)
    state = opt.init(params)
    out = []
    for _ in range(steps):
        params, state, info = opt.step(params, state, batch)
        out.append(back(backend, (params, state, tuple(info))))
    return out


@functools.cache
def numpy_run(method, steps):
    return run(method, backends.get("numpy"), steps)


# ----------------------------------------------------------------- Newton
def test_newton_minimises_a_quadratic_in_one_step(ad_backend, rng):
    model = MLP([4, 3])  # one dense layer: f = W x + b, so MSE is a quadratic in (b, W)
    x, y = rng.standard_normal((10, 4)), rng.standard_normal((10, 3))
    coef = np.linalg.lstsq(np.hstack([np.ones((10, 1)), x]), y, rcond=None)[0]
    expected = [{"b": coef[0], "w": coef[1:].T}]
    opt = Newton(model, MSE())
    params = model.init(0, backend=ad_backend)
    params, state, info = opt.step(params, opt.init(params), to(ad_backend, (x, y)))
    assert int(state.count) == 1 and state.transform == ()
    assert bool(info.finite) and float(info.damping) == 0.0
    assert_close(params, expected, rtol=1e-10, backend=ad_backend)


@pytest.mark.parametrize("variant,damping", [("abs", 0.0), ("abs", 0.5), ("plain", 0.5)])
def test_newton_step_on_an_indefinite_hessian(ad_backend, variant, damping):
    p = np.array([0.5, 1.0])
    hess, g = rosen_hess(p), rosen_grad(p)
    w, q = np.linalg.eigh(hess)
    assert w[0] < 0 < w[1]  # indefinite
    values = np.abs(w) if variant == "abs" else w
    expected = p - q @ ((q.T @ g) / (values + damping))
    if variant == "abs":
        assert g @ (expected - p) < 0  # a descent direction
    opt = Newton(rosenbrock_apply, MSE(), variant=variant, damping=damping)
    start = to(ad_backend, p)
    params, _, info = opt.step(start, opt.init(start), rosen_batch(ad_backend))
    assert_close(params, expected, rtol=1e-12, backend=ad_backend)
    assert float(info.loss) == pytest.approx(rosen(p), rel=1e-14)


def armijo_oracle(f, f0, slope, interpolation, c1=1e-4, trials=30):
    """Scalar backtracking (Nocedal & Wright, Algorithm 3.1 and Section 3.5) in plain Python:
    (step, evaluations)."""
    t, prev = 1.0, None
    for n in range(1, trials + 1):
        ft = f(t)
        if ft <= f0 + c1 * t * slope:
            return t, n
        if interpolation == "halve":
            t_next = 0.5 * t
        elif prev is None:
            t_next = -slope * t * t / (2 * (ft - f0 - slope * t))
        else:
            tp, fp = prev
            m = np.array([[1 / t**2, -1 / tp**2], [-tp / t**2, t / tp**2]]) / (t - tp)
            a, b = m @ np.array([ft - f0 - slope * t, fp - f0 - slope * tp])
            t_next = (-b + math.sqrt(b * b - 3 * a * slope)) / (3 * a)
        prev = (t, ft)
        t = min(max(t_next, 0.1 * t), 0.5 * t)
    return 0.0, trials


@pytest.mark.parametrize("interpolation", ["halve", "cubic"])
def test_newton_line_search_follows_the_scalar_oracle(ad_backend, interpolation):
    """Abs-eigenvalue Newton with backtracking on Rosenbrock from (-1.2, 1), step by step against
    the NumPy direction and the scalar search above, until it converges."""
    opt = Newton(rosenbrock_apply, MSE(), variant="abs", line_search=interpolation)
    batch = rosen_batch(ad_backend)
    p = np.array([-1.2, 1.0])
    params = to(ad_backend, p)
    shortened = 0
    for _ in range(60):
        if rosen(p) < 1e-12:
            break
        w, q = np.linalg.eigh(rosen_hess(p))
        g = rosen_grad(p)
        d = -q @ ((q.T @ g) / np.maximum(np.abs(w), 1e-8))
        t, n = armijo_oracle(lambda s, p=p, d=d: rosen(p + s * d), rosen(p), g @ d,
                             interpolation)
        shortened += t < 1
        params, _, info = opt.step(params, opt.init(params), batch)
        p = p + t * d
        assert_close(params, p, rtol=1e-10, backend=ad_backend)
        assert int(info.inner_iterations) == n
        assert info.step_norm > 0
    assert rosen(p) < 1e-12
    assert shortened >= 2  # the search did cut some steps


def test_newton_line_search_keeps_params_on_an_ascent_direction(ad_backend):
    # plain Newton at a saddle-like point where -H^{-1} g points uphill: the step is skipped
    p = np.array([0.0, 0.01])
    hess, g = rosen_hess(p), rosen_grad(p)
    d = -np.linalg.solve(hess, g)
    assert g @ d > 0
    opt = Newton(rosenbrock_apply, MSE(), variant="plain", line_search="cubic")
    start = to(ad_backend, p)
    params, _, info = opt.step(start, opt.init(start), rosen_batch(ad_backend))
    assert_close(params, p, rtol=0.0, backend=ad_backend)
    assert float(info.step_norm) == 0.0 and bool(info.finite)
    assert int(info.inner_iterations) == opt.max_line_search


def test_newton_rejects_an_unknown_line_search():
    with pytest.raises(ValueError, match="line_search"):
        Newton(rosenbrock_apply, MSE(), line_search="wolfe")


# ----------------------------------------------------------------- Levenberg-Marquardt
@pytest.mark.parametrize("scaling", ["more", "identity"])
def test_lm_decreases_the_loss_monotonically(ad_backend, scaling):
    model, params, batch = mlp_problem(ad_backend)
    opt = LevenbergMarquardt(model, MSE(), scaling=scaling)
    state = opt.init(params)
    losses = []
    for _ in range(12):
        params, state, info = opt.step(params, state, batch)
        losses.append(float(info.loss))
    losses.append(float(opt.objective(params, batch)))
    assert all(b <= a for a, b in zip(losses, losses[1:]))
    assert losses[-1] < 1e-2 * losses[0]


def lm_oracle(p, lam, scale, scaling):
    """One LM step in NumPy: (params, damping, scale, rho)."""
    r, jac = rosen_residual_jacobian(p)
    g, ggn = jac.T @ r, jac.T @ jac  # m = 1, loss Hessian I
    if scaling == "more":
        scale = np.maximum(scale, np.diag(ggn))
        diag = np.where(scale > 0, scale, 1.0)
    else:
        diag = np.ones(2)
    d = np.linalg.solve(ggn + lam * np.diag(diag), -g)
    rho = (rosen(p) - rosen(p + d)) / -(g @ d + 0.5 * d @ ggn @ d)
    new_p = p + d if rho > 0 else p
    new_lam = lam / 3 if rho > 0.75 else (lam * 2 if rho < 0.25 else lam)
    return new_p, new_lam, scale, rho


@pytest.mark.parametrize("scaling", ["more", "identity"])
def test_lm_damping_follows_the_reduction_ratio(ad_backend, scaling):
    batch = rosen_batch(ad_backend)
    branches = set()
    for p0 in (np.array([-1.2, 1.0]), np.array([0.5, 0.1])):
        for lam in (1e-3, 1e-1, 1.0, 30.0):
            opt = LevenbergMarquardt(rosenbrock_apply, MSE(), damping=lam, scaling=scaling,
                                     min_damping=1e-6)
            params = to(ad_backend, p0)
            state = opt.init(params)
            # two steps, so that the second one starts from a non-zero Moré scale
            p, lam_np, scale = p0, lam, np.zeros(2)
            for _ in range(2):
                params, state, info = opt.step(params, state, batch)
                p, lam_np, scale, rho = lm_oracle(p, lam_np, scale, scaling)
                branches.add((rho > 0, rho > 0.75, rho < 0.25))
                assert float(info.damping) == pytest.approx(lam_np, rel=1e-12)
                assert float(state["damping"]) == pytest.approx(lam_np, rel=1e-12)
                assert_close(params, p, rtol=1e-12, backend=ad_backend)
                if scaling == "more":
                    assert_close(state["scale"], scale, rtol=1e-12, backend=ad_backend)
    assert {(True, True, False), (False, False, True)} <= branches  # decreased and increased


# ----------------------------------------------------------------- BFGS
def test_bfgs_wolfe_steps_spd_inverse_hessian_and_rosenbrock(ad_backend):
    opt = BFGS(rosenbrock_apply, MSE())
    batch = rosen_batch(ad_backend)
    params = to(ad_backend, np.array([-1.2, 1.0]))
    state = opt.init(params)
    evaluations = []
    for _ in range(100):
        p = back(ad_backend, params)
        params, state, info = opt.step(params, state, batch)
        new = back(ad_backend, params)
        s, g, g_new = new - p, rosen_grad(p), rosen_grad(new)
        assert bool(info.finite)
        assert float(info.loss) == pytest.approx(rosen(p), rel=1e-12)
        if rosen(p) < 1e-20:  # converged to rounding: nothing left to test
            break
        assert g @ s < 0
        assert rosen(new) <= rosen(p) + opt.c1 * (g @ s)  # Armijo
        assert g_new @ s >= opt.c2 * (g @ s)  # curvature
        h = back(ad_backend, state["inv_hessian"])
        assert_close(h, h.T, rtol=1e-12)
        assert np.linalg.eigvalsh(0.5 * (h + h.T))[0] > 0
        evaluations.append(int(info.inner_iterations))
    assert rosen(back(ad_backend, params)) < 1e-16
    assert_close(params, np.ones(2), rtol=1e-7, backend=ad_backend)
    assert 1 <= min(evaluations) and max(evaluations) <= opt.max_line_search
    assert max(evaluations) > 1  # the first step (H = I) needs bisection


# ----------------------------------------------------------------- across backends and jit
@pytest.mark.parametrize("method", list(METHODS))
def test_first_ten_steps_agree_with_numpy(ad_backend, method):
    expected = numpy_run(method, 10)
    actual = run(method, ad_backend, 10)
    for (p, s, info), (p_np, s_np, info_np) in zip(actual, expected):
        assert_close(p, p_np, rtol=1e-10)
        assert_close(s, s_np, rtol=1e-10)
        # loss, step norm, damping (NaN for BFGS), finite, inner iterations, inner residual
        np.testing.assert_allclose(np.array(info[:6], dtype=float),
                                   np.array(info_np[:6], dtype=float),
                                   rtol=1e-10, atol=0.0)


@pytest.mark.parametrize("method", list(METHODS))
def test_step_compiles_under_jax_jit(method):
    jax = pytest.importorskip("jax")
    model, params, batch = mlp_problem(backends.get("jax"))
    opt = METHODS[method](model)
    step = jax.jit(opt.step)
    eager = jitted = (params, opt.init(params))
    for _ in range(5):
        *eager, info_e = opt.step(*eager, batch)
        *jitted, info_j = step(*jitted, batch)
        assert_close(back(backends.get("jax"), jitted), back(backends.get("jax"), eager),
                     rtol=1e-10)
        assert bool(info_j.finite) and int(info_j.inner_iterations) == int(
            info_e.inner_iterations)


# ----------------------------------------------------------------- non-finite batches
def check_nonfinite(backend, method, step_of):
    """One good step, then a batch with inf in y: params and state kept, finite False, and
    LM's damping multiplied by 10."""
    model, params, batch = mlp_problem(backend)
    opt = METHODS[method](model)
    step = step_of(opt)
    params, state, _ = step(params, opt.init(params), batch)  # a non-trivial state
    x, y = back(backend, batch)
    y = np.array(y)
    y[2, 1] = np.inf
    new_params, new_state, info = step(params, state, to(backend, (x, y)))
    assert not bool(info.finite)
    assert float(info.step_norm) == 0.0
    assert_close(new_params, back(backend, params), rtol=0.0, backend=backend)
    old, new = back(backend, state)._asdict(), back(backend, new_state)._asdict()
    if "damping" in old:
        assert float(new.pop("damping")) == 10.0 * float(old.pop("damping"))
        assert float(info.damping) == float(new_state["damping"])
    assert_close(new, old, rtol=0.0)


@pytest.mark.parametrize("method", list(METHODS))
def test_nonfinite_batch_keeps_params_and_state(ad_backend, method):
    check_nonfinite(ad_backend, method, lambda opt: opt.step)


@pytest.mark.parametrize("method", list(METHODS))
def test_nonfinite_batch_under_jax_jit(method):
    jax = pytest.importorskip("jax")
    check_nonfinite(backends.get("jax"), method, lambda opt: jax.jit(opt.step))
