"""Gradient methods assembled from a direction and a transform: the direction is the gradient
of the mean batch loss, a chain of update transforms (:mod:`secondorder.optim.transforms`) turns
it into the update, and the guard of :class:`~secondorder.optim.base.Optimizer` accepts or
rejects the step. SGD, Adam and AdamW are this class with their chains."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from .._pytree import flatten
from ..backends import backend_of
from ..losses import Loss
from ..tree import add
from .base import Array, Batch, Optimizer, StepInfo, Tree
from .state import initial_count, method_state
from .transforms import (
    GradientTransformation,
    add_decayed_weights,
    chain,
    scale_by_adam,
    scale_by_learning_rate,
    trace,
)


@method_state("GradientDescent")
class GradientDescentState(NamedTuple):
    """Step count and the state of the transform chain."""

    count: Array
    transform: Any


class GradientDescent(Optimizer):
    """w <- w + T(grad L(w)) for an optax-shaped transform T (``init``/``update``): the
    gradient of the mean batch loss goes through the transform chain, and the result is added
    to the parameters. A non-finite loss or update keeps the old parameters and state.

    Parameters
    ----------
    apply, loss:
        The network ``apply(params, x)`` and the :class:`~secondorder.losses.Loss`.
    transform:
        The update transform, e.g. ``chain(clip_by_global_norm(1.0), trace(0.9),
        scale_by_learning_rate(0.1))``; it must end by scaling with a negative step
        (``scale_by_learning_rate``, which takes a number or a schedule of the step count), as
        in optax.
    """

    State = GradientDescentState

    def __init__(self, apply: Callable, loss: Loss, transform: GradientTransformation):
        super().__init__(apply, loss)
        self.transform = transform

    def init(self, params: Tree) -> Any:
        first = flatten(params)[0][0]
        backend = backend_of(first)
        return self.State(initial_count(backend, backend.device(first)),
                          self.transform.init(params))

    def step(self, params: Tree, state: Any, batch: Batch, *, donate: bool = False
             ) -> tuple[Tree, Any, StepInfo]:
        """One step (see :meth:`Optimizer.step`). ``donate=True``: the caller gives up
        ``params``, so an accepted step may add the update into their arrays in place and
        return them (torch, eagerly: one fused add instead of a new tree that the caller then
        copies into its module, as ``integrations.torch.Optimizer`` does); a rejected step
        leaves them untouched, and where arrays cannot be written the step is the pure one."""
        self.check_batch(params, state, batch)
        loss, grad = self.value_and_grad(params, batch)
        return self._apply_gradient(params, state, grad, loss, donate)

    def step_with_gradient(self, params: Tree, state: Any, grad: Tree, loss: Array = None
                           ) -> tuple[Tree, Any, StepInfo]:
        """The step from a gradient computed elsewhere (``step`` is ``value_and_grad`` followed
        by this): w <- w + T(grad). ``loss``, the loss at ``params``, is only reported and
        checked for finiteness; without it ``info.loss`` is NaN and only the update is checked.
        """
        self.check_state(params, state)
        return self._apply_gradient(params, state, grad, loss)

    def _apply_gradient(self, params: Tree, state: Any, grad: Tree, loss: Array,
                        donate: bool = False) -> tuple[Tree, Any, StepInfo]:
        updates, inner = self.transform.update(grad, state.transform, params)
        new_state = self.State(state.count + 1, inner)
        checked = self.scalar(params, 0.0) if loss is None else loss
        verdict, in_place = None, False
        if donate:  # accepted steps only, so a rejected one leaves the donated arrays as they are
            verdict = self.verdict(checked, update=updates)
            ok, step_norm = verdict
            backend = backend_of(ok)
            in_place = (backend.is_concrete(ok) and bool(ok)
                        and backend.add_into(flatten(params)[0], flatten(updates)[0]))
        if in_place:
            state = new_state
        else:
            # a non-finite gradient makes the new parameters non-finite through every
            # transform, so the guard checks the loss and the new parameters only
            params, state, ok, step_norm = self.guard(params, state, add(params, updates),
                                                      new_state, checked, update=updates,
                                                      verdict=verdict)
        if loss is None:
            loss = self.scalar(params, float("nan"))
        return params, state, self.info(params, loss, step_norm, finite=ok)


@method_state("SGD")
class SGDState(NamedTuple):
    """Step count and the state of SGD's transform chain (the momentum buffer)."""

    count: Array
    transform: Any


class SGD(GradientDescent):
    """Stochastic gradient descent: g = grad + wd w;  b <- mu b + g;
    w <- w - lr (g + mu b if nesterov else b).

    The chain ``add_decayed_weights(weight_decay)`` (when non-zero), ``trace(momentum,
    nesterov)`` (when momentum is non-zero), ``scale_by_learning_rate(lr)``.

    Parameters
    ----------
    apply, loss:
        The network ``apply(params, x)`` and the :class:`~secondorder.losses.Loss`; the
        objective is the mean loss of ``apply(params, x)`` against ``y``.
    lr: float or schedule, default 0.01
        Step size, >= 0 (0, a warm-up's start, gives a zero step), or a schedule t -> lr(t)
        of the step count t = 0, 1, ... (a callable, e.g. an optax schedule, evaluated inside
        ``step`` eagerly, under ``jax.jit`` and under ``jax.vmap``; it receives t as a 0-d
        array of the parameters' dtype).
    momentum: float, default 0.0
        Heavy-ball coefficient mu.
    nesterov: bool, default False
        Nesterov's variant (needs momentum > 0).
    weight_decay: float, default 0.0
        L2 coefficient wd added to the gradient.
    transform: transform or None, default None
        An update transform (``init``/``update``, e.g. ``clip_by_global_norm(1.0)``) applied
        to the gradient first, before the weight decay and the momentum: torch's
        ``clip_grad_norm_`` before ``optimizer.step()``.
    """

    State = SGDState
    hyperparameters = {"lr": ">= 0", "momentum": ">= 0", "weight_decay": ">= 0"}  # noqa: RUF012

    def __init__(self, apply: Callable, loss: Loss, *, lr: Any = 0.01, momentum: Any = 0.0,
                 nesterov: bool = False, weight_decay: Any = 0.0,
                 transform: GradientTransformation | None = None):
        parts = [] if transform is None else [transform]
        if not _is_zero(weight_decay):
            parts.append(add_decayed_weights(weight_decay))
        if not _is_zero(momentum) or nesterov:
            parts.append(trace(momentum, nesterov))
        parts.append(scale_by_learning_rate(lr))
        super().__init__(apply, loss, chain(*parts))
        self.lr, self.momentum, self.nesterov, self.weight_decay = lr, momentum, nesterov, \
            weight_decay


@method_state("Adam")
class AdamState(NamedTuple):
    """Step count and the state of Adam's transform chain (moments and their count)."""

    count: Array
    transform: Any


class Adam(GradientDescent):
    """Adam (Kingma & Ba 2015, Algorithm 1) with L2 weight decay added to the gradient:
    g = grad + wd w;  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;
    w <- w - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps), t the number of steps taken
    including this one. The chain ``add_decayed_weights(wd)`` (when non-zero),
    ``scale_by_adam``, ``scale_by_learning_rate(lr)``.

    Parameters
    ----------
    apply, loss:
        The network ``apply(params, x)`` and the :class:`~secondorder.losses.Loss`; the
        objective is the mean loss of ``apply(params, x)`` against ``y``.
    lr: float or schedule, default 1e-3
        Step size, >= 0 (0, a warm-up's start, gives a zero step), or a schedule t -> lr(t)
        of the step count t = 0, 1, ... (a callable, e.g. an optax schedule, evaluated inside
        ``step``; it receives t as a 0-d array of the parameters' dtype).
    b1, b2: float, default 0.9, 0.999
        Decay rates of the first and second moment estimates.
    eps: float, default 1e-8
        Added to the square root of the second moment.
    weight_decay: float, default 0.0
        L2 coefficient (decoupled in :class:`AdamW`).
    transform: transform or None, default None
        An update transform applied to the gradient first (e.g. ``clip_by_global_norm(1.0)``,
        torch's ``clip_grad_norm_`` before the step).
    """

    State = AdamState
    hyperparameters = {"lr": ">= 0", "b1": "[0, 1)", "b2": "[0, 1)", "eps": "> 0",
                       "weight_decay": ">= 0"}  # noqa: RUF012
    decoupled = False

    def __init__(self, apply: Callable, loss: Loss, *, lr: Any = 1e-3, b1: Any = 0.9,
                 b2: Any = 0.999, eps: Any = 1e-8, weight_decay: Any = 0.0,
                 transform: GradientTransformation | None = None):
        decay = [] if _is_zero(weight_decay) else [add_decayed_weights(weight_decay)]
        adam = [scale_by_adam(b1, b2, eps)]
        parts = adam + decay if self.decoupled else decay + adam
        first = [] if transform is None else [transform]
        super().__init__(apply, loss, chain(*first, *parts, scale_by_learning_rate(lr)))
        self.lr, self.b1, self.b2, self.eps, self.weight_decay = lr, b1, b2, eps, weight_decay


@method_state("AdamW")
class AdamWState(NamedTuple):
    """Step count and the state of AdamW's transform chain."""

    count: Array
    transform: Any


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019, Algorithm 2):
    w <- w - lr (m^ / (sqrt(v^) + eps) + wd w), with Adam's bias-corrected moments m^ and v^
    of the plain gradient; the chain ``scale_by_adam``, ``add_decayed_weights``,
    ``scale_by_learning_rate``.

    Parameters
    ----------
    apply, loss:
        The network ``apply(params, x)`` and the :class:`~secondorder.losses.Loss`; the
        objective is the mean loss of ``apply(params, x)`` against ``y``.
    lr: float or schedule, default 1e-3
        Step size, >= 0 (0, a warm-up's start, gives a zero step), or a schedule t -> lr(t)
        of the step count t = 0, 1, ... (a callable, e.g. an optax schedule, evaluated inside
        ``step``; it receives t as a 0-d array of the parameters' dtype). The decay is scaled
        by the same lr, as in PyTorch and optax.
    b1, b2: float, default 0.9, 0.999
        Decay rates of the first and second moment estimates, in [0, 1).
    eps: float, default 1e-8
        Added to the square root of the second moment, > 0.
    weight_decay: float, default 0.0
        The decoupled decay coefficient wd, >= 0.
    transform: transform or None, default None
        An update transform applied to the gradient first (gradient clipping).
    """

    State = AdamWState
    decoupled = True


def _is_zero(value: Any) -> bool:
    return isinstance(value, int | float) and value == 0
