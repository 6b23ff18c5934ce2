"""Flattening of nested containers into leaves and back, with no array framework involved.

A *tree* is a leaf (any object that is not a container below) or a tuple, list, namedtuple or
dict of trees. Dict entries are visited in sorted key order, as JAX does, so that the order of the
leaves is the same on every backend. This module is the bottom of the stack: backends use it to
differentiate with respect to parameter trees, and :mod:`secondorder.tree` builds the vector
arithmetic on top of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .errors import StructureError


class TreeDef:
    """The nesting of a tree without its leaves; hashable and comparable."""

    __slots__ = ("_hash", "children", "kind", "meta", "num_leaves")

    def __init__(self, kind: str, meta: Any = None, children: tuple[TreeDef, ...] = ()):
        self.kind = kind
        self.meta = meta
        self.children = children
        self.num_leaves = 1 if kind == "leaf" else sum(c.num_leaves for c in children)
        self._hash = hash((kind, meta, children))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, TreeDef)
            and self._hash == other._hash
            and (self.kind, self.meta, self.children) == (other.kind, other.meta, other.children)
        )

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        if self.kind == "leaf":
            return "*"
        if self.kind == "dict":
            inner = ", ".join(f"{k!r}: {c!r}" for k, c in zip(self.meta, self.children))
            return "{" + inner + "}"
        inner = ", ".join(repr(c) for c in self.children)
        if self.kind == "list":
            return f"[{inner}]"
        if self.kind == "namedtuple":
            return f"{self.meta.__name__}({inner})"
        return f"({inner},)" if len(self.children) == 1 else f"({inner})"


LEAF = TreeDef("leaf")


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def flatten(tree: Any) -> tuple[list[Any], TreeDef]:
    """``(leaves, treedef)`` with the leaves in a deterministic order."""
    leaves: list[Any] = []
    treedef = _flatten_into(tree, leaves)
    return leaves, treedef


def _flatten_into(tree: Any, leaves: list[Any]) -> TreeDef:
    if isinstance(tree, dict):
        try:
            keys = tuple(sorted(tree))
        except TypeError as err:
            raise StructureError(
                "dict keys of a parameter tree must be sortable (e.g. all strings)"
            ) from err
        return TreeDef("dict", keys, tuple(_flatten_into(tree[k], leaves) for k in keys))
    if _is_namedtuple(tree):
        return TreeDef("namedtuple", type(tree), tuple(_flatten_into(c, leaves) for c in tree))
    if isinstance(tree, tuple):
        return TreeDef("tuple", None, tuple(_flatten_into(c, leaves) for c in tree))
    if isinstance(tree, list):
        return TreeDef("list", None, tuple(_flatten_into(c, leaves) for c in tree))
    leaves.append(tree)
    return LEAF


def unflatten(treedef: TreeDef, leaves: Sequence[Any]) -> Any:
    """Rebuild the tree described by ``treedef`` from ``leaves``."""
    leaves = list(leaves)
    if len(leaves) != treedef.num_leaves:
        raise StructureError(
            f"the tree structure {treedef!r} has {treedef.num_leaves} leaves but "
            f"{len(leaves)} were given"
        )
    it = iter(leaves)
    return _build(treedef, it)


def _build(treedef: TreeDef, it: Any) -> Any:
    if treedef.kind == "leaf":
        return next(it)
    children = [_build(c, it) for c in treedef.children]
    if treedef.kind == "dict":
        return dict(zip(treedef.meta, children))
    if treedef.kind == "list":
        return children
    if treedef.kind == "namedtuple":
        return treedef.meta(*children)
    return tuple(children)


def tree_map(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """Apply ``fn`` leaf by leaf to trees of one structure."""
    leaves, treedef = flatten(tree)
    others = []
    for other in rest:
        other_leaves, other_def = flatten(other)
        check_same_structure(treedef, other_def)
        others.append(other_leaves)
    return unflatten(treedef, [fn(*args) for args in zip(leaves, *others)])


def check_same_structure(treedef: TreeDef, other_def: TreeDef) -> None:
    """Raise :class:`StructureError` unless two trees have the same structure."""
    if other_def != treedef:
        raise StructureError(
            f"parameter trees do not match: {treedef!r} and {other_def!r}; pass trees with "
            "the same nesting (same container types, keys and number of leaves)"
        )
