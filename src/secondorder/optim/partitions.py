"""Partitions of a parameter tree into S groups, for :mod:`secondorder.optim.grouped_newton`.

A :class:`Partition` assigns every entry of every leaf (canonical leaf order, dict keys sorted) to
one of ``S`` groups. Most partitions assign whole leaves (tensors); ``discrete`` and user-given
entry masks assign entries one by one. The partition matrix I_{S:P} of the GroupedNewton paper is
never formed: :meth:`Partition.expand` maps an S-vector ``eta`` to the tree ``I_{P:S} eta``.

Named partitions (the paper's partition study; ``blocks-k`` and ``alternate-k`` follow our reading
of it [inf]: consecutive blocks of tensors, and tensors dealt round-robin):

* ``canonical``: one group per tensor;
* ``trivial``: one group (S = 1), the whole parameter vector;
* ``weights_biases``: two groups, the matrices / kernels (ndim >= 2) and the vectors (ndim <= 1);
* ``layers``: one group per layer, from a model's ``layers`` (:class:`LayerInfo`) or, without a
  model, one group per top-level element of the parameter list / tuple / dict;
* ``blocks(k)``: the tensors, in canonical order, cut into k consecutive blocks of near-equal count;
* ``alternate(k)``: tensor i goes to group i mod k;
* ``discrete``: one group per scalar entry (S = P; for tests and tiny problems: it stores a one-hot
  (n x S) matrix per leaf);
* ``from_groups(params, [[leaf indices], ...])``: user-given groups of leaves (every leaf once).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._pytree import flatten, unflatten
from ..backends import backend_of
from ..errors import StructureError

Tree = Any

__all__ = ["Partition", "alternate", "blocks", "canonical", "discrete", "from_groups", "layers",
           "make_partition", "trivial", "weights_biases"]


class Partition:
    """An assignment of the entries of a parameter tree to ``size`` groups.

    ``assignment[l]`` is an ``int`` (leaf l wholly in that group) or an integer NumPy array of the
    leaf's shape (entry-wise groups). Built from a parameter tree by the functions of this module.
    """

    def __init__(self, assignment: Sequence[int | np.ndarray], shapes: Sequence[tuple[int, ...]],
                 name: str = "custom"):
        self.assignment = tuple(a if isinstance(a, int) else np.asarray(a, dtype=np.int64)
                                for a in assignment)
        self.shapes = tuple(tuple(s) for s in shapes)
        self.name = name
        used: set[int] = set()
        for a, shape in zip(self.assignment, self.shapes):
            if isinstance(a, int):
                used.add(a)
            else:
                if a.shape != shape:
                    raise StructureError(f"an entry-wise assignment of shape {a.shape} for a "
                                         f"leaf of shape {shape}")
                used.update(int(i) for i in np.unique(a))
        self.size = len(used)
        if used != set(range(self.size)):
            raise StructureError(f"partition groups must be numbered 0..S-1 with none empty, got "
                                 f"{sorted(used)}")

    def __repr__(self) -> str:
        return f"Partition({self.name!r}, S={self.size})"

    def _onehot(self, leaf_index: int, like: Any) -> Any:
        backend = backend_of(like)
        ids = self.assignment[leaf_index].reshape(-1)
        onehot = np.zeros((ids.size, self.size))
        onehot[np.arange(ids.size), ids] = 1.0
        return backend.xp.asarray(onehot, dtype=like.dtype, device=backend.device(like))

    def expand(self, eta: Any, u: Tree) -> Tree:
        """The tree V eta = Diag(u) I_{P:S} eta: leaf l of ``u`` scaled by eta of its group."""
        u_leaves, treedef = flatten(u)
        if len(u_leaves) != len(self.assignment):
            raise StructureError(f"partition for {len(self.assignment)} leaves applied to a tree "
                                 f"with {len(u_leaves)}")
        out = []
        for i, (a, leaf) in enumerate(zip(self.assignment, u_leaves)):
            if isinstance(a, int):
                out.append(leaf * eta[a])
            else:
                xp = backend_of(leaf).xp
                scale = xp.matmul(self._onehot(i, eta), eta)
                out.append(leaf * xp.reshape(scale, tuple(leaf.shape)))
        return unflatten(treedef, out)

    def reduce(self, tree: Tree) -> Any:
        """I_{S:P} applied to a tree: the S-vector of per-group sums of its entries."""
        leaves = flatten(tree)[0]
        xp = backend_of(*leaves).xp
        sums = [None] * self.size
        parts: list[Any] = []
        for i, (a, leaf) in enumerate(zip(self.assignment, leaves)):
            if isinstance(a, int):
                s = xp.sum(leaf)
                sums[a] = s if sums[a] is None else sums[a] + s
            else:
                parts.append(xp.matmul(xp.reshape(leaf, (-1,)), self._onehot(i, leaf)))
        zero = xp.sum(leaves[0]) * 0.0
        vec = xp.stack([zero if s is None else s for s in sums])
        for p in parts:
            vec = vec + p
        return vec


def _shapes(params: Tree) -> list[tuple[int, ...]]:
    return [tuple(leaf.shape) for leaf in flatten(params)[0]]


def from_groups(params: Tree, groups: Sequence[Sequence[int]], name: str = "custom"
                ) -> Partition:
    """User-given groups of leaf indices (canonical order); every leaf in exactly one group."""
    shapes = _shapes(params)
    seen = sorted(i for g in groups for i in g)
    if seen != list(range(len(shapes))):
        raise StructureError(f"groups {[list(g) for g in groups]} must list every leaf index "
                             f"0..{len(shapes) - 1} exactly once")
    assignment = [0] * len(shapes)
    for s, g in enumerate(groups):
        for i in g:
            assignment[i] = s
    return Partition(assignment, shapes, name)


def canonical(params: Tree) -> Partition:
    n = len(_shapes(params))
    return from_groups(params, [[i] for i in range(n)], "canonical")


def trivial(params: Tree) -> Partition:
    n = len(_shapes(params))
    return from_groups(params, [list(range(n))], "trivial")


def weights_biases(params: Tree) -> Partition:
    shapes = _shapes(params)
    mats = [i for i, s in enumerate(shapes) if len(s) >= 2]
    vecs = [i for i, s in enumerate(shapes) if len(s) < 2]
    return from_groups(params, [g for g in (mats, vecs) if g], "weights_biases")


def layers(params: Tree, model: Any = None) -> Partition:
    """One group per layer: from ``model.layers`` when given, else the top-level elements."""
    shapes = _shapes(params)
    groups: list[list[int]] = []
    if model is not None and getattr(model, "layers", None):
        for info in model.layers:
            groups.append([info.weight] + ([] if info.bias is None else [info.bias]))
        rest = sorted(set(range(len(shapes))) - {i for g in groups for i in g})
        groups += [[i] for i in rest]
    else:
        children = params.values() if isinstance(params, dict) else (
            params if isinstance(params, list | tuple) else [params])
        if isinstance(params, dict):
            children = [params[k] for k in sorted(params)]
        start = 0
        for child in children:
            n = len(flatten(child)[0])
            groups.append(list(range(start, start + n)))
            start += n
    return from_groups(params, [g for g in groups if g], "layers")


def blocks(params: Tree, k: int) -> Partition:
    n = len(_shapes(params))
    k = max(1, min(int(k), n))
    bounds = [round(j * n / k) for j in range(k + 1)]
    return from_groups(params, [list(range(bounds[j], bounds[j + 1])) for j in range(k)],
                       f"blocks-{k}")


def alternate(params: Tree, k: int) -> Partition:
    n = len(_shapes(params))
    k = max(1, min(int(k), n))
    return from_groups(params, [list(range(j, n, k)) for j in range(k)], f"alternate-{k}")


def discrete(params: Tree) -> Partition:
    shapes = _shapes(params)
    assignment, start = [], 0
    for s in shapes:
        n = math.prod(s)
        assignment.append(np.arange(start, start + n).reshape(s))
        start += n
    return Partition(assignment, shapes, "discrete")


def make_partition(spec: Any, params: Tree, model: Any = None) -> Partition:
    """A :class:`Partition` from a name (``"canonical"``, ``"trivial"``, ``"weights_biases"``,
    ``"layers"``, ``"blocks-k"``, ``"alternate-k"``, ``"discrete"``), a list of leaf-index lists,
    or a :class:`Partition` (returned as is)."""
    if isinstance(spec, Partition):
        return spec
    if isinstance(spec, str):
        simple = {"canonical": canonical, "trivial": trivial, "weights_biases": weights_biases,
                  "discrete": discrete}
        if spec in simple:
            return simple[spec](params)
        if spec == "layers":
            return layers(params, model)
        for prefix, fn in (("blocks-", blocks), ("alternate-", alternate)):
            if spec.startswith(prefix) and spec[len(prefix):].isdigit():
                return fn(params, int(spec[len(prefix):]))
        raise ValueError(f"unknown partition {spec!r}: use canonical, trivial, weights_biases, "
                         "layers, blocks-k, alternate-k, discrete or a list of leaf-index lists")
    return from_groups(params, spec)
