"""A problem: a residual model, a loss, random starts, random batches and the exact objective.

Batches are drawn either with NumPy's Generator (``batch(rng, backend)``, the same on every
backend) or, for runs compiled end to end with JAX, from a JAX key (``jax_batch(key)``).
``objective(params)`` is the noise-free objective the stopping tolerance is measured on.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from .. import backends
from .._pytree import tree_map
from ..losses import MSE

Array = Any


class Problem(ABC):
    loss = MSE()
    name = ""

    @abstractmethod
    def apply(self, params: Any, x: Array) -> Array:
        """The residual model's outputs on a batch x, shape (batch, outputs)."""

    def objective(self, params: Any) -> Array:
        """The noise-free objective the stopping tolerance is measured on (optional)."""
        raise NotImplementedError(
            f"{type(self).__name__} has no exact objective; measure progress on the loss of a "
            "batch (or implement objective(params))"
        )

    @abstractmethod
    def _numpy_start(self, rng: np.random.Generator) -> Any:
        """A random starting point as a tree of NumPy arrays."""

    @abstractmethod
    def _numpy_batch(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A fresh batch (x, y) of NumPy arrays."""

    def jax_batch(self, key: Any, dtype: Any) -> tuple[Array, Array]:
        """A fresh batch drawn from a JAX key, for runs compiled end to end (optional)."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot draw batches from a JAX key; use "
            "batch(rng, backend) (or implement jax_batch(key, dtype))"
        )

    def init(self, seed: int = 0, backend: str | backends.Backend | None = None,
             dtype: str = "float64") -> Any:
        """A random starting point drawn with NumPy's Generator(seed)."""
        b = _backend(backend)
        return tree_map(lambda a: b.asarray(a, dtype=dtype),
                        self._numpy_start(np.random.default_rng(seed)))

    def batch(self, rng: np.random.Generator, backend: str | backends.Backend | None = None,
              dtype: str = "float64") -> tuple[Array, Array]:
        """A fresh batch (new noise) drawn with NumPy's Generator; integer labels stay
        integers."""
        b = _backend(backend)
        return _convert(b, *self._numpy_batch(rng), dtype)


def _backend(backend: str | backends.Backend | None) -> backends.Backend:
    if backend is None:
        return backends.current()
    return backends.get(backend) if isinstance(backend, str) else backend


def _convert(b: backends.Backend, x: np.ndarray, y: np.ndarray, dtype: str
             ) -> tuple[Array, Array]:
    """(x, y) on the backend ``b``: x in ``dtype``, y too unless it holds integer labels."""
    y_dtype = None if y.dtype.kind in "iu" else dtype
    return b.asarray(x, dtype=dtype), b.asarray(y, dtype=y_dtype)
