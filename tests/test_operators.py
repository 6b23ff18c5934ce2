"""Dense, diagonal, matrix-free and composite operators against dense float64 NumPy oracles."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_close, flat, to
from secondorder.errors import MixedBackendError, ShapeError, StructureError
from secondorder.linalg import (
    Adjoint,
    Dense,
    Diagonal,
    FunctionOperator,
    Identity,
    ScaledIdentity,
    Structure,
    is_symmetric,
)

TREE_SHAPES = {"w": (2, 3), "b": (2,)}  # canonical order: "b" (2 entries) then "w" (6 entries)


# ------------------------------------------------------------------ independent NumPy oracles
def unflat(v, like):
    """Inverse of ``flat``: the NumPy tree shaped like ``like`` with coordinates ``v``."""
    if not isinstance(like, dict):
        return np.reshape(v, np.shape(like))
    out, start = {}, 0
    for k in sorted(like):
        n = int(np.prod(np.shape(like[k])))
        out[k] = np.reshape(v[start:start + n], np.shape(like[k]))
        start += n
    return out


def rand_like(rng, like):
    if isinstance(like, dict):
        return {k: rng.standard_normal(np.shape(a)) for k, a in like.items()}
    return rng.standard_normal(np.shape(like))


def tree_like():
    return {k: np.zeros(s) for k, s in TREE_SHAPES.items()}


# ------------------------------------------------------- cases: (op, M, in_like, out_like)
def _mats(rng):
    a = rng.standard_normal((4, 3))
    s = rng.standard_normal((4, 4)) + 4.0 * np.eye(4)  # invertible, not symmetric
    sym = s + s.T
    d = rng.uniform(0.5, 2.0, 4)
    dt = {k: rng.uniform(0.5, 2.0, sh) for k, sh in TREE_SHAPES.items()}
    m8 = rng.standard_normal((8, 8)) + 5.0 * np.eye(8)
    return a, s, sym, d, dt, m8


def build(name, backend, rng):
    a, s, sym, d, dt, m8 = _mats(rng)
    v4, v3, tl = np.zeros(4), np.zeros(3), tree_like()
    B = lambda x: to(backend, x)  # noqa: E731
    if name == "dense_rect":
        return Dense(B(a)), a, v3, v4
    if name == "dense_square":
        return Dense(B(s)), s, v4, v4
    if name == "dense_tree":
        return Dense(B(m8), Structure.of(B(tl))), m8, tl, tl
    if name == "identity_tree":
        return Identity(B(tl)), np.eye(8), tl, tl
    if name == "scaled_identity":
        return ScaledIdentity(2.5, B(tl)), 2.5 * np.eye(8), tl, tl
    if name == "diagonal":
        return Diagonal(B(d)), np.diag(d), v4, v4
    if name == "diagonal_tree":
        return Diagonal(B(dt)), np.diag(flat(dt)), tl, tl
    if name == "function_rect":
        ab = B(a)
        op = FunctionOperator(lambda v: ab @ v, B(v3), out_like=B(v4),
                              rmatvec=lambda u: backend.xp.linalg.matrix_transpose(ab) @ u)
        return op, a, v3, v4
    if name == "function_sym":
        sb = B(sym)
        return FunctionOperator(lambda v: sb @ v, B(v4), symmetric=True), sym, v4, v4
    if name == "sum":
        return Dense(B(s)) + Diagonal(B(d)), s + np.diag(d), v4, v4
    if name == "difference":
        op = Dense(B(m8), Structure.of(B(tl))) - ScaledIdentity(2.0, B(tl))
        return op, m8 - 2 * np.eye(8), tl, tl
    if name == "product_rect":
        return Dense(B(a.T)) @ Dense(B(s)), a.T @ s, v4, v3
    if name == "product_square":
        return Dense(B(s)) @ Diagonal(B(d)), s @ np.diag(d), v4, v4
    if name == "scaled_left":
        return 3.0 * Dense(B(s)), 3.0 * s, v4, v4
    if name == "scaled_right":
        return Dense(B(a)) * -0.5, -0.5 * a, v3, v4
    if name == "divided":
        return Diagonal(B(dt)) / 4.0, np.diag(flat(dt)) / 4.0, tl, tl
    if name == "negated":
        return -Dense(B(s)), -s, v4, v4
    if name == "transposed":
        return Dense(B(a)).T, a.T, v4, v3
    if name == "adjoint":
        return Adjoint(Dense(B(s))), s.T, v4, v4
    if name == "adjoint_function":
        ab = B(a)
        op = FunctionOperator(lambda v: ab @ v, B(v3), out_like=B(v4),
                              rmatvec=lambda u: backend.xp.linalg.matrix_transpose(ab) @ u)
        return op.T, a.T, v4, v3
    if name == "nested":
        op = (2.0 * Dense(B(s)) + Diagonal(B(d))) @ Dense(B(s)).T - Dense(B(sym)) / 2.0
        return op, (2 * s + np.diag(d)) @ s.T - sym / 2, v4, v4
    raise KeyError(name)


CASES = ["dense_rect", "dense_square", "dense_tree", "identity_tree", "scaled_identity",
         "diagonal", "diagonal_tree", "function_rect", "function_sym", "sum", "difference",
         "product_rect", "product_square", "scaled_left", "scaled_right", "divided", "negated",
         "transposed", "adjoint", "adjoint_function", "nested"]
SQUARE = [c for c in CASES if c not in ("dense_rect", "function_rect", "product_rect",
                                        "scaled_right", "transposed", "adjoint_function")]
INVERTIBLE = ["dense_square", "dense_tree", "identity_tree", "scaled_identity", "diagonal",
              "diagonal_tree", "product_square", "scaled_left", "divided", "negated", "adjoint"]


@pytest.mark.parametrize("name", CASES)
def test_products_and_dense(name, backend, rng):
    op, m, in_like, out_like = build(name, backend, rng)
    x, u = rand_like(rng, in_like), rand_like(rng, out_like)
    assert op.shape == m.shape
    assert_close(op.to_dense(), m, backend=backend)
    assert_close(op.matvec(to(backend, x)), unflat(m @ flat(x), out_like), backend=backend)
    assert_close(op @ to(backend, x), unflat(m @ flat(x), out_like), backend=backend)
    assert_close(op.rmatvec(to(backend, u)), unflat(m.T @ flat(u), in_like), backend=backend)


@pytest.mark.parametrize("name", CASES)
def test_transpose(name, backend, rng):
    op, m, in_like, out_like = build(name, backend, rng)
    u, x = rand_like(rng, out_like), rand_like(rng, in_like)
    t = op.T
    assert t.shape == m.T.shape
    assert_close(t.to_dense(), m.T, backend=backend)
    assert_close(t.matvec(to(backend, u)), unflat(m.T @ flat(u), in_like), backend=backend)
    assert_close(t.rmatvec(to(backend, x)), unflat(m @ flat(x), out_like), backend=backend)
    assert_close(t.T.to_dense(), m, backend=backend)


@pytest.mark.parametrize("name", SQUARE)
def test_diagonal(name, backend, rng):
    op, m, in_like, _ = build(name, backend, rng)
    assert_close(op.diagonal(), unflat(np.diag(m).copy(), in_like), backend=backend)


@pytest.mark.parametrize("name", INVERTIBLE)
def test_inverse(name, backend, rng):
    op, m, in_like, _ = build(name, backend, rng)
    m_inv = np.linalg.inv(m)
    x = rand_like(rng, in_like)
    inv = op.inv()
    assert_close(inv.to_dense(), m_inv, backend=backend)
    assert_close(inv.matvec(to(backend, x)), unflat(m_inv @ flat(x), in_like), backend=backend)
    assert_close(inv.T.to_dense(), m_inv.T, backend=backend)


@pytest.mark.parametrize("p", [-1.0, -0.5, 2.0])
def test_diagonal_powers(p, backend, rng):
    _, _, _, _, dt, _ = _mats(rng)
    expected = np.diag(flat(dt) ** p)
    assert_close(Diagonal(to(backend, dt)).power(p).to_dense(), expected, backend=backend)
    si = ScaledIdentity(2.5, to(backend, tree_like())).power(p)
    assert_close(si.to_dense(), 2.5**p * np.eye(8), backend=backend)


@pytest.mark.parametrize("name", ["sum", "function_sym"])
def test_no_closed_form_inverse(name, backend, rng):
    op, _, _, _ = build(name, backend, rng)
    with pytest.raises(NotImplementedError):
        op.inv()


@pytest.mark.parametrize("name", CASES)
def test_is_symmetric_is_sound(name, backend, rng):
    """Whenever an operator claims symmetry, its dense matrix is symmetric."""
    op, m, _, _ = build(name, backend, rng)
    if is_symmetric(op):
        assert m.shape[0] == m.shape[1]
        np.testing.assert_allclose(m, m.T, rtol=0, atol=1e-12 * np.abs(m).max())


def test_is_symmetric_answers(backend, rng):
    _, s, sym, d, dt, _ = _mats(rng)
    B = lambda x: to(backend, x)  # noqa: E731
    assert not np.allclose(s, s.T) and np.allclose(sym, sym.T)
    assert is_symmetric(Dense(B(sym), symmetric=True))
    assert not is_symmetric(Dense(B(s)))
    assert is_symmetric(Diagonal(B(dt)))
    assert is_symmetric(ScaledIdentity(3.0, B(d)))
    assert is_symmetric(Dense(B(sym), symmetric=True) + 2.0 * Diagonal(B(d)))
    assert not is_symmetric(Dense(B(s)) + Diagonal(B(d)))
    assert is_symmetric(Dense(B(sym), symmetric=True).T)
    assert is_symmetric(FunctionOperator(lambda v: v, B(d), symmetric=True))
    assert not is_symmetric(FunctionOperator(lambda v: v, B(d)))


# ------------------------------------------------------------------ structure errors
def test_matvec_wrong_shape(backend, rng):
    a = rng.standard_normal((4, 3))
    op = Dense(to(backend, a))
    with pytest.raises(ShapeError):
        op.matvec(to(backend, rng.standard_normal(4)))
    with pytest.raises(ShapeError):
        op.rmatvec(to(backend, rng.standard_normal(3)))
    with pytest.raises(ShapeError):
        Diagonal(to(backend, rand_like(rng, tree_like()))).matvec(
            to(backend, {"w": rng.standard_normal((3, 2)), "b": rng.standard_normal(2)}))


def test_matvec_wrong_tree(backend, rng):
    op = Diagonal(to(backend, rand_like(rng, tree_like())))
    # a 1-D array of the operator's size (8) is its flat coordinates; one of another length is
    # neither a flat vector nor a tree of the operator's structure
    with pytest.raises(StructureError):
        op.matvec(to(backend, rng.standard_normal(7)))
    with pytest.raises(StructureError):
        op.matvec(to(backend, {"w": rng.standard_normal((2, 3)), "c": rng.standard_normal(2)}))
    with pytest.raises(StructureError):
        Dense(to(backend, rng.standard_normal((8, 8)))).matvec(to(backend, tree_like()))


def test_incompatible_algebra(backend, rng):
    tl = to(backend, tree_like())
    with pytest.raises(ShapeError):
        Dense(to(backend, np.eye(4))) + Dense(to(backend, np.eye(3)))
    with pytest.raises(ShapeError):  # same size 8, different structure
        Identity(tl) + Dense(to(backend, np.eye(8)))
    with pytest.raises(ShapeError):
        Dense(to(backend, rng.standard_normal((4, 3)))) @ Dense(to(backend, np.eye(4)))


def test_dense_needs_matrix(backend, rng):
    with pytest.raises(ShapeError):
        Dense(to(backend, rng.standard_normal(4)))


def test_dense_structure_size_mismatch(backend, rng):
    with pytest.raises(ShapeError):
        Dense(to(backend, np.eye(7)), Structure.of(to(backend, tree_like())))


def test_mixed_frameworks_matvec(rng):
    torch = pytest.importorskip("torch")
    op = Dense(rng.standard_normal((3, 3)))
    v = torch.as_tensor(rng.standard_normal(3))
    with pytest.raises(MixedBackendError):
        op @ v
    with pytest.raises(MixedBackendError):
        op.rmatvec(v)


def test_mixed_frameworks_algebra(rng):
    torch = pytest.importorskip("torch")
    t = torch.as_tensor(rng.standard_normal((3, 3)))
    with pytest.raises(MixedBackendError):
        Dense(rng.standard_normal((3, 3))) + Dense(t)
    with pytest.raises(MixedBackendError):
        Dense(rng.standard_normal((3, 3))) @ Dense(t)
