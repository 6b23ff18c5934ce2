"""The :class:`LinearOperator` base class and the matrix-free operator built from functions.

An operator maps vectors of ``in_structure`` to vectors of ``out_structure``; both may be
parameter trees. Subclasses implement ``_matvec`` (and ``_rmatvec`` for the adjoint) on trees
whose structure has already been checked. Everything else (``@``, ``+``, scalar ``*``, ``.T``,
``to_dense``, ``diagonal``) is defined here in terms of those two, and structured subclasses
override what they can do faster or exactly (a Kronecker inverse, a diagonal, ...).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from .._pytree import flatten
from ..backends import Backend, backend_of
from ..errors import DeviceMismatchError, MixedBackendError, ShapeError
from .structure import Structure

Tree = Any


class LinearOperator(ABC):
    """A linear map between two vector spaces described by :class:`Structure` objects."""

    in_structure: Structure
    out_structure: Structure
    backend: Backend

    def __init__(
        self,
        in_structure: Structure,
        out_structure: Structure,
        backend: Backend,
        device: Any = None,
    ):
        self.in_structure = in_structure
        self.out_structure = out_structure
        self.backend = backend
        #: where new arrays (basis vectors, identities) are created; None: the default device
        self.device = device

    # ---------------------------------------------------------------- basics
    @property
    def xp(self) -> Any:
        return self.backend.xp

    @property
    def dtype(self) -> Any:
        return self.in_structure.dtype

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_size, in_size)``: the shape of the operator as a matrix."""
        return (self.out_structure.size, self.in_structure.size)

    @property
    def is_square(self) -> bool:
        return self.in_structure == self.out_structure

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.in_structure} -> {self.out_structure})"

    def _require_square(self, what: str) -> None:
        if not self.is_square:
            raise ShapeError(
                f"{what} needs a square operator with equal input and output structure; this "
                f"one maps {self.in_structure} to {self.out_structure}"
            )

    # ---------------------------------------------------------------- products
    def matvec(self, v: Tree) -> Tree:
        """A v."""
        self._check_placement(self.in_structure.check(v, "matvec argument"), "matvec argument")
        return self._matvec(v)

    def rmatvec(self, u: Tree) -> Tree:
        """A^T u (the adjoint; operators are real)."""
        self._check_placement(self.out_structure.check(u, "rmatvec argument"), "rmatvec argument")
        return self._rmatvec(u)

    def _check_placement(self, leaves: list[Any], what: str) -> None:
        """Named errors for a vector of another framework or on another device."""
        got = backend_of(leaves)
        if got.name != self.backend.name:
            raise MixedBackendError(
                f"{what} is a {got.name} array but the operator holds {self.backend.name} "
                f"arrays; convert it with secondorder.backends.get({self.backend.name!r})"
                ".asarray(x)"
            )
        if self.device is not None:
            dev = got.device(leaves[0])
            if dev is not None and dev != self.device:
                raise DeviceMismatchError(
                    f"{what} is on {dev} but the operator lives on {self.device}; move one of them"
                )

    @abstractmethod
    def _matvec(self, v: Tree) -> Tree:
        """A v for a ``v`` whose structure has been checked."""

    def _rmatvec(self, u: Tree) -> Tree:
        raise NotImplementedError(
            f"{type(self).__name__} has no adjoint product; build it with an rmatvec"
        )

    def matmat(self, mat: Any) -> Any:
        """A M for a flat (in_size, r) matrix M, as a flat (out_size, r) matrix."""
        xp = self.xp
        if mat.ndim != 2 or mat.shape[0] != self.in_structure.size:
            raise ShapeError(
                f"matmat expects a ({self.in_structure.size}, r) matrix, got {tuple(mat.shape)}"
            )
        cols = [
            self.out_structure.ravel(self._matvec(self.in_structure.unravel(mat[:, j], xp)), xp)
            for j in range(mat.shape[1])
        ]
        return xp.stack(cols, axis=1)

    # ---------------------------------------------------------------- algebra
    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, LinearOperator):
            from .composite import Product

            return Product(self, other)
        return self.matvec(other)

    def __add__(self, other: Any) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        from .composite import Sum

        return Sum(self, other)

    def __sub__(self, other: Any) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return self + (-1.0) * other

    def __neg__(self) -> LinearOperator:
        return (-1.0) * self

    def __mul__(self, alpha: Any) -> LinearOperator:
        if isinstance(alpha, LinearOperator):
            return NotImplemented
        from .composite import Scaled

        return Scaled(alpha, self)

    __rmul__ = __mul__

    def __truediv__(self, alpha: Any) -> LinearOperator:
        return self * (1.0 / alpha)

    @property
    def T(self) -> LinearOperator:  # noqa: N802 - the matrix notation
        """The adjoint (transpose) operator."""
        return self.transpose()

    def transpose(self) -> LinearOperator:
        from .composite import Adjoint

        return Adjoint(self)

    # ---------------------------------------------------------------- dense views
    def to_dense(self) -> Any:
        """The (out_size, in_size) matrix in flat row-major coordinates (tests, small systems)."""
        n = self.in_structure.size
        eye = self.xp.eye(n, dtype=self.dtype, device=self.device)
        return self.matmat(eye)

    def diagonal(self) -> Tree:
        """The diagonal, shaped like the input structure (square operators only)."""
        self._require_square("diagonal()")
        flat = self.xp.linalg.diagonal(self.to_dense())
        return self.in_structure.unravel(flat, self.xp)

    def inv(self) -> LinearOperator:
        """The inverse operator, where the structure gives it in closed form."""
        raise NotImplementedError(
            f"{type(self).__name__} has no closed-form inverse; solve with "
            "secondorder.linalg.cg instead"
        )


def placement(*trees: Any) -> tuple[Backend, Any]:
    """``(backend, device)`` of the arrays in ``trees``; raises on mixed frameworks/devices."""
    backend = backend_of(*trees)
    for tree in trees:
        for leaf in flatten(tree)[0]:
            if backend.is_array(leaf) and getattr(leaf, "ndim", None) is not None:
                return backend, backend.device(leaf)
    return backend, None


class FunctionOperator(LinearOperator):
    """A matrix-free operator given by its product function(s).

    ``FunctionOperator(fn, like)`` with ``fn(v) = A v`` and ``like`` a tree (or array) of the
    input shape; pass ``out_like`` for a rectangular map and ``rmatvec`` for its adjoint.
    ``symmetric=True`` declares A = A^T, which makes ``rmatvec`` the same function.
    """

    def __init__(
        self,
        matvec: Callable[[Tree], Tree],
        like: Tree,
        *,
        out_like: Tree = None,
        rmatvec: Callable[[Tree], Tree] | None = None,
        symmetric: bool = False,
    ):
        in_s = Structure.of(like)
        out_s = in_s if out_like is None else Structure.of(out_like)
        super().__init__(in_s, out_s, *placement(like, out_like))
        self._fn = matvec
        self._rfn = matvec if symmetric and rmatvec is None else rmatvec
        self.symmetric = symmetric

    def _matvec(self, v: Tree) -> Tree:
        return self._fn(v)

    def _rmatvec(self, u: Tree) -> Tree:
        if self._rfn is None:
            return super()._rmatvec(u)
        return self._rfn(u)
