"""Named exceptions raised by ``secondorder``.

Every error a user can cause has its own class, and every message says what to do about it.
All of them derive from :class:`SecondOrderError`, so ``except SecondOrderError`` catches any of
them; each also derives from the closest built-in exception (``ValueError``, ``TypeError``, ...)
so that generic handlers keep working.
"""

from __future__ import annotations

__all__ = [
    "AutodiffUnavailableError",
    "BackendNotFoundError",
    "BackendUnavailableError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "DeviceMismatchError",
    "DTypeError",
    "LabelError",
    "MixedBackendError",
    "NonFiniteError",
    "NotPositiveDefiniteError",
    "RandomKeyError",
    "SecondOrderError",
    "DenseSizeWarning",
    "NonFiniteLossWarning",
    "UntappedLayerWarning",
    "UnusedUpdatesWarning",
    "ShapeError",
    "StructureError",
    "UnsupportedLossError",
    "UnsupportedModelError",
]


class SecondOrderError(Exception):
    """Base class of every exception raised by ``secondorder``."""


class BackendNotFoundError(SecondOrderError, ValueError):
    """A backend name that ``secondorder`` does not know."""


class BackendUnavailableError(SecondOrderError, ImportError):
    """A known backend whose framework is not installed (or has no usable device)."""


class MixedBackendError(SecondOrderError, TypeError):
    """Arrays of two different frameworks were passed to one call."""


class DeviceMismatchError(SecondOrderError, ValueError):
    """Arrays on two different devices were passed to one call."""


class AutodiffUnavailableError(SecondOrderError, NotImplementedError):
    """The backend has no automatic differentiation (e.g. ``array_api_strict``)."""


class ShapeError(SecondOrderError, ValueError):
    """An array has a shape that does not fit the operation."""


class StructureError(SecondOrderError, ValueError):
    """A parameter tree whose nesting or leaf shapes do not match what was expected."""


class DTypeError(SecondOrderError, TypeError):
    """An unsupported or inconsistent floating-point dtype."""


class NonFiniteError(SecondOrderError, FloatingPointError):
    """A loss, gradient or direction that is NaN or infinite."""


class NotPositiveDefiniteError(SecondOrderError, ValueError):
    """A matrix that must be positive definite is not (a factorisation failed)."""


class LabelError(SecondOrderError, ValueError):
    """Targets that do not fit the loss (labels out of range, probabilities outside [0, 1])."""


class RandomKeyError(SecondOrderError, ValueError):
    """A random key that is not one of :mod:`secondorder.random`'s keys (an int32 array of
    shape (2,)), or a draw given both or neither of a key and explicit noise."""


class StateError(SecondOrderError, TypeError):
    """An optimiser state that another method, or another backend, created."""


class HyperparameterError(SecondOrderError, ValueError):
    """A hyperparameter outside its valid range (a negative learning rate, a momentum >= 1,
    an unknown option name)."""


class UnsupportedLossError(SecondOrderError, TypeError, ValueError):
    """A loss that :func:`secondorder.losses.as_loss` cannot map exactly to a library loss: an
    unknown class, a plain callable, or a framework option (class weights, label smoothing,
    ``reduction="none"``) that the library's losses do not have."""


class MissingBatchError(SecondOrderError, TypeError):
    """An optimiser step called without the batch it must differentiate (for example
    ``torch.optim``-style ``step(closure)``): second-order methods need the model output and the
    loss separately, so the torch integration takes ``step((x, y))``."""


class CheckpointError(SecondOrderError, ValueError):
    """A checkpoint file that is not one, is damaged, or holds what cannot be rebuilt here (a
    class this version does not have, a tree that JSON cannot describe)."""


class CheckpointNotFoundError(SecondOrderError, FileNotFoundError):
    """A checkpoint path (or the directory to save it in) that does not exist."""


class UnsupportedModelError(SecondOrderError, ValueError):
    """A model whose layers a method cannot tap: a ``Linear`` or ``Conv2d`` layer that its
    forward pass calls not exactly once (a layer called twice, or one whose weight is applied
    without calling it, ``F.linear(x, self.fc.weight)``; ``nn.MultiheadAttention``'s ``out_proj``,
    applied that way, is left untapped instead). Methods that need each layer's input and output
    gradient (K-FAC, K-BFGS, SMW-NG/GN) cannot take such a model; methods built on products
    (CurveBall, Hessian-free), Shampoo and TNT can."""


class DenseSizeWarning(UserWarning):
    """A dense method (Newton, Levenberg-Marquardt, BFGS) given so many parameters p that its
    p x p matrix is larger than :data:`secondorder.optim.dense_size.DENSE_WARNING_BYTES`, or
    (Newton, Levenberg-Marquardt, which factor it at every step) p larger than
    :data:`~secondorder.optim.dense_size.DENSE_WARNING_PARAMETERS`: each step needs p^2
    numbers of memory and O(p^3) time."""


class UntappedLayerWarning(UserWarning):
    """Dense or convolution layers of a flax model that run under a transformation inside the
    module (``nnx.scan``, ``nnx.vmap``, ``nnx.remat``, linen's lifted transforms) and are left
    untapped: the Kronecker-factored methods step their parameters with their fallback, not
    with per-layer curvature."""


class UnusedUpdatesWarning(UserWarning):
    """Updates given to a method that does not read them: a second-order method in
    :func:`secondorder.integrations.optax.as_optax` computes its own gradient on the batch, so
    the incoming updates (the gradient, or a transform chained before it) do not reach its
    step."""


class NonFiniteLossWarning(UserWarning):
    """The loss at the current parameters is NaN or inf (the batch itself was checked): every
    step is rejected there and leaves the parameters as they are, so training cannot go on
    from them. An earlier accepted step diverged (or the model computes a non-finite output at
    these parameters); restore a checkpoint and train with a smaller learning rate or a larger
    damping. Emitted once per torch ``Optimizer``."""
