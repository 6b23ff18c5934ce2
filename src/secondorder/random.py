"""Counter-based random numbers written over the array namespace: the same bits on every backend.

Why. A jitted optimiser step must draw new noise at every step (Monte-Carlo Fisher targets now;
K-FAC, TNT and dropout later), so the noise cannot come from NumPy's Generator inside the step:
under ``jax.jit`` that would be a compile-time constant. Cross-backend equivalence tests must
still be able to give every backend the same noise. Both follow from one design: a *stateless,
counter-based* generator (Salmon et al. 2011) written with the integer operations of the array
API standard only (``+``, ``^``, ``&``, ``<<``, ``>>`` on int32 arrays), with no framework RNG.
A draw is a pure function of a *key* (a small integer array carried in the optimiser state) and a
position (the counter), so

* it is traced like any other arithmetic under ``jax.jit``, ``jax.vmap`` and ``torch.func``, and a
  jitted step that splits the key in its state draws new numbers at every step;
* NumPy (autograd), PyTorch, JAX and CuPy compute the same integers bit for bit from the same key,
  and the same uniforms exactly (they are integers times a power of two); normals agree to a few
  ulp (they go through the framework's ``log``, ``sqrt`` and ``cos``).

The hash. Threefry-2x32 with 20 rounds (J. K. Salmon, M. A. Moraes, R. O. Dror, D. E. Shaw,
"Parallel random numbers: as easy as 1, 2, 3", SC'11; the Random123 library): a key
(k0, k1) and a counter (c0, c1) of 32-bit words are mapped to two words by

    ks = (k0, k1, k0 ^ k1 ^ 0x1BD11BDA);  (x0, x1) = (c0 + ks0, c1 + ks1)
    for j = 1..5:  four rounds  x0 += x1; x1 = rotl(x1, r); x1 ^= x0
                   with r = (13, 15, 26, 6) for odd j and (17, 29, 16, 24) for even j,
                   then x0 += ks[j mod 3]; x1 += ks[(j + 1) mod 3] + j

(all arithmetic modulo 2^32). It is the generator behind ``jax.random``'s default implementation,
and the conventions below are JAX's (with ``jax_threefry_partitionable``, the default since JAX
0.5), so ``key``, ``split``, ``fold_in``, ``bits`` and ``uniform`` give exactly the numbers of
``jax.random.key``, ``split``, ``fold_in``, ``bits`` and ``uniform``; the tests hold them to
that and to Random123's known-answer vectors.

Representation. 32-bit words are held in **int32** arrays with the uint32 bit pattern: JAX without
x64 has no 64-bit integers and PyTorch's uint32 support is partial, while two's-complement int32
addition wraps modulo 2^32 on every framework, so it gives the uint32 sums bit for bit. A logical
right shift is ``(x >> k) & (2^(32-k) - 1)`` (``>>`` is arithmetic on signed integers).

* ``key(seed)``: the words (seed >> 32, seed mod 2^32) of a 64-bit seed, shape (2,), int32.
* ``split(key, n)[i] = threefry(key, (0, i))``, shape (n, 2); ``fold_in(key, d) =
  threefry(key, (0, d mod 2^32))``.
* ``bits(key, shape)``: element i (row-major flat index) is y0 ^ y1 with
  (y0, y1) = threefry(key, (0, i)).
* ``uniform``: float32 (b >> 9) 2^-23 from the bits b above (23 high bits: the mantissa of a
  float in [1, 2), minus 1); float64 (y0 2^20 + (y1 >> 12)) 2^-52 (the 52 high bits of the
  64-bit word y0 2^32 + y1). Values lie on a grid in [0, 1) and are exact in their dtype.
* ``normal``: Box-Muller, z = sqrt(-2 log(1 - u1)) cos(2 pi u2) with u1, u2 uniforms from the two
  halves of ``split(key)``.
* ``bernoulli(key, p)``: ``uniform(key, p.shape) < p``.
* ``categorical(key, probs)``: inverse CDF along the last axis: the number of cumulative sums
  below one uniform per row, clipped to k - 1.

One call draws at most 2^31 - 1 numbers (the counter is an int32 iota); split the key for more.
Every draw of a key should use it once; ``split`` it to get independent streams.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .backends import Backend, backend_of, current, get
from .errors import DTypeError, RandomKeyError, ShapeError

Array = Any

__all__ = [
    "Random",
    "bernoulli",
    "bits",
    "categorical",
    "fold_in",
    "key",
    "normal",
    "split",
    "threefry2x32",
    "uniform",
]

_MASK32 = 0xFFFFFFFF
_PARITY = 0x1BD11BDA  # Threefish's key-schedule constant
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_MAX_DRAWS = 2**31 - 1


def _signed32(value: int) -> int:
    """The int32 whose bit pattern is the low 32 bits of ``value``."""
    value &= _MASK32
    return value - 2**32 if value >= 2**31 else value


def _srl(x: Array, k: int) -> Array:
    """Logical right shift of int32 words holding uint32 bit patterns."""
    return (x >> k) & ((1 << (32 - k)) - 1)


def _rotl(x: Array, r: int) -> Array:
    return (x << r) | _srl(x, 32 - r)


def _backend(arg: Backend | str | None) -> Backend:
    if arg is None:
        return current()
    return get(arg) if isinstance(arg, str) else arg


def _check_key(key: Array) -> Backend:
    backend = backend_of(key)
    xp = backend.xp
    if not backend.is_array(key) or tuple(key.shape) != (2,) or key.dtype != xp.int32:
        shape = tuple(getattr(key, "shape", ()))
        raise RandomKeyError(
            f"a random key must be an int32 array of shape (2,), got {type(key).__name__} "
            f"{getattr(key, 'dtype', '')} of shape {shape}; make one with "
            "secondorder.random.key(seed, backend) and derive others with split or fold_in"
        )
    return backend


def _size(shape: Sequence[int]) -> tuple[tuple[int, ...], int]:
    try:
        shape = tuple(int(n) for n in shape)
    except TypeError as err:
        raise ShapeError(f"shape must be a tuple of integers, got {shape!r}") from err
    if any(n < 0 for n in shape):
        raise ShapeError(f"shape must have non-negative sizes, got {shape}")
    size = math.prod(shape)
    if size > _MAX_DRAWS:
        raise ShapeError(
            f"one draw gives at most 2^31 - 1 numbers, asked for {size} (shape {shape}); split "
            "the key and draw in parts"
        )
    return shape, size


def threefry2x32(key: Array, c0: Array, c1: Array) -> tuple[Array, Array]:
    """Threefry-2x32 (20 rounds) of the counters (c0, c1) under ``key`` (see the module
    docstring): two int32 arrays of the broadcast shape of ``c0`` and ``c1``, holding uint32 bit
    patterns."""
    backend = _check_key(key)
    host = backend.host_arrays(key, c0, c1)
    if host is not None:  # ~150 tiny operations: NumPy's calls cost less (the same words)
        from array_api_compat import numpy as host_xp  # astype and friends on NumPy 1.x too

        y0, y1 = _threefry(host_xp, *host)
        return backend.asarray(y0), backend.asarray(y1)
    return _threefry(backend.xp, key, c0, c1)


def _threefry(xp: Any, key: Array, c0: Array, c1: Array) -> tuple[Array, Array]:
    c0, c1 = xp.broadcast_arrays(xp.astype(c0, xp.int32), xp.astype(c1, xp.int32))
    shape = tuple(c0.shape)
    # work on 1-d arrays: NumPy computes 0-d operands as scalars, which warn on the wrap-around
    k0, k1 = key[0:1], key[1:2]
    k2 = k0 ^ k1 ^ _signed32(_PARITY)
    ks = (k0, k1, k2)
    x0, x1 = xp.reshape(c0, (-1,)) + k0, xp.reshape(c1, (-1,)) + k1
    for j in range(1, 6):
        for r in _ROTATIONS[(j - 1) % 2]:
            x0 = x0 + x1
            x1 = _rotl(x1, r) ^ x0
        x0 = x0 + ks[j % 3]
        x1 = x1 + (ks[(j + 1) % 3] + j)
    return xp.reshape(x0, shape), xp.reshape(x1, shape)


def _counters(key: Array, size: int) -> tuple[Array, Array]:
    """threefry(key, (0, i)) for i = 0 .. size - 1."""
    backend = backend_of(key)
    xp = backend.xp
    lo = xp.arange(size, dtype=xp.int32, device=backend.device(key))
    return threefry2x32(key, xp.zeros_like(lo), lo)


def key(seed: int, backend: Backend | str | None = None, device: Any = None) -> Array:
    """The key of an integer ``seed`` (taken modulo 2^64) on ``backend`` (a name, a backend,
    or None for :func:`secondorder.backends.current`): the int32 words (seed >> 32, seed mod
    2^32), as ``jax.random.key(seed)``."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        try:
            seed = int(seed.__index__())
        except AttributeError as err:
            raise RandomKeyError(
                f"a seed must be a Python integer, got {type(seed).__name__}; inside jax.jit "
                "pass a key made outside (random.key) and derive others with split or fold_in"
            ) from err
    seed &= 2**64 - 1
    b = _backend(backend)
    xp = b.xp
    kwargs = {} if device is None else {"device": device}
    return xp.asarray([_signed32(seed >> 32), _signed32(seed)], dtype=xp.int32, **kwargs)


def split(key: Array, num: int = 2) -> Array:
    """``num`` new keys, shape (num, 2): row i is threefry(key, (0, i))."""
    backend = _check_key(key)
    if int(num) != num or num < 0:
        raise ShapeError(f"split needs a non-negative integer number of keys, got {num!r}")
    _size((num,))
    y0, y1 = _counters(key, int(num))
    return backend.xp.stack([y0, y1], axis=1)


def fold_in(key: Array, data: int | Array) -> Array:
    """A new key from ``key`` and the integer ``data`` (mod 2^32; a Python int or an integer
    0-d array, which may be traced): threefry(key, (0, data))."""
    backend = _check_key(key)
    xp = backend.xp
    if isinstance(data, int):
        d = xp.asarray([_signed32(data)], dtype=xp.int32, device=backend.device(key))
    else:
        if tuple(getattr(data, "shape", (1,))) not in ((), (1,)):
            raise ShapeError(f"fold_in takes one integer, got an array of shape {data.shape}")
        d = xp.reshape(xp.astype(data, xp.int32), (1,))
    y0, y1 = threefry2x32(key, xp.zeros_like(d), d)
    return xp.concat([y0, y1])


def bits(key: Array, shape: Sequence[int] = ()) -> Array:
    """Random 32-bit words of ``shape`` as int32 bit patterns (``jax.random.bits`` as uint32)."""
    backend = _check_key(key)
    shape, size = _size(shape)
    y0, y1 = _counters(key, size)
    return backend.xp.reshape(y0 ^ y1, shape)


def _float_dtype(backend: Backend, dtype: Any) -> Any:
    if dtype is None:
        dtype = "float64" if backend.supports_float64() else "float32"
    resolved = backend.dtype(dtype)
    name = backend.dtype_name(resolved)
    if name not in ("float32", "float64"):
        raise DTypeError(f"random floats are float32 or float64, got {dtype!r}; draw them in "
                         "float32 and cast the result")
    return resolved


def uniform(key: Array, shape: Sequence[int] = (), dtype: Any = None) -> Array:
    """Uniform numbers in [0, 1) of ``shape`` (float64 by default where the backend has it),
    on a grid of 2^-23 (float32) or 2^-52 (float64); see the module docstring."""
    backend = _check_key(key)
    xp = backend.xp
    dtype = _float_dtype(backend, dtype)
    shape, size = _size(shape)
    y0, y1 = _counters(key, size)
    if backend.dtype_name(dtype) == "float32":
        mantissa = xp.astype(_srl(y0 ^ y1, 9), dtype)
        out = mantissa * (2.0**-23)
    else:
        hi = xp.astype(y0, dtype)
        hi = xp.where(y0 < 0, hi + 2.0**32, hi)  # the unsigned value of the high word
        out = (hi * 2.0**20 + xp.astype(_srl(y1, 12), dtype)) * (2.0**-52)
    return xp.reshape(out, shape)


def normal(key: Array, shape: Sequence[int] = (), dtype: Any = None) -> Array:
    """Standard normal numbers by Box-Muller: sqrt(-2 log(1 - u1)) cos(2 pi u2), with u1 and u2
    uniform under the two keys of ``split(key)``."""
    backend = _check_key(key)
    xp = backend.xp
    keys = split(key)
    k1, k2 = keys[0, :], keys[1, :]
    u1 = uniform(k1, shape, dtype)
    u2 = uniform(k2, shape, dtype)
    return xp.sqrt(-2.0 * xp.log(1.0 - u1)) * xp.cos((2.0 * math.pi) * u2)


def bernoulli(key: Array, p: Array) -> Array:
    """Booleans of ``p``'s shape, True with probability p: ``uniform(key, p.shape) < p``."""
    backend = backend_of(key, p)
    if not backend.is_array(p):
        raise ShapeError(
            f"bernoulli needs p as an array of probabilities, got {type(p).__name__}"
        )
    return uniform(key, tuple(p.shape), p.dtype) < p


def categorical(key: Array, probs: Array | None = None, *, logits: Array | None = None
                ) -> Array:
    """Class indices drawn from the distributions along the last axis of ``probs`` (rows
    summing to 1) or of ``softmax(logits)``: one uniform u per row, index = #{j : cdf_j < u},
    clipped to k - 1 (inverse CDF). Returns int64 (int32 where the backend lacks 64 bits) of
    the leading shape."""
    if (probs is None) == (logits is None):
        raise RandomKeyError("categorical takes exactly one of probs or logits")
    dist = probs if logits is None else logits
    backend = backend_of(key, dist)
    xp = backend.xp
    if getattr(dist, "ndim", 0) < 1:
        raise ShapeError("categorical needs probabilities with a last axis of classes")
    if logits is not None:
        shifted = logits - xp.max(logits, axis=-1, keepdims=True)
        e = xp.exp(shifted)
        dist = e / xp.sum(e, axis=-1, keepdims=True)
    k = dist.shape[-1]
    u = uniform(key, tuple(dist.shape[:-1]), dist.dtype)
    below = xp.cumulative_sum(dist, axis=-1) < u[..., None]
    index = xp.int64 if backend.supports_float64() else xp.int32
    labels = xp.sum(xp.astype(below, index), axis=-1)
    return xp.clip(labels, max=k - 1)


class Random:
    """This module's functions bound to one backend: ``backend.random``.

    ``key(seed, device=None)`` makes a key on that backend; the other functions take a key and
    are those of :mod:`secondorder.random`.
    """

    threefry2x32 = staticmethod(threefry2x32)
    split = staticmethod(split)
    fold_in = staticmethod(fold_in)
    bits = staticmethod(bits)
    uniform = staticmethod(uniform)
    normal = staticmethod(normal)
    bernoulli = staticmethod(bernoulli)
    categorical = staticmethod(categorical)

    def __init__(self, backend: Backend):
        self.backend = backend

    def key(self, seed: int, device: Any = None) -> Array:
        return key(seed, self.backend, device)

    def __repr__(self) -> str:
        return f"<secondorder.random on {self.backend.name!r}>"
