"""``Fisher``: Monte-Carlo (true) and empirical Fisher information of the mean loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..backends import backend_of
from ..losses import Loss
from .base import Array, CurvatureOperator, Tree, sample_targets


class Fisher(CurvatureOperator):
    """F = (1/(m S)) sum_i sum_s g_is g_is^T with g_is = J_i^T grad l(f_i, y_is).

    ``kind="mc"``: S targets per sample drawn from the model's predictive distribution with
    noise from NumPy's Generator(``seed``) (the same on every backend), with ``noise`` given as
    a list of S arrays from ``loss.noise``, or from a :mod:`secondorder.random` ``key`` (the
    route that draws new targets per key inside ``jax.jit``); in expectation this is the GGN
    for the losses here.
    ``kind="empirical"``: the batch labels, S = 1. Products use one JVP and one VJP:
    F v = J^T (R diag(r_s^T (J v)) ) / (m S), with r_is = grad l(f_i, y_is).
    """

    def __init__(self, apply: Callable, loss: Loss, params: Tree, batch: tuple[Array, Array], *,
                 kind: str = "mc", samples: int = 1, seed: int = 0,
                 noise: list[Any] | None = None, key: Array | None = None,
                 validate: bool = True):
        super().__init__(apply, loss, params, batch, validate=validate)
        f = self.outputs
        if kind == "empirical":
            self.targets = [self.y]
        elif kind == "mc":
            self.targets = sample_targets(loss, f, samples, seed, noise, key)
        else:
            raise ValueError(f"unknown Fisher kind {kind!r}: use 'mc' or 'empirical'")
        self.kind = kind
        self.residuals = [loss.grad(f, t) for t in self.targets]

    def _output_space_product(self, u: Array) -> Array:
        xp = backend_of(u).xp
        scale = 1.0 / (self.lin.batch_size * len(self.residuals))
        total = None
        for r in self.residuals:
            term = r * xp.sum(r * u, axis=tuple(range(1, r.ndim)), keepdims=True)
            total = term if total is None else total + term
        return scale * total
