"""A 1-D convolutional network for signals (MNIST-1D): strided conv layers, then dense layers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..backends import namespace
from ..errors import ShapeError
from .base import Array, LayerInfo, Model, lecun_normal
from .convnet import conv_tap_shapes, dense_head, dense_params
from .layers import activation as activation_fn
from .layers import conv1d, output_size


def _per_layer(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    values = (int(value),) * n if isinstance(value, (int, np.integer)) else tuple(
        int(v) for v in value)
    if len(values) != n:
        raise ValueError(f"{name} needs one entry per conv layer ({n}), got {len(values)}")
    if any(v < (0 if name == "padding" else 1) for v in values):
        raise ValueError(f"{name} must be {'>= 0' if name == 'padding' else '>= 1'}, got "
                         f"{values}")
    return values


class Conv1DNet(Model):
    """A 1-D convolutional network written once over the array namespace, with taps on every
    convolution (KFC layout: one row per output position) and dense layer.

    Each conv layer is a strided 1-D convolution followed by the activation; the flattened
    features (channel-major, as ``torch.flatten`` of an (m, C, L) tensor) then go through dense
    layers with the activation between them (none after the last). The defaults are the small
    CNN of the MNIST-1D paper (S. Greydanus and D. Kobak, "Scaling down deep learning with
    MNIST-1D", ICML 2024; ``ConvBase`` in the authors' code): on signals of length 40, three
    ReLU convolutions with 25 channels, kernels 5, 3, 3, stride 2 and padding 1 (lengths
    40 -> 19 -> 10 -> 5), then a linear layer 125 -> 10.

    Parameters
    ----------
    length : int, default 40
        L, the length of one input signal. Inputs are (m, L) when ``in_channels`` is 1, or
        (m, C, L).
    channels : sequence of int, default ``(25, 25, 25)``
        Output channels of the conv layers, one layer per entry.
    kernels : int or sequence of int, default ``(5, 3, 3)``
        Kernel sizes, one per conv layer (an int applies to all).
    strides : int or sequence of int, default 2
        Strides, one per conv layer (an int applies to all).
    padding : int or sequence of int, default 1
        Zero padding at both ends of the signal, per conv layer (an int applies to all).
    dense : sequence of int, default ``(10,)``
        Widths of the dense layers after flattening; the last is the output size.
    in_channels : int, default 1
        C, the channels of the input signal.
    activation : str, default ``"relu"``
        The nonlinearity (a name of :func:`secondorder.models.layers.activation`).

    The parameters (``init``) are a list of ``{"w", "b"}`` dicts, LeCun-normal weights and zero
    biases. Conv kernels are stored (C_out, C_in, 1, k), the layout of a 2-D convolution with
    1 x k kernels on a 1 x L image (torch's ``Conv1d`` weight is ``w[:, :, 0, :]``), so K-FAC's
    convolution blocks and the per-tensor methods treat them as any convolution.
    """

    def __init__(self, length: int = 40, channels: Sequence[int] = (25, 25, 25),
                 kernels: int | Sequence[int] = (5, 3, 3), strides: int | Sequence[int] = 2,
                 padding: int | Sequence[int] = 1, dense: Sequence[int] = (10,), *,
                 in_channels: int = 1, activation: str = "relu"):
        self.length, self.in_channels = int(length), int(in_channels)
        self.channels = tuple(int(c) for c in channels)
        self.dense_sizes = tuple(int(d) for d in dense)
        n = len(self.channels)
        if n < 1 or not self.dense_sizes:
            raise ValueError("a Conv1DNet needs at least one conv layer and one dense layer")
        self.kernels = _per_layer(kernels, n, "kernels")
        self.strides = _per_layer(strides, n, "strides")
        self.padding = _per_layer(padding, n, "padding")
        self.activation = activation
        self._act = activation_fn(activation)
        c, length = self.in_channels, self.length
        layers, self._conv_out = [], []
        for i, (c_out, k, s, p) in enumerate(zip(self.channels, self.kernels, self.strides,
                                                 self.padding)):
            layers.append(LayerInfo("conv", 2 * i + 1, 2 * i, c * k, c_out))
            length = output_size(length, k, s, p)
            if length < 1:
                raise ValueError(f"signals of length {self.length} are too short for conv "
                                 f"layer {i} (kernel {k}, stride {s}, padding {p})")
            self._conv_out.append(length)
            c = c_out
        self.features = c * length
        d_in = self.features
        for j, d_out in enumerate(self.dense_sizes):
            i = n + j
            layers.append(LayerInfo("dense", 2 * i + 1, 2 * i, d_in, d_out))
            d_in = d_out
        self.layers = tuple(layers)

    def __repr__(self) -> str:
        return (f"Conv1DNet(length={self.length}, channels={self.channels}, "
                f"kernels={self.kernels}, strides={self.strides}, padding={self.padding}, "
                f"dense={self.dense_sizes}, activation={self.activation!r})")

    @property
    def conv_lengths(self) -> tuple[int, ...]:
        """The output length of every conv layer (the number of tap rows per example)."""
        return tuple(self._conv_out)

    def _numpy_params(self, rng: np.random.Generator) -> Any:
        params = []
        c = self.in_channels
        for c_out, k in zip(self.channels, self.kernels):
            params.append({"w": lecun_normal(rng, (c_out, c, 1, k), c * k),
                           "b": np.zeros(c_out)})
            c = c_out
        return params + dense_params(rng, self.features, self.dense_sizes)

    def _signals(self, x: Array) -> Array:
        xp = namespace(x)
        if x.ndim == 2 and self.in_channels == 1 and x.shape[1] == self.length:
            return xp.reshape(x, (x.shape[0], 1, self.length))
        if x.ndim == 3 and tuple(x.shape[1:]) == (self.in_channels, self.length):
            return x
        expected = f"(m, {self.length})" if self.in_channels == 1 else ""
        expected += (" or " if expected else "") + f"(m, {self.in_channels}, {self.length})"
        raise ShapeError(f"{self!r} takes inputs {expected}, got {tuple(x.shape)}")

    def apply(self, params: Any, x: Array, taps: list[Array] | None = None) -> Any:
        a = self._signals(x)
        inputs = []
        n = len(self.channels)
        for i in range(n):
            a, a_in = conv1d(params[i], a, stride=self.strides[i], padding=self.padding[i],
                             tap=None if taps is None else taps[i])
            inputs.append(a_in)
            a = self._act(a)
        return dense_head(self, params, a, n, taps, inputs)

    def tap_shapes(self, x: Array) -> list[tuple[int, ...]]:
        return conv_tap_shapes(self, x.shape[0])
