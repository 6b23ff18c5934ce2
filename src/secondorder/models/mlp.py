"""Multilayer perceptrons and deep autoencoders."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .base import Array, LayerInfo, Model, lecun_normal
from .layers import activation as activation_fn
from .layers import dense


class MLP(Model):
    """A multilayer perceptron f(x) = W_L phi(... phi(W_1 x + b_1) ...) + b_L, written once over
    the array namespace (the same seed gives the same weights and outputs on every backend).

    Parameters
    ----------
    sizes : sequence of int
        (d_0, d_1, ..., d_L): the input size, the hidden widths and the output size (L dense
        layers; at least two entries).
    activation : str, default ``"tanh"``
        phi, applied after every layer but the last and those in ``linear``: one of the names
        of :func:`secondorder.models.layers.activation` (``"tanh"``, ``"relu"``, ``"sigmoid"``,
        ``"silu"``, ...).
    linear : sequence of int, default ``()``
        Indices of further layers with no activation (the autoencoder's code layer).

    The parameters (``init``) are a list of ``{"w": (d_l, d_{l-1}), "b": (d_l,)}``, weights
    drawn N(0, 1/d_{l-1}) (LeCun normal), biases 0; every dense layer is tappable (``layers``).
    """

    def __init__(self, sizes: Sequence[int], activation: str = "tanh",
                 linear: Sequence[int] = ()):
        if len(sizes) < 2:
            raise ValueError("an MLP needs at least an input and an output size")
        self.sizes = tuple(int(s) for s in sizes)
        self.activation = activation
        n = len(self.sizes) - 1
        self.linear = frozenset(int(i) % n for i in linear) | {n - 1}
        act = activation_fn(activation)
        self._acts = [None if i in self.linear else act for i in range(n)]
        # leaves in canonical order: per layer dict {"b", "w"} -> b is 2 l, w is 2 l + 1
        self.layers = tuple(
            LayerInfo("dense", 2 * i + 1, 2 * i, self.sizes[i], self.sizes[i + 1])
            for i in range(n)
        )

    def __repr__(self) -> str:
        return f"MLP({list(self.sizes)}, activation={self.activation!r})"

    def _numpy_params(self, rng: np.random.Generator) -> Any:
        return [
            {"w": lecun_normal(rng, (d_out, d_in), d_in), "b": np.zeros(d_out)}
            for d_in, d_out in zip(self.sizes[:-1], self.sizes[1:])
        ]

    def apply(self, params: Any, x: Array, taps: list[Array] | None = None) -> Any:
        a = x
        inputs = []
        for i, (p, act) in enumerate(zip(params, self._acts)):
            a, a_in = dense(p, a, None if taps is None else taps[i])
            inputs.append(a_in)
            if act is not None:
                a = act(a)
        return a if taps is None else (a, inputs)

    def tap_shapes(self, x: Array) -> list[tuple[int, ...]]:
        return [(x.shape[0], d) for d in self.sizes[1:]]


class Autoencoder(MLP):
    """A deep autoencoder: an MLP whose code layer (the narrowest, e.g. 30 in
    784-1000-500-250-30-250-500-1000-784) and output layer are linear, as in the thesis's MNIST,
    FACES and CURVES problems (the loss, BCE or MSE, acts on the output logits)."""

    def __init__(self, sizes: Sequence[int], activation: str = "relu"):
        sizes = tuple(int(s) for s in sizes)
        code = int(np.argmin(sizes[1:-1])) if len(sizes) > 2 else 0
        super().__init__(sizes, activation, linear=(code,))

    def __repr__(self) -> str:
        return f"Autoencoder({list(self.sizes)}, activation={self.activation!r})"


#: the deep-autoencoder benchmarks' layer sizes (MNIST, FACES, CURVES; Hinton and
#: Salakhutdinov 2006, as used by Martens 2010 and the K-FAC and K-BFGS papers)
AUTOENCODER_SIZES = {
    "mnist": (784, 1000, 500, 250, 30, 250, 500, 1000, 784),
    "faces": (625, 2000, 1000, 500, 30, 500, 1000, 2000, 625),
    "curves": (784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784),
}
