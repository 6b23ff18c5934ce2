"""Hutchinson's estimators of the trace and the diagonal of a square operator.

With probes z_1, ..., z_S whose entries are independent Rademacher signs (+1 or -1, each with
probability 1/2), E[z z^T] = I, hence

    tr(A)   ~ (1/S) sum_s z_s^T A z_s,          diag(A) ~ (1/S) sum_s z_s * (A z_s)

(elementwise product), both unbiased (M. F. Hutchinson, "A stochastic estimator of the trace of
the influence matrix for Laplacian smoothing splines", Comm. Statist. Simul. Comput. 18, 1989;
C. Bekas, E. Kokiopoulou and Y. Saad, "An estimator for the diagonal of a matrix", Appl. Numer.
Math. 57, 2007). Since z_i^2 = 1, the variances are

    Var(z^T A z) = 2 sum_(i != j) A_ij^2    (symmetric A),    Var(z_i (A z)_i) = sum_(j != i) A_ij^2

per probe, divided by S for the mean: both estimates are exact for a diagonal operator.

Probes come from :mod:`secondorder.random`: probe s is row s of
``rademacher(key, (S, n))``, the sign of the lowest bit of ``random.bits``. They are integers, so
NumPy, PyTorch, JAX and CuPy draw the same probes bit for bit from the same key, and the
estimates agree across backends to float rounding. The probes are applied in blocks of
``batch`` columns through :meth:`LinearOperator.matmat` (vectorised where the backend can); the
block size changes memory and speed, never the probes.
"""

from __future__ import annotations

from typing import Any

from .. import random
from ..errors import ShapeError
from .operator import LinearOperator

Array = Any
Tree = Any


def rademacher(key: Array, shape: tuple[int, ...], dtype: Any = None) -> Array:
    """Rademacher signs of ``shape``: 1 - 2 (b & 1) for the words b of
    ``random.bits(key, shape)``, cast to ``dtype`` (a dtype or ``"float32"`` / ``"float64"``;
    None: float64 where the backend has it)."""
    from ..backends import backend_of

    backend = backend_of(key)
    xp = backend.xp
    dtype = random._float_dtype(backend, dtype)
    return xp.astype(1 - 2 * (random.bits(key, shape) & 1), dtype)


def _probe_block(op: LinearOperator, key: Array, start: int, stop: int) -> Array:
    """Columns ``start:stop`` of the probe matrix: the transpose of rows ``start:stop`` of
    ``rademacher(key, (samples, n))``, drawn without the other rows (the counters of row s are
    s n .. s n + n - 1)."""
    xp = op.xp
    n = op.in_structure.size
    counters = xp.arange(start * n, stop * n, dtype=xp.int32, device=op.backend.device(key))
    y0, y1 = random.threefry2x32(key, xp.zeros_like(counters), counters)
    signs = xp.astype(1 - 2 * ((y0 ^ y1) & 1), op.dtype)
    return xp.linalg.matrix_transpose(xp.reshape(signs, (stop - start, n)))


def _probe_sums(op: LinearOperator, samples: int, key: Array | None, seed: int,
                batch: int | None) -> Array:
    """sum_s z_s * (A z_s), flat (n,), over ``samples`` probes."""
    op._require_square("a Hutchinson estimate")
    if int(samples) != samples or samples < 1:
        raise ShapeError(f"Hutchinson estimates need samples >= 1, got {samples!r}")
    samples = int(samples)
    n = op.in_structure.size
    if samples * n > 2**31 - 1:
        raise ShapeError(f"{samples} probes of length {n} exceed 2^31 - 1 random draws")
    if key is None:
        key = random.key(seed, op.backend, device=op.device)
    else:
        op._check_placement([key], "key")
    step = op.chunk if batch is None else max(1, int(batch))
    total = None
    for start in range(0, samples, step):
        stop = min(samples, start + step)
        z = _probe_block(op, key, start, stop)
        part = op.xp.sum(z * op.matmat(z), axis=1)
        total = part if total is None else total + part
    return total


def hutchinson_trace(op: LinearOperator, samples: int = 100, *, key: Array | None = None,
                     seed: int = 0, batch: int | None = None) -> Array:
    """Hutchinson's estimate (1/S) sum_s z_s^T A z_s of tr(A) (see the module docstring).

    Parameters
    ----------
    op:
        A square :class:`~secondorder.linalg.LinearOperator` on any backend.
    samples:
        The number S of Rademacher probes (default 100); the standard error falls as
        1/sqrt(S) (for symmetric A it is sqrt(2 sum_(i != j) A_ij^2 / S)).
    key:
        A :mod:`secondorder.random` key on the operator's backend; None (the default) uses
        ``random.key(seed)``.
    seed:
        The seed of the default key (default 0); ignored when ``key`` is given.
    batch:
        Probes per :meth:`~secondorder.linalg.LinearOperator.matmat` call; None (the default)
        means the operator's ``chunk``. It changes memory and speed, not the result.

    Returns
    -------
    A 0-d array of the operator's backend and dtype.
    """
    return op.xp.sum(_probe_sums(op, samples, key, seed, batch)) / samples


def hutchinson_diagonal(op: LinearOperator, samples: int = 100, *, key: Array | None = None,
                        seed: int = 0, batch: int | None = None, flat: bool = False) -> Tree:
    """Hutchinson's estimate (1/S) sum_s z_s * (A z_s) of diag(A) (Bekas, Kokiopoulou and
    Saad; see the module docstring), exact for a diagonal operator.

    Parameters
    ----------
    op:
        A square :class:`~secondorder.linalg.LinearOperator` on any backend.
    samples:
        The number S of Rademacher probes (default 100); entry i has standard error
        sqrt(sum_(j != i) A_ij^2 / S).
    key:
        A :mod:`secondorder.random` key on the operator's backend; None (the default) uses
        ``random.key(seed)``. The same key gives the same probes as
        :func:`hutchinson_trace`.
    seed:
        The seed of the default key (default 0); ignored when ``key`` is given.
    batch:
        Probes per :meth:`~secondorder.linalg.LinearOperator.matmat` call; None (the default)
        means the operator's ``chunk``. It changes memory and speed, not the result.
    flat:
        Return the flat (n,) vector (True) or a tree of the operator's input structure (False,
        the default), like :meth:`~secondorder.linalg.LinearOperator.diagonal`.
    """
    diag = _probe_sums(op, samples, key, seed, batch) / samples
    return diag if flat else op.in_structure.unravel(diag, op.xp)
