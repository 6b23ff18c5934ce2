"""secondorder.random: the counter-based generator against Random123's known answers and JAX's
own Threefry, the same bits on every backend, statistics of the draws, traced draws under
jax.jit / vmap, and the key route of loss sampling, the Monte-Carlo Fisher and Hessian-free."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from helpers import assert_close, back, raveled, softmax, to
from secondorder import backends, random, tree
from secondorder.curvature import Fisher, kronecker_factors
from secondorder.errors import DTypeError, RandomKeyError, SecondOrderError, ShapeError
from secondorder.losses import MSE, SigmoidBCE, SoftmaxCrossEntropy
from secondorder.models import MLP
from secondorder.optim import HessianFree

MASK = 0xFFFFFFFF
#: significance level of every statistical test here (the draws are fixed by their keys, so a
#: test either always passes or always fails; the threshold says how surprising a failure is)
P_MIN = 1e-4


def u32(backend, x) -> np.ndarray:
    """int32 words of a backend as their uint32 values (NumPy int64)."""
    return np.asarray(backend.to_numpy(x)).astype(np.int64) & MASK


def words(backend, *values: int):
    xp = backend.xp
    return xp.asarray([v - 2**32 if v >= 2**31 else v for v in values], dtype=xp.int32)


def batch_on(backend, x, y):
    """(x, y) on ``backend``: x in float64, y keeping its dtype (integer class labels)."""
    return to(backend, x), backend.asarray(y) if y.dtype.kind in "iu" else to(backend, y)


def jax_or_skip():
    return pytest.importorskip("jax")


# ------------------------------------------------------------------------------ the hash

#: Random123 known-answer vectors for threefry2x32_20 (kat_vectors: counter, key -> output)
KAT = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x243F6A88, 0x85A308D3), (0x13198A2E, 0x03707344), (0xC4923A9C, 0x483DF7A0)),
]


@pytest.mark.parametrize(("counter", "key", "expected"), KAT)
def test_threefry_known_answers(backend, counter, key, expected):
    k = words(backend, *key)
    c = words(backend, *counter)
    y0, y1 = random.threefry2x32(k, c[0:1], c[1:2])
    assert (int(u32(backend, y0)[0]), int(u32(backend, y1)[0])) == expected


def test_threefry_matches_jax_threefry_on_random_words(backend):
    jax_or_skip()
    import jax.numpy as jnp
    from jax.extend.random import threefry_2x32

    rng = np.random.default_rng(5)
    for _ in range(5):
        key = rng.integers(0, 2**32, size=2, dtype=np.uint64)
        counts = rng.integers(0, 2**32, size=(2, 257), dtype=np.uint64)
        expected = np.asarray(threefry_2x32(jnp.asarray(key, jnp.uint32),
                                            jnp.asarray(counts.reshape(-1), jnp.uint32)))
        k = words(backend, *map(int, key))
        xp = backend.xp
        c = [xp.asarray((counts[i].astype(np.int64) ^ 2**31) - 2**31, dtype=xp.int32)
             for i in (0, 1)]
        y0, y1 = random.threefry2x32(k, c[0], c[1])
        # jax's threefry_2x32 takes the counter words as the two halves of its input array
        got = np.concatenate([u32(backend, y0), u32(backend, y1)])
        np.testing.assert_array_equal(got, expected.astype(np.int64))


def test_key_split_fold_in_bits_uniform_equal_jax_random(backend):
    jax = jax_or_skip()
    import jax.numpy as jnp

    with jax.threefry_partitionable(True):
        for seed in (0, 42, 2**40 + 7, -3):
            jk = jax.random.key(seed)
            k = random.key(seed, backend)
            np.testing.assert_array_equal(u32(backend, k), np.asarray(jax.random.key_data(jk)))
            np.testing.assert_array_equal(
                u32(backend, random.split(k, 5)),
                np.asarray(jax.random.key_data(jax.random.split(jk, 5))))
            np.testing.assert_array_equal(
                u32(backend, random.fold_in(k, 123456789)),
                np.asarray(jax.random.key_data(jax.random.fold_in(jk, 123456789))))
            np.testing.assert_array_equal(
                u32(backend, random.bits(k, (3, 7))),
                np.asarray(jax.random.bits(jk, (3, 7), jnp.uint32)).astype(np.int64))
            for dtype in ("float32", "float64"):
                got = backend.to_numpy(random.uniform(k, (4, 9), dtype))
                want = np.asarray(jax.random.uniform(jk, (4, 9), getattr(jnp, dtype)))
                assert got.dtype == want.dtype
                np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------ across backends


def _draws(backend, seed=7):
    xp = backend.xp
    k = random.key(seed, backend)
    keys = random.split(k, 6)
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(5), size=40)
    p = rng.random((8, 5))
    return {
        "bits": u32(backend, random.bits(keys[0, :], (10, 11))),
        "uniform64": backend.to_numpy(random.uniform(keys[1, :], (300,), "float64")),
        "uniform32": backend.to_numpy(random.uniform(keys[1, :], (300,), "float32")),
        "normal64": backend.to_numpy(random.normal(keys[2, :], (20, 15), "float64")),
        "normal32": backend.to_numpy(random.normal(keys[2, :], (20, 15), "float32")),
        "categorical": backend.to_numpy(
            random.categorical(keys[3, :], xp.asarray(probs, dtype=xp.float64))),
        "categorical_logits": backend.to_numpy(
            random.categorical(keys[3, :], logits=xp.asarray(np.log(probs), dtype=xp.float64))),
        "bernoulli": backend.to_numpy(
            random.bernoulli(keys[4, :], xp.asarray(p, dtype=xp.float64))),
        "fold_in": u32(backend, random.fold_in(keys[5, :], 2**32 - 1)),
    }


def test_every_backend_draws_the_same_numbers(backend):
    ours, ref = _draws(backend), _draws(backends.get("numpy"))
    for name in ("bits", "uniform64", "uniform32", "categorical", "categorical_logits",
                 "bernoulli", "fold_in"):
        assert ours[name].dtype == ref[name].dtype, name
        np.testing.assert_array_equal(ours[name], ref[name], err_msg=name)
    # normals go through each framework's log, sqrt and cos: a few ulp
    for name, eps in (("normal64", np.finfo(np.float64).eps),
                      ("normal32", np.finfo(np.float32).eps)):
        assert ours[name].dtype == ref[name].dtype
        err = np.abs(ours[name].astype(np.float64) - ref[name])
        assert np.all(err <= 4 * eps * np.maximum(1.0, np.abs(ref[name]))), name
    assert set(np.unique(ref["categorical"])) <= set(range(5))


def test_uniforms_lie_on_their_grid_in_the_unit_interval():
    b = backends.get("numpy")
    k = random.key(1, b)
    for dtype, bits in (("float32", 23), ("float64", 52)):
        u = np.asarray(random.uniform(k, (10_000,), dtype))
        assert u.dtype == np.dtype(dtype)
        assert u.min() >= 0.0 and u.max() < 1.0
        scaled = u.astype(np.float64) * 2.0**bits
        np.testing.assert_array_equal(scaled, np.floor(scaled))


# ------------------------------------------------------------------------------ statistics


def test_normal_mean_and_variance():
    n = 100_000
    z = np.asarray(random.normal(random.key(11, "numpy"), (n,)))
    assert abs(z.mean()) <= 5 / np.sqrt(n)
    assert abs(z.var(ddof=1) - 1.0) <= 5 * np.sqrt(2 / (n - 1))
    # the shape: Kolmogorov-Smirnov against the standard normal CDF
    assert stats.kstest(z, "norm").pvalue > P_MIN


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_uniform_bins_chi_square(dtype):
    n, bins = 100_000, 100
    u = np.asarray(random.uniform(random.key(12, "numpy"), (n,), dtype))
    counts = np.bincount(np.floor(u.astype(np.float64) * bins).astype(int), minlength=bins)
    assert stats.chisquare(counts).pvalue > P_MIN
    # pairs of consecutive draws fill the unit square evenly (a serial test)
    pairs = np.floor(u.astype(np.float64).reshape(-1, 2) * 10).astype(int)
    counts2 = np.bincount(pairs[:, 0] * 10 + pairs[:, 1], minlength=100)
    assert stats.chisquare(counts2).pvalue > P_MIN


def test_categorical_frequencies_chi_square():
    n = 100_000
    probs = np.array([0.05, 0.1, 0.15, 0.3, 0.4])
    b = backends.get("numpy")
    labels = np.asarray(random.categorical(random.key(13, b), np.tile(probs, (n, 1))))
    counts = np.bincount(labels, minlength=5)
    assert stats.chisquare(counts, n * probs).pvalue > P_MIN
    # logits give the same draws as their softmax probabilities
    same = np.asarray(random.categorical(random.key(13, b), logits=np.log(np.tile(probs, (n, 1)))))
    np.testing.assert_array_equal(same, labels)


def test_bernoulli_frequency():
    n = 100_000
    p = np.full(n, 0.3)
    x = np.asarray(random.bernoulli(random.key(14, "numpy"), p))
    assert abs(x.mean() - 0.3) <= 5 * np.sqrt(0.3 * 0.7 / n)


def test_split_keys_give_different_streams():
    b = backends.get("numpy")
    k = random.key(0, b)
    keys = np.asarray(random.split(k, 8))
    assert len({tuple(row) for row in keys} | {tuple(k)}) == 9
    streams = np.stack([np.asarray(random.uniform(keys[i], (10_000,))) for i in range(8)])
    corr = np.corrcoef(streams)
    assert np.all(np.abs(corr[np.triu_indices(8, 1)]) <= 5 / np.sqrt(10_000))
    # fold_in(key, i) and split(key, n)[i] are both threefry(key, (0, i))
    np.testing.assert_array_equal(np.asarray(random.fold_in(k, 3)), keys[3])
    assert not np.array_equal(np.asarray(random.fold_in(k, 0)), np.asarray(k))


# ------------------------------------------------------------------------------ transformations


def test_jit_draws_depend_on_the_key_and_match_eager():
    jax = jax_or_skip()
    b = backends.get("jax")
    draw = jax.jit(lambda k: (random.normal(k, (16,)), random.categorical(
        k, logits=jax.numpy.zeros((16, 4))), random.split(k, 3)))
    k1, k2 = random.key(1, b), random.key(2, b)
    a, b1 = draw(k1), draw(k2)
    assert not np.array_equal(np.asarray(a[0]), np.asarray(b1[0]))
    assert not np.array_equal(np.asarray(a[2]), np.asarray(b1[2]))
    eager = (random.normal(k1, (16,)), random.categorical(k1, logits=jax.numpy.zeros((16, 4))),
             random.split(k1, 3))
    np.testing.assert_allclose(np.asarray(a[0]), np.asarray(eager[0]), rtol=1e-15, atol=1e-15)
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(eager[1]))
    np.testing.assert_array_equal(np.asarray(a[2]), np.asarray(eager[2]))
    for seed in range(3, 6):
        k = random.key(seed, b)
        np.testing.assert_array_equal(np.asarray(jax.jit(random.uniform, static_argnums=1)(
            k, (4,))), np.asarray(random.uniform(k, (4,))))


def test_vmap_over_keys_matches_a_loop():
    jax = jax_or_skip()
    torch = pytest.importorskip("torch")
    for name, vmap in (("jax", jax.vmap), ("torch", torch.func.vmap)):
        b = backends.get(name)
        keys = random.split(random.key(9, b), 4)
        batched = b.to_numpy(vmap(lambda k: random.uniform(k, (5,)))(keys))
        looped = np.stack([b.to_numpy(random.uniform(keys[i, :], (5,))) for i in range(4)])
        np.testing.assert_array_equal(batched, looped)


def test_backend_random_property(backend):
    r = backend.random
    k = r.key(5)
    np.testing.assert_array_equal(backend.to_numpy(k), backend.to_numpy(random.key(5, backend)))
    np.testing.assert_array_equal(backend.to_numpy(r.uniform(k, (3,))),
                                  backend.to_numpy(random.uniform(k, (3,))))


def test_named_errors():
    b = backends.get("numpy")
    with pytest.raises(RandomKeyError, match="random.key"):
        random.uniform(np.zeros(2), (3,))  # float, not int32
    with pytest.raises(RandomKeyError, match="shape"):
        random.uniform(np.zeros(3, dtype=np.int32), (3,))
    with pytest.raises(RandomKeyError, match="Python integer"):
        random.key(1.5, b)
    with pytest.raises(ShapeError, match="non-negative"):
        random.uniform(random.key(0, b), (-1, 2))
    with pytest.raises(ShapeError, match="split the key"):
        random.uniform(random.key(0, b), (2**16, 2**15))
    with pytest.raises(DTypeError, match="float32 or float64"):
        random.normal(random.key(0, b), (2,), dtype="int32")
    with pytest.raises(RandomKeyError, match="exactly one"):
        random.categorical(random.key(0, b))
    f = np.zeros((3, 2))
    with pytest.raises(RandomKeyError, match="exactly one"):
        MSE().sample(f)
    with pytest.raises(RandomKeyError, match="exactly one"):
        MSE().sample(f, np.zeros((3, 2)), key=random.key(0, b))
    assert issubclass(RandomKeyError, SecondOrderError)


# ------------------------------------------------------------------------------ loss sampling


def test_loss_sample_with_key_is_the_generator_draw(backend):
    if not backend.has_autodiff:
        pytest.skip("losses run on differentiable backends")
    rng = np.random.default_rng(3)
    f_np = rng.standard_normal((50, 4))
    f = to(backend, f_np)
    k = random.key(21, backend)
    u_rows = backend.to_numpy(random.uniform(k, (50,)))
    u_all = backend.to_numpy(random.uniform(k, (50, 4)))
    # softmax: inverse CDF of the softmax at one uniform per row (NumPy oracle)
    labels = backend.to_numpy(SoftmaxCrossEntropy().sample(f, key=k))
    cdf = np.cumsum(softmax(f_np), axis=1)
    np.testing.assert_array_equal(labels, np.minimum((cdf < u_rows[:, None]).sum(axis=1), 3))
    np.testing.assert_array_equal(labels, backend.to_numpy(
        random.categorical(k, to(backend, softmax(f_np)))))
    # sigmoid: y = 1 where u < sigmoid(f)
    y = backend.to_numpy(SigmoidBCE().sample(f, key=k))
    np.testing.assert_array_equal(y, (u_all < 1 / (1 + np.exp(-f_np))).astype(np.float64))
    # squared error: f + standard normal noise
    assert_close(MSE().sample(f, key=k), f_np + backend.to_numpy(random.normal(k, (50, 4))),
                 rtol=1e-15, backend=backend)


# ------------------------------------------------------------------------------ Fisher


def linear_apply(params, x):
    return x @ params["w"].T + params["b"]


def _linear_softmax_problem(m=12, d=3, k=4, seed=0):
    rng = np.random.default_rng(seed)
    params = {"b": 0.5 * rng.standard_normal(k), "w": rng.standard_normal((k, d))}
    x = rng.standard_normal((m, d))
    y = rng.integers(0, k, m)
    # the model is linear in the parameters: column q of J_i is f_i at the unit vector e_q
    size = tree.ravel(params)[0].size
    jac = np.stack([linear_apply(tree.unravel(e, params), x) for e in np.eye(size)], axis=2)
    return params, x, y, jac


def test_mc_fisher_with_many_samples_matches_the_ggn():
    """F_S = (1/S) sum_s X_s with X_s = (1/m) sum_i g_is g_is^T, g_is = J_i^T (p_i - e_c),
    c ~ p_i; E X = GGN, and each entry's standard error is sqrt(Var X_ab / S), with
    Var X_ab = (1/m^2) sum_i Var_c(g_ica g_icb) computed exactly by enumerating classes."""
    params, x, y, jac = _linear_softmax_problem()
    m, k, n = jac.shape
    logits = linear_apply(params, x)
    p = softmax(logits)
    h = np.einsum("ik,kl->ikl", p, np.eye(k)) - np.einsum("ik,il->ikl", p, p)
    ggn = np.einsum("ikp,ikl,ilq->pq", jac, h, jac) / m
    g = np.einsum("ikp,ick->icp", jac, p[:, None, :] - np.eye(k)[None])  # (m, class, n)
    outer = np.einsum("icp,icq->icpq", g, g)
    mean = np.einsum("ic,icpq->ipq", p, outer)
    var = np.einsum("ic,icpq->pq", p, outer**2) - np.einsum("ipq->pq", mean**2)
    var /= m**2
    assert_close(np.einsum("ipq->pq", mean) / m, ggn, rtol=1e-13)  # E X = GGN
    samples = 2000
    b = backends.get("numpy")
    fisher = Fisher(linear_apply, SoftmaxCrossEntropy(), params, (x, y), samples=samples,
                    key=random.key(31, b)).to_dense()
    err = np.abs(fisher - ggn)
    se = np.sqrt(var / samples)
    assert np.all(err <= 5 * se + 1e-15)
    # and it is a Monte-Carlo estimate, not the GGN itself: E ||F_S - GGN||_F^2 = sum se^2
    ratio = np.sum(err**2) / np.sum(se**2)
    assert 0.05 < ratio < 5.0


def test_fisher_and_kfac_key_route_equals_the_noise_route(ad_backend):
    params, x, y, _ = _linear_softmax_problem()
    loss = SoftmaxCrossEntropy()
    k = random.key(8, ad_backend)
    p, batch = to(ad_backend, params), batch_on(ad_backend, x, y)
    f = linear_apply(p, batch[0])
    keys = random.split(k, 3)
    noise = [ad_backend.to_numpy(loss.key_noise(keys[s, :], f)) for s in range(3)]
    by_key = Fisher(linear_apply, loss, p, batch, samples=3, key=k).to_dense()
    by_noise = Fisher(linear_apply, loss, p, batch, noise=noise).to_dense()
    assert_close(by_key, back(ad_backend, by_noise), rtol=1e-15, backend=ad_backend)
    numpy_fisher = Fisher(linear_apply, loss, params, (x, y), samples=3,
                          key=random.key(8, "numpy")).to_dense()
    assert_close(by_key, numpy_fisher, rtol=1e-12, backend=ad_backend)
    with pytest.raises(RandomKeyError, match="not both"):
        Fisher(linear_apply, loss, p, batch, noise=noise, key=k)

    model = MLP([3, 5, 4])
    mp = model.init(0, ad_backend)
    from_key = kronecker_factors(model, loss, mp, batch, mode="mc", samples=3, key=k)
    out = model.apply(mp, batch[0])
    noise = [ad_backend.to_numpy(loss.key_noise(keys[s, :], out)) for s in range(3)]
    from_noise = kronecker_factors(model, loss, mp, batch, mode="mc", noise=noise)
    for a, c in zip(from_key, from_noise):
        assert_close(a.G, back(ad_backend, c.G), rtol=1e-15, backend=ad_backend)


# ------------------------------------------------------------------------------ Hessian-free


MODEL = MLP([3, 4, 3])


def _key(state):
    """The random key of a Hessian-free state (a dict or a typed state); None without one."""
    return state.get("key") if isinstance(state, dict) else getattr(state, "key", None)


def _direction(state):
    return state["direction"] if isinstance(state, dict) else state.direction


def _with_key(state, key):
    return dict(state, key=key) if isinstance(state, dict) else state._replace(key=key)


def _hf_problem(loss_name):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 3))
    if loss_name == "mse":
        return MSE(), x, rng.standard_normal((16, 3))
    return SoftmaxCrossEntropy(), x, rng.integers(0, 3, 16)


def _hf_run(backend, loss_name, steps=5, jit=False):
    loss, x, y = _hf_problem(loss_name)
    opt = HessianFree(MODEL.apply, loss, curvature="fisher", cg_iters=8, seed=17)
    params = MODEL.init(0, backend)
    state = opt.init(params)
    step = opt.step
    if jit:
        import jax

        step = jax.jit(opt.step)
    batch = batch_on(backend, x, y)
    keys, trace = [], []
    for _ in range(steps):
        params, state, info = step(params, state, batch)
        assert bool(info.finite)
        keys.append(tuple(u32(backend, _key(state))))
        trace.append(raveled(backend, params))
    return trace, keys, float(back(backend, info.loss))


@pytest.mark.parametrize("loss_name", ["mse", "softmax"])
def test_hessian_free_fisher_agrees_across_backends(ad_backend, loss_name):
    # the jitted step where the backend compiles: the step a JAX user runs
    ours, keys, _ = _hf_run(ad_backend, loss_name, jit=ad_backend.has_jit)
    ref, ref_keys, _ = _hf_run(backends.get("numpy"), loss_name)
    assert keys == ref_keys and len(set(keys)) == len(keys)
    for p, p_ref in zip(ours, ref):
        assert_close(p, p_ref, rtol=1e-10)


def test_hessian_free_fisher_jit_matches_eager_and_draws_new_targets():
    jax = jax_or_skip()
    b = backends.get("jax")
    loss, x, y = _hf_problem("softmax")
    opt = HessianFree(MODEL.apply, loss, curvature="fisher", cg_iters=8, seed=17)
    step = jax.jit(opt.step)
    params = MODEL.init(0, b)
    batch = batch_on(b, x, y)
    s0 = opt.init(params)
    jit_p, jit_s, eager_p, eager_s = params, s0, params, s0
    states = [s0]
    for _ in range(2):  # eager JAX dispatches op by op: two steps keep the test short
        jit_p, jit_s, _ = step(jit_p, jit_s, batch)
        eager_p, eager_s, _ = opt.step(eager_p, eager_s, batch)
        np.testing.assert_array_equal(np.asarray(_key(jit_s)), np.asarray(_key(eager_s)))
        assert_close(raveled(b, jit_p), raveled(b, eager_p), rtol=1e-10)
        states.append(jit_s)
    assert len({tuple(np.asarray(_key(s))) for s in states}) == 3
    # the same parameters, batch, damping and warm start; only the key differs
    d0 = raveled(b, _direction(step(params, s0, batch)[1]))
    d0_again = raveled(b, _direction(step(params, s0, batch)[1]))
    d1 = raveled(b, _direction(step(params, _with_key(s0, _key(states[1])), batch)[1]))
    np.testing.assert_array_equal(d0, d0_again)
    assert np.linalg.norm(d1 - d0) > 1e-3 * np.linalg.norm(d0)
    # the targets the steps draw (the key each splits off), traced through a jitted split
    outputs = MODEL.apply(params, batch[0])
    draw = jax.jit(lambda k: loss.sample(outputs, key=random.split(k)[1, :]))
    targets = [np.asarray(draw(_key(s))) for s in states]
    assert all(not np.array_equal(a, c) for a, c in zip(targets, targets[1:]))


def test_hessian_free_fisher_state_holds_the_key():
    b = backends.get("numpy")
    opt = HessianFree(MODEL.apply, MSE(), curvature="fisher", seed=4)
    params = MODEL.init(0, b)
    state = opt.init(params)
    np.testing.assert_array_equal(_key(state), np.asarray(random.key(4, b)))
