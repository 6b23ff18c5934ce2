"""Shared machinery of the curvature operators: one linearisation of the network on a batch.

Every operator here is built from ``(apply, loss, params, (x, y))`` with ``apply(params, x)`` the
network (a :class:`~secondorder.models.Model` or any function) and computes, once, the outputs
f = apply(params, x) of shape (m, k) with the JVP v -> J v and the VJP u -> J^T u of
params -> f. Matrix-vector products then reuse them.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import random
from ..backends import Backend, backend_of
from ..errors import NonFiniteError, RandomKeyError, ShapeError
from ..linalg import LinearOperator, Structure
from ..linalg.operator import placement
from ..losses import Loss

Tree = Any
Array = Any


def check_batch(backend: Backend, x: Array, what: str = "inputs") -> None:
    """Named error for NaN or inf in a (concrete) batch."""
    if backend.is_concrete(x) and not bool(np.all(np.isfinite(backend.to_numpy(x)))):
        raise NonFiniteError(f"the batch {what} contain NaN or inf; clean the data first")


def sample_targets(loss: Loss, f: Array, samples: int, seed: int,
                   noise: list[Any] | None, key: Array | None = None) -> list[Array]:
    """Targets drawn from the model's predictive distribution at the outputs ``f``: one per
    array in ``noise`` (from ``loss.noise``); or, given a :mod:`secondorder.random` ``key``,
    ``samples`` draws ``loss.sample(f, key=k)`` for the keys k of ``split(key, samples)`` (traced
    under ``jax.jit``, so a key in an optimiser state gives new targets at every step); or else
    ``samples`` draws with NumPy's Generator(``seed``). Every route gives every backend the same
    targets."""
    backend = backend_of(f)
    if key is not None:
        if noise is not None:
            raise RandomKeyError("give the Monte-Carlo targets either noise or a key, not both")
        keys = random.split(key, samples)
        return [loss.sample(f, key=keys[s, :]) for s in range(samples)]
    if noise is None:
        rng = np.random.default_rng(seed)
        noise = [loss.noise(tuple(f.shape), rng) for _ in range(samples)]
    dtype = backend.dtype_name(f.dtype)
    return [loss.sample(f, backend.asarray(n, dtype=dtype)) for n in noise]


class Linearization:
    """f(params) on a batch with its JVP and VJP, computed once and reused.

    ``validate=False`` skips the NaN/inf check of the batch: optimisers pass it, since a step must
    reject non-finite values through its guard (the same path as inside ``jax.jit``) rather than
    raise.
    """

    def __init__(self, apply: Callable[[Tree, Array], Array], params: Tree, x: Array, *,
                 validate: bool = True):
        self.backend = backend_of(params, x)
        if validate:
            check_batch(self.backend, x)
        self.params, self.x = params, x
        self.outputs, self.jvp, self.vjp = self.backend.linearize_vjp(
            lambda p: apply(p, x), params
        )
        if getattr(self.outputs, "ndim", None) != 2:
            raise ShapeError(
                f"the network must return (batch, outputs), got shape "
                f"{tuple(getattr(self.outputs, 'shape', ()))}; flatten its output"
            )

    @property
    def batch_size(self) -> int:
        return int(self.outputs.shape[0])


class CurvatureOperator(LinearOperator):
    """A symmetric operator on the parameter space built from a linearisation and a loss.

    ``validate=False`` skips the checks of the batch and targets (see :class:`Linearization`).
    """

    def __init__(self, apply: Callable, loss: Loss, params: Tree, batch: tuple[Array, Array], *,
                 validate: bool = True):
        x, y = batch
        self.apply, self.loss, self.params, self.x, self.y = apply, loss, params, x, y
        self.lin = Linearization(apply, params, x, validate=validate)
        if validate:
            loss.check(self.lin.outputs, y)
        structure = Structure.of(params)
        super().__init__(structure, structure, *placement(params))

    @property
    def outputs(self) -> Array:
        return self.lin.outputs

    @abstractmethod
    def _output_space_product(self, u: Array) -> Array:
        """The (m, k) -> (m, k) middle factor M of J^T M J."""

    def _matvec(self, v: Tree) -> Tree:
        return self.lin.vjp(self._output_space_product(self.lin.jvp(v)))

    _rmatvec = _matvec

    def transpose(self) -> LinearOperator:
        return self
