"""Parameter trees as vectors.

Networks keep their parameters in tuples, lists and dicts of arrays. The functions here treat such
a tree as one vector in R^p, p the total number of entries, so that solvers and optimisers can add,
scale and take inner products of parameters without knowing how they are nested. Everything is
plain Python over the leaves plus array-API calls, so it works on every backend and inside
``jax.jit``, ``jax.grad`` and ``torch.func`` transforms.

Each operation flattens its operands once. Arrays of two frameworks still raise
:class:`~secondorder.errors.MixedBackendError` (decided per type of leaf: one look-up for a tree
of one array type), but devices are not compared here: placement is checked where data enters
the library (:func:`secondorder.backends.backend_of` in the entry points), not in the loops
that call these operations. Solvers flatten once per solve and work on leaf lists with the
unchecked helpers :func:`_dot_leaves` and :func:`_axpy_leaves` (the same arithmetic, the same
bits).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from ._pytree import LEAF, TreeDef, check_same_structure, flatten, tree_map
from ._pytree import unflatten as _unflatten
from .backends import _backend_of_leaves, backend_of, namespace
from .errors import StructureError

__all__ = [
    "LEAF",
    "TreeDef",
    "add",
    "axpy",
    "combine",
    "flatten",
    "leaves",
    "map",
    "neg",
    "norm",
    "ones_like",
    "partition",
    "ravel",
    "scale",
    "size",
    "structure",
    "sub",
    "unflatten",
    "unravel",
    "vdot",
    "zeros_like",
]

Tree = Any

map = tree_map  # noqa: A001 - tree.map is the natural name inside this namespace


def leaves(tree: Tree) -> list[Any]:
    """The arrays of ``tree`` in canonical order (dict keys sorted)."""
    return flatten(tree)[0]


def structure(tree: Tree) -> TreeDef:
    """The nesting of ``tree`` without its arrays."""
    return flatten(tree)[1]


def unflatten(treedef: TreeDef, leaves: Sequence[Any]) -> Tree:
    """The tree of structure ``treedef`` (from :func:`structure`) holding ``leaves`` in
    canonical order: ``unflatten(structure(t), leaves(t))`` rebuilds ``t`` (e.g. an optimiser
    state from arrays saved with ``np.savez``)."""
    return _unflatten(treedef, list(leaves))


def size(tree: Tree) -> int:
    """Total number of entries p of all leaves."""
    return sum(math.prod(leaf.shape) for leaf in leaves(tree))


def _leaves_of_pair(x: Tree, y: Tree) -> tuple[list[Any], list[Any], TreeDef]:
    """Flatten ``x`` and ``y`` once: a named error for mixed frameworks, then for different
    structures; returns both leaf lists and the structure to rebuild results with."""
    x_leaves, x_def = flatten(x)
    y_leaves, y_def = flatten(y)
    _backend_of_leaves(x_leaves + y_leaves, check_device=False)
    return x_leaves, y_leaves, check_same_structure(x_def, y_def)


def add(x: Tree, y: Tree) -> Tree:
    """x + y."""
    x_leaves, y_leaves, treedef = _leaves_of_pair(x, y)
    return _unflatten(treedef, [a + b for a, b in zip(x_leaves, y_leaves)])


def sub(x: Tree, y: Tree) -> Tree:
    """x - y."""
    x_leaves, y_leaves, treedef = _leaves_of_pair(x, y)
    return _unflatten(treedef, [a - b for a, b in zip(x_leaves, y_leaves)])


def neg(x: Tree) -> Tree:
    """-x."""
    return tree_map(lambda a: -a, x)


def scale(alpha: Any, x: Tree) -> Tree:
    """alpha x, for a Python or 0-d array scalar alpha."""
    return tree_map(lambda a: alpha * a, x)


def axpy(alpha: Any, x: Tree, y: Tree) -> Tree:
    """alpha x + y (the BLAS name)."""
    x_leaves, y_leaves, treedef = _leaves_of_pair(x, y)
    return _unflatten(treedef, _axpy_leaves(alpha, x_leaves, y_leaves))


def _axpy_leaves(alpha: Any, x_leaves: Sequence[Any], y_leaves: Sequence[Any]) -> list[Any]:
    """alpha x + y on leaf lists, unchecked (one fused kernel per leaf where the backend has
    one: :meth:`Backend.axpy`)."""
    if not x_leaves:
        return []
    axpy_leaf = backend_of(x_leaves[0]).axpy
    return [axpy_leaf(alpha, a, b) for a, b in zip(x_leaves, y_leaves)]


def vdot(x: Tree, y: Tree) -> Any:
    """Inner product sum_i <x_i, y_i> over matching leaves, as a 0-d array."""
    x_leaves, x_def = flatten(x)
    y_leaves, y_def = flatten(y)
    if x_def != y_def:
        raise StructureError(f"vdot of trees with different structures: {x_def!r} and {y_def!r}")
    xp = _backend_of_leaves(x_leaves + y_leaves, check_device=False).xp
    for a, b in zip(x_leaves, y_leaves):
        if a.shape != b.shape:
            raise StructureError(f"vdot of leaves with shapes {a.shape} and {b.shape}")
    return _dot_leaves(xp, x_leaves, y_leaves)


def _dot_leaves(xp: Any, x_leaves: Sequence[Any], y_leaves: Sequence[Any]) -> Any:
    """sum_i sum(x_i * y_i) on leaf lists, unchecked (the arithmetic of :func:`vdot`)."""
    if not x_leaves:
        return None
    dot = backend_of(x_leaves[0]).dot  # one fused kernel per leaf where the backend has one
    total = None
    for a, b in zip(x_leaves, y_leaves):
        term = dot(a, b)
        total = term if total is None else total + term
    return total


def norm(x: Tree) -> Any:
    """Euclidean norm sqrt(<x, x>) of the whole tree."""
    x_leaves, _ = flatten(x)
    xp = _backend_of_leaves(x_leaves, check_device=False).xp
    return xp.sqrt(_dot_leaves(xp, x_leaves, x_leaves))


def zeros_like(x: Tree) -> Tree:
    """A tree of zeros with the shapes, dtypes and devices of ``x``."""
    x_leaves, treedef = flatten(x)
    xp = _backend_of_leaves(x_leaves, check_device=False).xp
    return _unflatten(treedef, [xp.zeros_like(a) for a in x_leaves])


def ones_like(x: Tree) -> Tree:
    """A tree of ones with the shapes, dtypes and devices of ``x``."""
    x_leaves, treedef = flatten(x)
    xp = _backend_of_leaves(x_leaves, check_device=False).xp
    return _unflatten(treedef, [xp.ones_like(a) for a in x_leaves])


def ravel(x: Tree) -> tuple[Any, Callable[[Any], Tree]]:
    """``(flat, unravel)``: all leaves concatenated into one vector, and the inverse map.

    ``unravel(flat)`` splits a vector of length ``size(x)`` back into a tree shaped like ``x``.
    """
    x_leaves, treedef = flatten(x)
    xp = _backend_of_leaves(x_leaves, check_device=False).xp
    flat = xp.concat([xp.reshape(a, (-1,)) for a in x_leaves]) if x_leaves else None
    shapes = [tuple(a.shape) for a in x_leaves]
    return flat, _unraveler(treedef, shapes)


def _unraveler(treedef: TreeDef, shapes: Sequence[tuple[int, ...]]) -> Callable[[Any], Tree]:
    sizes = [math.prod(s) for s in shapes]
    total = sum(sizes)

    def unravel_fn(flat: Any) -> Tree:
        if tuple(flat.shape) != (total,):
            raise StructureError(
                f"unravel expects a vector of length {total}, got shape {tuple(flat.shape)}"
            )
        xp = namespace(flat)
        out, start = [], 0
        for shape, n in zip(shapes, sizes):
            out.append(xp.reshape(flat[start : start + n], shape))
            start += n
        return _unflatten(treedef, out)

    return unravel_fn


def unravel(flat: Any, like: Tree) -> Tree:
    """Split the vector ``flat`` into a tree shaped like ``like``."""
    x_leaves, treedef = flatten(like)
    return _unraveler(treedef, [tuple(a.shape) for a in x_leaves])(flat)


def partition(x: Tree, groups: Sequence[Sequence[int]]) -> list[tuple[Any, ...]]:
    """Split the leaves of ``x`` into groups: ``groups[g]`` lists leaf indices (canonical order).

    Every leaf must appear in exactly one group. Returns one tuple of leaves per group; use
    :func:`combine` to put (possibly transformed) groups back into a tree like ``x``.
    """
    x_leaves, _ = flatten(x)
    _check_groups(groups, len(x_leaves))
    return [tuple(x_leaves[i] for i in group) for group in groups]


def combine(parts: Sequence[Sequence[Any]], groups: Sequence[Sequence[int]], like: Tree) -> Tree:
    """Inverse of :func:`partition`: put the groups of leaves back into a tree like ``like``."""
    _, treedef = flatten(like)
    _check_groups(groups, treedef.num_leaves)
    out: list[Any] = [None] * treedef.num_leaves
    for part, group in zip(parts, groups):
        part = tuple(part)
        if len(part) != len(group):
            raise StructureError(f"group {list(group)} needs {len(group)} leaves, got {len(part)}")
        for i, leaf in zip(group, part):
            out[i] = leaf
    return _unflatten(treedef, out)


def _check_groups(groups: Sequence[Sequence[int]], n: int) -> None:
    seen = sorted(i for g in groups for i in g)
    if seen != list(range(n)):
        raise StructureError(
            f"groups {[list(g) for g in groups]} must list every leaf index 0..{n - 1} "
            "exactly once"
        )
