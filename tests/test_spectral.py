"""Spectral tools against dense float64 oracles: eigsh (ours and SciPy's on ``op.to_scipy()``),
Lanczos, flat-vector products, vectorised ``to_dense`` and Hutchinson's estimators.

The oracle Hessian is ``autograd.hessian`` of the mean softmax cross-entropy of a small MLP on a
flat parameter vector (not through ``secondorder``'s linearisation); its eigenvalues come from
``numpy.linalg.eigvalsh``.
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_close, back, to
from secondorder import backends, losses, random, tree
from secondorder.curvature import GGN, KFAC, Hessian, Jacobian
from secondorder.errors import ShapeError
from secondorder.linalg import (
    Dense,
    Diagonal,
    ScaledIdentity,
    eigsh,
    hutchinson_diagonal,
    hutchinson_trace,
    lanczos,
    rademacher,
)
from secondorder.models import MLP

autograd = pytest.importorskip("autograd")
anp = autograd.numpy
sla = pytest.importorskip("scipy.sparse.linalg")

SIZES = [4, 6, 3]  # 51 parameters
M = 8


def _problem(backend):
    rng = np.random.default_rng(7)
    model = MLP(SIZES, "tanh")
    x = rng.standard_normal((M, SIZES[0]))
    y = rng.integers(0, SIZES[-1], M)
    params = model.init(0, backend)
    return model, losses.SoftmaxCrossEntropy(), params, (to(backend, x), backend.asarray(y)), x, y


@pytest.fixture(scope="module")
def oracle():
    """The dense Hessian of the mean loss by autograd on the flat parameter vector."""
    model, _, params, _, x, y = _problem(backends.get("numpy"))
    flat, unravel = tree.ravel(params)

    def mean_loss(w):
        f = model.apply(unravel(w), x)
        mx = anp.max(f, axis=1, keepdims=True)
        lse = anp.log(anp.sum(anp.exp(f - mx), axis=1)) + mx[:, 0]
        return anp.mean(lse - f[np.arange(M), y])

    h = autograd.hessian(mean_loss)(flat)
    return 0.5 * (h + h.T)


def _hessian(backend):
    model, loss, params, batch, _, _ = _problem(backend)
    return Hessian(model, loss, params, batch)


# ------------------------------------------------------------------ eigsh and Lanczos
@pytest.mark.slow
def test_eigsh_top3_matches_dense_hessian(ad_backend, oracle):
    """The issue's criterion: ours and SciPy's eigsh on to_scipy() give the top 3 eigenvalues of
    the dense float64 Hessian to 1e-8."""
    ref = np.linalg.eigvalsh(oracle)[-3:]
    op = _hessian(ad_backend)
    ours = back(ad_backend, eigsh(op, 3, "LA", return_eigenvectors=False))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-8)
    theirs = np.sort(sla.eigsh(op.to_scipy(), k=3, which="LA", return_eigenvectors=False))
    np.testing.assert_allclose(theirs, ref, rtol=0, atol=1e-8)


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_eigsh_pairs(ad_backend, oracle, which):
    """Values in ascending order, unit eigenvectors with H v = lambda v, as trees and flat."""
    full = np.linalg.eigvalsh(oracle)
    order = {"LA": np.argsort(full)[-2:], "SA": np.argsort(full)[:2],
             "LM": np.argsort(np.abs(full))[-2:]}[which]
    ref = np.sort(full[order])
    op = _hessian(ad_backend)
    values, vectors, info = eigsh(op, 2, which, info=True)
    assert info.converged and info.iterations <= op.shape[0]
    np.testing.assert_allclose(back(ad_backend, values), ref, rtol=0, atol=1e-8)
    _, flat = eigsh(op, 2, which, flat=True)
    flat = back(ad_backend, flat)
    for j, v in enumerate(vectors):
        v = tree.ravel(back(ad_backend, v))[0]
        np.testing.assert_allclose(v, flat[:, j], rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.linalg.norm(v), 1.0, atol=1e-10)
        np.testing.assert_allclose(oracle @ v, ref[j] * v, rtol=0, atol=1e-7)


def test_lanczos_relation(ad_backend, oracle):
    """A Q = Q T + beta_m q_(m+1) e_m^T with Q orthonormal, and the same numbers on every
    backend (the same start vector from secondorder.random)."""
    op = _hessian(ad_backend)
    res = lanczos(op, 12)
    q = back(ad_backend, res.basis)
    t = back(ad_backend, res.tridiagonal())
    beta = back(ad_backend, res.beta)
    assert q.shape == (op.shape[0], 12)
    np.testing.assert_allclose(q.T @ q, np.eye(12), atol=1e-12)
    resid = oracle @ q - q @ t
    np.testing.assert_allclose(resid[:, :-1], 0.0, atol=1e-10)
    np.testing.assert_allclose(np.linalg.norm(resid[:, -1]), beta[-1], rtol=1e-8)
    np.testing.assert_allclose(t, q.T @ oracle @ q, atol=1e-10)
    numpy_res = lanczos(_hessian(backends.get("numpy")), 12)
    np.testing.assert_allclose(back(ad_backend, res.alpha), numpy_res.alpha, rtol=1e-9)


def test_lanczos_stops_on_invariant_subspace(backend):
    """On diag(1, 1, 2, 2, 3, 3) the Krylov space has dimension 3: Lanczos stops there and
    eigsh returns exact eigenvalues."""
    d = to(backend, np.array([1.0, 1.0, 2.0, 2.0, 3.0, 3.0]))
    res = lanczos(Diagonal(d), 6)
    assert res.alpha.shape[0] == 3
    values = back(backend, eigsh(Diagonal(d), 2, return_eigenvectors=False))
    np.testing.assert_allclose(values, [2.0, 3.0], atol=1e-12)


def test_eigsh_arguments(backend):
    op = Diagonal(to(backend, np.arange(1.0, 6.0)))
    with pytest.raises(ShapeError):
        eigsh(op, 6)
    with pytest.raises(ValueError):
        eigsh(op, 1, which="BE")
    with pytest.warns(RuntimeWarning):
        eigsh(Diagonal(to(backend, np.geomspace(1.0, 2.0, 40))), 1, max_iter=3, tol=1e-14)


# ------------------------------------------------------------------ flat vectors and scipy
@pytest.mark.slow
def test_flat_matvec_equals_tree_matvec(ad_backend):
    """op @ flat == ravel(op @ unravel(flat)) for trees of several leaves, in tree.ravel's
    order; rectangular operators too (a Jacobian: flat in, flat out, and its adjoint)."""
    model, loss, params, batch, _, _ = _problem(ad_backend)
    _, unravel = tree.ravel(params)
    n = tree.size(params)
    rng = np.random.default_rng(3)
    v = ad_backend.asarray(rng.standard_normal(n))
    for op in (GGN(model, loss, params, batch), Hessian(model, loss, params, batch),
               KFAC(model, loss, params, batch)):
        flat_out = op @ v
        assert tuple(flat_out.shape) == (n,)
        assert_close(back(ad_backend, flat_out),
                     tree.ravel(back(ad_backend, op @ unravel(v)))[0])
        mat = ad_backend.asarray(rng.standard_normal((n, 3)))
        cols = np.stack([back(ad_backend, op.matvec(mat[:, j])) for j in range(3)], axis=1)
        assert_close(back(ad_backend, op.matmat(mat)), cols)
    jac = Jacobian(model, params, batch[0])
    out = jac @ v
    assert tuple(out.shape) == (M * SIZES[-1],)
    assert_close(back(ad_backend, out), np.reshape(back(ad_backend, jac @ unravel(v)), -1))
    u = ad_backend.asarray(rng.standard_normal(M * SIZES[-1]))
    assert_close(back(ad_backend, jac.rmatvec(u)),
                 tree.ravel(back(ad_backend, jac.rmatvec(u.reshape(M, SIZES[-1]))))[0])


def test_to_scipy_solvers(ad_backend, oracle):
    """scipy's cg and gmres on (H + 2 I).to_scipy() solve the dense system."""
    model, loss, params, batch, _, _ = _problem(ad_backend)
    op = Hessian(model, loss, params, batch) + ScaledIdentity(2.0, params)
    a = op.to_scipy()
    n = oracle.shape[0]
    assert a.shape == (n, n) and a.dtype == np.float64
    b = np.random.default_rng(5).standard_normal(n)
    expected = np.linalg.solve(oracle + 2.0 * np.eye(n), b)
    for solver in (sla.cg, sla.gmres):
        x, status = solver(a, b, rtol=1e-12, atol=0.0)
        assert status == 0
        np.testing.assert_allclose(x, expected, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(a.matmat(np.eye(n)[:, :4]), oracle[:, :4] + 2 * np.eye(n)[:, :4],
                               atol=1e-12)
    np.testing.assert_allclose(a.rmatvec(b), (oracle + 2 * np.eye(n)) @ b, atol=1e-12)


def test_to_scipy_float32_operator(ad_backend):
    """A float32 operator computes in float32 and hands back float64 NumPy vectors."""
    d = np.linspace(1.0, 2.0, 7)
    op = Diagonal(ad_backend.asarray(d, dtype="float32"))
    out = op.to_scipy().matvec(np.ones(7))
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, d, rtol=1e-6)


# ------------------------------------------------------------------ vectorised to_dense
@pytest.mark.slow
def test_vmapped_to_dense_equals_columns(ad_backend, oracle):
    """to_dense through vmap (torch, jax) equals the one-column-at-a-time version (forced)."""
    model, loss, params, batch, _, _ = _problem(ad_backend)
    for op in (Hessian(model, loss, params, batch), GGN(model, loss, params, batch),
               KFAC(model, loss, params, batch), Jacobian(model, params, batch[0])):
        op.chunk = 16  # several chunks, the last one partial
        batched = back(ad_backend, op.to_dense())
        assert bool(op._vmap_ok) is (ad_backend.name in ("torch", "jax"))
        op._vmap_ok = False
        columns = back(ad_backend, op.to_dense())
        np.testing.assert_allclose(batched, columns, rtol=0, atol=1e-13 * np.abs(columns).max())
    assert_close(batched, back(ad_backend, Jacobian(model, params, batch[0]).to_dense()))
    assert_close(back(ad_backend, Hessian(model, loss, params, batch).to_dense()), oracle,
                 rtol=1e-11)


# ------------------------------------------------------------------ Hutchinson
def test_rademacher_same_on_every_backend(backend):
    z = back(backend, rademacher(random.key(3, backend), (50, 7)))
    ref = rademacher(random.key(3, "numpy"), (50, 7))
    np.testing.assert_array_equal(z, ref)
    assert set(np.unique(z)) == {-1.0, 1.0}


def test_hutchinson_exact_on_diagonal(backend):
    """z_i^2 = 1, so both estimates are exact for diag(d) with any number of probes."""
    d = np.random.default_rng(2).standard_normal(9)
    op = Diagonal(to(backend, {"a": d[:4].reshape(2, 2), "b": d[4:]}))
    np.testing.assert_allclose(float(hutchinson_trace(op, 4, batch=2)), d.sum(), rtol=1e-14)
    est = hutchinson_diagonal(op, 4, batch=2)
    np.testing.assert_allclose(back(backend, est["a"]).ravel(), d[:4], rtol=1e-14)
    np.testing.assert_allclose(back(backend, hutchinson_diagonal(op, 4, batch=2, flat=True)),
                               d, rtol=1e-14)


def test_hutchinson_converges_to_dense(oracle):
    """20000 probes on the dense Hessian: within 5 standard errors of the trace and of every
    diagonal entry, the standard errors from the Rademacher variances
    Var(z^T A z) = 2 sum_(i != j) A_ij^2 and Var(z_i (A z)_i) = sum_(j != i) A_ij^2."""
    samples = 20000
    op = Dense(oracle, symmetric=True)
    off = oracle - np.diag(np.diag(oracle))
    trace_se = np.sqrt(2.0 * np.sum(off**2) / samples)
    diag_se = np.sqrt(np.sum(off**2, axis=1) / samples)
    est = float(hutchinson_trace(op, samples, seed=11))
    assert abs(est - np.trace(oracle)) <= 5 * trace_se
    diag = np.asarray(hutchinson_diagonal(op, samples, seed=11, flat=True))
    assert np.all(np.abs(diag - np.diag(oracle)) <= 5 * diag_se + 1e-14)


def test_hutchinson_same_numbers_on_every_backend(ad_backend, oracle):
    """The probes are the same bits on every backend, so the estimate on the Hessian operator
    equals the estimate on the dense oracle matrix with the same seed to rounding; and the probe
    batch size does not change the probes."""
    op = _hessian(ad_backend)
    op.chunk = 16  # the block shapes of test_vmapped_to_dense_equals_columns: JAX compiles once
    ref = Dense(oracle, symmetric=True)
    ref_trace = float(hutchinson_trace(ref, 32, seed=4))
    ref_diag = np.asarray(hutchinson_diagonal(ref, 32, seed=4, flat=True))
    np.testing.assert_allclose(float(hutchinson_trace(op, 32, seed=4)), ref_trace, rtol=1e-10)
    np.testing.assert_allclose(float(hutchinson_trace(op, 32, seed=4, batch=32)), ref_trace,
                               rtol=1e-10)
    diag = hutchinson_diagonal(op, 32, seed=4)
    assert_close(tree.ravel(back(ad_backend, diag))[0], ref_diag, rtol=1e-10)
