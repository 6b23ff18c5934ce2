"""``to_scipy``: any operator as a ``scipy.sparse.linalg.LinearOperator``.

SciPy's iterative solvers and eigensolvers (``eigsh``, ``lobpcg``, ``cg``, ``gmres``,
``minres``, ...) work on NumPy vectors. The wrapper converts each float64 NumPy vector to an array
of the operator's backend, dtype and device, applies the operator on flat coordinates (the order
of :func:`secondorder.tree.ravel`, see :mod:`secondorder.linalg.operator`) and converts the
result back to a float64 NumPy vector. Each product therefore costs a host-device copy each way on
a GPU, and a float32 operator computes in float32 whatever SciPy passes in.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .operator import LinearOperator


def to_scipy(op: LinearOperator) -> Any:
    """``op`` as a ``scipy.sparse.linalg.LinearOperator`` of shape ``op.shape`` and dtype
    float64.

    Parameters
    ----------
    op:
        Any :class:`~secondorder.linalg.LinearOperator` (a curvature operator, a Kronecker
        factorisation, a sum, ...), on any backend and device.

    Returns
    -------
    scipy.sparse.linalg.LinearOperator
        ``matvec`` / ``matmat`` call ``op`` on flat coordinates (``matmat`` through
        :meth:`LinearOperator.matmat`, vectorised where the backend can); ``rmatvec`` /
        ``rmatmat`` call the adjoint (column by column), which raises for an operator without
        one. Inputs are cast to the operator's dtype and moved to its device; outputs come back
        as float64 NumPy arrays.

    Example
    -------
    >>> import scipy.sparse.linalg as sla
    >>> top3 = sla.eigsh(GGN(model, loss, params, batch).to_scipy(), k=3, which="LA")[0]
    """
    import scipy.sparse.linalg as sla

    backend, device = op.backend, op.device
    dtype = backend.dtype_name(op.dtype)
    n_out, n_in = op.shape

    def to_backend(x: Any) -> Any:
        return backend.asarray(np.ascontiguousarray(x, dtype=np.float64), dtype=dtype,
                               device=device)

    def to_host(y: Any) -> np.ndarray:
        # a writable copy: SciPy's solvers update their vectors in place, and JAX hands out
        # read-only views
        return np.array(backend.to_numpy(y), dtype=np.float64)

    def matvec(x: np.ndarray) -> np.ndarray:
        return to_host(op._flat_matvec(to_backend(np.reshape(x, (n_in,)))))

    def rmatvec(x: np.ndarray) -> np.ndarray:
        xp = op.xp
        u = op.out_structure.unravel(to_backend(np.reshape(x, (n_out,))), xp)
        return to_host(op.in_structure.ravel(op._rmatvec(u), xp))

    def matmat(x: np.ndarray) -> np.ndarray:
        return to_host(op.matmat(to_backend(x)))

    def rmatmat(x: np.ndarray) -> np.ndarray:
        return np.stack([rmatvec(x[:, j]) for j in range(x.shape[1])], axis=1)

    return sla.LinearOperator((n_out, n_in), matvec=matvec, rmatvec=rmatvec, matmat=matmat,
                              rmatmat=rmatmat, dtype=np.float64)
