"""Typed optimiser state.

Every method keeps its state in a ``NamedTuple`` of arrays (and trees of arrays) whose class
names the method, with an integer step count ``count`` (int32, 0 before the first step). A
NamedTuple is a tree for :mod:`secondorder.tree`, ``jax.tree_util`` and ``torch.utils._pytree``
alike, so a state passes through ``jax.jit``, ``jax.vmap`` and checkpointing unchanged.

:func:`method_state` marks a NamedTuple class as the state of a method: it records the method's
name and lets ``state["damping"]`` read a field by name (the dict-style access of earlier
releases). :func:`check_state` turns a state from another method or backend into a
:class:`~secondorder.errors.StateError` that says which is which; :func:`every` runs periodic work
(statistics every T1 steps, inverses every T2) through ``backend.cond``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from .._pytree import flatten
from ..backends import Backend
from ..errors import StateError

T = TypeVar("T")


def _getitem(self: tuple, key: Any) -> Any:
    if isinstance(key, str):
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(f"{type(self).__name__} has no field {key!r}; its fields are "
                           f"{', '.join(self._fields)}") from None
    return tuple.__getitem__(self, key)


def method_state(method: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: ``@method_state("CurveBall")`` on the NamedTuple of CurveBall's state."""
    def mark(cls: type[T]) -> type[T]:
        if "count" not in getattr(cls, "_fields", ()):
            raise TypeError(f"{cls.__name__} must be a NamedTuple with a 'count' field")
        cls.method = method  # type: ignore[attr-defined]
        cls.__getitem__ = _getitem  # type: ignore[method-assign, assignment]
        return cls

    return mark


def initial_count(backend: Backend, device: Any = None) -> Any:
    """The step count before the first step: a 0-d int32 zero."""
    xp = backend.xp
    kwargs = {} if device is None else {"device": device}
    return xp.asarray(0, dtype=xp.int32, **kwargs)


def check_state(state: Any, expected: type, backend: Backend, method: str) -> None:
    """Raise :class:`StateError` unless ``state`` is an ``expected`` made on ``backend``.

    Only the type and one array of the state are inspected (its step count, which every
    state has; the first array of the tree otherwise), so the check costs nothing next to a
    step.
    """
    if not isinstance(state, expected):
        owner = getattr(type(state), "method", None)
        if owner is not None:
            made = f"a state of {owner} ({type(state).__name__})"
        elif isinstance(state, dict):
            made = "a dict (the state format of earlier releases, or a hand-made one)"
        else:
            made = f"a {type(state).__name__}"
        raise StateError(
            f"{method}.step got {made}, but needs a {expected.__name__}: create it with "
            f"{method}(...).init(params) and pass the state that {method}.step returns"
        )
    count = getattr(state, "count", None)
    for leaf in [count] if hasattr(count, "shape") else flatten(state)[0]:
        if hasattr(leaf, "shape"):
            if not backend.is_array(leaf):
                raise StateError(
                    f"the {method} state holds {type(leaf).__module__}.{type(leaf).__name__} "
                    f"arrays but the parameters are {backend.name} arrays: initialise the "
                    f"state from the parameters you step (opt.init(params)), or convert both "
                    "to one backend"
                )
            return


def due_now(backend: Backend, count: Any, period: int) -> bool | None:
    """Whether a step with this ``count`` is one of every ``period``-th steps (count a multiple
    of ``period``), as a Python bool when the count is concrete (eager backends, an eager JAX
    array), ``None`` when it is traced and only a compiled conditional can tell."""
    if period == 1:
        return True
    # host_scalar is None for traced and device counts
    host = backend.host_scalar(count) if hasattr(count, "shape") else None
    if host is not None:  # an eager CPU count: the test in Python, no array arithmetic
        return int(host) % period == 0
    due = count % period == 0
    return bool(due) if backend.is_concrete(due) else None


def every_any(backend: Backend, count: Any, periods: tuple[int, ...], fn: Callable[..., T],
              otherwise: Callable[..., T], *operands: Any) -> T:
    """``fn(*operands)`` on the steps whose ``count`` is a multiple of any of ``periods`` (the
    steps with some periodic work), else ``otherwise(*operands)``: one compiled conditional
    under ``jax.jit``, a Python branch on eager backends."""
    due = [due_now(backend, count, period) for period in periods]
    if None not in due:
        return fn(*operands) if any(due) else otherwise(*operands)
    pred = None
    for period in periods:
        term = count % period == 0
        pred = term if pred is None else backend.xp.logical_or(pred, term)
    return backend.cond(pred, fn, otherwise, *operands)


def every(backend: Backend, count: Any, period: int, fn: Callable[..., T],
          otherwise: Callable[..., T], *operands: Any) -> T:
    """``fn(*operands)`` on the steps whose ``count`` is a multiple of ``period``, else
    ``otherwise(*operands)``, through ``backend.cond`` (a Python branch on eager backends, one
    compiled conditional under ``jax.jit``). ``period=1`` always runs ``fn``."""
    due = due_now(backend, count, period)
    if due is not None:
        # eager (JAX included): a Python branch; jax.lax.cond would trace and compile both
        # branches at every call, since the branches are new closures each step
        return fn(*operands) if due else otherwise(*operands)
    return backend.cond(count % period == 0, fn, otherwise, *operands)


def carry_over(old: Any, new: Any) -> Any:
    """The state ``new`` (a fresh ``init`` of a rebuilt method) with the values of ``old``
    wherever ``old`` has the same part: a NamedTuple of the same class is merged field by
    field, a sub-state of the same class and tree structure is kept whole, and the states of a
    transform chain are matched in order by class, so that a transform which appeared (weight
    decay switched on, momentum from 0 to 0.9) starts fresh (zeros) while the others keep their
    buffers, and one that vanished is dropped. ``torch.optim.SGD`` likewise creates a momentum
    buffer when momentum becomes non-zero; when momentum returns to 0 it keeps the buffer
    unused and resumes from it if momentum comes back, where this starts a fresh one."""
    from .transforms import ChainState

    if type(old) is type(new) and flatten(old)[1] == flatten(new)[1]:
        return old
    if isinstance(old, ChainState) and isinstance(new, ChainState):
        rest, states = list(old.states), []
        for part in new.states:
            if not flatten(part)[0]:  # stateless (weight decay, a fixed scale): nothing to keep
                states.append(part)
                continue
            match = next((i for i, o in enumerate(rest) if type(o) is type(part)), None)
            if match is None:
                states.append(part)
            else:
                states.append(carry_over(rest[match], part))
                del rest[:match + 1]
        return ChainState(tuple(states))
    if type(old) is type(new) and hasattr(new, "_fields"):
        return type(new)(*(carry_over(o, n) for o, n in zip(old, new, strict=True)))
    return new
