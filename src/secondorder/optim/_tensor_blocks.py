"""Per-tensor curvature blocks for Shampoo and TNT: how each parameter leaf is laid out as a
k-way tensor, split into blocks, and preconditioned block by block.

A leaf of shape s is first viewed as a tensor of shape t (``tensor_shape``: a 0-d leaf becomes
(1,); TNT views a 4-way convolution kernel as a 3-way tensor), and every axis of t longer than
``block_size`` is cut into consecutive chunks of ``block_size`` entries (the last chunk holds
the rest), as Distributed Shampoo does (R. Anil et al., "Scalable second order optimization for
deep learning", 2020, Sec. 3.4, and its PyTorch implementation's ``max_preconditioner_dim``).
Each block, the sub-tensor of one chunk per axis, is a :class:`~secondorder.curvature.blocks.
TensorBlock` with its own k factors, so a 4096 x 4096 matrix with ``block_size=1024`` has 16
blocks of two 1024 x 1024 factors rather than two 4096 x 4096 ones. Blocks never mix entries of
different leaves.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from ..backends import Backend
from ..curvature.blocks import BlockState, TensorBlock
from ..errors import NotPositiveDefiniteError
from ..linalg.kronecker import mode_products
from .base import all_finite, select

Array = Any


class LeafPlan(NamedTuple):
    """Static layout of one leaf: its shape, the tensor shape the factors act on, and the chunk
    sizes of every tensor axis."""

    shape: tuple[int, ...]
    tensor: tuple[int, ...]
    chunks: tuple[tuple[int, ...], ...]

    @property
    def block_shapes(self) -> list[tuple[int, ...]]:
        """The shapes of the blocks, in row-major order of their chunk indices."""
        return [tuple(c) for c in itertools.product(*self.chunks)]


def _chunks(n: int, block_size: int | None) -> tuple[int, ...]:
    if block_size is None or n <= block_size:
        return (n,)
    full, rest = divmod(n, block_size)
    return (block_size,) * full + ((rest,) if rest else ())


def plan_leaf(shape: Sequence[int], tensor: Sequence[int], block_size: int | None) -> LeafPlan:
    """The :class:`LeafPlan` of a leaf of ``shape`` viewed as a tensor of shape ``tensor``."""
    shape, tensor = tuple(int(s) for s in shape), tuple(int(t) for t in tensor)
    return LeafPlan(shape, tensor, tuple(_chunks(n, block_size) for n in tensor))


def split(x: Array, plan: LeafPlan, xp: Any) -> list[Array]:
    """The blocks of the leaf ``x`` (row-major order of the chunk indices)."""
    t = xp.reshape(x, plan.tensor)
    if all(len(c) == 1 for c in plan.chunks):
        return [t]
    starts = [tuple(itertools.accumulate((0, *c[:-1]))) for c in plan.chunks]
    out = []
    for index in itertools.product(*(range(len(c)) for c in plan.chunks)):
        window = tuple(slice(starts[a][i], starts[a][i] + plan.chunks[a][i])
                       for a, i in enumerate(index))
        out.append(t[window])
    return out


def join(parts: Sequence[Array], plan: LeafPlan, xp: Any) -> Array:
    """The inverse of :func:`split`: the leaf (of ``plan.shape``) from its blocks."""
    counts = [len(c) for c in plan.chunks]

    def glue(items: Sequence[Array], axis: int) -> Array:
        if axis == len(counts) - 1:
            return items[0] if len(items) == 1 else xp.concat(list(items), axis=axis)
        stride = math.prod(counts[axis + 1:])
        rows = [glue(items[j * stride:(j + 1) * stride], axis + 1) for j in range(counts[axis])]
        return rows[0] if len(rows) == 1 else xp.concat(rows, axis=axis)

    return xp.reshape(glue(list(parts), 0), plan.shape)


def init_blocks(plans: Sequence[LeafPlan], leaves: Sequence[Array], kind: str
                ) -> tuple[tuple[BlockState, ...], ...]:
    """Zero statistics and identity caches of ``kind``, one :class:`BlockState` per block."""
    return tuple(tuple(TensorBlock(s).init(leaf, kind=kind) for s in plan.block_shapes)
                 for plan, leaf in zip(plans, leaves))


def update_statistics(plans: Sequence[LeafPlan], blocks: tuple, grads: Sequence[Array],
                      decay: Any, xp: Any) -> tuple:
    """Every block's factors G_i <- decay G_i + (1 - decay) mat_i(G) mat_i(G)^T for the blocks
    G of ``grads`` (the first update takes the batch value)."""
    out = []
    for plan, states, g in zip(plans, blocks, grads):
        parts = split(g, plan, xp)
        out.append(tuple(TensorBlock(s).update_statistics(st, TensorBlock(s).batch_statistics(p),
                                                           decay)
                         for s, st, p in zip(plan.block_shapes, states, parts)))
    return tuple(out)


def guarded_cache(backend: Backend, state: BlockState, compute: Callable[[], BlockState]
                  ) -> tuple[BlockState, Array]:
    """``(compute(), 0)``, or ``(state, 1)`` when the new cache is not usable: the block keeps
    its previous inverses or roots.

    Unusable means non-finite statistics (a step that the optimiser's guard will reject), a
    factorisation that fails (:class:`~secondorder.errors.NotPositiveDefiniteError`: a coupled
    Newton iteration that diverges or stalls) or a non-finite result. Eagerly this is one Python
    branch per block; in traced code the same test selects between the new and the old cache
    with ``where``.
    """
    xp = backend.xp
    one = xp.ones((), dtype=state.factors[0].dtype, device=backend.device(state.factors[0]))
    if backend.is_concrete(state.factors[0]):
        if not bool(all_finite(state.factors)):
            return state, one
        try:
            new = compute()
        except NotPositiveDefiniteError:
            return state, one
        if backend.is_concrete(new.cache.factors[0]):
            if bool(all_finite(new.cache.factors)):
                return new, one * 0
            return state, one
    else:
        new = compute()
    ok = all_finite(new.cache.factors)
    return select(ok, new, state), xp.where(ok, one * 0, one)


def precondition(plan: LeafPlan, states: Sequence[BlockState], x: Array, xp: Any) -> Array:
    """The leaf ``x`` with every block multiplied by its cached factors,
    X_b -> X_b x_1 C_1 ... x_k C_k (the factors are symmetric)."""
    parts = split(x, plan, xp)
    out = [mode_products(p, st.cache.factors, xp) for p, st in zip(parts, states)]
    return join(out, plan, xp)
