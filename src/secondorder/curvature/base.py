"""Shared machinery of the curvature operators: one linearisation of the network on a batch.

Every operator here is built from ``(apply, loss, params, (x, y))`` with ``apply(params, x)`` the
network (a :class:`~secondorder.models.Model` or any function) and computes, once, the outputs
f = apply(params, x) of shape (m, k) (or (m, ..., k): a sequence's logits) with the JVP
v -> J v and the VJP u -> J^T u of params -> f. Matrix-vector products then reuse them.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import random
from .._pytree import flatten
from ..backends import Backend, backend_of
from ..backends.bridge import for_autodiff
from ..errors import NonFiniteError, RandomKeyError, ShapeError
from ..linalg import LinearOperator, Structure
from ..linalg.operator import has_native_vmap, map_columns, placement
from ..losses import Loss

Tree = Any
Array = Any


def check_batch(backend: Backend, x: Any, what: str = "inputs") -> None:
    """Named error for NaN or inf in a batch: every concrete floating leaf of ``x`` (an array, or
    a tree such as the model inputs of ``from_flax`` / ``from_nnx`` / ``from_equinox`` that
    carry random keys and collections beside the data); traced leaves and other dtypes are not
    read."""
    for leaf in flatten(x)[0]:
        try:
            floating = backend.xp.isdtype(leaf.dtype, "real floating")
        except (AttributeError, TypeError, ValueError):  # no dtype, or a random-key dtype
            floating = False
        if floating and backend.is_concrete(leaf) and not bool(
                np.all(np.isfinite(backend.to_numpy(leaf)))):
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
    device = backend.device(f)  # NumPy noise goes where the outputs are (a GPU, say)
    return [loss.sample(f, backend.asarray(n, dtype=dtype, device=device)) for n in noise]


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
        x_f = for_autodiff(self.backend, x)
        self.outputs, self.jvp, self.vjp = self.backend.linearize_vjp(
            lambda p: apply(p, x_f), params
        )
        check_outputs(self.outputs)

    def two_dimensional(self, method: str) -> Array:
        """The outputs, after checking they are (batch, outputs) as ``method`` needs."""
        if self.outputs.ndim != 2:
            raise ShapeError(two_dimensional_outputs(self.outputs, method))
        return self.outputs

    @property
    def batch_size(self) -> int:
        return int(self.outputs.shape[0])


def check_outputs(f: Array, method: str = "the curvature operators") -> None:
    """ShapeError for network outputs without a batch axis and an output axis, (m, ...)."""
    if getattr(f, "ndim", 0) < 2:
        raise ShapeError(
            f"{method}: the network must return (batch, outputs...), got shape "
            f"{tuple(getattr(f, 'shape', ()))}; give a single output an axis of its own, (m, 1)")


def two_dimensional_outputs(f: Array, method: str = "the curvature operators") -> str:
    """The message for outputs other than (batch, outputs) where a method needs them."""
    return (f"{method} needs the network to return (batch, outputs), got shape "
            f"{tuple(getattr(f, 'shape', ()))}: flatten the output for an elementwise loss (MSE, "
            "sigmoid BCE); a cross-entropy per position (a sequence's logits) has no flattened "
            "equivalent: every method but prox-linear takes it as it is")


class CurvatureOperator(LinearOperator):
    """A symmetric operator J^T M J on the parameter space built from a linearisation and a loss,
    M an (m, k) -> (m, k) map in the output space.

    Parameters
    ----------
    apply:
        The network ``apply(params, x) -> (m, k) outputs`` (a :class:`~secondorder.models.Model`
        or any function of that signature).
    loss:
        A :class:`~secondorder.losses.Loss` of the outputs and targets, averaged over the batch.
    params:
        The parameter tree at which the curvature is taken; the operator acts on trees of its
        structure or on their flat coordinates.
    batch:
        ``(x, y)``: inputs and targets.
    validate:
        Check the batch for NaN/inf and the targets against the loss (default True).
    ``validate=False`` is what optimisers pass (see :class:`Linearization`).
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

    def to_dense(self) -> Array:
        """The (n, n) matrix J^T M J in flat coordinates, from the materialised Jacobian.

        Where the backend has a native ``vmap``, J (m k x n) is built by vectorised VJPs of
        the m k unit cotangents when m k <= n, else by vectorised JVPs of the n unit tangents
        (in chunks of :attr:`chunk`); M is applied to its columns in the output space and the
        result is J^T (M J): min(m k, n) products instead of the n JVP + VJP pairs of one
        column at a time. Elsewhere, or if the products do not vectorise, the columns
        G e_j of :meth:`LinearOperator.to_dense`; both agree to rounding.
        """
        if not has_native_vmap(self.backend) or self._vmap_ok is False:
            return super().to_dense()
        xp, backend = self.xp, self.backend
        n = self.in_structure.size
        shape = tuple(int(d) for d in self.outputs.shape)  # (m, ...): k = prod(shape[1:])
        mk = math.prod(shape)
        dtype, device = self.dtype, self.device

        def eye_block(size: int) -> Any:
            return lambda start, stop: xp.eye(size, stop - start, k=-start, dtype=dtype,
                                              device=device)

        def row_of_jt(u: Array) -> Array:  # J^T u for a flat cotangent u of length prod(shape)
            return self.in_structure.ravel(self.lin.vjp(xp.reshape(u, shape)), xp)

        def column_of_j(v: Array) -> Array:  # J v, flat
            return xp.reshape(self.lin.jvp(self.in_structure.unravel(v, xp)), (mk,))

        def middle(c: Array) -> Array:  # M c in the output space, flat
            return xp.reshape(self._output_space_product(xp.reshape(c, shape)), (mk,))

        try:
            if mk <= n:
                jac = xp.linalg.matrix_transpose(
                    map_columns(backend, row_of_jt, eye_block(mk), mk, self.chunk))
            else:
                jac = map_columns(backend, column_of_j, eye_block(n), n, self.chunk)
            mj = map_columns(backend, middle, lambda a, b: jac[:, a:b], n, self.chunk)
        except Exception:
            # products that do not vectorise: the column loop (see LinearOperator._batched)
            self._vmap_ok = False
            return super().to_dense()
        self._vmap_ok = True
        return xp.linalg.matrix_transpose(jac) @ mj

    def transpose(self) -> LinearOperator:
        return self
