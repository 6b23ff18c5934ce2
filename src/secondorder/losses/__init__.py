"""Losses on network outputs: value, gradient, Hessian products and factors, pseudo-inverse and
projector, convex conjugate, sampling from the predictive distribution. See :mod:`.base` for the
conventions (per-sample quantities; the batch loss is the mean), :mod:`.scaled` for losses
times a constant or summed over the batch, and :func:`as_loss` for PyTorch's loss modules."""

from .base import Loss
from .convert import as_loss
from .mse import MSE
from .scaled import Scaled
from .sigmoid_bce import SigmoidBCE
from .softmax_ce import SoftmaxCrossEntropy

LOSSES = {"mse": MSE, "softmax_cross_entropy": SoftmaxCrossEntropy, "sigmoid_bce": SigmoidBCE}


def get(name: str, **options: object) -> Loss:
    """A loss by name: ``"mse"``, ``"softmax_cross_entropy"`` or ``"sigmoid_bce"``, with the
    keyword ``options`` of :class:`Loss` (``reduction``, ``scale``, ``outputs``)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return LOSSES[name](**options)


__all__ = ["LOSSES", "MSE", "Loss", "Scaled", "SigmoidBCE", "SoftmaxCrossEntropy", "as_loss",
           "get"]
