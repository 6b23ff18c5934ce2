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
Layer taps. Every ``eqx.nn.Linear`` in the module tree whose weight is a trained 2-D array, and
every ``eqx.nn.Conv`` (``Conv1d``, ``Conv2d``, ``Conv3d``, without groups), is a tapped layer
(:attr:`EquinoxModel.layers`, in the tree's leaf order), so K-FAC, K-BFGS, K-BFGS(L) and SMW's
tap Gram matrix take an equinox model. Equinox has no method interception: a tapped call
rebuilds the recombined module with each of those layers replaced by a small wrapper that calls
the layer, adds the tap to its output and records its homogeneous input ``[a, 1]`` (``[a]``
without bias); for a convolution, the im2col patches of the example after the layer's own
padding (its ``padding_mode`` too), one row per output position. This happens inside the batch
``jax.vmap``, so the taps are (m, d_out) or (m, positions, C_out) and the inputs (m, d_in [+1])
or (m, positions, C_in k_1 ... k_n [+1]), the layouts of the reference models
(:mod:`secondorder.models.layers`). Equinox stores a Linear weight as (d_out, d_in) and a
kernel as (C_out, C_in, k_1, ..., k_n), the reference layouts, so no relayout is needed; a
convolution's bias is a (C_out, 1, ..., 1) leaf, which the curvature blocks keep in that shape.
Limits, each with a named error or a fallback:

* each tapped Linear must be called exactly once per example and forward pass: a layer called
  twice (weight sharing, a layer applied in a loop) or never raises
  :class:`~secondorder.errors.StructureError`;
* the layer must be called directly on the example, not under the model's own ``jax.vmap`` or
  ``lax.scan`` (e.g. a Linear mapped over a sequence); such a call raises StructureError.
  Stacked layers (``eqx.nn.MLP(..., scan=True)``'s hidden layers, a weight of rank 3) are not
  tapped: they are parameters outside tapped layers (each method's fallback);
* ``batched=True`` models have no taps (StructureError);
* other layers (grouped convolutions, transposed convolutions, embeddings, norms) are not
  tapped: parameters outside tapped layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..errors import SecondOrderError, StructureError
from .base import Array, LayerInfo, Model, batch_data, committed, unless_rejected
from .flax import _as_jax_key
from .intercepted import trace_state


class EquinoxInputs(NamedTuple):
    """A batch with the state one training step shares across its forward calls.

    Fields: ``x`` the batch; ``key`` a JAX key (``None``: no randomness); ``state`` an
    ``eqx.nn.State`` (``None``: the one given to :func:`from_equinox`). The library's batch
    checks (NaN, inf) read its concrete floating leaves.
    """

    x: Any
    key: Any = None
    state: Any = None
    #: the batch is the field ``x`` (:func:`secondorder.models.base.batch_data`)
    carries_batch = True


def _inner_transform_error(err: Exception | None = None) -> StructureError:
    why = "" if err is None else f" ({type(err).__name__})"
    return StructureError(
        "a tapped equinox Linear is called under the model's own jax.vmap, lax.scan or other "
        "transformation (e.g. mapped over a sequence), so its recorded input escapes it; layer "
        "taps need each Linear called once on the example. For a Linear mapped over a "
        "sequence's positions, eqx.nn.Conv1d(d_in, d_out, 1) on the (features, positions) "
        "array is the same layer and is tapped (its weight shared over the positions). "
        "eqx.nn.MultiheadAttention maps its own projections over the positions, so a model "
        "holding it needs a method without taps: Shampoo, TNT, Adam, SGD, CurveBall, "
        f"Hessian-free or SMW with gram='jacobian'{why}")


@dataclass(frozen=True)
class _TapSlot:
    """One tapped layer: where it sits in the module tree and what its taps look like."""

    path: tuple[Any, ...]
    name: str
    bias: bool
    out_features: int
    conv: bool = False  # an eqx.nn.Conv (taps (positions, C_out) per example)


class _Recorder:
    """The inputs of the tapped layers during one traced forward pass of one example; with
    ``taps`` (one per slot, per example) it adds them to the layers' outputs."""

    def __init__(self, slots: tuple[_TapSlot, ...], taps: list[Array] | None):
        self.slots = slots
        self.taps = taps
        self.inputs: list[Array | None] = [None] * len(slots)
        self.outputs: list[Array | None] = [None] * len(slots)
        self.trace = trace_state()

    def __call__(self, k: int, layer: Any, x: Array, **kwargs: Any) -> Array:
        import jax.numpy as jnp

        slot = self.slots[k]
        if self.inputs[k] is not None:
            raise StructureError(
                f"the equinox layer {slot.name} is called more than once in one forward pass "
                "(weight sharing or a loop over one layer); layer taps need one call per "
                "Linear: use a method without taps (Shampoo, Adam, SGD, the GGN methods) or "
                "give each call its own layer"
            )
        if trace_state() != self.trace:
            raise _inner_transform_error()
        out = layer(x, **kwargs)
        a = _patches(layer, x) if slot.conv else jnp.reshape(x, (-1,))
        if slot.bias:
            a = jnp.concatenate([a, jnp.ones((*a.shape[:-1], 1), dtype=a.dtype)], axis=-1)
        self.inputs[k] = a
        self.outputs[k] = out
        if self.taps is None:
            return out
        tap = self.taps[k]
        return out + (jnp.reshape(tap.T, out.shape) if slot.conv else jnp.reshape(tap, out.shape))

    def recorded(self) -> list[Array]:
        """The recorded inputs, in slot order; StructureError for a layer never called."""
        missing = [s.name for s, a in zip(self.slots, self.inputs) if a is None]
        if missing:
            raise StructureError(
                f"the equinox layers {missing} are not called in the forward pass; layer taps "
                "need every Linear of the module called exactly once: remove unused layers or "
                "use a method without taps (Shampoo, Adam, SGD, the GGN methods)"
            )
        return list(self.inputs)  # type: ignore[arg-type]


def _patches(layer: Any, x: Array) -> Array:
    """The im2col patches (positions, C_in k_1 ... k_n) an ``eqx.nn.Conv`` sees on one example
    (C_in, d_1, ..., d_n), channel-major within a patch as its kernel (C_out, C_in, k_1, ...,
    k_n) flattened row-major, after the layer's own padding."""
    import jax
    import jax.numpy as jnp

    padding = layer.padding
    if layer.padding_mode != "ZEROS":  # reflect / replicate / circular, as the layer pads
        x, padding = layer._nonzero_pad(x), "VALID"
    p = jax.lax.conv_general_dilated_patches(
        x[None], layer.kernel_size, layer.stride, padding, rhs_dilation=layer.dilation)
    return jnp.reshape(p[0], (p.shape[1], -1)).T


class _TappedLayer:
    """Stands in for one tapped layer during a tapped call: the layer's call through the
    recorder; every attribute read goes to the layer."""

    def __init__(self, layer: Any, k: int, recorder: _Recorder):
        self._layer, self._k, self._recorder = layer, k, recorder

    def __call__(self, x: Array, **kwargs: Any) -> Array:
        return self._recorder(self._k, self._layer, x, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._layer, name)


def _tap_slots(model: Any, params: Any) -> tuple[tuple[_TapSlot, ...], tuple[LayerInfo, ...]]:
    """The tapped layers of an equinox module (every ``eqx.nn.Linear`` whose weight is a
    trained 2-D array, in leaf order) and their :class:`LayerInfo` (leaf indices in ``params``,
    the partition's leaf order)."""
    import equinox as eqx
    import jax

    index = {tuple(path): i
             for i, (path, _) in enumerate(jax.tree_util.tree_flatten_with_path(params)[0])}
    slots, layers = [], []
    nodes = jax.tree_util.tree_flatten_with_path(model, is_leaf=_is_tappable)[0]
    for path, node in nodes:
        if not _is_tappable(node):
            continue
        path = tuple(path)
        w = index.get((*path, jax.tree_util.GetAttrKey("weight")))
        conv = isinstance(node, eqx.nn.Conv)
        rank = 2 + node.num_spatial_dims if conv else 2
        if w is None or getattr(node.weight, "ndim", 0) != rank:
            continue  # frozen or stacked (MLP(scan=True)): outside tapped layers
        b = index.get((*path, jax.tree_util.GetAttrKey("bias")))
        d_out, d_in = int(node.weight.shape[0]), math.prod(node.weight.shape[1:])
        name = jax.tree_util.keystr(path) or "the root module"
        slots.append(_TapSlot(path, name, b is not None, d_out, conv))
        layers.append(LayerInfo("conv" if conv else "dense", w, b, d_in, d_out))
    return tuple(slots), tuple(layers)


def _is_tappable(node: Any) -> bool:
    """An ``eqx.nn.Linear``, or an ``eqx.nn.Conv`` (1-D to 3-D) without groups."""
    import equinox as eqx

    return isinstance(node, eqx.nn.Linear) or (
        isinstance(node, eqx.nn.Conv) and node.groups == 1)


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
    * ``kwargs`` (default ``None``: none): keyword arguments for every call;
    * ``example`` (default ``None``): a batch (or :class:`EquinoxInputs`) on which the model is
      evaluated once, by shapes only, at construction, so that a model that cannot run on
      such batches fails here (a model that draws random numbers, Dropout, or has a state
      needs the example as ``EquinoxInputs(x, key, state)``). The tapped layers come from the
      module's structure, so unlike ``from_flax`` and ``from_nnx`` nothing needs it; it is
      taken for the same signature.
    """

    def __init__(self, model: Any, state: Any = None, *, batched: bool = False,
                 axis_name: Hashable = "batch", kwargs: Mapping[str, Any] | None = None,
                 example: Any = None):
        import equinox as eqx

        params, self.static = eqx.partition(model, eqx.is_inexact_array)
        self._initial = params
        #: the starting state (``None`` for a model without one)
        self.state = None if state is None else committed(state)
        self.batched = bool(batched)
        self.axis_name = axis_name
        self.kwargs = dict(kwargs or {})
        import jax

        self._slots, self._layers = _tap_slots(model, params)
        self._positions: dict[tuple, list[int]] = {}  # conv output positions by batch shapes
        #: the parameters' shapes and dtypes (for shape evaluations; no arrays are kept)
        self._param_shapes = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
        leaves = jax.tree_util.tree_leaves(params)
        #: the dtype of the taps (that of the parameters)
        self._tap_dtype = leaves[0].dtype if leaves else "float32"
        # one compiled forward pass: inside a jitted step it is inlined; in eager steps it saves
        # re-tracing the vmap at each of the step's many calls
        self._forward = jax.jit(self._call)
        if example is not None:  # the forward pass only: the taps are not the model's error
            jax.eval_shape(lambda p, inp: self._call(p, inp)[0], self._param_shapes, example)

    def __repr__(self) -> str:
        return f"EquinoxModel({type(self.static).__name__}, stateful={self.state is not None})"

    def inputs(self, x: Any, key: Any = None, state: Any = None) -> EquinoxInputs:
        """The batch ``x`` with this step's ``key`` (default ``None``; a JAX key or a
        :mod:`secondorder.random` key, new every step) and ``state`` (default ``None``: the
        starting :attr:`state`) as an :class:`EquinoxInputs`."""
        return EquinoxInputs(x, None if key is None else _as_jax_key(key),
                             self.state if state is None else state)

    def _call(self, params: Any, x: Any, taps: list[Array] | None = None, probe: bool = False
              ) -> tuple[Any, ...]:
        """(outputs, new state or None) of the recombined model on ``x``; with ``taps`` (one
        per tapped layer), (outputs, new state, tapped layers' inputs); with ``probe``,
        (outputs, new state, tapped layers' outputs), for their shapes."""
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
        slots = self._slots
        positions = {s.path: k for k, s in enumerate(slots)}

        def one(xi: Any, st: Any, k: Any, ti: list[Array] | None) -> Any:
            extra = dict(kwargs) if k is None else {**kwargs, "key": k}
            m, recorder = model, None
            if ti is not None or probe:
                recorder = _Recorder(slots, ti)

                def wrap(path: Any, node: Any) -> Any:
                    j = positions.get(tuple(path))
                    return node if j is None else _TappedLayer(node, j, recorder)

                m = jax.tree_util.tree_map_with_path(wrap, model, is_leaf=_is_tappable)
            if st is None:
                out, new_state = m(xi, **extra), None
            else:
                out, new_state = m(xi, st, **extra)
            if recorder is None:
                return out, new_state
            inputs = recorder.recorded()
            return out, new_state, (recorder.outputs if probe else inputs)

        if self.batched:
            if taps is not None:
                raise StructureError(
                    "layer taps need the batch vmap of from_equinox(..., batched=False) (the "
                    "default): a batched=True model has no taps; use a method without taps or "
                    "let from_equinox map the model over the batch")
            return one(data, state, key, None)
        size = jax.tree_util.tree_leaves(data)[0].shape[0]
        keys = None if key is None else jax.random.split(key, size)
        in_axes = (0, None, None if keys is None else 0, None if taps is None else 0)
        out_axes = (0, None) if taps is None and not probe else (0, None, 0)
        mapped = jax.vmap(one, in_axes=in_axes, out_axes=out_axes, axis_name=self.axis_name)
        return mapped(data, state, keys, taps)

    def apply(self, params: Any, x: Any, taps: list[Array] | None = None) -> Any:
        """f = apply(params, x) for a batch ``x`` or an :class:`EquinoxInputs`; with ``taps``
        (one (m, d_out) array per entry of :attr:`layers`), ``(f, inputs)`` with each tapped
        layer's homogeneous input (m, d_in [+1]) (see the module docstring)."""
        if taps is None:
            return self._forward(params, x)[0]
        if len(taps) != len(self._slots):
            raise StructureError(f"expected {len(self._slots)} taps (one per tapped Linear), "
                                 f"got {len(taps)}; build them with model.zero_taps(x)")
        import jax

        try:
            out, _, inputs = self._forward(params, x, list(taps))
        except jax.errors.UnexpectedTracerError as err:
            raise _inner_transform_error(err) from None
        return out, inputs

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
                state = unless_rejected(info.finite, self.update_state(params, inputs),
                                        inputs.state)
            return new_params, opt_state, state, info

        if not jit:
            return step
        import jax

        return jax.jit(step)

    @property
    def layers(self) -> tuple[LayerInfo, ...]:  # type: ignore[override]
        """One :class:`LayerInfo` per tapped ``eqx.nn.Linear`` ("dense") or ``eqx.nn.Conv``
        ("conv") (see the module docstring), in the leaf order of ``params``: weight, then
        bias."""
        return self._layers

    def tap_shapes(self, x: Any) -> list[tuple[int, ...]]:
        """The tap shapes for a batch ``x`` (array or :class:`EquinoxInputs`): (m, d_out) for
        a Linear, (m, positions, C_out) for a convolution (its output size, from an
        evaluation of the shapes of one forward pass, cached by the batch's shapes)."""
        import jax

        data = batch_data(x)
        m = int(jax.tree_util.tree_leaves(data)[0].shape[0])
        if not any(s.conv for s in self._slots):
            return [(m, s.out_features) for s in self._slots]
        key = tuple((tuple(a.shape), str(a.dtype)) for a in jax.tree_util.tree_leaves(data))
        if key not in self._positions:
            outs = jax.eval_shape(lambda p, inp: self._call(p, inp, probe=True)[2],
                                  self._param_shapes, x)
            self._positions[key] = [math.prod(o.shape[2:]) for o in outs]
        return [(m, p, s.out_features) if s.conv else (m, s.out_features)
                for s, p in zip(self._slots, self._positions[key], strict=True)]

    def _tap_placement(self, x: Any) -> tuple[Any, Any, Any]:
        """JAX's default device, the dtype of the model given to :func:`from_equinox`."""
        import jax.numpy as jnp

        return jnp, None, self._tap_dtype

    def to_module(self, params: Any) -> Any:
        """The equinox module with ``params`` (``eqx.combine(params, static)``)."""
        import equinox as eqx

        return eqx.combine(params, self.static)


def from_equinox(model: Any, state: Any = None, **options: Any) -> tuple[EquinoxModel, Any]:
    """``(apply, params)`` for an equinox module: ``params`` its floating-point arrays
    (``eqx.partition(model, eqx.is_inexact_array)``), ``apply(params, x)`` the model on a batch.

    ``state`` (default ``None``): the ``eqx.nn.State`` of a model from
    ``eqx.nn.make_with_state``. ``options`` are those of :class:`EquinoxModel`:
    ``batched=False`` (vmap over the batch), ``axis_name="batch"``, ``kwargs=None``,
    ``example=None``. After
    training, ``apply.to_module(params)`` is the trained equinox module.
    """
    wrapped = EquinoxModel(model, state, **options)
    params, wrapped._initial = wrapped._initial, None
    return wrapped, committed(params)
