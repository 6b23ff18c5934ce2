"""Conjugate gradients against dense solves and a textbook CG written here in NumPy."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_close, back, dense_kron, spd, textbook_cg, to
from secondorder import tree
from secondorder.errors import MixedBackendError, ShapeError
from secondorder.linalg import Dense, Diagonal, FunctionOperator, Kronecker, cg


def test_solves_dense_system(backend, rng):
    a = spd(rng, 8, cond=50.0)
    b = rng.standard_normal(8)
    x, info = cg(Dense(to(backend, a)), to(backend, b), tol=1e-11)
    assert info.reason == "converged" and 1 <= int(info.iterations) <= 10
    assert_close(x, np.linalg.solve(a, b), rtol=1e-11, backend=backend)
    assert float(back(backend, info.residual_norm)) <= 1e-11 * np.linalg.norm(b)


def test_solves_kronecker_system_on_tensors(backend, rng):
    a, g = spd(rng, 3), spd(rng, 4)
    b = rng.standard_normal((3, 4))
    x, info = cg(Kronecker(*to(backend, (a, g))), to(backend, b), tol=1e-11)
    expected = np.linalg.solve(dense_kron(a, g), b.ravel()).reshape(3, 4)
    assert info.converged
    assert_close(x, expected, rtol=1e-11, backend=backend)


def test_solves_on_parameter_tree(backend, rng):
    like = {"w": np.zeros((2, 3)), "b": np.zeros(2)}
    a = spd(rng, 8, cond=20.0)
    b = {"w": rng.standard_normal((2, 3)), "b": rng.standard_normal(2)}
    flat_b = np.concatenate([b["b"], b["w"].ravel()])  # canonical order: keys sorted

    ba = to(backend, a)

    def matvec(v):
        flat, unravel = tree.ravel(v)
        return unravel(ba @ flat)

    x, info = cg(FunctionOperator(matvec, to(backend, like), symmetric=True), to(backend, b),
                 tol=1e-11)
    flat_x = np.linalg.solve(a, flat_b)
    assert_close(x, {"b": flat_x[:2], "w": flat_x[2:].reshape(2, 3)}, rtol=1e-11,
                 backend=backend)


def test_fixed_iterations_match_textbook_cg(backend, rng):
    a = spd(rng, 10, cond=1e3)
    b = rng.standard_normal(10)
    x, info = cg(Dense(to(backend, a)), to(backend, b), tol=None, maxiter=4, history=True)
    x_ref, _, r_ref = textbook_cg(a, b, iterations=4)
    assert int(info.iterations) == 4 and info.reason == "maxiter"
    assert_close(x, x_ref, rtol=1e-10, backend=backend)
    hist = back(backend, info.history)
    assert hist.shape == (5,)
    assert abs(hist[0] - np.linalg.norm(b)) <= 1e-12 * np.linalg.norm(b)
    assert abs(hist[4] - r_ref) <= 1e-9 * np.linalg.norm(b)


def test_jacobi_preconditioner_needs_fewer_iterations(backend, rng):
    d = np.geomspace(1.0, 1e4, 30)
    q, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    a = np.diag(d) + 1e-2 * (q @ np.diag(rng.random(30)) @ q.T)
    b = rng.standard_normal(30)
    op = Dense(to(backend, a))
    x_plain, plain = cg(op, to(backend, b), tol=1e-10)
    x_pre, pre = cg(op, to(backend, b), M=Diagonal(to(backend, 1.0 / np.diag(a))), tol=1e-10)
    assert int(pre.iterations) < int(plain.iterations)
    assert_close(x_pre, np.linalg.solve(a, b), rtol=1e-8, backend=backend)


def test_projected_system_keeps_iterates_feasible(backend, rng):
    # minimise 0.5 x^T A x - b^T x subject to 1^T x = 0 (the dual Gauss-Newton constraint)
    n = 6
    a = spd(rng, n, cond=30.0)
    b = rng.standard_normal(n)
    proj = np.eye(n) - np.ones((n, n)) / n
    basis = np.linalg.svd(proj)[0][:, : n - 1]  # orthonormal basis of {1^T x = 0}
    expected = basis @ np.linalg.solve(basis.T @ a @ basis, basis.T @ b)
    x, info = cg(Dense(to(backend, a)), to(backend, b), projector=Dense(to(backend, proj)),
                 tol=1e-11)
    assert info.converged
    x_np = back(backend, x)
    assert abs(x_np.sum()) <= 1e-12 * np.linalg.norm(x_np)
    assert_close(x_np, expected, rtol=1e-10)


def test_negative_curvature_stops_without_a_step(backend):
    a = np.diag([-1.0, -2.0, 3.0])
    b = np.array([1.0, 1.0, 0.0])
    x, info = cg(Dense(to(backend, a)), to(backend, b), tol=1e-10)
    assert info.reason == "nonpositive_curvature" and int(info.iterations) == 0
    assert_close(x, np.zeros(3), backend=backend)


def test_indefinite_preconditioner_is_a_breakdown(backend, rng):
    a = spd(rng, 4)
    b = rng.standard_normal(4)
    x, info = cg(Dense(to(backend, a)), to(backend, b), M=lambda r: tree.scale(-1.0, r))
    assert info.reason in ("breakdown", "nonpositive_curvature")
    assert np.all(np.isfinite(back(backend, x)))


def test_zero_rhs_and_exact_start(backend, rng):
    a = spd(rng, 5)
    b = rng.standard_normal(5)
    op = Dense(to(backend, a))
    x, info = cg(op, to(backend, np.zeros(5)))
    assert info.converged and int(info.iterations) == 0
    assert_close(x, np.zeros(5), backend=backend)
    x, info = cg(op, to(backend, b), x0=to(backend, np.linalg.solve(a, b)), tol=1e-8)
    assert info.converged and int(info.iterations) <= 1


def test_bad_input_raises(backend, rng):
    op = Dense(to(backend, spd(rng, 4)))
    with pytest.raises(ShapeError, match="shape"):
        cg(op, to(backend, np.ones(5)))
    with pytest.raises(ShapeError, match="square"):
        cg(Dense(to(backend, np.ones((3, 4)))), to(backend, np.ones(3)))
    if backend.name != "numpy":
        with pytest.raises(MixedBackendError):
            cg(Dense(spd(rng, 4)), to(backend, np.ones(4)))


def _host_cases(rng: np.random.Generator) -> list[tuple[str, dict, dict]]:
    """(name, arrays, cg keywords) covering every way CG stops and every option."""
    a, b = spd(rng, 12, cond=1e3), rng.standard_normal(12)
    indefinite = np.diag(np.r_[np.linspace(1.0, 5.0, 9), -1.0, -2.0, 3.0])
    nan_op = a.copy()
    nan_op[3, 3] = np.nan
    proj = np.eye(12) - np.ones((12, 12)) / 12
    fixed = {"tol": None, "maxiter": 15, "history": True, "save_at": (0, 3, 40)}
    return [
        ("fixed", {"A": a, "b": b}, fixed),
        ("tol", {"A": a, "b": b}, {"tol": 1e-6, "history": True, "save_at": (2,)}),
        ("atol", {"A": a, "b": b}, {"tol": None, "atol": 1e-3, "maxiter": 30}),
        ("jacobi", {"A": a, "b": b, "M": 1.0 / np.diag(a)}, fixed),
        ("projected", {"A": a, "b": proj @ b, "P": proj}, {"tol": 1e-8}),
        ("x0", {"A": a, "b": b, "x0": 0.1 * b}, fixed),
        ("indefinite", {"A": indefinite, "b": np.ones(12)}, fixed),
        ("indefinite_tol", {"A": indefinite, "b": np.ones(12)}, {"tol": 1e-9}),
        ("breakdown", {"A": a, "b": b, "M": -np.ones(12)}, fixed),
        ("nan", {"A": nan_op, "b": b}, fixed),
        ("zero", {"A": a, "b": np.zeros(12)}, fixed),
        ("tiny", {"A": 1e-300 * a, "b": 1e-300 * b}, fixed),
        ("huge_b", {"A": a, "b": 1e300 * b}, {"tol": 1e-8}),
    ]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_host_scalar_loop_gives_the_bits_of_the_array_loop(backend, rng, dtype, monkeypatch):
    """On eager host backends cg runs its scalar bookkeeping on NumPy scalars; with
    ``host_scalar`` returning None it runs the array loop. Both give the same bits."""
    x_probe = backend.asarray(np.float64(1.0), dtype=dtype)
    if backend.host_scalar(x_probe) is None:
        pytest.skip(f"{backend.name} arrays are not read on the host")

    def run(arrays: dict, kwargs: dict) -> list[np.ndarray]:
        t = {k: backend.asarray(v, dtype=dtype) for k, v in arrays.items()}
        m = None if "M" not in t else Diagonal(t["M"])
        p = None if "P" not in t else Dense(t["P"])
        x, info = cg(Dense(t["A"]), t["b"], t.get("x0"), M=m, projector=p, **kwargs)
        out = [x, info.iterations, info.residual_norm, info.status, *info.saved]
        if info.history is not None:
            out.append(info.history)
        return [np.asarray(backend.to_numpy(v)) for v in out]

    with np.errstate(all="ignore"):
        for name, arrays, kwargs in _host_cases(rng):
            host = run(arrays, kwargs)
            with monkeypatch.context() as m:
                m.setattr(type(backend), "host_scalar", lambda self, x: None)
                array = run(arrays, kwargs)
            for u, v in zip(host, array, strict=True):
                assert u.dtype == v.dtype and np.array_equal(u, v, equal_nan=True), name
