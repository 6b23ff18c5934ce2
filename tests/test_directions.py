"""The pieces the second-order methods are assembled from (``secondorder.optim.directions`` and
``secondorder.optim.step_rules``), each against an independent dense NumPy reference: Hessians,
GGNs and gradients from autograd, ``np.linalg.solve``, brute-force minimisation, explicit
Kronecker products."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_close, back, spd, to
from secondorder import losses, random, tree
from secondorder.curvature import Hessian
from secondorder.curvature.blocks import DenseBlock
from secondorder.errors import HyperparameterError
from secondorder.models import MLP
from secondorder.optim import CurveBall, HessianFree, LevenbergMarquardt, Newton
from secondorder.optim.directions import (
    curvature_operator,
    curveball_direction,
    curveball_quantities,
    damped_cg_direction,
    dense_system,
    newton_direction,
    prox_linear_direction,
)
from secondorder.optim.step_rules import (
    best_cg_iterate,
    curveball_damping,
    fixed_step,
    more_damping,
    reduction_ratio,
)
from secondorder.optim.transforms import clip_by_global_norm, scale

autograd = pytest.importorskip("autograd")
LAM = 0.3


def problem(backend, rng, sizes=(3, 4, 2), m=6):
    """A tanh MLP under MSE: (model, loss, params, batch) on ``backend`` and NumPy oracles
    (flat parameters, unravel, objective of the flat parameters, outputs of them)."""
    model, loss = MLP(list(sizes), "tanh"), losses.MSE()
    x, y = rng.standard_normal((m, sizes[0])), rng.standard_normal((m, sizes[-1]))
    params_np = model.init(0, "numpy")
    flat, unravel = tree.ravel(params_np)

    def outputs(w):
        return model.apply(unravel(w), x)

    def objective(w):
        return loss.value(outputs(w), y)

    oracle = {"flat": flat, "unravel": unravel, "objective": objective, "outputs": outputs,
              "y": y, "loss": loss}
    return model, loss, model.init(0, backend), (to(backend, x), to(backend, y)), oracle


def dense_ggn(oracle):
    """J^T H_f J from autograd: J the Jacobian of the outputs, H_f the Hessian of the loss in
    the outputs."""
    w = oracle["flat"]
    f = oracle["outputs"](w)
    jac = autograd.jacobian(oracle["outputs"])(w)  # (m, k, p)
    h_f = autograd.hessian(lambda out: oracle["loss"].value(out, oracle["y"]))(f)  # (m,k,m,k)
    return np.einsum("ikp,ikjl,jlq->pq", jac, h_f, jac)


def flat_np(backend, x):
    return tree.ravel(back(backend, x))[0]


# ------------------------------------------------------------------ Newton systems
@pytest.mark.parametrize("variant", ["plain", "abs"])
def test_newton_direction_is_the_dense_solve(ad_backend, rng, variant):
    model, loss, params, batch, oracle = problem(ad_backend, rng)
    system = dense_system(model, loss, Hessian, params, batch)
    w = oracle["flat"]
    hess = autograd.hessian(oracle["objective"])(w)
    g = autograd.grad(oracle["objective"])(w)
    assert_close(system.raw, hess, backend=ad_backend)
    assert_close(system.g, g, backend=ad_backend)
    assert float(system.loss) == pytest.approx(oracle["objective"](w), rel=1e-14)
    d = newton_direction(system.g, system.sym, LAM, variant=variant)
    if variant == "plain":
        expected = -np.linalg.solve(hess + LAM * np.eye(len(g)), g)
    else:  # |H| = Q |Lambda| Q^T, floored at 1e-8
        values, vectors = np.linalg.eigh(hess)
        assert values.min() < 0  # the tanh MLP's Hessian is indefinite here
        abs_h = (vectors * np.maximum(np.abs(values), 1e-8)) @ vectors.T
        expected = -np.linalg.solve(abs_h + LAM * np.eye(len(g)), g)
        assert g @ expected < 0
    assert_close(d, expected, rtol=1e-10, backend=ad_backend)


def test_newton_direction_solve_with_a_diagonal_scale(backend, rng):
    c, g, diag = spd(rng, 5, cond=30.0), rng.standard_normal(5), rng.uniform(0.5, 2.0, 5)
    d = newton_direction(to(backend, g), to(backend, c), LAM, method="solve",
                         diag=to(backend, diag))
    assert_close(d, -np.linalg.solve(c + LAM * np.diag(diag), g), backend=backend)
    with pytest.raises(HyperparameterError, match="method='eigh'"):
        newton_direction(to(backend, g), to(backend, c), variant="abs", method="solve")
    with pytest.raises(HyperparameterError, match="method='solve'"):
        newton_direction(to(backend, g), to(backend, c), diag=to(backend, diag))


# ------------------------------------------------------------------ CG directions
def test_damped_cg_direction_is_the_dense_solve_from_a_warm_start(backend, rng):
    n = 7
    c, g, prev = spd(rng, n, cond=50.0), rng.standard_normal(n), rng.standard_normal(n)
    cb = to(backend, c)
    d, info = damped_cg_direction(lambda v: cb @ v, to(backend, g), LAM, to(backend, prev),
                                  warm_start_decay=0.5, maxiter=40, tol=0.0, save_at=(0, 40))
    expected = -np.linalg.solve(c + LAM * np.eye(n), g)
    assert_close(d, expected, rtol=1e-10, backend=backend)
    assert_close(info.saved[0], 0.5 * prev, rtol=0.0, backend=backend)  # the warm start
    assert_close(info.saved[1], expected, rtol=1e-10, backend=backend)


def test_curvature_operator_ggn_and_fisher_key(ad_backend, rng):
    model, loss, params, batch, oracle = problem(ad_backend, rng)
    op, key = curvature_operator("ggn", model, loss, params, batch)
    assert key is None
    assert_close(op.to_dense(), dense_ggn(oracle), backend=ad_backend)
    k0 = random.key(3, ad_backend)
    _, k1 = curvature_operator("fisher", model, loss, params, batch, k0)
    assert_close(k1, back(ad_backend, random.split(k0))[0], rtol=0.0, backend=ad_backend)
    with pytest.raises(HyperparameterError, match="random key"):
        curvature_operator("fisher", model, loss, params, batch)
    with pytest.raises(HyperparameterError, match="curvature must be one of"):
        curvature_operator("gnn", model, loss, params, batch)


# ------------------------------------------------------------------ CurveBall
@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_curveball_2x2_minimises_the_quadratic_model(ad_backend, rng, curvature):
    model, loss, params, batch, oracle = problem(ad_backend, rng)
    w = oracle["flat"]
    c = dense_ggn(oracle) if curvature == "ggn" else autograd.hessian(oracle["objective"])(w)
    g = autograd.grad(oracle["objective"])(w)
    z_np = 0.1 * rng.standard_normal(len(w))
    z = to(ad_backend, oracle["unravel"](z_np))
    q = curveball_quantities(model, loss, params, z, LAM, batch, curvature=curvature)
    damped = c + LAM * np.eye(len(w))
    delta = damped @ z_np + g  # eq. 17
    assert_close(flat_np(ad_backend, q.delta), delta, rtol=1e-10)

    def model_change(rho, beta):  # m(s) - m(0) for s = rho z - beta Delta
        s = np.multiply.outer(rho, z_np) - np.multiply.outer(beta, delta)
        return s @ g + 0.5 * np.einsum("...i,ij,...j->...", s, damped, s)

    # the stationary point of the 2x2 model from the dense matrices, s = M (rho, beta)
    basis = np.stack([z_np, -delta], axis=1)
    center = np.linalg.solve(basis.T @ damped @ basis, -basis.T @ g)
    if curvature == "ggn":  # a convex model: brute force over successively finer grids
        found, width = np.zeros(2), 100.0
        for _ in range(16):
            grid = found[:, None] + width * np.linspace(-1, 1, 41)
            rr, bb = np.meshgrid(grid[0], grid[1], indexing="ij")
            k = np.unravel_index(np.argmin(model_change(rr, bb)), rr.shape)
            found, width = np.array([rr[k], bb[k]]), width / 8
        assert np.allclose(found, center, rtol=1e-6, atol=1e-9)
    out = curveball_direction(model, loss, params, z, LAM, batch, curvature=curvature)
    assert float(out.rho) == pytest.approx(center[0], rel=1e-9)
    assert float(out.beta) == pytest.approx(center[1], rel=1e-9)
    assert float(out.predicted) == pytest.approx(model_change(*center), rel=1e-9)
    assert_close(flat_np(ad_backend, out.z), center[0] * z_np - center[1] * delta, rtol=1e-9)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_curveball_2x2_on_host_is_the_select_both_form_to_the_bit(backend, dtype):
    """Where the coefficients are host scalars (NumPy, CPU torch) the 2x2 solve branches on
    them; its (rho, beta) must be the traced form's, every case of eq. 18 included."""
    from secondorder.optim import directions

    if backend.host_scalar(backend.asarray(1.0)) is None:
        pytest.skip("no host scalars on this backend: only the select-both form runs")
    cases = [(2.0, 0.5, 1.0, 0.3, -0.2), (1.0, 1.0, 1.0, 0.4, 0.1),  # regular; singular
             (0.0, 0.0, 0.0, 0.0, 0.0), (-1.0, 0.0, 0.0, 0.5, 0.0),  # z = 0; a <= 0
             (1e-30, 0.0, 0.0, 1e30, 0.0), (np.nan, 1.0, 1.0, 1.0, 1.0),  # d / a overflows
             (2.0, 0.5, 1.0, np.inf, 0.1), (3.0, 1.0, 2.0, 0.7, np.nan)]
    original = directions._curveball_2x2_on_host
    for case in cases:
        args = [backend.asarray(v, dtype=dtype) for v in case]
        host = directions.curveball_2x2(*args)
        directions._curveball_2x2_on_host = lambda *a: None
        try:
            traced = directions.curveball_2x2(*args)
        finally:
            directions._curveball_2x2_on_host = original
        for h, t in zip(host, traced):
            assert back(backend, h).tobytes() == back(backend, t).tobytes(), case


def test_curveball_direction_with_fixed_rho_and_beta():
    from secondorder import backends

    nb = backends.get("numpy")
    rng = np.random.default_rng(1)
    model, loss, params, batch, oracle = problem(nb, rng)
    z_np = rng.standard_normal(len(oracle["flat"]))
    z = oracle["unravel"](z_np)
    rho, beta = nb.asarray(np.float64(0.9)), nb.asarray(np.float64(0.05))
    out = curveball_direction(model, loss, params, z, LAM, batch, rho=rho, beta=beta)
    w = oracle["flat"]
    delta = (dense_ggn(oracle) + LAM * np.eye(len(w))) @ z_np + autograd.grad(
        oracle["objective"])(w)
    assert_close(tree.ravel(out.z)[0], 0.9 * z_np - 0.05 * delta, rtol=1e-12)
    assert np.isnan(float(out.predicted))
    with pytest.raises(HyperparameterError, match="both rho and beta"):
        curveball_direction(model, loss, params, z, LAM, batch, rho=rho)


# ------------------------------------------------------------------ block preconditioner
def test_block_preconditioned_direction_is_the_dense_kfac_inverse(backend, rng):
    from secondorder.optim.directions import block_preconditioned_direction

    d_out, d_w = 3, 4
    g_f, a_f = spd(rng, d_out, cond=20.0), 2.5 * spd(rng, d_w + 1, cond=50.0)
    block = DenseBlock((d_out, d_w))
    grad_np = {"b": rng.standard_normal(d_out), "c": rng.standard_normal(2),
               "w": rng.standard_normal((d_out, d_w))}
    grad = to(backend, grad_np)
    groups = [[0, 2]]  # leaves in canonical order: b, c, w; the layer is (b, w)
    base = block.with_factors(block.init(to(backend, a_f)), to(backend, (g_f, a_f)))
    # the dense reference in the coordinates vec([W b]) (row-major), permuted to (b, W)
    rows = [r * (d_w + 1) + d_w for r in range(d_out)]
    rows += [r * (d_w + 1) + col for r in range(d_out) for col in range(d_w)]
    perm = np.eye(d_out * (d_w + 1))[rows]
    g_bw = np.concatenate([grad_np["b"], grad_np["w"].ravel()])

    # K-FAC's pi-split damped inverse (Algorithm 12)
    pi = np.sqrt((np.trace(a_f) / a_f.shape[0]) / (np.trace(g_f) / g_f.shape[0]))
    inv = np.kron(np.linalg.inv(g_f + np.sqrt(LAM) / pi * np.eye(d_out)),
                  np.linalg.inv(a_f + pi * np.sqrt(LAM) * np.eye(d_w + 1)))
    state = block.update_cache(base, LAM, kind="inverse")
    d = back(backend, block_preconditioned_direction(grad, [block], [state], groups,
                                                     outside=1.0 / LAM))
    d_bw = np.concatenate([d["b"], d["w"].ravel()])
    assert_close(d_bw, -(perm @ inv @ perm.T) @ g_bw)
    assert_close(d["c"], -grad_np["c"] / LAM)

    # the exact damped inverse (A (x) G + lambda I)^{-1} through an eigh cache
    eig = block.update_cache(block.with_factors(block.init(to(backend, a_f), kind="eigh"),
                                                to(backend, (g_f, a_f))), kind="eigh")
    exact = np.linalg.inv(np.kron(g_f, a_f) + LAM * np.eye(d_out * (d_w + 1)))
    d = back(backend, block_preconditioned_direction(grad, [block], [eig], groups, power=-1.0,
                                                     damping=LAM, split="exact"))
    assert_close(np.concatenate([d["b"], d["w"].ravel()]), -(perm @ exact @ perm.T) @ g_bw)
    assert_close(d["c"], -grad_np["c"])  # outside=1: the plain gradient
    with pytest.raises(HyperparameterError, match="one state and one leaf group per block"):
        block_preconditioned_direction(grad, [block], [], groups)


def test_prox_linear_direction_is_re_exported():
    from secondorder.optim import prox_linear

    assert prox_linear_direction is prox_linear.prox_linear_direction


# ------------------------------------------------------------------ step rules
def test_reduction_ratio_and_damping_rules():
    from secondorder import backends

    xp = backends.get("numpy").xp

    def a(v):
        return np.asarray(v, dtype=np.float64)

    assert float(reduction_ratio(a(0.5), a(1.0), a(-1.0))) == 0.5
    inf = float("inf")
    for new, model in [(a(0.5), a(0.0)), (a(inf), a(-1.0)), (a(np.nan), a(-1.0))]:
        assert float(reduction_ratio(new, a(1.0), model)) == -inf
    # a vanishing model: +inf kept for Levenberg-Marquardt, failed for Hessian-free
    with np.errstate(over="ignore"):
        assert float(reduction_ratio(a(0.5), a(1.0), a(-1e-320))) == inf
        assert float(reduction_ratio(a(0.5), a(1.0), a(-1e-320), nonfinite_fails=True)) == -inf
    lam = xp.asarray(2.0)
    rhos = [-inf, 0.1, 0.5, 0.9, np.nan]
    assert [float(more_damping(a(r), lam, 1.5, 0.5)) for r in rhos] == [3.0, 3.0, 2.0, 1.0,
                                                                         2.0]
    assert float(more_damping(a(0.9), lam, 1.5, 0.5, min_damping=1.5, max_damping=5.0)) == 1.5
    floor = xp.asarray(0.0)
    gammas = [-inf, 0.2, 1.0, 2.0, inf, np.nan]
    got = [float(curveball_damping(a(gm), lam, 0.5, 0.5, 1.5, floor)) for gm in gammas]
    assert got == [4.0, 4.0, 2.0, 1.0, 1.0, 4.0]
    step = fixed_step(xp.asarray(1.0), 0.25)
    assert float(step.step) == 0.25 and int(step.evaluations) == 0 and bool(step.accepted)


def test_best_cg_iterate_takes_the_lowest_objective_ties_to_the_later():
    params = np.zeros(2)
    candidates = [np.array([2.0, 5.0]), np.array([1.0, 0.0]), np.array([2.0, 7.0]),
                  np.array([0.0, np.nan])]

    def objective(p):  # f(w + 0.5 d): 0, 0.25, 0 (a tie with the first), NaN (counts as inf)
        return (p[0] - 1.0) ** 2 + 0.0 * p[1]

    value, best = best_cg_iterate(objective, params, candidates, 0.5)
    assert float(value) == 0.0
    assert_close(best, candidates[2], rtol=0.0)


# ------------------------------------------------------------------ transforms on the methods
@pytest.mark.parametrize("max_norm", [1e-3, 1e3])
def test_newton_with_clipping_takes_the_clipped_newton_step(ad_backend, rng, max_norm):
    model, loss, params, batch, oracle = problem(ad_backend, rng)
    w = oracle["flat"]
    hess = autograd.hessian(oracle["objective"])(w)
    newton = -np.linalg.solve(hess + LAM * np.eye(len(w)), autograd.grad(oracle["objective"])(w))
    opt = Newton(model, loss, damping=LAM, transform=clip_by_global_norm(max_norm))
    new, state, info = opt.step(params, opt.init(params), batch)
    step = flat_np(ad_backend, new) - w
    length = min(max_norm, np.linalg.norm(newton))
    assert np.linalg.norm(step) == pytest.approx(length, rel=1e-10)
    assert float(info.step_norm) == pytest.approx(length, rel=1e-10)
    assert_close(step, newton * (length / np.linalg.norm(newton)), rtol=1e-9)
    assert len(state.transform) == 0  # clipping keeps an empty state


@pytest.mark.parametrize("method", ["newton", "lm", "hessian-free", "curveball"])
def test_identity_transform_reproduces_the_method(rng, method):
    from secondorder import backends

    nb = backends.get("numpy")
    model, loss, params, batch, _ = problem(nb, rng)
    make = {"newton": lambda **k: Newton(model, loss, damping=LAM, line_search="cubic", **k),
            "lm": lambda **k: LevenbergMarquardt(model, loss, **k),
            "hessian-free": lambda **k: HessianFree(model, loss, cg_iters=5, **k),
            "curveball": lambda **k: CurveBall(model, loss, damping=1.0, lambda_interval=1,
                                               **k)}[method]
    plain, shaped = make(), make(transform=scale(1.0))
    p1 = p2 = params
    s1, s2 = plain.init(params), shaped.init(params)
    assert s1.transform == () and s2.transform == ()  # scale keeps an empty state
    for _ in range(4):
        p1, s1, i1 = plain.step(p1, s1, batch)
        p2, s2, i2 = shaped.step(p2, s2, batch)
        assert_close(p2, p1, rtol=1e-12)
        assert float(i2.damping) == pytest.approx(float(i1.damping), rel=1e-12, nan_ok=True)


@pytest.mark.parametrize("cls", [Newton, LevenbergMarquardt, HessianFree, CurveBall])
def test_a_transform_without_init_and_update_is_refused(cls):
    with pytest.raises(HyperparameterError, match="init\\(params\\) and update"):
        cls(MLP([2, 1]), losses.MSE(), transform=lambda u: u)


@pytest.mark.parametrize("cls", [Newton, LevenbergMarquardt, HessianFree, CurveBall])
def test_a_transformed_step_compiles_under_jax_jit(rng, cls):
    jax = pytest.importorskip("jax")
    from secondorder import backends

    jb = backends.get("jax")
    model, loss, params, batch, _ = problem(jb, rng)
    opt = cls(model, loss, transform=clip_by_global_norm(0.05))
    eager = jitted = (params, opt.init(params))
    step = jax.jit(opt.step)
    for _ in range(3):
        *eager, info_e = opt.step(*eager, batch)
        *jitted, info_j = step(*jitted, batch)
        assert_close(back(jb, jitted[0]), back(jb, eager[0]), rtol=1e-10)
        assert float(info_j.step_norm) <= 0.05 * (1 + 1e-12)
