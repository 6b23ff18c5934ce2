"""Curvature operators against dense float64 oracles built by brute force.

The oracle differentiates the network with ``autograd.jacobian`` / ``autograd.hessian`` on a flat
parameter vector (not through ``secondorder``'s linearisation) and forms J^T H J, the Fisher and
J J^T with loss Hessians and gradients written out here in NumPy.
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_close, back, softmax, to
from secondorder import backends, losses, tree
from secondorder.curvature import GGN, KFAC, Fisher, Gram, Hessian, Jacobian, kronecker_factors
from secondorder.errors import LabelError, MixedBackendError, NonFiniteError, ShapeError
from secondorder.models import MLP, ConvNet, LayerInfo, Model
from secondorder.models.layers import conv2d, dense

autograd = pytest.importorskip("autograd")
anp = autograd.numpy


def _np_loss(name):
    """(mean loss with autograd.numpy, per-sample Hessians, per-sample gradients) in NumPy."""
    if name == "mse":
        return (lambda f, y: anp.mean(0.5 * anp.sum((f - y) ** 2, axis=1)),
                lambda f, y: np.broadcast_to(np.eye(f.shape[1]), (f.shape[0],) + (f.shape[1],) * 2),
                lambda f, y: f - y)
    if name == "softmax_cross_entropy":
        def value(f, y):
            mx = anp.max(f, axis=1, keepdims=True)
            lse = anp.log(anp.sum(anp.exp(f - mx), axis=1)) + mx[:, 0]
            return anp.mean(lse - f[np.arange(f.shape[0]), y])

        def hess(f, y):
            s = softmax(f)
            return np.einsum("ij,jk->ijk", s, np.eye(f.shape[1])) - s[:, :, None] * s[:, None, :]

        return value, hess, lambda f, y: softmax(f) - np.eye(f.shape[1])[y]
    sig = lambda f: 1.0 / (1.0 + np.exp(-f))  # noqa: E731
    return (lambda f, y: anp.mean(anp.sum(anp.logaddexp(0.0, f) - y * f, axis=1)),
            lambda f, y: np.einsum("ij,jk->ijk", sig(f) * (1 - sig(f)), np.eye(f.shape[1])),
            lambda f, y: sig(f) - y)


CASES = {
    "mlp-mse": (lambda: MLP([3, 4, 2], "tanh"), "mse", (5, 3)),
    "mlp-ce": (lambda: MLP([3, 4, 3], "silu"), "softmax_cross_entropy", (5, 3)),
    "mlp-bce": (lambda: MLP([3, 3, 2], "sigmoid"), "sigmoid_bce", (4, 3)),
    "conv-ce": (lambda: ConvNet((1, 4, 4), channels=(2,), dense=(3,), activation="tanh"),
                "softmax_cross_entropy", (3, 1, 4, 4)),
}


def _data(case, rng):
    make, loss_name, x_shape = CASES[case]
    model = make()
    x = rng.standard_normal(x_shape)
    m = x_shape[0]
    k = model.apply(model.init(0, "numpy"), x).shape[1]
    if loss_name == "mse":
        y = rng.standard_normal((m, k))
    elif loss_name == "sigmoid_bce":
        y = (rng.random((m, k)) < 0.5).astype(float)
    else:
        y = rng.integers(0, k, m)
    return model, loss_name, x, y


def _oracle(model, loss_name, x, y):
    params = model.init(0, "numpy")
    flat, unravel = tree.ravel(params)
    value, hess, grad = _np_loss(loss_name)
    jac = autograd.jacobian(lambda w: model.apply(unravel(w), x))(flat)  # (m, k, p)
    f = model.apply(params, x)
    m = f.shape[0]
    h = hess(f, y)
    r = grad(f, y)
    ggn = np.einsum("ikp,ikl,ilq->pq", jac, h, jac) / m
    fisher_emp = np.einsum("ikp,ik,il,ilq->pq", jac, r, r, jac) / m
    hessian = autograd.hessian(lambda w: value(model.apply(unravel(w), x), y))(flat)
    j2 = jac.reshape(m * f.shape[1], -1)
    return {"params": params, "jac": jac, "ggn": ggn, "fisher_emp": fisher_emp,
            "hessian": hessian, "gram": j2 @ j2.T, "J": j2, "f": f, "r": r, "h": h}


def _batch(backend, x, y):
    bx = to(backend, x)
    by = backend.asarray(y) if y.dtype.kind in "iu" else to(backend, y)
    return bx, by


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_operators_match_dense_oracles(ad_backend, rng, case):
    model, loss_name, x, y = _data(case, rng)
    ref = _oracle(model, loss_name, x, y)
    loss = losses.get(loss_name)
    params = model.init(0, ad_backend)
    batch = _batch(ad_backend, x, y)
    assert_close(GGN(model, loss, params, batch).to_dense(), ref["ggn"], backend=ad_backend)
    assert_close(Fisher(model, loss, params, batch, kind="empirical").to_dense(),
                 ref["fisher_emp"], backend=ad_backend)
    assert_close(Hessian(model, loss, params, batch).to_dense(), ref["hessian"], rtol=1e-11,
                 backend=ad_backend)
    assert_close(Jacobian(model, params, batch[0]).to_dense(), ref["J"], backend=ad_backend)
    assert_close(Gram(model, params, batch[0]).to_dense(), ref["gram"], backend=ad_backend)
    jac = Jacobian(model, params, batch[0])
    u = rng.standard_normal(ref["f"].shape)
    assert_close(jac.rmatvec(to(ad_backend, u)),
                 tree.unravel(ref["J"].T @ u.ravel(), ref["params"]), backend=ad_backend)


@pytest.mark.parametrize("loss_name", ["mse", "softmax_cross_entropy", "sigmoid_bce"])
def test_monte_carlo_fisher_uses_sampled_targets(ad_backend, rng, loss_name):
    model = MLP([3, 4, 3], "tanh")
    x = rng.standard_normal((6, 3))
    y = np.zeros((6, 3)) if loss_name != "softmax_cross_entropy" else np.zeros(6, dtype=int)
    loss = losses.get(loss_name)
    ref = _oracle(model, loss_name, x, y)
    f = ref["f"]
    noise = [loss.noise(f.shape, np.random.default_rng(s)) for s in (1, 2)]
    _, _, grad = _np_loss(loss_name)
    fisher = 0.0
    for n in noise:  # targets sampled here in NumPy from the same noise
        if loss_name == "mse":
            t = f + n
        elif loss_name == "sigmoid_bce":
            t = (n < 1.0 / (1.0 + np.exp(-f))).astype(float)
        else:
            t = np.minimum((np.cumsum(softmax(f), axis=1) < n[:, None]).sum(axis=1), 2)
        r = grad(f, t)
        fisher = fisher + np.einsum("ikp,ik,il,ilq->pq", ref["jac"], r, r, ref["jac"])
    fisher /= 6 * len(noise)
    op = Fisher(model, loss, model.init(0, ad_backend), _batch(ad_backend, x, y), kind="mc",
                noise=noise)
    assert_close(op.to_dense(), fisher, backend=ad_backend)


def test_kfac_is_exact_for_a_linear_layer_under_squared_loss(ad_backend, rng):
    model = MLP([4, 3])  # one dense layer: f = W x + b
    x, y = rng.standard_normal((7, 4)), rng.standard_normal((7, 3))
    ref = _oracle(model, "mse", x, y)
    params, batch = model.init(0, ad_backend), _batch(ad_backend, x, y)
    (lf,) = kronecker_factors(model, losses.MSE(), params, batch)
    a = np.hstack([x, np.ones((7, 1))])
    assert_close(lf.A, a.T @ a / 7, backend=ad_backend)
    assert_close(lf.G, np.eye(3), backend=ad_backend)
    assert_close(KFAC(model, losses.MSE(), params, batch).to_dense(), ref["ggn"],
                 backend=ad_backend)
    assert_close(KFAC(model, losses.MSE(), params, batch).to_dense(),
                 back(ad_backend, GGN(model, losses.MSE(), params, batch).to_dense()),
                 backend=ad_backend)


@pytest.mark.parametrize("mode", ["exact", "empirical", "mc"])
def test_kfac_last_layer_factors(ad_backend, rng, mode):
    model = MLP([3, 5, 4], "tanh")
    x, y = rng.standard_normal((6, 3)), rng.integers(0, 4, 6)
    loss = losses.SoftmaxCrossEntropy()
    ref = _oracle(model, "softmax_cross_entropy", x, y)
    noise = [loss.noise((6, 4), np.random.default_rng(3))]
    factors = kronecker_factors(model, loss, model.init(0, ad_backend), _batch(ad_backend, x, y),
                                mode=mode, noise=noise)
    f = ref["f"]
    if mode == "exact":
        expected = ref["h"].mean(axis=0)  # the output layer's J_s is the identity
    else:
        t = y if mode == "empirical" else np.minimum(
            (np.cumsum(softmax(f), axis=1) < noise[0][:, None]).sum(axis=1), 3)
        r = softmax(f) - np.eye(4)[t]
        expected = r.T @ r / 6
    assert_close(factors[-1].G, expected, backend=ad_backend)
    hidden = np.tanh(x @ ref["params"][0]["w"].T + ref["params"][0]["b"])
    a = np.hstack([hidden, np.ones((6, 1))])
    assert_close(factors[-1].A, a.T @ a / 6, backend=ad_backend)


def test_kfc_reduces_to_dense_kfac_for_one_position(ad_backend, rng):
    # a conv layer whose kernel covers the whole image is a dense layer on the flattened image
    mlp = MLP([32, 4, 3], "tanh")
    conv_params = {"w": rng.standard_normal((4, 2, 4, 4)) / 6, "b": rng.standard_normal(4)}
    dense_params = {"w": conv_params["w"].reshape(4, 32), "b": conv_params["b"]}
    head = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(3)}
    loss = losses.SoftmaxCrossEntropy()

    class OneConv(Model):  # conv with a single output position -> tanh -> dense
        layers = (LayerInfo("conv", 1, 0, 32, 4), LayerInfo("dense", 3, 2, 4, 3))

        def tap_shapes(self, x):
            return [(x.shape[0], 1, 4), (x.shape[0], 3)]

        def apply(self, params, x, taps=None):
            xp = backends.namespace(x)
            s, a0 = conv2d(params[0], x, tap=None if taps is None else taps[0])
            h = xp.tanh(xp.reshape(s, (s.shape[0], -1)))
            f, a1 = dense(params[1], h, None if taps is None else taps[1])
            return f if taps is None else (f, [a0, a1])

    x_img, y = rng.standard_normal((5, 2, 4, 4)), rng.integers(0, 3, 5)
    b = ad_backend
    conv_f = kronecker_factors(OneConv(), loss, to(b, [conv_params, head]),
                               _batch(b, x_img, y))
    mlp_f = kronecker_factors(mlp, loss, to(b, [dense_params, head]),
                              _batch(b, x_img.reshape(5, 32), y))
    for cf, mf in zip(conv_f, mlp_f):
        assert_close(cf.A, np.asarray(b.to_numpy(mf.A)), backend=b)
        assert_close(cf.G, np.asarray(b.to_numpy(mf.G)), backend=b)


def test_convnet_rejects_inputs_too_small_for_its_blocks():
    with pytest.raises(ValueError, match="too small"):
        ConvNet((2, 3, 3), channels=(4,), dense=(3,), kernel=3, padding=0)


def test_kfc_input_factor_sums_over_patches(ad_backend, rng):
    net = ConvNet((1, 4, 4), channels=(2,), dense=(3,), kernel=3, padding=1, activation="tanh")
    x, y = rng.standard_normal((3, 1, 4, 4)), rng.integers(0, 3, 3)
    factors = kronecker_factors(net, losses.SoftmaxCrossEntropy(), net.init(0, ad_backend),
                                _batch(ad_backend, x, y))
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    rows = [np.append(padded[i, 0, r:r + 3, c:c + 3].ravel(), 1.0)
            for i in range(3) for r in range(4) for c in range(4)]
    rows = np.array(rows)
    assert_close(factors[0].A, rows.T @ rows / 3, backend=ad_backend)


def test_operators_compile_under_jax_jit(rng):
    jax = pytest.importorskip("jax")
    model, loss_name, x, y = _data("mlp-ce", rng)
    ref = _oracle(model, loss_name, x, y)
    b = backends.get("jax")
    params, (bx, by) = model.init(0, b), _batch(b, x, y)
    v = tree.map(lambda a: rng.standard_normal(a.shape), ref["params"])

    @jax.jit
    def products(p, v):
        loss = losses.SoftmaxCrossEntropy()
        return GGN(model, loss, p, (bx, by)).matvec(v), Hessian(model, loss, p, (bx, by)) @ v

    ggn_v, hess_v = products(params, to(b, v))
    flat_v = tree.ravel(v)[0]
    assert_close(tree.ravel(ggn_v)[0], ref["ggn"] @ flat_v, backend=b)
    assert_close(tree.ravel(hess_v)[0], ref["hessian"] @ flat_v, rtol=1e-11, backend=b)


def test_bad_batches_raise(ad_backend, rng):
    model = MLP([3, 2])
    params = model.init(0, ad_backend)
    x = rng.standard_normal((4, 3))
    bad_x = x.copy()
    bad_x[1, 2] = np.nan
    with pytest.raises(NonFiniteError, match="NaN"):
        GGN(model, losses.MSE(), params, (to(ad_backend, bad_x), to(ad_backend, np.zeros((4, 2)))))
    with pytest.raises(LabelError, match="labels must lie"):
        GGN(model, losses.SoftmaxCrossEntropy(), params,
            (to(ad_backend, x), ad_backend.asarray(np.array([0, 1, 2, 1]))))
    with pytest.raises(ShapeError, match="shape"):
        GGN(model, losses.MSE(), params, (to(ad_backend, x), to(ad_backend, np.zeros((4, 3)))))
    if ad_backend.name != "numpy":
        with pytest.raises(MixedBackendError):
            GGN(model, losses.MSE(), params, (x, np.zeros((4, 2))))
