"""Functions of symmetric positive semi-definite matrices: powers, damped inverses, inverse roots.

For a symmetric A = Q diag(w) Q^T (eigendecomposition, ascending w):

* ``matrix_power(A, s, damping)``  = Q diag((max(w, 0) + damping)^s) Q^T, any real s;
* ``damped_inverse(A, damping)``   = (A + damping I)^{-1}, by Cholesky (raises
  :class:`~secondorder.errors.NotPositiveDefiniteError` if A + damping I is not PD);
* ``inverse_root(A, p, damping)``  = (A + damping I)^{-1/p}, by eigendecomposition or by the
  coupled Newton iteration of C.-H. Guo and N. J. Higham (SIAM J. Matrix Anal. Appl. 28, 2006)
  used by Shampoo implementations (at most 100 iterations, tolerance 1e-6).

Eigendecompositions go through the backend's ``eigh``, which retries in float64 when float32 fails.

Bad input, the same on every backend (outside ``jax.jit``):

* ``damping`` given as a Python or NumPy number must be finite and >= 0, and ``p`` a positive
  integer, else :class:`~secondorder.errors.HyperparameterError` (array dampings, possibly traced,
  are not read).
* A matrix with a NaN or inf entry, or one that is singular or indefinite once damped, raises
  :class:`~secondorder.errors.NotPositiveDefiniteError`: ``damped_inverse`` when the Cholesky
  factorisation fails, has a non-finite entry (NumPy's does not raise on NaN) or a pivot^2 at or
  below n eps max_i (A + damping I)_ii; ``inverse_root`` when a damped eigenvalue
  max(w, 0) + damping is at or below n eps times the largest (``"eigh"``) or when the coupled
  Newton iteration ends with max |M - I| > 1/2 or a non-finite X (``"newton"``). With zero
  damping, a singular or indefinite A therefore raises instead of returning inf, NaN or a finite
  matrix that is not the inverse root; pass a damping > 0 to regularise it (eigenvalues below 0
  are clipped to 0 before damping, as documented above).
* Inside ``jax.jit`` (or any trace) nothing can raise: the same failures give an output that is
  NaN (``inverse_root``) or NaN/inf (``damped_inverse``), which the optimisers' non-finite guard
  rejects, leaving parameters and state as they were.

The coupled Newton iteration runs on A / c with c a power of two near max |A_ij| (c = 1 between
2^-64 and 2^64, so ordinary input gives the same bits as without scaling; c a power of 2^p, so
c^{-1/p} is exact), so matrices at 1e+-300 neither overflow nor underflow.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

from ..backends import backend_of
from ..errors import HyperparameterError, NotPositiveDefiniteError, ShapeError

__all__ = ["damped_inverse", "eigh", "inverse_root", "matrix_power"]


def _check_square(a: Any, what: str) -> None:
    if getattr(a, "ndim", None) != 2 or a.shape[0] != a.shape[1]:
        raise ShapeError(f"{what} needs a square matrix, got shape {getattr(a, 'shape', ())}")


def _check_damping(damping: Any, what: str) -> None:
    """A Python or NumPy damping must be finite and >= 0 (arrays are left alone)."""
    if isinstance(damping, numbers.Real) and not (math.isfinite(damping) and damping >= 0):
        raise HyperparameterError(f"{what} needs a finite damping >= 0, got {damping!r}")


def _check_p(p: Any) -> int:
    """p as a Python int >= 1, else :class:`HyperparameterError`."""
    try:
        out = operator.index(p)
    except TypeError:
        out = int(p) if isinstance(p, numbers.Real) and float(p).is_integer() else 0
    if isinstance(p, bool) or out < 1:
        raise HyperparameterError(
            f"inverse_root computes (A + damping I)^(-1/p) for a positive integer p, got {p!r}; "
            "use matrix_power(A, s) for other powers"
        )
    return out


def _is_concrete(backend: Any, *arrays: Any) -> bool:
    return all(backend.is_concrete(a) for a in arrays)


def _not_pd(what: str, why: str) -> NotPositiveDefiniteError:
    return NotPositiveDefiniteError(
        f"{what}: {why}. Add damping (a multiple of the identity) or check the matrix for "
        "NaN, inf or a missing curvature estimate."
    )


def _check_finite(backend: Any, a: Any, what: str) -> None:
    """NotPositiveDefiniteError for a concrete matrix with a NaN or inf entry. The test is on
    the flag, not on ``a``: a concrete array closed over inside ``jax.jit`` gives a traced
    flag, which cannot be branched on."""
    if not _is_concrete(backend, a):
        return
    finite = backend.xp.all(backend.xp.isfinite(a))
    if _is_concrete(backend, finite) and not bool(finite):
        raise _not_pd(what, "the matrix has NaN or inf entries")


def checked_inv(a: Any, what: str) -> Any:
    """A^{-1} of a square matrix; :class:`NotPositiveDefiniteError` when A is singular (the
    framework's error, a non-finite inverse, or, since rounding rarely leaves a pivot exactly
    0, an inverse with eps ||A||_inf ||A^{-1}||_inf >= 1: singular to working precision, where
    the computed inverse has no correct digit) when concrete; inf or NaN inside ``jax.jit``.
    The infinity norm (largest absolute row sum) squares nothing, so it holds at 1e+-300."""
    backend = backend_of(a)
    xp = backend.xp
    _check_finite(backend, a, what)
    try:
        out = xp.linalg.inv(a)
    except Exception as err:  # each framework has its own LinAlgError
        raise _not_pd(what, "the matrix is singular") from err
    if _is_concrete(backend, out):
        if not bool(xp.all(xp.isfinite(out))):
            raise _not_pd(what, "the matrix is singular")
        kappa = xp.max(xp.sum(xp.abs(a), axis=1)) * xp.max(xp.sum(xp.abs(out), axis=1))
        if not bool(kappa * xp.finfo(a.dtype).eps < 1):
            raise _not_pd(what, f"the matrix is singular to working precision (condition "
                                f"number >= {float(kappa):.1e})")
    return out


def eigh(a: Any) -> tuple[Any, Any]:
    """Eigenvalues (ascending) and orthonormal eigenvectors of a symmetric matrix;
    :class:`NotPositiveDefiniteError` for a concrete matrix with NaN or inf entries (NumPy's
    LAPACK raised a bare LinAlgError on them, torch and jax returned NaN)."""
    _check_square(a, "eigh")
    backend = backend_of(a)
    _check_finite(backend, a, "eigh")
    return backend.eigh(a)


def _from_eigen(q: Any, values: Any, xp: Any) -> Any:
    return (q * values[None, :]) @ xp.linalg.matrix_transpose(q)


def matrix_power(a: Any, s: float, *, damping: Any = 0.0) -> Any:
    """(A + damping I)^s of a symmetric PSD matrix; eigenvalues below 0 are clipped to 0."""
    _check_square(a, "matrix_power")
    _check_damping(damping, "matrix_power")
    backend = backend_of(a)
    xp = backend.xp
    _check_finite(backend, a, "matrix_power")
    w, q = backend.eigh(a)  # the square check above is eigh()'s
    v = xp.clip(w, min=0.0) + damping
    if s < 0:
        v = _positive_spectrum(backend, v, f"matrix_power(A, {s})")
    return _from_eigen(q, v ** s, xp)


def _positive_spectrum(backend: Any, v: Any, what: str) -> Any:
    """The damped, clipped eigenvalues ``v`` to be raised to a negative power, checked: an entry
    at or below n eps max(v) (singular or indefinite to working precision, or NaN) raises
    :class:`NotPositiveDefiniteError` when concrete and becomes NaN when traced."""
    xp = backend.xp
    bad = _not_positive(xp, v)
    if _is_concrete(backend, v):
        if bool(xp.any(bad)):
            raise _not_pd(what, "A + damping I is singular or indefinite (an eigenvalue, "
                                "clipped at 0, is 0 to working precision)")
        return v
    return xp.where(bad, xp.asarray(float("nan"), dtype=v.dtype), v)


def _not_positive(xp: Any, v: Any) -> Any:
    """The entries of the eigenvalues ``v`` that are not above n eps max(v): zero (or below)
    to working precision, or NaN."""
    return ~(v > v.shape[0] * xp.finfo(v.dtype).eps * xp.max(v))


def damped_inverse(a: Any, damping: Any = 0.0) -> Any:
    """(A + damping I)^{-1} of a symmetric matrix that is positive definite once damped.

    Raises :class:`NotPositiveDefiniteError` when A + damping I is not numerically positive
    definite (see the module notes; NaN or inf output inside ``jax.jit``)."""
    _check_square(a, "damped_inverse")
    _check_damping(damping, "damped_inverse")
    backend = backend_of(a)
    xp = backend.xp
    n = a.shape[0]
    eye = xp.eye(n, dtype=a.dtype, device=backend.device(a))
    ad = a + damping * eye
    factor = backend.cholesky(ad)
    if _is_concrete(backend, factor):
        pivots = xp.linalg.diagonal(factor)
        if not bool(xp.all(xp.isfinite(factor))):
            raise _not_pd("damped_inverse", "the matrix has NaN or inf entries")
        eps = xp.finfo(a.dtype).eps
        top = xp.max(xp.linalg.diagonal(ad))
        smallest = xp.min(pivots * pivots) if n else None
        if n and not bool(smallest > n * eps * top):
            raise _not_pd("damped_inverse", "A + damping I is singular to working precision")
        if n and not bool(smallest > math.sqrt(eps) * top):
            # ill-conditioned: Cholesky's own rounding can leave a pivot^2 of ~50 eps ||A|| on
            # a singular matrix (machine dependent), so eigh's backward-stable spectrum decides,
            # with matrix_power's tolerance (its clip at 0 included)
            _positive_spectrum(backend, xp.clip(backend.eigh(ad)[0], min=0.0), "damped_inverse")
    return backend.cholesky_inverse(factor)


def inverse_root(
    a: Any,
    p: int,
    *,
    damping: Any = 0.0,
    method: str = "eigh",
    maxiter: int = 100,
    tol: float = 1e-6,
) -> Any:
    """(A + damping I)^{-1/p} of a symmetric PSD matrix.

    Raises :class:`HyperparameterError` for a p that is not a positive integer and
    :class:`NotPositiveDefiniteError` for an A + damping I that is singular or indefinite (NaN
    output inside ``jax.jit``; see the module notes).

    ``method="eigh"``: through the eigendecomposition (eigenvalues clipped at 0 before damping).
    ``method="newton"``: the coupled Newton iteration, p a positive integer. With
    z = (1 + p) / (2 ||A||_F), start X = z^{1/p} I, M = z A and repeat
    T = ((p + 1) I - M) / p, X <- X T, M <- T^p M until max |M - I| < tol (then X^p A = M ~ I).
    An iteration that increases the error by more than 20% is discarded and the loop stops;
    the error it compares is ||M - I||_F, which never grows for a symmetric positive definite A
    in exact arithmetic (every eigenvalue of M moves towards 1), while max |M - I| can in the
    first iterations (a well-conditioned 3 x 3 matrix with p = 4 stopped at iteration 1 and
    raised NotPositiveDefiniteError before this was measured in the Frobenius norm).
    """
    _check_square(a, "inverse_root")
    if method not in ("eigh", "newton"):
        raise HyperparameterError(f"unknown method {method!r}: use 'eigh' or 'newton'")
    p = _check_p(p)
    _check_damping(damping, "inverse_root")
    backend = backend_of(a)
    xp = backend.xp
    _check_finite(backend, a, "inverse_root")
    n = a.shape[0]
    if method == "eigh":
        w, q = backend.eigh(a)
        v = _positive_spectrum(backend, xp.clip(w, min=0.0) + damping, "inverse_root")
        return _from_eigen(q, v ** (-1.0 / p), xp)
    eye = xp.eye(n, dtype=a.dtype, device=backend.device(a))
    ad = a + damping * eye
    # A / c, c = 2^e with e a multiple of p (so c^(-1/p) = 2^(-e/p) is exact), only for entries
    # outside [2^-64, 2^64]: in range, c = 1 and the iteration's numbers are the unscaled ones
    big = xp.max(xp.abs(ad))
    e = xp.floor(xp.log2(xp.where(big > 0, big, 1.0)) / p) * p
    e = xp.where(xp.abs(e) > 64, e, 0.0)
    ad = ad / 2.0 ** e
    z = (1.0 + p) / (2.0 * xp.linalg.matrix_norm(ad))
    x0 = eye * z ** (1.0 / p)
    m0 = z * ad
    err0 = xp.max(xp.abs(m0 - eye))
    fro0 = xp.linalg.matrix_norm(m0 - eye)

    def step(state: tuple) -> tuple:
        k, x, m, err, fro, _ = state
        t = ((p + 1.0) * eye - m) / p
        tp = t
        for _ in range(p - 1):
            tp = tp @ t
        m_new = tp @ m
        x_new = x @ t
        err_new = xp.max(xp.abs(m_new - eye))
        fro_new = xp.linalg.matrix_norm(m_new - eye)
        worse = ~(fro_new <= 1.2 * fro)
        x_next = xp.where(worse, x, x_new)
        m_next = xp.where(worse, m, m_new)
        return (k + 1, x_next, m_next, xp.where(worse, err, err_new),
                xp.where(worse, fro, fro_new), worse)

    def keep_going(state: tuple) -> Any:
        k, _, _, err, _, stopped = state
        return xp.logical_and(xp.logical_and(k < maxiter, err > tol), xp.logical_not(stopped))

    dev = backend.device(a)
    init = (xp.asarray(0, device=dev), x0, m0, err0, fro0, xp.asarray(False, device=dev))
    _, x, _, err, _, _ = backend.while_loop(keep_going, step, init)
    # a singular or indefinite A leaves an eigenvalue of M at <= 0 or far from 1: err stays large
    failed = ~(err <= 0.5) | ~xp.all(xp.isfinite(x))
    # ... unless rounding moved a zero eigenvalue to a tiny positive one, from which the
    # iteration converges too (machine dependent): when 1 / ||X||_F^p, a lower bound on the
    # smallest eigenvalue, is under sqrt(eps) ||A||_F, eigh's spectrum decides as for "eigh"
    eps = xp.finfo(ad.dtype).eps
    suspicious = ~(xp.linalg.matrix_norm(x) ** (-p) > math.sqrt(eps) * xp.linalg.matrix_norm(ad))

    def singular(m: Any) -> Any:
        return xp.any(_not_positive(xp, xp.clip(backend.eigh(m)[0], min=0.0)))

    x = x * 2.0 ** (-e / p)
    if _is_concrete(backend, x, err):
        if bool(failed) or (bool(suspicious) and bool(singular(ad))):
            raise _not_pd("inverse_root", "the coupled Newton iteration did not converge (A + "
                                          "damping I is singular or indefinite)")
        return x
    if backend.has_jit:
        failed = failed | backend.cond(suspicious, singular, lambda m: xp.asarray(False), ad)
    return xp.where(failed, xp.asarray(float("nan"), dtype=x.dtype), x)
