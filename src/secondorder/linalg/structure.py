"""The vector space an operator maps from or to: a tree structure, leaf shapes and a dtype.

Operators in :mod:`secondorder.linalg` act on parameter trees as well as on plain arrays. A
:class:`Structure` records what such a vector looks like, checks arguments against it and
converts between the tree and its flat (row-major) coordinates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .._pytree import LEAF, TreeDef, flatten, unflatten
from ..errors import ShapeError, StructureError


@dataclass(frozen=True, eq=False)
class Structure:
    """Tree nesting + leaf shapes + dtype of the vectors of one space."""

    treedef: TreeDef
    shapes: tuple[tuple[int, ...], ...]
    dtype: Any

    @classmethod
    def of(cls, tree: Any) -> Structure:
        """The structure of an existing tree (or array)."""
        leaves, treedef = flatten(tree)
        if not leaves:
            raise StructureError("a vector needs at least one array leaf")
        return cls(treedef, tuple(tuple(leaf.shape) for leaf in leaves), leaves[0].dtype)

    @classmethod
    def array(cls, shape: tuple[int, ...], dtype: Any) -> Structure:
        """A single array of ``shape``."""
        return cls(LEAF, (tuple(int(n) for n in shape),), dtype)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Structure)
            and self.treedef == other.treedef
            and self.shapes == other.shapes
        )

    def __hash__(self) -> int:
        return hash((self.treedef, self.shapes))

    def __repr__(self) -> str:
        if self.treedef is LEAF:
            return f"Structure(array{self.shapes[0]})"
        return f"Structure({self.treedef!r}, shapes={self.shapes})"

    @property
    def size(self) -> int:
        """Dimension of the space (total number of entries)."""
        return sum(math.prod(s) for s in self.shapes)

    def check(self, tree: Any, what: str = "vector") -> list[Any]:
        """The leaves of ``tree``, after checking its nesting and shapes against this structure."""
        leaves, treedef = flatten(tree)
        if treedef != self.treedef:
            raise StructureError(
                f"{what} has tree structure {treedef!r}, the operator expects {self.treedef!r}"
            )
        for i, (leaf, shape) in enumerate(zip(leaves, self.shapes)):
            got = tuple(getattr(leaf, "shape", ()))
            if got != shape:
                where = "" if self.treedef is LEAF else f" (leaf {i})"
                raise ShapeError(
                    f"{what}{where} has shape {got}, the operator expects {shape}; reshape it "
                    "or build the operator for this shape"
                )
        return leaves

    def ravel(self, tree: Any, xp: Any) -> Any:
        """Flat coordinates of ``tree``: a vector of length :attr:`size`, the leaves in canonical
        order (dict entries by sorted key, as :func:`secondorder.tree.ravel`), each unrolled
        row-major, concatenated."""
        leaves = self.check(tree)
        if len(leaves) == 1:
            return xp.reshape(leaves[0], (-1,))
        return xp.concat([xp.reshape(a, (-1,)) for a in leaves])

    def unravel(self, flat: Any, xp: Any) -> Any:
        """The tree whose flat coordinates are ``flat`` (the inverse of :meth:`ravel`)."""
        if tuple(flat.shape) != (self.size,):
            raise ShapeError(f"expected a flat vector of length {self.size}, got {flat.shape}")
        out, start = [], 0
        for shape in self.shapes:
            n = math.prod(shape)
            out.append(xp.reshape(flat[start : start + n], shape))
            start += n
        return unflatten(self.treedef, out)
