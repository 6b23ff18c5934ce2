"""Sigmoid binary cross-entropy, summed over independent outputs."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .. import random
from ..backends import Backend, backend_of
from ..errors import LabelError
from ..functional import sigmoid, softplus
from .base import Array, Loss


class SigmoidBCE(Loss):
    """sum_j softplus(f_j) - y_j f_j = sum_j -y_j log s_j - (1 - y_j) log(1 - s_j), s = sigmoid(f).

    grad = s - y; H = diag(s (1 - s)) (the Kronecker-family sheet's erratum: the thesis writes
    diag(s)); H^+ inverts the non-zero entries, and the projector is 1 where s (1 - s) > 0.
    Conjugate: with mu = y + a in [0, 1], l*(a) = sum_j mu_j log mu_j + (1 - mu_j) log(1 - mu_j).
    ``sample`` draws y_j = 1 with probability s_j.
    """

    name = "sigmoid_bce"
    canonical = True

    def per_sample(self, f: Array, y: Array) -> Array:
        xp = backend_of(f).xp
        return xp.sum(softplus(f) - y * f, axis=1)

    def grad(self, f: Array, y: Array) -> Array:
        return sigmoid(f) - y

    def _curvature(self, f: Array) -> Array:
        s = sigmoid(f)
        return s * (1.0 - s)

    def hvp(self, f: Array, y: Array, v: Array) -> Array:
        return self.hvp_at(f, y)(v)

    def hvp_at(self, f: Array, y: Array) -> Callable[[Array], Array]:
        h = self._curvature(f)
        return lambda v: h * v

    def hessian(self, f: Array, y: Array) -> Array:
        return self._eye(f)[None, :, :] * self._curvature(f)[:, None, :]

    def hessian_sqrt(self, f: Array, y: Array) -> Array:
        xp = backend_of(f).xp
        return self._eye(f)[None, :, :] * xp.sqrt(self._curvature(f))[:, None, :]

    def _nonzero(self, f: Array) -> tuple[Array, Array]:
        xp = backend_of(f).xp
        h = self._curvature(f)
        ok = h > xp.finfo(f.dtype).smallest_normal
        return h, ok

    def pinv_hvp(self, f: Array, y: Array, v: Array) -> Array:
        xp = backend_of(f).xp
        h, ok = self._nonzero(f)
        return xp.where(ok, v / xp.where(ok, h, xp.ones_like(h)), xp.zeros_like(v))

    def projector(self, f: Array, y: Array, v: Array) -> Array:
        xp = backend_of(f).xp
        _, ok = self._nonzero(f)
        return xp.where(ok, v, xp.zeros_like(v))

    def conjugate(self, a: Array, y: Array) -> Array:
        xp = backend_of(a).xp
        mu = y + a
        inside = xp.all(xp.logical_and(mu >= 0, mu <= 1), axis=1)

        def xlogx(t: Array) -> Array:
            safe = xp.where(t > 0, t, xp.ones_like(t))
            return xp.where(t > 0, t * xp.log(safe), xp.zeros_like(t))

        value = xp.sum(xlogx(mu) + xlogx(1.0 - mu), axis=1)
        return xp.where(inside, value, xp.full_like(value, float("inf")))

    def noise(self, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        return rng.random(shape)

    def key_noise(self, key: Array, f: Array) -> Array:
        return random.uniform(key, tuple(f.shape), f.dtype)

    def _sample(self, f: Array, noise: Array) -> Array:
        xp = backend_of(f).xp
        return xp.astype(noise < sigmoid(f), f.dtype)

    def _check_targets(self, backend: Backend, f: Array, y: Array) -> None:
        super()._check_targets(backend, f, y)
        if backend.is_concrete(y):
            t = backend.to_numpy(y)
            if np.any(t < 0) or np.any(t > 1):
                raise LabelError(
                    "sigmoid BCE: targets must lie in [0, 1] (binary labels or probabilities)"
                )
