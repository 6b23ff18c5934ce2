"""Curvature blocks against dense float64 references written out here in NumPy.

References: np.kron of the factors, permuted into the blocks' parameter coordinates (b first,
then W row-major) by an explicit permutation; matrix powers from np.linalg.eigh of the dense
matrices; EMAs computed by hand; the GGN of a linear layer from autograd Jacobians.
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers import RTOL64, assert_close, dense_kron, spd, to
from secondorder import backends, losses, tree
from secondorder.backends.bridge import alike
from secondorder.curvature import KFAC, kronecker_factors
from secondorder.curvature.blocks import (
    BlockState,
    CacheKindError,
    ConvBlock,
    DenseBlock,
    EigenCache,
    FactorCache,
    TensorBlock,
    mode_statistics,
    split_damping,
)
from secondorder.errors import NotPositiveDefiniteError, SecondOrderError, ShapeError
from secondorder.linalg import Kronecker
from secondorder.models import MLP, ConvNet, LayerInfo, Model
from secondorder.models.layers import dense

LAM = 0.3


def eig_power(m, s):
    """m^s of a symmetric PD matrix through NumPy's eigendecomposition."""
    w, q = np.linalg.eigh(m)
    return (q * w**s) @ q.T


def permutation(d_out, d_w, bias):
    """P with P @ vec~([W b]) = the flat parameters (b, W.ravel()) (or W.ravel())."""
    d_in = d_w + (1 if bias else 0)
    rows = []
    if bias:
        rows += [r * d_in + d_w for r in range(d_out)]
    rows += [r * d_in + c for r in range(d_out) for c in range(d_w)]
    p = np.zeros((len(rows), d_out * d_in))
    p[np.arange(len(rows)), rows] = 1.0
    return p


def in_params(p, m):
    """A matrix on vec~([W b]) moved into parameter coordinates."""
    return p @ m @ p.T


def pi_of(a, g):
    """K-FAC's pi = sqrt((tr A / dim A) / (tr G / dim G)) (Algorithm 12)."""
    return np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))


def dense_state(backend, rng, d_out=3, d_w=4, bias=True, kind="inverse"):
    d_in = d_w + (1 if bias else 0)
    g, a = spd(rng, d_out, cond=20.0), 2.5 * spd(rng, d_in, cond=50.0)
    block = DenseBlock((d_out, d_w), bias=bias)
    state = block.with_factors(block.init(to(backend, a), kind=kind), to(backend, (g, a)))
    return block, state, g, a, permutation(d_out, d_w, bias)


def param_vector(backend, rng, block):
    """A random NumPy vector in the block's parameter space, and the same on ``backend``."""
    v = tree.map(lambda z: rng.standard_normal(z.shape), block.param_like(np.zeros(1)))
    return v, to(backend, v)


def back_np(backend, x):
    return tree.map(lambda a: np.asarray(backend.to_numpy(a)), x)


def flat(v):
    return tree.ravel(v)[0]


# ------------------------------------------------------------------ DenseBlock layout
@pytest.mark.parametrize("bias", [True, False])
def test_dense_block_is_the_kronecker_product_of_its_factors(backend, rng, bias):
    block, state, g, a, p = dense_state(backend, rng, bias=bias)
    assert_close(block.to_dense(state), in_params(p, np.kron(g, a)), backend=backend)
    v, bv = param_vector(backend, rng, block)
    w_tilde = p.T @ flat(v)  # vec~([W b])
    expected = p @ (np.kron(g, a) @ w_tilde)
    assert_close(flat(back_np(backend, block.matvec(state, bv))), expected)


def test_ema_of_statistics_equals_the_hand_computed_average(backend, rng):
    block = DenseBlock((3, 4))
    batches = [(spd(rng, 3), spd(rng, 5)) for _ in range(3)]
    state = block.init(to(backend, np.zeros(1)))
    assert int(backend.to_numpy(state.count)) == 0
    for s in batches:
        state = block.update_statistics(state, to(backend, s), 0.9)
    # the first update takes the batch value, then F <- 0.9 F + 0.1 S
    expected = [batches[0][i] for i in range(2)]
    for s in batches[1:]:
        expected = [0.9 * e + 0.1 * si for e, si in zip(expected, s)]
    assert_close(list(state.factors), expected, backend=backend)
    assert int(backend.to_numpy(state.count)) == 3


def test_split_damping_is_kfacs_pi_and_the_kronecker_operators(backend, rng):
    a, g = spd(rng, 5, cond=30.0) * 4.0, spd(rng, 3)
    pi = pi_of(a, g)
    traces = tuple(to(backend, [np.trace(g) / 3, np.trace(a) / 5]))
    d_g, d_a = split_damping(traces, LAM, "pi", backend.xp)
    assert_close([d_g, d_a], [np.sqrt(LAM) / pi, pi * np.sqrt(LAM)], backend=backend)
    ref = Kronecker(*to(backend, [g, a])).factor_dampings(LAM, "pi")
    assert_close([d_g, d_a], back_np(backend, ref), backend=backend)
    # no statistics yet (zero traces): the equal split, not NaN
    zero = tuple(to(backend, [0.0, np.trace(a) / 5]))
    assert_close(split_damping(zero, LAM, "pi", backend.xp), [np.sqrt(LAM)] * 2,
                 backend=backend)


# ------------------------------------------------------------------ damped inverses
@pytest.mark.parametrize("bias", [True, False])
def test_damped_inverse_routes_equal_dense_inverses(backend, rng, bias):
    block, state, g, a, p = dense_state(backend, rng, bias=bias)
    v, bv = param_vector(backend, rng, block)
    x = flat(v)
    k = in_params(p, np.kron(g, a))
    exact = np.linalg.solve(k + LAM * np.eye(len(x)), x)
    pi = pi_of(a, g)
    eye_a, eye_g = np.eye(a.shape[0]), np.eye(g.shape[0])
    factored = in_params(p, np.kron(np.linalg.inv(g + np.sqrt(LAM) / pi * eye_g),
                                    np.linalg.inv(a + pi * np.sqrt(LAM) * eye_a))) @ x
    equal = in_params(p, np.kron(np.linalg.inv(g + np.sqrt(LAM) * eye_g),
                                 np.linalg.inv(a + np.sqrt(LAM) * eye_a))) @ x

    inv_state = block.update_cache(state, LAM)  # kind "inverse", split "pi"
    assert isinstance(inv_state.cache, FactorCache)
    assert_close(flat(back_np(backend, block.multiply(inv_state, bv))), factored)
    eq_state = block.update_cache(state, LAM, split="equal")
    assert_close(flat(back_np(backend, block.multiply(eq_state, bv, power=-1.0))), equal)

    eig_state = block.update_cache(block.with_factors(block.init(state.factors[0], kind="eigh"),
                                                      state.factors), kind="eigh")
    assert isinstance(eig_state.cache, EigenCache)
    got = block.multiply(eig_state, bv, power=-1.0, damping=LAM, split="exact")
    assert_close(flat(back_np(backend, got)), exact)
    got = block.multiply(eig_state, bv, power=-1.0, damping=LAM, split="pi")
    assert_close(flat(back_np(backend, got)), factored)


@pytest.mark.parametrize("power", [-0.5, -0.25])
def test_powers_equal_dense_eigh_powers(backend, rng, power):
    block, state, g, a, p = dense_state(backend, rng)
    v, bv = param_vector(backend, rng, block)
    x = flat(v)
    k = in_params(p, np.kron(g, a))
    pi = pi_of(a, g)
    d_a, d_g = pi * np.sqrt(LAM), np.sqrt(LAM) / pi
    factored = in_params(p, np.kron(eig_power(g + d_g * np.eye(3), power),
                                    eig_power(a + d_a * np.eye(5), power))) @ x
    exact = eig_power(k + LAM * np.eye(len(x)), power) @ x

    root = block.update_cache(block.with_factors(block.init(bv[1], kind="root"), state.factors),
                              LAM, kind="root", power=power)
    assert_close(flat(back_np(backend, block.multiply(root, bv))), factored)
    assert_close(flat(back_np(backend, block.multiply(root, bv, power=power))), factored)

    eig = block.update_cache(block.with_factors(block.init(bv[1], kind="eigh"), state.factors),
                             kind="eigh")
    assert_close(flat(back_np(backend, block.multiply(eig, bv, power, damping=LAM,
                                                      split="exact"))), exact)
    assert_close(flat(back_np(backend, block.multiply(eig, bv, power, damping=LAM))), factored)


# ------------------------------------------------------------------ TensorBlock
@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 4), (5,)])
def test_tensor_block_roots_equal_dense_eigh_roots(backend, rng, shape):
    k = len(shape)
    grads = [rng.standard_normal(shape) for _ in range(2)]
    eps = 0.1
    # per-mode statistics written out: mat_i(G) mat_i(G)^T
    stats = [[np.moveaxis(gr, i, 0).reshape(shape[i], -1) @ np.moveaxis(gr, i, 0).reshape(
        shape[i], -1).T for i in range(k)] for gr in grads]
    expected = [0.95 * s0 + 0.05 * s1 for s0, s1 in zip(*stats)]
    block = TensorBlock(shape)
    bg = to(backend, grads)
    assert_close(list(mode_statistics(bg[0])), stats[0], backend=backend)
    state = block.init(bg[0])
    for gr in bg:
        state = block.update_statistics(state, block.batch_statistics(gr), 0.95)
    assert_close(list(state.factors), expected, backend=backend)

    state = block.update_cache(state, eps)  # Shampoo: (G_i + eps I)^{-1/(2k)}
    roots = [eig_power(f + eps * np.eye(f.shape[0]), -1.0 / (2 * k)) for f in expected]
    assert_close(list(state.cache.factors), roots, backend=backend)
    v = rng.standard_normal(shape)
    got = block.multiply(state, to(backend, v))
    assert_close(got, (dense_kron(*roots) @ v.ravel()).reshape(shape), backend=backend)

    inv = block.update_cache(state, eps, kind="inverse")  # TNT: (G_i + eps I)^{-1}
    invs = [np.linalg.inv(f + eps * np.eye(f.shape[0])) for f in expected]
    assert_close(block.multiply(inv, to(backend, v)),
                 (dense_kron(*invs) @ v.ravel()).reshape(shape), backend=backend)


def test_tensor_block_newton_root_agrees_with_eigh(ad_backend, rng):
    # the coupled Newton iteration stops at max |X^p A - I| < 1e-6, so it agrees to ~1e-6
    block = TensorBlock((3, 4))
    b = ad_backend
    state = block.update_statistics(block.init(to(b, np.zeros(1))),
                                    block.batch_statistics(to(b, rng.standard_normal((3, 4)))),
                                    0.9)
    newton = block.update_cache(state, 0.1, method="newton")
    eigh = block.update_cache(state, 0.1)
    for n, e in zip(newton.cache.factors, eigh.cache.factors):
        assert_close(n, np.asarray(b.to_numpy(e)), rtol=1e-5, backend=b)


# ------------------------------------------------------------------ K-FAC operator
def test_kfac_inverse_of_a_linear_layer_under_squared_loss_is_the_ggn_inverse(ad_backend, rng):
    autograd = pytest.importorskip("autograd")
    model = MLP([4, 3])  # f = W x + b: K-FAC equals the GGN exactly (the sheet's checkable fact)
    x, y = rng.standard_normal((7, 4)), rng.standard_normal((7, 3))
    params_np = model.init(0, "numpy")
    flat_p, unravel = tree.ravel(params_np)
    jac = autograd.jacobian(lambda w: model.apply(unravel(w), x))(flat_p)  # (m, k, p)
    ggn = np.einsum("ikp,ikq->pq", jac, jac) / 7
    b = ad_backend
    params, batch = model.init(0, b), (to(b, x), to(b, y))
    op = KFAC(model, losses.MSE(), params, batch)
    assert_close(op.to_dense(), ggn, backend=b)
    v = rng.standard_normal(len(flat_p))
    bv = to(b, unravel(v))
    assert_close(tree.ravel(back_np(b, op.inv() @ bv))[0], np.linalg.solve(ggn, v))
    assert_close(tree.ravel(back_np(b, op.power(-0.5) @ bv))[0], eig_power(ggn, -0.5) @ v)
    assert_close(tree.ravel(back_np(b, op.damped_inverse(LAM, method="exact") @ bv))[0],
                 np.linalg.solve(ggn + LAM * np.eye(len(v)), v))
    assert_close(op.inv().to_dense(), np.linalg.inv(ggn), backend=b)


class _Scaled(Model):
    """A dense layer times a free scalar: the scalar lies outside every tapped layer."""

    layers = (LayerInfo("dense", 2, 0, 3, 2),)

    def tap_shapes(self, x):
        return [(x.shape[0], 2)]

    def apply(self, params, x, taps=None):
        s, a = dense({"w": params["w"], "b": params["b"]}, x, None if taps is None else taps[0])
        f = s * params["c"]
        return f if taps is None else (f, [a])


def test_kfac_damped_inverse_covers_parameters_outside_layers(ad_backend, rng):
    b = ad_backend
    p_np = {"b": rng.standard_normal(2), "c": np.array(1.5), "w": rng.standard_normal((2, 3))}
    x, y = rng.standard_normal((6, 3)), rng.standard_normal((6, 2))
    op = KFAC(_Scaled(), losses.MSE(), to(b, p_np), (to(b, x), to(b, y)))
    dense_k = np.asarray(b.to_numpy(op.to_dense()))
    assert dense_k[2, 2] == 0.0  # leaf "c" (flat index 2) gets a zero block
    with pytest.raises(NotPositiveDefiniteError, match="damped_inverse"):
        op.inv()
    with pytest.raises(NotPositiveDefiniteError, match="damped_inverse"):
        op.power(-0.5)
    expected = np.linalg.inv(dense_k + LAM * np.eye(dense_k.shape[0]))
    assert_close(op.damped_inverse(LAM, method="exact").to_dense(), expected, backend=b)


def test_conv_block_on_the_convnet(ad_backend, rng):
    b = ad_backend
    net = ConvNet((1, 4, 4), channels=(2,), dense=(3,), kernel=3, padding=1, activation="tanh")
    x, y = rng.standard_normal((3, 1, 4, 4)), rng.integers(0, 3, 3)
    params, batch = net.init(0, b), (to(b, x), b.asarray(y))
    loss = losses.SoftmaxCrossEntropy()
    conv_f = kronecker_factors(net, loss, params, batch)[0]
    a, g = np.asarray(b.to_numpy(conv_f.A)), np.asarray(b.to_numpy(conv_f.G))
    # the block's batch statistics from the taps are the same function as kronecker_factors'
    taps = net.zero_taps(batch[0])
    (f, inputs), pullback = b.vjp(lambda t: net.apply(*alike((params, batch[0]), t), t), taps)
    u = to(b, rng.standard_normal((3, 3)))
    deltas = pullback((u, [b.xp.zeros_like(i) for i in inputs]))
    block = ConvBlock((2, 1, 3, 3))
    sg, sa = block.batch_statistics(inputs[0], deltas[0])
    d0 = np.asarray(b.to_numpy(deltas[0])).reshape(-1, 2)
    assert_close(sg, d0.T @ d0 / (3 * 16), backend=b)  # G averages over the 16 positions
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    rows = np.array([np.append(padded[i, 0, r:r + 3, c:c + 3].ravel(), 1.0)
                     for i in range(3) for r in range(4) for c in range(4)])
    assert_close(sa, rows.T @ rows / 3, backend=b)  # A sums over them
    # a dense layer shared over positions (a sequence) takes the same statistics: A sums, G
    # averages; a convolution block refuses inputs without positions
    dg, da = DenseBlock((2, 9)).batch_statistics(inputs[0], deltas[0])
    assert_close(dg, d0.T @ d0 / (3 * 16), backend=b)
    assert_close(da, rows.T @ rows / 3, backend=b)
    with pytest.raises(ShapeError, match="ConvBlock takes tapped inputs with 3 axes"):
        block.batch_statistics(inputs[0][:, 0], deltas[0][:, 0])

    # KFAC's damped inverse on the ConvNet: per layer (A + pi sqrt(l) I)^-1 (x) (G + ...)^-1
    op = KFAC(net, loss, params, batch)
    damped = op.damped_inverse(LAM).to_dense()
    pi = pi_of(a, g)
    conv_ref = in_params(permutation(2, 9, True),
                         np.kron(np.linalg.inv(g + np.sqrt(LAM) / pi * np.eye(2)),
                                 np.linalg.inv(a + pi * np.sqrt(LAM) * np.eye(10))))
    assert_close(np.asarray(b.to_numpy(damped))[:20, :20], conv_ref)
    assert_close(op.damped_inverse(LAM, method="exact").to_dense(),
                 np.linalg.inv(np.asarray(b.to_numpy(op.to_dense())) + LAM * np.eye(
                     damped.shape[0])), backend=b)


# ------------------------------------------------------------------ cross-backend, jit, errors
def _run(backend, rng_seed=5):
    """Statistics, caches and products of a dense and a tensor block on one backend."""
    rng = np.random.default_rng(rng_seed)
    block, tblock = DenseBlock((3, 4)), TensorBlock((2, 3, 4))
    bv = to(backend, (rng.standard_normal(3), rng.standard_normal((3, 4))))
    tv = to(backend, rng.standard_normal((2, 3, 4)))
    state = block.init(bv[1])
    eig = block.init(bv[1], kind="eigh")
    tstate = tblock.init(tv)
    for _ in range(2):
        s = (to(backend, spd(rng, 3)), to(backend, spd(rng, 5)))
        state = block.update_statistics(state, s, 0.9)
        eig = block.update_statistics(eig, s, 0.9)
        tstate = tblock.update_statistics(
            tstate, tblock.batch_statistics(to(backend, rng.standard_normal((2, 3, 4)))), 0.9)
    state = block.update_cache(state, LAM)
    eig = block.update_cache(eig, kind="eigh")
    tstate = tblock.update_cache(tstate, 0.1)
    return [block.multiply(state, bv), block.multiply(eig, bv, -0.5, damping=LAM,
                                                      split="exact"),
            tblock.multiply(tstate, tv)]


def test_backends_agree(ad_backend):
    reference = _run(backends.get("numpy"))
    got = _run(ad_backend)
    assert_close(got, back_np(backends.get("numpy"), reference), rtol=RTOL64, backend=ad_backend)


def test_block_methods_compile_under_jax_jit(rng):
    jax = pytest.importorskip("jax")
    b = backends.get("jax")
    block = DenseBlock((3, 4))
    tblock = TensorBlock((3, 4))
    s1 = to(b, (spd(rng, 3), spd(rng, 5)))
    v = to(b, (rng.standard_normal(3), rng.standard_normal((3, 4))))
    tv = to(b, rng.standard_normal((3, 4)))

    def step(kind, state, stats, decay, damping, v):
        state = block.update_statistics(state, stats, decay)
        state = block.update_cache(state, damping, kind=kind) if kind != "eigh" else \
            block.update_cache(state, kind="eigh")
        if kind == "eigh":
            return state, block.multiply(state, v, -0.5, damping=damping, split="exact")
        return state, block.multiply(state, v)

    for kind in ("inverse", "root", "eigh"):
        state0 = block.init(v[1], kind=kind)
        eager = step(kind, state0, s1, 0.9, LAM, v)
        jitted = jax.jit(step, static_argnums=0)(kind, state0, s1, 0.9, LAM, v)
        assert isinstance(jitted[0], BlockState)
        assert_close(list(jitted[1]), back_np(b, list(eager[1])), backend=b)
        assert_close(list(jitted[0].factors), back_np(b, list(eager[0].factors)), backend=b)

    @jax.jit
    def tensor_step(state, grad, v):
        state = tblock.update_statistics(state, tblock.batch_statistics(grad), 0.9)
        state = tblock.update_cache(state, 0.1)
        return tblock.multiply(state, v)

    t0 = tblock.init(tv)
    g = to(b, rng.standard_normal((3, 4)))
    eager = tblock.multiply(tblock.update_cache(tblock.update_statistics(
        t0, tblock.batch_statistics(g), 0.9), 0.1), tv)
    assert_close(tensor_step(t0, g, tv), np.asarray(b.to_numpy(eager)), backend=b)


def test_named_errors(rng):
    block = DenseBlock((3, 4))
    state = block.init(np.zeros(1))
    with pytest.raises(CacheKindError, match="init"):
        block.update_cache(state, kind="eigh")
    with pytest.raises(CacheKindError, match="eigh"):
        block.update_cache(state, LAM, split="exact")
    with pytest.raises(CacheKindError, match="unknown"):
        block.init(np.zeros(1), kind="cholesky")
    with pytest.raises(ShapeError, match="batch_statistics"):
        block.update_statistics(state, (np.eye(3), np.eye(4)), 0.9)
    with pytest.raises(ShapeError, match="DenseBlock takes tapped inputs with 2 or 3 axes"):
        block.batch_statistics(np.zeros((2, 3, 1, 5)), np.zeros((2, 3, 1, 3)))
    s = block.update_cache(block.update_statistics(state, (spd(rng, 3), spd(rng, 5)), 0.9), LAM)
    v = (np.zeros(3), np.zeros((3, 4)))
    with pytest.raises(CacheKindError, match="damping"):
        block.multiply(s, v, damping=LAM)
    with pytest.raises(CacheKindError, match="power"):
        block.multiply(s, v, power=-0.5)
    with pytest.raises(CacheKindError, match="Newton"):
        TensorBlock((3,)).update_cache(TensorBlock((3,)).init(np.zeros(1)), 0.1, power=-0.4,
                                       method="newton")
    with pytest.raises(ShapeError, match="scalars"):
        TensorBlock(())
    assert issubclass(CacheKindError, SecondOrderError)
