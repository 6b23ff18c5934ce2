"""Any ``secondorder`` optimiser as an optax gradient transformation (JAX only).

    import optax
    from secondorder.integrations.optax import as_optax, step_info

    tx = optax.chain(as_optax(HessianFree(model.apply, loss, lr=schedule)),
                     optax.clip_by_global_norm(1.0))
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, batch):
        updates, opt_state = tx.update(None, opt_state, params, batch=batch)
        return optax.apply_updates(params, updates), opt_state

:func:`as_optax` returns an ``optax.GradientTransformationExtraArgs`` whose

    update(updates, state, params, *, batch=None, value=None, **extra_args)

runs one step of the method and returns ``new_params - params`` as the updates, so
``optax.apply_updates(params, updates)`` gives the parameters of the method's own ``step`` (to
rounding: params + (new - params)). It is a pure function: it compiles with ``jax.jit``, runs
under ``jax.vmap`` (for example over a learning rate, building the method inside the mapped
function) and inside ``jax.lax.scan`` (the state has the same structure and dtypes before and
after every update).

**What the incoming ``updates`` are.** Two kinds of method, two rules:

* *First-order methods* (:class:`~secondorder.optim.GradientDescent`: SGD, Adam, AdamW) are a
  transform chain applied to the gradient, exactly like ``optax.sgd`` or ``optax.adam``: the
  incoming ``updates`` are taken as the gradient. So
  ``optax.chain(optax.clip_by_global_norm(1.0), as_optax(SGD(...)))`` clips the gradient before
  the momentum, as ``optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(...))`` does, and
  ``batch`` is not needed. ``value``, the loss at ``params`` (optax's name for it, as in
  ``optax.contrib.reduce_on_plateau``), is reported in the step info and checked for
  finiteness; without it the info's loss is NaN. ``updates=None`` with a ``batch`` computes the
  loss and the gradient from the batch, as the method's ``step`` does.
* *Second-order methods* (Newton, Levenberg-Marquardt, BFGS, Hessian-free, CurveBall,
  prox-linear, GroupedNewton) compute their loss, gradient and curvature from ``batch`` (an
  ``(x, y)`` pair, required) and do not use the incoming ``updates``: a transform placed
  *before* them in a chain has no effect on their step (pass ``None``; given updates, the
  transformation warns once with :class:`~secondorder.errors.UnusedUpdatesWarning`).
  Transforms placed *after* them act on the step:
  ``optax.chain(as_optax(CurveBall(...)), optax.clip_by_global_norm(1.0))`` clips the step,
  ``optax.chain(as_optax(m), optax.scale_by_schedule(s))`` takes s(k) times the method's step at
  update k. The method's own state (CurveBall's direction z, Hessian-free's warm start, the
  damping) follows the step the method proposed, not the transformed one; to transform the
  step inside the method (so that z follows the clipped step), use the method's ``transform=``
  argument instead. GroupedNewton also takes ``summary_batch=`` as an extra argument.

**The state** is an :class:`OptaxState`: ``inner``, the method's own typed state (with its step
count, which a schedule given to the method reads), and ``info``, the
:class:`~secondorder.optim.StepInfo` of the last update (loss, step norm, damping, finiteness,
inner iterations and residual, and the method's ``extras`` such as CurveBall's rho and beta;
NaN before the first update). :func:`step_info` finds it in the state of a chain. A step that
meets a non-finite value is rejected as in the method's ``step``: the updates are zero, the
method's state is kept and ``info.finite`` is False.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from .._pytree import flatten
from .._stack import caller_level
from ..errors import (
    HyperparameterError,
    SecondOrderError,
    StructureError,
    UnusedUpdatesWarning,
)
from ..optim.base import Optimizer, StepInfo
from ..optim.gradient_descent import GradientDescent

__all__ = ["OptaxState", "as_optax", "step_info"]


class OptaxState(NamedTuple):
    """The state of :func:`as_optax`: the method's state and the info of the last update."""

    inner: Any  #: the method's own state (``method.init(params)``, then what ``step`` returns)
    info: StepInfo  #: the :class:`~secondorder.optim.StepInfo` of the last update


def _dtype(params: Any) -> Any:
    return flatten(params)[0][0].dtype


def _blank_info(method: Optimizer, params: Any) -> StepInfo:
    """The info before the first update: NaN values, no iterations, finite. Every field is an
    array of its own, so that the state can be donated (``jax.jit(..., donate_argnums)``)."""
    dtype = _dtype(params)

    def nan() -> Any:
        return jnp.full((), jnp.nan, dtype=dtype)

    info = StepInfo(nan(), nan(), nan(), jnp.asarray(True), jnp.asarray(0, dtype=jnp.int32),
                    nan(), {key: nan() for key in method.info_extras})
    # on the device of parameters committed to one, as the info a jitted update returns is:
    # else the second update would compile again for the changed placement
    leaf = next(iter(jax.tree_util.tree_leaves(params)), None)
    if (isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer)
            and leaf.committed and len(leaf.devices()) == 1):
        info = jax.device_put(info, next(iter(leaf.devices())))
    return info


def _fixed_info(method: Optimizer, info: StepInfo, params: Any) -> StepInfo:
    """``info`` with the structure and dtypes of :func:`_blank_info` (floats in the parameters'
    dtype, int32 iterations, the method's declared extras), so that the state keeps one
    structure across updates (``jax.lax.scan``, one ``jax.jit`` trace)."""
    dtype = _dtype(params)

    def real(x: Any) -> Any:
        return jnp.asarray(x, dtype=dtype)

    extras = {key: real(info.extras.get(key, float("nan"))) for key in method.info_extras}
    return StepInfo(real(info.loss), real(info.step_norm), real(info.damping),
                    jnp.asarray(info.finite, dtype=bool),
                    jnp.asarray(info.inner_iterations, dtype=jnp.int32),
                    real(info.inner_residual), extras)


def as_optax(method: Optimizer) -> optax.GradientTransformationExtraArgs:
    """``method`` (any :class:`~secondorder.optim.Optimizer` instance) as an optax
    transformation whose updates are the method's step, ``new_params - params``.

    Parameters
    ----------
    method:
        The optimiser, built as for the pure API (``HessianFree(apply, loss, lr=...)``); its
        hyperparameters may be schedules (callables of the step count) or traced arrays.

    Returns
    -------
    optax.GradientTransformationExtraArgs
        ``init(params) -> OptaxState`` and ``update(updates, state, params, *, batch=None,
        value=None, **extra_args) -> (updates, state)``; see the module docstring for how the
        incoming ``updates`` are used (as the gradient by first-order methods, not at all by
        second-order ones, which need ``batch``). Unknown extra arguments are ignored, as
        optax's chains require.

    A rejected step (a non-finite loss or step) returns zero updates and keeps the method's
    state, and :func:`step_info` reports it: ``optax.apply_if_finite`` around the
    transformation adds nothing (and, given ``updates=None``, cannot trace its zero branch).
    """
    if not isinstance(method, Optimizer):
        raise HyperparameterError(
            f"as_optax takes a secondorder optimiser instance (e.g. CurveBall(apply, loss)), "
            f"got {method!r}")
    first_order = isinstance(method, GradientDescent)
    takes_summary = "summary_batch" in inspect.signature(method.step).parameters
    name = type(method).__name__
    warned = [False]  # the unused-updates warning, once per transformation

    def init(params: Any) -> OptaxState:
        return OptaxState(method.init(params), _blank_info(method, params))

    def update(updates: Any, state: OptaxState, params: Any = None, *, batch: Any = None,
               value: Any = None, **extra_args: Any) -> tuple[Any, OptaxState]:
        if params is None:
            raise SecondOrderError(
                f"as_optax({name}).update needs the parameters: "
                "tx.update(updates, state, params, batch=batch)")
        if not isinstance(state, OptaxState):
            raise SecondOrderError(
                f"as_optax({name}).update got a {type(state).__name__}, not the OptaxState "
                "that its init(params) returns")
        # nnx.Optimizer passes None as an empty State: no gradient, step on the batch
        given = updates is not None and bool(jax.tree_util.tree_leaves(updates))
        if given and not first_order and not warned[0]:
            warned[0] = True
            warnings.warn(
                f"as_optax({name}) does not read the incoming updates: it computes its gradient "
                "and curvature on batch=(x, y), so a transform chained before it (a gradient "
                "clip, optax.add_decayed_weights) does not reach its step. Chain transforms "
                f"after it (they act on the step) or pass transform= to {name}, and pass None "
                "as the updates (no gradient to compute)", UnusedUpdatesWarning,
                stacklevel=caller_level())
        if first_order and given:
            if value is not None:
                value = jnp.asarray(value, dtype=_dtype(params))
            new, inner, info = method.step_with_gradient(params, state.inner, updates, value)
        else:
            if batch is None:
                what = ("the gradient as updates, or batch=(x, y)" if first_order
                        else "batch=(x, y): a second-order method computes its own gradient "
                             "and curvature on the batch")
                raise SecondOrderError(f"as_optax({name}).update needs {what}")
            if any(isinstance(leaf, optax.MaskedNode) for leaf in jax.tree_util.tree_leaves(
                    params, is_leaf=lambda v: isinstance(v, optax.MaskedNode))):
                raise StructureError(
                    f"as_optax({name}) got parameters with masked-out entries (optax.masked or "
                    "optax.multi_transform) and no gradient: a step on the batch evaluates the "
                    "network, which needs every parameter. Keep the frozen parameters out of "
                    "the model's parameters instead (from_nnx(..., wrt=...); a frozen constant "
                    "closed over by apply), or give a first-order method the gradient")
            kwargs = {}
            if takes_summary and extra_args.get("summary_batch") is not None:
                kwargs["summary_batch"] = extra_args["summary_batch"]
            new, inner, info = method.step(params, state.inner, batch, **kwargs)
        out = jax.tree.map(lambda a, b: a - b, new, params)
        return out, OptaxState(inner, _fixed_info(method, info, params))

    return optax.GradientTransformationExtraArgs(init, update)


def step_info(state: Any) -> StepInfo:
    """The :class:`~secondorder.optim.StepInfo` of the last update, found in the state of an
    :func:`as_optax` transformation or of any chain (nested tuples) holding one; the first one
    found, depth first."""
    found = _find(state)
    if found is None:
        raise SecondOrderError("no as_optax state in this optimiser state")
    return found.info


def _find(state: Any) -> OptaxState | None:
    if isinstance(state, OptaxState):
        return state
    if isinstance(state, tuple | list):
        for part in state:
            found = _find(part)
            if found is not None:
                return found
    return None
