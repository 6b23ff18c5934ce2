"""CuPy backend: arrays and linear algebra on an NVIDIA GPU.

CuPy has no automatic differentiation. This backend differentiates by handing the arrays to
``torch.func`` on the same CUDA device through DLPack (zero copy), running the transform there and
handing the results back. The function being differentiated must therefore be written against the
namespace of its argument (``xp = secondorder.backends.namespace(x)``), as all of the library's
models and losses are; a function that calls ``cupy`` directly cannot be differentiated, and one
that closes over CuPy arrays raises MixedBackendError. An optimiser's ``init`` and ``step``
differentiate closures of the batch, so on CuPy parameters they hand all their arrays to torch
and run there (:mod:`secondorder.backends.bridge`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, ClassVar

import cupy
import numpy as np

from .._pytree import flatten, tree_map
from ..errors import BackendUnavailableError
from . import get
from ._base import Array, Backend, Tree
from .bridge import first_array, mixing_named


def _to_torch(tree: Tree) -> Tree:
    import torch

    return tree_map(lambda a: torch.from_dlpack(a) if isinstance(a, cupy.ndarray) else a, tree)


def _to_cupy(tree: Tree) -> Tree:
    import torch

    def convert(a: Any) -> Any:
        return cupy.from_dlpack(a.detach().contiguous()) if isinstance(a, torch.Tensor) else a

    return tree_map(convert, tree)


def _nested(x: Tree) -> bool:
    """Whether ``x`` holds torch tensors rather than CuPy arrays: a derivative taken inside one
    of this backend's (an HVP inside a JVP), which runs on torch; it stays there, so that the
    outer one can differentiate through it."""
    import torch

    return isinstance(first_array(x), torch.Tensor)


def _closures_named() -> AbstractContextManager[None]:
    """A CuPy array met inside a derivative, as a named error (:func:`bridge.mixing_named`)."""
    return mixing_named("on the cupy backend derivatives run on torch (an optimiser's init and "
                        "step hand all their arrays there), and the function being "
                        "differentiated")


class CupyBackend(Backend):
    name: ClassVar[str] = "cupy"
    supports_cpu: ClassVar[bool] = False
    supports_gpu: ClassVar[bool] = True
    subspace_route: ClassVar[str] = "theta"  # its autodiff is torch.func's
    note: ClassVar[str] = "torch.func on the same device, arrays handed over by DLPack"

    def __init__(self) -> None:
        if not cupy.cuda.is_available():
            raise BackendUnavailableError(
                "the cupy backend needs a CUDA device and none was found; use numpy, torch or "
                "jax on this machine"
            )

    @property
    def xp(self) -> Any:
        import array_api_compat.cupy as xp

        return xp

    def is_array(self, x: Any) -> bool:
        return isinstance(x, cupy.ndarray)

    def asarray(self, x: Any, dtype: Any = None, device: Any = None) -> Array:
        dtype = None if dtype is None else self.dtype(dtype)
        if device is None:
            return cupy.asarray(x, dtype=dtype)
        with cupy.cuda.Device(getattr(device, "id", device)):
            return cupy.asarray(x, dtype=dtype)

    def to_numpy(self, x: Array) -> np.ndarray:
        return cupy.asnumpy(x)

    def device(self, x: Array) -> Any:
        return x.device

    def devices(self) -> list[str]:
        return [f"cuda:{i}" for i in range(cupy.cuda.runtime.getDeviceCount())]

    # -- autodiff through torch.func --------------------------------------------------------
    @staticmethod
    def _torch_backend() -> Backend:
        try:
            return get("torch")  # cached by the registry
        except BackendUnavailableError as err:  # torch is not installed
            raise BackendUnavailableError(
                "autodiff on the cupy backend runs through torch.func: install a CUDA build of "
                "torch (pip install -r backends/torch.txt)"
            ) from err

    def jvp(self, f: Callable, x: Tree, v: Tree) -> tuple[Tree, Tree]:
        if _nested(x):
            return self._torch_backend().jvp(f, x, v)
        with _closures_named():
            y, dy = self._torch_backend().jvp(f, _to_torch(x), _to_torch(v))
        return _to_cupy(y), _to_cupy(dy)

    def vjp(self, f: Callable, x: Tree, has_aux: bool = False) -> Any:
        if _nested(x):
            return self._torch_backend().vjp(f, x, has_aux=has_aux)
        with _closures_named():
            result = self._torch_backend().vjp(f, _to_torch(x), has_aux=has_aux)
        y, pullback = result[0], result[1]
        back = (_to_cupy(y), lambda u: _to_cupy(pullback(_to_torch(u))))
        return (*back, _to_cupy(result[2])) if has_aux else back

    def linearize(self, f: Callable, x: Tree) -> tuple[Tree, Callable[[Tree], Tree]]:
        if _nested(x):
            return self._torch_backend().linearize(f, x)
        with _closures_named():
            y, jvp_fn = self._torch_backend().linearize(f, _to_torch(x))
        return _to_cupy(y), lambda v: _to_cupy(jvp_fn(_to_torch(v)))

    def value_and_grad(self, f: Callable, x: Tree, has_aux: bool = False) -> Any:
        if _nested(x):
            return self._torch_backend().value_and_grad(f, x, has_aux=has_aux)
        with _closures_named():
            y, g = self._torch_backend().value_and_grad(f, _to_torch(x), has_aux=has_aux)
        return _to_cupy(y), _to_cupy(g)

    def hvp(self, f: Callable, x: Tree, v: Tree) -> Tree:
        if _nested(x):
            return self._torch_backend().hvp(f, x, v)
        with _closures_named():
            return _to_cupy(self._torch_backend().hvp(f, _to_torch(x), _to_torch(v)))

    def synchronize(self, x: Tree = None) -> Tree:
        """Wait for the current CUDA device (the device of ``x``'s arrays when given)."""
        device = None
        if x is not None:
            device = next((leaf.device for leaf in flatten(x)[0]
                           if isinstance(leaf, cupy.ndarray)), None)
        (device or cupy.cuda.Device()).synchronize()
        return x

    # -- linear algebra -------------------------------------------------------------------
    def einsum(self, subscripts: str, *operands: Array) -> Array:
        return cupy.einsum(subscripts, *operands)

    def cholesky(self, a: Array) -> Array:
        factor = cupy.linalg.cholesky(a)
        if not bool(cupy.all(cupy.isfinite(factor))):
            raise self._not_positive_definite()
        return factor

    def solve_triangular(self, a: Array, b: Array, *, lower: bool = True) -> Array:
        from cupyx.scipy.linalg import solve_triangular

        return solve_triangular(a, b, lower=lower)
