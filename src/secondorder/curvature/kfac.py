"""Per-layer Kronecker statistics from layer taps: K-FAC's factors and the KFC expansion.

For a tapped layer with homogeneous inputs a~ (bias column last) and output gradients delta:

    A = (1/m) sum_i sum_t a~_it a~_it^T,        G = (1/(m T)) sum_i sum_t delta_it delta_it^T,

with T = 1 for dense layers and T = the number of output positions for convolutions (the KFC
assumptions: spatial sums for A, spatial means for G; Kronecker-family sheet, K-FAC). The
curvature block of W~ = [W b] (d_out x (d_in + 1)) is approximated by A (x) G in K-FAC's
column-major notation, i.e. ``Kronecker(G, A)`` acting on W~ (G W~ A).

The deltas come from one VJP with respect to the taps per cotangent u (m, k):
delta_i = J_{s,i}^T u_i. The cotangents set the curvature being approximated:

* ``"exact"``: the columns of the loss-Hessian factors S_i (H_i = S_i S_i^T), k VJPs; G is then
  the exact expectation of J_s^T H J_s and, for a linear layer under squared loss, A (x) G is the
  GGN block exactly;
* ``"mc"``: gradients at targets sampled from the model (the true Fisher), one VJP per sample;
* ``"empirical"``: gradients at the batch labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import tree
from ..backends import backend_of
from ..errors import ShapeError
from ..linalg import BlockDiagonal, Kronecker, LinearOperator, ScaledIdentity, Structure
from ..linalg.operator import placement
from ..losses import Loss
from ..models.base import LayerInfo, Model
from .base import Array, Tree, check_batch, sample_targets


@dataclass
class LayerFactors:
    """The Kronecker factors of one layer: A (inputs) and G (output gradients)."""

    layer: LayerInfo
    A: Array
    G: Array


def _cotangents(loss: Loss, f: Array, y: Array, mode: str, samples: int, seed: int,
                noise: list[Any] | None, key: Array | None = None) -> list[Array]:
    if mode == "exact":
        s = loss.hessian_sqrt(f, y)
        return [s[:, :, c] for c in range(f.shape[1])]
    if mode == "empirical":
        return [loss.grad(f, y)]
    if mode == "mc":
        targets = sample_targets(loss, f, samples, seed, noise, key)
        scale = 1.0 / np.sqrt(len(targets))
        return [scale * loss.grad(f, t) for t in targets]
    raise ValueError(f"unknown mode {mode!r}: use 'exact', 'mc' or 'empirical'")


def kronecker_factors(model: Model, loss: Loss, params: Tree, batch: tuple[Array, Array], *,
                      mode: str = "exact", samples: int = 1, seed: int = 0,
                      noise: list[Any] | None = None, key: Array | None = None
                      ) -> list[LayerFactors]:
    """A and G for every tapped layer of ``model`` on ``batch`` (see the module docstring);
    ``mode="mc"`` samples its targets from ``noise``, a :mod:`secondorder.random` ``key`` or
    NumPy's Generator(``seed``), as :class:`~secondorder.curvature.Fisher` does."""
    x, y = batch
    backend = backend_of(params, x)
    check_batch(backend, x)
    xp = backend.xp
    taps = model.zero_taps(x)
    (f, inputs), pullback = backend.vjp(lambda t: model.apply(params, x, t), taps)
    loss.check(f, y)
    m = f.shape[0]
    zeros = [xp.zeros_like(a) for a in inputs]
    sums: list[Array | None] = [None] * len(taps)
    for u in _cotangents(loss, f, y, mode, samples, seed, noise, key):
        deltas = pullback((u, zeros))
        for i, d in enumerate(deltas):
            d2 = xp.reshape(d, (-1, d.shape[-1]))
            term = xp.matrix_transpose(d2) @ d2
            sums[i] = term if sums[i] is None else sums[i] + term
    factors = []
    for layer, a, g_sum, tap in zip(model.layers, inputs, sums, taps):
        positions = tap.shape[1] if tap.ndim == 3 else 1
        a2 = xp.reshape(a, (-1, a.shape[-1]))
        factors.append(LayerFactors(layer, xp.matrix_transpose(a2) @ a2 / m,
                                    g_sum / (m * positions)))
    return factors


class LayerKronecker(LinearOperator):
    """A (x) G on one layer's (bias, weight) leaves: (b, W) -> split(G [W b] A).

    The weight may be a conv kernel (C_out, C_in, kh, kw): it is flattened to
    (C_out, C_in kh kw) row-major, the im2col layout of the taps.
    """

    def __init__(self, factors: LayerFactors, bias_like: Array | None, weight_like: Array):
        self.factors = factors
        self.has_bias = bias_like is not None
        self.weight_shape = tuple(weight_like.shape)
        like = (bias_like, weight_like) if self.has_bias else weight_like
        d_out = self.weight_shape[0]
        d_in = int(np.prod(self.weight_shape[1:])) + (1 if self.has_bias else 0)
        if tuple(factors.A.shape) != (d_in, d_in) or tuple(factors.G.shape) != (d_out, d_out):
            raise ShapeError(
                f"factors A {tuple(factors.A.shape)} and G {tuple(factors.G.shape)} do not fit "
                f"a weight {self.weight_shape}{' with bias' if self.has_bias else ''}"
            )
        s = Structure.of(like)
        super().__init__(s, s, *placement(like))
        self.kron = Kronecker(factors.G, factors.A, symmetric=True)

    def _to_matrix(self, v: Tree) -> Array:
        xp = self.xp
        if not self.has_bias:
            return xp.reshape(v, (self.weight_shape[0], -1))
        b, w = v
        return xp.concat([xp.reshape(w, (self.weight_shape[0], -1)), b[:, None]], axis=1)

    def _from_matrix(self, mat: Array) -> Tree:
        xp = self.xp
        if not self.has_bias:
            return xp.reshape(mat, self.weight_shape)
        return (mat[:, -1], xp.reshape(mat[:, :-1], self.weight_shape))

    def _matvec(self, v: Tree) -> Tree:
        return self._from_matrix(self.kron._matvec(self._to_matrix(v)))

    _rmatvec = _matvec

    def transpose(self) -> LinearOperator:
        return self


def KFAC(model: Model, loss: Loss, params: Tree, batch: tuple[Array, Array], *,  # noqa: N802
         mode: str = "exact", samples: int = 1, seed: int = 0,
         noise: list[Any] | None = None, key: Array | None = None) -> BlockDiagonal:
    """The K-FAC approximation of the curvature as a block-diagonal operator on ``params``:
    one :class:`LayerKronecker` block per tapped layer; parameters outside dense and conv layers
    get a zero block."""
    leaves = tree.leaves(params)
    factors = kronecker_factors(model, loss, params, batch, mode=mode, samples=samples,
                                seed=seed, noise=noise, key=key)
    blocks, groups, covered = [], [], set()
    for lf in factors:
        layer = lf.layer
        bias = None if layer.bias is None else leaves[layer.bias]
        blocks.append(LayerKronecker(lf, bias, leaves[layer.weight]))
        group = [layer.weight] if layer.bias is None else [layer.bias, layer.weight]
        groups.append(group)
        covered.update(group)
    for i, leaf in enumerate(leaves):
        if i not in covered:
            blocks.append(ScaledIdentity(0.0, leaf))
            groups.append([i])
    return BlockDiagonal(blocks, groups=groups, like=params)
