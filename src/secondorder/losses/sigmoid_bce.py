"""Sigmoid binary cross-entropy, summed over independent outputs."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import random
from ..backends import Backend, backend_of
from ..errors import LabelError
from ..functional import sigmoid, softplus
from .base import Array, Loss, as_rows, draw_like, sum_outputs


class SigmoidBCE(Loss):
    """Sigmoid binary cross-entropy summed over k independent outputs,
    l(f, y) = sum_j softplus(f_j) - y_j f_j = sum_j -y_j log s_j - (1 - y_j) log(1 - s_j) with
    s = sigmoid(f); the batch loss is the mean over the m samples (with the default options).

    Outputs f (logits) and targets y in [0, 1] (binary labels or probabilities) have shape
    (m, k). Formulas per sample:

    * gradient s - y; Hessian H = diag(s (1 - s)) (Ren, "Using Second-Order Information in
      Training Deep Neural Networks", thesis, 2022, eq. 1.5, where H_l is misprinted as
      diag(sigmoid)); factor S = diag(sqrt(s (1 - s)));
    * H^+ inverts the non-zero diagonal entries, and the projector H H^+ is 1 where
      s (1 - s) > 0 (0 where it underflows);
    * convex conjugate, with mu = y + a in [0, 1]^k:
      l*(a) = sum_j mu_j log mu_j + (1 - mu_j) log(1 - mu_j), +inf outside;
    * predictive distribution: independent Bernoulli(s_j); ``sample`` returns y_j = 1 where a
      uniform noise value is below s_j.

    Parameters
    ----------
    reduction : {"mean", "sum"}, default "mean"
        How the batch is reduced: "mean" gives (1/m) sum_i l_i, "sum" gives sum_i l_i.
    scale : float, default 1.0
        A positive constant c multiplying the per-sample loss.
    outputs : {"sum", "mean"}, default "sum"
        "mean" divides the per-sample loss by k: ``SigmoidBCE(outputs="mean")`` is PyTorch's
        ``nn.BCEWithLogitsLoss()`` (a mean over all m k entries), ``reduction="sum"`` its sum.

    With the defaults the constructor returns this class; any other value returns a
    :class:`~secondorder.losses.Scaled` wrapping it (not an instance of this class), whose
    per-sample quantities carry the constant (see :mod:`secondorder.losses.scaled`).
    """

    name = "sigmoid_bce"
    canonical = True

    #: (weak reference to the targets last found valid, their torch version counter)
    _valid: tuple[Any, Any] | None = None

    def per_sample(self, f: Array, y: Array) -> Array:
        self.check_shapes(f, y)
        self.check_values(f, y)
        return sum_outputs(softplus(f) - y * f)

    def check_values(self, f: Array, y: Array) -> None:
        """Finite targets must lie in [0, 1] (binary labels or probabilities): outside it the
        loss is unbounded below and a step reported finite=True moves towards -inf.
        :class:`~secondorder.errors.LabelError` otherwise. As for softmax cross-entropy: only
        concrete targets (one reduction, one host read, once per targets array); NaN or inf
        targets are left to the step's finiteness guard."""
        del f
        backend = backend_of(y)
        if not backend.is_concrete(y):
            return
        memo, version = self._valid, getattr(y, "_version", None)
        if memo is not None and memo[0]() is y and memo[1] == version:
            return
        xp = backend.xp
        bad = xp.any(xp.logical_and(xp.isfinite(y), xp.logical_or(y < 0, y > 1)))
        if not backend.is_concrete(bad):  # concrete targets closed over inside jax.jit
            return
        if bool(bad):
            values = backend.to_numpy(y)
            finite = values[np.isfinite(values)]
            raise LabelError(
                f"sigmoid binary cross-entropy: targets must lie in [0, 1] (labels or "
                f"probabilities); got values from {finite.min():.6g} to {finite.max():.6g}. "
                "Rescale the targets, or use MSE for unbounded regression targets")
        try:
            self._valid = (weakref.ref(y), version)
        except TypeError:
            self._valid = None

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
        f = as_rows(f)
        return self._eye(f)[None, :, :] * self._curvature(f)[:, None, :]

    def hessian_sqrt(self, f: Array, y: Array) -> Array:
        xp = backend_of(f).xp
        f = as_rows(f)
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
        return draw_like(f, lambda dtype: random.uniform(key, tuple(f.shape), dtype))

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
