"""The Rahimi & Recht two-layer linear network of the CurveBall paper (Table 1).

Targets y = A x with A (d x d) of condition number ``cond`` (singular values log-spaced from 1
to 1/cond between random orthogonal bases), inputs x ~ N(0, I), model W1 W2 x, loss
E_x ||W1 W2 x - y||^2 = ||W1 W2 - A||_F^2. The network returns sqrt(2) W1 W2 x against targets
sqrt(2) A x so that the mean squared-error loss 1/2 ||f - y||^2 is that expectation's estimate.
The stopping tolerance is measured on the exact ||W1 W2 - A||_F^2. The paper gives no sizes:
d = 6 and 32 samples per batch here; starts W_i ~ N(0, 1/d).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backends import backend_of
from .base import Array, Problem


class LinearNetwork(Problem):
    """``LinearNetwork(d=6, cond=1e5, batch_size=32, seed=0)``: parameters (W1, W2)."""

    name = "linear-network"

    def __init__(self, d: int = 6, cond: float = 1e5, batch_size: int = 32, seed: int = 0):
        self.d, self.cond, self.batch_size = int(d), float(cond), int(batch_size)
        rng = np.random.default_rng(seed)
        q1, _ = np.linalg.qr(rng.standard_normal((d, d)))
        q2, _ = np.linalg.qr(rng.standard_normal((d, d)))
        self.A = (q1 * np.geomspace(1.0, 1.0 / cond, d)) @ q2.T

    def apply(self, params: Any, x: Array) -> Array:
        xp = backend_of(x).xp
        w1, w2 = params
        return 2.0**0.5 * (x @ xp.matrix_transpose(w2) @ xp.matrix_transpose(w1))

    def objective(self, params: Any) -> Array:
        w1, w2 = params
        xp = backend_of(w1).xp
        diff = w1 @ w2 - xp.asarray(self.A, dtype=w1.dtype)
        return xp.sum(diff * diff)

    def _numpy_start(self, rng: np.random.Generator) -> Any:
        d = self.d
        return (rng.standard_normal((d, d)) / np.sqrt(d), rng.standard_normal((d, d)) / np.sqrt(d))

    def _numpy_batch(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        x = rng.standard_normal((self.batch_size, self.d))
        return x, 2.0**0.5 * x @ self.A.T

    def jax_batch(self, key: Any, dtype: Any) -> tuple[Array, Array]:
        import jax

        x = jax.random.normal(key, (self.batch_size, self.d), dtype=dtype)
        return x, 2.0**0.5 * x @ jax.numpy.asarray(self.A.T, dtype=dtype)
