"""Losses against NumPy float64 oracles, autodiff, Moore-Penrose and Fenchel-Young, per backend.

Cases: squared error, softmax cross-entropy with integer labels and with probability rows, sigmoid
BCE. Per-sample quantities are compared with direct formulas; the batch loss is their mean.
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_close, back, softmax, to
from secondorder import backends, losses
from secondorder.backends.bridge import alike
from secondorder.errors import LabelError, NonFiniteError, ShapeError

CASES = ["mse", "ce_int", "ce_prob", "bce"]
LOSS = {"mse": "mse", "ce_int": "softmax_cross_entropy", "ce_prob": "softmax_cross_entropy",
        "bce": "sigmoid_bce"}
M, K = 6, 4


def make(case, rng, m=M, k=K):
    """(loss, f, y) as NumPy arrays; y integer labels for ``ce_int``."""
    f = 2.0 * rng.standard_normal((m, k))
    if case == "mse":
        y = rng.standard_normal((m, k))
    elif case == "ce_int":
        y = rng.integers(0, k, size=m)
    elif case == "ce_prob":
        y = rng.dirichlet(np.ones(k), size=m)
        y[0] = np.eye(k)[1]  # a one-hot row among the probability rows
    else:
        y = rng.random((m, k))
        y[0] = rng.integers(0, 2, size=k)  # binary labels in one row
    return losses.get(LOSS[case]), f, y


def conv(backend, y):
    return backend.asarray(y) if y.dtype.kind in "iu" else to(backend, y)


def rows(case, y, k=K):
    return np.eye(k)[y] if case == "ce_int" else y


def sigmoid(f):
    return 1.0 / (1.0 + np.exp(-f))


def np_per_sample(case, f, y):
    if case == "mse":
        return 0.5 * np.sum((f - y) ** 2, axis=1)
    if case == "bce":
        return np.sum(np.logaddexp(0.0, f) - y * f, axis=1)
    shift = np.max(f, axis=1)
    lse = shift + np.log(np.sum(np.exp(f - shift[:, None]), axis=1))
    return lse - np.sum(f * rows(case, y, f.shape[1]), axis=1)


def np_grad(case, f, y):
    if case == "mse":
        return f - y
    if case == "bce":
        return sigmoid(f) - y
    return softmax(f) - rows(case, y, f.shape[1])


def np_hessian(case, f):
    m, k = f.shape
    if case == "mse":
        return np.broadcast_to(np.eye(k), (m, k, k)).copy()
    if case == "bce":
        s = sigmoid(f)
        return np.stack([np.diag(d) for d in s * (1.0 - s)])
    s = softmax(f)
    return np.stack([np.diag(si) - np.outer(si, si) for si in s])


def np_conjugate(case, a, y):
    if case == "mse":
        return np.sum(0.5 * a * a + a * y, axis=1)
    mu = rows(case, y, a.shape[1]) + a
    xlogx = np.where(mu > 0, mu * np.log(np.where(mu > 0, mu, 1.0)), 0.0)
    if case == "bce":
        nu = 1.0 - mu
        return np.sum(xlogx + np.where(nu > 0, nu * np.log(np.where(nu > 0, nu, 1.0)), 0.0), 1)
    return np.sum(xlogx, axis=1)


def bmv(H, v):
    return np.einsum("mij,mj->mi", H, v)


# ----------------------------------------------------------------------------- values, derivatives
@pytest.mark.parametrize("case", CASES)
def test_value_and_per_sample(backend, case, rng):
    loss, f, y = make(case, rng)
    fb, yb = to(backend, f), conv(backend, y)
    expected = np_per_sample(case, f, y)
    assert_close(loss.per_sample(fb, yb), expected, backend=backend)
    assert_close(loss.value(fb, yb), np.mean(expected), backend=backend)


@pytest.mark.parametrize("case", CASES)
def test_derivatives_match_formulas(backend, case, rng):
    loss, f, y = make(case, rng)
    v = rng.standard_normal(f.shape)
    fb, yb, vb = to(backend, f), conv(backend, y), to(backend, v)
    H = np_hessian(case, f)
    assert_close(loss.grad(fb, yb), np_grad(case, f, y), backend=backend)
    assert_close(loss.hvp(fb, yb, vb), bmv(H, v), backend=backend)
    assert_close(loss.hessian(fb, yb), H, backend=backend)
    S = back(backend, loss.hessian_sqrt(fb, yb))
    assert_close(S @ np.swapaxes(S, 1, 2), H)
    # the fused pair (one softmax for both) is the dense formulas too, and scaled by c
    grad, hvp = loss.grad_hvp_at(fb, yb)
    assert_close(grad, np_grad(case, f, y), backend=backend)
    assert_close(hvp(vb), bmv(H, v), backend=backend)
    scaled = losses.get(LOSS[case], scale=2.5)
    grad, hvp = scaled.grad_hvp_at(fb, yb)
    assert_close(grad, 2.5 * np_grad(case, f, y), backend=backend)
    assert_close(hvp(vb), 2.5 * bmv(H, v), backend=backend)


@pytest.mark.parametrize("case", CASES)
def test_grad_and_hvp_match_autodiff(ad_backend, case, rng):
    loss, f, y = make(case, rng)
    v = rng.standard_normal(f.shape)
    be = ad_backend
    fb, yb, vb = to(be, f), conv(be, y), to(be, v)

    def total(z):  # the targets in z's framework (torch's inside a derivative on CuPy)
        return backends.namespace(z).sum(loss.per_sample(z, alike(yb, z)))

    assert_close(loss.grad(fb, yb), back(be, be.grad(total, fb)), backend=be)
    hvp = back(be, be.hvp(total, fb, vb))
    assert_close(loss.hvp(fb, yb, vb), hvp, backend=be)
    assert_close(bmv(back(be, loss.hessian(fb, yb)), v), hvp)


# ------------------------------------------------------------------- pseudo-inverse and projector
@pytest.mark.parametrize("case", CASES)
def test_pinv_and_projector_match_moore_penrose(backend, case, rng):
    loss, f, y = make(case, rng)
    if case == "bce":
        f[1, :2] = [1000.0, -1000.0]  # saturated: s (1 - s) == 0 exactly, a singular H_i
    v = rng.standard_normal(f.shape)
    fb, yb, vb = to(backend, f), conv(backend, y), to(backend, v)
    with np.errstate(over="ignore"):
        H = np_hessian(case, f)
    Hp = np.linalg.pinv(H)
    assert_close(loss.pinv_hvp(fb, yb, vb), bmv(Hp, v), backend=backend)
    assert_close(loss.projector(fb, yb, vb), bmv(H @ Hp, v), backend=backend)


@pytest.mark.parametrize("case", ["ce_int", "ce_prob"])
def test_softmax_pinv_when_a_probability_underflows(backend, case, rng):
    """s_j == 0 exactly (a logit 800 below the others): H_i has a zero row and column j, and its
    Moore-Penrose inverse is finite; P D^{-1} P would divide by zero there."""
    loss, f, y = make(case, rng)
    f[0, 2] = f[0].max() - 800.0
    v = rng.standard_normal(f.shape)
    fb, yb, vb = to(backend, f), conv(backend, y), to(backend, v)
    H = np_hessian(case, f)
    assert softmax(f)[0, 2] == 0.0 and np.all(H[0, 2] == 0.0)
    Hp = np.linalg.pinv(H)
    assert_close(loss.pinv_hvp(fb, yb, vb), bmv(Hp, v), backend=backend)
    assert_close(loss.projector(fb, yb, vb), bmv(H @ Hp, v), backend=backend)


def _matrix(op, fb, yb, backend, k=K):
    """The per-sample matrices of a product v -> op(f, y, v), column by column, in NumPy."""
    cols = [back(backend, op(fb, yb, to(backend, np.tile(e, (M, 1))))) for e in np.eye(k)]
    return np.stack(cols, axis=2)


@pytest.mark.parametrize("case", ["ce_int", "ce_prob"])
def test_softmax_identities(backend, case, rng):
    loss, f, y = make(case, rng)
    fb, yb = to(backend, f), conv(backend, y)
    H = back(backend, loss.hessian(fb, yb))
    assert_close(bmv(H, np.ones((M, K))), np.zeros((M, K)))
    P = np.eye(K) - np.ones((K, K)) / K
    Hp = _matrix(loss.pinv_hvp, fb, yb, backend)
    assert_close(Hp, np.stack([P @ np.diag(1.0 / s) @ P for s in softmax(f)]))
    assert_close(H @ Hp, np.broadcast_to(P, (M, K, K)))
    assert_close(_matrix(loss.projector, fb, yb, backend), np.broadcast_to(P, (M, K, K)))
    assert_close(Hp @ H @ Hp, Hp)


# -------------------------------------------------------------------------------------- conjugate
@pytest.mark.parametrize("case", CASES)
def test_conjugate_fenchel_young(backend, case, rng):
    loss, f, y = make(case, rng)
    fb, yb = to(backend, f), conv(backend, y)
    a = np_grad(case, f, y)
    ab = to(backend, a)
    conj = back(backend, loss.conjugate(ab, yb))
    assert_close(conj, np_conjugate(case, a, y))
    lhs = back(backend, loss.per_sample(fb, yb)) + conj
    assert_close(lhs, np.sum(a * f, axis=1))  # equality at a = grad l(f)
    for _ in range(5):
        g = 3.0 * rng.standard_normal(f.shape)
        gap = back(backend, loss.per_sample(to(backend, g), yb)) + conj - np.sum(a * g, axis=1)
        assert np.all(gap >= -1e-12 * (1.0 + np.abs(conj))), gap


@pytest.mark.parametrize("case", ["ce_int", "ce_prob", "bce"])
def test_conjugate_is_infinite_off_the_domain(backend, case, rng):
    loss, f, y = make(case, rng)
    a = np_grad(case, f, y)
    a[0] += 0.5  # mu = y + a: row 0 no longer sums to 1 (CE) / leaves [0, 1] somewhere (BCE)
    if case == "bce":
        a[0, 0] = 1.5 - y[0, 0]
    a[1] -= 2.0 * rows(case, y)[1] + 1.0  # negative entries in mu
    conj = back(backend, loss.conjugate(to(backend, a), conv(backend, y)))
    assert np.all(np.isposinf(conj[:2])), conj
    assert np.all(np.isfinite(conj[2:])), conj


# --------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("case", CASES)
def test_sample_is_the_same_on_every_backend(backend, case, rng):
    loss, f, _ = make(case, rng, m=200)
    noise = loss.noise(f.shape, np.random.default_rng(7))
    ref = losses.get(LOSS[case]).sample(f, noise)  # the numpy backend
    got = backend.to_numpy(loss.sample(to(backend, f), backend.asarray(noise)))
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)
    if case == "ce_int":
        assert got.dtype.kind in "iu"
        loss.check(to(backend, f), loss.sample(to(backend, f), backend.asarray(noise)))


@pytest.mark.parametrize("case", ["mse", "ce_int", "bce"])
def test_sample_frequencies(case):
    n = 20000
    loss, row, _ = make(case, np.random.default_rng(3), m=1, k=5)
    f = np.repeat(row, n, axis=0)
    draws = np.asarray(loss.sample(f, loss.noise(f.shape, np.random.default_rng(11))))
    if case == "mse":
        se = 1.0 / np.sqrt(n)
        assert np.all(np.abs(draws.mean(axis=0) - row[0]) <= 4 * se)
        assert np.all(np.abs(draws.var(axis=0) - 1.0) <= 4 * np.sqrt(2.0) * se)
        return
    p = softmax(row)[0] if case == "ce_int" else sigmoid(row)[0]
    freq = np.bincount(draws, minlength=5) / n if case == "ce_int" else draws.mean(axis=0)
    assert np.all(np.abs(freq - p) <= 4 * np.sqrt(p * (1 - p) / n)), (freq, p)


# ----------------------------------------------------------------------------------------- checks
def _bad_targets(case, y):
    """(targets, error) pairs that ``check`` must reject."""
    out = []
    if case == "ce_int":
        out += [(np.where(np.arange(M) == 0, K, y), LabelError),
                (np.where(np.arange(M) == 0, -1, y), LabelError),
                (y.astype(np.float64), LabelError), (y[:-1], ShapeError)]
    elif case == "ce_prob":
        bad = y.copy()
        bad[2] *= 1.1
        neg = np.tile(np.array([1.5, -0.5, 0.0, 0.0]), (M, 1))
        nan = y.copy()
        nan[0, 0] = np.nan
        out += [(bad, LabelError), (neg, LabelError), (y[:, :-1], ShapeError),
                (nan, NonFiniteError)]
    else:
        nan = y.copy()
        nan[1, 1] = np.nan
        out += [(y[:-1], ShapeError), (nan, NonFiniteError)]
        if case == "bce":
            for value in (1.5, -0.25):
                bad = y.copy()
                bad[0, 0] = value
                out.append((bad, LabelError))
    return out


@pytest.mark.parametrize("case", CASES)
def test_check(backend, case, rng):
    loss, f, y = make(case, rng)
    fb, yb = to(backend, f), conv(backend, y)
    loss.check(fb, yb)  # valid input passes
    for bad, error in _bad_targets(case, y):
        with pytest.raises(error):
            loss.check(fb, conv(backend, bad))
    with pytest.raises(ShapeError):
        loss.check(to(backend, f.reshape(-1)), conv(backend, y))
    # outputs (m, k, 1): for cross-entropy a valid layout (one class at each of k positions),
    # whose labels (m, k) must be integers: probability rows read as labels are refused as such
    extra_axis = LabelError if case == "ce_prob" else ShapeError
    with pytest.raises(extra_axis):
        loss.check(to(backend, f[:, :, None]), conv(backend, y))
    nan = f.copy()
    nan[0, 0] = np.nan
    with pytest.raises(NonFiniteError):
        loss.check(to(backend, nan), yb)


def test_get():
    assert isinstance(losses.get("mse"), losses.MSE)
    assert isinstance(losses.get("softmax_cross_entropy"), losses.SoftmaxCrossEntropy)
    assert isinstance(losses.get("sigmoid_bce"), losses.SigmoidBCE)
    with pytest.raises(ValueError, match="unknown loss"):
        losses.get("hinge")


@pytest.mark.parametrize("name", ["jax", "torch"])
@pytest.mark.parametrize("loss", [losses.SoftmaxCrossEntropy(), losses.SigmoidBCE(),
                                  losses.MSE()], ids=lambda loss: type(loss).__name__)
def test_key_noise_of_half_precision_outputs_is_the_float32_noise_cast(name, loss):
    """Outputs of a layer computing in bfloat16 (mixed precision) get the float32 noise of the
    same key, cast: secondorder.random draws float32 and float64 only."""
    from secondorder import backends, random

    pytest.importorskip(name)
    b = backends.get(name)
    f = b.asarray(np.linspace(-1.0, 1.0, 12).reshape(4, 3), dtype="float32")
    half = b.xp.astype(f, b.xp.bfloat16)
    key = random.key(3, b)
    got = loss.key_noise(key, half)
    want = loss.key_noise(key, f)
    assert got.dtype == half.dtype
    assert bool(b.xp.all(got == b.xp.astype(want, half.dtype)))


def test_softmax_targets_of_the_wrong_layout_raise_named_errors(backend, rng):
    """Integer targets of shape (m, 1) or one-hot integer rows, rows of the wrong width and
    per-position scores in torch's layout (m, k, T) (the library takes the classes last)
    raise LabelError / ShapeError from the loss (a raw AttributeError from finfo of an integer
    dtype before)."""
    loss = losses.SoftmaxCrossEntropy()
    f = to(backend, rng.standard_normal((M, K)))
    labels = rng.integers(0, K, size=M)
    for bad in (labels[:, None], np.eye(K, dtype=np.int64)[labels]):
        with pytest.raises(LabelError, match="squeeze"):
            loss.value(f, conv(backend, bad))
    with pytest.raises(ShapeError, match="probability rows of shape"):
        loss.value(f, to(backend, rng.dirichlet(np.ones(K + 1), size=M)))
    with pytest.raises(ShapeError, match="axis 1.*movedim"):
        loss.value(to(backend, rng.standard_normal((M, K, 3))),
                   conv(backend, rng.integers(0, K, size=(M, 3))))


def test_boolean_one_hot_rows_and_labels_of_the_wrong_length_are_refused(backend, rng):
    """Boolean one-hot rows (LabelError, as integer ones) and labels whose length is not the
    batch's (ShapeError; NumPy and JAX broadcast a length-1 label silently otherwise)."""
    loss = losses.SoftmaxCrossEntropy()
    f = to(backend, rng.standard_normal((M, K)))
    labels = rng.integers(0, K, size=M)
    with pytest.raises(LabelError, match="squeeze"):
        loss.value(f, backend.asarray(np.eye(K, dtype=bool)[labels]))
    with pytest.raises(ShapeError, match="class labels of shape"):
        loss.value(f, conv(backend, labels[:1]))
