"""``eigsh``: a few extreme eigenvalues (and eigenvectors) of a symmetric operator by Lanczos.

The Lanczos process (:mod:`secondorder.linalg.lanczos`) is extended one step at a time; after
each step the tridiagonal T_m = S diag(theta) S^T is diagonalised on the host and the Ritz pairs
(theta_i, Q_m s_i) are tested. Their residuals are known without another product,

    ||A Q_m s_i - theta_i Q_m s_i|| = beta_m |e_m^T s_i|,

and for a symmetric A some eigenvalue lies within that distance of theta_i (Golub & Van Loan,
Matrix Computations, 4th ed., section 10.1.4; Parlett, The Symmetric Eigenvalue Problem, 1998,
Theorem 4.5.1); the eigenvalue error is in fact of the order of the residual squared over the gap
to the rest of the spectrum. The k wanted pairs are accepted when every residual is at most
``tol`` times max_i |theta_i| (an estimate of ||A||). This is what ARPACK, behind
``scipy.sparse.linalg.eigsh``, tests too, but without its implicit restarts: the basis grows until
convergence, so memory is n x (steps) and ``max_iter`` bounds it.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import numpy as np

from ..errors import ShapeError
from .lanczos import Krylov, start_vector
from .operator import LinearOperator

Array = Any
Tree = Any

#: the ``which`` values: largest algebraic, smallest algebraic, largest magnitude
WHICH = ("LA", "SA", "LM")


class EigshInfo(NamedTuple):
    """How :func:`eigsh` ended: ``iterations`` (Lanczos steps, i.e. operator products),
    ``converged`` (every returned pair met the tolerance, or the Krylov space became invariant)
    and ``residuals`` (the bounds beta_m |e_m^T s_i| of the returned pairs, in their order, as a
    float64 NumPy array)."""

    iterations: int
    converged: bool
    residuals: np.ndarray


def _wanted(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    """Indices of the k wanted Ritz values, in ascending order of value."""
    if which == "LA":
        idx = np.argsort(theta)[-k:]
    elif which == "SA":
        idx = np.argsort(theta)[:k]
    else:
        idx = np.argsort(np.abs(theta), kind="stable")[-k:]
    return idx[np.argsort(theta[idx], kind="stable")]


def eigsh(op: LinearOperator, k: int = 1, which: str = "LA", *, v0: Tree | None = None,
          seed: int = 0, tol: float | None = None, max_iter: int | None = None,
          return_eigenvectors: bool = True, flat: bool = False, info: bool = False) -> Any:
    """The ``k`` eigenvalues of a symmetric operator at one end of its spectrum, by Lanczos with
    full reorthogonalisation (see the module docstring).

    Parameters
    ----------
    op:
        A square, symmetric :class:`~secondorder.linalg.LinearOperator` (a Hessian, GGN, Fisher,
        K-FAC, ...) on any backend; symmetry is assumed, not checked.
    k:
        How many eigenvalues (default 1); at most n, the operator's size.
    which:
        ``"LA"`` (the default) the largest, ``"SA"`` the smallest (most negative) and ``"LM"``
        the largest in magnitude, as in ``scipy.sparse.linalg.eigsh``.
    v0:
        The Lanczos start vector, a tree or flat coordinates; None (the default) draws standard
        normal entries from ``secondorder.random.key(seed)``, the same on every backend.
    seed:
        The seed of the default start vector (default 0).
    tol:
        Relative residual tolerance: a pair is accepted when its residual norm is at most
        ``tol * max|theta|``. None (the default) means sqrt(eps) of the operator's dtype
        (1.5e-8 in float64, 3.5e-4 in float32); the eigenvalue error is then about the residual
        squared over the spectral gap, far below the residual.
    max_iter:
        The most Lanczos steps (operator products; the basis holds that many vectors of length
        n). None (the default) means min(n, max(2k + 1, 300)). The process also stops after n
        steps or at an invariant subspace, where the answer is exact.
    return_eigenvectors:
        Whether to return the eigenvectors too (default True), as SciPy's argument does.
    flat:
        Eigenvectors as one (n, k) array of flat coordinates (True) or as a list of k trees of
        the operator's input structure (False, the default).
    info:
        Also return an :class:`EigshInfo` (default False).

    Returns
    -------
    values, or (values, vectors), with ``info`` appended when asked
        ``values``: a (k,) array of the operator's backend, dtype and device, in ascending order
        (as SciPy and ``numpy.linalg.eigh`` return them); ``vectors``: the unit eigenvectors in
        the same order. When the tolerance is not met within ``max_iter`` steps the best pairs
        are returned with a ``RuntimeWarning`` (``info.converged`` is then False).
    """
    op._require_square("eigsh")
    n = op.in_structure.size
    if int(k) != k or not 1 <= k <= n:
        raise ShapeError(f"eigsh needs 1 <= k <= n = {n}, got k={k!r}")
    if which not in WHICH:
        raise ValueError(f"unknown which={which!r}: use one of {', '.join(WHICH)}")
    k = int(k)
    backend = op.backend
    dtype_name = backend.dtype_name(op.dtype)
    if tol is None:
        tol = float(np.sqrt(np.finfo(dtype_name).eps))
    limit = min(n, max(2 * k + 1, 300)) if max_iter is None else min(n, int(max_iter))
    if limit < k:
        raise ShapeError(f"max_iter={max_iter} is less than k={k}")
    first_check = min(limit, max(2 * k + 1, 10))

    krylov = Krylov(op, start_vector(op, v0, seed))
    converged = False
    while True:
        krylov.step()
        m = krylov.steps
        if m < first_check and not krylov.invariant:
            continue
        alpha = np.array([float(a) for a in krylov.alphas])
        beta = np.array([float(b) for b in krylov.betas])
        t = np.diag(alpha) + np.diag(beta[:-1], 1) + np.diag(beta[:-1], -1)
        theta, s = np.linalg.eigh(t)
        idx = _wanted(theta, min(k, m), which)
        residuals = np.abs(beta[-1] * s[-1, idx])
        scale = max(float(np.max(np.abs(theta))), np.finfo(np.float64).tiny)
        converged = krylov.invariant or (m >= k and bool(np.all(residuals <= tol * scale)))
        if converged or m >= limit:
            break
    if m < k:  # an invariant subspace smaller than k: all its eigenvalues are exact
        k = m
    if not converged:
        warnings.warn(
            f"eigsh stopped after {m} Lanczos steps with residuals {residuals.max():.3g} above "
            f"tol * ||A|| = {tol * scale:.3g}; raise max_iter or tol",
            RuntimeWarning,
            stacklevel=2,
        )

    device = op.device
    values = backend.asarray(theta[idx], dtype=dtype_name, device=device)
    out: list[Any] = [values]
    if return_eigenvectors:
        xp = op.xp
        vectors = krylov.vectors() @ backend.asarray(s[:, idx], dtype=dtype_name, device=device)
        if not flat:
            vectors = [op.in_structure.unravel(vectors[:, j], xp) for j in range(k)]
        out.append(vectors)
    if info:
        out.append(EigshInfo(m, converged, residuals))
    return out[0] if len(out) == 1 else tuple(out)
