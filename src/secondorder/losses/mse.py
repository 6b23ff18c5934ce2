"""Squared error l(f, y) = 1/2 ||f - y||^2 (batch loss: the mean over samples)."""

from __future__ import annotations

import numpy as np

from .. import random
from ..backends import backend_of
from .base import Array, Loss


class MSE(Loss):
    """1/2 ||f - y||^2 per sample.

    grad = f - y; H = I (so H^+ = I and the projector is I); conjugate
    l*(a) = 1/2 ||a||^2 + <a, y> (prox-linear sheet, "Losses"); the predictive distribution is
    N(f, I), so ``sample`` returns f + noise with standard normal noise.
    """

    name = "mse"
    canonical = True

    def per_sample(self, f: Array, y: Array) -> Array:
        xp = backend_of(f).xp
        r = f - y
        return 0.5 * xp.sum(r * r, axis=1)

    def grad(self, f: Array, y: Array) -> Array:
        return f - y

    def hvp(self, f: Array, y: Array, v: Array) -> Array:
        return v

    def hessian(self, f: Array, y: Array) -> Array:
        xp = backend_of(f).xp
        m, k = f.shape
        return xp.broadcast_to(self._eye(f)[None, :, :], (m, k, k))

    hessian_sqrt = hessian

    def pinv_hvp(self, f: Array, y: Array, v: Array) -> Array:
        return v

    def projector(self, f: Array, y: Array, v: Array) -> Array:
        return v

    def conjugate(self, a: Array, y: Array) -> Array:
        xp = backend_of(a).xp
        return xp.sum(0.5 * a * a + a * y, axis=1)

    def noise(self, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        return rng.standard_normal(shape)

    def key_noise(self, key: Array, f: Array) -> Array:
        return random.normal(key, tuple(f.shape), f.dtype)

    def _sample(self, f: Array, noise: Array) -> Array:
        return f + noise
