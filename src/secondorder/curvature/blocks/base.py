"""``CurvatureBlock``: one layer's or one tensor's curvature as a Kronecker product of factors.

The interface follows kfac-jax's CurvatureBlock: a block is static configuration (shapes, the
layout of its parameters) and every array lives in a :class:`~.state.BlockState` that the methods
take and return, so that each of them compiles under ``jax.jit``:

* ``init(like, kind=...)``: zero statistics and an identity cache of the given kind;
* ``batch_statistics(...)``: the factors of one batch (from layer taps or a gradient);
* ``update_statistics(state, stats, decay)``: the moving average of the factors;
* ``update_cache(state, damping, kind=..., power=..., split=...)``: damped inverses, inverse
  p-th roots or eigendecompositions of the factors;
* ``multiply(state, v, power=..., damping=..., split=...)``: v times a power of the damped block;
* ``matvec(state, v)``, ``to_dense(state)``: the undamped block itself (tests, small problems).

The block acts on a k-way tensor X (the layer's parameters rearranged by ``_to_tensor``) as the
row-major Kronecker product F_1 (x) ... (x) F_k: X -> X x_1 F_1 ... x_k F_k
(:class:`secondorder.linalg.Kronecker`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from ...backends import backend_of
from ...errors import ShapeError
from ...linalg import Kronecker, KroneckerEigen, LinearOperator, Structure
from ...linalg import matrix_function as mf
from ...linalg.operator import placement
from .state import BlockState, CacheKindError, EigenCache, FactorCache, cache_type

Array = Any
Tree = Any

#: how a damping lambda is shared among the k factors (see :func:`split_damping`)
SPLITS = ("pi", "equal", "each", "exact")


def split_damping(traces: tuple[Array, ...], damping: Any, split: str, xp: Any) -> list[Any]:
    """The damping d_i added to each factor F_i for a factored damped inverse.

    ``"pi"``: d_i = pi_i lambda^{1/k}, pi_i = t_i / (prod_j t_j)^{1/k} with t_i = tr(F_i)/dim(F_i)
    (the ``traces``), so prod pi_i = 1; for k = 2 this is K-FAC's pi-split
    d_A = pi sqrt(lambda), d_G = sqrt(lambda)/pi with pi = sqrt((tr A/dim A)/(tr G/dim G))
    (Martens and Grosse 2015, section 6.3; it equals
    :meth:`secondorder.linalg.Kronecker.factor_dampings`). Where a trace is 0 (statistics not
    yet collected) the split falls back to ``"equal"``.
    ``"equal"``: d_i = lambda^{1/k}. ``"each"``: d_i = lambda, Shampoo's and TNT's epsilon added
    to every factor.
    """
    k = len(traces)
    if split == "each":
        return [damping] * k
    base = damping ** (1.0 / k)
    if split == "equal":
        return [base] * k
    if split != "pi":
        raise CacheKindError(
            f"unknown damping split {split!r} for factored damping: use 'pi', 'equal' or 'each' "
            "(the 'exact' damping of the whole product needs kind='eigh')"
        )
    positive = None
    for t in traces:
        pos = t > 0
        positive = pos if positive is None else xp.logical_and(positive, pos)
    safe = [xp.where(positive, t, xp.ones_like(t)) for t in traces]
    log_mean = sum(xp.log(t) for t in safe) / k
    return [base * xp.exp(xp.log(t) - log_mean) for t in safe]


def _traces(factors: tuple[Array, ...], xp: Any) -> tuple[Array, ...]:
    return tuple(xp.sum(xp.linalg.diagonal(f)) / f.shape[0] for f in factors)


class CurvatureBlock(ABC):
    """Base class of curvature blocks (see the module docstring).

    Subclasses set ``dims`` (the factor sizes n_1..n_k), ``default_kind``, ``default_split`` and
    implement ``param_shapes``, ``_to_tensor``, ``_from_tensor``, ``batch_statistics`` and
    ``default_power``.
    """

    dims: tuple[int, ...]
    default_kind: str = "inverse"
    default_split: str = "pi"

    # ------------------------------------------------------------ layout (subclasses)
    @abstractmethod
    def param_like(self, like: Array) -> Tree:
        """Zeros shaped like the block's parameters (the vectors ``multiply`` takes), with the
        namespace, dtype and device of ``like``."""

    @abstractmethod
    def _to_tensor(self, v: Tree) -> Array:
        """The block's parameters as the (n_1, ..., n_k) tensor the factors act on."""

    @abstractmethod
    def _from_tensor(self, t: Array) -> Tree:
        """The inverse of :meth:`_to_tensor`."""

    @abstractmethod
    def batch_statistics(self, *args: Array) -> tuple[Array, ...]:
        """The factors of one batch, in the order of ``BlockState.factors``."""

    def default_power(self) -> float:
        """The exponent ``update_cache`` caches by default (-1: the damped inverse)."""
        return -1.0

    # ------------------------------------------------------------ state
    def init(self, like: Array, *, kind: str | None = None, power: float | None = None
             ) -> BlockState:
        """Zero statistics, count 0 and an identity cache of ``kind`` (default
        ``default_kind``), with the namespace, dtype and device of the array ``like``.

        The cache's kind is fixed here: ``update_cache`` must be called with the same kind.
        """
        kind = self.default_kind if kind is None else kind
        power = self.default_power() if power is None else power
        backend = backend_of(like)
        xp, dev, dtype = backend.xp, backend.device(like), like.dtype
        zeros = tuple(xp.zeros((n, n), dtype=dtype, device=dev) for n in self.dims)
        eyes = tuple(xp.eye(n, dtype=dtype, device=dev) for n in self.dims)
        if cache_type(kind) is EigenCache:
            ones = tuple(xp.ones((n,), dtype=dtype, device=dev) for n in self.dims)
            scales = tuple(xp.ones((), dtype=dtype, device=dev) for _ in self.dims)
            cache: FactorCache | EigenCache = EigenCache(eyes, ones, scales)
        else:
            cache = FactorCache(eyes, xp.asarray(power, dtype=dtype, device=dev))
        return BlockState(zeros, xp.asarray(0, device=dev), cache)

    def with_factors(self, state: BlockState, factors: tuple[Array, ...]) -> BlockState:
        """``state`` with the given factor statistics (count at least 1): a block built from
        one batch's statistics."""
        self._check_factors(factors, "factors")
        xp = backend_of(factors[0]).xp
        return state._replace(factors=tuple(factors), count=xp.maximum(state.count, 1))

    def _check_factors(self, factors: tuple[Array, ...], what: str) -> None:
        shapes = tuple(tuple(f.shape) for f in factors)
        want = tuple((n, n) for n in self.dims)
        if shapes != want:
            raise ShapeError(
                f"{what} have shapes {shapes} but {type(self).__name__} needs {want}; compute "
                "them with this block's batch_statistics"
            )

    def update_statistics(self, state: BlockState, stats: tuple[Array, ...], decay: Any
                          ) -> BlockState:
        """F_i <- decay F_i + (1 - decay) S_i for the batch statistics S_i.

        The first update (count 0) takes the batch value, F_i <- S_i: the statistics start
        from data (as warm-starting with a pass over data does) rather than being
        (1 - decay) times too small after the first step, as an average started from zero is.
        """
        stats = tuple(stats)
        self._check_factors(stats, "batch statistics")
        backend = backend_of(stats[0])
        xp, dtype, dev = backend.xp, stats[0].dtype, backend.device(stats[0])
        first = state.count == 0
        decay = xp.asarray(decay, dtype=dtype, device=dev)
        zero, one = xp.zeros_like(decay), xp.ones_like(decay)
        w_old = xp.where(first, zero, decay)
        w_new = xp.where(first, one, one - decay)
        factors = tuple(w_old * f + w_new * s for f, s in zip(state.factors, stats))
        return state._replace(factors=factors, count=state.count + 1)

    def update_cache(self, state: BlockState, damping: Any = 0.0, *, kind: str | None = None,
                     power: float | None = None, split: str | None = None,
                     method: str = "eigh") -> BlockState:
        """Recompute the cache from the current factors.

        ``kind="inverse"``: (F_i + d_i I)^{-1} by Cholesky (:func:`~secondorder.linalg.
        damped_inverse`); ``"root"``: (F_i + d_i I)^{power} by eigendecomposition
        (``method="eigh"``) or, for power = -1/p with p a positive integer, by the coupled Newton
        iteration (``method="newton"``; :func:`~secondorder.linalg.inverse_root`); the dampings
        d_i come from :func:`split_damping` (``split``, default ``default_split``). ``"eigh"``:
        the eigendecompositions F_i = Q_i diag(w_i) Q_i^T; damping and power are then chosen in
        :meth:`multiply` (``damping``, ``power`` and ``split`` here must be left out).
        """
        kind = self.default_kind if kind is None else kind
        wanted = cache_type(kind)
        if not isinstance(state.cache, wanted):
            have = "eigh" if isinstance(state.cache, EigenCache) else "'inverse' or 'root'"
            raise CacheKindError(
                f"the state keeps a cache of kind {have} but kind={kind!r} was asked for: create "
                f"the state with init(like, kind={kind!r})"
            )
        xp = backend_of(state.factors[0]).xp
        factors = state.factors
        if kind == "eigh":
            if power is not None or split is not None:
                raise CacheKindError(
                    "an 'eigh' cache keeps eigendecompositions: pass power, damping and split to "
                    "multiply() instead"
                )
            pairs = [mf.eigh(f) for f in factors]
            return state._replace(cache=EigenCache(
                tuple(q for _, q in pairs), tuple(xp.clip(w, min=0.0) for w, _ in pairs),
                _traces(factors, xp)))
        split = self.default_split if split is None else split
        dampings = split_damping(_traces(factors, xp), damping, split, xp)
        if kind == "inverse":
            if power is not None and power != -1.0:
                raise CacheKindError(
                    f"kind='inverse' caches power -1, not {power}; use kind='root' for other "
                    "powers"
                )
            cached = tuple(mf.damped_inverse(f, d) for f, d in zip(factors, dampings))
            power = -1.0
        else:
            power = self.default_power() if power is None else power
            cached = tuple(self._root(f, d, power, method) for f, d in zip(factors, dampings))
        like = state.cache.power
        return state._replace(cache=FactorCache(cached, xp.asarray(power, dtype=like.dtype,
                                                                    device=backend_of(like)
                                                                    .device(like))))

    @staticmethod
    def _root(f: Array, damping: Any, power: float, method: str) -> Array:
        if method == "eigh":
            return mf.matrix_power(f, power, damping=damping)
        if method != "newton":
            raise CacheKindError(f"unknown root method {method!r}: use 'eigh' or 'newton'")
        p = -1.0 / power if power else 0.0
        if p < 1 or abs(p - round(p)) > 1e-12:
            raise CacheKindError(
                f"the coupled Newton iteration computes powers -1/p for positive integers p, "
                f"not {power}; use method='eigh'"
            )
        return mf.inverse_root(f, round(p), damping=damping, method="newton")

    # ------------------------------------------------------------ products
    def multiply(self, state: BlockState, v: Tree, power: float | None = None, *,
                 damping: Any = None, split: str | None = None) -> Tree:
        """v times a power of the damped block, using the cache.

        With a :class:`FactorCache` (kinds ``"inverse"``, ``"root"``) this is
        (x)_i (F_i + d_i I)^{power} v with the damping and exponent fixed by ``update_cache``:
        leave ``damping`` and ``split`` out, and ``power`` either out or equal to the cached one.
        With an :class:`EigenCache`: ``power`` (default -1), ``damping`` (default 0) and
        ``split``: ``"exact"`` gives (F_1 (x) ... (x) F_k + lambda I)^{power} v exactly, the
        factored splits (default ``default_split``) give (x)_i (F_i + d_i I)^{power} v.
        """
        x = self._to_tensor(v)
        cache = state.cache
        if isinstance(cache, FactorCache):
            if damping is not None or split is not None:
                raise CacheKindError(
                    "this cache holds factors damped by update_cache(damping, split=...): leave "
                    "damping and split out of multiply, or keep kind='eigh' to choose them here"
                )
            self._check_power(cache.power, power)
            return self._from_tensor(Kronecker(*cache.factors, symmetric=True)._matvec(x))
        power = -1.0 if power is None else power
        damping = 0.0 if damping is None else damping
        split = self.default_split if split is None else split
        if split == "exact":
            op = KroneckerEigen(cache.vectors, cache.values, shift=damping, exponent=power)
        else:
            xp = backend_of(cache.values[0]).xp
            dampings = split_damping(cache.traces, damping, split, xp)
            op = KroneckerEigen(cache.vectors, [w + d for w, d in zip(cache.values, dampings)],
                                exponent=power)
        return self._from_tensor(op._matvec(x))

    @staticmethod
    def _check_power(cached: Array, power: float | None) -> None:
        if power is None:
            return
        backend = backend_of(cached)
        if backend.is_concrete(cached) and abs(float(backend.to_numpy(cached)) - power) > 1e-12:
            raise CacheKindError(
                f"the cache holds power {float(backend.to_numpy(cached))}, not {power}: call "
                f"update_cache(..., kind='root', power={power}) or keep kind='eigh'"
            )

    def matvec(self, state: BlockState, v: Tree) -> Tree:
        """The undamped block times v: (F_1 (x) ... (x) F_k) v."""
        return self._from_tensor(Kronecker(*state.factors, symmetric=True)._matvec(
            self._to_tensor(v)))

    def operator(self, state: BlockState, **multiply: Any) -> LinearOperator:
        """The block (no keywords) or ``multiply(state, ., **multiply)`` as a linear operator
        on the block's parameters."""
        return BlockOperator(self, state, multiply or None)

    def to_dense(self, state: BlockState) -> Array:
        """The undamped block as a dense matrix in the flat row-major coordinates of the
        parameters (``secondorder.tree.ravel`` order). Tests and small problems only."""
        return self.operator(state).to_dense()


class BlockOperator(LinearOperator):
    """A block's matrix, or a power of its damped matrix through the cache, as a symmetric
    :class:`~secondorder.linalg.LinearOperator` on the block's parameters.

    Parameters: ``block`` (a :class:`CurvatureBlock`), ``state`` (its
    :class:`~.state.BlockState`), ``multiply`` (None: the undamped block, ``block.matvec``;
    a dict: the keywords of ``block.multiply``, e.g. ``{"power": -1.0}``).
    """

    def __init__(self, block: CurvatureBlock, state: BlockState,
                 multiply: dict[str, Any] | None = None):
        self.block, self.state, self.multiply = block, state, multiply
        like = block.param_like(state.factors[0])
        s = Structure.of(like)
        super().__init__(s, s, *placement(like))

    def _matvec(self, v: Tree) -> Tree:
        if self.multiply is None:
            return self.block.matvec(self.state, v)
        return self.block.multiply(self.state, v, **self.multiply)

    _rmatvec = _matvec

    def transpose(self) -> LinearOperator:
        return self


__all__ = ["SPLITS", "BlockOperator", "CurvatureBlock", "split_damping"]
