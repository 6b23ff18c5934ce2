"""The protocol every backend implements, with the defaults that suit eager frameworks.

A backend bundles three things for one array framework:

* ``xp``: an array namespace that follows the Python array API standard. Core code writes
  ``xp.matmul``, ``xp.tensordot``, ``xp.linalg.eigh``, ... and nothing framework-specific.
* the autodiff protocol: ``jvp``, ``vjp``, ``linearize``, ``grad``, ``value_and_grad``, ``hvp``.
  Functions are differentiated with respect to one argument, which may be a parameter tree
  (tuple, list or dict of arrays, any JAX pytree; see :mod:`secondorder.tree`). ``vjp``,
  ``grad`` and ``value_and_grad`` take ``has_aux`` (JAX's convention): ``f`` returns
  ``(value, aux)`` and ``aux`` (e.g. BatchNorm running statistics) comes back undifferentiated.
* transformations: ``vmap`` (a Python loop and a stack where the framework has none) and ``jit``
  (the identity where the framework has none; ``has_jit`` says which);
* what the standard lacks: control flow that compiles (``fori_loop``, ``while_loop``, ``cond``),
  ``einsum``, Cholesky and triangular solves, an ``eigh`` that retries in float64, conversion to
  NumPy and device/dtype helpers, ``synchronize`` (wait for queued device work, for timing);
* ``mean_reduce``: the one point where batch means are reduced across data-parallel processes
  (the identity on one process).

Eager backends inherit Python-loop control flow from this class; JAX overrides it with ``lax``.
Capabilities that make a method choose one algorithm over another are declared as class
variables (``has_jit``, ``subspace_route``), so that no code outside ``backends/`` branches on a
backend's name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from .._pytree import flatten, unflatten
from ..errors import (
    AutodiffUnavailableError,
    DTypeError,
    NotPositiveDefiniteError,
    ShapeError,
    StructureError,
)

Array = Any
Tree = Any

FLOAT_NAMES = ("float32", "float64")


class Backend(ABC):
    """Base class: one subclass per framework, which names itself with ``name``."""

    name: ClassVar[str] = ""
    has_autodiff: ClassVar[bool] = True
    #: ``jit`` compiles (JAX); elsewhere it returns the function unchanged
    has_jit: ClassVar[bool] = False
    supports_cpu: ClassVar[bool] = True
    supports_gpu: ClassVar[bool] = False
    #: the faster way to take derivatives of f restricted to a low-dimensional subspace
    #: theta + V eta (GroupedNewton's summaries V^T grad f, V^T H V, D^3 f[u_s, u_s, u_s]):
    #: ``"phi"`` differentiates phi(eta) = f(theta + V eta) in eta; ``"theta"`` runs S
    #: jvp-of-hvp passes in parameter space. Measured per framework: theta is 1.5x faster on
    #: torch.func, phi on autograd and JAX.
    subspace_route: ClassVar[str] = "phi"
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

    def host_scalar(self, x: Array) -> Any:
        """The value of the 0-d array ``x`` as a NumPy scalar of its dtype, where reading it is a
        cheap copy from host memory that synchronises nothing (eager NumPy, CPU torch); None
        where it is not (traced values, arrays inside a transform, device arrays). NumPy
        scalar arithmetic rounds in that dtype, so host code can branch on the numbers an
        eager loop computes and get the decisions the array code would (CG's guards)."""
        return None

    def host_arrays(self, *xs: Array) -> list[np.ndarray] | None:
        """NumPy views of the arrays ``xs`` where they sit in host memory outside every
        transform (eager CPU torch), so that a long chain of tiny integer operations (a
        Threefry key split) can run in NumPy instead of as one framework call each; None
        elsewhere (traced values, device arrays, and backends whose own calls are cheap)."""
        return None

    def devices(self) -> list[str]:
        """Names of the devices this backend can place arrays on."""
        return ["cpu"]

    def device_from_name(self, name: str) -> Any:
        """What ``asarray(..., device=...)`` takes for a device name from :meth:`devices` such
        as ``"cuda:0"`` (the name itself, except where the framework wants a device object)."""
        return name

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

    def vjp(self, f: Callable, x: Tree, has_aux: bool = False) -> Any:
        """``(f(x), pullback)`` with ``pullback(u) = J_f(x)^T u`` (reverse mode).

        With ``has_aux=True``, ``f`` returns ``(y, aux)``; the result is ``(y, pullback, aux)``
        and ``aux`` is not differentiated.
        """
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

    def grad(self, f: Callable, x: Tree, has_aux: bool = False) -> Any:
        """Gradient of a scalar function ``f`` at ``x``; ``(grad, aux)`` with ``has_aux``."""
        value, g = self.value_and_grad(f, x, has_aux=has_aux)
        return (g, value[1]) if has_aux else g

    def value_and_grad(self, f: Callable, x: Tree, has_aux: bool = False) -> Any:
        """``(f(x), grad f(x))`` for a scalar ``f``, from one reverse pass.

        With ``has_aux=True``, ``f`` returns ``(value, aux)`` and the result is
        ``((value, aux), grad value(x))``, as ``jax.value_and_grad(f, has_aux=True)``.
        """
        if has_aux:
            y, pullback, aux = self.vjp(f, x, has_aux=True)
            return (y, aux), pullback(self.xp.ones_like(y))
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

    # --------------------------------------------------------- transformations
    def vmap(self, f: Callable, in_axes: Any = 0, out_axes: Any = 0) -> Callable:
        """``f`` mapped over an axis of its arguments: ``vmap(f)(x)[i] = f(x[i])``.

        ``in_axes`` is an int or ``None`` (not mapped) for every positional argument, or a tuple
        with one int / ``None`` per argument; each argument may be a tree, all of whose leaves
        are mapped along that axis. ``out_axes`` is an int or ``None`` for every output leaf, or a
        tuple with one per element of a tuple output. This default is a Python loop over the
        mapped axis that stacks the results (what ``jax.vmap`` and ``torch.func.vmap`` compute).
        """

        def mapped(*args: Any) -> Any:
            axes = _per_argument(in_axes, len(args), "in_axes")
            sizes = {
                _axis_size(leaf, ax)
                for arg, ax in zip(args, axes) if ax is not None
                for leaf in flatten(arg)[0]
            }
            if not sizes:
                raise ShapeError(
                    "vmap needs at least one mapped argument: give an int (not None) in in_axes "
                    "for the argument(s) to map over"
                )
            if len(sizes) > 1:
                raise ShapeError(
                    f"vmap got mapped axes of different sizes {sorted(sizes)}: every mapped "
                    "argument must have the same size along its in_axes"
                )
            (size,) = sizes
            if size == 0:
                raise ShapeError(
                    f"vmap over an axis of size 0 on the {self.name} backend (a Python loop) "
                    "cannot infer the output shapes; pass at least one element"
                )
            results = [
                f(*(arg if ax is None else _take(arg, i, ax) for arg, ax in zip(args, axes)))
                for i in range(size)
            ]
            return _stack_results(self.xp, results, out_axes)

        return mapped

    def jit(self, f: Callable, **options: Any) -> Callable:
        """``f`` compiled where the framework compiles (``jax.jit(f, **options)``); ``f`` itself
        elsewhere (``has_jit`` is False), so ``backend.jit(step)`` is always safe to write."""
        return f

    def synchronize(self, x: Tree = None) -> Tree:
        """Wait until queued device work is done (for timing); returns ``x``.

        With ``x``, waits for the arrays of the tree ``x``; without, for all work queued on the
        framework's devices. A no-op for host arrays (NumPy, CPU torch).
        """
        return x

    def mean_reduce(self, x: Tree) -> Tree:
        """Average a per-process value over data-parallel processes: (1/R) sum_r m_r.

        The methods never call it. A data-parallel step (:mod:`secondorder.distributed`)
        reduces inside the network's derivatives instead: the parameters' cotangents are
        all-reduced where they enter the network and the per-sample outputs all-gathered where
        they leave it, so every batch mean of every method (loss, gradient, curvature products,
        CurveBall's 2x2 system, the dual Gauss-Newton system, Kronecker statistics) is the one
        of a single process on the whole batch. This is for a user's own per-rank numbers
        (metrics, a validation loss). The identity on one process and on backends without
        process groups; torch with an initialised ``torch.distributed`` group of R > 1 ranks
        averages over them; under JAX sharding a mean over a sharded axis is already global.
        """
        return x

    # ---------------------------------------------------------- fused network primitives
    # Each has a plain array-API definition here; a framework with a fused kernel overrides it
    # (one kernel forward and backward instead of several), with the same value to rounding.
    def linear(self, a: Array, w: Array, b: Array | None = None) -> Array:
        """a W^T + b, for a (..., in), W (out, in) and b (out,)."""
        out = a @ self.xp.matrix_transpose(w)
        return out if b is None else out + b

    def logsumexp(self, f: Array, axis: int = -1) -> Array:
        """log sum_j exp(f_j) along ``axis`` (kept as a size-1 axis), shifted by the maximum."""
        xp = self.xp
        shift = xp.max(f, axis=axis, keepdims=True)
        return xp.log(xp.sum(xp.exp(f - shift), axis=axis, keepdims=True)) + shift

    def add_into(self, x_leaves: list[Array], y_leaves: list[Array]) -> bool:
        """x_i += y_i in place for every pair, where the framework has mutable arrays and these
        may be written (eager, not watched by autodiff); True when done, False (nothing
        written) otherwise. The default writes nothing: JAX arrays are immutable, and NumPy's
        parameters may be autograd boxes."""
        return False

    def adam(self, mu: list[Array], nu: list[Array], g: list[Array], b1: Any, b2: Any,
             c1: Array, c2: Array, eps: Any) -> tuple[list[Array], list[Array], list[Array]]:
        """Adam's moments and bias-corrected direction, leaf by leaf (Kingma & Ba 2015,
        Algorithm 1): m = b1 mu + (1 - b1) g, v = b2 nu + (1 - b2) g^2,
        d = (m / c1) / (sqrt(v / c2) + eps) with c_i = 1 - b_i^t. Returns the lists (d, m, v),
        new arrays (``mu`` and ``nu`` are not written)."""
        xp = self.xp
        m = [b1 * a + (1 - b1) * gi for a, gi in zip(mu, g)]
        v = [b2 * a + (1 - b2) * gi * gi for a, gi in zip(nu, g)]
        return [(mi / c1) / (xp.sqrt(vi / c2) + eps) for mi, vi in zip(m, v)], m, v

    def axpy(self, alpha: Any, x: Array, y: Array) -> Array:
        """alpha x + y for a scalar alpha (a Python number or a 0-d array)."""
        return alpha * x + y

    def dot(self, x: Array, y: Array) -> Array:
        """sum(x * y) over all entries, as a 0-d array."""
        return self.xp.sum(x * y)

    def where(self, condition: Array, x: Any, y: Any) -> Array:
        """x where ``condition`` holds, else y, for x and y of one dtype (or Python numbers):
        the namespace's ``where`` without its promotion fix-ups, which on 0-d arrays cost more
        than the selection (CG's scalar bookkeeping runs a dozen per iteration)."""
        return self.xp.where(condition, x, y)

    def label_cross_entropy(self, f: Array, labels: Array) -> Array:
        """logsumexp(f_i) - f_i[labels_i] for every row i: softmax cross-entropy per sample at
        integer class labels (a framework's fused kernel where it has one)."""
        return self.logsumexp(f, axis=1)[:, 0] - self.take_labels(f, labels)

    def take_labels(self, f: Array, labels: Array) -> Array:
        """f[i, labels[i]] for every row i: the entries of integer class labels."""
        xp = self.xp
        classes = xp.arange(f.shape[1], device=self.device(f))
        onehot = xp.astype(labels[:, None] == classes[None, :], f.dtype)
        return xp.sum(f * onehot, axis=1)

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

    def cholesky_inverse(self, factor: Array) -> Array:
        """``(L L^T)^{-1}`` given the lower Cholesky factor ``L``."""
        n = factor.shape[-1]
        return self.cholesky_solve(factor, self.xp.eye(n, dtype=factor.dtype,
                                                        device=self.device(factor)))

    def _eigh(self, a: Array) -> tuple[Array, Array]:
        w, q = self.xp.linalg.eigh(a)
        return w, q

    def eigh(self, a: Array) -> tuple[Array, Array]:
        """Eigenvalues (ascending) and eigenvectors of a symmetric matrix.

        When the float32 factorisation fails (an exception, or non-finite output), it is repeated
        in float64 and the result cast back to the input dtype. Half-precision input (bfloat16,
        float16, which the frameworks' eigh does not take) is factorised as float32.
        """
        xp = self.xp
        if xp.finfo(a.dtype).bits < 32:
            w, q = self.eigh(xp.astype(a, xp.float32))
            return xp.astype(w, a.dtype), xp.astype(q, a.dtype)
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


# ------------------------------------------------------------------ vmap as a Python loop
def _per_argument(axes: Any, n: int, what: str) -> tuple[Any, ...]:
    """An int / None for every one of ``n`` arguments (or outputs) from ``axes``."""
    if isinstance(axes, tuple | list):
        if len(axes) != n:
            raise StructureError(
                f"{what} has {len(axes)} entries for {n} arguments: give one int or None per "
                "argument, or a single int / None for all"
            )
        out = tuple(axes)
    else:
        out = (axes,) * n
    for ax in out:
        if ax is not None and not isinstance(ax, int):
            raise StructureError(f"{what} entries must be int or None, got {ax!r}")
    return out


def _axis_size(leaf: Any, axis: int) -> int:
    ndim = len(leaf.shape)
    if not -ndim <= axis < ndim:
        raise ShapeError(
            f"vmap in_axes={axis} is out of range for an argument of shape {tuple(leaf.shape)}"
        )
    return int(leaf.shape[axis])


def _take(tree: Tree, i: int, axis: int) -> Tree:
    """Entry ``i`` along ``axis`` of every leaf of ``tree`` (the axis removed)."""
    leaves, treedef = flatten(tree)
    out = []
    for leaf in leaves:
        ax = axis % len(leaf.shape)
        out.append(leaf[(slice(None),) * ax + (i, ...)])
    return unflatten(treedef, out)


def _stack_results(xp: Any, results: list[Any], out_axes: Any) -> Any:
    """Stack per-element results leaf by leaf along ``out_axes`` (``None``: not mapped)."""
    if isinstance(out_axes, tuple | list):
        if not isinstance(results[0], tuple) or len(results[0]) != len(out_axes):
            raise StructureError(
                f"out_axes has {len(out_axes)} entries but the function returns "
                f"{type(results[0]).__name__}; give one per element of a tuple output"
            )
        return tuple(
            _stack_results(xp, [r[k] for r in results], ax) for k, ax in enumerate(out_axes)
        )
    if out_axes is None:
        return results[0]
    flat = [flatten(r) for r in results]
    treedef = flat[0][1]
    stacked = [
        xp.stack([leaves[k] for leaves, _ in flat], axis=out_axes)
        for k in range(treedef.num_leaves)
    ]
    return unflatten(treedef, stacked)
