"""flax.nnx modules as pure functions, with their state and layer taps.

``model, params = from_nnx(module)`` splits an ``nnx.Module`` into its graph, its parameters and
the rest of its state (``nnx.split(module, nnx.Param, ...)``); ``model(params, x)`` merges them
back (``nnx.merge``) and calls the module, so every optimiser takes it. ``params`` is the pure
``nnx.State`` of the parameters (arrays as leaves, the tree ``nnx.Optimizer`` hands to an optax
transformation); ``nnx.update(module, params)`` writes trained parameters back into the module.

Per-step state. An nnx module keeps its BatchNorm statistics (``nnx.BatchStat``) and its Dropout
random streams (``nnx.Rngs`` counters) in itself; here they travel *with the inputs*, as the
other adapters' do: ``x = model.inputs(x, state)`` is an :class:`NnxInputs` (a NamedTuple, so a
pytree: traced under ``jax.jit``). Every forward call of a step merges the same state, so a train-
mode BatchNorm normalises with the step's batch each time and Dropout draws the same mask; and
:meth:`NnxModel.update_state` returns the state after one forward pass on that batch (the running
statistics updated and the random streams advanced once), as a first-order loop's single call
would leave the module. Train or eval mode is the module's own (``module.train()``,
``module.eval()``) when it is given to :func:`from_nnx`. :meth:`NnxModel.make_step` puts the
three together in one jitted function. Values a call sows (``nnx.Intermediate``) are dropped,
not carried. With ``nnx.Optimizer(module, as_optax(method), wrt=nnx.Param)`` the state lives in
the user's module, so a step inside ``nnx.jit`` reads it and writes it back::

    inputs = model.inputs(x, nnx.state(module, nnx.Not(nnx.Param)))
    params = nnx.as_pure(nnx.state(module, nnx.Param))
    optimizer.update(module, None, batch=(inputs, y))  # a second-order method's step
    nnx.update(module, model.update_state(params, inputs))

(``batch=(x, y)`` runs every step with the starting state: right for a module without
BatchNorm or Dropout, or in eval mode; a first-order method takes the gradient as
``optax.sgd`` does, in place of ``None``.)

Layer taps. Every ``nnx.Linear`` and ``nnx.Conv`` (1 to 3 spatial axes, without feature groups or
mask) whose ``__call__`` is nnx's own is tapped: in a tapped forward pass each such layer of the
merged module is given, for that call only, a subclass whose call adds the tap to the layer's
output and records its input, in the layouts of :mod:`secondorder.models.intercepted` (shared
with :mod:`secondorder.models.flax`; nnx stores kernels channels-last as linen does). So K-FAC,
K-BFGS, K-BFGS(L), SMW and TNT's layouts take an nnx network. A layer called twice in one forward
pass (a shared layer) raises :class:`~secondorder.errors.SecondOrderError`; other layers
(``LinearGeneral``, ``Einsum``, embeddings, norms, a subclass with its own ``__call__``) are not
tapped: parameters outside tapped layers, which each method handles by its fallback. So are
layers whose kernel the ``wrt`` filter leaves out (frozen; a frozen bias makes its layer one
without bias) and layers called under a transformation inside the module (``nnx.scan``,
``nnx.vmap``, ``nnx.remat``), which an :class:`~secondorder.errors.UntappedLayerWarning`
names and :attr:`NnxModel.untapped` lists.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from ..errors import SecondOrderError
from .base import committed, unless_rejected
from .intercepted import Hook, InterceptedModel

#: the attribute of a tapped layer that holds ``(hook, path)`` during a tapped call
_TAP = "_secondorder_tap"


class NnxInputs(NamedTuple):
    """A batch with the module state one training step shares across its forward calls.

    Fields: ``x`` the batch (any pytree the module takes as its first argument); ``state`` the
    module's non-parameter state, a pure ``nnx.State`` (``None``: the state given to
    :func:`from_nnx`). Build it with :meth:`NnxModel.inputs`. The library's batch checks (NaN,
    inf) read its concrete floating leaves.
    """

    x: Any
    state: Any = None
    #: the batch is the field ``x`` (:func:`secondorder.models.base.batch_data`)
    carries_batch = True


class NnxModel(InterceptedModel):
    """A ``flax.nnx`` module as ``apply(params, x, taps=None)``; see the module docstring.

    Parameters:

    * ``module``: the nnx module (its train or eval mode as set);
    * ``wrt`` (default ``None``: ``nnx.Param``): the filter of the variables the optimiser
      trains, as in ``nnx.split`` and ``nnx.Optimizer``; the rest is the state
      (:attr:`state`);
    * ``kwargs`` (default ``None``: none): keyword arguments for every call of the module;
    * ``example`` (default ``None``): a batch (or :class:`NnxInputs`) used to find the Linear
      and Conv layers at construction; without it they are found at the first call that needs
      them (:meth:`tap_shapes`, ``layers``).
    """

    def __init__(self, module: Any, *, wrt: Any = None, kwargs: Mapping[str, Any] | None = None,
                 example: Any = None):
        from flax import nnx

        if not isinstance(module, nnx.Module):
            raise SecondOrderError(
                f"from_nnx takes a flax.nnx module, got {type(module).__name__}; for a "
                "flax.linen module use from_flax(module, variables)")
        self.wrt = nnx.Param if wrt is None else wrt
        self.kwargs = dict(kwargs or {})
        if any(isinstance(v, nnx.Rngs) for v in self.kwargs.values()):
            raise SecondOrderError(
                "from_nnx: an nnx.Rngs passed at every call would be advanced inside the "
                "optimiser's traced calls; store it on the module instead (nnx.Dropout(rate, "
                "rngs=rngs) at construction), so that its stream is part of the module's state "
                "and advances once per step")
        import jax

        self._name = type(module).__name__
        module = nnx.clone(module)  # the user's module is left as it is
        nnx.pop(module, nnx.Intermediate)  # sown values: outputs of a call, not state
        self.graphdef, params, state = nnx.split(module, self.wrt, ...)
        self._params = committed(nnx.as_pure(params))
        #: the starting non-parameter state (a pure ``nnx.State``; empty for a module without
        #: BatchNorm statistics or random streams)
        self.state = committed(nnx.as_pure(state))
        self._init_taps()

        self._updated_state = jax.jit(lambda params, x: self._call(params, x)[1])
        if example is not None:
            self._discover_early(example)

    def __repr__(self) -> str:
        return f"NnxModel({self._name})"

    # ------------------------------------------------------------------ per-step state
    def inputs(self, x: Any, state: Any = None) -> NnxInputs:
        """The batch ``x`` with this step's module ``state`` (default ``None``: the starting
        :attr:`state`), e.g. the one the previous :meth:`update_state` returned."""
        return NnxInputs(x, self.state if state is None else state)

    def _call(self, params: Any, x: Any, hook: Hook | None = None) -> tuple[Any, Any]:
        """(outputs, state after the call) of the merged module on ``x`` (an array or an
        :class:`NnxInputs`); with ``hook``, every tappable layer call returns
        ``hook(module, path, inputs, outputs)``."""
        from flax import nnx

        data, state = (x.x, x.state) if isinstance(x, NnxInputs) else (x, None)
        module = nnx.merge(self.graphdef, params, self.state if state is None else state)
        if hook is not None:
            for path, layer in nnx.iter_modules(module):
                if self._kind(layer) is not None:
                    object.__setattr__(layer, "__class__", _tapped_class(type(layer)))
                    object.__setattr__(layer, _TAP, (hook, tuple(str(p) for p in path)))
        out = module(data, **self.kwargs)
        nnx.pop(module, nnx.Intermediate)  # what the call sowed is not carried as state
        return out, nnx.as_pure(nnx.split(module, self.wrt, ...)[2])

    def update_state(self, params: Any, x: Any) -> Any:
        """The module state after one forward pass of ``params`` on ``x`` (the step's
        :class:`NnxInputs`): BatchNorm's running statistics from that batch, the random streams
        advanced by one call. Pass the parameters the step started from."""
        return self._updated_state(params, x)

    def make_step(self, opt: Any, *, jit: bool = True) -> Callable:
        """A training step ``step(params, opt_state, state, batch)`` returning ``(params,
        opt_state, state, info)``: ``opt.step`` on ``(self.inputs(x, state), y)``, then the
        state updated once from that batch at the starting parameters. ``opt``: an optimiser
        built on this model; ``jit`` (default ``True``): compile with ``jax.jit``."""
        def step(params: Any, opt_state: Any, state: Any, batch: Any
                 ) -> tuple[Any, Any, Any, Any]:
            x, y = batch
            inputs = self.inputs(x, state)
            new_params, opt_state, info = opt.step(params, opt_state, (inputs, y))
            return new_params, opt_state, unless_rejected(
                info.finite, self.update_state(params, inputs), inputs.state), info

        if not jit:
            return step
        import jax

        return jax.jit(step)

    def to_module(self, params: Any, state: Any = None) -> Any:
        """A new nnx module with ``params`` and ``state`` (default: the starting state); or
        write them into the user's own module with ``nnx.update(module, params, state)``."""
        from flax import nnx

        return nnx.merge(self.graphdef, params, self.state if state is None else state)

    # ------------------------------------------------------------------ taps
    def _kind(self, module: Any) -> str | None:
        return _nnx_kind(module)


def _nnx_kind(module: Any) -> str | None:
    """"dense" for an ``nnx.Linear``, "conv" for an ``nnx.Conv`` without feature groups or
    mask, each with nnx's own ``__call__`` (a subclass that changes the call is not a plain
    layer); None otherwise."""
    from flax import nnx

    cls = getattr(type(module), "_secondorder_base", type(module))
    if isinstance(module, nnx.Linear) and cls.__call__ is nnx.Linear.__call__:
        return "dense"
    if isinstance(module, nnx.Conv) and cls.__call__ is nnx.Conv.__call__:
        if module.feature_group_count != 1 or module.mask is not None:
            return None
        return "conv"
    return None


@functools.cache
def _tapped_class(cls: type) -> type:
    """``cls`` with a call that passes its input and output through the hook the instance
    holds (the merged module of one tapped call is the only one that gets this class)."""
    def __call__(self: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N807
        out = cls.__call__(self, inputs, *args, **kwargs)
        tap = vars(self).get(_TAP)  # absent on a copy an nnx transform made inside the module
        return out if tap is None else tap[0](self, tap[1], inputs, out)

    return type(f"Tapped{cls.__name__}", (cls,),
                {"__call__": __call__, "_secondorder_base": cls, "__module__": __name__})


def from_nnx(module: Any, **options: Any) -> tuple[NnxModel, Any]:
    """``(model, params)`` for a ``flax.nnx`` module: ``params`` the pure state of its
    ``nnx.Param`` variables, ``model(params, x)`` the module's forward pass.

    ``options`` are those of :class:`NnxModel`: ``wrt=None`` (``nnx.Param``), ``kwargs=None``,
    ``example=None``. A module with BatchNorm or Dropout takes its per-step state through
    :meth:`NnxModel.inputs` and :meth:`NnxModel.update_state`, or all at once through
    :meth:`NnxModel.make_step`. After training, ``nnx.update(module, params, state)`` writes the
    results into the module.
    """
    model = NnxModel(module, **options)
    return model, model._params
