"""flax.linen models as pure functions, with mutable collections, dropout keys and layer taps.

``model, params = from_flax(module, variables, kwargs={"train": True})`` turns a linen module and
the variables of ``module.init`` into an ``apply(params, x)`` that every optimiser takes, with
``params`` the tree and values of ``variables["params"]`` (committed to their device, so that a
jitted step compiles once), which go straight back into ``module.apply``.

Per-step state. A second-order step calls ``apply`` many times on one batch (JVPs, VJPs, line
searches, trial points). For a model in train mode:

* BatchNorm normalises with the statistics of the batch it is given, so every call on the step's
  batch uses that batch's statistics;
* Dropout draws its mask from the key in ``rngs``. The key travels *with the inputs*:
  ``x = model.inputs(x, rng=key, collections=batch_stats)`` is a :class:`FlaxInputs` (a
  NamedTuple, so a pytree: under ``jax.jit`` the key and the collections are traced arguments,
  not constants). Every call of the step sees the same key, hence the same mask;
* the running statistics are updated once per step, from that step's batch, by
  :meth:`FlaxModel.update_collections` (one ``module.apply(..., mutable=[...])`` at the step's
  starting parameters, as a first-order training loop does in its loss evaluation). The
  optimiser's own calls run with the collections mutable and discard the updates.

:meth:`FlaxModel.make_step` puts the three together in one jitted function.

Layer taps. ``nn.Dense`` and ``nn.Conv`` calls are intercepted with ``flax.linen.intercept_methods``
to add a tap to their outputs and record their inputs in the layouts of the reference models
(:mod:`secondorder.models.intercepted` gives the layouts, shared with the ``flax.nnx`` adapter).
Grouped and masked convolutions are not tapped (their parameters are treated as any untapped
leaf). Build the K-FAC operator of a flax model with :meth:`FlaxModel.kfac`, which reads each
kernel in flax's layout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any, NamedTuple

from ..errors import RandomKeyError, SecondOrderError, UnsupportedModelError
from .base import Array, batch_data, committed, unless_rejected
from .intercepted import Hook, InterceptedModel


class FlaxInputs(NamedTuple):
    """A batch with the state one training step shares across its forward calls.

    Fields: ``x`` the batch (any pytree the module takes as its first argument); ``rngs`` a dict
    stream name -> JAX key (``None``: no randomness); ``collections`` the non-parameter variables,
    e.g. ``{"batch_stats": ...}`` (``None``: those given to :func:`from_flax`). Build it with
    :meth:`FlaxModel.inputs`. The library's batch checks (NaN, inf) read its concrete floating
    leaves, the data and the collections.
    """

    x: Any
    rngs: dict[str, Array] | None = None
    collections: dict[str, Any] | None = None
    #: the batch is the field ``x`` (:func:`secondorder.models.base.batch_data`)
    carries_batch = True


def _as_jax_key(key: Any) -> Any:
    """A JAX typed or raw (uint32) key as it is; a :mod:`secondorder.random` key (int32 (2,))
    reinterpreted as the raw uint32 key with the same bits."""
    import jax
    import jax.numpy as jnp

    key = jnp.asarray(key)
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    if key.dtype == jnp.uint32:
        return key
    if key.dtype == jnp.int32 and key.shape[-1:] == (2,):
        return jax.lax.bitcast_convert_type(key, jnp.uint32)
    raise RandomKeyError(
        f"expected a JAX key (jax.random.key or PRNGKey) or a secondorder.random key, got an "
        f"array of dtype {key.dtype} and shape {key.shape}"
    )


class FlaxModel(InterceptedModel):
    """A ``flax.linen`` module as ``apply(params, x, taps=None)``; see the module docstring.

    Parameters:

    * ``module``: the linen module;
    * ``variables``: the result of ``module.init`` (or any variables dict): ``"params"`` are the
      parameters the optimiser trains, every other collection (``"batch_stats"``, ...) is held in
      :attr:`collections` as the starting state;
    * ``method`` (default ``None``: ``__call__``): the module method to apply, as in
      ``module.apply(..., method=...)``;
    * ``kwargs`` (default ``None``: none): keyword arguments for every call, e.g.
      ``{"train": True}`` for a module whose BatchNorm and Dropout read a ``train`` flag;
    * ``rng_streams`` (default ``("dropout",)``): the rng stream names a single key given to
      :meth:`inputs` is spread over (split when there are several);
    * ``mutable`` (default ``None``: every collection in ``variables`` other than ``"params"``):
      the collections the module may write in train mode (kept mutable in every call, the
      writes discarded but in :meth:`update_collections`);
    * ``example`` (default ``None``): a batch (or :class:`FlaxInputs`) used to find the Dense and
      Conv layers at construction; without it they are found at the first call that needs them
      (:meth:`tap_shapes`, ``layers``).
    """

    def __init__(self, module: Any, variables: Mapping[str, Any], *,
                 method: Callable | str | None = None, kwargs: Mapping[str, Any] | None = None,
                 rng_streams: Sequence[str] = ("dropout",),
                 mutable: Sequence[str] | None = None, example: Any = None):
        if "params" not in variables:
            raise SecondOrderError(
                f"the flax variables have no 'params' collection (found {sorted(variables)}); "
                "pass the result of module.init(key, x)"
            )
        self.module = module
        self.method = method
        self.kwargs = dict(kwargs or {})
        self.rng_streams = tuple(rng_streams)
        self._collections = committed({k: v for k, v in variables.items() if k != "params"})
        self.mutable = tuple(self._collections) if mutable is None else tuple(mutable)
        self._params = variables["params"]
        self._init_taps()
        if example is not None:
            self._discover_early(example)

    def __repr__(self) -> str:
        return f"FlaxModel({type(self.module).__name__}, mutable={list(self.mutable)})"

    # ------------------------------------------------------------------ per-step state
    @property
    def collections(self) -> dict[str, Any]:
        """The starting non-parameter collections (``variables`` minus ``"params"``), a copy:
        a training loop that donates the collections it starts from (``donate_argnums``) then
        deletes its own buffers, not the model's defaults, which :meth:`inputs` and
        :meth:`update_collections` fall back on."""
        import jax
        import jax.numpy as jnp

        return jax.tree_util.tree_map(jnp.copy, self._collections)

    def inputs(self, x: Any, rng: Any = None, collections: Mapping[str, Any] | None = None
               ) -> FlaxInputs:
        """The batch ``x`` with this step's randomness and collections (a :class:`FlaxInputs`).

        ``rng`` (default ``None``): a JAX key (``jax.random.key``, ``PRNGKey`` or a
        :mod:`secondorder.random` key), spread over ``rng_streams``, or a dict stream -> key;
        use a new key every step (``jax.random.split``). ``collections`` (default ``None``: the
        starting :attr:`collections`): the current non-parameter variables, e.g. the
        ``batch_stats`` returned by the previous :meth:`update_collections`.
        """
        rngs = None
        if isinstance(rng, Mapping):
            rngs = {name: _as_jax_key(k) for name, k in rng.items()}
        elif rng is not None:
            import jax

            key = _as_jax_key(rng)
            if len(self.rng_streams) == 1:
                rngs = {self.rng_streams[0]: key}
            else:
                keys = jax.random.split(key, len(self.rng_streams))
                rngs = dict(zip(self.rng_streams, keys))
        cols = dict(self._collections if collections is None else collections)
        return FlaxInputs(x, rngs, cols)

    def _call(self, params: Any, x: Any, hook: Hook | None = None) -> tuple[Any, dict[str, Any]]:
        """``module.apply`` on ``x`` (an array or :class:`FlaxInputs`): (outputs, updates);
        with ``hook``, every tappable Dense and Conv call returns ``hook(module, path, inputs,
        outputs)``."""
        import flax.errors
        import flax.linen as nn

        if isinstance(x, FlaxInputs):
            data, rngs, cols = x.x, x.rngs, x.collections
        else:
            data, rngs, cols = x, None, None
        if cols is None:
            cols = self._collections
        variables = {**cols, "params": params}
        mut = list(self.mutable)
        kwargs = dict(self.kwargs)
        if self.method is not None:
            kwargs["method"] = self.method
        ctx = nullcontext()
        if hook is not None:
            def interceptor(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
                out = next_fun(*args, **kwargs)
                if context.method_name != "__call__" or self._kind(context.module) is None:
                    return out
                a = args[0] if args else kwargs["inputs"]
                return hook(context.module, tuple(context.module.path), a, out)

            ctx = nn.intercept_methods(interceptor)
        try:
            with ctx:
                res = self.module.apply(variables, data, rngs=rngs, mutable=mut or False,
                                        **kwargs)
        except flax.errors.InvalidRngError as err:
            raise RandomKeyError(
                f"the flax module needs a random key ({err}); pass the batch as "
                "model.inputs(x, rng=key) with a new key every step"
            ) from err
        if mut:
            out, updates = res
            return out, dict(updates)
        return res, {}

    def update_collections(self, params: Any, x: Any) -> dict[str, Any]:
        """The collections after one train-mode forward pass of ``params`` on ``x`` (an array or
        the step's :class:`FlaxInputs`): BatchNorm's running statistics updated from that batch,
        exactly one ``module.apply(..., mutable=[...])`` call. Pass the parameters the step
        started from (the ones its forward calls were linearised at)."""
        cols = x.collections if isinstance(x, FlaxInputs) and x.collections is not None \
            else self._collections
        _, updates = self._call(params, x)
        return {**cols, **updates}

    def make_step(self, opt: Any, *, jit: bool = True) -> Callable:
        """A training step ``step(params, opt_state, collections, batch, key=None)`` that returns
        ``(params, opt_state, collections, info)``.

        It wraps ``batch = (x, y)`` as ``(self.inputs(x, key, collections), y)``, takes
        ``opt.step`` on it (every forward call of the step with the batch's statistics and
        one dropout mask from ``key``) and updates the collections once from that batch at the
        starting parameters. ``opt``: an optimiser built on this model
        (``METHODS[name](model, loss)``); ``jit`` (default ``True``): compile with ``jax.jit``.
        """
        def step(params: Any, opt_state: Any, collections: Mapping[str, Any], batch: Any,
                 key: Any = None) -> tuple[Any, Any, dict[str, Any], Any]:
            x, y = batch
            inputs = self.inputs(x, rng=key, collections=collections)
            new_params, opt_state, info = opt.step(params, opt_state, (inputs, y))
            return new_params, opt_state, unless_rejected(
                info.finite, self.update_collections(params, inputs), inputs.collections), info

        if not jit:
            return step
        import jax

        return jax.jit(step)

    # ------------------------------------------------------------------ taps
    def _kind(self, module: Any) -> str | None:
        return _linen_kind(module)

    def _probe(self, x: Any) -> Any:
        """The batch with a dummy key per stream when it has none (Dropout needs one to run)."""
        import jax

        if isinstance(x, FlaxInputs) and x.rngs is not None:
            return x
        dummy = {name: jax.random.key(0) for name in self.rng_streams}
        return FlaxInputs(batch_data(x), dummy,
                          x.collections if isinstance(x, FlaxInputs) else None)


def _linen_kind(module: Any) -> str | None:
    """"dense" for an ``nn.Dense``, "conv" for an ``nn.Conv`` without groups or mask."""
    import flax.linen as nn

    if isinstance(module, nn.Dense):
        return "dense"
    if isinstance(module, nn.Conv):
        # grouped and masked convolutions are not Kronecker blocks: left untapped, like every
        # other layer type (as from_torch leaves grouped Conv2d layers)
        if module.feature_group_count != 1 or module.mask is not None:
            return None
        return "conv"
    return None


def from_flax(module: Any, variables: Mapping[str, Any] | None = None, **options: Any
              ) -> tuple[FlaxModel, Any]:
    """``(model, params)`` for a ``flax.linen`` module and its variables (from ``module.init``):
    ``model(params, x)`` is the module's forward pass, ``params`` the arrays of
    ``variables["params"]`` (committed to their device).

    ``options`` are those of :class:`FlaxModel`: ``method=None``, ``kwargs=None`` (e.g.
    ``{"train": True}``), ``rng_streams=("dropout",)``, ``mutable=None`` (every non-params
    collection), ``example=None``. Models with BatchNorm or Dropout take their per-step state
    through :meth:`FlaxModel.inputs` and :meth:`FlaxModel.update_collections`, or all at once
    through :meth:`FlaxModel.make_step`.
    """
    _refuse_nnx(module)
    if variables is None:
        raise SecondOrderError(
            "from_flax needs the module's variables: from_flax(module, module.init(key, x))")
    model = FlaxModel(module, variables, **options)
    return model, committed(variables["params"])


def _refuse_nnx(module: Any) -> None:
    """UnsupportedModelError, with the way that works, for a ``flax.nnx`` module."""
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax without nnx
        return
    if isinstance(module, nnx.Module):
        raise UnsupportedModelError(
            f"from_flax takes flax.linen modules and their variables; {type(module).__name__} "
            "is a flax.nnx module, which holds its own variables: use model, params = "
            "secondorder.models.from_nnx(module)")
