"""JAX backend: native autodiff, ``jax.jit`` compilation, ``lax`` control flow.

The namespace is ``jax.numpy`` (array API compliant). Inside a transformation (``jax.jit``,
``jax.vmap``, ``jax.grad``) loops and branches go through ``lax.fori_loop``, ``lax.while_loop``
and ``lax.cond`` so that CG, line searches and whole optimiser steps compile. Outside any
transformation (eager code) they run as Python loops and branches over eagerly dispatched
operations, as ``jax.disable_jit`` would run them: an eager ``lax`` loop traces and compiles its
body again at every call, because the body is a new closure each time (1.5 s per Hessian-free
CG solve on a small MLP), while eager operations reuse their compiled kernels.
float64 needs ``jax.config.update("jax_enable_x64", True)``, set by the user before arrays are made.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from .._pytree import TreeDef, flatten, unflatten
from ..errors import DTypeError
from ._base import Array, Backend, Tree


def _is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _tracing() -> bool:
    """Whether a JAX transformation (jit, vmap, grad, ...) is tracing the calling code."""
    return not _trace_state_clean()


try:
    from jax._src.core import trace_state_clean as _trace_state_clean
except ImportError:  # a JAX without this query: lax everywhere, as inside a trace (correct, slower)
    def _trace_state_clean() -> bool:
        return False


def structure(tree: Tree) -> TreeDef:
    return flatten(tree)[1]


def _recording(f: Callable, out: dict) -> Callable:
    """``f``, noting the structure (with dict key orders) of what it returns in ``out["def"]``."""

    def g(x: Tree) -> Any:
        y = f(x)
        out["def"] = structure(y)
        return y

    return g


def _restore(treedef: TreeDef, tree: Tree) -> Tree:
    """``tree`` (as JAX returns it, dicts sorted) with the dict key orders of ``treedef``."""
    if not treedef.custom_order:
        return tree
    return unflatten(treedef, flatten(tree)[0])


class JaxBackend(Backend):
    name: ClassVar[str] = "jax"
    has_jit: ClassVar[bool] = True
    supports_gpu: ClassVar[bool] = True
    note: ClassVar[str] = "native autodiff; float64 needs jax_enable_x64"

    @property
    def xp(self) -> Any:
        return jnp

    def is_array(self, x: Any) -> bool:
        return isinstance(x, jax.Array)

    def asarray(self, x: Any, dtype: Any = None, device: Any = None) -> Array:
        dtype = None if dtype is None else self.dtype(dtype)
        if isinstance(x, np.ndarray) and dtype is None and x.dtype == np.float64:
            dtype = self.dtype("float64")
        out = jnp.asarray(x, dtype=dtype)
        if _is_tracer(out):
            return out
        # committed to a device, like the outputs of a jitted step: a jitted function that sees
        # uncommitted arrays on one call and committed ones on the next compiles twice
        return jax.device_put(out, device if device is not None else jax.devices()[0])

    def dtype(self, name: Any) -> Any:
        if (name == "float64" or name is jnp.float64) and not self.supports_float64():
            raise DTypeError(
                "float64 on the jax backend needs x64 mode: call "
                "jax.config.update('jax_enable_x64', True) before creating arrays"
            )
        return super().dtype(name)

    def is_concrete(self, x: Array) -> bool:
        return not _is_tracer(x)

    def supports_float64(self) -> bool:
        return bool(jax.config.jax_enable_x64)

    def device(self, x: Array) -> Any:
        if _is_tracer(x):
            return None  # placement is decided by the enclosing transformation
        devices = x.devices()
        return next(iter(devices)) if len(devices) == 1 else tuple(sorted(map(str, devices)))

    def devices(self) -> list[str]:
        return [str(d) for d in jax.devices()]

    def device_from_name(self, name: str) -> Any:
        """The ``jax.Device`` for a name such as ``"cpu"``, ``"gpu:1"`` or ``"cuda:0"``."""
        platform, _, index = name.partition(":")
        return jax.devices(platform)[int(index or 0)]

    # -- autodiff -------------------------------------------------------------------------
    # JAX rebuilds every dict it returns in sorted key order; _restore gives the user's order
    # back (one flatten, at trace time under jax.jit), so trees keep their order end to end.
    def jvp(self, f: Callable, x: Tree, v: Tree) -> tuple[Tree, Tree]:
        out: dict = {}
        y, dy = jax.jvp(_recording(f, out), (x,), (v,))
        return _restore(out["def"], y), _restore(out["def"], dy)

    def vjp(self, f: Callable, x: Tree, has_aux: bool = False) -> Any:
        x_def = structure(x)
        out: dict = {}
        if has_aux:
            y, vjp_fn, aux = jax.vjp(_recording(f, out), x, has_aux=True)
            y, aux = _restore(out["def"], (y, aux))
        else:
            y, vjp_fn = jax.vjp(_recording(f, out), x)
            y = _restore(out["def"], y)

        def pullback(u: Tree) -> Tree:
            return _restore(x_def, vjp_fn(u)[0])

        return (y, pullback, aux) if has_aux else (y, pullback)

    def linearize(self, f: Callable, x: Tree) -> tuple[Tree, Callable[[Tree], Tree]]:
        out: dict = {}
        y, jvp_fn = jax.linearize(_recording(f, out), x)
        y_def = out["def"]
        if not y_def.custom_order:
            return y, jvp_fn
        return _restore(y_def, y), lambda v: _restore(y_def, jvp_fn(v))

    def linearize_vjp(
        self, f: Callable, x: Tree
    ) -> tuple[Tree, Callable[[Tree], Tree], Callable[[Tree], Tree]]:
        x_def = structure(x)
        y, jvp_fn = self.linearize(f, x)
        transpose = jax.linear_transpose(jvp_fn, x)

        def pullback(u: Tree) -> Tree:
            return _restore(x_def, transpose(u)[0])

        return y, jvp_fn, pullback

    def value_and_grad(self, f: Callable, x: Tree, has_aux: bool = False) -> Any:
        out: dict = {}
        value, g = jax.value_and_grad(_recording(f, out), has_aux=has_aux)(x)
        return _restore(out["def"], value), _restore(structure(x), g)

    def grad(self, f: Callable, x: Tree, has_aux: bool = False) -> Any:
        value, g = self.value_and_grad(f, x, has_aux=has_aux)
        return (g, value[1]) if has_aux else g

    # -- transformations ------------------------------------------------------------------
    def vmap(self, f: Callable, in_axes: Any = 0, out_axes: Any = 0) -> Callable:
        """``jax.vmap``."""
        if isinstance(in_axes, list):
            in_axes = tuple(in_axes)
        return jax.vmap(f, in_axes=in_axes, out_axes=out_axes)

    def jit(self, f: Callable, **options: Any) -> Callable:
        """``jax.jit(f, **options)``."""
        return jax.jit(f, **options)

    def synchronize(self, x: Tree = None) -> Tree:
        """``jax.block_until_ready`` on the arrays of ``x`` (on every live array when ``x`` is
        None); returns ``x``."""
        arrays = jax.live_arrays() if x is None else [
            leaf for leaf in flatten(x)[0] if isinstance(leaf, jax.Array)
        ]
        jax.block_until_ready(arrays)
        return x

    # -- control flow ---------------------------------------------------------------------
    def fori_loop(self, lower: int, upper: int, body: Callable, init: Any) -> Any:
        """``lax.fori_loop`` under a transformation; eagerly, a Python loop (module notes)."""
        if _tracing():
            return jax.lax.fori_loop(lower, upper, body, init)
        return super().fori_loop(lower, upper, body, init)

    def while_loop(self, cond_fn: Callable, body: Callable, init: Any) -> Any:
        """``lax.while_loop`` under a transformation; eagerly, a Python loop that reads the
        condition on the host at every iteration (module notes)."""
        if _tracing():
            return jax.lax.while_loop(cond_fn, body, init)
        return super().while_loop(cond_fn, body, init)

    def cond(self, pred: Any, true_fn: Callable, false_fn: Callable, *operands: Any) -> Any:
        """``lax.cond`` under a transformation; eagerly, a Python branch that runs only the
        chosen function (module notes)."""
        if _tracing():
            return jax.lax.cond(pred, true_fn, false_fn, *operands)
        return super().cond(pred, true_fn, false_fn, *operands)

    # -- fused network primitives ---------------------------------------------------------
    def logsumexp(self, f: Array, axis: int = -1) -> Array:
        return jax.nn.logsumexp(f, axis=axis, keepdims=True)

    def take_labels(self, f: Array, labels: Array) -> Array:
        return jnp.take_along_axis(f, labels[:, None], axis=1)[:, 0]

    # -- linear algebra -------------------------------------------------------------------
    def einsum(self, subscripts: str, *operands: Array) -> Array:
        return jnp.einsum(subscripts, *operands)

    def cholesky(self, a: Array) -> Array:
        factor = jnp.linalg.cholesky(a)
        if not _is_tracer(factor) and not bool(jnp.all(jnp.isfinite(factor))):
            raise self._not_positive_definite()
        return factor

    def solve_triangular(self, a: Array, b: Array, *, lower: bool = True) -> Array:
        return jax.scipy.linalg.solve_triangular(a, b, lower=lower)

    def cholesky_solve(self, factor: Array, b: Array) -> Array:
        return jax.scipy.linalg.cho_solve((factor, True), b)

    def eigh(self, a: Array) -> tuple[Array, Array]:
        if not _is_tracer(a):
            return super().eigh(a)
        if jnp.finfo(a.dtype).bits < 32:  # XLA has no half-precision eigh: float32, cast back
            w, q = self.eigh(a.astype(jnp.float32))
            return w.astype(a.dtype), q.astype(a.dtype)
        w, q = jnp.linalg.eigh(a)
        if a.dtype == jnp.float64 or not self.supports_float64():
            return w, q

        def retry(_: Any) -> tuple[Array, Array]:
            w64, q64 = jnp.linalg.eigh(a.astype(jnp.float64))
            return w64.astype(a.dtype), q64.astype(a.dtype)

        return jax.lax.cond(jnp.all(jnp.isfinite(w)), lambda _: (w, q), retry, None)
