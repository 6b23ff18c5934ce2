"""LowRank (Woodbury, SMW-GN) and BlockDiagonal operators against dense NumPy matrices."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_close, flat, spd, to
from secondorder.errors import ShapeError, StructureError
from secondorder.linalg import (
    BlockDiagonal,
    Dense,
    Diagonal,
    Kronecker,
    LowRank,
    ScaledIdentity,
    Structure,
)


def block_diag(*ms):
    """Block-diagonal matrix, written out (no SciPy)."""
    out = np.zeros((sum(m.shape[0] for m in ms), sum(m.shape[1] for m in ms)))
    r = c = 0
    for m in ms:
        out[r:r + m.shape[0], c:c + m.shape[1]] = m
        r, c = r + m.shape[0], c + m.shape[1]
    return out


def unflat(v, like):
    """The tree shaped like ``like`` (dict, tuple or array of shapes) with coordinates v."""
    if isinstance(like, dict):
        keys = sorted(like)
        parts = unflat(v, tuple(like[k] for k in keys))
        return dict(zip(keys, parts))
    if isinstance(like, tuple) and all(isinstance(s, tuple) for s in like):
        out, start = [], 0
        for shape in like:
            n = int(np.prod(shape))
            out.append(v[start:start + n].reshape(shape))
            start += n
        return tuple(out)
    return v.reshape(like)


# ---------------------------------------------------------------- LowRank: (op, M, shapes)
N, R = 6, 2


def build_lowrank(name, backend, rng):
    B = lambda x: to(backend, x)  # noqa: E731
    U, V = rng.standard_normal((N, R)), rng.standard_normal((N, R))
    C = rng.standard_normal((R, R)) + 2.0 * np.eye(R)
    Cs = spd(rng, R)
    d = rng.uniform(0.5, 2.0, N)
    if name == "scaled_identity_sym":
        base = ScaledIdentity(0.7, B(np.zeros(N)))
        return LowRank(B(U), base=base), 0.7 * np.eye(N) + U @ U.T, (N,)
    if name == "scaled_identity_c":
        base = ScaledIdentity(1.5, B(np.zeros(N)))
        return LowRank(B(U), B(Cs), base=base), 1.5 * np.eye(N) + U @ Cs @ U.T, (N,)
    if name == "diagonal_uv":
        return LowRank(B(U), B(C), B(V), base=Diagonal(B(d))), np.diag(d) + U @ C @ V.T, (N,)
    if name == "diagonal_v_no_c":
        return LowRank(B(U), None, B(V), base=Diagonal(B(d))), np.diag(d) + U @ V.T, (N,)
    if name == "kronecker":
        A, G = spd(rng, 2), spd(rng, 3)
        op = LowRank(B(U), B(Cs), base=Kronecker(B(A), B(G), flat=True))
        return op, np.kron(A, G) + U @ Cs @ U.T, (N,)
    if name == "kronecker_uv":
        A, G = rng.standard_normal((2, 2)) + 3 * np.eye(2), spd(rng, 3)
        op = LowRank(B(U), B(C), B(V), base=Kronecker(B(A), B(G), flat=True))
        return op, np.kron(A, G) + U @ C @ V.T, (N,)
    if name == "diagonal_tree":
        dt = {"w": d[:4].reshape(2, 2), "b": d[4:]}
        shapes = {"w": (2, 2), "b": (2,)}
        op = LowRank(B(U), B(C), B(V), base=Diagonal(B(dt)))
        return op, np.diag(flat(dt)) + U @ C @ V.T, shapes
    if name == "no_base":
        return LowRank(B(U), B(C), B(V)), U @ C @ V.T, (N,)
    raise KeyError(name)


LOWRANK = ["scaled_identity_sym", "scaled_identity_c", "diagonal_uv", "diagonal_v_no_c",
           "kronecker", "kronecker_uv", "diagonal_tree", "no_base"]


@pytest.mark.parametrize("name", LOWRANK)
def test_lowrank_products(name, backend, rng):
    op, M, shapes = build_lowrank(name, backend, rng)
    x, u = rng.standard_normal(N), rng.standard_normal(N)
    assert_close(op.to_dense(), M, backend=backend)
    assert_close(op @ to(backend, unflat(x, shapes)), unflat(M @ x, shapes), backend=backend)
    assert_close(op.rmatvec(to(backend, unflat(u, shapes))), unflat(M.T @ u, shapes),
                 backend=backend)
    assert_close(op.diagonal(), unflat(np.diag(M).copy(), shapes), backend=backend)
    assert_close(op.T.to_dense(), M.T, backend=backend)
    assert_close(op.T @ to(backend, unflat(u, shapes)), unflat(M.T @ u, shapes), backend=backend)


@pytest.mark.parametrize("name", [n for n in LOWRANK if n != "no_base"])
def test_woodbury_inverse(name, backend, rng):
    op, M, shapes = build_lowrank(name, backend, rng)
    M_inv = np.linalg.inv(M)
    x = rng.standard_normal(N)
    inv = op.inv()
    assert_close(inv.to_dense(), M_inv, backend=backend)
    assert_close(inv @ to(backend, unflat(x, shapes)), unflat(M_inv @ x, shapes),
                 backend=backend)
    assert_close(inv.T.to_dense(), M_inv.T, backend=backend)


def test_lowrank_without_base_not_invertible(backend, rng):
    op, _, _ = build_lowrank("no_base", backend, rng)
    with pytest.raises(ShapeError):
        op.inv()


def test_smw_gn_identity(backend, rng):
    """(5.6): (lam I + J^T H J / N)^{-1} = (1/lam)(I - J^T D^{-1} J / N),
    D = lam H^{-1} + J J^T / N."""
    n_samples, m_out, p, lam = 3, 2, 10, 0.4
    J = rng.standard_normal((n_samples * m_out, p))
    H = spd(rng, n_samples * m_out, cond=5.0)
    dense = np.linalg.inv(lam * np.eye(p) + J.T @ H @ J / n_samples)
    D = lam * np.linalg.inv(H) + J @ J.T / n_samples
    smw = (np.eye(p) - J.T @ np.linalg.solve(D, J) / n_samples) / lam
    np.testing.assert_allclose(smw, dense, rtol=0, atol=1e-12 * np.abs(dense).max())
    op = LowRank(to(backend, J.T), to(backend, H / n_samples),
                 base=ScaledIdentity(lam, to(backend, np.zeros(p))))
    inv = op.inv()
    assert_close(inv.to_dense(), dense, backend=backend)
    assert_close(inv.to_dense(), smw, backend=backend)
    g = rng.standard_normal(p)
    assert_close(inv @ to(backend, g), smw @ g, backend=backend)


def test_lowrank_bad_shapes(backend, rng):
    U = to(backend, rng.standard_normal((N, R)))
    with pytest.raises(ShapeError):
        LowRank(U, None, to(backend, rng.standard_normal((N, R + 1))))
    with pytest.raises(ShapeError):
        LowRank(U, to(backend, np.eye(R + 1)))
    with pytest.raises(ShapeError):
        LowRank(U, base=ScaledIdentity(1.0, to(backend, np.zeros(N + 1))))


# ---------------------------------------------------------------- BlockDiagonal: (op, M, shapes)
def build_block(name, backend, rng):
    B = lambda x: to(backend, x)  # noqa: E731
    S3, A2, G3 = spd(rng, 3), spd(rng, 2), spd(rng, 3)
    d2 = rng.uniform(0.5, 2.0, 2)
    if name == "tuple_square":
        blocks = [Dense(B(S3)), Diagonal(B(d2)), Kronecker(B(A2), B(G3))]
        shapes = ((3,), (2,), (2, 3))
        return BlockDiagonal(blocks), block_diag(S3, np.diag(d2), np.kron(A2, G3)), shapes, shapes
    if name == "tuple_rect":
        R1, R2 = rng.standard_normal((2, 3)), rng.standard_normal((3, 2))
        blocks = [Dense(B(R1)), Kronecker(B(R2), B(G3))]
        return (BlockDiagonal(blocks), block_diag(R1, np.kron(R2, G3)),
                ((3,), (2, 3)), ((2,), (3, 3)))
    if name == "groups_dict":  # canonical leaves: 0 = "b" (2,), 1 = "w" (2, 3)
        like = {"w": np.zeros((2, 3)), "b": np.zeros(2)}
        op = BlockDiagonal([Kronecker(B(A2), B(G3)), Diagonal(B(d2))], groups=[[1], [0]],
                           like=B(like))
        shapes = {"w": (2, 3), "b": (2,)}
        return op, block_diag(np.diag(d2), np.kron(A2, G3)), shapes, shapes
    if name == "groups_three":  # canonical leaves: 0 = "a" (3,), 1 = "b" (2, 2), 2 = "c" (2,)
        shapes = {"a": (3,), "b": (2, 2), "c": (2,)}
        like = {k: np.zeros(s) for k, s in shapes.items()}
        M5 = rng.standard_normal((5, 5)) + 3 * np.eye(5)
        Mb = spd(rng, 4)
        blk0 = Dense(B(M5), Structure.of(B((like["a"], like["c"]))))
        op = BlockDiagonal([blk0, Dense(B(Mb), Structure.of(B(like["b"])))],
                           groups=[[0, 2], [1]], like=B(like))
        M = np.zeros((9, 9))
        idx0, idx1 = [0, 1, 2, 7, 8], [3, 4, 5, 6]
        M[np.ix_(idx0, idx0)], M[np.ix_(idx1, idx1)] = M5, Mb
        return op, M, shapes, shapes
    raise KeyError(name)


BLOCKS = ["tuple_square", "tuple_rect", "groups_dict", "groups_three"]


@pytest.mark.parametrize("name", BLOCKS)
def test_block_products(name, backend, rng):
    op, M, in_shapes, out_shapes = build_block(name, backend, rng)
    x, u = rng.standard_normal(M.shape[1]), rng.standard_normal(M.shape[0])
    assert op.shape == M.shape
    assert_close(op.to_dense(), M, backend=backend)
    assert_close(op @ to(backend, unflat(x, in_shapes)), unflat(M @ x, out_shapes),
                 backend=backend)
    assert_close(op.rmatvec(to(backend, unflat(u, out_shapes))), unflat(M.T @ u, in_shapes),
                 backend=backend)
    assert_close(op.T.to_dense(), M.T, backend=backend)
    assert_close(op.T @ to(backend, unflat(u, out_shapes)), unflat(M.T @ u, in_shapes),
                 backend=backend)


@pytest.mark.parametrize("name", [b for b in BLOCKS if b != "tuple_rect"])
def test_block_inverse_and_diagonal(name, backend, rng):
    op, M, shapes, _ = build_block(name, backend, rng)
    M_inv = np.linalg.inv(M)
    x = rng.standard_normal(M.shape[0])
    assert_close(op.diagonal(), unflat(np.diag(M).copy(), shapes), backend=backend)
    inv = op.inv()
    assert_close(inv.to_dense(), M_inv, backend=backend)
    assert_close(inv @ to(backend, unflat(x, shapes)), unflat(M_inv @ x, shapes), backend=backend)


@pytest.mark.parametrize("groups", [[[0]], [[0, 0], [1]], [[0], [2]], [[0], [1], [1]]])
def test_bad_groups(groups, backend, rng):
    like = to(backend, {"w": np.zeros((2, 3)), "b": np.zeros(2)})
    blocks = [Diagonal(to(backend, np.ones(2)))] * len(groups)
    with pytest.raises(StructureError):
        BlockDiagonal(blocks, groups=groups, like=like)


def test_block_wrong_shape(backend, rng):
    like = to(backend, {"w": np.zeros((2, 3)), "b": np.zeros(2)})
    blocks = [Diagonal(to(backend, np.ones(3))), Dense(to(backend, np.eye(6)))]
    with pytest.raises(ShapeError):
        BlockDiagonal(blocks, groups=[[0], [1]], like=like)
