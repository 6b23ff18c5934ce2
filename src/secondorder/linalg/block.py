"""``BlockDiagonal``: independent operators on disjoint groups of leaves (e.g. one per layer)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._pytree import TreeDef, flatten, unflatten
from ..errors import ShapeError, StructureError
from .composite import same_backend
from .operator import LinearOperator, Tree
from .structure import Structure


class BlockDiagonal(LinearOperator):
    """diag(B_1, ..., B_n).

    Without ``groups`` the operator acts on a tuple ``(v_1, ..., v_n)`` with v_i in B_i's input
    space. With ``groups`` (lists of leaf indices in canonical order, see
    :func:`secondorder.tree.partition`) and ``like`` (a tree), it acts on trees shaped like
    ``like``: block i receives the leaves ``groups[i]`` (the leaf itself for a one-leaf group,
    otherwise a tuple), and must map that space to itself. ``like`` may also be the
    :class:`Structure` of such a tree.
    """

    def __init__(self, blocks: Sequence[LinearOperator], *, groups: Sequence[Sequence[int]] | None
                 = None, like: Tree = None):
        blocks = tuple(blocks)
        if not blocks:
            raise ValueError("BlockDiagonal needs at least one block")
        self.blocks = blocks
        self.groups = None if groups is None else tuple(tuple(g) for g in groups)
        same_backend(blocks)
        first = blocks[0]
        if self.groups is None:
            in_s = _tuple_structure([b.in_structure for b in blocks])
            out_s = _tuple_structure([b.out_structure for b in blocks])
        else:
            if like is None:
                raise ValueError("BlockDiagonal with groups needs like= (a tree of the space)")
            in_s = out_s = like if isinstance(like, Structure) else Structure.of(like)
            if len(self.groups) != len(blocks):
                raise StructureError(f"{len(blocks)} blocks but {len(self.groups)} groups")
            seen = sorted(i for g in self.groups for i in g)
            if seen != list(range(in_s.treedef.num_leaves)):
                raise StructureError("groups must list every leaf index exactly once")
            for b, g in zip(blocks, self.groups):
                shapes = tuple(in_s.shapes[i] for i in g)
                if not b.is_square or b.in_structure.shapes != shapes:
                    raise ShapeError(
                        f"block {b!r} does not act on the leaves {list(g)} of shapes {shapes}"
                    )
        super().__init__(in_s, out_s, first.backend, first.device)

    def _split(self, v: Tree) -> list[Any]:
        if self.groups is None:
            return list(v)
        leaves, _ = flatten(v)
        return [leaves[g[0]] if len(g) == 1 else tuple(leaves[i] for i in g) for g in self.groups]

    def _join(self, parts: list[Any]) -> Tree:
        if self.groups is None:
            return tuple(parts)
        out: list[Any] = [None] * self.in_structure.treedef.num_leaves
        for part, g in zip(parts, self.groups):
            part_leaves = [part] if len(g) == 1 else list(part)
            for i, leaf in zip(g, part_leaves):
                out[i] = leaf
        return unflatten(self.in_structure.treedef, out)

    def _matvec(self, v: Tree) -> Tree:
        return self._join([b._matvec(p) for b, p in zip(self.blocks, self._split(v))])

    def _rmatvec(self, u: Tree) -> Tree:
        return self._join([b._rmatvec(p) for b, p in zip(self.blocks, self._split(u))])

    def _rebuild(self, blocks: list[LinearOperator]) -> BlockDiagonal:
        if self.groups is None:
            return BlockDiagonal(blocks)
        # the space is unchanged; the dtype is that of the block holding leaf 0, as
        # Structure.of would report for a tree of the blocks' vectors
        s = self.in_structure
        first = next(b for b, g in zip(blocks, self.groups) if 0 in g)
        like = Structure(s.treedef, s.shapes, first.dtype)
        return BlockDiagonal(blocks, groups=self.groups, like=like)

    def transpose(self) -> LinearOperator:
        return self._rebuild([b.T for b in self.blocks])

    def inv(self) -> LinearOperator:
        return self._rebuild([b.inv() for b in self.blocks])

    def diagonal(self) -> Tree:
        self._require_square("diagonal()")
        return self._join([b.diagonal() for b in self.blocks])


def _tuple_structure(parts: list[Structure]) -> Structure:
    treedef = TreeDef("tuple", None, tuple(p.treedef for p in parts))
    shapes = tuple(s for p in parts for s in p.shapes)
    return Structure(treedef, shapes, parts[0].dtype)
