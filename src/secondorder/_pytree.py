"""Flattening of nested containers into leaves and back, with no array framework involved.

A *tree* is one of

* a dict (keys must be sortable, e.g. all strings), a tuple, a namedtuple or a list of trees;
* ``None``, an empty node with no leaves (as in JAX and ``torch.utils._pytree``), so that
  ``eqx.partition(model, eqx.is_array)`` output, whose non-array fields are ``None``, is a tree;
* any other JAX pytree node (equinox modules, flax ``FrozenDict`` and struct dataclasses, types
  registered with ``jax.tree_util.register_pytree_node``), when ``jax`` is already imported: it is
  flattened one level by :func:`jax.tree_util.tree_flatten` and rebuilt by JAX. JAX is never
  imported here; an object of a type JAX does not know is a leaf;
* anything else is a leaf (arrays, Python scalars).

Leaf order is canonical: dict entries are visited in sorted key order, as JAX does, so the leaves
come out in the same order on every backend, whatever order the user inserted the keys in. The
:class:`TreeDef` still remembers each dict's own key order (and whether it was an
``OrderedDict``), and :func:`unflatten` rebuilds the user's order: ``torch.func`` compares dicts
by key order, so a tangent must have the parameters' order. Two dicts with the same keys in
different orders have the same structure (JAX returns sorted dicts for an insertion-ordered
input); binary tree operations keep the order of the first operand that has one
(:func:`check_same_structure`).

This module is the bottom of the stack: backends use it to differentiate with respect to parameter
trees, and :mod:`secondorder.tree` builds the vector arithmetic on top of it. Flattening is on hot
paths, so the kind of node is looked up per type in a cache.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence
from itertools import islice
from typing import Any

from .errors import StructureError


class TreeDef:
    """The nesting of a tree without its leaves; hashable and comparable.

    ``kind`` is ``"leaf"``, ``"dict"``, ``"tuple"``, ``"namedtuple"``, ``"list"``, ``"none"`` or
    ``"jax"``; ``meta`` is the sorted keys of a dict, the class of a namedtuple or the one-level
    ``jax.tree_util.PyTreeDef`` of a JAX node. ``order`` (dicts only) is ``None`` for a plain dict
    whose keys were inserted in sorted order, else ``(dict class, keys in the user's order,
    their positions in the sorted order)``; it is not part of equality or the hash.
    ``custom_order`` says whether this node or one below it has such an order; ``flat`` that
    every child is a leaf.
    """

    __slots__ = ("_hash", "children", "custom_order", "flat", "kind", "meta", "num_leaves",
                 "order")

    def __init__(self, kind: str, meta: Any = None, children: tuple[TreeDef, ...] = (),
                 order: tuple[type, tuple[Any, ...], tuple[int, ...]] | None = None):
        self.kind = kind
        self.meta = meta
        self.children = children
        self.order = order
        # one plain loop instead of three generator expressions: a step builds dozens of these
        num, flat, custom = 0, True, order is not None
        for c in children:
            num += c.num_leaves
            if c.kind != "leaf":
                flat = False  # only leaves below: rebuilt in one go
            if c.custom_order:
                custom = True
        self.num_leaves = 1 if kind == "leaf" else num
        self.flat = flat
        self.custom_order = custom
        self._hash: int | None = None  # computed when first asked: flatten never needs it

    def __eq__(self, other: object) -> bool:
        return self is other or (
            isinstance(other, TreeDef)
            and self.kind == other.kind
            and self.meta == other.meta
            and self.children == other.children
        )

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash((self.kind, self.meta, self.children))
        return self._hash

    def __repr__(self) -> str:
        if self.kind == "leaf":
            return "*"
        if self.kind == "none":
            return "None"
        if self.kind == "dict":
            by_key = dict(zip(self.meta, self.children))
            keys = self.meta if self.order is None else self.order[1]
            return "{" + ", ".join(f"{k!r}: {by_key[k]!r}" for k in keys) + "}"
        inner = ", ".join(repr(c) for c in self.children)
        if self.kind == "list":
            return f"[{inner}]"
        if self.kind == "namedtuple":
            return f"{self.meta.__name__}({inner})"
        if self.kind == "jax":
            return f"{self.meta}({inner})"
        return f"({inner},)" if len(self.children) == 1 else f"({inner})"


LEAF = TreeDef("leaf")
NONE = TreeDef("none")


# ------------------------------------------------------------------------------- flattening
Flattener = Callable[[Any, list[Any]], TreeDef]


def _flatten_leaf(tree: Any, leaves: list[Any]) -> TreeDef:
    leaves.append(tree)
    return LEAF


def _flatten_none(tree: Any, leaves: list[Any]) -> TreeDef:
    return NONE


def _flatten_dict(tree: dict, leaves: list[Any]) -> TreeDef:
    keys = tuple(tree)
    known = _SORTED.get(keys)
    if known is None:
        known = _SORTED[keys] = _sort_keys(keys)
        if len(_SORTED) > 4096:  # a program with ever new key sets: start again
            _SORTED.clear()
    canonical, positions = known
    if isinstance(tree, OrderedDict):
        order = (OrderedDict, keys, positions or tuple(range(len(keys))))
    else:
        order = None if positions is None else (dict, keys, positions)
    return TreeDef("dict", canonical, _flatten_children([tree[k] for k in canonical], leaves),
                   order)


#: dict keys in insertion order -> (sorted keys, positions of the keys in the sorted order, or
#: None when they are sorted already)
_SORTED: dict[tuple[Any, ...], tuple[tuple[Any, ...], tuple[int, ...] | None]] = {}


def _sort_keys(keys: tuple[Any, ...]) -> tuple[tuple[Any, ...], tuple[int, ...] | None]:
    try:
        canonical = tuple(sorted(keys))
    except TypeError as err:
        raise StructureError(
            "dict keys of a parameter tree must be sortable (e.g. all strings); got "
            f"{[type(k).__name__ for k in keys]}"
        ) from err
    if canonical == keys:
        return canonical, None
    position = {k: i for i, k in enumerate(canonical)}
    return canonical, tuple(position[k] for k in keys)


def _flatten_children(values: Any, leaves: list[Any]) -> tuple[TreeDef, ...]:
    """The structures of a sequence's elements, their leaves appended to ``leaves``: a plain
    loop with :func:`_flatten_into` inlined (most elements are leaves or dicts, and a step
    flattens trees dozens of times)."""
    children = []
    for value in values:
        kind = _KIND.get(type(value)) or _classify(type(value))
        if kind is _flatten_leaf:
            leaves.append(value)
            children.append(LEAF)
        else:
            children.append(kind(value, leaves))
    return tuple(children)


def _flatten_tuple(tree: tuple, leaves: list[Any]) -> TreeDef:
    return TreeDef("tuple", None, _flatten_children(tree, leaves))


def _flatten_namedtuple(tree: tuple, leaves: list[Any]) -> TreeDef:
    return TreeDef("namedtuple", type(tree), _flatten_children(tree, leaves))


def _flatten_list(tree: list, leaves: list[Any]) -> TreeDef:
    return TreeDef("list", None, _flatten_children(tree, leaves))


def _flatten_jax(tree: Any, leaves: list[Any]) -> TreeDef:
    # one level: every child is a leaf for JAX (None included), a subtree for us
    children, jax_def = sys.modules["jax"].tree_util.tree_flatten(
        tree, is_leaf=lambda node: node is not tree
    )
    return TreeDef("jax", jax_def, tuple(_flatten_into(c, leaves) for c in children))


#: type -> how to flatten it; filled on first sight of each type
_KIND: dict[type, Flattener] = {
    dict: _flatten_dict,
    tuple: _flatten_tuple,
    list: _flatten_list,
    type(None): _flatten_none,
}
#: types classified as leaves while jax was not imported: JAX may know them once it is
_PROVISIONAL: list[type] = []


def _is_jax_node(cls: type) -> bool:
    """Whether JAX flattens ``cls`` as a pytree node (jax is imported)."""
    tree_util = sys.modules["jax"].tree_util
    if hasattr(tree_util, "is_tree_node"):
        return tree_util.is_tree_node(cls)
    # jax without is_tree_node (0.7.2, the release kfac-jax 0.0.8 runs on): there every way of
    # registering a node type (register_pytree_node and the functions built on it,
    # register_dataclass) records it in this registry
    from jax._src.tree_util import _registry

    return cls in _registry


def _classify(cls: type) -> Flattener:
    if issubclass(cls, dict):
        kind: Flattener = _flatten_dict
    elif issubclass(cls, tuple):
        kind = _flatten_namedtuple if hasattr(cls, "_fields") else _flatten_tuple
    elif issubclass(cls, list):
        kind = _flatten_list
    elif "jax" not in sys.modules:
        _PROVISIONAL.append(cls)
        kind = _flatten_leaf
    elif _is_jax_node(cls):
        kind = _flatten_jax
    else:
        kind = _flatten_leaf
    _KIND[cls] = kind
    return kind


def _flatten_into(tree: Any, leaves: list[Any]) -> TreeDef:
    kind = _KIND.get(type(tree))
    if kind is None:
        kind = _classify(type(tree))
    return kind(tree, leaves)


def flatten(tree: Any) -> tuple[list[Any], TreeDef]:
    """``(leaves, treedef)`` with the leaves in canonical order (dict keys sorted)."""
    if _PROVISIONAL and "jax" in sys.modules:
        for cls in _PROVISIONAL:  # classify again now that JAX can be asked
            _KIND.pop(cls, None)
        _PROVISIONAL.clear()
    leaves: list[Any] = []
    treedef = _flatten_into(tree, leaves)
    return leaves, treedef


# ------------------------------------------------------------------------------- rebuilding
def unflatten(treedef: TreeDef, leaves: Sequence[Any]) -> Any:
    """Rebuild the tree described by ``treedef`` from ``leaves`` (in canonical order); dicts
    get the key order (and ``OrderedDict`` class) recorded in ``treedef``."""
    if not isinstance(leaves, list | tuple):
        leaves = list(leaves)
    if len(leaves) != treedef.num_leaves:
        raise StructureError(
            f"the tree structure {treedef!r} has {treedef.num_leaves} leaves but "
            f"{len(leaves)} were given"
        )
    if treedef is LEAF:
        return leaves[0]
    return _build(treedef, iter(leaves))


def _build(treedef: TreeDef, it: Any) -> Any:
    kind = treedef.kind
    if kind == "leaf":
        return next(it)
    if kind == "none":
        return None
    if treedef.flat:
        children = list(islice(it, len(treedef.children)))
    else:
        children = [_build(c, it) for c in treedef.children]
    if kind == "dict":
        if treedef.order is None:
            return dict(zip(treedef.meta, children))
        cls, keys, positions = treedef.order
        return cls(zip(keys, [children[i] for i in positions]))
    if kind == "list":
        return children
    if kind == "namedtuple":
        return treedef.meta(*children)
    if kind == "jax":
        return treedef.meta.unflatten(children)
    return tuple(children)


def tree_map(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """Apply ``fn`` leaf by leaf to trees of one structure (the result has ``tree``'s dict key
    order)."""
    leaves, treedef = flatten(tree)
    others = []
    for other in rest:
        other_leaves, other_def = flatten(other)
        check_same_structure(treedef, other_def)
        others.append(other_leaves)
    return unflatten(treedef, [fn(*args) for args in zip(leaves, *others)])


def check_same_structure(treedef: TreeDef, other_def: TreeDef) -> TreeDef:
    """Raise :class:`StructureError` unless two trees have the same structure; return the one
    to rebuild results with: ``treedef``, unless only ``other_def`` carries a user's dict key
    order (the first operand's order wins; a user's order wins over the canonical one)."""
    if other_def != treedef:
        raise StructureError(
            f"parameter trees do not match: {treedef!r} and {other_def!r}; pass trees with "
            "the same nesting (same container types, keys and number of leaves)"
        )
    return other_def if other_def.custom_order and not treedef.custom_order else treedef
