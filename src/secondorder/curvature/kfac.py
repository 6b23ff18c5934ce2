"""Per-layer Kronecker statistics from layer taps: K-FAC's factors and the KFC expansion.

For a tapped layer with homogeneous inputs a~ (bias column last) and output gradients delta:

    A = (1/m) sum_i sum_t a~_it a~_it^T,        G = (1/(m T)) sum_i sum_t delta_it delta_it^T,

with T = 1 for dense layers and T = the number of output positions for convolutions (the KFC
assumptions: spatial sums for A, spatial means for G; R. Grosse and J. Martens, "A
Kronecker-factored approximate Fisher matrix for convolution layers", ICML 2016). The
curvature block of W~ = [W b] (d_out x (d_in + 1)) is approximated by A (x) G in K-FAC's
column-major notation, i.e. ``Kronecker(G, A)`` acting on W~ (G W~ A).

The deltas come from one VJP with respect to the taps per cotangent u (m, k):
delta_i = J_{s,i}^T u_i. The cotangents set the curvature being approximated:

* ``"exact"``: the columns of the loss-Hessian factors S_i (H_i = S_i S_i^T), k VJPs; G is then
  the exact expectation of J_s^T H J_s and, for a linear layer under squared loss, A (x) G is the
  GGN block exactly;
* ``"mc"``: gradients at targets sampled from the model (the true Fisher), one VJP per sample;
* ``"empirical"``: gradients at the batch labels.

The batch statistics themselves are :func:`~.blocks.kronecker_statistics`, the function the
curvature blocks use; each :class:`LayerKronecker` holds a :class:`~.blocks.DenseBlock` or
:class:`~.blocks.ConvBlock` and its state, and its inverse, powers and damped inverses go through
the block's cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import tree
from ..backends import backend_of
from ..backends.bridge import for_autodiff
from ..errors import NotPositiveDefiniteError, ShapeError
from ..linalg import BlockDiagonal, LinearOperator, ScaledIdentity, Structure
from ..linalg.operator import placement
from ..losses import Loss
from ..models.base import LayerInfo, Model
from .base import Array, Tree, check_batch, sample_targets
from .blocks import BlockOperator, BlockState, ConvBlock, DenseBlock, KroneckerBlock
from .blocks.statistics import kronecker_statistics


@dataclass
class LayerFactors:
    """The Kronecker factors of one layer: A (inputs) and G (output gradients)."""

    layer: LayerInfo
    A: Array
    G: Array


def _cotangents(loss: Loss, f: Array, y: Array, mode: str, samples: int, seed: int,
                noise: list[Any] | None, key: Array | None = None) -> list[Array]:
    if mode == "exact":
        # the loss's square root on the k = prod(shape[1:]) outputs of a sample (row-major;
        # an image, a sequence's logits), each of its k columns a cotangent of f's own shape
        xp = backend_of(f).xp
        s = loss.hessian_sqrt(f, y)
        return [xp.reshape(s[:, :, c], f.shape) for c in range(s.shape[2])]
    if mode == "empirical":
        return [loss.grad(f, y)]
    if mode == "mc":
        targets = sample_targets(loss, f, samples, seed, noise, key)
        scale = 1.0 / math.sqrt(len(targets))  # a Python float keeps float32 in float32
        return [scale * loss.grad(f, t) for t in targets]
    raise ValueError(f"unknown mode {mode!r}: use 'exact', 'mc' or 'empirical'")


def layer_statistics(model: Model, params: Tree, x: Array,
                     cotangents: Callable[[Array], list[Array]],
                     statistic: Callable[[int, Array, list[Array]], Any]) -> tuple[Array, list]:
    """``(f, [statistic(i, a_i, deltas_i) for every tapped layer i])`` from one tapped forward
    pass of ``model`` on ``x``: a_i the layer's inputs, deltas_i its output gradients
    J_{s,i}^T u for each cotangent u of ``cotangents(f)`` (one VJP per cotangent).

    ``statistic`` must return batch means over the samples of ``a_i`` (trees of arrays, e.g.
    K-FAC's factors). On a network over a sharded batch
    (:class:`secondorder.distributed.DataParallel`, which has ``mean_reduce``) the pass keeps
    each rank's own samples (``f`` is still the whole batch's, so the cotangents are), each rank
    forms the means of its shard, and one mean over the ranks makes them the whole batch's:
    the factors are all-reduced (d_in^2 + d_out^2 numbers per layer) instead of the layer
    inputs and gradients gathered (batch x (d_in + d_out)).
    """
    backend = backend_of(params, x)
    xp = backend.xp
    sharded = hasattr(model, "mean_reduce")
    taps = model.local_zero_taps(x, params) if sharded else model.zero_taps(x, params)
    params_f, x_f = for_autodiff(backend, (params, x))
    (f, inputs), pullback = backend.vjp(lambda t: model.apply(params_f, x_f, t), taps)
    zeros = [xp.zeros_like(a) for a in inputs]
    deltas: list[list[Array]] = [[] for _ in taps]
    for u in cotangents(f):
        for i, d in enumerate(pullback((u, zeros))):
            deltas[i].append(d)
    out = [statistic(i, a, ds) for i, (a, ds) in enumerate(zip(inputs, deltas))]
    return f, (model.mean_reduce(out) if sharded else out)


def kronecker_factors(model: Model, loss: Loss, params: Tree, batch: tuple[Array, Array], *,
                      mode: str = "exact", samples: int = 1, seed: int = 0,
                      noise: list[Any] | None = None, key: Array | None = None
                      ) -> list[LayerFactors]:
    """A and G for every tapped layer of ``model`` on ``batch`` (see the module docstring);
    ``mode="mc"`` samples its targets from ``noise``, a :mod:`secondorder.random` ``key`` or
    NumPy's Generator(``seed``), as :class:`~secondorder.curvature.Fisher` does."""
    x, y = batch
    check_batch(backend_of(params, x), x)

    def cotangents(f: Array) -> list[Array]:
        loss.check(f, y)
        return _cotangents(loss, f, y, mode, samples, seed, noise, key)

    _, stats = layer_statistics(model, params, x, cotangents,
                                lambda i, a, ds: kronecker_statistics(a, ds))
    return [LayerFactors(layer, *ag) for layer, ag in zip(model.layers, stats)]


class LayerKronecker(LinearOperator):
    """A (x) G on one layer's (bias, weight) leaves: (b, W) -> split(G [W b] A).

    The weight may be a conv kernel (C_out, C_in, kh, kw): it is flattened to
    (C_out, C_in kh kw) row-major, the im2col layout of the taps. The operator holds a
    :class:`~.blocks.DenseBlock` or :class:`~.blocks.ConvBlock` (``block``) and its state
    (``state``, with the factors ``(G, A)``); :meth:`inv`, :meth:`power` and
    :meth:`damped_inverse` go through the block's cache.
    """

    def __init__(self, factors: LayerFactors, bias_like: Array | None, weight_like: Array):
        self.factors = factors
        self.has_bias = bias_like is not None
        self.weight_shape = tuple(weight_like.shape)
        like = (bias_like, weight_like) if self.has_bias else weight_like
        cls = ConvBlock if factors.layer.kind == "conv" else DenseBlock
        self.block: KroneckerBlock = cls(
            self.weight_shape, bias=self.has_bias,
            bias_shape=tuple(bias_like.shape) if self.has_bias else None)
        if (tuple(factors.A.shape) != (self.block.d_in,) * 2
                or tuple(factors.G.shape) != (self.block.d_out,) * 2):
            raise ShapeError(
                f"factors A {tuple(factors.A.shape)} and G {tuple(factors.G.shape)} do not fit "
                f"a weight {self.weight_shape}{' with bias' if self.has_bias else ''}"
            )
        s = Structure.of(like)
        super().__init__(s, s, *placement(like))
        self.state = self.block.with_factors(self.block.init(factors.A), (factors.G, factors.A))

    def _matvec(self, v: Tree) -> Tree:
        return self.block.matvec(self.state, v)

    _rmatvec = _matvec

    def transpose(self) -> LinearOperator:
        return self

    def _cached(self, state: BlockState, **multiply: Any) -> LinearOperator:
        return BlockOperator(self.block, state, multiply)

    def _eigen(self) -> BlockState:
        """The state with an ``"eigh"`` cache of the factors."""
        state = self.block.init(self.factors.A, kind="eigh")
        return self.block.update_cache(self.block.with_factors(state, self.state.factors),
                                       kind="eigh")

    def inv(self) -> LinearOperator:
        """(A (x) G)^{-1} = A^{-1} (x) G^{-1}, by Cholesky (the block's ``"inverse"`` cache);
        raises :class:`~secondorder.errors.NotPositiveDefiniteError` for singular factors."""
        return self._cached(self.block.update_cache(self.state, 0.0, kind="inverse"))

    def power(self, p: float) -> LinearOperator:
        """(A (x) G)^p = A^p (x) G^p through the factors' eigendecompositions."""
        return self._cached(self._eigen(), power=p, damping=0.0, split="exact")

    def damped_inverse(self, damping: Any, method: str = "pi") -> LinearOperator:
        """An inverse of A (x) G + lambda I: ``method="exact"`` exactly (eigendecompositions of
        A and G), ``"pi"`` (K-FAC's pi-split: Martens and Grosse, ICML 2015, section 6.3) or
        ``"equal"`` as (A + d_A I)^{-1} (x) (G + d_G I)^{-1} (:func:`~.blocks.split_damping`)."""
        if method == "exact":
            return self._cached(self._eigen(), power=-1.0, damping=damping, split="exact")
        state = self.block.update_cache(self.state, damping, kind="inverse", split=method)
        return self._cached(state)


class KFACOperator(BlockDiagonal):
    """The block-diagonal K-FAC operator that :func:`KFAC` returns: a :class:`BlockDiagonal` of
    :class:`LayerKronecker` blocks (zero blocks for parameters outside tapped layers) with
    :meth:`inv`, :meth:`power` and :meth:`damped_inverse` taken block by block."""

    def _map_blocks(self, layer: Any, zero: Any) -> BlockDiagonal:
        return self._rebuild([layer(b) if isinstance(b, LayerKronecker) else zero(b)
                              for b in self.blocks])

    def _singular(self, what: str) -> Any:
        def fail(_: LinearOperator) -> LinearOperator:
            raise NotPositiveDefiniteError(
                f"K-FAC is 0 on the parameters outside dense and conv layers, so {what} does "
                "not exist; use damped_inverse(damping) instead"
            )
        return fail

    def inv(self) -> LinearOperator:
        """The inverse of every layer's A (x) G (see :meth:`LayerKronecker.inv`)."""
        return self._map_blocks(lambda b: b.inv(), self._singular("the inverse"))

    def power(self, p: float) -> LinearOperator:
        """Every layer's (A (x) G)^p; p > 0 keeps the zero blocks at 0."""
        zero = (lambda b: b) if p > 0 else self._singular(f"the power {p}")
        return self._map_blocks(lambda b: b.power(p), zero)

    def damped_inverse(self, damping: Any, method: str = "pi") -> LinearOperator:
        """An inverse of K-FAC + damping I: every layer's
        :meth:`LayerKronecker.damped_inverse` (``method`` "pi", "equal" or "exact"), and
        I / damping on the parameters outside tapped layers."""
        return self._map_blocks(lambda b: b.damped_inverse(damping, method),
                                lambda b: ScaledIdentity(1.0 / damping, b.like))


def KFAC(model: Model, loss: Loss, params: Tree, batch: tuple[Array, Array], *,  # noqa: N802
         mode: str = "exact", samples: int = 1, seed: int = 0,
         noise: list[Any] | None = None, key: Array | None = None) -> KFACOperator:
    """The K-FAC approximation of the curvature as a block-diagonal operator on ``params``:
    one :class:`LayerKronecker` block per tapped layer; parameters outside dense and conv layers
    get a zero block. The result (:class:`KFACOperator`) has ``inv()``, ``power(p)`` and
    ``damped_inverse(damping, method="pi"|"equal"|"exact")``."""
    factors = kronecker_factors(model, loss, params, batch, mode=mode, samples=samples,
                                seed=seed, noise=noise, key=key)
    return assemble(factors, params)


def assemble(factors: list[Any], params: Tree, block: Callable[..., Any] | None = None
             ) -> KFACOperator:
    """The :class:`KFACOperator` of per-layer ``factors`` (from :func:`kronecker_factors`) on
    ``params``: ``block(factors, bias, weight)`` per tapped layer (default
    :class:`LayerKronecker`; an adapter whose kernels have another layout passes its own), a
    zero block on every parameter outside tapped layers."""
    block = LayerKronecker if block is None else block
    leaves = tree.leaves(params)
    blocks, groups, covered = [], [], set()
    for lf in factors:
        layer = lf.layer
        bias = None if layer.bias is None else leaves[layer.bias]
        blocks.append(block(lf, bias, leaves[layer.weight]))
        group = [layer.weight] if layer.bias is None else [layer.bias, layer.weight]
        groups.append(group)
        covered.update(group)
    for i, leaf in enumerate(leaves):
        if i not in covered:
            blocks.append(ScaledIdentity(0.0, leaf))
            groups.append([i])
    return KFACOperator(blocks, groups=groups, like=params)
