"""The torch backend's array namespace: ``array_api_compat.torch`` with its most called
two-argument functions sent straight to torch when that is already the standard's result.

array_api_compat wraps ``where``, ``maximum``, ``minimum``, ``logical_and`` and ``logical_or``
to apply the array API's type promotion to Python scalars and to tensors of two dtypes (torch
lets a 0-d tensor take the other operand's dtype; the standard does not). That fix-up is Python
work, 5 to 12 us a call on this project's CPU, more than the kernel on the 0-d and small arrays
of a step's bookkeeping (CurveBall's 2x2 solve, the finiteness guard, CG's scalars). When both
operands are plain tensors of one dtype there is nothing to promote, and the wrapper's answer is
torch's own call; those calls go to torch directly, everything else (Python scalars, mixed
dtypes, tensor subclasses) to array_api_compat as before. ``all`` and ``any`` without ``axis``
on a bool tensor are torch's too (the wrapper only adds ``keepdims`` and a cast to bool).

Every other name is array_api_compat's (the module's attributes are copied, so look-ups cost
what they cost on the module).
"""

from __future__ import annotations

import types
from typing import Any

import array_api_compat.torch as _compat
import torch

_Tensor = torch.Tensor
_bool = torch.bool


def _direct(two_arg: Any, compat: Any) -> Any:
    """``two_arg(x1, x2)`` for two plain tensors of one dtype, else ``compat(x1, x2)``."""

    def call(x1: Any, x2: Any, /) -> Any:
        if type(x1) is _Tensor and type(x2) is _Tensor and x1.dtype == x2.dtype:
            return two_arg(x1, x2)
        return compat(x1, x2)

    call.__name__ = call.__qualname__ = compat.__name__
    call.__doc__ = compat.__doc__
    return call


def where(condition: Any, x1: Any, x2: Any, /) -> Any:
    """The array API's ``where``: ``torch.where`` directly for two tensors of one dtype."""
    if type(x1) is _Tensor and type(x2) is _Tensor and x1.dtype == x2.dtype:
        return torch.where(condition, x1, x2)
    return _compat.where(condition, x1, x2)


def _reduction(torch_fn: Any, compat: Any) -> Any:
    """``torch_fn(x)`` for a bool tensor reduced over every axis, else ``compat``."""

    def call(x: Any, /, *, axis: Any = None, keepdims: bool = False) -> Any:
        if axis is None and not keepdims and type(x) is _Tensor and x.dtype == _bool:
            return torch_fn(x)
        return compat(x, axis=axis, keepdims=keepdims)

    call.__name__ = call.__qualname__ = compat.__name__
    call.__doc__ = compat.__doc__
    return call


namespace = types.ModuleType("secondorder.backends.torch_namespace", __doc__)
namespace.__dict__.update({k: v for k, v in vars(_compat).items()
                           if not k.startswith("__") or k == "__all__"})
namespace.where = where
namespace.maximum = _direct(torch.maximum, _compat.maximum)
namespace.minimum = _direct(torch.minimum, _compat.minimum)
namespace.logical_and = _direct(torch.logical_and, _compat.logical_and)
namespace.logical_or = _direct(torch.logical_or, _compat.logical_or)
namespace.all = _reduction(torch.all, _compat.all)
namespace.any = _reduction(torch.any, _compat.any)
