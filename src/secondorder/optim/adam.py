"""Adam and AdamW (decoupled weight decay)."""

from __future__ import annotations

from collections.abc import Callable

from .._pytree import tree_map
from ..backends import backend_of
from ..losses import Loss
from .base import Array, Batch, Optimizer, StepInfo, Tree, is_number


class Adam(Optimizer):
    """m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;
    w <- w - lr m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps)  [- lr wd w for AdamW].

    ``weight_decay`` with ``decoupled=False`` adds wd w to the gradient (Adam with L2);
    :class:`AdamW` decouples it.
    """

    decoupled = False

    def __init__(self, apply: Callable, loss: Loss, *, lr: float = 1e-3, b1: float = 0.9,
                 b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(apply, loss)
        if is_number(lr, b1, b2, eps, weight_decay) and not (
                lr > 0 and 0 <= b1 < 1 and 0 <= b2 < 1 and eps > 0 and weight_decay >= 0):
            raise ValueError("Adam needs lr > 0, 0 <= b1, b2 < 1, eps > 0, weight_decay >= 0")
        self.lr, self.b1, self.b2, self.eps, self.weight_decay = lr, b1, b2, eps, weight_decay

    def init(self, params: Tree) -> dict[str, Array]:
        zeros = tree_map(lambda a: a * 0.0, params)
        return {"m": zeros, "v": zeros, "count": self.scalar(params, 0.0)}

    def step(self, params: Tree, state: dict[str, Array], batch: Batch
             ) -> tuple[Tree, dict[str, Array], StepInfo]:
        loss, grad = self.value_and_grad(params, batch)
        xp = backend_of(loss).xp
        wd, lr = self.weight_decay, self.lr
        if wd and not self.decoupled:
            grad = tree_map(lambda g, w: g + wd * w, grad, params)
        t = state["count"] + 1.0
        m = tree_map(lambda a, g: self.b1 * a + (1 - self.b1) * g, state["m"], grad)
        v = tree_map(lambda a, g: self.b2 * a + (1 - self.b2) * g * g, state["v"], grad)
        c1 = 1.0 - self.b1**t
        c2 = 1.0 - self.b2**t

        def update(w: Array, mi: Array, vi: Array) -> Array:
            new = w - lr * (mi / c1) / (xp.sqrt(vi / c2) + self.eps)
            return new - lr * wd * w if (wd and self.decoupled) else new

        new = tree_map(update, params, m, v)
        params, state, ok, step_norm = self.guard(params, state, new,
                                                  {"m": m, "v": v, "count": t}, loss, grad)
        return params, state, self.info(params, loss, step_norm, finite=ok)


class AdamW(Adam):
    """Adam with decoupled weight decay: w <- w - lr (adam_step + wd w)."""

    decoupled = True
