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


# ---------------------------------------------------------------- found by tests/test_properties.py
def test_newton_inverse_root_does_not_stop_on_an_early_max_entry_rise(backend, system):
    """Eigenvalues 1, 80.7, 100 with p = 4: max |M - I| rises by more than 20% at iteration 1
    although every eigenvalue of M moves towards 1; the progress test in the Frobenius norm lets
    it converge (it raised NotPositiveDefiniteError)."""
    a = np.array([[84.84332291, -3.28397992, 10.36455128],
                  [-3.28397992, 15.55399332, 33.36598448],
                  [10.36455128, 33.36598448, 81.34642681]])
    w, q = np.linalg.eigh(a)
    out = inverse_root(to(backend, a), 4, method="newton")
    assert_close(out, (q * w ** -0.25) @ q.T, rtol=1e-6, backend=backend)


def test_negative_powers_of_singular_or_nan_matrices_raise(backend, system):
    from secondorder.linalg import eigh, matrix_power

    with pytest.raises(NotPositiveDefiniteError):
        matrix_power(to(backend, SINGULAR), -0.5)  # was a matrix of inf and NaN
    with pytest.raises(NotPositiveDefiniteError):
        Kronecker(to(backend, SINGULAR), to(backend, np.eye(2))).power(-1.0)
    nan = np.where(np.eye(4) > 0, np.nan, SINGULAR)
    with pytest.raises(NotPositiveDefiniteError):
        matrix_power(to(backend, nan), 0.5)  # numpy: a bare LinAlgError
    with pytest.raises(NotPositiveDefiniteError):
        eigh(to(backend, nan))
    with pytest.raises(NotPositiveDefiniteError):
        Kronecker(to(backend, nan), to(backend, np.eye(2))).damped_inverse(0.1, "exact")
    a, _ = system
    expected = np.linalg.inv(np.linalg.cholesky(a)).T  # any square root of A^{-1} squared
    got = back(backend, matrix_power(to(backend, a), -0.5))
    assert_close(got @ got, expected @ expected.T)


def test_singular_to_working_precision_inverse_raises(backend, system):
    """Rounding leaves a pivot of a singular matrix at ~1e-16, not 0: inv returned a finite
    matrix of 1e16 entries; now kappa eps >= 1 raises. A matrix at 1e-300 or 1e300 still
    inverts."""
    rank_one = np.outer([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) / 7.0
    with pytest.raises(NotPositiveDefiniteError):
        Dense(to(backend, rank_one)).inv()
    near = np.array([[1.0, 1.0], [1.0, 1.0 + 2.0**-52]])  # kappa 1.6e16: no correct digit
    with pytest.raises(NotPositiveDefiniteError, match="working precision"):
        Dense(to(backend, near)).inv()
    with pytest.raises(NotPositiveDefiniteError):
        Dense(to(backend, SINGULAR)).inv()
    with pytest.raises(NotPositiveDefiniteError):
        Kronecker(to(backend, SINGULAR), to(backend, np.eye(2))).inv()
    a, _ = system
    for s in (1e-300, 1e300):
        assert_close(Dense(to(backend, a * s)).inv().to_dense(), np.linalg.inv(a) / s,
                     rtol=1e-13, backend=backend)


def test_diagonal_inf_entries_and_powers(backend, system):
    with pytest.raises(NotPositiveDefiniteError):
        Diagonal(to(backend, np.array([1.0, np.inf]))).inv()  # was diag(1, 0)
    for d, p in (([1.0, 0.0], -0.5), ([1.0, -1.0], 0.5), ([np.nan, 1.0], 2.0)):
        with pytest.raises(NotPositiveDefiniteError):
            Diagonal(to(backend, np.array(d))).power(p)
    got = Diagonal(to(backend, np.array([4.0, 0.25]))).power(-0.5).to_dense()
    assert_close(got, np.diag([0.5, 2.0]), backend=backend)


def test_pi_split_of_a_zero_trace_factor(backend, system):
    """A zero factor made the pi split NaN, so damping 0 became 'damping nan' (a
    HyperparameterError on numpy); the split falls back to 'equal' as the curvature blocks' does:
    damping 0 is not positive definite, damping 0.1 is (A + 0.1^(1/2) I)^{-1} (x) 0.1^(-1/2) I."""
    a, _ = system
    op = Kronecker(to(backend, a), to(backend, np.zeros((2, 2))))
    with pytest.raises(NotPositiveDefiniteError):
        op.damped_inverse(0.0)
    with pytest.raises(NotPositiveDefiniteError):
        Kronecker(to(backend, a), to(backend, np.full((2, 2), np.nan))).damped_inverse(0.1)
    root = 0.1**0.5
    expected = np.kron(np.linalg.inv(a + root * np.eye(4)), np.eye(2) / root)
    assert_close(op.damped_inverse(0.1).to_dense(), expected, backend=backend)


def test_checks_of_concrete_arrays_closed_over_in_jit_do_not_branch_on_tracers():
    """A concrete matrix closed over inside ``jax.jit`` makes its isfinite flag a tracer: the
    NaN checks of eigh (the exact Kronecker damped inverse) and Diagonal.inv skip it instead of
    raising TracerBoolConversionError (`secondorder check` failed on jax this way); the result
    equals the eager one."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(3)
    a = rng.standard_normal((3, 3))
    g = rng.standard_normal((4, 4))
    a, g = jnp.asarray(a @ a.T + np.eye(3)), jnp.asarray(g @ g.T + np.eye(4))
    x = jnp.asarray(rng.standard_normal((3, 4)))
    d = jnp.asarray(rng.uniform(1.0, 2.0, 5))
    v = jnp.asarray(rng.standard_normal(5))

    def kron() -> object:
        return Kronecker(a, g).damped_inverse(0.1, method="exact").matvec(x)

    def diag() -> object:
        return Diagonal(d).inv().matvec(v)

    np.testing.assert_allclose(np.asarray(jax.jit(kron)()), np.asarray(kron()), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(jax.jit(diag)()), np.asarray(v / d), rtol=1e-14)
