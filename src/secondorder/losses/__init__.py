"""Losses on network outputs: value, gradient, Hessian products and factors, pseudo-inverse and
projector, convex conjugate, sampling from the predictive distribution. See :mod:`.base` for the
conventions (per-sample quantities; the batch loss is the mean)."""

from .base import Loss
from .mse import MSE
from .sigmoid_bce import SigmoidBCE
from .softmax_ce import SoftmaxCrossEntropy

LOSSES = {"mse": MSE, "softmax_cross_entropy": SoftmaxCrossEntropy, "sigmoid_bce": SigmoidBCE}


def get(name: str) -> Loss:
    """A loss by name: ``"mse"``, ``"softmax_cross_entropy"`` or ``"sigmoid_bce"``."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return LOSSES[name]()


__all__ = ["LOSSES", "MSE", "Loss", "SigmoidBCE", "SoftmaxCrossEntropy", "get"]
