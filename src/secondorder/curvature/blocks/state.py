"""The state of a curvature block: factor statistics (moving averages), a count, and a cache.

Every block keeps the same typed tree of arrays, so one periodic-work helper can ``cond`` between
a state and its updated copy under ``jax.jit``:

* ``BlockState.factors``: the k factor statistics in the order of the block's Kronecker product
  (``(G, A)`` for dense and convolution layers, ``(G_1, ..., G_k)`` for a k-way tensor);
* ``BlockState.count``: how many statistics updates have been made (an integer array);
* ``BlockState.cache``: a :class:`FactorCache` (``kind="inverse"`` or ``"root"``: one damped
  matrix power per factor) or an :class:`EigenCache` (``kind="eigh"``: the factors'
  eigendecompositions, from which any power and any damping follow). The cache's type is fixed
  when the state is created (``init(like, kind=...)``), so that its tree never changes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

from ...backends import backend_of
from ...errors import SecondOrderError

Array = Any

#: the cache kinds and the cache type each one keeps
KINDS = ("inverse", "root", "eigh")


class CacheKindError(SecondOrderError, ValueError):
    """A cache request that does not fit the block state (another kind, power or damping split)."""


class FactorCache(NamedTuple):
    """(F_i + d_i I)^power for every factor F_i, with the exponent that was cached."""

    factors: tuple[Array, ...]
    power: Array


class EigenCache(NamedTuple):
    """F_i = Q_i diag(w_i) Q_i^T for every factor (eigenvalues clipped at 0), and the
    normalised traces t_i = tr(F_i) / dim(F_i) that the pi-split of a damping needs."""

    vectors: tuple[Array, ...]
    values: tuple[Array, ...]
    traces: tuple[Array, ...]


class BlockState(NamedTuple):
    """Factor statistics, the number of statistics updates, and the cache (module docstring)."""

    factors: tuple[Array, ...]
    count: Array
    cache: FactorCache | EigenCache


def cache_type(kind: str) -> type:
    """The cache type that ``kind`` keeps."""
    if kind not in KINDS:
        raise CacheKindError(f"unknown cache kind {kind!r}: use 'inverse', 'root' or 'eigh'")
    return EigenCache if kind == "eigh" else FactorCache


def factor_diagonals(states: Iterable[BlockState]) -> list[Array]:
    """The diagonals of every factor statistic of ``states``: what an optimiser's guard checks
    for finiteness instead of the whole statistics.

    Every block's statistics are Gram matrices and moving averages of them (positive
    semi-definite), so |F_ij| <= sqrt(F_ii F_jj): an entry is finite when the diagonal is, and
    a NaN or inf in the inputs or gradients reaches the diagonal of its row. d numbers per
    factor are read instead of d^2."""
    return [backend_of(f).xp.linalg.diagonal(f) for st in states for f in st.factors]
