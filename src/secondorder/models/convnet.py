"""A small convolutional network: [conv -> activation -> pool] blocks, then dense layers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..backends import namespace
from .base import Array, LayerInfo, Model, lecun_normal
from .layers import activation as activation_fn
from .layers import conv2d, dense, output_size, pool2d


class ConvNet(Model):
    """A convolutional network written once over the array namespace, with taps on every
    convolution (KFC layout) and dense layer.

    Each conv block is a ``kernel`` x ``kernel`` convolution (stride 1, ``padding``), the
    activation and a 2 x 2 ``pool``; the flattened features then go through dense layers with
    the activation between them (none after the last). With in_shape (3, 32, 32) the defaults
    are the CIFAR-10 network of Roulet and Blondel's prox-linear experiments (two SiLU conv
    blocks with average pooling, then 256 and 10 units).

    Parameters
    ----------
    in_shape : sequence of int
        (C, H, W) of one input image (inputs are (m, C, H, W)).
    channels : sequence of int, default ``(32, 64)``
        Output channels of the conv blocks, one block per entry.
    dense : sequence of int, default ``(256, 10)``
        Widths of the dense layers after flattening; the last is the output size.
    kernel : int, default 3
        Side of the square convolution kernels.
    padding : int, default 1
        Zero padding on each side of every convolution.
    pool : str, default ``"avg"``
        ``"avg"`` or ``"max"`` 2 x 2 pooling after each conv block.
    activation : str, default ``"silu"``
        The nonlinearity (a name of :func:`secondorder.models.layers.activation`).

    The parameters (``init``) are a list of ``{"w", "b"}`` dicts, conv kernels shaped
    (C_out, C_in, k, k), LeCun-normal weights and zero biases.
    """

    def __init__(self, in_shape: Sequence[int], channels: Sequence[int] = (32, 64),
                 dense: Sequence[int] = (256, 10), *, kernel: int = 3, padding: int = 1,
                 pool: str = "avg", activation: str = "silu"):
        self.in_shape = tuple(int(s) for s in in_shape)
        self.channels = tuple(int(c) for c in channels)
        self.dense_sizes = tuple(int(d) for d in dense)
        self.kernel, self.padding, self.pool = int(kernel), int(padding), pool
        if pool not in ("avg", "max"):
            raise ValueError(f"unknown pooling {pool!r}: use 'avg' or 'max'")
        self.activation = activation
        self._act = activation_fn(activation)
        c, h, w = self.in_shape
        layers, self._conv_out = [], []
        for i, c_out in enumerate(self.channels):
            layers.append(LayerInfo("conv", 2 * i + 1, 2 * i, c * kernel * kernel, c_out))
            h = output_size(h, kernel, 1, padding)
            w = output_size(w, kernel, 1, padding)
            self._conv_out.append(h * w)
            h, w, c = h // 2, w // 2, c_out
        if h < 1 or w < 1:
            raise ValueError(f"input {self.in_shape} is too small for {len(self.channels)} blocks")
        d_in = c * h * w
        n_conv = len(self.channels)
        for j, d_out in enumerate(self.dense_sizes):
            i = n_conv + j
            layers.append(LayerInfo("dense", 2 * i + 1, 2 * i, d_in, d_out))
            d_in = d_out
        self.layers = tuple(layers)
        self.features = c * h * w

    def __repr__(self) -> str:
        return (f"ConvNet(in_shape={self.in_shape}, channels={self.channels}, "
                f"dense={self.dense_sizes}, pool={self.pool!r}, activation={self.activation!r})")

    def _numpy_params(self, rng: np.random.Generator) -> Any:
        params = []
        c, k = self.in_shape[0], self.kernel
        for c_out in self.channels:
            params.append({"w": lecun_normal(rng, (c_out, c, k, k), c * k * k),
                           "b": np.zeros(c_out)})
            c = c_out
        return params + dense_params(rng, self.features, self.dense_sizes)

    def apply(self, params: Any, x: Array, taps: list[Array] | None = None) -> Any:
        inputs = []
        n_conv = len(self.channels)
        a = x
        for i in range(n_conv):
            a, a_in = conv2d(params[i], a, padding=self.padding,
                             tap=None if taps is None else taps[i])
            inputs.append(a_in)
            a = pool2d(self._act(a), 2, self.pool)
        return dense_head(self, params, a, n_conv, taps, inputs)

    def tap_shapes(self, x: Array) -> list[tuple[int, ...]]:
        return conv_tap_shapes(self, x.shape[0])


def dense_head(model: Any, params: Any, a: Array, n_conv: int, taps: list[Array] | None,
               inputs: list[Array]) -> Any:
    """The dense layers after ``n_conv`` convolutions (shared by :class:`ConvNet` and
    :class:`~secondorder.models.conv1d.Conv1DNet`): ``a`` flattened, then
    ``model.dense_sizes`` layers with ``model._act`` between them (none after the last);
    returns the outputs, or ``(outputs, inputs)`` with every layer's tapped input when ``taps``
    are given."""
    a = namespace(a).reshape(a, (a.shape[0], -1))
    for j in range(len(model.dense_sizes)):
        i = n_conv + j
        a, a_in = dense(params[i], a, None if taps is None else taps[i])
        inputs.append(a_in)
        if j < len(model.dense_sizes) - 1:
            a = model._act(a)
    return a if taps is None else (a, inputs)


def conv_tap_shapes(model: Any, m: int) -> list[tuple[int, ...]]:
    """Tap shapes of a convolutional model with dense layers: (m, T_i, C_i) per convolution
    (``model._conv_out`` output positions, ``model.channels``), (m, d) per dense layer."""
    shapes = [(m, t, c) for t, c in zip(model._conv_out, model.channels)]
    return shapes + [(m, d) for d in model.dense_sizes]


def dense_params(rng: np.random.Generator, d_in: int, sizes: Sequence[int]) -> list[dict]:
    """LeCun-normal weights (d_out, d_in) and zero biases of the dense layers after the
    convolutions (``sizes``, from ``d_in`` flattened features)."""
    params = []
    for d_out in sizes:
        params.append({"w": lecun_normal(rng, (d_out, d_in), d_in), "b": np.zeros(d_out)})
        d_in = d_out
    return params
