"""``array_api_strict`` backend: the array API standard and nothing else, no autodiff.

It exists to prove that the linear-algebra layer (trees, operators, solvers, matrix functions) uses
only the standard. Autodiff calls raise :class:`~secondorder.errors.AutodiffUnavailableError`.
Triangular and Cholesky solves use the standard's general ``linalg.solve``; ``einsum``, which the
standard lacks and the core never calls, goes through NumPy for convenience.
"""

from __future__ import annotations

from typing import Any, ClassVar

import array_api_strict as xps
import numpy as np

from ._base import Array, Backend


class ArrayApiStrictBackend(Backend):
    name: ClassVar[str] = "array_api_strict"
    has_autodiff: ClassVar[bool] = False
    note: ClassVar[str] = "none (raises AutodiffUnavailableError)"

    @property
    def xp(self) -> Any:
        return xps

    def is_array(self, x: Any) -> bool:
        return type(x).__module__.startswith("array_api_strict")

    def to_numpy(self, x: Array) -> np.ndarray:
        return np.from_dlpack(x).copy() if hasattr(x, "__dlpack__") else np.asarray(x)

    def device(self, x: Array) -> Any:
        return x.device

    def einsum(self, subscripts: str, *operands: Array) -> Array:
        result = np.einsum(subscripts, *(self.to_numpy(a) for a in operands))
        return xps.asarray(result, device=operands[0].device)
