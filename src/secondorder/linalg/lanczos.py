"""The Lanczos process with full reorthogonalisation, on every backend.

For a symmetric operator A on R^n (in flat coordinates, see :mod:`secondorder.linalg.operator`)
and a start vector v, m steps build an orthonormal basis Q_m = [q_1, ..., q_m] of the Krylov
space span{v, A v, ..., A^(m-1) v} and the tridiagonal T_m = Q_m^T A Q_m with

    A Q_m = Q_m T_m + beta_m q_(m+1) e_m^T,
    T_m = tridiag(beta_(1..m-1); alpha_(1..m); beta_(1..m-1))

(C. Lanczos, "An iteration method for the solution of the eigenvalue problem of linear
differential and integral operators", J. Res. Nat. Bur. Standards 45, 1950; Golub & Van Loan,
Matrix Computations, 4th ed., Algorithm 10.1.1). Step j computes w = A q_j, removes its
components along every earlier q_i by classical Gram-Schmidt applied twice ("twice is enough":
Giraud, Langou, Rozloznik and van den Eshof, Numer. Math. 101, 2005), so that Q_m stays
orthonormal to working precision and no spurious copies of converged eigenvalues appear, then
alpha_j = <q_j, A q_j> (both passes' coefficients on q_j), beta_j = ||w|| and q_(j+1) = w / beta_j.

The arithmetic is array-API calls on the operator's backend (NumPy, PyTorch, JAX, CuPy), so the
basis stays on the operator's device. Eigenvalues of T_m (Ritz values) approximate the extreme
eigenvalues of A: :func:`secondorder.linalg.eigsh` runs this process to convergence.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .. import random
from ..backends import backend_of
from ..errors import ShapeError
from .operator import LinearOperator, _is_flat

Array = Any
Tree = Any


class LanczosResult(NamedTuple):
    """The outcome of ``m`` Lanczos steps.

    ``alpha`` (m,): the diagonal of T_m. ``beta`` (m,): ``beta[:-1]`` is its off-diagonal and
    ``beta[-1]`` the norm of the residual beta_m q_(m+1) (0 up to rounding when the Krylov
    space is invariant). ``basis`` (n, m): the orthonormal Q_m, columns in flat coordinates.
    All three are arrays of the operator's backend and dtype.
    """

    alpha: Array
    beta: Array
    basis: Array

    def tridiagonal(self) -> Array:
        """T_m as a dense (m, m) array of the operator's backend."""
        backend = backend_of(self.alpha)
        xp, device, dtype = backend.xp, backend.device(self.alpha), self.alpha.dtype
        m = int(self.alpha.shape[0])
        t = self.alpha[:, None] * xp.eye(m, dtype=dtype, device=device)
        if m > 1:
            # row i of the superdiagonal identity scaled by beta_i (the last row is zero)
            upper = self.beta[:, None] * xp.eye(m, k=1, dtype=dtype, device=device)
            t = t + upper + xp.linalg.matrix_transpose(upper)
        return t


def start_vector(op: LinearOperator, v0: Tree | None, seed: int) -> Array:
    """The flat start vector: ``v0`` (a tree of ``op``'s input structure or its flat
    coordinates), or standard normal entries from :func:`secondorder.random.normal` with
    ``random.key(seed)`` (the same vector on every backend)."""
    n = op.in_structure.size
    if v0 is None:
        key = random.key(seed, op.backend, device=op.device)
        return random.normal(key, (n,), dtype=op.dtype)
    if _is_flat(v0, op.in_structure):
        op._check_placement([v0], "v0")
        return v0
    op._check_placement(op.in_structure.check(v0, "v0"), "v0")
    return op.in_structure.ravel(v0, op.xp)


class Krylov:
    """The running state of a Lanczos process on ``op`` from the flat vector ``v``, extended one
    step at a time by :meth:`step` (so that :func:`~secondorder.linalg.eigsh` can check
    convergence as it goes). ``alphas`` and ``betas`` are lists of 0-d arrays; ``invariant``
    becomes True when a step finds beta_j <= ``breakdown`` times the largest |alpha| or beta so
    far (an invariant subspace: T_m's eigenvalues are exact), or after n steps.

    The basis lives in an (n, capacity) array whose unused columns are zero, so the
    Gram-Schmidt products ``w @ Q`` keep one shape while it fills; the capacity doubles when it
    is full. Array shapes therefore change O(log m) times in m steps, not m times: JAX, which
    compiles every eager operation once per shape, would otherwise compile each step anew.
    """

    def __init__(self, op: LinearOperator, v: Array, *, breakdown: float | None = None):
        op._require_square("lanczos")
        self.op, self.xp = op, op.xp
        xp = self.xp
        n = op.in_structure.size
        norm = xp.linalg.vector_norm(v)
        if op.backend.is_concrete(norm) and not float(norm) > 0.0:
            raise ShapeError("the Lanczos start vector must be nonzero and finite")
        self.q = v / norm
        self.capacity = min(n, 16)
        self.basis = xp.zeros((n, self.capacity), dtype=self.q.dtype, device=op.device)
        self.alphas: list[Array] = []
        self.betas: list[Array] = []
        eps = float(np.finfo(op.backend.dtype_name(op.dtype)).eps)
        self.breakdown = 10.0 * eps * np.sqrt(n) if breakdown is None else breakdown
        self.scale = 0.0
        self.invariant = False

    @property
    def steps(self) -> int:
        return len(self.alphas)

    def _append(self, q: Array) -> Array:
        """Put ``q`` in column ``steps`` of the basis (growing it when full); returns the
        one-hot row that selects that column."""
        xp, j = self.xp, self.steps
        if j == self.capacity:
            grow = min(self.capacity, self.op.in_structure.size - self.capacity)
            pad = xp.zeros((self.basis.shape[0], grow), dtype=self.basis.dtype,
                           device=self.op.device)
            self.basis = xp.concat([self.basis, pad], axis=1)
            self.capacity += grow
        onehot = xp.astype(xp.arange(self.capacity, device=self.op.device) == j,
                           self.basis.dtype)
        self.basis = self.basis + q[:, None] * onehot[None, :]
        return onehot

    def step(self) -> None:
        """One Lanczos step with two passes of classical Gram-Schmidt against the whole basis."""
        xp, op = self.xp, self.op
        onehot = self._append(self.q)
        w = op._flat_matvec(self.q)
        h = w @ self.basis
        w = w - self.basis @ h
        h2 = w @ self.basis
        w = w - self.basis @ h2
        alpha = xp.sum((h + h2) * onehot)
        beta = xp.linalg.vector_norm(w)
        self.alphas.append(alpha)
        self.betas.append(beta)
        if op.backend.is_concrete(beta):
            self.scale = max(self.scale, abs(float(alpha)), float(beta))
            if float(beta) <= self.breakdown * self.scale or self.steps >= op.in_structure.size:
                self.invariant = True
                return
        self.q = w / beta

    def vectors(self) -> Array:
        """The (n, steps) orthonormal basis Q_m."""
        return self.basis[:, : self.steps]

    def result(self) -> LanczosResult:
        xp = self.xp
        return LanczosResult(xp.stack(self.alphas), xp.stack(self.betas), self.vectors())


def lanczos(op: LinearOperator, k: int, *, v0: Tree | None = None, seed: int = 0,
            breakdown: float | None = None) -> LanczosResult:
    """``k`` steps of the Lanczos process with full reorthogonalisation (module docstring).

    Parameters
    ----------
    op:
        A square, symmetric :class:`~secondorder.linalg.LinearOperator` (symmetry is assumed,
        not checked: for a non-symmetric operator T is not Q^T A Q).
    k:
        The number of steps, i.e. of operator products (at most ``n``, the operator's size).
    v0:
        The start vector, a tree of the operator's input structure or its flat coordinates;
        None (the default) draws standard normal entries from
        ``secondorder.random.key(seed)``, so every backend starts from the same vector.
    seed:
        The seed of the default start vector (default 0); ignored when ``v0`` is given.
    breakdown:
        The process stops early, with fewer than ``k`` steps, when beta_j falls below
        ``breakdown`` times the largest |alpha_i| or beta_i so far: the Krylov space is then
        invariant and T's eigenvalues are eigenvalues of A. None (the default) means
        10 eps sqrt(n), eps the operator dtype's machine epsilon. The check reads beta_j on
        the host; under ``jax.jit`` (traced values) it is skipped and all ``k`` steps run.

    Returns
    -------
    LanczosResult
        ``alpha`` (m,), ``beta`` (m,) and ``basis`` (n, m) with m <= k the steps taken; see
        :class:`LanczosResult` and ``LanczosResult.tridiagonal()``.
    """
    n = op.in_structure.size
    if int(k) != k or not 1 <= k <= n:
        raise ShapeError(f"lanczos needs 1 <= k <= n = {n} steps, got {k!r}")
    krylov = Krylov(op, start_vector(op, v0, seed), breakdown=breakdown)
    while krylov.steps < k and not krylov.invariant:
        krylov.step()
    return krylov.result()
