"""The :class:`LinearOperator` base class and the matrix-free operator built from functions.

An operator maps vectors of ``in_structure`` to vectors of ``out_structure``; both may be
parameter trees. Subclasses implement ``_matvec`` (and ``_rmatvec`` for the adjoint) on trees
whose structure has already been checked. Everything else (``@``, ``+``, scalar ``*``, ``.T``,
``matmat``, ``to_dense``, ``diagonal``, ``to_scipy``) is defined here in terms of those two, and
structured subclasses override what they can do faster or exactly (a Kronecker inverse, a
diagonal, ...).

Flat coordinates. Every product also takes the vector as one flat 1-D array of length
``in_size``: the leaves of the tree in canonical order (dict entries by sorted key, as
:func:`secondorder.tree.ravel` and ``jax.flatten_util.ravel_pytree`` order them), each leaf
unrolled row-major (C order), concatenated. ``op @ v`` with such a ``v`` returns the flat 1-D
array of the output in the same order, ``matmat`` works on (in_size, k) matrices of such
columns, and ``to_dense`` is the matrix in these coordinates.

Batched products. ``matmat`` and ``to_dense`` apply the operator to many columns at once with the
backend's ``vmap`` (``torch.func.vmap``, ``jax.vmap``) in chunks of :attr:`LinearOperator.chunk`
columns; on backends without a native ``vmap`` (NumPy with autograd, array-api-strict, CuPy) and
for operators whose product cannot be vectorised they loop over the columns.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from .._pytree import LEAF, flatten
from ..backends import Backend, backend_of
from ..backends._base import Backend as _BaseBackend
from ..errors import DeviceMismatchError, MixedBackendError, ShapeError
from .structure import Structure

Tree = Any


def has_native_vmap(backend: Backend) -> bool:
    """Whether ``backend`` vectorises with a framework transform (``jax.vmap``,
    ``torch.func.vmap``) rather than the protocol's default Python loop."""
    return type(backend).vmap is not _BaseBackend.vmap


def map_columns(backend: Backend, fn: Callable[[Any], Any], columns: Callable[[int, int], Any],
                k: int, chunk: int) -> Any:
    """The matrix whose column j is ``fn(c_j)`` for the k columns c_j of the blocks
    ``columns(start, stop)``, through ``backend.vmap`` in blocks of ``chunk`` columns."""
    mapped = backend.vmap(fn, in_axes=1, out_axes=1)
    step = max(1, int(chunk))
    blocks = [mapped(columns(start, min(k, start + step))) for start in range(0, k, step)]
    return blocks[0] if len(blocks) == 1 else backend.xp.concat(blocks, axis=1)


class LinearOperator(ABC):
    """A linear map between two vector spaces described by :class:`Structure` objects.

    Parameters
    ----------
    in_structure, out_structure:
        The spaces the operator maps from and to (trees, leaf shapes, dtype).
    backend:
        The framework of the arrays the operator holds and returns.
    device:
        Where new arrays (basis vectors, identities, probes) are created; None (the default)
        means the framework's default device.

    Products accept a tree of ``in_structure`` or its flat coordinates (see the module
    docstring): ``op @ v``, :meth:`matvec`, :meth:`rmatvec` (1-D in, 1-D out) and
    :meth:`matmat` ((in_size, k) in, (out_size, k) out).
    """

    in_structure: Structure
    out_structure: Structure
    backend: Backend
    #: columns per vectorised call in :meth:`matmat` and :meth:`to_dense` (memory grows with it)
    chunk: int = 256
    #: whether the backend's ``vmap`` has worked on this operator (None: not tried yet)
    _vmap_ok: bool | None = None

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
        """A v.

        ``v`` is a tree of :attr:`in_structure`, returning a tree of :attr:`out_structure`, or
        a flat 1-D array of length ``in_size`` (the order of :func:`secondorder.tree.ravel`),
        returning a flat 1-D array of length ``out_size``. When the input structure is itself
        one 1-D array the two coincide and the result has the output structure.
        """
        if _is_flat(v, self.in_structure):
            self._check_placement([v], "matvec argument")
            return self._flat_matvec(v)
        self._check_placement(self.in_structure.check(v, "matvec argument"), "matvec argument")
        return self._matvec(v)

    def rmatvec(self, u: Tree) -> Tree:
        """A^T u (the adjoint; operators are real), for a tree of :attr:`out_structure` or its
        flat coordinates (as in :meth:`matvec`)."""
        if _is_flat(u, self.out_structure):
            self._check_placement([u], "rmatvec argument")
            xp = self.xp
            return self.in_structure.ravel(self._rmatvec(self.out_structure.unravel(u, xp)), xp)
        self._check_placement(self.out_structure.check(u, "rmatvec argument"), "rmatvec argument")
        return self._rmatvec(u)

    def _flat_matvec(self, v: Any) -> Any:
        """A v on flat coordinates, unchecked: unravel, ``_matvec``, ravel."""
        xp = self.xp
        return self.out_structure.ravel(self._matvec(self.in_structure.unravel(v, xp)), xp)

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
        """A M for a flat (in_size, k) matrix M, as a flat (out_size, k) matrix.

        Column j of M holds flat coordinates (the order of :func:`secondorder.tree.ravel`).
        The columns go through the backend's ``vmap`` in chunks of :attr:`chunk` where the
        backend has a native one, else one at a time; both give the columns of ``A m_j``.
        """
        if getattr(mat, "ndim", None) != 2 or mat.shape[0] != self.in_structure.size:
            raise ShapeError(
                f"matmat expects a ({self.in_structure.size}, k) matrix, got "
                f"{tuple(getattr(mat, 'shape', ()))}"
            )
        self._check_placement([mat], "matmat argument")
        k = int(mat.shape[1])
        return self._batched(lambda start, stop: mat[:, start:stop], k)

    def _batched(self, columns: Callable[[int, int], Any], k: int) -> Any:
        """The (out_size, k) matrix whose columns are A c for the columns c of
        ``columns(start, stop)`` (an (in_size, stop - start) block), block by block."""
        xp = self.xp
        if k == 0:
            return xp.zeros((self.out_structure.size, 0), dtype=self.dtype, device=self.device)
        if has_native_vmap(self.backend) and self._vmap_ok is not False:
            try:
                out = map_columns(self.backend, self._flat_matvec, columns, k, self.chunk)
            except Exception:
                # a product that cannot be vectorised (data-dependent Python control flow,
                # an in-place update, a host sync): loop over the columns instead. A failure
                # after vmap has worked here is a real error and propagates.
                if self._vmap_ok:
                    raise
                self._vmap_ok = False
            else:
                self._vmap_ok = True
                return out
        cols = []
        for start in range(k):
            block = columns(start, start + 1)
            cols.append(self._flat_matvec(block[:, 0]))
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
        """The (out_size, in_size) matrix in flat coordinates (see the module docstring).

        Column j is A e_j, computed in blocks of :attr:`chunk` columns through the backend's
        ``vmap`` where it has one (the identity is built one block at a time), else one column
        at a time. It costs in_size products: meant for tests and small systems.
        """
        n = self.in_structure.size
        xp = self.xp

        def eye_block(start: int, stop: int) -> Any:
            return xp.eye(n, stop - start, k=-start, dtype=self.dtype, device=self.device)

        return self._batched(eye_block, n)

    def to_scipy(self) -> Any:
        """This operator as a ``scipy.sparse.linalg.LinearOperator`` on float64 NumPy vectors
        (see :func:`secondorder.linalg.to_scipy`)."""
        from .scipy import to_scipy

        return to_scipy(self)

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


def _is_flat(v: Any, structure: Structure) -> bool:
    """Whether ``v`` is a flat coordinate vector of ``structure`` rather than a tree of it: a
    1-D array of length ``structure.size`` where the structure is not that array itself."""
    if getattr(v, "ndim", None) != 1 or tuple(v.shape) != (structure.size,):
        return False
    return not (structure.treedef is LEAF and structure.shapes[0] == (structure.size,))


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
