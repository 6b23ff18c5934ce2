"""A problem: a residual model, a loss, random starts, random batches and the exact objective.

Batches are drawn either with NumPy's Generator (``batch(rng, backend)``, the same on every
backend) or, for runs compiled end to end with JAX, from a JAX key (``jax_batch(key)``).
``objective(params)`` is the noise-free objective the stopping tolerance is measured on.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import backends
from ..losses import MSE

Array = Any


class Problem:
    loss = MSE()
    name = ""

    def apply(self, params: Any, x: Array) -> Array:
        raise NotImplementedError(f"{type(self).__name__} must implement apply")

    def objective(self, params: Any) -> Array:
        raise NotImplementedError(f"{type(self).__name__} must implement objective")

    def _numpy_start(self, rng: np.random.Generator) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement _numpy_start")

    def _numpy_batch(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError(f"{type(self).__name__} must implement _numpy_batch")

    def jax_batch(self, key: Any, dtype: Any) -> tuple[Array, Array]:
        raise NotImplementedError(f"{type(self).__name__} must implement jax_batch")

    def init(self, seed: int = 0, backend: str | backends.Backend | None = None,
             dtype: str = "float64") -> Any:
        """A random starting point drawn with NumPy's Generator(seed)."""
        from .._pytree import tree_map

        b = _backend(backend)
        return tree_map(lambda a: b.asarray(a, dtype=dtype),
                        self._numpy_start(np.random.default_rng(seed)))

    def batch(self, rng: np.random.Generator, backend: str | backends.Backend | None = None,
              dtype: str = "float64") -> tuple[Array, Array]:
        """A fresh batch (new noise) drawn with NumPy's Generator."""
        b = _backend(backend)
        x, y = self._numpy_batch(rng)
        return b.asarray(x, dtype=dtype), b.asarray(y, dtype=dtype)


def _backend(backend: str | backends.Backend | None) -> backends.Backend:
    if backend is None:
        return backends.current()
    return backends.get(backend) if isinstance(backend, str) else backend
