"""``Dense``: an explicit matrix, for small systems and as the oracle in tests."""

from __future__ import annotations

from typing import Any

from ..errors import ShapeError
from .operator import LinearOperator, Tree, placement
from .structure import Structure


class Dense(LinearOperator):
    """A stored (m, n) matrix acting on flat coordinates of the given structures.

    ``in_structure`` / ``out_structure`` default to plain vectors of length n / m; pass
    structures to let the matrix act on parameter trees (in their row-major flat order).
    """

    def __init__(
        self,
        matrix: Any,
        in_structure: Structure | None = None,
        out_structure: Structure | None = None,
        *,
        symmetric: bool = False,
    ):
        backend, device = placement(matrix)
        if getattr(matrix, "ndim", None) != 2:
            raise ShapeError(f"Dense needs a 2-D matrix, got shape {getattr(matrix, 'shape', ())}")
        m, n = matrix.shape
        in_s = in_structure or Structure.array((n,), matrix.dtype)
        out_s = out_structure or (
            in_s if in_structure is not None and m == n else Structure.array((m,), matrix.dtype)
        )
        if (out_s.size, in_s.size) != (m, n):
            raise ShapeError(
                f"matrix of shape {(m, n)} does not map {in_s} (size {in_s.size}) to {out_s} "
                f"(size {out_s.size})"
            )
        super().__init__(in_s, out_s, backend, device)
        self.matrix = matrix
        self.symmetric = symmetric

    def _matvec(self, v: Tree) -> Tree:
        xp = self.xp
        return self.out_structure.unravel(self.matrix @ self.in_structure.ravel(v, xp), xp)

    def _rmatvec(self, u: Tree) -> Tree:
        xp = self.xp
        flat = xp.linalg.matrix_transpose(self.matrix) @ self.out_structure.ravel(u, xp)
        return self.in_structure.unravel(flat, xp)

    def matmat(self, mat: Any) -> Any:
        return self.matrix @ mat

    def transpose(self) -> LinearOperator:
        return Dense(
            self.xp.linalg.matrix_transpose(self.matrix),
            self.out_structure,
            self.in_structure,
            symmetric=self.symmetric,
        )

    def to_dense(self) -> Any:
        return self.matrix

    def diagonal(self) -> Tree:
        self._require_square("diagonal()")
        return self.in_structure.unravel(self.xp.linalg.diagonal(self.matrix), self.xp)

    def inv(self) -> LinearOperator:
        """The inverse matrix; :class:`~secondorder.errors.NotPositiveDefiniteError` for a
        singular (or NaN) one outside ``jax.jit``."""
        self._require_square("inv()")
        from .matrix_function import checked_inv

        return Dense(
            checked_inv(self.matrix, "Dense.inv()"),
            self.out_structure,
            self.in_structure,
            symmetric=self.symmetric,
        )
