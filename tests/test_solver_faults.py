"""Bad input to the solvers and matrix functions: a named error or an honest report, never a
silent wrong answer, on every backend (tiny matrices; float64 oracles where a solution exists)."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_close, back, spd, to
from secondorder.errors import DTypeError, HyperparameterError, NotPositiveDefiniteError
from secondorder.linalg import Dense, Diagonal, Kronecker, cg, damped_inverse, inverse_root

Q, _ = np.linalg.qr(np.random.default_rng(7).standard_normal((4, 4)))
SINGULAR = (Q * np.array([0.0, 1.0, 2.0, 3.0])) @ Q.T
INDEFINITE = (Q * np.array([-1.0, 1.0, 2.0, 3.0])) @ Q.T


@pytest.fixture
def system(backend):
    if backend.name not in ("numpy", "torch", "jax"):
        pytest.skip("fault tests run on numpy, torch and jax")
    a = spd(np.random.default_rng(3), 4)
    return a, np.array([1.0, -2.0, 0.5, 3.0])


@pytest.mark.parametrize("tol", [1e-10, None])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_cg_non_finite_rhs(bad, tol, backend, system):
    a, b = system
    b = b.copy()
    b[1] = bad
    _, info = cg(Dense(to(backend, a)), to(backend, b), tol=tol, maxiter=8)
    assert info.reason == "non_finite" and not info.converged


@pytest.mark.parametrize("tol", [1e-10, None])
def test_cg_non_finite_operator_output(tol, backend, system):
    a, b = system
    op = Dense(to(backend, a))
    nan = to(backend, np.array([0.0, np.nan, 0.0, 0.0]))
    _, info = cg(lambda v: op @ v + nan, to(backend, b), tol=tol, maxiter=8)
    assert info.reason == "non_finite"
    _, info = cg(op, to(backend, b), M=lambda r: r * np.inf, tol=tol, maxiter=8)
    assert info.reason == "non_finite"


@pytest.mark.parametrize("tol", [1e-12, None])
@pytest.mark.parametrize("scale", [1e-300, 1e300])
def test_cg_extreme_scale_is_solved(scale, tol, backend, system):
    a, b = system
    x, info = cg(Dense(to(backend, a * scale)), to(backend, b * scale), tol=tol, maxiter=8)
    assert info.reason in (("converged",) if tol else ("maxiter", "nonpositive_curvature"))
    assert_close(x, np.linalg.solve(a, b), rtol=1e-10, backend=backend)


def test_cg_overflowing_solution_is_reported(backend, system):
    a, b = system
    x, info = cg(Dense(to(backend, a * 1e-300)), to(backend, b * 1e300), tol=1e-10, maxiter=8)
    assert info.reason == "non_finite"


@pytest.mark.parametrize("kwargs", [dict(maxiter=-1), dict(maxiter=2.5), dict(tol=-1.0),
                                    dict(tol=float("nan")), dict(atol=-1e-3),
                                    dict(atol=float("inf")), dict(save_at=(-1,))])
def test_cg_bad_settings(kwargs, backend, system):
    a, b = system
    with pytest.raises(HyperparameterError):
        cg(Dense(to(backend, a)), to(backend, b), **kwargs)


def test_cg_dtypes(backend, system):
    a, b = system
    op = Dense(to(backend, a))
    with pytest.raises(DTypeError, match="real floating"):
        cg(op, backend.asarray(np.arange(4)))
    with pytest.raises(DTypeError, match="dtype"):
        cg(op, backend.asarray(b, dtype="float32"))
    with pytest.raises(DTypeError, match="x0"):
        cg(op, to(backend, b), x0=backend.asarray(b, dtype="float32"))


@pytest.mark.parametrize("method", ["eigh", "newton"])
@pytest.mark.parametrize("a", [SINGULAR, INDEFINITE, np.where(np.eye(4) > 0, np.nan, SINGULAR)],
                         ids=["singular", "indefinite", "nan"])
def test_inverse_root_rejects_non_pd(a, method, backend, system):
    with pytest.raises(NotPositiveDefiniteError):
        inverse_root(to(backend, a), 2, method=method)


@pytest.mark.parametrize("method", ["eigh", "newton"])
@pytest.mark.parametrize("scale", [1e-300, 1e300])
def test_inverse_root_extreme_scale(scale, method, backend, system):
    a, _ = system
    w, q = np.linalg.eigh(a)
    expected = (q * w ** -0.5) @ q.T
    out = back(backend, inverse_root(to(backend, a * scale), 2, method=method)) * scale ** 0.5
    assert_close(out, expected, rtol=1e-10 if method == "eigh" else 1e-5)


def test_bad_p_and_damping(backend, system):
    a = to(backend, system[0])
    for p in (0, -1, 1.5, True):
        with pytest.raises(HyperparameterError):
            inverse_root(a, p)
    for damping in (-1.0, float("nan"), float("inf")):
        with pytest.raises(HyperparameterError):
            damped_inverse(a, damping)
        with pytest.raises(HyperparameterError):
            Kronecker(a, a).damped_inverse(damping, "exact")


@pytest.mark.parametrize("a", [SINGULAR, INDEFINITE, np.full((4, 4), np.nan)],
                         ids=["singular", "indefinite", "nan"])
def test_damped_inverse_rejects_non_pd(a, backend, system):
    with pytest.raises(NotPositiveDefiniteError):
        damped_inverse(to(backend, a), 0.0)


def test_kronecker_and_diagonal_inverses(backend, system):
    a, _ = system
    sing = np.array([[1.0, 1.0], [1.0, 1.0]])
    op = Kronecker(to(backend, a), to(backend, sing))
    for method in ("exact", "pi", "equal"):
        with pytest.raises(NotPositiveDefiniteError):
            op.damped_inverse(0.0, method)
    with pytest.raises(NotPositiveDefiniteError):
        op.inv()
    with pytest.raises(NotPositiveDefiniteError):
        Dense(to(backend, SINGULAR)).inv()
    with pytest.raises(NotPositiveDefiniteError):
        Diagonal(to(backend, np.array([1.0, 0.0, 2.0]))).inv()
    expected = np.linalg.inv(np.kron(a, sing) + 0.1 * np.eye(8))
    assert_close(op.damped_inverse(0.1, "exact").to_dense(), expected, backend=backend)


def test_under_jit_failures_are_nan(backend, system):
    if backend.name != "jax":
        pytest.skip("jax.jit only")
    import jax

    a = to(backend, SINGULAR)
    for method in ("eigh", "newton"):
        out = jax.jit(lambda m, method=method: inverse_root(m, 2, method=method))(a)
        assert np.isnan(back(backend, out)).all()
    b = to(backend, np.array([np.nan, 1.0, 1.0, 1.0]))
    _, info = jax.jit(lambda m, v: cg(Dense(m), v, tol=None, maxiter=4))(to(backend, system[0]), b)
    assert info.reason == "non_finite"
