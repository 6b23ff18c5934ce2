"""Stochastic gradient descent with momentum, Nesterov momentum and weight decay."""

from __future__ import annotations

from collections.abc import Callable

from .._pytree import tree_map
from ..losses import Loss
from .base import Array, Batch, Optimizer, StepInfo, Tree, is_number


class SGD(Optimizer):
    """g = grad + wd w;  b <- mu b + g;  w <- w - lr (g + mu b if nesterov else b).

    With ``momentum=0`` this is plain SGD (the buffer is then the gradient).
    """

    def __init__(self, apply: Callable, loss: Loss, *, lr: float = 0.01, momentum: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0):
        super().__init__(apply, loss)
        if is_number(lr, momentum, weight_decay) and (lr <= 0 or momentum < 0
                                                      or weight_decay < 0):
            raise ValueError("SGD needs lr > 0, momentum >= 0 and weight_decay >= 0")
        if nesterov and is_number(momentum) and momentum == 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        self.lr, self.momentum, self.nesterov, self.weight_decay = lr, momentum, nesterov, \
            weight_decay

    def init(self, params: Tree) -> dict[str, Array]:
        return {"momentum": tree_map(lambda a: a * 0.0, params)}

    def step(self, params: Tree, state: dict[str, Array], batch: Batch
             ) -> tuple[Tree, dict[str, Array], StepInfo]:
        loss, grad = self.value_and_grad(params, batch)
        mu, wd = self.momentum, self.weight_decay
        if wd:
            grad = tree_map(lambda g, w: g + wd * w, grad, params)
        buf = tree_map(lambda b, g: mu * b + g, state["momentum"], grad)
        direction = tree_map(lambda g, b: g + mu * b, grad, buf) if self.nesterov else buf
        new = tree_map(lambda w, d: w - self.lr * d, params, direction)
        params, state, ok, step_norm = self.guard(params, state, new, {"momentum": buf}, loss,
                                                  grad)
        return params, state, self.info(params, loss, step_norm, finite=ok)
