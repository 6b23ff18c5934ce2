"""GroupedNewton (issue 6): summaries against dense derivatives, the step's identities, the cubic
solve, reparameterisation invariance of the practical optimiser and ``jax.jit`` of its step."""

from __future__ import annotations

import autograd
import numpy as np
import pytest

from helpers import assert_close, back, spd, to
from secondorder import backends, losses, tree
from secondorder.backends.bridge import alike
from secondorder.errors import NotPositiveDefiniteError
from secondorder.models import MLP
from secondorder.optim import GroupedNewton
from secondorder.optim import partitions as P  # noqa: N812
from secondorder.optim.grouped_newton import check_step, cubic_step, plain_step, summaries

SIZES = (2, 3, 2)
MODEL = MLP(SIZES, "tanh")
LOSS = losses.SoftmaxCrossEntropy()


def _data(seed: int, n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, SIZES[0])), rng.integers(0, SIZES[-1], n)


def _batch(backend, seed: int, n: int = 6):
    x, y = _data(seed, n)
    return backend.asarray(x), backend.asarray(y)


def _objective(params, batch):
    x, y = batch
    return LOSS.value(MODEL(params, x), y)


def _f(*batches):
    """The summed mean loss of ``batches`` as a function of the parameters (the batches in the
    framework of the argument: torch's inside a derivative on CuPy, see bridge.alike)."""
    return lambda p: sum(_objective(p, alike(b, p)) for b in batches)


@pytest.fixture(scope="module")
def oracle():
    """Dense derivatives of the mean loss on the flat parameter vector (autograd, NumPy)."""
    params = MODEL.init(0, "numpy")
    rng = np.random.default_rng(1)
    params = tree.map(lambda a: a + 0.3 * rng.standard_normal(a.shape), params)
    u = tree.map(lambda a: rng.standard_normal(a.shape), params)
    flat, unravel = tree.ravel(params)
    x, y = _data(0)

    def f(v):
        return LOSS.value(MODEL(unravel(v), x), y)

    return {"params": params, "u": u, "flat": flat, "unravel": unravel,
            "g": autograd.grad(f)(flat), "H": autograd.hessian(f)(flat),
            "T": autograd.jacobian(autograd.hessian(f))(flat)}


def _vmatrix(partition: P.Partition, u) -> np.ndarray:
    """Dense V = Diag(u) I_{P:S} (P x S) from the partition, in NumPy."""
    cols = []
    for s in range(partition.size):
        leaves = []
        for a, leaf in zip(partition.assignment, tree.leaves(u)):
            mask = (np.full(leaf.shape, a) if isinstance(a, int) else a) == s
            leaves.append((np.asarray(leaf) * mask).reshape(-1))
        cols.append(np.concatenate(leaves))
    return np.stack(cols, axis=1)


def _summaries(backend, oracle, name, third=True, route="auto"):
    params, u = to(backend, oracle["params"]), to(backend, oracle["u"])
    part = P.make_partition(name, params, MODEL)
    batch = _batch(backend, 0)
    g, h, d3 = summaries(_f(batch), params, u, part, third=third,
                         route=route)
    return part, back(backend, g), back(backend, h), None if d3 is None else back(backend, d3)


@pytest.mark.parametrize("route", ["phi", "theta"])
@pytest.mark.parametrize("name", ["canonical", "blocks-2", "alternate-3", "trivial", "discrete"])
def test_summaries_match_dense_derivatives(ad_backend, oracle, name, route):
    part, g, h, d3 = _summaries(ad_backend, oracle, name, route=route)
    v = _vmatrix(part, oracle["u"])
    assert_close(g, v.T @ oracle["g"], rtol=1e-11)
    assert_close(h, v.T @ oracle["H"] @ v, rtol=1e-11)
    d3_dense = np.einsum("ijk,is,js,ks->s", oracle["T"], v, v, v)
    assert_close(d3, d3_dense, rtol=1e-10)
    _, _, h2, none = _summaries(ad_backend, oracle, name, third=False, route=route)
    assert none is None
    assert_close(h2, h, rtol=1e-12)


def test_contraction_identities_and_symmetry(ad_backend, oracle):
    flat_u = tree.ravel(oracle["u"])[0]
    _, g, h, _ = _summaries(ad_backend, oracle, "canonical")
    assert np.isclose(g.sum(), oracle["g"] @ flat_u, rtol=1e-12, atol=0)
    assert np.isclose(h.sum(), flat_u @ oracle["H"] @ flat_u, rtol=1e-11, atol=0)
    assert np.allclose(h, h.T, rtol=1e-12, atol=1e-14)
    # the full third-order tensor of phi is symmetric, and its diagonal is what we return
    v = _vmatrix(P.canonical(oracle["params"]), oracle["u"])
    t3 = np.einsum("ijk,ia,jb,kc->abc", oracle["T"], v, v, v)
    assert np.allclose(t3, np.transpose(t3, (1, 0, 2))) and np.allclose(t3, t3.transpose(2, 1, 0))


def test_trivial_partition_is_cauchy_step(ad_backend, oracle):
    params = to(ad_backend, oracle["params"])
    g_flat, h = oracle["g"], oracle["H"]
    u = tree.unravel(ad_backend.asarray(g_flat), params)
    batch = _batch(ad_backend, 0)
    part = P.trivial(params)
    gb, hb, _ = summaries(_f(batch), params, u, part, third=False)
    eta, ok = plain_step(gb, hb)
    assert bool(ok)
    new = tree.sub(params, part.expand(eta, u))
    expected = oracle["flat"] - g_flat * (g_flat @ g_flat) / (g_flat @ h @ g_flat)
    assert_close(tree.ravel(back(ad_backend, new))[0], expected, rtol=1e-12)


def _convex_problem(backend):
    """A linear model with MSE (H PD): leaves w (2, 3) and b (2,)."""
    rng = np.random.default_rng(7)
    model = MLP((3, 2), "tanh")
    x, y = rng.standard_normal((8, 3)), rng.standard_normal((8, 2))
    params = to(backend, model.init(3, "numpy"))
    batch = (backend.asarray(x), backend.asarray(y))
    mse = losses.MSE()

    def f(p):
        x, y = alike(batch, p)
        return mse.value(model(p, x), y)

    return params, f


def test_discrete_partition_is_newton_step(ad_backend):
    params, f = _convex_problem(ad_backend)
    flat, unravel = tree.ravel(back(ad_backend, params))
    g = ad_backend.grad(f, params)
    part = P.discrete(params)
    gb, hb, _ = summaries(f, params, g, part, third=False)
    eta, ok = plain_step(gb, hb, require_pd=True)
    assert bool(ok)
    new = tree.ravel(back(ad_backend, tree.sub(params, part.expand(eta, g))))[0]
    # dense Newton: H from P Hessian-vector products
    n = flat.size
    cols = [tree.ravel(back(ad_backend, ad_backend.hvp(
        f, params, tree.unravel(ad_backend.asarray(np.eye(n)[i]), params))))[0]
        for i in range(n)]
    h = np.stack(cols, axis=1)
    g_flat = tree.ravel(back(ad_backend, g))[0]
    assert_close(new, flat - np.linalg.solve(h, g_flat), rtol=1e-11)


def test_subspace_optimality(ad_backend, oracle):
    part, g, h, _ = _summaries(ad_backend, oracle, "canonical")
    eta, ok = plain_step(ad_backend.asarray(g), ad_backend.asarray(h))
    assert bool(ok)
    v = _vmatrix(part, oracle["u"])
    resid = v.T @ (oracle["g"] - oracle["H"] @ v @ back(ad_backend, eta))
    assert np.linalg.norm(resid) <= 1e-12 * np.linalg.norm(v.T @ oracle["g"])


def _quadratic(backend, h_np, b_np, like):
    h_b = backend.asarray(h_np), backend.asarray(b_np)

    def f(p):
        v = tree.ravel(p)[0]
        xp, (h, b) = backends.namespace(v), alike(h_b, v)
        return 0.5 * xp.sum(v * xp.matmul(h, v)) - xp.sum(b * v)

    return f


def test_exact_decrease_on_quadratic(ad_backend, rng):
    like = {"a": np.zeros((2, 3)), "b": np.zeros(4), "c": np.zeros(3)}
    n = 13
    h_np, b_np = spd(rng, n, 30.0), rng.standard_normal(n)
    params = to(ad_backend, tree.unravel(rng.standard_normal(n), like))
    f = _quadratic(ad_backend, h_np, b_np, params)
    for name in ("canonical", "trivial", "blocks-2"):
        part = P.make_partition(name, params)
        u = ad_backend.grad(f, params)
        gb, hb, d3 = summaries(f, params, u, part)
        assert np.allclose(back(ad_backend, d3), 0.0, atol=1e-12)
        eta, ok = plain_step(gb, hb, require_pd=True)
        new = tree.sub(params, part.expand(eta, u))
        gbn, hbn = back(ad_backend, gb), back(ad_backend, hb)
        expected = float(f(params)) - 0.5 * gbn @ np.linalg.solve(hbn, gbn)
        assert np.isclose(float(f(new)), expected, rtol=1e-12, atol=1e-12)
        if name != "canonical":
            continue
        # all D3 = 0: the cubic step falls back to the plain step
        eta_c, ok_c, _, res = cubic_step(gb, hb, d3, 10.0)
        assert bool(ok_c)
        assert_close(back(ad_backend, eta_c), back(ad_backend, eta), rtol=1e-12)


def test_theorem_1_bound_and_tightness(ad_backend, rng):
    like = {"a": np.zeros(4), "b": np.zeros(3), "c": np.zeros(5)}
    blocks = [spd(rng, 3, 7.0), spd(rng, 4, 3.0), spd(rng, 5, 20.0)]  # leaf order a, b, c
    sizes = [4, 3, 5]
    blocks = [spd(rng, s, c) for s, c in zip(sizes, (7.0, 3.0, 20.0))]
    h_np = np.zeros((12, 12))
    start = 0
    for blk in blocks:
        k = blk.shape[0]
        h_np[start:start + k, start:start + k] = blk
        start += k
    bound = max(((w[-1] - w[0]) / (w[-1] + w[0])) ** 2
                for w in (np.linalg.eigvalsh(b) for b in blocks))
    for _ in range(5):
        params = to(ad_backend, tree.unravel(rng.standard_normal(12), like))
        f = _quadratic(ad_backend, h_np, np.zeros(12), params)
        part = P.canonical(params)
        u = ad_backend.grad(f, params)
        gb, hb, _ = summaries(f, params, u, part, third=False)
        eta, _ = plain_step(gb, hb)
        ratio = float(f(tree.sub(params, part.expand(eta, u)))) / float(f(params))
        assert ratio <= bound * (1 + 1e-12)
    # corrected arithmetic: ((A - a)/(A + a))^2 = 1 - 4 A a / (A + a)^2, attained at
    # theta = (1/a, 1/A) in the eigenbasis (one group)
    a, big = 0.5, 8.0
    assert np.isclose(((big - a) / (big + a)) ** 2, 1 - 4 * big * a / (big + a) ** 2)
    params = to(ad_backend, {"a": np.array([1 / a, 1 / big])})
    f = _quadratic(ad_backend, np.diag([a, big]), np.zeros(2), params)
    u = ad_backend.grad(f, params)
    part = P.trivial(params)
    gb, hb, _ = summaries(f, params, u, part, third=False)
    eta, _ = plain_step(gb, hb)
    ratio = float(f(tree.sub(params, part.expand(eta, u)))) / float(f(params))
    assert np.isclose(ratio, ((big - a) / (big + a)) ** 2, rtol=1e-12)


def _t_value(eta, g, h, d, lam):
    return -eta @ g + 0.5 * eta @ h @ eta + lam / 6 * np.linalg.norm(d * eta) ** 3


@pytest.mark.parametrize("pd", [True, False])
def test_cubic_step_stationarity_and_argmin(ad_backend, rng, pd):
    s = 5
    for _ in range(4):
        a = rng.standard_normal((s, s))
        h = spd(rng, s, 50.0) if pd else 0.5 * (a + a.T)
        g, d3 = rng.standard_normal(s), rng.standard_normal(s) * 3
        lam = 3.0
        eta, ok, iters, res = cubic_step(ad_backend.asarray(g), ad_backend.asarray(h),
                                         ad_backend.asarray(d3), lam)
        assert bool(ok) and int(iters) > 0
        assert float(res) < 1e-10
        eta = back(ad_backend, eta)
        d = np.abs(d3) ** (1 / 3)
        r = np.linalg.norm(d * eta)
        grad_t = -g + h @ eta + lam / 2 * r * d**2 * eta
        assert np.linalg.norm(grad_t) < 1e-10 * np.linalg.norm(g)
        # global minimiser: H + lam/2 r D^2 PSD, and no random point does better
        assert np.linalg.eigvalsh(h + lam / 2 * r * np.diag(d**2))[0] > -1e-10
        t0 = _t_value(eta, g, h, d, lam)
        for scale in (1e-3, 1e-1, 1.0, 10.0):
            pts = eta + scale * rng.standard_normal((200, s))
            assert all(_t_value(p, g, h, d, lam) >= t0 - 1e-12 for p in pts)


def test_cubic_step_tends_to_plain_step(ad_backend, rng):
    s = 4
    h, g, d3 = spd(rng, s, 10.0), rng.standard_normal(s), rng.standard_normal(s)
    args = [ad_backend.asarray(a) for a in (g, h, d3)]
    plain = back(ad_backend, plain_step(*args[:2])[0])
    for lam, tol in ((1e-4, 1e-3), (1e-8, 1e-7)):
        eta = back(ad_backend, cubic_step(*args, lam)[0])
        assert_close(eta, plain, rtol=tol)


def test_guards(ad_backend, rng):
    g = ad_backend.asarray(rng.standard_normal(3))
    indefinite = ad_backend.asarray(np.diag([1.0, -2.0, 3.0]))
    singular = ad_backend.asarray(np.diag([1.0, 0.0, 3.0]))
    eta, ok = plain_step(g, indefinite, require_pd=True)
    assert not bool(ok) and not np.isfinite(back(ad_backend, eta)).any()
    with pytest.raises(NotPositiveDefiniteError):
        check_step(eta, ok)
    assert bool(plain_step(g, indefinite)[1])  # invertible: plain Newton is defined
    assert not bool(plain_step(g, singular)[1])
    # d_s -> 0 for one group: floored, step still finite and near-stationary
    d3 = ad_backend.asarray(np.array([1.0, 0.0, 2.0]))
    eta, ok, _, res = cubic_step(g, ad_backend.asarray(spd(rng, 3, 5.0)), d3, 10.0)
    assert bool(ok) and np.isfinite(back(ad_backend, eta)).all()
    # the optimiser skips a step whose summaries fail (lambda_int = 0 with a non-finite batch)
    params = MODEL.init(0, ad_backend)
    x, y = _batch(ad_backend, 1)
    bad = ad_backend.asarray(np.full(tuple(x.shape), np.nan))
    opt = GroupedNewton(MODEL, LOSS, lambda_int=0.0)
    state = opt.init(params)
    new, state2, info = opt.step(params, state, ((x, y), (bad, y)))
    assert not bool(info.finite)
    assert_close(back(ad_backend, new), back(ad_backend, params), rtol=0)
    assert int(state2["count"]) == 0


def test_summaries_of_sum_are_sum_of_summaries(ad_backend, oracle):
    params, u = to(ad_backend, oracle["params"]), to(ad_backend, oracle["u"])
    part = P.canonical(params)
    b1, b2 = _batch(ad_backend, 11), _batch(ad_backend, 12)
    s1 = summaries(_f(b1), params, u, part)
    s2 = summaries(_f(b2), params, u, part)
    s12 = summaries(_f(b1, b2), params, u, part)
    for a, b, c in zip(s1, s2, s12):
        assert_close(back(ad_backend, c), back(ad_backend, a) + back(ad_backend, b), rtol=1e-12)


def test_partitions_sizes():
    params = MODEL.init(0, "numpy")  # leaves: b0, w0, b1, w1
    sizes = {"canonical": 4, "trivial": 1, "weights_biases": 2, "layers": 2, "blocks-2": 2,
             "alternate-2": 2, "blocks-3": 3, "discrete": 3 + 6 + 2 + 6}
    for name, size in sizes.items():
        assert P.make_partition(name, params, MODEL).size == size, name
    assert P.layers(params).assignment == P.layers(params, MODEL).assignment == (0, 0, 1, 1)
    assert P.alternate(params, 2).assignment == (0, 1, 0, 1)
    assert P.make_partition([[0, 3], [1, 2]], params).assignment == (0, 1, 1, 0)
    with pytest.raises(ValueError):
        P.make_partition([[0, 1]], params)
    with pytest.raises(ValueError):
        P.make_partition("nonsense", params)


def _stepper(opt, backend):
    """``opt.step``, compiled on JAX (eager JAX dispatches every op of the nested passes)."""
    if backend.name == "jax":
        import jax

        return jax.jit(opt.step)
    return opt.step


def _reparam(backend, params_np, seed):
    """Per-leaf scalars a_s and arrays b_s (canonical partition: one group per leaf)."""
    rng = np.random.default_rng(seed)
    scales = [float(rng.uniform(0.5, 2.0)) * (-1) ** i for i in range(len(tree.leaves(
        params_np)))]
    a = tree.unflatten(tree.structure(params_np), scales)
    b = tree.map(lambda x: 0.3 * rng.standard_normal(x.shape), params_np)
    return a, to(backend, b)


def test_invariance_under_blockwise_affine_reparameterisation(ad_backend):
    params_np = MODEL.init(5, "numpy")
    a, b = _reparam(ad_backend, params_np, 9)

    def forward(p_tilde):  # theta = a theta~ + b
        return tree.map(lambda pt, ai, bi: ai * pt + bi, p_tilde, a, alike(b, p_tilde))

    def apply_tilde(p_tilde, x):
        return MODEL(forward(p_tilde), x)

    params = to(ad_backend, params_np)
    params_t = tree.map(lambda p, ai, bi: (p - bi) / ai, params, a, b)
    opt = GroupedNewton(MODEL, LOSS, lr_factor=0.3, lambda_int=3.0, tau=3)
    opt_t = GroupedNewton(apply_tilde, LOSS, lr_factor=0.3, lambda_int=3.0, tau=3)
    state, state_t = opt.init(params), opt_t.init(params_t)
    step, step_t = _stepper(opt, ad_backend), _stepper(opt_t, ad_backend)
    moved = 0.0
    for t in range(10):
        batches = (_batch(ad_backend, 100 + t, 5), _batch(ad_backend, 200 + t, 12))
        new, state, info = step(params, state, batches)
        params_t, state_t, info_t = step_t(params_t, state_t, batches)
        assert bool(info.finite) and bool(info_t.finite)
        moved += float(info.step_norm)
        params = new
        assert_close(back(ad_backend, forward(params_t)), back(ad_backend, params), rtol=1e-10)
    assert moved > 1e-2  # the trajectory actually moves
    # eta~ maps as eta / a_s^2
    eta, eta_t = back(ad_backend, state["eta"]), back(ad_backend, state_t["eta"])
    scales = np.array(tree.leaves(a))
    assert_close(eta_t, eta / scales**2, rtol=1e-9)


def test_optimiser_decreases_loss_and_plateau(ad_backend):
    params = MODEL.init(2, ad_backend)
    batch = _batch(ad_backend, 3, 20)
    opt = GroupedNewton(MODEL, LOSS, lr_factor=0.3, lambda_int=3.0, tau=1, partition="layers",
                        model=MODEL)
    state = opt.init(params)
    first = float(_objective(params, batch))
    step = _stepper(opt, ad_backend)
    for _ in range(15):
        params, state, info = step(params, state, batch)
    assert float(_objective(params, batch)) < first
    state = opt.plateau(state, ad_backend.asarray(1.0))
    for _ in range(6):
        state = opt.plateau(state, ad_backend.asarray(1.0))
    assert float(state["lr_scale"]) == 0.5


def test_jax_jit_step_compiles():
    jax = pytest.importorskip("jax")
    b, ref = backends.get("jax"), backends.get("numpy")
    for lam in (3.0, 0.0):
        opt = GroupedNewton(MODEL, LOSS, lr_factor=0.1, lambda_int=lam, tau=2)
        p_jit = MODEL.init(0, b)
        p_ref = MODEL.init(0, ref)
        s_jit, s_ref = opt.init(p_jit), opt.init(p_ref)
        step = jax.jit(opt.step)
        for t in range(4):
            p_jit, s_jit, info = step(p_jit, s_jit, (_batch(b, t), _batch(b, 10 + t, 12)))
            p_ref, s_ref, _ = opt.step(p_ref, s_ref, (_batch(ref, t), _batch(ref, 10 + t, 12)))
            assert bool(info.finite) == bool(_.finite)
        assert_close(back(b, p_jit), back(ref, p_ref), rtol=1e-10)
