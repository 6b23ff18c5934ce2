"""Kronecker operators against np.kron, and the identities of the Kronecker-family sheet.

Row-major convention: Kronecker(A_1, ..., A_k) acts on a tensor X of shape (n_1, ..., n_k) as
np.kron(A_1, ..., A_k) @ X.ravel(); for k = 2 that is A X B^T.
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_close, dense_kron, spd, to
from secondorder.errors import ShapeError
from secondorder.linalg import Kronecker, mode_products

RECT_SHAPES = {1: [(3, 4)], 2: [(3, 2), (2, 4)], 3: [(2, 3), (3, 2), (2, 4)]}
SQUARE_DIMS = {1: [4], 2: [3, 4], 3: [2, 3, 4]}
LAM = 0.3


def rect_factors(rng, k):
    return [rng.standard_normal(s) for s in RECT_SHAPES[k]]


def spd_factors(rng, k):
    return [spd(rng, n, cond=10.0) for n in SQUARE_DIMS[k]]


def eig_power(m, s):
    """m^s of a symmetric PD matrix through NumPy's eigendecomposition."""
    w, q = np.linalg.eigh(m)
    return (q * w**s) @ q.T


def apply(m, x, out_dims, flat):
    """np matrix m applied to row-major vec~(x), shaped back into the tensor (or flat) form."""
    y = m @ np.ravel(x)
    return y if flat else y.reshape(out_dims)


def vec_in(rng, dims, flat):
    x = rng.standard_normal(dims)
    return x.ravel() if flat else x


def make(backend, factors, flat, **kw):
    return Kronecker(*to(backend, list(factors)), flat=flat, **kw)


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_rectangular(k, flat, backend, rng):
    fs = rect_factors(rng, k)
    K = dense_kron(*fs)
    m_dims, n_dims = tuple(f.shape[0] for f in fs), tuple(f.shape[1] for f in fs)
    op = make(backend, fs, flat)
    assert op.shape == K.shape
    x, u = vec_in(rng, n_dims, flat), vec_in(rng, m_dims, flat)
    assert_close(op.to_dense(), K, backend=backend)
    assert_close(op @ to(backend, x), apply(K, x, m_dims, flat), backend=backend)
    assert_close(op.rmatvec(to(backend, u)), apply(K.T, u, n_dims, flat), backend=backend)
    assert_close(op.T.to_dense(), K.T, backend=backend)
    assert_close(op.T @ to(backend, u), apply(K.T, u, n_dims, flat), backend=backend)


def test_two_factor_is_a_x_bt(backend, rng):
    A, B = rng.standard_normal((3, 2)), rng.standard_normal((5, 4))
    X = rng.standard_normal((2, 4))
    assert_close(make(backend, [A, B], False) @ to(backend, X), A @ X @ B.T, backend=backend)


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_square_diagonal_and_inverse(k, flat, backend, rng):
    fs = spd_factors(rng, k)
    K = dense_kron(*fs)
    dims = tuple(SQUARE_DIMS[k])
    op = make(backend, fs, flat)
    diag = np.diag(K).copy()
    assert_close(op.diagonal(), diag if flat else diag.reshape(dims), backend=backend)
    x = vec_in(rng, dims, flat)
    inv = op.inv()
    assert_close(inv.to_dense(), np.linalg.inv(K), backend=backend)
    assert_close(inv @ to(backend, x), apply(np.linalg.inv(K), x, dims, flat), backend=backend)


def test_column_major_inverse_identity(backend, rng):
    """(A (x) G)^{-1} vec(V) = vec(G^{-1} V A^{-1}) (column-major vec, K-FAC convention)."""
    A, G = spd(rng, 3), spd(rng, 4)
    V = rng.standard_normal((4, 3))
    expected = np.linalg.inv(G) @ V @ np.linalg.inv(A)
    lhs = np.linalg.solve(np.kron(A, G), V.flatten(order="F"))
    np.testing.assert_allclose(lhs, expected.flatten(order="F"), rtol=1e-12, atol=1e-12)
    out = make(backend, [A, G], False).inv() @ to(backend, V.T)
    assert_close(out, expected.T, backend=backend)


@pytest.mark.parametrize("flat", [False, True])
def test_mode_product_identity(flat, backend, rng):
    """(U_1 (x) U_2 (x) U_3) vec~(G) = vec~(G x_1 U_1 x_2 U_2 x_3 U_3)."""
    Us = rect_factors(rng, 3)
    G = rng.standard_normal(tuple(u.shape[1] for u in Us))
    by_modes = np.einsum("abc,ia,jb,kc->ijk", G, *Us)
    np.testing.assert_allclose(dense_kron(*Us) @ G.ravel(), by_modes.ravel(), rtol=1e-12)
    expected = by_modes.ravel() if flat else by_modes
    x = G.ravel() if flat else G
    assert_close(make(backend, Us, flat) @ to(backend, x), expected, backend=backend)
    Ub, Gb = to(backend, Us), to(backend, G)
    assert_close(mode_products(Gb, Ub, backend.xp), by_modes, backend=backend)
    by_t = np.einsum("ijk,ia,jb,kc->abc", by_modes, *Us)
    assert_close(mode_products(to(backend, by_modes), Ub, backend.xp, transpose=True), by_t,
                 backend=backend)


@pytest.mark.parametrize("s", [-1.0, -0.5, 0.25])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_power(k, s, backend, rng):
    fs = spd_factors(rng, k)
    K = dense_kron(*fs)
    expected = eig_power(K, s)
    np.testing.assert_allclose(dense_kron(*(eig_power(f, s) for f in fs)), expected, atol=1e-12)
    assert_close(make(backend, fs, True).power(s).to_dense(), expected, backend=backend)
    x = rng.standard_normal(tuple(SQUARE_DIMS[k]))
    assert_close(make(backend, fs, False).power(s) @ to(backend, x),
                 (expected @ x.ravel()).reshape(x.shape), backend=backend)


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_damped_inverse_exact(k, flat, backend, rng):
    fs = spd_factors(rng, k)
    K = dense_kron(*fs)
    expected = np.linalg.inv(K + LAM * np.eye(K.shape[0]))
    dims = tuple(SQUARE_DIMS[k])
    op = make(backend, fs, flat).damped_inverse(LAM, method="exact")
    assert_close(op.to_dense(), expected, backend=backend)
    x = vec_in(rng, dims, flat)
    assert_close(op @ to(backend, x), apply(expected, x, dims, flat), backend=backend)


def test_damped_inverse_pi_two_factors(backend, rng):
    """K-FAC's split: (A + pi sqrt(lam) I)^{-1} (x) (G + sqrt(lam)/pi I)^{-1}."""
    A, G = spd(rng, 3) * 5.0, spd(rng, 4)
    pi = np.sqrt((np.trace(A) / 3) / (np.trace(G) / 4))
    r = np.sqrt(LAM)
    expected = np.kron(np.linalg.inv(A + pi * r * np.eye(3)), np.linalg.inv(G + r / pi * np.eye(4)))
    op = make(backend, [A, G], True).damped_inverse(LAM, method="pi")
    assert_close(op.to_dense(), expected, backend=backend)
    default = make(backend, [A, G], True).damped_inverse(LAM)
    assert_close(default.to_dense(), expected, backend=backend)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_damped_inverse_pi_k_factors(k, backend, rng):
    """The k-way generalisation: factor i gets t_i / (prod_j t_j)^{1/k} lam^{1/k}."""
    fs = [f * c for f, c in zip(spd_factors(rng, k), (1.0, 4.0, 0.5))]
    t = np.array([np.trace(f) / f.shape[0] for f in fs])
    d = t / np.prod(t) ** (1.0 / k) * LAM ** (1.0 / k)
    assert np.isclose(np.prod(d), LAM)
    expected = dense_kron(*(np.linalg.inv(f + di * np.eye(len(f))) for f, di in zip(fs, d)))
    op = make(backend, fs, True).damped_inverse(LAM, method="pi")
    assert_close(op.to_dense(), expected, backend=backend)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_damped_inverse_equal(k, backend, rng):
    fs = spd_factors(rng, k)
    d = LAM ** (1.0 / k)
    expected = dense_kron(*(np.linalg.inv(f + d * np.eye(len(f))) for f in fs))
    op = make(backend, fs, True).damped_inverse(LAM, method="equal")
    assert_close(op.to_dense(), expected, backend=backend)


def test_damped_inverse_unknown_method(backend, rng):
    with pytest.raises(ValueError):
        make(backend, spd_factors(rng, 2), True).damped_inverse(LAM, method="bogus")


@pytest.mark.parametrize("k", [1, 2, 3])
def test_eigendecomposition(k, backend, rng):
    fs = spd_factors(rng, k)
    K = dense_kron(*fs)
    n = K.shape[0]
    eig = make(backend, fs, True).eigendecomposition()
    x = rng.standard_normal(n)
    assert_close(eig.to_dense(), K, backend=backend)
    assert_close(eig @ to(backend, x), K @ x, backend=backend)
    assert_close(eig.T.to_dense(), K, backend=backend)
    assert_close(eig.inv().to_dense(), np.linalg.inv(K), backend=backend)
    assert_close(eig.power(-0.5).to_dense(), eig_power(K, -0.5), backend=backend)
    assert_close(eig.power(0.5).power(-2.0).to_dense(), np.linalg.inv(K), backend=backend)
    shifted = eig.shifted(LAM)
    assert_close(shifted.to_dense(), K + LAM * np.eye(n), backend=backend)
    assert_close(shifted.shifted(LAM).to_dense(), K + 2 * LAM * np.eye(n), backend=backend)
    assert_close(shifted.power(0.25).to_dense(), eig_power(K + LAM * np.eye(n), 0.25),
                 backend=backend)
    spectrum = np.sort(backend.to_numpy(shifted.spectrum()).ravel())
    np.testing.assert_allclose(spectrum, np.linalg.eigvalsh(K) + LAM, rtol=1e-12)
    with pytest.raises(ValueError):
        eig.power(2.0).shifted(LAM)


@pytest.mark.parametrize("method", ["inv", "power", "diagonal", "damped_inverse",
                                    "eigendecomposition"])
def test_rectangular_refuses_square_only(method, backend, rng):
    op = make(backend, rect_factors(rng, 2), False)
    args = {"power": (0.5,), "damped_inverse": (LAM,)}.get(method, ())
    with pytest.raises(ShapeError):
        getattr(op, method)(*args)
