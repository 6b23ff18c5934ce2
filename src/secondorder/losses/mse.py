"""Squared error l(f, y) = 1/2 ||f - y||^2 (batch loss: the mean over samples)."""

from __future__ import annotations

import numpy as np

from .. import random
from ..backends import backend_of
from .base import Array, Loss, as_rows, draw_like, sum_outputs


class MSE(Loss):
    """Squared error, l(f, y) = 1/2 ||f - y||^2 per sample; the batch loss is the mean over the m
    samples (with the default options).

    Network outputs f and targets y have shape (m, k); outputs of another shape (m, ...) (an
    image, a squeezed (m,) regression head) count prod(shape[1:]) outputs per sample, in the
    per-sample sum and in the k of ``outputs="mean"``. Formulas per sample:

    * gradient f - y; Hessian H = I, so H^+ = I, the projector H H^+ = I and the factor S = I;
    * convex conjugate l*(a) = 1/2 ||a||^2 + <a, y> (Roulet & Blondel, "Dual Gauss-Newton
      Directions for Deep Learning", 2023, Sec. 3.1, "Examples");
    * predictive distribution N(f, I): ``sample`` returns f + e with e standard normal (``noise``
      draws e with NumPy, ``key_noise`` with a :mod:`secondorder.random` key).

    Parameters
    ----------
    reduction : {"mean", "sum"}, default "mean"
        How the batch is reduced: "mean" gives (1/m) sum_i l_i, "sum" gives sum_i l_i.
    scale : float, default 1.0
        A positive constant c multiplying the per-sample loss.
    outputs : {"sum", "mean"}, default "sum"
        "mean" divides the per-sample loss by k: ``MSE(scale=2.0, outputs="mean")`` is
        PyTorch's ``nn.MSELoss()``, (1/(m k)) sum_ij (f_ij - y_ij)^2, and
        ``MSE(scale=2.0, reduction="sum")`` its ``reduction="sum"``.

    With the defaults the constructor returns this class; any other value returns a
    :class:`~secondorder.losses.Scaled` wrapping it (not an instance of this class), whose
    per-sample quantities carry the constant (see :mod:`secondorder.losses.scaled`).
    A scaled MSE samples from N(f, I/c), the Gaussian with precision c.
    """

    name = "mse"
    canonical = True

    def per_sample(self, f: Array, y: Array) -> Array:
        self.check_shapes(f, y)  # a broadcast error (or a silent broadcast) otherwise
        r = f - y
        return 0.5 * sum_outputs(r * r)

    def grad(self, f: Array, y: Array) -> Array:
        return f - y

    def hvp(self, f: Array, y: Array, v: Array) -> Array:
        return v

    def hessian(self, f: Array, y: Array) -> Array:
        xp = backend_of(f).xp
        f = as_rows(f)
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
        return draw_like(f, lambda dtype: random.normal(key, tuple(f.shape), dtype))

    def _sample(self, f: Array, noise: Array) -> Array:
        return f + noise
