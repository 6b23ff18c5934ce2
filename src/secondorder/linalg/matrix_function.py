"""Functions of symmetric positive semi-definite matrices: powers, damped inverses, inverse roots.

For a symmetric A = Q diag(w) Q^T (eigendecomposition, ascending w):

* ``matrix_power(A, s, damping)``  = Q diag((max(w, 0) + damping)^s) Q^T, any real s;
* ``damped_inverse(A, damping)``   = (A + damping I)^{-1}, by Cholesky (raises
  :class:`~secondorder.errors.NotPositiveDefiniteError` if A + damping I is not PD);
* ``inverse_root(A, p, damping)``  = (A + damping I)^{-1/p}, by eigendecomposition or by the
  coupled Newton iteration of C.-H. Guo and N. J. Higham (SIAM J. Matrix Anal. Appl. 28, 2006)
  used by Shampoo implementations (at most 100 iterations, tolerance 1e-6).

Eigendecompositions go through the backend's ``eigh``, which retries in float64 when float32 fails.
"""

from __future__ import annotations

from typing import Any

from ..backends import backend_of
from ..errors import ShapeError

__all__ = ["damped_inverse", "eigh", "inverse_root", "matrix_power"]


def _check_square(a: Any, what: str) -> None:
    if getattr(a, "ndim", None) != 2 or a.shape[0] != a.shape[1]:
        raise ShapeError(f"{what} needs a square matrix, got shape {getattr(a, 'shape', ())}")


def eigh(a: Any) -> tuple[Any, Any]:
    """Eigenvalues (ascending) and orthonormal eigenvectors of a symmetric matrix."""
    _check_square(a, "eigh")
    return backend_of(a).eigh(a)


def _from_eigen(q: Any, values: Any, xp: Any) -> Any:
    return (q * values[None, :]) @ xp.linalg.matrix_transpose(q)


def matrix_power(a: Any, s: float, *, damping: Any = 0.0) -> Any:
    """(A + damping I)^s of a symmetric PSD matrix; eigenvalues below 0 are clipped to 0."""
    _check_square(a, "matrix_power")
    backend = backend_of(a)
    xp = backend.xp
    w, q = backend.eigh(a)  # the square check above is eigh()'s
    return _from_eigen(q, (xp.clip(w, min=0.0) + damping) ** s, xp)


def damped_inverse(a: Any, damping: Any = 0.0) -> Any:
    """(A + damping I)^{-1} of a symmetric matrix that is positive definite once damped."""
    _check_square(a, "damped_inverse")
    backend = backend_of(a)
    xp = backend.xp
    eye = xp.eye(a.shape[0], dtype=a.dtype, device=backend.device(a))
    factor = backend.cholesky(a + damping * eye)
    return backend.cholesky_solve(factor, eye)


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

    ``method="eigh"``: through the eigendecomposition (eigenvalues clipped at 0 before damping).
    ``method="newton"``: the coupled Newton iteration, p a positive integer. With
    z = (1 + p) / (2 ||A||_F), start X = z^{1/p} I, M = z A and repeat
    T = ((p + 1) I - M) / p, X <- X T, M <- T^p M until max |M - I| < tol (then X^p A = M ~ I).
    An iteration that increases the error by more than 20% is discarded and the loop stops.
    """
    _check_square(a, "inverse_root")
    if method == "eigh":
        return matrix_power(a, -1.0 / p, damping=damping)
    if method != "newton":
        raise ValueError(f"unknown method {method!r}: use 'eigh' or 'newton'")
    if int(p) != p or p < 1:
        raise ValueError(f"the coupled Newton iteration needs a positive integer p, got {p}")
    p = int(p)
    backend = backend_of(a)
    xp = backend.xp
    n = a.shape[0]
    eye = xp.eye(n, dtype=a.dtype, device=backend.device(a))
    ad = a + damping * eye
    z = (1.0 + p) / (2.0 * xp.linalg.matrix_norm(ad))
    x0 = eye * z ** (1.0 / p)
    m0 = z * ad
    err0 = xp.max(xp.abs(m0 - eye))

    def step(state: tuple) -> tuple:
        k, x, m, err, _ = state
        t = ((p + 1.0) * eye - m) / p
        tp = t
        for _ in range(p - 1):
            tp = tp @ t
        m_new = tp @ m
        x_new = x @ t
        err_new = xp.max(xp.abs(m_new - eye))
        worse = err_new > 1.2 * err
        x_next = xp.where(worse, x, x_new)
        m_next = xp.where(worse, m, m_new)
        return k + 1, x_next, m_next, xp.where(worse, err, err_new), worse

    def keep_going(state: tuple) -> Any:
        k, _, _, err, stopped = state
        return xp.logical_and(xp.logical_and(k < maxiter, err > tol), xp.logical_not(stopped))

    dev = backend.device(a)
    init = (xp.asarray(0, device=dev), x0, m0, err0, xp.asarray(False, device=dev))
    _, x, _, _, _ = backend.while_loop(keep_going, step, init)
    return x
