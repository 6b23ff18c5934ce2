"""``LowRank``: B + U C V^T with a Woodbury inverse.

With B invertible (a scaled identity, a diagonal, a Kronecker product, ...), U and V of shape
(n, r) and C (r, r), the Sherman-Morrison-Woodbury identity gives

    (B + U C V^T)^{-1} = B^{-1} - B^{-1} U (C^{-1} + V^T B^{-1} U)^{-1} V^T B^{-1},

which costs r products with B^{-1} and one r x r solve. The Sherman-Morrison-Woodbury
Gauss-Newton step (Y. Ren and D. Goldfarb, "Efficient subsampled Gauss-Newton and natural
gradient methods for training neural networks", 2019) is this identity with B = lambda I,
U = V = J^T and C = H / N.
"""

from __future__ import annotations

from typing import Any

from ..errors import MixedBackendError, ShapeError
from .composite import _add_trees
from .operator import LinearOperator, Tree, placement
from .structure import Structure


class LowRank(LinearOperator):
    """B + U C V^T on flat coordinates of ``structure`` (U, V: (n, r) arrays; C: (r, r)).

    ``C`` defaults to the identity, ``V`` to ``U`` (a symmetric update), ``base`` (B) to zero;
    ``structure`` defaults to B's structure, or plain vectors of length n.
    """

    def __init__(self, u: Any, c: Any = None, v: Any = None, *,
                 base: LinearOperator | None = None, structure: Structure | None = None):
        backend, device = placement(u, c, v)
        if getattr(u, "ndim", None) != 2:
            raise ShapeError(f"U must be an (n, r) matrix, got shape {getattr(u, 'shape', ())}")
        n, r = u.shape
        v = u if v is None else v
        if tuple(v.shape) != (n, r):
            raise ShapeError(f"V must have U's shape {(n, r)}, got {tuple(v.shape)}")
        if c is not None and tuple(c.shape) != (r, r):
            raise ShapeError(f"C must be ({r}, {r}), got {tuple(c.shape)}")
        if structure is None:
            structure = base.in_structure if base is not None else Structure.array((n,), u.dtype)
        if structure.size != n:
            raise ShapeError(f"U has {n} rows but the space has dimension {structure.size}")
        if base is not None and base.backend.name != backend.name:
            raise MixedBackendError(
                f"U is a {backend.name} array but the base operator holds {base.backend.name} "
                "arrays; build both in one framework"
            )
        if base is not None and (base.in_structure != structure or not base.is_square):
            raise ShapeError("the base operator must be square on the same space as U")
        super().__init__(structure, structure, backend, device)
        self.u, self.c, self.v, self.base = u, c, v, base

    @property
    def symmetric_update(self) -> bool:
        """U C V^T with V = U (the same array)."""
        return self.v is self.u

    def _core(self, coef: Any) -> Any:
        return coef if self.c is None else self.c @ coef

    def _low_rank(self, left: Any, c: Any, right: Any, x: Tree) -> Tree:
        """left C right^T x (C = I when ``c`` is None)."""
        xp = self.xp
        s = self.in_structure
        coef = xp.linalg.matrix_transpose(right) @ s.ravel(x, xp)
        return s.unravel(left @ (coef if c is None else c @ coef), xp)

    def _matvec(self, x: Tree) -> Tree:
        low = self._low_rank(self.u, self.c, self.v, x)
        if self.base is None:
            return low
        return _add_trees([self.base._matvec(x), low])

    def _rmatvec(self, y: Tree) -> Tree:
        # (B + U C V^T)^T y = B^T y + V C^T U^T y: the product of :meth:`transpose`, without
        # building that operator on every call
        c = None if self.c is None else self.xp.linalg.matrix_transpose(self.c)
        low = self._low_rank(self.v, c, self.u, y)
        if self.base is None:
            return low
        return _add_trees([self.base.T._matvec(y), low])

    def transpose(self) -> LinearOperator:
        mt = self.xp.linalg.matrix_transpose
        c = None if self.c is None else mt(self.c)
        base = None if self.base is None else self.base.T
        return LowRank(self.v, c, self.u, base=base, structure=self.in_structure)

    def to_dense(self) -> Any:
        xp = self.xp
        low = self.u @ self._core(xp.linalg.matrix_transpose(self.v))
        return low if self.base is None else self.base.to_dense() + low

    def diagonal(self) -> Tree:
        xp = self.xp
        uc = self.u if self.c is None else self.u @ self.c
        flat = xp.sum(uc * self.v, axis=1)
        low = self.in_structure.unravel(flat, xp)
        if self.base is None:
            return low
        return _add_trees([self.base.diagonal(), low])

    def inv(self) -> LinearOperator:
        """The Woodbury inverse, itself a ``LowRank`` around B^{-1}."""
        if self.base is None:
            raise ShapeError("a pure low-rank operator U C V^T (no base) is not invertible")
        xp = self.xp
        b_inv = self.base.inv()
        binv_u = b_inv.matmat(self.u)
        binv_t_v = b_inv.T.matmat(self.v)
        r = self.u.shape[1]
        eye = xp.eye(r, dtype=self.dtype, device=self.device)
        c_inv = eye if self.c is None else xp.linalg.inv(self.c)
        capacitance = c_inv + xp.linalg.matrix_transpose(self.v) @ binv_u
        return LowRank(binv_u, -xp.linalg.inv(capacitance), binv_t_v, base=b_inv,
                       structure=self.in_structure)
