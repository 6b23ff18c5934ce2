"""Equinox models as pure functions: ``model, params = from_equinox(eqx_model)``.

The model is split by ``eqx.partition(eqx_model, eqx.is_inexact_array)``: ``params`` holds its
floating-point arrays (an equinox module with ``None`` elsewhere, a tree every optimiser
handles), the static part the rest, and ``apply(params, x)`` recombines them with
``eqx.combine`` and calls the model. Equinox layers act on one example, so by default the call is
``jax.vmap``-ed over the leading axis of the batch (``batched=True`` calls the model on the whole
batch instead).

Models with state and randomness. ``eqx.nn.make_with_state`` models (BatchNorm) and models that
take a ``key`` (Dropout) get their per-step state through the inputs, as
:mod:`secondorder.models.flax` does: ``x = model.inputs(x, key=key, state=state)`` is an
:class:`EquinoxInputs` (a NamedTuple pytree, traced under ``jax.jit``); every forward call of a
step sees the same key (so the same dropout masks) and normalises with the step's batch, and
:meth:`EquinoxModel.update_state` returns the state after one forward pass over that batch. The
call is ``model(x, state, key=k)`` with a state, ``model(x, key=k)`` with a key only, and
``model(x)`` otherwise; under the batch ``vmap`` the state is shared (``in_axes=None``,
``axis_name`` the BatchNorm's axis name) and the key is split into one key per example.
Equinox layers have no layer taps here (use :func:`~secondorder.models.from_flax`, a reference
model or a torch module for per-layer Kronecker statistics).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any, NamedTuple

from ..errors import SecondOrderError
from .base import Array, Model
from .flax import _as_jax_key


class EquinoxInputs(NamedTuple):
    """A batch with the state one training step shares across its forward calls.

    Fields: ``x`` the batch; ``key`` a JAX key (``None``: no randomness); ``state`` an
    ``eqx.nn.State`` (``None``: the one given to :func:`from_equinox`). The library's batch
    checks (NaN, inf) read its concrete floating leaves.
    """

    x: Any
    key: Any = None
    state: Any = None


class EquinoxModel(Model):
    """An equinox module as ``apply(params, x)``; see the module docstring.

    Parameters:

    * ``model``: the equinox module;
    * ``state`` (default ``None``): its ``eqx.nn.State`` for a model made with
      ``eqx.nn.make_with_state`` (then it is called as ``model(x, state, key=...)``);
    * ``batched`` (default ``False``): ``False`` maps the model over the leading axis of the batch
      with ``jax.vmap`` (equinox layers take one example); ``True`` calls it on the whole batch;
    * ``axis_name`` (default ``"batch"``): the name of the batch axis of that ``vmap``, which
      ``eqx.nn.BatchNorm(..., axis_name=...)`` must name;
    * ``kwargs`` (default ``None``: none): keyword arguments for every call.
    """

    def __init__(self, model: Any, state: Any = None, *, batched: bool = False,
                 axis_name: Hashable = "batch", kwargs: Mapping[str, Any] | None = None):
        import equinox as eqx

        params, self.static = eqx.partition(model, eqx.is_inexact_array)
        self._initial = params
        #: the starting state (``None`` for a model without one)
        self.state = state
        self.batched = bool(batched)
        self.axis_name = axis_name
        self.kwargs = dict(kwargs or {})
        import jax

        # one compiled forward pass: inside a jitted step it is inlined; in eager steps it saves
        # re-tracing the vmap at each of the step's many calls
        self._forward = jax.jit(self._call)

    def __repr__(self) -> str:
        return f"EquinoxModel({type(self.static).__name__}, stateful={self.state is not None})"

    def inputs(self, x: Any, key: Any = None, state: Any = None) -> EquinoxInputs:
        """The batch ``x`` with this step's ``key`` (default ``None``; a JAX key or a
        :mod:`secondorder.random` key, new every step) and ``state`` (default ``None``: the
        starting :attr:`state`) as an :class:`EquinoxInputs`."""
        return EquinoxInputs(x, None if key is None else _as_jax_key(key),
                             self.state if state is None else state)

    def _call(self, params: Any, x: Any) -> tuple[Array, Any]:
        """(outputs, new state or None) of the recombined model on ``x``."""
        import equinox as eqx
        import jax

        if isinstance(x, EquinoxInputs):
            data, key, state = x.x, x.key, x.state
        else:
            data, key, state = x, None, None
        if state is None:
            state = self.state
        model = eqx.combine(params, self.static)
        kwargs = self.kwargs

        def one(xi: Any, st: Any, k: Any) -> Any:
            extra = dict(kwargs) if k is None else {**kwargs, "key": k}
            if st is None:
                return model(xi, **extra), None
            return model(xi, st, **extra)

        if self.batched:
            return one(data, state, key)
        size = jax.tree_util.tree_leaves(data)[0].shape[0]
        keys = None if key is None else jax.random.split(key, size)
        mapped = jax.vmap(one, in_axes=(0, None, None if keys is None else 0),
                          out_axes=(0, None), axis_name=self.axis_name)
        return mapped(data, state, keys)

    def apply(self, params: Any, x: Any, taps: list[Array] | None = None) -> Any:
        """f = apply(params, x) for a batch ``x`` or an :class:`EquinoxInputs`."""
        if taps is not None:
            raise SecondOrderError(
                "equinox models have no layer taps; use from_flax, a secondorder reference "
                "model (MLP, ConvNet) or from_torch for per-layer Kronecker statistics"
            )
        return self._forward(params, x)[0]

    def update_state(self, params: Any, x: Any) -> Any:
        """The state after one forward pass of ``params`` on ``x`` (the step's
        :class:`EquinoxInputs`): BatchNorm's running statistics from that batch. Pass the
        parameters the step started from."""
        state = self._forward(params, x)[1]
        if state is None:
            raise SecondOrderError("this equinox model has no state (pass state= to "
                                   "from_equinox for a model from eqx.nn.make_with_state)")
        return state

    def make_step(self, opt: Any, *, jit: bool = True) -> Callable:
        """A training step ``step(params, opt_state, state, batch, key=None)`` returning
        ``(params, opt_state, state, info)``: ``opt.step`` on ``(self.inputs(x, key, state),
        y)``, then the state updated once from that batch at the starting parameters (``state``
        passes through as ``None`` for a model without one). ``opt``: an optimiser built on this
        model; ``jit`` (default ``True``): compile with ``jax.jit``."""
        def step(params: Any, opt_state: Any, state: Any, batch: Any, key: Any = None
                 ) -> tuple[Any, Any, Any, Any]:
            x, y = batch
            inputs = self.inputs(x, key=key, state=state)
            new_params, opt_state, info = opt.step(params, opt_state, (inputs, y))
            if inputs.state is not None:
                state = self.update_state(params, inputs)
            return new_params, opt_state, state, info

        if not jit:
            return step
        import jax

        return jax.jit(step)

    def tap_shapes(self, x: Array) -> list[tuple[int, ...]]:
        return []

    def to_module(self, params: Any) -> Any:
        """The equinox module with ``params`` (``eqx.combine(params, static)``)."""
        import equinox as eqx

        return eqx.combine(params, self.static)


def from_equinox(model: Any, state: Any = None, **options: Any) -> tuple[EquinoxModel, Any]:
    """``(apply, params)`` for an equinox module: ``params`` its floating-point arrays
    (``eqx.partition(model, eqx.is_inexact_array)``), ``apply(params, x)`` the model on a batch.

    ``state`` (default ``None``): the ``eqx.nn.State`` of a model from
    ``eqx.nn.make_with_state``. ``options`` are those of :class:`EquinoxModel`:
    ``batched=False`` (vmap over the batch), ``axis_name="batch"``, ``kwargs=None``. After
    training, ``apply.to_module(params)`` is the trained equinox module.
    """
    wrapped = EquinoxModel(model, state, **options)
    params, wrapped._initial = wrapped._initial, None
    return wrapped, params
