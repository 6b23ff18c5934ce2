"""Hyperparameter schedules: a learning rate or damping given as a function of the step count.

Every learning rate, damping and step-size hyperparameter of the optimisers in
:mod:`secondorder.optim` accepts either a number (a Python float, or a 0-d array, which may be
traced by ``jax.vmap`` over a grid of values) or a *schedule*: a callable ``schedule(t)`` of the
step count t = 0, 1, 2, ... (the number of steps taken before the current one: ``state.count``),
as optax's schedules are. Inside ``step`` the schedule is evaluated at the state's count, so it
runs eagerly on every backend and traces under ``jax.jit`` and ``jax.vmap``; optax's own
schedules (``optax.cosine_decay_schedule(...)``, ``optax.linear_schedule(...)``) work on JAX
arrays, and any function written with arithmetic on ``t`` works on every backend.

The schedule receives the count as a 0-d array of the parameters' floating dtype (not the int32
count itself), or float32 for half-precision parameters, as
:func:`secondorder.optim.transforms.scale_by_schedule` does: on PyTorch, ``0.1 / (1 + t)`` of an
int32 tensor would be computed in float32 whatever the parameters' dtype. The count is exact up
to 2^24 steps in float32 and 2^53 in float64. Its value may be a Python number or a 0-d array;
it is converted to the parameters' dtype and device. The values a schedule returns are not
checked (a number is, at construction): a learning rate must stay in the method's range (> 0,
or >= 0 for SGD and Adam) and a damping >= 0 at every step, as for a number.

A step that the guard rejects (a non-finite loss or update) keeps the old state and therefore the
old count: the next step evaluates the schedule at the same t again.

Methods that adapt their damping from the state (Levenberg-Marquardt, Hessian-free, CurveBall)
follow kfac-jax: a damping schedule *replaces* the adaptation (lambda_t = schedule(t) at every
step, and the state's ``damping`` records the value the last step used); asking for both,
``adapt_damping=True`` with a callable damping, raises
:class:`~secondorder.errors.HyperparameterError`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._pytree import flatten
from ..backends import backend_of
from ..errors import HyperparameterError

Array = Any
Schedule = Callable[[Array], Any]

__all__ = ["Schedule", "count_as_float", "is_schedule", "resolve", "resolve_adaptation"]


def is_schedule(value: Any) -> bool:
    """True when ``value`` is a schedule (a callable), not a number or an array."""
    return callable(value)


def count_as_float(count: Array, like: Any) -> Array:
    """The int32 step ``count`` as a 0-d array of the floating dtype of the first leaf of
    ``like`` (a tree of arrays), or float32 where that dtype is narrower: bfloat16 holds the
    integers exactly only up to 256 (step 301 reads as 300) and rounds 0.999 to 1, so that
    Adam's bias correction 1 - 0.999^t was 0 and its step 0 on a bfloat16 model. Callers cast
    what they compute from the count back to the leaves' dtype."""
    leaf = flatten(like)[0][0]
    xp = backend_of(leaf).xp
    narrow = xp.isdtype(leaf.dtype, "real floating") and xp.finfo(leaf.dtype).bits < 32
    dtype = xp.float32 if narrow else leaf.dtype
    return xp.astype(count, dtype)


def resolve(value: Any, count: Array, like: Any) -> Any:
    """The hyperparameter in force at step ``count``.

    A number or an array is returned unchanged (so a method given a number computes with
    exactly the same values as before schedules existed); a schedule is evaluated at
    t = ``count`` (as a float, :func:`count_as_float`) and its value returned as a 0-d array of
    the dtype and device of the leaves of ``like``.
    """
    if not is_schedule(value):
        return value
    leaf = flatten(like)[0][0]
    backend = backend_of(leaf)
    out = value(count_as_float(count, like))
    if backend.is_array(out):  # JAX tracers included
        return backend.xp.astype(out, leaf.dtype)
    return backend.xp.asarray(out, dtype=leaf.dtype, device=backend.device(leaf))


def resolve_adaptation(adapt: bool | None, damping: Any, method: str) -> bool:
    """Whether a method adapts its damping, from its ``adapt_damping`` argument: None means
    "adapt unless the damping is a schedule"; True with a schedule is an error."""
    if adapt is None:
        return not is_schedule(damping)
    if adapt and is_schedule(damping):
        raise HyperparameterError(
            f"{method}: a damping schedule replaces the adaptive damping; pass either "
            "adapt_damping=True with a number (the initial damping) or a schedule with "
            "adapt_damping=False (or None)")
    return bool(adapt)
