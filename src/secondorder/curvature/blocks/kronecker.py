"""``KroneckerBlock``: the layout shared by the dense and convolution (KFC) blocks.

A layer s = W a + b has the parameter matrix W~ = [W b] of shape (d_out, d_in + 1) (bias column
last, the homogeneous input a~ = (a, 1) of the taps); a convolution kernel (C_out, C_in, kh, kw)
is flattened row-major to (C_out, C_in kh kw), the im2col layout. Its K-FAC block is A (x) G in
K-FAC's column-major notation, i.e. ``Kronecker(G, A)`` acting on W~ as W~ -> G W~ A, so the
state's factors are ``(G, A)``. The parameters travel as ``(b, W)`` (with a bias) or ``W``, the
leaves of :class:`secondorder.curvature.LayerKronecker`.
"""

from __future__ import annotations

import math
from typing import Any

from ...backends import backend_of
from ...errors import ShapeError
from .base import CurvatureBlock
from .statistics import kronecker_statistics

Array = Any
Tree = Any


class KroneckerBlock(CurvatureBlock):
    """A (x) G on a layer's ``(b, W)`` (or ``W``) with the factors ``(G, A)``; see
    :class:`~.dense.DenseBlock` and :class:`~.conv.ConvBlock`.

    Parameters: ``weight_shape`` (d_out, d_in) or (C_out, C_in, k_1, ..., k_n); ``bias``
    (default True): whether the layer has a bias (the last column of W~ and the last row and
    column of A); ``bias_shape`` (default None: (d_out,)): the shape of the bias leaf, d_out
    entries in any shape, such as an equinox convolution's (C_out, 1, 1).
    """

    default_kind = "inverse"
    default_split = "pi"
    #: the numbers of axes of the tapped inputs this block takes: (m, d_in) for a dense layer,
    #: (m, positions, d_in) for a convolution or a dense layer whose weight is shared over
    #: positions (a sequence)
    input_ndims: tuple[int, ...] = (2, 3)

    def __init__(self, weight_shape: tuple[int, ...], *, bias: bool = True,
                 bias_shape: tuple[int, ...] | None = None):
        self.weight_shape = tuple(int(s) for s in weight_shape)
        if len(self.weight_shape) < 2:
            raise ShapeError(f"a layer weight has at least 2 axes, got {self.weight_shape}")
        self.bias = bool(bias)
        self.d_out = self.weight_shape[0]
        self.bias_shape = (self.d_out,) if bias_shape is None else tuple(
            int(s) for s in bias_shape)
        if math.prod(self.bias_shape) != self.d_out:
            raise ShapeError(f"a bias of shape {self.bias_shape} does not fit a weight "
                             f"{self.weight_shape}: it needs {self.d_out} entries")
        self.d_in = math.prod(self.weight_shape[1:]) + (1 if self.bias else 0)
        self.dims = (self.d_out, self.d_in)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.weight_shape}, bias={self.bias})"

    def param_like(self, like: Array) -> Tree:
        backend = backend_of(like)
        xp, dev = backend.xp, backend.device(like)
        w = xp.zeros(self.weight_shape, dtype=like.dtype, device=dev)
        if not self.bias:
            return w
        return (xp.zeros(self.bias_shape, dtype=like.dtype, device=dev), w)

    def _to_tensor(self, v: Tree) -> Array:
        if not self.bias:
            xp = backend_of(v).xp
            return xp.reshape(v, (self.d_out, -1))
        b, w = v
        xp = backend_of(w).xp
        return xp.concat([xp.reshape(w, (self.d_out, -1)), xp.reshape(b, (self.d_out, 1))],
                         axis=1)

    def _from_tensor(self, t: Array) -> Tree:
        xp = backend_of(t).xp
        if not self.bias:
            return xp.reshape(t, self.weight_shape)
        return (xp.reshape(t[:, -1], self.bias_shape), xp.reshape(t[:, :-1], self.weight_shape))

    def batch_statistics(self, inputs: Array, deltas: Any) -> tuple[Array, Array]:
        """``(G, A)`` of one batch from a tapped layer's homogeneous inputs and its output
        gradients (:func:`~.statistics.kronecker_statistics`)."""
        if getattr(inputs, "ndim", None) not in self.input_ndims:
            wanted = " or ".join(str(n) for n in self.input_ndims)
            raise ShapeError(
                f"{type(self).__name__} takes tapped inputs with {wanted} axes ((batch, "
                f"[positions,] features)), got shape {tuple(getattr(inputs, 'shape', ()))}"
            )
        a, g = kronecker_statistics(inputs, deltas)
        return g, a
