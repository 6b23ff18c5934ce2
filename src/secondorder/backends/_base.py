"""The protocol every backend implements, with the defaults that suit eager frameworks.

A backend bundles three things for one array framework:

* ``xp``: an array namespace that follows the Python array API standard. Core code writes
  ``xp.matmul``, ``xp.tensordot``, ``xp.linalg.eigh``, ... and nothing framework-specific.
* the autodiff protocol: ``jvp``, ``vjp``, ``linearize``, ``grad``, ``value_and_grad``, ``hvp``.
  Functions are differentiated with respect to one argument, which may be a parameter tree
  (tuple, list or dict of arrays; see :mod:`secondorder.tree`).
* what the standard lacks: control flow that compiles (``fori_loop``, ``while_loop``, ``cond``),
  ``einsum``, Cholesky and triangular solves, an ``eigh`` that retries in float64, conversion to
  NumPy and device/dtype helpers.

Eager backends inherit Python-loop control flow from this class; JAX overrides it with ``lax``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from ..errors import AutodiffUnavailableError, DTypeError, NotPositiveDefiniteError

Array = Any
Tree = Any

FLOAT_NAMES = ("float32", "float64")


class Backend(ABC):
    """Base class: one subclass per framework, which names itself with ``name``."""

    name: ClassVar[str] = ""
    has_autodiff: ClassVar[bool] = True
    has_jit: ClassVar[bool] = False
    supports_cpu: ClassVar[bool] = True
    supports_gpu: ClassVar[bool] = False
    note: ClassVar[str] = ""

    def __repr__(self) -> str:
        return f"<secondorder backend {self.name!r}>"

    # ------------------------------------------------------------------ arrays
    @property
    @abstractmethod
    def xp(self) -> Any:
        """The array-API namespace of this backend."""

    @abstractmethod
    def is_array(self, x: Any) -> bool:
        """True for an array (or autodiff tracer) of this framework."""

    def asarray(self, x: Any, dtype: Any = None, device: Any = None) -> Array:
        """Convert ``x`` (NumPy array, Python scalar or list) to this backend's array type."""
        kwargs = {} if device is None else {"device": device}
        if dtype is not None:
            dtype = self.dtype(dtype)
        return self.xp.asarray(x, dtype=dtype, **kwargs)

    def to_numpy(self, x: Array) -> np.ndarray:
        """A NumPy copy of ``x`` (host memory)."""
        return np.asarray(x)

    def is_concrete(self, x: Array) -> bool:
        """False for an abstract value inside a transformation (a JAX tracer, a functorch
        wrapper): its entries cannot be inspected, so value checks are skipped there."""
        return True

    def device(self, x: Array) -> Any:
        """The device ``x`` lives on (``"cpu"`` for host-only frameworks)."""
        return "cpu"

    def devices(self) -> list[str]:
        """Names of the devices this backend can place arrays on."""
        return ["cpu"]

    def dtype(self, name: Any) -> Any:
        """The dtype object for ``"float32"`` / ``"float64"`` (a dtype is returned as is)."""
        if isinstance(name, str):
            if name not in FLOAT_NAMES:
                raise DTypeError(
                    f"unsupported dtype {name!r}: secondorder works in {' or '.join(FLOAT_NAMES)}"
                )
            return getattr(self.xp, name)
        return name

    def dtype_name(self, dtype: Any) -> str:
        """``"float32"`` or ``"float64"`` for a floating dtype of this backend."""
        for name in FLOAT_NAMES:
            if dtype == getattr(self.xp, name):
                return name
        return str(dtype)

    def supports_float64(self) -> bool:
        return True

    @property
    def random(self) -> Any:
        """Counter-based random numbers on this backend (:class:`secondorder.random.Random`):
        ``backend.random.key(seed)``, then ``split``, ``uniform``, ``normal``, ... of that key.
        The same bits on every backend, and traced (new noise per step) under ``jax.jit``."""
        from ..random import Random  # the module sits above the backends layer

        return Random(self)

    # ---------------------------------------------------------------- autodiff
    def _no_autodiff(self, what: str) -> AutodiffUnavailableError:
        return AutodiffUnavailableError(
            f"backend {self.name!r} has no automatic differentiation, so {what}() is not "
            "available; use the numpy, torch or jax backend for anything that differentiates."
        )

    def jvp(self, f: Callable, x: Tree, v: Tree) -> tuple[Tree, Tree]:
        """``(f(x), J_f(x) v)``: a Jacobian-vector product (forward mode)."""
        raise self._no_autodiff("jvp")

    def vjp(self, f: Callable, x: Tree) -> tuple[Tree, Callable[[Tree], Tree]]:
        """``(f(x), pullback)`` with ``pullback(u) = J_f(x)^T u`` (reverse mode)."""
        raise self._no_autodiff("vjp")

    def linearize(self, f: Callable, x: Tree) -> tuple[Tree, Callable[[Tree], Tree]]:
        """``(f(x), v -> J_f(x) v)``; the default re-runs a JVP per call."""
        y = f(x)

        def jvp_fn(v: Tree) -> Tree:
            return self.jvp(f, x, v)[1]

        return y, jvp_fn

    def linearize_vjp(
        self, f: Callable, x: Tree
    ) -> tuple[Tree, Callable[[Tree], Tree], Callable[[Tree], Tree]]:
        """``(f(x), v -> J v, u -> J^T u)``: one linearisation for repeated products.

        The default keeps the VJP's saved forward pass and runs a JVP per product, which is what
        hand-written code does in eager frameworks; JAX overrides it with ``jax.linearize`` and
        its transpose.
        """
        y, pullback = self.vjp(f, x)

        def jvp_fn(v: Tree) -> Tree:
            return self.jvp(f, x, v)[1]

        return y, jvp_fn, pullback

    def grad(self, f: Callable, x: Tree) -> Tree:
        """Gradient of a scalar function ``f`` at ``x``."""
        return self.value_and_grad(f, x)[1]

    def value_and_grad(self, f: Callable, x: Tree) -> tuple[Array, Tree]:
        """``(f(x), grad f(x))`` for a scalar ``f``, from one reverse pass."""
        y, pullback = self.vjp(f, x)
        return y, pullback(self.xp.ones_like(y))

    def hvp(self, f: Callable, x: Tree, v: Tree) -> Tree:
        """Hessian-vector product ``H_f(x) v`` of a scalar ``f`` (forward over reverse)."""
        return self.jvp(lambda z: self.grad(f, z), x, v)[1]

    # ------------------------------------------------------------ control flow
    def fori_loop(self, lower: int, upper: int, body: Callable, init: Any) -> Any:
        """``for i in range(lower, upper): state = body(i, state)``."""
        state = init
        for i in range(int(lower), int(upper)):
            state = body(i, state)
        return state

    def while_loop(self, cond_fn: Callable, body: Callable, init: Any) -> Any:
        """``while cond_fn(state): state = body(state)``."""
        state = init
        while bool(cond_fn(state)):
            state = body(state)
        return state

    def cond(self, pred: Any, true_fn: Callable, false_fn: Callable, *operands: Any) -> Any:
        """``true_fn(*operands) if pred else false_fn(*operands)``."""
        return true_fn(*operands) if bool(pred) else false_fn(*operands)

    # ---------------------------------------------------------- linear algebra
    @abstractmethod
    def einsum(self, subscripts: str, *operands: Array) -> Array:
        """Einstein summation (not in the array API standard)."""

    def cholesky(self, a: Array) -> Array:
        """Lower Cholesky factor of a symmetric positive definite matrix.

        Raises :class:`NotPositiveDefiniteError` when the factorisation fails (NaN on backends
        that do not raise), outside of a JAX trace.
        """
        try:
            factor = self.xp.linalg.cholesky(a)
        except Exception as err:  # each framework has its own LinAlgError
            raise self._not_positive_definite() from err
        return factor

    def _not_positive_definite(self) -> NotPositiveDefiniteError:
        """The error a failed Cholesky factorisation raises, on every backend."""
        return NotPositiveDefiniteError(
            "Cholesky factorisation failed: the matrix is not positive definite. Add "
            "damping (a multiple of the identity) or check the curvature estimate."
        )

    def solve_triangular(self, a: Array, b: Array, *, lower: bool = True) -> Array:
        """Solve ``a x = b`` with ``a`` triangular (``b`` a vector or a matrix of columns)."""
        if b.ndim == 1:
            return self.xp.linalg.solve(a, b[:, None])[:, 0]
        return self.xp.linalg.solve(a, b)

    def cholesky_solve(self, factor: Array, b: Array) -> Array:
        """Solve ``(L L^T) x = b`` given the lower Cholesky factor ``L``."""
        y = self.solve_triangular(factor, b, lower=True)
        return self.solve_triangular(self.xp.linalg.matrix_transpose(factor), y, lower=False)

    def _eigh(self, a: Array) -> tuple[Array, Array]:
        w, q = self.xp.linalg.eigh(a)
        return w, q

    def eigh(self, a: Array) -> tuple[Array, Array]:
        """Eigenvalues (ascending) and eigenvectors of a symmetric matrix.

        When the float32 factorisation fails (an exception, or non-finite output), it is repeated
        in float64 and the result cast back to the input dtype.
        """
        xp = self.xp
        try:
            w, q = self._eigh(a)
            ok = bool(xp.all(xp.isfinite(w)))
        except Exception:
            ok = False
        if ok:
            return w, q
        if a.dtype == xp.float64 or not self.supports_float64():
            w, q = self._eigh(a)  # let the framework's own error surface
            return w, q
        w, q = self._eigh(xp.astype(a, xp.float64))
        return xp.astype(w, a.dtype), xp.astype(q, a.dtype)
