"""The stochastic Rosenbrock function of the CurveBall paper (Table 1).

R(u, v) = (1 - u)^2 + 100 eps (v - u^2)^2 with eps drawn afresh for every batch: eps = 1
(``"deterministic"``), eps ~ U[0, 1] or eps ~ U[0, 3]. In residual form the "network" returns
r = sqrt(2) (1 - u, 10 sqrt(eps) (v - u^2)) for the batch x = [[eps]], so the squared-error loss
1/2 ||r||^2 against zero targets equals R exactly and Gauss-Newton methods see its residuals.
The stopping tolerance is measured on the noise-free R (eps = 1), whose minimum is 0 at (1, 1).
Starting points: u ~ U[-2, 2], v ~ U[-1, 3] (the paper does not give its own).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backends import backend_of
from .base import Array, Problem

SETTINGS = {"deterministic": (1.0, 1.0), "U[0,1]": (0.0, 1.0), "U[0,3]": (0.0, 3.0)}
START_BOX = ((-2.0, 2.0), (-1.0, 3.0))


class Rosenbrock(Problem):
    """``Rosenbrock("U[0,1]")``: parameters are one array [u, v]."""

    def __init__(self, setting: str = "deterministic"):
        if setting not in SETTINGS:
            raise ValueError(f"unknown setting {setting!r}; choose one of {', '.join(SETTINGS)}")
        self.setting = setting
        self.low, self.high = SETTINGS[setting]
        self.name = f"rosenbrock-{setting}"

    def apply(self, params: Array, x: Array) -> Array:
        xp = backend_of(params, x).xp
        u, v = params[0], params[1]
        scale = 2.0**0.5
        first = scale * (1.0 - u)
        second = scale * 10.0 * xp.sqrt(x[:, 0]) * (v - u * u)
        return xp.stack([first * xp.ones_like(second), second], axis=1)

    def objective(self, params: Array) -> Array:
        u, v = params[0], params[1]
        return (1.0 - u) ** 2 + 100.0 * (v - u * u) ** 2

    def _numpy_start(self, rng: np.random.Generator) -> Any:
        (u0, u1), (v0, v1) = START_BOX
        return np.array([rng.uniform(u0, u1), rng.uniform(v0, v1)])

    def _eps(self, u: Any) -> Any:
        return self.low + (self.high - self.low) * u

    def _numpy_batch(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return np.array([[self._eps(rng.random())]]), np.zeros((1, 2))

    def jax_batch(self, key: Any, dtype: Any) -> tuple[Array, Array]:
        import jax

        eps = self._eps(jax.random.uniform(key, (1, 1), dtype=dtype))
        return eps, jax.numpy.zeros((1, 2), dtype=dtype)
