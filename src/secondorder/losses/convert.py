"""``as_loss``: a framework's loss object as the library loss with the same value and curvature.

PyTorch losses map exactly, with the constant of :class:`~secondorder.losses.Scaled` (m samples,
k outputs per sample; "ours" is the library loss with its default options):

=======================================  ====================================================
``nn.CrossEntropyLoss()``                ``SoftmaxCrossEntropy()`` (c = 1)
``nn.CrossEntropyLoss(reduction="sum")`` ``SoftmaxCrossEntropy(reduction="sum")`` (c = m)
``nn.MSELoss()``                         ``MSE(scale=2, outputs="mean")`` (c = 2/k)
``nn.MSELoss(reduction="sum")``          ``MSE(scale=2, reduction="sum")`` (c = 2m)
``nn.BCEWithLogitsLoss()``               ``SigmoidBCE(outputs="mean")`` (c = 1/k)
``nn.BCEWithLogitsLoss(reduction="sum")`` ``SigmoidBCE(reduction="sum")`` (c = m)
=======================================  ====================================================

``nn.CrossEntropyLoss`` maps for outputs (m, k). On outputs with positions it reads torch's
layout (m, k, T...) and averages over the positions, while the library's cross-entropy takes
the classes last and sums over positions: the converted loss refuses such outputs with a
:class:`~secondorder.errors.ShapeError` that names the equivalent,
``SoftmaxCrossEntropy(outputs="mean")`` on logits (m, T..., k).

Options the library's losses do not have raise
:class:`~secondorder.errors.UnsupportedLossError` with what to use instead: class ``weight``,
an ``ignore_index`` that is a valid class, ``pos_weight``, ``reduction="none"``;
``label_smoothing`` carries over (integer labels; probability-row targets with it raise
:class:`~secondorder.errors.LabelError`, since torch smooths rows too and the library does
not). torch is imported only when the object comes from it.
"""

from __future__ import annotations

import sys
from typing import Any

from ..errors import LabelError, ShapeError, UnsupportedLossError
from .base import Loss
from .mse import MSE
from .sigmoid_bce import SigmoidBCE
from .softmax_ce import SoftmaxCrossEntropy

SUPPORTED = "torch.nn.CrossEntropyLoss, torch.nn.MSELoss or torch.nn.BCEWithLogitsLoss"
LIBRARY = ("secondorder.losses.MSE, SoftmaxCrossEntropy or SigmoidBCE (each with reduction= "
           "and scale=)")


def as_loss(obj: Any) -> Loss:
    """The library :class:`~secondorder.losses.Loss` equal to ``obj``.

    Parameters
    ----------
    obj : Loss or torch.nn.Module
        A library loss (returned unchanged), or one of PyTorch's ``nn.CrossEntropyLoss``,
        ``nn.MSELoss``, ``nn.BCEWithLogitsLoss`` with ``reduction`` "mean" or "sum" (see the
        module docstring for the mapping; values, gradients and curvature agree exactly).

    Returns
    -------
    Loss
        A library loss whose batch loss on network outputs f (shape (m, k)) and targets y equals
        ``obj(f, y)``.

    Raises
    ------
    UnsupportedLossError
        For any other object (another loss class, a plain function) or an option without an
        exact library equivalent; the message says what to use instead.
    """
    if isinstance(obj, Loss):
        return obj
    torch = sys.modules.get("torch")  # a torch module can only exist if torch is imported
    if torch is not None and isinstance(obj, torch.nn.Module):
        return _from_torch(torch, obj)
    if callable(obj):
        raise UnsupportedLossError(
            f"a plain callable ({_name(obj)}) cannot be used as a loss: second-order methods "
            f"need its Hessian and sampling distribution. Use {LIBRARY}, or {SUPPORTED}, or "
            "subclass secondorder.losses.Loss"
        )
    raise UnsupportedLossError(
        f"{_name(obj)} is not a loss; use {LIBRARY}, or {SUPPORTED}"
    )


def _name(obj: Any) -> str:
    kind = type(obj)
    return f"{kind.__module__}.{kind.__qualname__}"


def _reduction(obj: Any) -> str:
    reduction = getattr(obj, "reduction", "mean")
    if reduction not in ("mean", "sum"):
        raise UnsupportedLossError(
            f"{type(obj).__name__}(reduction={reduction!r}) has no library equivalent: the "
            "library's losses reduce the batch by 'mean' or 'sum'; for per-sample values call "
            "loss.per_sample(f, y) on the converted loss"
        )
    return reduction


class TorchCrossEntropy(SoftmaxCrossEntropy):
    """``nn.CrossEntropyLoss()`` as converted: :class:`SoftmaxCrossEntropy` on outputs (m, k),
    a named error on outputs with positions, whose layout and reduction differ from torch's
    (the module docstring)."""

    def _check_layout(self, xp: Any, f: Any, y: Any) -> None:
        if f.ndim > 2:
            raise ShapeError(
                f"torch's CrossEntropyLoss on outputs of shape {tuple(f.shape)}: torch reads "
                "the classes on axis 1 (batch, classes, positions...) and averages over the "
                "positions; the library's cross-entropy takes the classes on the last axis. "
                "Pass loss=secondorder.losses.SoftmaxCrossEntropy(outputs='mean') (the mean "
                "over positions, torch's value) with logits of shape (batch, positions..., "
                "classes): a language model's (batch, tokens, vocabulary) as they are, torch's "
                "(batch, classes, H, W) map as logits.movedim(1, -1)")
        if self.label_smoothing and y.ndim == f.ndim:
            raise LabelError(
                f"torch's CrossEntropyLoss(label_smoothing={self.label_smoothing}) smooths "
                "probability-row targets too; the library smooths class labels only. Pass "
                "the class labels, or rows you smoothed yourself with label_smoothing=0")
        super()._check_layout(xp, f, y)


def _from_torch(torch: Any, obj: Any) -> Loss:
    nn = torch.nn
    kind = type(obj).__name__
    if isinstance(obj, nn.CrossEntropyLoss):
        reduction = _reduction(obj)
        if getattr(obj, "weight", None) is not None:
            raise UnsupportedLossError(
                "CrossEntropyLoss(weight=...) has no library equivalent: class weights change "
                "the Hessian per class. Drop weight= (resample or reweight the batch instead) "
                "or subclass secondorder.losses.SoftmaxCrossEntropy"
            )
        if int(getattr(obj, "ignore_index", -100)) >= 0:
            raise UnsupportedLossError(
                f"CrossEntropyLoss(ignore_index={obj.ignore_index}) ignores a valid class; "
                "the library's cross-entropy takes every sample. Remove the ignored samples "
                "from the batch and keep the default ignore_index"
            )
        return TorchCrossEntropy(reduction=reduction,
                                 label_smoothing=float(getattr(obj, "label_smoothing", 0.0)))
    if isinstance(obj, nn.MSELoss):
        reduction = _reduction(obj)
        # torch: (1/(m k)) sum (f - y)^2 = (2/k) * mean_i 1/2 |f_i - y_i|^2; sum: 2m * ours
        if reduction == "sum":
            return MSE(scale=2.0, reduction="sum")
        return MSE(scale=2.0, outputs="mean")
    if isinstance(obj, nn.BCEWithLogitsLoss):
        reduction = _reduction(obj)
        if getattr(obj, "weight", None) is not None:
            raise UnsupportedLossError(
                "BCEWithLogitsLoss(weight=...) has no library equivalent; drop weight= or "
                "subclass secondorder.losses.SigmoidBCE"
            )
        if getattr(obj, "pos_weight", None) is not None:
            raise UnsupportedLossError(
                "BCEWithLogitsLoss(pos_weight=...) has no library equivalent (it changes the "
                "Hessian of positive targets); drop pos_weight= and rebalance the batch instead"
            )
        if reduction == "sum":
            return SigmoidBCE(reduction="sum")
        return SigmoidBCE(outputs="mean")
    hints = {
        "BCELoss": "BCEWithLogitsLoss on the logits (drop the final sigmoid)",
        "NLLLoss": "CrossEntropyLoss on the logits (drop the final log_softmax)",
    }
    hint = hints.get(kind, SUPPORTED)
    raise UnsupportedLossError(
        f"torch.nn.{kind} has no library equivalent; use {hint}, or {LIBRARY}"
    )
