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

A plan made with ``squeeze=True`` (Shampoo) gives each block the factors of its axes longer than
1 only: a block of shape (1, 3) is preconditioned as a vector of 3, with one factor and the
exponent of a 1-way tensor, as Distributed Shampoo does with axes of length 1. A 1 x 1 factor
would only rescale the block, and would change k, and with it every other factor's exponent.
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
    """Static layout of one leaf: its shape, the tensor shape the factors act on, the chunk
    sizes of every tensor axis, and whether blocks drop their axes of length 1."""

    shape: tuple[int, ...]
    tensor: tuple[int, ...]
    chunks: tuple[tuple[int, ...], ...]
    squeeze: bool = False

    @property
    def windows(self) -> list[tuple[int, ...]]:
        """The shapes of the blocks as cut from the tensor, in row-major order of their chunk
        indices."""
        return [tuple(c) for c in itertools.product(*self.chunks)]

    @property
    def block_shapes(self) -> list[tuple[int, ...]]:
        """The shapes the blocks' factors act on: :attr:`windows`, without their axes of length
        1 when the plan squeezes (:func:`squeezed`)."""
        return [squeezed(w) for w in self.windows] if self.squeeze else self.windows


def squeezed(shape: Sequence[int]) -> tuple[int, ...]:
    """``shape`` without its axes of length 1; ``(1,)`` when nothing is left (a scalar, or a
    tensor of one entry)."""
    return tuple(int(n) for n in shape if n != 1) or (1,)


def _chunks(n: int, block_size: int | None) -> tuple[int, ...]:
    if block_size is None or n <= block_size:
        return (n,)
    full, rest = divmod(n, block_size)
    return (block_size,) * full + ((rest,) if rest else ())


def plan_leaf(shape: Sequence[int], tensor: Sequence[int], block_size: int | None,
              squeeze: bool = False) -> LeafPlan:
    """The :class:`LeafPlan` of a leaf of ``shape`` viewed as a tensor of shape ``tensor``
    (with ``squeeze``, axes of length 1 are dropped from ``tensor`` and from every block)."""
    shape = tuple(int(s) for s in shape)
    tensor = squeezed(tensor) if squeeze else tuple(int(t) for t in tensor)
    return LeafPlan(shape, tensor, tuple(_chunks(n, block_size) for n in tensor), squeeze)


def _reshaped(parts: Sequence[Array], shapes: Sequence[tuple[int, ...]], xp: Any) -> list[Array]:
    return [p if tuple(p.shape) == s else xp.reshape(p, s) for p, s in zip(parts, shapes)]


def split(x: Array, plan: LeafPlan, xp: Any) -> list[Array]:
    """The blocks of the leaf ``x`` (row-major order of the chunk indices), each of its shape
    in :attr:`LeafPlan.block_shapes`."""
    t = xp.reshape(x, plan.tensor)
    if all(len(c) == 1 for c in plan.chunks):
        return [t]
    starts = [tuple(itertools.accumulate((0, *c[:-1]))) for c in plan.chunks]
    out = []
    for index in itertools.product(*(range(len(c)) for c in plan.chunks)):
        window = tuple(slice(starts[a][i], starts[a][i] + plan.chunks[a][i])
                       for a, i in enumerate(index))
        out.append(t[window])
    return _reshaped(out, plan.block_shapes, xp)


def join(parts: Sequence[Array], plan: LeafPlan, xp: Any) -> Array:
    """The inverse of :func:`split`: the leaf (of ``plan.shape``) from its blocks."""
    parts = _reshaped(parts, plan.windows, xp)
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


def caches(blocks: tuple) -> tuple:
    """The cache of every block (the blocks' structure, without the statistics)."""
    return tuple(tuple(st.cache for st in states) for states in blocks)


def with_caches(blocks: tuple, new: tuple) -> tuple:
    """``blocks`` with the caches ``new`` (from :func:`caches`)."""
    return tuple(tuple(st._replace(cache=c) for st, c in zip(states, row))
                 for states, row in zip(blocks, new))


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
