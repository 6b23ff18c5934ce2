"""Layer taps by interception: the base of the flax adapters (``flax.linen`` and ``flax.nnx``).

A flax module is a program, not a list of layers: which Dense (Linear) and Conv layers a forward
pass calls, in what order and on what shapes, is known only by running it. So an
:class:`InterceptedModel` finds its tapped layers from one shape evaluation of a forward pass
with every such call intercepted (``_discover``), and a tapped forward pass intercepts the same
calls to add a tap to each output and record each input in the layouts of the reference models
(:mod:`secondorder.models.layers`):

* a dense layer on (m, d_in) inputs: input (m, d_in [+1]), tap (m, d_out);
* a dense layer on (m, ..., d_in) inputs (a sequence, an image's pixels) shares its weight over
  the middle axes, as a convolution over positions with a 1 x 1 kernel: input
  (m, positions, d_in [+1]), tap (m, positions, d_out);
* a convolution with 1, 2 or 3 spatial axes: its im2col patches (m, positions,
  C_in k_1 ... k_n [+1]), channel-major within a patch as a (C_out, C_in, k_1, ..., k_n) kernel
  flattened row-major, and tap (m, positions, C_out).

So :func:`secondorder.curvature.kronecker_factors` gives the same A and G as on the reference
models. Flax stores a dense kernel as (d_in, d_out) and a convolution kernel as
(k_1, ..., k_n, C_in, C_out), transposes of the reference layouts (``channels_last``): the
factors are the same, and the methods read the kernels through
:func:`~secondorder.models.layers.channels_last_to_reference`. Build the K-FAC *operator* of such
a model with :meth:`InterceptedModel.kfac`, which transposes each layer's kernel around the
same blocks.

Subclasses give the framework's half: ``_call(params, x, hook)`` (a forward pass in which every
tappable layer call returns ``hook(module, path, inputs, outputs)``), ``_kind(module)``
("dense", "conv" or None), ``_probe(x)`` (the inputs for the shape evaluation) and
``_params`` (a tree shaped like the parameters, whose key paths name the layers' kernels).
"""

from __future__ import annotations

import warnings
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._stack import caller_level
from ..errors import SecondOrderError, ShapeError, UnsupportedModelError, UntappedLayerWarning
from .base import Array, LayerInfo, Model, batch_data, check_batch_axis, tap_dtype
from .layers import channels_last_to_reference, reference_to_channels_last

#: hook(module, path, layer inputs, layer outputs) -> the outputs the forward pass continues with
Hook = Callable[[Any, tuple[str, ...], Array, Array], Array]


@dataclass(frozen=True)
class Tapped:
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


class InterceptedModel(Model):
    """The shared half of :class:`~secondorder.models.FlaxModel` and
    :class:`~secondorder.models.NnxModel` (see the module docstring). After the first forward
    pass that finds the layers, :attr:`untapped` names the Dense and Conv layers called under a
    transformation inside the module (a scanned or vmapped stack, rematerialisation), which are
    left untapped."""

    channels_last = True  # dense kernels (d_in, d_out), conv kernels (..., C_in, C_out)
    _params: Any
    _tapped: tuple[Tapped, ...] | None
    _layers: tuple[LayerInfo, ...] | None
    _shapes: dict[Any, list[tuple[int, ...]]]

    def _init_taps(self) -> None:
        import jax

        self._tapped = None
        self._layers = None
        self._shapes = {}
        self.untapped: tuple[str, ...] = ()
        #: why the layers cannot be tapped, found at construction (see _discover_early)
        self._tap_error: UnsupportedModelError | None = None
        # one compiled forward pass: inlined inside a jitted step, and in eager steps it saves
        # re-binding the module at each of the step's many calls
        self._forward = jax.jit(lambda params, x: self._call(params, x)[0])

    # ------------------------------------------------------------------ the framework's half
    @abstractmethod
    def _call(self, params: Any, x: Any, hook: Hook | None = None) -> tuple[Any, Any]:
        """(outputs, the module's updated state) of one forward pass."""

    @abstractmethod
    def _kind(self, module: Any) -> str | None:
        """"dense" or "conv" for a module whose calls are tapped, else None."""

    def _probe(self, x: Any) -> Any:
        """The inputs of the shape evaluation that finds the layers, for a batch like ``x``."""
        return x

    # ------------------------------------------------------------------ apply and taps
    def apply(self, params: Any, x: Any, taps: list[Array] | None = None) -> Any:
        """f = apply(params, x); with ``taps`` (one per entry of :attr:`layers`),
        ``(f, inputs)`` with each tapped layer's homogeneous input (see the module
        docstring)."""
        if taps is None:
            return self._forward(params, x)
        tapped = self._discover(x)
        index = {t.path: k for k, t in enumerate(tapped)}
        recorded: list[Array] = [None] * len(tapped)

        def hook(module: Any, path: tuple[str, ...], a: Array, out: Array) -> Array:
            k = index.get(path)
            if k is None:  # a layer left untapped (see _discover)
                return out
            # the statistics in the taps' dtype (the parameters'), the tap added in the
            # output's: a layer computing in bfloat16 keeps its forward pass
            recorded[k] = layer_input(tapped[k], a).astype(taps[k].dtype)
            return out + taps[k].reshape(out.shape).astype(out.dtype)

        out = self._call(params, x, hook)[0]
        return out, recorded

    def _shape_key(self, x: Any) -> tuple:
        import jax

        data = batch_data(x)
        return tuple((tuple(a.shape), str(a.dtype)) for a in jax.tree_util.tree_leaves(data))

    def _discover(self, x: Any) -> tuple[Tapped, ...]:
        """The tapped Dense and Conv calls of one forward pass on a batch shaped like ``x``
        (cached). A call is left untapped, its parameters outside tapped layers, when its
        kernel is not among the trained parameters (a ``wrt`` filter that freezes it) or when
        it runs under a transformation inside the module (a scanned or vmapped stack of
        layers, rematerialisation): its input lives in that transformation's trace, and its
        kernel may be a slice of a stacked parameter."""
        import jax

        key = self._shape_key(x)
        if key in self._shapes and self._tapped is not None:
            return self._tapped
        found: list[Tapped] = []
        inner: list[str] = []
        trace: list[Any] = []

        def record(module: Any, path: tuple[str, ...], a: Array, out: Array) -> Array:
            if trace_state() != trace[0]:
                inner.append("/".join(path))
            else:
                found.append(describe(module, self._kind(module), a, out, path))
            return out

        def forward(p: Any, inp: Any) -> Any:
            trace.append(trace_state())
            return self._call(p, inp, record)[0]

        out = jax.eval_shape(forward, self._params, self._probe(x))
        paths = [t.path for t in found]
        repeated = sorted({p for p in paths if paths.count(p) > 1})
        if repeated:
            raise UnsupportedModelError(
                f"the layers {['/'.join(p) for p in repeated]} are called more than once in one "
                "forward pass; layer taps (K-FAC, K-BFGS) need one call per Dense or Conv. "
                "Use a method without taps for this model (CurveBall, Hessian-free, Shampoo, "
                "TNT, SMW with gram='auto' or 'jacobian', SGD, Adam)")
        tapped, layers = layer_table(self._params, found)
        outputs = jax.tree_util.tree_leaves(out)
        batch = (outputs[0].shape[0] if outputs and outputs[0].ndim
                 else _batch_size(batch_data(x)))
        check_batch_axis([("/".join(t.path), t.tap_shape) for t in tapped], int(batch))
        if self._tapped is None:
            self._tapped, self._layers = tapped, layers
            #: layers called under a transformation inside the module, left untapped
            self.untapped = tuple(sorted(set(inner)))
            if self.untapped:
                warnings.warn(
                    f"the layers {list(self.untapped)} are called under a transformation inside "
                    "the module (a scanned or vmapped stack, rematerialisation) and are left "
                    "untapped: K-FAC, K-BFGS and SMW step their parameters with their fallback "
                    "(SGD- or Adam-style), without per-layer curvature. To precondition them, "
                    "call the layers directly (a Python loop over the stack), or use a method "
                    "without taps (Shampoo, TNT, CurveBall, Hessian-free)",
                    UntappedLayerWarning, stacklevel=caller_level())
        elif [t.path for t in self._tapped] != [t.path for t in tapped]:
            raise SecondOrderError("the module calls different layers for different input "
                                   "shapes; layer taps need the same layers for every batch")
        self._shapes[key] = [t.tap_shape for t in tapped]
        return self._tapped

    @property
    def layers(self) -> tuple[LayerInfo, ...]:  # type: ignore[override]
        """One :class:`LayerInfo` per Dense or Conv call, in call order (leaf indices in the
        canonical sorted-leaf order of ``params``); found at the first forward pass that
        needs them (or at construction with ``example=``)."""
        if self._layers is None:
            if self._tap_error is not None:
                raise UnsupportedModelError(str(self._tap_error))
            raise SecondOrderError(
                "the flax model's layers are found from a forward pass: pass example=x when "
                "you build it, or call model.tap_shapes(x) first"
            )
        return self._layers

    def _discover_early(self, example: Any) -> None:
        """The layers found at construction from ``example``; a model whose layers cannot be
        tapped (one called twice) is still built, for the methods without taps, and a method
        with taps meets the error when it asks for them."""
        try:
            self.tap_shapes(example)
        except UnsupportedModelError as error:
            self._tap_error = error

    def tap_shapes(self, x: Any) -> list[tuple[int, ...]]:
        """The tap shapes for a batch ``x``, one per layer."""
        self._discover(x)
        return self._shapes[self._shape_key(x)]

    def kfac(self, loss: Any, params: Any, batch: tuple[Any, Any], **options: Any) -> Any:
        """The K-FAC operator on the flax parameters (``secondorder.curvature.KFAC`` with each
        Dense and Conv kernel read in flax's layout): a ``KFACOperator`` with ``inv()``,
        ``power(p)`` and ``damped_inverse(damping, method)``, acting on trees shaped like
        ``params``. ``loss``: a library loss; ``batch``: ``(x, y)``; ``options``: those of
        ``kronecker_factors`` (``mode="exact"``, ``samples=1``, ``seed=0``, ``noise=None``,
        ``key=None``)."""
        from ..curvature.kfac import assemble, kronecker_factors

        factors = kronecker_factors(self, loss, params, batch, **options)
        return assemble(factors, params, _channels_last_layer_kronecker)

    def _tap_placement(self, x: Any) -> tuple[Any, Any, Any]:
        """JAX's default device, the dtype of the parameters the model was built with."""
        import jax.numpy as jnp

        return jnp, None, tap_dtype(self, self._params)


def _key_name(k: Any) -> str:
    return str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))


def layer_table(params: Any, found: Sequence[Tapped]
                ) -> tuple[tuple[Tapped, ...], tuple[LayerInfo, ...]]:
    """The calls that are tapped and their :class:`LayerInfo`: the leaf indices of
    ``path/kernel`` and ``path/bias`` in ``params`` (an nnx state's ``.value`` nodes read as
    their variables). A call whose kernel is not in ``params`` (not trained) is not tapped; one
    whose bias is not (a frozen bias) is tapped as a layer without bias."""
    import dataclasses

    import jax

    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    index = {}
    for i, (path, leaf) in enumerate(flat):
        names = tuple(_key_name(k) for k in path)
        if names and names[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
            names = names[:-1]
        index[names] = (i, leaf)
    tapped, layers = [], []
    for t in found:
        if (*t.path, "kernel") not in index:
            continue
        w, kernel = index[(*t.path, "kernel")]
        bias = index.get((*t.path, "bias")) if t.bias else None
        if t.bias and bias is None:
            t = dataclasses.replace(t, bias=False)
        shape = tuple(kernel.shape)
        fan_in = int(np.prod(shape[:-1]))
        tapped.append(t)
        layers.append(LayerInfo(t.kind, w, None if bias is None else bias[0], fan_in,
                                int(shape[-1])))
    return tuple(tapped), tuple(layers)


def trace_state() -> Any:
    """The JAX trace now being built (compared by identity; ``None`` where this JAX version does
    not expose it)."""
    try:
        from jax._src.core import get_opaque_trace_state
    except ImportError:  # pragma: no cover - other JAX versions
        return None
    return get_opaque_trace_state()


def _batch_size(data: Any) -> int:
    """The leading axis of the batch's first leaf with one (the outputs had none)."""
    import jax

    for leaf in jax.tree_util.tree_leaves(data):
        if getattr(leaf, "ndim", 0):
            return int(leaf.shape[0])
    raise ShapeError("layer taps need a batch with a leading batch axis; no input leaf has one")


def _tuple(value: Any, n: int, default: int = 1) -> tuple[int, ...]:
    if value is None:
        return (default,) * n
    if isinstance(value, int):
        return (value,) * n
    return tuple(int(v) for v in value)


#: the spatial axes' letters of a convolution with 1, 2 or 3 of them, for lax's dimension numbers
_SPATIAL = {1: "W", 2: "HW", 3: "DHW"}


def describe(module: Any, kind: str | None, a: Any, out: Any, path: tuple[str, ...]) -> Tapped:
    """What the taps need to know about one Dense or Conv call (from its input and output).

    A Dense layer on (batch, ..., features) inputs shares its weight over the middle axes (a
    sequence's positions, say): its taps are (batch, positions, features), as a convolution's.
    The convolution's settings are read from the attributes flax's linen and nnx ``Conv`` share
    (``kernel_size``, ``strides``, ``padding``, ``input_dilation``, ``kernel_dilation``,
    ``use_bias``)."""
    name = "/".join(path) or "the root module"
    if a.ndim < 2:
        raise ShapeError(f"layer taps take batched inputs, (batch, ...); {name} gets "
                         f"{tuple(a.shape)}")
    if kind == "dense":
        m, d_out = out.shape[0], out.shape[-1]
        shape = (m, d_out) if out.ndim == 2 else (m, int(np.prod(out.shape[1:-1])), d_out)
        return Tapped(path, kind, bool(module.use_bias), shape)
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
    return Tapped(path, kind, bool(module.use_bias), (m, int(np.prod(out.shape[1:-1])), c_out),
                  kernel_size=kernel,
                  strides=_tuple(module.strides, n), padding=padding,
                  input_dilation=_tuple(module.input_dilation, n),
                  kernel_dilation=_tuple(module.kernel_dilation, n))


def layer_input(info: Tapped, a: Array) -> Array:
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


def _channels_last_layer_kronecker(factors: Any, bias_like: Array | None, kernel_like: Array
                                   ) -> Any:
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

    class ChannelsLastLayerKronecker(LayerKronecker):
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

    return ChannelsLastLayerKronecker()
