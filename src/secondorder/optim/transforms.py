"""Update transforms in optax's shape: ``init(params) -> state`` and
``update(updates, state, params) -> (updates, state)``, composed by :func:`chain`.

A method produces a *direction* d (the gradient, a Newton or Gauss-Newton direction, a
preconditioned gradient, ...); a chain of transforms turns it into the update u that is added to
the parameters, w <- w + u. Every transform is backend-generic (it works on trees of numpy, torch
or jax arrays and compiles under ``jax.jit``) and its state is a NamedTuple of arrays:

====================================  ========================================================
``trace(momentum, nesterov)``         b <- mu b + d;  u = b, or d + mu b with Nesterov
``scale_by_adam(b1, b2, eps)``        m <- b1 m + (1 - b1) d,  v <- b2 v + (1 - b2) d^2,
                                      u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
                                      (Kingma & Ba, Algorithm 1)
``add_decayed_weights(wd)``           u = d + wd w  (L2 before momentum or Adam, decoupled
                                      weight decay after them: Loshchilov & Hutter)
``clip_by_global_norm(max_norm)``     u = d min(1, max_norm / ||d||)
``scale(factor)``                     u = factor d
``scale_by_learning_rate(lr)``        u = -lr(t) d; ``lr`` a number or a schedule t -> lr(t)
                                      of the step count t = 0, 1, ...
====================================  ========================================================

Anything with ``init`` and ``update`` of these signatures composes, optax's own transforms
included when the arrays are JAX arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from .._pytree import check_same_structure, flatten, tree_map, unflatten
from ..backends import backend_of
from ..errors import HyperparameterError, SecondOrderError
from ..tree import axpy, norm, zeros_like
from .schedules import count_as_float, resolve
from .state import initial_count

Tree = Any
Array = Any
Schedule = Callable[[Array], Array]


class GradientTransformation(NamedTuple):
    """A pair of pure functions: ``init(params) -> state`` and
    ``update(updates, state, params=None) -> (updates, state)``."""

    init: Callable[[Tree], Any]
    update: Callable[..., tuple[Tree, Any]]


class EmptyState(NamedTuple):
    """The state of a stateless transform."""


class TraceState(NamedTuple):
    """The momentum buffer b of :func:`trace`."""

    trace: Tree


class ScaleByAdamState(NamedTuple):
    """Adam's step count t and moment estimates m and v."""

    count: Array
    mu: Tree
    nu: Tree


class ScaleByScheduleState(NamedTuple):
    """The step count t that a schedule is evaluated at."""

    count: Array


class ChainState(NamedTuple):
    """The states of the transforms of a :func:`chain`, in order."""

    states: tuple


def _is_number(*values: Any) -> bool:
    return all(isinstance(v, int | float) for v in values)


def _plain(value: Any) -> Any:
    """A NumPy scalar as the Python number it holds (arrays and tracers are kept)."""
    return float(value) if isinstance(value, float) else value


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise HyperparameterError(message)


def _count(params: Tree) -> Array:
    leaf = flatten(params)[0][0]
    backend = backend_of(leaf)
    return initial_count(backend, backend.device(leaf))


#: the int32 count as a 0-d float of the dtype of the first leaf of ``like``
_as_float = count_as_float


def trace(momentum: float | Array, nesterov: bool = False) -> GradientTransformation:
    """Heavy-ball momentum b <- mu b + d, giving b (or d + mu b with ``nesterov=True``); with
    ``momentum=0`` the buffer is the direction itself."""
    momentum = _plain(momentum)
    if _is_number(momentum):
        _check(momentum >= 0, f"momentum must be >= 0, got {momentum}")
        _check(not (nesterov and momentum == 0), "Nesterov momentum needs momentum > 0")

    def init(params: Tree) -> TraceState:
        return TraceState(zeros_like(params))

    def update(updates: Tree, state: TraceState, params: Tree = None
               ) -> tuple[Tree, TraceState]:
        buf = axpy(momentum, state.trace, updates)
        out = axpy(momentum, buf, updates) if nesterov else buf
        return out, TraceState(buf)

    return GradientTransformation(init, update)


def scale_by_adam(b1: float | Array = 0.9, b2: float | Array = 0.999,
                  eps: float | Array = 1e-8) -> GradientTransformation:
    """Adam's bias-corrected scaling (Kingma & Ba 2015, Algorithm 1) of the direction."""
    b1, b2, eps = _plain(b1), _plain(b2), _plain(eps)
    if _is_number(b1, b2, eps):
        _check(0 <= b1 < 1 and 0 <= b2 < 1 and eps > 0,
               f"Adam needs 0 <= b1, b2 < 1 and eps > 0, got b1={b1}, b2={b2}, eps={eps}")

    def init(params: Tree) -> ScaleByAdamState:
        # two trees of their own: a leaf shared between the moments could not be donated
        return ScaleByAdamState(_count(params), zeros_like(params), zeros_like(params))

    def update(updates: Tree, state: ScaleByAdamState, params: Tree = None
               ) -> tuple[Tree, ScaleByAdamState]:
        backend = backend_of(state.count)
        xp = backend.xp
        count = state.count + 1
        t = _as_float(count, updates)
        g, treedef = flatten(updates)
        (mu, mu_def), nu = flatten(state.mu), flatten(state.nu)[0]
        treedef = check_same_structure(mu_def, treedef)  # the moments' key order, as before
        c1 = xp.astype(1.0 - b1**t, g[0].dtype)
        c2 = xp.astype(1.0 - b2**t, g[0].dtype)
        out, m, v = backend.adam(mu, nu, g, b1, b2, c1, c2, eps)  # fused where it can be
        return (unflatten(treedef, out),
                ScaleByAdamState(count, unflatten(treedef, m), unflatten(treedef, v)))

    return GradientTransformation(init, update)


def add_decayed_weights(weight_decay: float | Array) -> GradientTransformation:
    """d + wd w: L2 regularisation when placed before momentum or Adam, decoupled weight decay
    (AdamW) when placed after them."""
    weight_decay = _plain(weight_decay)
    if _is_number(weight_decay):
        _check(weight_decay >= 0, f"weight_decay must be >= 0, got {weight_decay}")

    def init(params: Tree) -> EmptyState:
        return EmptyState()

    def update(updates: Tree, state: EmptyState, params: Tree = None
               ) -> tuple[Tree, EmptyState]:
        if params is None:
            raise SecondOrderError("add_decayed_weights needs the parameters: pass "
                                   "update(updates, state, params)")
        return tree_map(lambda g, w: g + weight_decay * w, updates, params), state

    return GradientTransformation(init, update)


def clip_by_global_norm(max_norm: float | Array) -> GradientTransformation:
    """d min(1, max_norm / ||d||), ||d|| the Euclidean norm of the whole tree."""
    max_norm = _plain(max_norm)
    if _is_number(max_norm):
        _check(max_norm > 0, f"max_norm must be > 0, got {max_norm}")

    def init(params: Tree) -> EmptyState:
        return EmptyState()

    def update(updates: Tree, state: EmptyState, params: Tree = None
               ) -> tuple[Tree, EmptyState]:
        g_norm = norm(updates)
        xp = backend_of(g_norm).xp
        factor = xp.where(g_norm > max_norm, max_norm / xp.where(g_norm > 0, g_norm, 1.0), 1.0)
        factor = xp.astype(factor, g_norm.dtype)
        return tree_map(lambda g: factor * g, updates), state

    return GradientTransformation(init, update)


def scale(factor: float | Array) -> GradientTransformation:
    """factor d."""
    factor = _plain(factor)

    def init(params: Tree) -> EmptyState:
        return EmptyState()

    def update(updates: Tree, state: EmptyState, params: Tree = None
               ) -> tuple[Tree, EmptyState]:
        return tree_map(lambda g: factor * g, updates), state

    return GradientTransformation(init, update)


def scale_by_schedule(schedule: Schedule) -> GradientTransformation:
    """schedule(t) d, with t = 0, 1, ... the number of updates made so far, given to the
    schedule as a 0-d array of the updates' floating dtype (so that ``0.1 / (1 + t)`` is computed
    in that precision on every backend)."""
    def init(params: Tree) -> ScaleByScheduleState:
        return ScaleByScheduleState(_count(params))

    def update(updates: Tree, state: ScaleByScheduleState, params: Tree = None
               ) -> tuple[Tree, ScaleByScheduleState]:
        factor = resolve(schedule, state.count, updates)
        return tree_map(lambda g: factor * g, updates), ScaleByScheduleState(state.count + 1)

    return GradientTransformation(init, update)


def scale_by_learning_rate(lr: float | Array | Schedule) -> GradientTransformation:
    """-lr d, or -lr(t) d for a schedule (a callable of the step count t = 0, 1, ...)."""
    if callable(lr):
        return scale_by_schedule(lambda t: -1.0 * lr(t))
    lr = _plain(lr)
    if _is_number(lr):
        _check(lr >= 0, f"the learning rate must be >= 0, got {lr}")
    return scale(-lr)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """The transforms applied one after the other; the state is a :class:`ChainState`."""
    for t in transforms:
        if not (callable(getattr(t, "init", None)) and callable(getattr(t, "update", None))):
            raise HyperparameterError(
                f"chain() takes transforms with init and update methods, got {t!r}")

    def init(params: Tree) -> ChainState:
        return ChainState(tuple(t.init(params) for t in transforms))

    def update(updates: Tree, state: ChainState, params: Tree = None
               ) -> tuple[Tree, ChainState]:
        states = []
        for t, s in zip(transforms, state.states):
            updates, s = t.update(updates, s, params)
            states.append(s)
        return updates, ChainState(tuple(states))

    return GradientTransformation(init, update)
