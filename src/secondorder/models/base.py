"""What every model in :mod:`secondorder.models` provides.

A model is a pure function ``apply(params, x)`` plus the metadata the curvature layer needs:
``layers`` (one :class:`LayerInfo` per tappable dense or convolution layer, in order) and
``tap_shapes(x)``. ``apply(params, x, taps)`` with a list of zero arrays returns
``(f, inputs)``: the outputs and each tapped layer's homogeneous input (see :mod:`.layers`).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import backends
from .._pytree import flatten, tree_map
from ..errors import UnsupportedModelError

Array = Any


@dataclass(frozen=True)
class LayerInfo:
    """One tappable layer: kind ("dense" or "conv"), where its weight and bias sit in the
    parameter tree (leaf indices in canonical order), and its input/output widths."""

    kind: str
    weight: int
    bias: int | None
    in_features: int
    out_features: int


class Model(ABC):
    """Base class: subclasses set ``layers`` and implement ``apply`` and ``tap_shapes``, and
    ``_numpy_params`` for :meth:`init`."""

    layers: tuple[LayerInfo, ...] = ()
    #: whether its kernels are stored channels-last, (d_in, d_out) and (k_1, ..., k_n, C_in,
    #: C_out), as flax stores them; methods read them through
    #: :func:`~secondorder.models.layers.channels_last_to_reference`
    channels_last: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass that overrides :meth:`zero_taps` with the one-argument signature of
        earlier releases, ``zero_taps(self, x)``, keeps working: the methods call
        ``zero_taps(x, params)``, and its override is wrapped to take and ignore ``params``."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("zero_taps")
        if own is None or not callable(own):
            return
        parameters = list(inspect.signature(own).parameters.values())
        if len(parameters) == 2 and all(
                p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters):

            def zero_taps(self: Model, x: Array, params: Any = None) -> list[Array]:
                return own(self, x)

            zero_taps.__doc__ = own.__doc__
            cls.zero_taps = zero_taps  # type: ignore[method-assign]

    def _numpy_params(self, rng: np.random.Generator) -> Any:
        """The initial parameters as a tree of NumPy arrays (the hook behind :meth:`init`)."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot draw its own initial parameters: pass parameters "
            "explicitly (from_torch and from_jax return them with the model), or implement "
            "_numpy_params(rng) to use init()"
        )

    def init(self, seed: int = 0, backend: str | backends.Backend | None = None,
             dtype: str = "float64") -> Any:
        """Initial parameters drawn with NumPy's Generator(seed) and converted to ``backend``
        (a name, a Backend, or the current one), so every backend starts from the same weights."""
        if backend is None:
            backend = backends.current()
        elif isinstance(backend, str):
            backend = backends.get(backend)
        params = self._numpy_params(np.random.default_rng(seed))
        return tree_map(lambda a: backend.asarray(a, dtype=dtype), params)

    @abstractmethod
    def apply(self, params: Any, x: Array, taps: list[Array] | None = None) -> Any:
        """f = apply(params, x), or ``(f, inputs)`` with ``taps`` (see the module docstring)."""

    def __call__(self, params: Any, x: Array) -> Array:
        return self.apply(params, x)

    @abstractmethod
    def tap_shapes(self, x: Array) -> list[tuple[int, ...]]:
        """The shapes of the taps for a batch ``x``, one per layer in ``layers``."""

    def zero_taps(self, x: Array, params: Any = None) -> list[Array]:
        """Zero taps for a batch ``x``: one per layer in ``layers``, in the dtype of the tapped
        weights of ``params`` (:func:`tap_dtype`), never the batch's alone (token indices are
        integers, and a float64 tap would promote a float32 layer); without ``params``, in
        the model's default (:meth:`_tap_placement`)."""
        shapes = self.tap_shapes(x)
        xp, device, default = self._tap_placement(x)
        dtype = tap_dtype(self, params)
        dtype = default if dtype is None else dtype
        return [xp.zeros(s, dtype=dtype, device=device) for s in shapes]

    def _tap_placement(self, x: Array) -> tuple[Any, Any, Any]:
        """(namespace, device, default dtype) of the taps for a batch ``x``: the batch's
        framework and device, its floating dtype (float64 for an integer batch)."""
        backend = backends.backend_of(x)
        xp = backend.xp
        floating = str(x.dtype).startswith(("float", "torch.float"))
        return xp, backend.device(x), x.dtype if floating else xp.float64


def find_model(apply: Any) -> Model | None:
    """The :class:`Model` behind ``apply``: the model itself (it is callable) or its bound
    ``apply`` / ``__call__`` method; None for a plain function."""
    if isinstance(apply, Model):
        return apply
    owner = getattr(apply, "__self__", None)
    if isinstance(owner, Model) and getattr(apply, "__name__", "") in ("apply", "__call__"):
        return owner
    return None


def batch_data(x: Any) -> Any:
    """The batch inside a model's step inputs (:class:`~secondorder.models.FlaxInputs`,
    :class:`~secondorder.models.NnxInputs` and :class:`~secondorder.models.EquinoxInputs`
    carry it as ``x`` beside the step's key and state); ``x`` itself otherwise."""
    return x.x if getattr(type(x), "carries_batch", False) else x


def check_batch_axis(taps: list[tuple[str, tuple[int, ...]]], batch: int) -> None:
    """UnsupportedModelError unless every tapped layer's tap, ``(name, shape)``, has the
    batch's ``batch`` samples on its first axis. Taps read a layer's input rows as samples
    (with positions on a middle axis), so a layer that sees the batch elsewhere, a time-major
    (T, m, d) sequence or rows flattened to (m T, d), would give wrong statistics."""
    wrong = [f"{name!r} {tuple(shape)}" for name, shape in taps if int(shape[0]) != batch]
    if wrong:
        raise UnsupportedModelError(
            f"layer taps need the batch on the first axis of every tapped layer's output; for a "
            f"batch of {batch} samples, {', '.join(wrong)} do not (a time-major (T, m, d) "
            "layout, or rows flattened to (m T, d)). Keep the batch axis first (batch_first=True; "
            "a (m, T, d) sequence is tapped with its positions), or use a method without taps "
            "(CurveBall, Hessian-free, Shampoo, TNT, SGD, Adam)")


def committed(tree: Any) -> Any:
    """The JAX arrays of ``tree`` committed to the device they are on, as a jitted step's
    outputs are. flax, nnx and equinox create their parameters uncommitted, and a jitted step
    given them and then its own outputs would compile twice; committed arrays (a sharding the
    user chose) and other leaves stay as they are."""
    import jax

    def commit(a: Any) -> Any:
        if isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer) and not a.committed:
            return jax.device_put(a, next(iter(a.devices())))
        return a

    return jax.tree_util.tree_map(commit, tree)


def tap_dtype(model: Model, params: Any) -> Any:
    """The dtype of ``model``'s taps at ``params``: that of its first tapped weight (a layer's
    output, its tap and its output gradient have its weight's dtype, whatever the batch's: a
    token batch is integer), or None without ``params`` or tapped layers."""
    if params is None or not model.layers:
        return None
    leaves, _ = flatten(params)
    return leaves[model.layers[0].weight].dtype


def lecun_normal(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    """N(0, 1/fan_in) weights (biases start at 0)."""
    return rng.standard_normal(shape) / np.sqrt(fan_in)


def unless_rejected(finite: Any, new: Any, old: Any) -> Any:
    """``new`` where the step was accepted (``finite``, the step's ``info.finite``), ``old``
    where it was rejected, leaf by leaf: a model's running statistics and random streams
    follow the step's verdict, as its parameters and the optimiser state do. A non-finite
    batch otherwise wrote NaN into BatchNorm's running averages, which never recover (a
    moving average of NaN stays NaN) and make every eval-mode output NaN. Leaves are matched
    by their key path, so ``old`` may be another mapping type (a ``FrozenDict``) than ``new``;
    leaves that only ``new`` has (a collection the step created) are kept, and the result has
    ``new``'s structure."""
    import jax
    import jax.numpy as jnp

    keystr = jax.tree_util.keystr
    before = {keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(old)[0]}

    def keep(path: Any, leaf: Any) -> Any:
        prior = before.get(keystr(path))
        if prior is None or getattr(prior, "shape", None) != getattr(leaf, "shape", None):
            return leaf
        return jnp.where(finite, leaf, prior)

    return jax.tree_util.tree_map_with_path(keep, new)
