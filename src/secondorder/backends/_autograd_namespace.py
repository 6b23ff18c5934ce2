"""An array-API-shaped namespace over ``autograd.numpy``.

The NumPy backend differentiates with HIPS autograd, which traces only calls that go through
``autograd.numpy``. Core code is written against the array API standard, so this module maps the
standard's names (``concat``, ``permute_dims``, ``astype``, ``linalg.vector_norm``, ...) onto
autograd's wrapped NumPy functions. On plain ``ndarray`` inputs the functions return plain
``ndarray`` results; on autograd boxes they record the operation for differentiation.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import autograd.numpy as anp
import numpy as np
from autograd.extend import defjvp, defvjp, primitive


@primitive
def tanh(x: Any) -> Any:
    """tanh with derivative 1 - tanh^2 taken from the output: autograd's own rule divides by
    cosh(x)^2, which overflows to NaN second derivatives for |x| > ~350 (float64)."""
    return np.tanh(x)


defvjp(tanh, lambda ans, x: lambda g: g * (1.0 - ans * ans))
defjvp(tanh, lambda g, ans, x: g * (1.0 - ans * ans))


def _drop_device(fn: Any) -> Any:
    def wrapped(*args: Any, device: Any = None, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    wrapped.__name__ = getattr(fn, "__name__", "wrapped")
    return wrapped


def asarray(x: Any, dtype: Any = None, device: Any = None, copy: Any = None) -> Any:
    if hasattr(x, "_value"):  # an autograd box: keep it on the tape
        return x if dtype is None else astype(x, dtype)
    return np.array(x, dtype=dtype, copy=bool(copy)) if copy else np.asarray(x, dtype=dtype)


def astype(x: Any, dtype: Any, /, *, copy: bool = True, device: Any = None) -> Any:
    if not copy and x.dtype == dtype:
        return x
    return x.astype(dtype)


def concat(arrays: Any, /, *, axis: int | None = 0) -> Any:
    if axis is None:
        return anp.concatenate([anp.reshape(a, (-1,)) for a in arrays])
    return anp.concatenate(list(arrays), axis=axis)


def permute_dims(x: Any, /, axes: Any) -> Any:
    return anp.transpose(x, axes)


def matrix_transpose(x: Any, /) -> Any:
    return anp.swapaxes(x, -1, -2)


def vecdot(x1: Any, x2: Any, /, *, axis: int = -1) -> Any:
    return anp.sum(x1 * x2, axis=axis)


def vector_norm(x: Any, /, *, axis: Any = None, keepdims: bool = False, ord: Any = 2) -> Any:
    if ord == 2:
        return anp.sqrt(anp.sum(x * x, axis=axis, keepdims=keepdims))
    if ord == float("inf"):
        return anp.max(anp.abs(x), axis=axis, keepdims=keepdims)
    return anp.sum(anp.abs(x) ** ord, axis=axis, keepdims=keepdims) ** (1.0 / ord)


def matrix_norm(x: Any, /, *, keepdims: bool = False, ord: Any = "fro") -> Any:
    if ord != "fro":
        return anp.linalg.norm(x, ord=ord, axis=(-2, -1), keepdims=keepdims)
    return anp.sqrt(anp.sum(x * x, axis=(-2, -1), keepdims=keepdims))


def diagonal(x: Any, /, *, offset: int = 0) -> Any:
    return anp.diagonal(x, offset=offset, axis1=-2, axis2=-1)


def _eigh(x: Any, /) -> Any:
    return anp.linalg.eigh(x)


linalg = SimpleNamespace(
    cholesky=anp.linalg.cholesky,
    det=anp.linalg.det,
    diagonal=diagonal,
    eigh=_eigh,
    inv=anp.linalg.inv,
    matmul=anp.matmul,
    matrix_norm=matrix_norm,
    matrix_transpose=matrix_transpose,
    outer=anp.outer,
    solve=anp.linalg.solve,
    svd=anp.linalg.svd,
    tensordot=anp.tensordot,
    trace=lambda x, /, *, offset=0: anp.trace(x, offset=offset, axis1=-2, axis2=-1),
    vecdot=vecdot,
    vector_norm=vector_norm,
)

_RENAMED = {
    "asarray": asarray,
    "astype": astype,
    "concat": concat,
    "permute_dims": permute_dims,
    "matrix_transpose": matrix_transpose,
    "vecdot": vecdot,
    "pow": anp.power,
    "tanh": tanh,
    "cumulative_sum": lambda x, /, *, axis=None, dtype=None, include_initial=False: anp.cumsum(
        x, axis=axis
    ),
    "linalg": linalg,
    "zeros": _drop_device(anp.zeros),
    "ones": _drop_device(anp.ones),
    "eye": _drop_device(np.eye),
    "full": _drop_device(anp.full),
    "arange": _drop_device(np.arange),
    "empty": _drop_device(np.empty),
    "linspace": _drop_device(np.linspace),
    "zeros_like": _drop_device(anp.zeros_like),
    "ones_like": _drop_device(anp.ones_like),
    "full_like": _drop_device(anp.full_like),
    "isdtype": np.isdtype if hasattr(np, "isdtype") else None,
}


class AutogradNamespace:
    """Module-like object: array-API names first, then everything in ``autograd.numpy``."""

    __name__ = "secondorder.backends._autograd_namespace"

    def __getattr__(self, name: str) -> Any:
        if name in _RENAMED:
            return _RENAMED[name]
        return getattr(anp, name)


namespace = AutogradNamespace()
