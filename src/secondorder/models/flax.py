"""flax.linen models as pure functions, with mutable collections, dropout keys and layer taps.

``model, params = from_flax(module, variables, kwargs={"train": True})`` turns a linen module and
the variables of ``module.init`` into an ``apply(params, x)`` that every optimiser takes, with
``params = variables["params"]`` unchanged (same tree, same leaves, so the result goes straight back
into ``module.apply``).

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
(:mod:`secondorder.models.layers`): a dense layer's input (m, d_in [+1]) and tap (m, d_out); a
convolution's im2col patches (m, Ho Wo, C_in kh kw [+1]), channel-major within a patch as a
(C_out, C_in, kh, kw) kernel flattened row-major, and tap (m, Ho Wo, C_out). Convolutions with
one or three spatial axes are tapped the same way (a 1-D convolution's positions are its output
length). A Dense layer on (m, ..., d_in) inputs (a sequence, an image's pixels) shares its
weight over the middle axes, as a convolution over positions with a 1 x 1 kernel: input
(m, positions, d_in [+1]), tap (m, positions, d_out). Grouped and masked convolutions are not
tapped (their parameters are treated as any untapped leaf). So
:func:`secondorder.curvature.kronecker_factors` gives the same A and G as on the reference models.
Flax stores a dense kernel as (d_in, d_out) and a convolution kernel as (k_1, .., k_n, C_in, C_out),
transposes of the reference layouts: the factors are the same, but ``secondorder.curvature.KFAC``
reads the weights in the reference layouts, so build the K-FAC operator of a flax model with
:meth:`FlaxModel.kfac`, which transposes each layer's kernel around the same blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from ..errors import RandomKeyError, SecondOrderError, ShapeError, UnsupportedModelError
from .base import Array, LayerInfo, Model, check_batch_axis, tap_dtype
from .layers import channels_last_to_reference, reference_to_channels_last


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


@dataclass(frozen=True)
class _Tapped:
    """One intercepted Dense or Conv call: where it sits and how to rebuild its patches."""

    path: tuple[str, ...]
    kind: str
    bias: bool
    tap_shape: tuple[int, ...]
    kernel_size: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    padding: Any = None
    input_dilation: tuple[int, ...] = ()
    kernel_dilation: tuple[int, ...] = ()


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


def _tuple(value: Any, n: int, default: int = 1) -> tuple[int, ...]:
    if value is None:
        return (default,) * n
    if isinstance(value, int):
        return (value,) * n
    return tuple(int(v) for v in value)


class FlaxModel(Model):
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

    channels_last = True  # dense kernels (d_in, d_out), conv kernels (..., C_in, C_out)

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
        #: the starting non-parameter collections (``variables`` minus ``"params"``)
        self.collections = {k: v for k, v in variables.items() if k != "params"}
        self.mutable = tuple(self.collections) if mutable is None else tuple(mutable)
        self._params = variables["params"]
        self._tapped: tuple[_Tapped, ...] | None = None
        self._layers: tuple[LayerInfo, ...] | None = None
        self._shapes: dict[Any, list[tuple[int, ...]]] = {}
        import jax

        # one compiled forward pass: inlined inside a jitted step, and in eager steps it saves
        # re-binding the module at each of the step's many calls
        self._forward = jax.jit(lambda params, x: self._call(params, x)[0])
        if example is not None:
            self.tap_shapes(example)

    def __repr__(self) -> str:
        return f"FlaxModel({type(self.module).__name__}, mutable={list(self.mutable)})"

    # ------------------------------------------------------------------ per-step state
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
        cols = dict(self.collections if collections is None else collections)
        return FlaxInputs(x, rngs, cols)

    def _call(self, params: Any, x: Any, interceptor: Callable | None = None,
              mutable: Sequence[str] | None = None) -> tuple[Any, dict[str, Any]]:
        """``module.apply`` on ``x`` (an array or :class:`FlaxInputs`): (outputs, updates)."""
        import flax.errors
        import flax.linen as nn

        if isinstance(x, FlaxInputs):
            data, rngs, cols = x.x, x.rngs, x.collections
        else:
            data, rngs, cols = x, None, None
        if cols is None:
            cols = self.collections
        variables = {**cols, "params": params}
        mut = list(self.mutable if mutable is None else mutable)
        kwargs = dict(self.kwargs)
        if self.method is not None:
            kwargs["method"] = self.method
        ctx = nn.intercept_methods(interceptor) if interceptor is not None else nullcontext()
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
            else self.collections
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
            return new_params, opt_state, self.update_collections(params, inputs), info

        if not jit:
            return step
        import jax

        return jax.jit(step)

    # ------------------------------------------------------------------ apply and taps
    def apply(self, params: Any, x: Any, taps: list[Array] | None = None) -> Any:
        """f = apply(params, x) for a batch ``x`` or a :class:`FlaxInputs`; with ``taps`` (one
        per entry of :attr:`layers`), ``(f, inputs)`` with each tapped layer's homogeneous input
        (see the module docstring)."""
        if taps is None:
            return self._forward(params, x)
        tapped = self._discover(x)
        index = {t.path: k for k, t in enumerate(tapped)}
        recorded: list[Array] = [None] * len(tapped)

        def interceptor(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
            if context.method_name != "__call__" or _kind(context.module) is None:
                return next_fun(*args, **kwargs)
            k = index[tuple(context.module.path)]
            info = tapped[k]
            out = next_fun(*args, **kwargs)
            a = args[0] if args else kwargs["inputs"]
            recorded[k] = _layer_input(info, a)
            return out + taps[k].reshape(out.shape)

        out = self._call(params, x, interceptor)[0]
        return out, recorded

    def _discover(self, x: Any) -> tuple[_Tapped, ...]:
        """The Dense and Conv calls of one forward pass on a batch shaped like ``x`` (cached)."""
        import jax

        data = x.x if isinstance(x, FlaxInputs) else x
        key = jax.tree_util.tree_map(lambda a: (tuple(a.shape), str(a.dtype)), data)
        key = tuple(jax.tree_util.tree_leaves(key))
        if key in self._shapes and self._tapped is not None:
            return self._tapped
        found: list[_Tapped] = []

        def record(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
            out = next_fun(*args, **kwargs)
            kind = _kind(context.module) if context.method_name == "__call__" else None
            if kind is not None:
                a = args[0] if args else kwargs["inputs"]
                found.append(_describe(context.module, kind, a, out))
            return out

        if isinstance(x, FlaxInputs) and x.rngs is not None:
            probe = x
        else:
            dummy = {name: jax.random.key(0) for name in self.rng_streams}
            probe = FlaxInputs(data, dummy, x.collections if isinstance(x, FlaxInputs) else None)
        jax.eval_shape(lambda p, inp: self._call(p, inp, record)[0], self._params, probe)
        paths = [t.path for t in found]
        repeated = sorted({p for p in paths if paths.count(p) > 1})
        if repeated:
            raise SecondOrderError(
                f"the layers {['/'.join(p) for p in repeated]} are called more than once in one "
                "forward pass; layer taps need one call per Dense or Conv"
            )
        tapped = tuple(found)
        check_batch_axis([("/".join(t.path), t.tap_shape) for t in tapped],
                         int(jax.tree_util.tree_leaves(data)[0].shape[0]))
        if self._tapped is None:
            self._tapped = tapped
            self._layers = self._layer_table(tapped)
        elif [t.path for t in self._tapped] != paths:
            raise SecondOrderError("the module calls different layers for different input "
                                   "shapes; layer taps need the same layers for every batch")
        self._shapes[key] = [t.tap_shape for t in tapped]
        return self._tapped

    def _layer_table(self, tapped: Sequence[_Tapped]) -> tuple[LayerInfo, ...]:
        import jax

        flat, _ = jax.tree_util.tree_flatten_with_path(self._params)
        index = {}
        for i, (path, leaf) in enumerate(flat):
            index[tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)] = (i, leaf)
        layers = []
        for t in tapped:
            w, kernel = index[(*t.path, "kernel")]
            b = index[(*t.path, "bias")][0] if t.bias else None
            shape = tuple(kernel.shape)
            fan_in = int(np.prod(shape[:-1]))
            layers.append(LayerInfo(t.kind, w, b, fan_in, int(shape[-1])))
        return tuple(layers)

    @property
    def layers(self) -> tuple[LayerInfo, ...]:  # type: ignore[override]
        """One :class:`LayerInfo` per Dense or Conv call, in call order (leaf indices in the
        canonical sorted-leaf order of ``params``); found at the first forward pass that
        needs them (or at construction with ``example=``)."""
        if self._layers is None:
            raise SecondOrderError(
                "the flax model's layers are found from a forward pass: pass example=x to "
                "from_flax, or call model.tap_shapes(x) first"
            )
        return self._layers

    def tap_shapes(self, x: Any) -> list[tuple[int, ...]]:
        """The tap shapes for a batch ``x`` (array or :class:`FlaxInputs`), one per layer."""
        self._discover(x)
        import jax

        data = x.x if isinstance(x, FlaxInputs) else x
        key = tuple(jax.tree_util.tree_leaves(
            jax.tree_util.tree_map(lambda a: (tuple(a.shape), str(a.dtype)), data)))
        return self._shapes[key]

    def kfac(self, loss: Any, params: Any, batch: tuple[Any, Any], **options: Any) -> Any:
        """The K-FAC operator on the flax parameters (``secondorder.curvature.KFAC`` with each
        Dense and Conv kernel read in flax's layout): a ``KFACOperator`` with ``inv()``,
        ``power(p)`` and ``damped_inverse(damping, method)``, acting on trees shaped like
        ``params``. ``loss``: a library loss; ``batch``: ``(x, y)`` (``x`` may be a
        :class:`FlaxInputs`); ``options``: those of ``kronecker_factors`` (``mode="exact"``,
        ``samples=1``, ``seed=0``, ``noise=None``, ``key=None``)."""
        from ..curvature.kfac import assemble, kronecker_factors

        factors = kronecker_factors(self, loss, params, batch, **options)
        return assemble(factors, params, _flax_layer_kronecker)

    def _tap_placement(self, x: Any) -> tuple[Any, Any, Any]:
        """JAX's default device, the dtype of the parameters given to :func:`from_flax`."""
        import jax.numpy as jnp

        return jnp, None, tap_dtype(self, self._params)


def _kind(module: Any) -> str | None:
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


#: the spatial axes' letters of a convolution with 1, 2 or 3 of them, for lax's dimension numbers
_SPATIAL = {1: "W", 2: "HW", 3: "DHW"}


def _describe(module: Any, kind: str, a: Any, out: Any) -> _Tapped:
    """What the taps need to know about one Dense or Conv call (from its input and output).

    A Dense layer on (batch, ..., features) inputs shares its weight over the middle axes (a
    sequence's positions, say): its taps are (batch, positions, features), as a convolution's."""
    path = tuple(module.path)
    name = "/".join(path) or "the root module"
    if a.ndim < 2:
        raise ShapeError(f"layer taps take batched inputs, (batch, ...); {name} gets "
                         f"{tuple(a.shape)}")
    if kind == "dense":
        m, d_out = out.shape[0], out.shape[-1]
        shape = (m, d_out) if out.ndim == 2 else (m, int(np.prod(out.shape[1:-1])), d_out)
        return _Tapped(path, kind, bool(module.use_bias), shape)
    kernel = module.kernel_size  # flax reads an int as a 1-D kernel
    kernel = (int(kernel),) if isinstance(kernel, int) else tuple(int(k) for k in kernel)
    n = len(kernel)
    if n not in _SPATIAL or a.ndim != n + 2:
        raise ShapeError(f"layer taps take convolutions with 1, 2 or 3 spatial axes on (batch, "
                         f"spatial..., C) inputs, one batch axis; {name} has a {n}-D kernel "
                         f"and gets {tuple(a.shape)}")
    padding = module.padding
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID", "SAME_LOWER"):
            raise SecondOrderError(f"layer taps do not support padding {padding!r} ({name}); "
                                   "use 'SAME', 'VALID' or explicit pairs")
        padding = padding.upper()
    else:
        from flax.linen.linear import canonicalize_padding

        padding = tuple(tuple(int(v) for v in p) for p in canonicalize_padding(padding, n))
    m, c_out = out.shape[0], out.shape[-1]
    return _Tapped(path, kind, bool(module.use_bias), (m, int(np.prod(out.shape[1:-1])), c_out),
                   kernel_size=kernel,
                   strides=_tuple(module.strides, n), padding=padding,
                   input_dilation=_tuple(module.input_dilation, n),
                   kernel_dilation=_tuple(module.kernel_dilation, n))


def _layer_input(info: _Tapped, a: Array) -> Array:
    """A tapped layer's homogeneous input: (m, d_in [+1]), (m, positions, d_in [+1]) for a
    Dense layer on sequences, or the patches (m, positions, C k_1 ... k_n [+1]) channel-major,
    as the reference models record them."""
    import jax
    import jax.numpy as jnp

    if info.kind == "conv":
        spatial = _SPATIAL[len(info.kernel_size)]
        lhs = f"N{spatial}C"
        a = jax.lax.conv_general_dilated_patches(
            a, info.kernel_size, info.strides, info.padding, lhs_dilation=info.input_dilation,
            rhs_dilation=info.kernel_dilation, dimension_numbers=(lhs, f"{spatial}IO", lhs))
    if a.ndim > 2:
        a = a.reshape(a.shape[0], -1, a.shape[-1])
    if info.bias:
        a = jnp.concatenate([a, jnp.ones((*a.shape[:-1], 1), dtype=a.dtype)], axis=-1)
    return a


def _relayout(matvec: Callable[[Any], Any], v: Any) -> Any:
    """``matvec`` (on reference-layout ``(b, W)`` or ``W``) applied to a flax-layout vector."""
    if isinstance(v, tuple):
        b, k = v
        out_b, out_w = matvec((b, channels_last_to_reference(k)))
        return out_b, reference_to_channels_last(out_w)
    return reference_to_channels_last(matvec(channels_last_to_reference(v)))


def _flax_layer_kronecker(factors: Any, bias_like: Array | None, kernel_like: Array) -> Any:
    """A ``LayerKronecker`` on a flax layer's ``(bias, kernel)`` leaves: the reference block on
    the transposed kernel, with its products, inverses and powers transposed back."""
    from ..curvature.kfac import LayerKronecker
    from ..linalg import LinearOperator, Structure
    from ..linalg.operator import placement

    class Relayout(LinearOperator):
        def __init__(self, inner: Any, like: Any):
            self.inner = inner
            s = Structure.of(like)
            super().__init__(s, s, *placement(like))

        def _matvec(self, v: Any) -> Any:
            return _relayout(self.inner._matvec, v)

        _rmatvec = _matvec

        def transpose(self) -> Any:
            return self

    class FlaxLayerKronecker(LayerKronecker):
        def __init__(self) -> None:
            super().__init__(factors, bias_like, channels_last_to_reference(kernel_like))
            self.like = kernel_like if bias_like is None else (bias_like, kernel_like)
            s = Structure.of(self.like)
            LinearOperator.__init__(self, s, s, *placement(self.like))

        def _matvec(self, v: Any) -> Any:
            return _relayout(super()._matvec, v)

        _rmatvec = _matvec

        def _cached(self, state: Any, **multiply: Any) -> Any:
            return Relayout(super()._cached(state, **multiply), self.like)

    return FlaxLayerKronecker()


def from_flax(module: Any, variables: Mapping[str, Any] | None = None, **options: Any
              ) -> tuple[FlaxModel, Any]:
    """``(model, params)`` for a ``flax.linen`` module and its variables (from ``module.init``):
    ``model(params, x)`` is the module's forward pass, ``params = variables["params"]``.

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
    return model, variables["params"]


def _refuse_nnx(module: Any) -> None:
    """UnsupportedModelError, with the way that works, for a ``flax.nnx`` module."""
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax without nnx
        return
    if isinstance(module, nnx.Module):
        raise UnsupportedModelError(
            f"from_flax takes flax.linen modules; {type(module).__name__} is a flax.nnx module. "
            "Split it and wrap the merge as a pure function: graphdef, params, rest = "
            "nnx.split(module, nnx.Param, ...); model, params = from_jax(lambda p, x: "
            "nnx.merge(graphdef, p, rest)(x), params). That model has no layer taps (use "
            "CurveBall, Hessian-free, Shampoo, TNT, SGD or Adam), and BatchNorm statistics and "
            "Dropout keys in rest do not advance unless you split the updated module again. "
            "K-FAC and K-BFGS need layer taps: write the network with flax.linen for them")
