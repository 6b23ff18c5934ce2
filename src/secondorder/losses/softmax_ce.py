"""Softmax cross-entropy l(f, y) = logsumexp(f) - <f, y>, for class labels or probability rows."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import random
from ..backends import Backend, backend_of
from ..errors import HyperparameterError, LabelError, NonFiniteError, ShapeError
from .base import Array, Loss, draw_like, sum_outputs


class SoftmaxCrossEntropy(Loss):
    """Softmax cross-entropy, l(f, y) = logsumexp(f) - <f, y> per sample; the batch loss is the
    mean over the m samples (with the default options).

    Outputs f (logits) have shape (m, k); targets y are integer class labels of shape (m,) (read
    as one-hot rows) or probability rows of shape (m, k). Outputs of shape (m, T_1, ..., k), a
    softmax per position (a sequence's tokens, a segmentation map's pixels), have the classes on
    the **last** axis (flax's and optax's layout; move torch's (m, k, T...) layout with
    ``logits.movedim(1, -1)``) and labels of shape (m, T_1, ...) or rows of f's shape; the
    per-sample loss is the sum over the P = T_1 ... positions, and ``outputs="mean"`` averages
    over them instead (torch's ``CrossEntropyLoss()`` on the flattened tokens, optax's
    ``softmax_cross_entropy_with_integer_labels(...).mean()``). The formulas below hold per
    position; the per-sample Hessian is block diagonal over the positions. Formulas per
    sample, with s = softmax(f):

    * gradient s - y; Hessian H = diag(s) - s s^T, so H v = s * v - <v, s> s and H 1 = 0 (H is
      singular); factor S = diag(sqrt(s)) - s sqrt(s)^T with S S^T = H;
    * pseudo-inverse H^+ = P diag(s)^{-1} P with P = I - (1/k) 1 1^T, and P is also the
      projector H H^+ (Roulet & Blondel, "Dual Gauss-Newton Directions for Deep Learning", 2023,
      App. C, Corollary 12, which writes 1/n where 1/k is meant). A class whose probability
      underflows to 0 has a zero row and column in H; it is left out of the support, so P
      centres over the remaining classes and H^+ stays finite;
    * convex conjugate l*(a) = <mu, log mu> for mu = y + a in the probability simplex, +inf
      otherwise (same paper, Sec. 3.1, "Examples");
    * predictive distribution Categorical(s): ``sample`` returns integer labels, found by
      inverting the cumulative sum of s at a uniform noise value (with ``label_smoothing``,
      their one-hot rows, which the smoothing leaves alone).

    Parameters
    ----------
    reduction : {"mean", "sum"}, default "mean"
        How the batch is reduced: "mean" gives (1/m) sum_i l_i, "sum" gives sum_i l_i.
    scale : float, default 1.0
        A positive constant c multiplying the per-sample loss.
    outputs : {"sum", "mean"}, default "sum"
        "mean" divides the per-sample loss by its number of predictions, the P positions
        (1 for outputs (m, k), where it changes nothing; PyTorch's ``nn.CrossEntropyLoss()`` on
        (m, k) is the default, ``reduction="sum"`` its sum).
    label_smoothing : float in [0, 1], default 0.0
        eps: integer labels y become the rows (1 - eps) e_y + eps / k, PyTorch's
        ``CrossEntropyLoss(label_smoothing=eps)`` and optax's ``smooth_labels``; probability
        rows are taken as given (smooth them yourself: torch smooths rows too). Only the
        targets change: the Hessian diag(s) - s s^T, and so the GGN and the Monte-Carlo
        Fisher, do not depend on them (its sampled targets are one-hot rows, never smoothed).

    With the defaults the constructor returns this class; any other value returns a
    :class:`~secondorder.losses.Scaled` wrapping it (not an instance of this class), whose
    per-sample quantities carry the constant (see :mod:`secondorder.losses.scaled`).
    The Monte-Carlo Fisher of a scaled cross-entropy is c times the unscaled one; to get it,
    ``Scaled.sample`` returns probability-space rows, not labels (see its module).
    """

    name = "softmax_cross_entropy"
    canonical = True
    #: eps of ``label_smoothing`` (the class value for the default, 0)
    label_smoothing: float = 0.0

    def __init__(self, *, label_smoothing: float = 0.0, reduction: str = "mean",
                 scale: float = 1.0, outputs: str = "sum"):
        super().__init__(reduction=reduction, scale=scale, outputs=outputs)
        if isinstance(label_smoothing, bool) or not isinstance(
                label_smoothing, int | float | np.floating | np.integer) \
                or not 0.0 <= float(label_smoothing) <= 1.0:
            raise HyperparameterError(
                f"label_smoothing must be a number in [0, 1] (torch's and optax's eps), got "
                f"{label_smoothing!r}")
        if label_smoothing:
            self.label_smoothing = float(label_smoothing)

    @staticmethod
    def _softmax(f: Array) -> Array:
        """s = exp(z - log sum exp z) with z = f - max f, row by row. Written out on every
        backend (not torch.softmax / jax.nn.softmax, which round differently): the recorded
        steps and the published runs were taken with these numbers, and float32 Hessian-free
        runs diverge from rounding-level changes within tens of steps."""
        xp = backend_of(f).xp
        z = f - xp.max(f, axis=-1, keepdims=True)
        return xp.exp(z - xp.log(xp.sum(xp.exp(z), axis=-1, keepdims=True)))

    def outputs_per_sample(self, f: Array) -> int:
        """P, the positions of a sample (one softmax each): prod(shape[1:-1]), 1 for (m, k)."""
        return math.prod(int(n) for n in f.shape[1:-1])

    def targets(self, f: Array, y: Array) -> Array:
        """y as rows of probabilities: integer labels become one-hot rows, smoothed to
        (1 - eps) e_y + eps / k with ``label_smoothing``; rows are returned as they are."""
        if y.ndim == f.ndim:
            return y
        rows = self._one_hot(f, y)
        eps = self.label_smoothing
        return rows if not eps else (1.0 - eps) * rows + eps / f.shape[-1]

    @staticmethod
    def _one_hot(f: Array, labels: Array) -> Array:
        """Integer labels (f's shape without its class axis) as one-hot rows of f's dtype."""
        backend = backend_of(f)
        classes = backend.xp.arange(f.shape[-1], device=backend.device(f))
        return backend.xp.astype(labels[..., None] == classes, f.dtype)

    def per_sample(self, f: Array, y: Array) -> Array:
        self.check_values(f, y)
        backend = backend_of(f)
        xp = backend.xp
        if y.ndim == f.ndim - 1 and self.label_smoothing:  # smoothed labels: their rows
            y = self.targets(f, y)
        if y.ndim == f.ndim - 1:  # integer labels: pick the entries instead of a one-hot product
            if f.ndim == 2:
                return backend.label_cross_entropy(f, y)
            k = f.shape[-1]
            per = backend.label_cross_entropy(xp.reshape(f, (-1, k)), xp.reshape(y, (-1,)))
            return sum_outputs(xp.reshape(per, (f.shape[0], -1)))
        return sum_outputs(backend.logsumexp(f, axis=-1)[..., 0] - xp.sum(f * y, axis=-1))

    def grad(self, f: Array, y: Array) -> Array:
        s = self._softmax(f)
        return s - self.targets(f, y)

    def hvp(self, f: Array, y: Array, v: Array) -> Array:
        return self.hvp_at(f, y)(v)

    def hvp_at(self, f: Array, y: Array) -> Callable[[Array], Array]:
        return self._hvp_with(self._softmax(f))

    @staticmethod
    def _hvp_with(s: Array) -> Callable[[Array], Array]:
        """v -> H v = s * v - <v, s> s for the softmax s of the outputs."""
        xp = backend_of(s).xp
        return lambda v: s * v - xp.sum(v * s, axis=-1, keepdims=True) * s

    def grad_hvp_at(self, f: Array, y: Array) -> tuple[Array, Callable[[Array], Array]]:
        """s - y and v -> s * v - <v, s> s from one softmax s (what :meth:`grad` and
        :meth:`hvp_at` compute, each with its own); a subclass that overrides either gets
        them from its own methods."""
        cls = type(self)
        if cls.grad is not SoftmaxCrossEntropy.grad or \
                cls.hvp_at is not SoftmaxCrossEntropy.hvp_at:
            return super().grad_hvp_at(f, y)
        s = self._softmax(f)
        return s - self.targets(f, y), self._hvp_with(s)

    def hessian(self, f: Array, y: Array) -> Array:
        """Per sample diag(s) - s s^T, block diagonal over the positions of outputs (m, T..., k)
        (the dense (m, P k, P k) matrix: P k backward passes in K-FAC's exact mode, so use the
        Monte-Carlo Fisher for a long sequence or a large vocabulary)."""
        s = self._softmax(f)
        return self._block_diagonal(f, self._eye(f) * s[..., None, :]
                                    - s[..., :, None] * s[..., None, :])

    def hessian_sqrt(self, f: Array, y: Array) -> Array:
        xp = backend_of(f).xp
        s = self._softmax(f)
        r = xp.sqrt(s)
        return self._block_diagonal(f, self._eye(f) * r[..., None, :]
                                    - s[..., :, None] * r[..., None, :])

    def _block_diagonal(self, f: Array, blocks: Array) -> Array:
        """Per-position k x k blocks (m, T..., k, k) as the per-sample (m, P k, P k) matrix of
        the row-major flattened outputs (the blocks themselves for outputs (m, k))."""
        if f.ndim == 2:
            return blocks
        backend = backend_of(f)
        xp = backend.xp
        m, k, p = f.shape[0], f.shape[-1], self.outputs_per_sample(f)
        blocks = xp.reshape(blocks, (m, p, k, 1, k))
        eye = xp.eye(p, dtype=f.dtype, device=backend.device(f))
        return xp.reshape(eye[None, :, None, :, None] * blocks, (m, p * k, p * k))

    @staticmethod
    def _center(v: Array, w: Array) -> Array:
        """P_w v: v minus its mean over the support w (0/1 weights), zero off the support."""
        xp = backend_of(v).xp
        return w * (v - xp.sum(w * v, axis=-1, keepdims=True) / xp.sum(w, axis=-1, keepdims=True))

    def _support(self, f: Array) -> tuple[Array, Array]:
        """s and the 0/1 weights of the classes with s_j > 0 (range(H) lies in their span)."""
        xp = backend_of(f).xp
        s = self._softmax(f)
        return s, xp.astype(s > xp.finfo(f.dtype).smallest_normal, f.dtype)

    def pinv_hvp(self, f: Array, y: Array, v: Array) -> Array:
        xp = backend_of(f).xp
        s, w = self._support(f)
        return self._center(self._center(v, w) / xp.where(w > 0, s, xp.ones_like(s)), w)

    def projector(self, f: Array, y: Array, v: Array) -> Array:
        return self._center(v, self._support(f)[1])

    def conjugate(self, a: Array, y: Array) -> Array:
        xp = backend_of(a).xp
        mu = self.targets(a, y) + a
        eps = 1e3 * xp.finfo(a.dtype).eps
        inside = xp.logical_and(xp.all(mu >= -eps, axis=-1),
                                xp.abs(xp.sum(mu, axis=-1) - 1.0) <= eps * a.shape[-1])
        safe = xp.where(mu > 0, mu, xp.ones_like(mu))
        entropy = xp.sum(xp.where(mu > 0, mu * xp.log(safe), xp.zeros_like(mu)), axis=-1)
        return sum_outputs(xp.where(inside, entropy, xp.full_like(entropy, float("inf"))))

    def noise(self, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        return rng.random(tuple(shape[:-1]))

    def key_noise(self, key: Array, f: Array) -> Array:
        return draw_like(f, lambda dtype: random.uniform(key, tuple(f.shape[:-1]), dtype))

    def _sample(self, f: Array, noise: Array) -> Array:
        """Integer class labels, shape (m,) (f's shape without its class axis); with
        ``label_smoothing``, their one-hot rows (f's shape), which :meth:`targets` leaves
        unsmoothed: the Fisher is that of the model's own distribution."""
        backend = backend_of(f)
        xp = backend.xp
        s = self._softmax(f)
        below = xp.cumulative_sum(s, axis=-1) < noise[..., None]
        # int64 where the backend has it; JAX without x64 has int32 only (asking for int64
        # there warns at every sample and truncates anyway)
        index = xp.int64 if backend.supports_float64() else xp.int32
        labels = xp.clip(xp.sum(xp.astype(below, index), axis=-1), max=f.shape[-1] - 1)
        return self._one_hot(f, labels) if self.label_smoothing else labels

    #: (weak reference to the targets last found valid, their version, the number of classes)
    _valid: tuple[Any, Any, int] | None = None

    def _check_layout(self, xp: Any, f: Array, y: Array) -> None:
        """ShapeError or LabelError for outputs other than (m, ..., k) and targets other than
        labels (m, ...) or probability rows of f's shape (shapes and dtypes are known in
        traces too)."""
        if f.ndim < 2:
            raise ShapeError(
                f"softmax cross-entropy: outputs must have shape (batch, classes) or (batch, "
                f"positions..., classes), got {tuple(f.shape)}")
        labels = tuple(f.shape[:-1])
        if y.ndim == f.ndim and xp.isdtype(y.dtype, ("integral", "bool")):
            column = " (y.squeeze(1) for a column of labels" if f.ndim == 2 else " ("
            raise LabelError(
                f"softmax cross-entropy: integer targets of shape {tuple(y.shape)}; class labels "
                f"have shape {labels}{column}{', ' if f.ndim == 2 else ''}y.argmax(-1) for "
                "one-hot rows), probability rows a floating dtype (y.float())")
        if tuple(y.shape) not in (labels, tuple(f.shape)):
            hint = ""
            if f.ndim > 2 and tuple(y.shape) == (f.shape[0], *f.shape[2:]):
                hint = (" The classes look like they are on axis 1 (torch's (batch, classes, "
                        "positions...) layout): the library takes them on the last axis, so "
                        "return logits.movedim(1, -1) from the model.")
            raise ShapeError(
                f"softmax cross-entropy: targets of shape {tuple(y.shape)} for outputs "
                f"{tuple(f.shape)}; give class labels of shape {labels} or probability "
                f"rows of shape {tuple(f.shape)} (classes on the last axis).{hint}")

    def check_values(self, f: Array, y: Array) -> None:
        """Integer labels y (f's shape without its class axis: (m,) for outputs (m, k)) must have
        an integer dtype and lie in [0, k); rows y (f's shape) must be probability vectors (entries
        >= 0 summing to 1, to a tolerance of the dtype). :class:`~secondorder.errors.LabelError`
        otherwise, saying what was found.

        A dtype is checked always (it is known inside traces too); values only on concrete y,
        with one combined reduction and one host read, and once per targets array: a step that
        evaluates the loss several times (line searches) pays for one check. The memo is the
        array's identity (and torch's in-place version counter), so a NumPy or JAX label
        buffer refilled in place is not checked again. NaN in probability rows is left to the
        step's finiteness guard (the step is rejected, as for any non-finite batch). Inside
        ``jax.jit`` the values are checked only under :func:`secondorder.optim.checked`.
        """
        backend = backend_of(y)
        xp = backend.xp
        self._check_layout(xp, f, y)
        k = f.shape[-1]
        labels = y.ndim == f.ndim - 1
        if labels and not xp.isdtype(y.dtype, "integral"):
            raise LabelError(
                f"softmax cross-entropy: targets of shape {tuple(y.shape)} are class labels and "
                f"need an integer dtype, got {y.dtype}; convert them (y.astype(int) / y.long()) "
                f"or pass probability rows of shape {tuple(f.shape)}")
        if not backend.is_concrete(y):
            self._check_traced(y, k, labels)
            return
        memo = self._valid
        version = getattr(y, "_version", None)
        if memo is not None and memo[0]() is y and memo[1] == version and memo[2] == k:
            return
        if labels:
            bad = xp.any(xp.logical_or(y < 0, y >= k))
        else:
            tol = max(1e-6, 64 * k * float(xp.finfo(y.dtype).eps))
            sums = xp.sum(y, axis=-1)
            bad = xp.logical_or(xp.any(xp.logical_and(y < 0, xp.isfinite(y))),
                                xp.any(xp.logical_and(xp.abs(sums - 1) > tol, xp.isfinite(sums))))
        if not backend.is_concrete(bad):  # concrete targets closed over inside jax.jit
            self._check_traced(y, k, labels)
            return
        if bool(bad):
            values = backend.to_numpy(y)
            if labels:
                raise LabelError(
                    f"softmax cross-entropy: class labels must lie in [0, {k - 1}] for {k} "
                    f"outputs; got values from {values.min()} to {values.max()}. Check the "
                    "labels (0-based) and the width of the network's last layer; padding "
                    "labels (torch's ignore_index -100) are not skipped: leave padded samples "
                    "or positions out of the batch")
            raise LabelError(
                "softmax cross-entropy: target rows must be probability vectors "
                f"(entries >= 0, each row summing to 1); got entries from {values.min():.3g} "
                f"and row sums from {values.sum(axis=-1).min():.6g} to "
                f"{values.sum(axis=-1).max():.6g}; pass integer labels or normalised rows")
        try:
            self._valid = (weakref.ref(y), version, k)
        except TypeError:  # an array type without weak references: check every time
            self._valid = None

    @staticmethod
    def _check_traced(y: Array, k: int, labels: bool) -> None:
        """The value checks as ``checkify`` checks, inside :func:`secondorder.optim.checked`."""
        from .. import checking

        if labels:
            checking.check_labels(y, k)
        else:
            checking.check_rows(y)

    def _check_targets(self, backend: Backend, f: Array, y: Array) -> None:
        """:meth:`check`'s targets: the layout, dtype and values of :meth:`check_values`
        (labels of f's shape without its class axis, or probability rows of f's shape), and
        finite rows."""
        self.check_values(f, y)
        if y.ndim == f.ndim and backend.is_concrete(y) and not bool(
                np.all(np.isfinite(backend.to_numpy(y)))):
            raise NonFiniteError(f"{self.name}: the targets contain NaN or inf")

    def __repr__(self) -> str:
        if self.label_smoothing:
            return f"{type(self).__name__}(label_smoothing={self.label_smoothing})"
        return super().__repr__()
