"""The warning a dense method gives before it forms a p x p matrix too large for a network.

Newton and Levenberg-Marquardt form the p x p Hessian or Gauss-Newton matrix at every step and
factor it (memory p^2, time O(p^3), and p curvature-vector products to build it); BFGS keeps a
p x p inverse in its state. For p = 20,000 parameters that is 1.5 GiB in float32 per matrix and
minutes per step; already at p = 12,000 (a small Transformer, 0.6 GiB) a Newton step takes
minutes on a CPU. Either looks like a hang to someone who passed a network. Their ``init``
calls :func:`warn_if_too_large`, which emits :class:`~secondorder.errors.DenseSizeWarning`
naming the size and the matrix-free or Kronecker-factored methods to use instead: when the
matrix exceeds :data:`DENSE_WARNING_BYTES`, or, for the methods that factor it, when p exceeds
:data:`DENSE_WARNING_PARAMETERS`.
"""

from __future__ import annotations

import warnings
from typing import Any

from .._pytree import flatten
from .._stack import caller_level
from ..errors import DenseSizeWarning
from ..tree import size

__all__ = ["DENSE_WARNING_BYTES", "DENSE_WARNING_PARAMETERS", "warn_if_too_large"]

#: bytes of one p x p matrix above which :func:`warn_if_too_large` warns (1 GiB); set it higher
#: (or filter :class:`~secondorder.errors.DenseSizeWarning`) to silence the warning
DENSE_WARNING_BYTES = 2**30
#: parameters above which a method that factors the p x p matrix at every step warns (4096:
#: p^3 = 7e10 flops and 4096 curvature-vector products a step, seconds to minutes on a CPU)
DENSE_WARNING_PARAMETERS = 4096


def warn_if_too_large(method: str, params: Any,
                      work: str = "factors it at every step, O(p^3) time", *,
                      factors: bool = True) -> None:
    """Warn with :class:`~secondorder.errors.DenseSizeWarning` when a p x p matrix of the
    parameters' dtype, p = the number of scalars in ``params``, exceeds
    :data:`DENSE_WARNING_BYTES`, or, for a method that ``factors`` it at every step (default
    True), when p exceeds :data:`DENSE_WARNING_PARAMETERS` (both read at call time); ``work``
    says what the method does with the matrix."""
    leaves = flatten(params)[0]
    if not leaves:
        return
    p = size(params)
    itemsize = getattr(leaves[0].dtype, "itemsize", 8)
    nbytes = p * p * itemsize
    if nbytes > DENSE_WARNING_BYTES or (factors and p > DENSE_WARNING_PARAMETERS):
        warnings.warn(
            f"{method} forms a dense {p} x {p} matrix ({nbytes / 2**30:.2g} GiB at "
            f"{itemsize} bytes an entry) and {work}"
            + (f" (about {p**3:.0e} flops and {p} curvature-vector products a step)"
               if factors else "")
            + ". For a network this size use a matrix-free method ('hessian-free', "
            "'curveball') or a Kronecker-factored one ('kfac', 'shampoo', 'kbfgs'); to keep "
            "this method, raise secondorder.optim.dense_size.DENSE_WARNING_BYTES and "
            "DENSE_WARNING_PARAMETERS or filter DenseSizeWarning.",
            DenseSizeWarning, stacklevel=caller_level())
