"""PyTorch backend: ``torch.func`` for autodiff, CPU and CUDA devices.

The namespace is ``array_api_compat.torch``. ``jvp``, ``vjp``, ``grad`` and ``linearize`` are the
``torch.func`` transforms applied to a function of one (tree) argument; ``hvp`` is forward over
reverse (``jvp`` of ``grad``). Loops run in Python.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
import torch.func

from ._base import Array, Backend, Tree


class TorchBackend(Backend):
    name: ClassVar[str] = "torch"
    supports_gpu: ClassVar[bool] = True
    note: ClassVar[str] = "torch.func (jvp, vjp, linearize; hvp forward over reverse)"

    @property
    def xp(self) -> Any:
        import array_api_compat.torch as xp

        return xp

    def is_array(self, x: Any) -> bool:
        return isinstance(x, torch.Tensor)

    def asarray(self, x: Any, dtype: Any = None, device: Any = None) -> Array:
        dtype = None if dtype is None else self.dtype(dtype)
        return torch.as_tensor(x, dtype=dtype, device=device)

    def to_numpy(self, x: Array) -> np.ndarray:
        return x.detach().cpu().numpy()

    def is_concrete(self, x: Array) -> bool:
        return not torch._C._functorch.is_functorch_wrapped_tensor(x)

    def device(self, x: Array) -> Any:
        return x.device

    def devices(self) -> list[str]:
        names = ["cpu"]
        if torch.cuda.is_available():
            names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return names

    # -- autodiff -------------------------------------------------------------------------
    def jvp(self, f: Callable, x: Tree, v: Tree) -> tuple[Tree, Tree]:
        return torch.func.jvp(f, (x,), (v,))

    def vjp(self, f: Callable, x: Tree) -> tuple[Tree, Callable[[Tree], Tree]]:
        y, vjp_fn = torch.func.vjp(f, x)

        def pullback(u: Tree) -> Tree:
            return vjp_fn(u)[0]

        return y, pullback

    def linearize(self, f: Callable, x: Tree) -> tuple[Tree, Callable[[Tree], Tree]]:
        with warnings.catch_warnings():  # torch.fx's constant folding warns on closures
            warnings.simplefilter("ignore", UserWarning)
            return torch.func.linearize(f, x)

    def value_and_grad(self, f: Callable, x: Tree) -> tuple[Array, Tree]:
        g, y = torch.func.grad_and_value(f)(x)
        return y, g

    def grad(self, f: Callable, x: Tree) -> Tree:
        return torch.func.grad(f)(x)

    # -- linear algebra -------------------------------------------------------------------
    def einsum(self, subscripts: str, *operands: Array) -> Array:
        return torch.einsum(subscripts, *operands)

    def cholesky(self, a: Array) -> Array:
        factor, info = torch.linalg.cholesky_ex(a)
        if bool(torch.any(info != 0)):
            raise self._not_positive_definite()
        return factor

    def solve_triangular(self, a: Array, b: Array, *, lower: bool = True) -> Array:
        if b.ndim == 1:
            return torch.linalg.solve_triangular(a, b[:, None], upper=not lower)[:, 0]
        return torch.linalg.solve_triangular(a, b, upper=not lower)

    def cholesky_solve(self, factor: Array, b: Array) -> Array:
        if b.ndim == 1:
            return torch.cholesky_solve(b[:, None], factor)[:, 0]
        return torch.cholesky_solve(b, factor)
