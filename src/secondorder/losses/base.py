"""The loss protocol: everything the curvature layer and the optimisers need from a loss.

Conventions, stated once and used everywhere in ``secondorder``:

* network outputs ``f`` have shape (m, k): m samples, k outputs each;
* the per-sample loss is l_i = l(f_i, y_i); the **batch loss is the mean** L = (1/m) sum_i l_i
  (a loss built with ``reduction="sum"`` or a ``scale`` is a :class:`~secondorder.losses.Scaled`
  whose per-sample loss carries the constant: c l_i with c = m for the sum, so the mean of its
  per-sample losses is still the batch loss and the rules below hold unchanged);
* ``grad``, ``hvp``, ``hessian``, ``hessian_sqrt``, ``pinv_hvp`` and ``projector`` are per-sample
  quantities with respect to f_i (not divided by m): the gradient of L with respect to f is
  ``grad(f, y) / m``, and the GGN of L is (1/m) sum_i J_i^T H_i J_i;
* ``sample(f, noise)`` draws targets from the model's predictive distribution given noise drawn
  by ``noise(shape, rng)`` with NumPy's Generator, so every backend samples the same labels;
  ``sample(f, key=key)`` draws the same kind of noise from a :mod:`secondorder.random` key
  (``key_noise``) instead: the same bits on every backend, and new noise per key inside
  ``jax.jit`` (where NumPy noise would be a compile-time constant).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np

from ..backends import Backend, backend_of
from ..errors import NonFiniteError, RandomKeyError, ShapeError

Array = Any


class Loss(ABC):
    """Base class; subclasses implement the per-sample formulas.

    Every library loss takes three keyword options, all of which default to the library's
    convention (the per-sample loss as its class states it, averaged over the batch):

    reduction : {"mean", "sum"}, default "mean"
        "mean": the batch loss is (1/m) sum_i l_i; "sum": sum_i l_i (PyTorch's and optax's
        ``reduction="sum"``).
    scale : float, default 1.0
        A positive constant c multiplying the per-sample loss: the loss becomes c l_i.
    outputs : {"sum", "mean"}, default "sum"
        "mean" divides the per-sample loss by the number of outputs k, as PyTorch's
        ``MSELoss`` and ``BCEWithLogitsLoss`` average over all m k entries.

    With the defaults the constructor returns the loss itself; with any other value it returns
    a :class:`~secondorder.losses.Scaled` wrapping it (see :mod:`secondorder.losses.scaled`
    for how the constant enters each per-sample quantity and the Monte-Carlo Fisher).
    """

    name: str = ""
    #: The options above; a plain library loss has the defaults (:class:`Scaled` overrides them).
    reduction: str = "mean"
    scale: float = 1.0
    outputs: str = "sum"
    #: True when grad(f, y) = mu(f) - targets(f, y) with mu(f) the mean of the predictive
    #: distribution (a canonical link); :class:`Scaled` needs it to sample with a scale.
    canonical: bool = False

    def __new__(cls, *args: Any, reduction: str = "mean", scale: float = 1.0,
                outputs: str = "sum", **kwargs: Any) -> Loss:
        if reduction == "mean" and outputs == "sum" and not isinstance(scale, bool) \
                and isinstance(scale, (int, float)) and scale == 1:
            return super().__new__(cls)
        from .scaled import Scaled

        return Scaled(cls(*args, **kwargs), scale, reduction=reduction, outputs=outputs)

    def __init__(self, *, reduction: str = "mean", scale: float = 1.0, outputs: str = "sum"):
        """Reached only with the default options (the others return a ``Scaled``)."""
        del reduction, scale, outputs  # nothing to store: the class attributes hold them

    def outputs_per_sample(self, f: Array) -> int:
        """The number of outputs of one sample that ``outputs="mean"`` averages over: for an
        elementwise loss every entry after the batch axis, prod(shape[1:])
        (:func:`outputs_per_sample`); softmax cross-entropy counts its predictions (positions)
        instead."""
        return outputs_per_sample(f)

    def factor(self, f: Array) -> float:
        """The constant c of the per-sample loss c l_i at outputs f: 1 for a plain loss (see
        :meth:`Scaled.factor <secondorder.losses.Scaled.factor>`)."""
        return 1.0

    # ------------------------------------------------------------------ interface
    @abstractmethod
    def per_sample(self, f: Array, y: Array) -> Array:
        """l(f_i, y_i) for every sample, shape (m,)."""

    def value(self, f: Array, y: Array) -> Array:
        """The batch loss (1/m) sum_i l(f_i, y_i)."""
        xp = backend_of(f).xp
        return xp.mean(self.per_sample(f, y))

    @abstractmethod
    def grad(self, f: Array, y: Array) -> Array:
        """Per-sample gradients grad_{f_i} l(f_i, y_i), shape (m, k)."""

    @abstractmethod
    def hvp(self, f: Array, y: Array, v: Array) -> Array:
        """Per-sample Hessian-vector products H_i v_i, shape (m, k)."""

    def hvp_at(self, f: Array, y: Array) -> Callable[[Array], Array]:
        """``v -> hvp(f, y, v)`` for fixed (f, y): losses whose Hessian needs work on f alone
        (softmax, sigmoid) do it once here, for operators that take many products."""
        return lambda v: self.hvp(f, y, v)

    def grad_hvp_at(self, f: Array, y: Array) -> tuple[Array, Callable[[Array], Array]]:
        """``(grad(f, y), hvp_at(f, y))``, the same numbers; losses whose gradient and Hessian
        share work on f (softmax cross-entropy's s = softmax(f)) do it once here, for methods
        that need both at one output (CurveBall's J_L and H_L, eqs. 16-18)."""
        return self.grad(f, y), self.hvp_at(f, y)

    def targets(self, f: Array, y: Array) -> Array:
        """The targets as rows in the output space, shaped like the outputs; y itself unless a
        loss takes another form (integer class labels for softmax cross-entropy)."""
        return y

    @abstractmethod
    def hessian(self, f: Array, y: Array) -> Array:
        """The explicit per-sample Hessians H_i, shape (m, k, k) (tests and small systems);
        for outputs of shape (m, ...), k = prod(shape[1:]) in row-major order (:func:`as_rows`)."""

    @abstractmethod
    def hessian_sqrt(self, f: Array, y: Array) -> Array:
        """Per-sample factors S_i with S_i S_i^T = H_i, shape (m, k, k), laid out as
        :meth:`hessian`."""

    @abstractmethod
    def pinv_hvp(self, f: Array, y: Array, v: Array) -> Array:
        """Per-sample pseudo-inverse products H_i^+ v_i."""

    @abstractmethod
    def projector(self, f: Array, y: Array, v: Array) -> Array:
        """Per-sample projections onto range(H_i): (H_i H_i^+) v_i."""

    @abstractmethod
    def conjugate(self, a: Array, y: Array) -> Array:
        """Convex conjugate l*(a_i) = sup_f <a_i, f> - l(f, y_i) per sample (inf off the domain)."""

    @abstractmethod
    def noise(self, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        """The NumPy noise that :meth:`sample` turns into targets for outputs of ``shape``."""

    @abstractmethod
    def key_noise(self, key: Array, f: Array) -> Array:
        """The noise of :meth:`noise` for outputs ``f``, drawn with :mod:`secondorder.random`
        from ``key``, in f's dtype (see :func:`draw_like`) and on f's backend."""

    @abstractmethod
    def _sample(self, f: Array, noise: Array) -> Array:
        """Targets drawn from the predictive distribution p(y | f) given ``noise``."""

    def sample(self, f: Array, noise: Array | None = None, *, key: Array | None = None
               ) -> Array:
        """Targets drawn from the predictive distribution p(y | f), given either ``noise``
        (from :meth:`noise`, converted to f's backend) or a random ``key``
        (:func:`secondorder.random.key`), which draws that noise with :meth:`key_noise`."""
        if (noise is None) == (key is None):
            raise RandomKeyError(
                f"{self.name}: sample takes exactly one of noise (from loss.noise) or key "
                "(from secondorder.random.key)"
            )
        if key is not None:
            noise = self.key_noise(key, f)
        return self._sample(f, noise)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _eye(f: Array) -> Array:
        """The k x k identity in f's dtype and on f's device, k = f.shape[-1] (outputs (m, k),
        or the classes of a per-position loss)."""
        backend = backend_of(f)
        return backend.xp.eye(f.shape[-1], dtype=f.dtype, device=backend.device(f))

    # ------------------------------------------------------------------ checks
    def check(self, f: Array, y: Array) -> None:
        """Raise a named error for outputs and targets this loss cannot take.

        Shapes are always checked; values (finiteness, label ranges) only when the arrays are
        concrete, not inside a ``jax.jit`` trace or a ``torch.func`` transform.
        """
        backend = backend_of(f, y)
        if getattr(f, "ndim", 0) < 2:
            raise ShapeError(
                f"{self.name}: network outputs must have shape (batch, outputs) or (batch, "
                f"..., outputs), got {tuple(getattr(f, 'shape', ()))}; reshape the model's "
                "output"
            )
        self._check_targets(backend, f, y)
        if backend.is_concrete(f) and not bool(np.all(np.isfinite(backend.to_numpy(f)))):
            raise NonFiniteError(
                f"{self.name}: the network outputs contain NaN or inf; check the inputs and "
                "lower the step size"
            )

    def check_shapes(self, f: Array, y: Array) -> None:
        """:class:`~secondorder.errors.ShapeError` unless the targets have the outputs' shape
        (losses whose targets are shaped like the outputs: MSE, sigmoid BCE). Shapes are known
        inside traces too, so this costs nothing; it is called where outputs meet targets."""
        if tuple(getattr(y, "shape", ())) != tuple(getattr(f, "shape", ())):
            raise ShapeError(
                f"{self.name}: targets have shape {tuple(getattr(y, 'shape', ()))}, outputs "
                f"{tuple(getattr(f, 'shape', ()))}; they must match (reshape y, or check the "
                "width of the network's last layer)"
            )

    def check_values(self, f: Array, y: Array) -> None:
        """Raise :class:`~secondorder.errors.LabelError` for target values this loss cannot take
        (class labels out of range, say), at the cost of one reduction and one host read.

        Called by :meth:`per_sample`, so by every step at the point where the outputs meet the
        targets. Only on concrete targets: inside ``jax.jit`` nothing can raise, and
        :func:`secondorder.optim.checked` turns the same test into a ``checkify`` check. This
        base loss has nothing to check; :class:`SoftmaxCrossEntropy` checks its labels.
        """
        del f, y

    def _check_targets(self, backend: Backend, f: Array, y: Array) -> None:
        if tuple(y.shape) != tuple(f.shape):
            raise ShapeError(
                f"{self.name}: targets have shape {tuple(y.shape)}, outputs {tuple(f.shape)}; "
                "they must match"
            )
        if backend.is_concrete(y) and not bool(np.all(np.isfinite(backend.to_numpy(y)))):
            raise NonFiniteError(f"{self.name}: the targets contain NaN or inf")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def draw_like(f: Array, draw: Callable[[Any], Array]) -> Array:
    """``draw(dtype)`` in the dtype of the outputs ``f``: f's own when it is float32 or float64
    (what :mod:`secondorder.random` draws), else float32 cast to f's dtype (a half-precision
    model's outputs, say bfloat16 logits of a layer computing in bfloat16)."""
    backend = backend_of(f)
    if backend.dtype_name(f.dtype) in ("float32", "float64"):
        return draw(f.dtype)
    xp = backend.xp
    return xp.astype(draw(xp.float32), f.dtype)


def sum_outputs(a: Array) -> Array:
    """The sum of ``a`` over every axis but the batch axis: per-sample sums of an elementwise
    loss whose outputs have any shape (m, ...), the k = prod(shape[1:]) outputs of a sample
    (an image's pixels, a sequence's positions); ``a`` itself for outputs of shape (m,)."""
    if a.ndim == 1:
        return a
    return backend_of(a).xp.sum(a, axis=tuple(range(1, a.ndim)))


def as_rows(f: Array) -> Array:
    """Outputs of shape (m, ...) as rows (m, k), k = prod(shape[1:]) in row-major order (the
    layout of the per-sample Hessians of :meth:`Loss.hessian`); (m, k) outputs unchanged."""
    if f.ndim == 2:
        return f
    return backend_of(f).xp.reshape(f, (f.shape[0], -1))


def outputs_per_sample(f: Array) -> int:
    """k, the number of outputs of one sample: the product of ``f``'s shape after the batch
    axis (1 for outputs of shape (m,))."""
    return math.prod(int(n) for n in f.shape[1:])
