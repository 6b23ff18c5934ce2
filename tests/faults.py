"""Fault injection for the contract suite: a model and a loss that put a NaN at one chosen point
of the next optimiser step and are exact copies of ``MLP`` and ``SoftmaxCrossEntropy`` otherwise.

Arm a point with ``fault.point = name`` before a step and disarm it (``None``) after. The points:

``"loss"``
    the batch loss is NaN (a NaN constant added to every per-sample loss), while its gradient
    is the clean one: only a check of the loss itself can see it;
``"gradient"``
    the loss is the clean value, its gradient NaN: 0 * sqrt(u^2) with u = 0 * f is 0 in value
    and 0 * inf = NaN in derivative, added to every per-sample loss, and the loss's explicit
    per-sample gradient ``grad`` (which Gauss-Newton-type methods pull back through the
    network's VJP instead of differentiating the loss) returns NaN;
``"jacobian"``
    the network's outputs are the clean values, its Jacobian NaN (the same 0 * sqrt(u^2) term
    with u = 0 * sum(w), w the first weight), so every JVP, VJP and gradient is NaN;
``"curvature"``
    the loss and its gradient are the clean values; the loss's second derivative is NaN
    (0 * (u^2)^(3/2) with u = 0 * f has derivative 0 and second derivative 0 * inf), and the
    loss's explicit output-space curvature (``hvp``, ``hvp_at``, ``hessian``,
    ``hessian_sqrt``, ``pinv_hvp``, and ``grad`` at targets other than the batch's: the sampled
    targets that a Monte-Carlo Fisher is made of) returns NaN. ``fault.fired`` counts those
    explicit calls, so a test knows that the NaN reached the method. Set ``fault.targets`` to
    the batch's targets before the step.

Adding 0 to a finite number gives it back bit for bit, so with a point armed every value the
step computes before it meets the NaN is the clean one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from secondorder import tree
from secondorder.backends import backend_of, namespace
from secondorder.losses import SoftmaxCrossEntropy
from secondorder.models import MLP

POINTS = ("loss", "gradient", "jacobian", "curvature")
#: the points every method must reject: every step evaluates the loss and its gradient
ALWAYS_SEEN = ("loss", "gradient", "jacobian")


class Fault:
    """Which point is armed (None: none) and how many explicit curvature calls returned NaN."""

    def __init__(self) -> None:
        self.point: str | None = None
        self.fired = 0
        self.targets: Any = None  #: the batch's targets, to tell them from sampled ones


def _nan_derivative(u: Any) -> Any:
    """0 in value, NaN in derivative (u must be 0)."""
    xp = namespace(u)
    return 0 * xp.sqrt(u * u)


def _nan_second_derivative(u: Any) -> Any:
    """0 in value and first derivative, NaN in second derivative (u must be 0)."""
    return 0 * (u * u) ** 1.5


class FaultyMLP(MLP):
    """``MLP`` whose Jacobian is NaN while the ``"jacobian"`` point is armed."""

    def __init__(self, sizes: list[int], activation: str, fault: Fault):
        super().__init__(sizes, activation)
        self.fault = fault

    def apply(self, params: Any, x: Any, taps: Any = None) -> Any:
        out = super().apply(params, x, taps)
        if self.fault.point != "jacobian":
            return out
        w = tree.leaves(params)[0]
        term = _nan_derivative(namespace(w).sum(w) * 0)
        if taps is None:
            return out + term
        f, inputs = out
        return f + term, inputs


class FaultyCrossEntropy(SoftmaxCrossEntropy):
    """``SoftmaxCrossEntropy`` with the ``"loss"``, ``"gradient"`` and ``"curvature"`` points."""

    def __init__(self, fault: Fault):
        super().__init__()
        self.fault = fault

    def per_sample(self, f: Any, y: Any) -> Any:
        out = super().per_sample(f, y)
        point = self.fault.point
        if point == "loss":
            return out + float("nan")
        xp = namespace(f)
        if point == "gradient":
            return out + xp.sum(_nan_derivative(f * 0), axis=1)
        if point == "curvature":
            return out + xp.sum(_nan_second_derivative(f * 0), axis=1)
        return out

    def _poison(self, value: Any, point: str = "curvature") -> Any:
        if self.fault.point != point:
            return value
        self.fault.fired += 1
        return value + float("nan")

    def _batch_targets(self, f: Any, y: Any) -> bool:
        """Whether ``y`` are the batch's targets (not targets sampled from the model)."""
        if self.fault.targets is None:
            return False
        backend = backend_of(f)
        mine = backend.to_numpy(self.targets(f, y))
        batch = backend.to_numpy(self.targets(f, self.fault.targets))
        return mine.shape == batch.shape and bool(np.array_equal(mine, batch))

    def grad(self, f: Any, y: Any) -> Any:
        out = super().grad(f, y)
        if self.fault.point == "gradient":
            return self._poison(out, "gradient")
        if self.fault.point == "curvature" and not self._batch_targets(f, y):
            return self._poison(out)
        return out

    def hvp(self, f: Any, y: Any, v: Any) -> Any:
        return self._poison(super().hvp(f, y, v))

    def hvp_at(self, f: Any, y: Any) -> Callable[[Any], Any]:
        product = super().hvp_at(f, y)
        return lambda v: self._poison(product(v))

    def hessian(self, f: Any, y: Any) -> Any:
        return self._poison(super().hessian(f, y))

    def hessian_sqrt(self, f: Any, y: Any) -> Any:
        return self._poison(super().hessian_sqrt(f, y))

    def pinv_hvp(self, f: Any, y: Any, v: Any) -> Any:
        return self._poison(super().pinv_hvp(f, y, v))
