"""Layers written once over the array namespace, with taps for per-layer curvature statistics.

A *tap* is a zero array added to a layer's pre-activation s = W a + b. Differentiating the loss
with respect to the taps (one VJP) gives every layer's output gradient dL/ds at once, and a tapped
layer also reports its input in homogeneous form a~ = (a, 1), so that (a~ a~^T, ds ds^T) are the
Kronecker statistics of K-FAC (Martens and Grosse 2015, Sec. 3). Convolutions work on im2col
patches: a~ has one row per output position, (batch, positions, C_in kh kw + 1), and their taps
have the layout (batch, positions, C_out).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..backends import backend_of, namespace
from ..errors import ShapeError
from ..functional import relu, sigmoid, softplus

Array = Any


def homogeneous(a: Array) -> Array:
    """(..., d) -> (..., d + 1) with a trailing 1 (the bias input)."""
    xp = namespace(a)
    ones = xp.ones((*a.shape[:-1], 1), dtype=a.dtype, device=backend_of(a).device(a))
    return xp.concat([a, ones], axis=-1)


def dense(p: dict, a: Array, tap: Array | None = None) -> tuple[Array, Array | None]:
    """s = a W^T + b for a (batch, in) and W (out, in); returns (s + tap, a~ or None)."""
    s = backend_of(a).linear(a, p["w"], p["b"])
    if tap is None:
        return s, None
    return s + tap, homogeneous(a)


def reference_axes(ndim: int) -> tuple[int, ...]:
    """The axes that take a channels-last kernel with ``ndim`` axes to the reference layout."""
    n = ndim - 2
    return (n + 1, n, *range(n))


def channels_last_to_reference(w: Array) -> Array:
    """A kernel stored channels-last, as flax does, in the reference layout: (d_in, d_out) ->
    (d_out, d_in), and (k_1, ..., k_n, C_in, C_out) -> (C_out, C_in, k_1, ..., k_n) for a
    convolution with n spatial axes (so that it flattens row-major to the im2col layout)."""
    return namespace(w).permute_dims(w, reference_axes(w.ndim))


def reference_to_channels_last(w: Array) -> Array:
    """The inverse of :func:`channels_last_to_reference`."""
    n = w.ndim - 2
    return namespace(w).permute_dims(w, (*range(2, n + 2), 1, 0))


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def im2col(x: Array, kh: int, kw: int, stride: int = 1, padding: int = 0) -> Array:
    """Patches of an (m, C, H, W) batch as (m, Ho Wo, C kh kw), channel-major within a patch
    (the layout of a (C_out, C, kh, kw) kernel flattened row-major)."""
    xp = namespace(x)
    m, c, h, w = x.shape
    if padding:
        dev = backend_of(x).device(x)
        zr = xp.zeros((m, c, padding, w), dtype=x.dtype, device=dev)
        x = xp.concat([zr, x, zr], axis=2)
        zc = xp.zeros((m, c, h + 2 * padding, padding), dtype=x.dtype, device=dev)
        x = xp.concat([zc, x, zc], axis=3)
    ho = output_size(h, kh, stride, padding)
    wo = output_size(w, kw, stride, padding)
    cols = []
    for i in range(kh):
        for j in range(kw):
            cols.append(x[:, :, i : i + stride * (ho - 1) + 1 : stride,
                          j : j + stride * (wo - 1) + 1 : stride])
    patches = xp.stack(cols, axis=2)  # (m, C, kh kw, Ho, Wo)
    patches = xp.reshape(patches, (m, c * kh * kw, ho * wo))
    return xp.permute_dims(patches, (0, 2, 1))


def conv2d(p: dict, x: Array, *, stride: int = 1, padding: int = 0,
           tap: Array | None = None) -> tuple[Array, Array | None]:
    """2-D convolution (cross-correlation) of (m, C, H, W) with W (C_out, C, kh, kw) and b.

    Returns the (m, C_out, Ho, Wo) pre-activation (plus the tap, given as (m, Ho Wo, C_out)) and
    the homogeneous patches a~ (m, Ho Wo, C kh kw + 1) when tapped.
    """
    xp = namespace(x)
    c_out, c_in, kh, kw = p["w"].shape
    m, _, h, w = x.shape
    ho, wo = output_size(h, kh, stride, padding), output_size(w, kw, stride, padding)
    patches = im2col(x, kh, kw, stride, padding)
    kernel = xp.reshape(p["w"], (c_out, c_in * kh * kw))
    s = backend_of(x).linear(patches, kernel, p["b"])  # (m, Ho Wo, C_out)
    if tap is not None:
        s = s + tap
    out = xp.permute_dims(xp.reshape(s, (m, ho, wo, c_out)), (0, 3, 1, 2))
    return out, (None if tap is None else homogeneous(patches))


def im2col1d(x: Array, k: int, stride: int = 1, padding: int = 0) -> Array:
    """Patches of an (m, C, L) batch of signals as (m, Lo, C k), channel-major within a patch
    (the layout of a (C_out, C, 1, k) kernel flattened row-major), Lo = output_size(L, k,
    stride, padding)."""
    xp = namespace(x)
    m, c, length = x.shape
    if padding:
        z = xp.zeros((m, c, padding), dtype=x.dtype, device=backend_of(x).device(x))
        x = xp.concat([z, x, z], axis=2)
    lo = output_size(length, k, stride, padding)
    cols = [x[:, :, j : j + stride * (lo - 1) + 1 : stride] for j in range(k)]
    patches = xp.reshape(xp.stack(cols, axis=2), (m, c * k, lo))  # (m, C, k, Lo) -> (m, C k, Lo)
    return xp.permute_dims(patches, (0, 2, 1))


def conv1d(p: dict, x: Array, *, stride: int = 1, padding: int = 0,
           tap: Array | None = None) -> tuple[Array, Array | None]:
    """1-D convolution (cross-correlation) of signals (m, C, L) with W (C_out, C, 1, k) and b.

    The kernel has the layout of a 2-D convolution with 1 x k kernels on a 1 x L image (torch's
    ``Conv1d`` weight is ``W[:, :, 0, :]``), so the KFC blocks treat it as any convolution.
    Returns the (m, C_out, Lo) pre-activation (plus the tap, given as (m, Lo, C_out)) and the
    homogeneous patches a~ (m, Lo, C k + 1) when tapped.
    """
    xp = namespace(x)
    c_out, c_in, kh, k = p["w"].shape
    if kh != 1:
        raise ShapeError(f"a 1-D convolution kernel is (C_out, C_in, 1, k), got "
                         f"{tuple(p['w'].shape)}")
    patches = im2col1d(x, k, stride, padding)
    kernel = xp.reshape(p["w"], (c_out, c_in * k))
    s = backend_of(x).linear(patches, kernel, p["b"])  # (m, Lo, C_out)
    if tap is not None:
        s = s + tap
    out = xp.permute_dims(s, (0, 2, 1))
    return out, (None if tap is None else homogeneous(patches))


def pool2d(x: Array, size: int, kind: str) -> Array:
    """Non-overlapping ``size`` x ``size`` average or max pooling of (m, C, H, W)."""
    xp = namespace(x)
    m, c, h, w = x.shape
    blocks = xp.reshape(x[:, :, : h - h % size, : w - w % size],
                        (m, c, h // size, size, w // size, size))
    if kind == "avg":
        return xp.mean(blocks, axis=(3, 5))
    if kind == "max":
        return xp.max(blocks, axis=(3, 5))
    raise ValueError(f"unknown pooling {kind!r}: use 'avg' or 'max'")


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "identity": lambda x: x,
    "tanh": lambda x: namespace(x).tanh(x),
    "relu": relu,
    "sigmoid": sigmoid,
    "silu": lambda x: x * sigmoid(x),
    "softplus": softplus,
}


def activation(name: str) -> Callable[[Array], Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]
