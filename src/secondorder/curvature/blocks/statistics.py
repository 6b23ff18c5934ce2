"""Batch statistics of curvature blocks, the one place they are computed.

``kronecker_statistics`` is used by :class:`~.dense.DenseBlock`, :class:`~.conv.ConvBlock` and
:func:`secondorder.curvature.kronecker_factors`; ``mode_statistics`` by
:class:`~.tensor.TensorBlock`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...backends import namespace
from ...errors import ShapeError

Array = Any


def kronecker_statistics(inputs: Array, deltas: Array | Sequence[Array]) -> tuple[Array, Array]:
    """K-FAC's factors (A, G) of one tapped layer on a batch of m examples.

    ``inputs`` are the layer's homogeneous inputs a~ (bias column last, as the taps return them):
    (m, d_in) for a dense layer, (m, T, d_in) for a convolution with T output positions (im2col
    patches). ``deltas`` are the output gradients delta = J_s^T u for one or several cotangents u
    (a list, or one array), shaped (m, d_out) or (m, T, d_out). Then

        A = (1/m) sum_i sum_t a~_it a~_it^T,    G = (1/(m T)) sum_u sum_i sum_t delta_it delta_it^T

    (T = 1 for dense layers): the KFC convention for convolutions is that A *sums* over output
    positions and G *averages* (Grosse and Martens, ICML 2016; curvlinops does the opposite:
    its factors are (A / T, T G), with the same Kronecker product and the same pi-split damped
    inverse, since pi scales with sqrt(tr A / tr G), but another inverse for a split that
    ignores the traces, such as equal dampings of both factors; tests_peers/ checks both).
    """
    xp = namespace(inputs)
    if isinstance(deltas, (list, tuple)):
        deltas = list(deltas)
    else:
        deltas = [deltas]
    if not deltas:
        raise ShapeError("kronecker_statistics needs at least one array of output gradients")
    if inputs.ndim not in (2, 3):
        raise ShapeError(
            f"layer inputs must be (batch, features) or (batch, positions, features), got shape "
            f"{tuple(inputs.shape)}"
        )
    m = inputs.shape[0]
    positions = inputs.shape[1] if inputs.ndim == 3 else 1
    g_sum = None
    for d in deltas:
        if tuple(d.shape[:-1]) != tuple(inputs.shape[:-1]):
            raise ShapeError(
                f"output gradients of shape {tuple(d.shape)} do not fit layer inputs of shape "
                f"{tuple(inputs.shape)}: both need the same (batch[, positions]) leading axes"
            )
        d2 = xp.reshape(d, (-1, d.shape[-1]))
        term = xp.matrix_transpose(d2) @ d2
        g_sum = term if g_sum is None else g_sum + term
    a2 = xp.reshape(inputs, (-1, inputs.shape[-1]))
    return xp.matrix_transpose(a2) @ a2 / m, g_sum / (m * positions)


def mode_statistics(grad: Array) -> tuple[Array, ...]:
    """G_i = mat_i(G) mat_i(G)^T for every mode i of a k-way tensor G: the contraction of the
    tensor with itself over all modes but i (Shampoo: Gupta, Koren and Singer 2018; TNT: Ren and
    Goldfarb 2021)."""
    xp = namespace(grad)
    k = grad.ndim
    if k < 1:
        raise ShapeError("mode statistics need a tensor with at least one axis, got a scalar")
    if k == 2:  # two matmuls: torch's tensordot copies both operands into a contracted layout
        return grad @ xp.matrix_transpose(grad), xp.matrix_transpose(grad) @ grad
    out = []
    for i in range(k):
        others = tuple(j for j in range(k) if j != i)
        out.append(xp.tensordot(grad, grad, axes=(others, others)))
    return tuple(out)
