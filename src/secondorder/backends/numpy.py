"""NumPy backend: arrays on the host, automatic differentiation by HIPS ``autograd``.

Autograd traces calls made through ``autograd.numpy``, so the namespace ``xp`` of this backend is
:mod:`secondorder.backends._autograd_namespace`, an array-API view of ``autograd.numpy``. Code
that gets its namespace from :func:`secondorder.backends.namespace` is therefore differentiable
here exactly as on torch and jax. Parameter trees are passed to autograd as a tuple of leaves and
rebuilt inside the traced function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from .._pytree import LEAF, TreeDef, flatten, tree_map, unflatten
from ..errors import AutodiffUnavailableError, StructureError
from ._base import Array, Backend, Tree


def _traced(f: Callable, treedef: TreeDef, out: dict, has_aux: bool = False) -> Callable:
    """``f`` as a function of a tuple of leaves, returning one array or an autograd tuple; with
    ``has_aux``, ``f`` returns ``(y, aux)`` and ``aux`` (unboxed) is kept in ``out["aux"]``."""
    from autograd.builtins import tuple as ag_tuple

    def g(leaves: Any) -> Any:
        y = f(unflatten(treedef, [leaves[i] for i in range(treedef.num_leaves)]))
        if has_aux:
            from autograd.tracer import getval

            y, aux = _split_aux(y)
            out["aux"] = tree_map(getval, aux)
        y_leaves, out["treedef"] = flatten(y)
        return y_leaves[0] if out["treedef"] is LEAF else ag_tuple(y_leaves)

    return g


def _split_aux(result: Any) -> tuple[Any, Any]:
    if not isinstance(result, tuple) or len(result) != 2:
        raise StructureError(
            "with has_aux=True the function must return a pair (value, aux); got "
            f"{type(result).__name__}"
        )
    return result


def _pack(tree: Tree) -> Any:
    leaves, treedef = flatten(tree)
    return leaves[0] if treedef is LEAF else tuple(leaves)


def _unpack(treedef: TreeDef, value: Any) -> Tree:
    return value if treedef is LEAF else unflatten(treedef, list(value))


class NumpyBackend(Backend):
    name: ClassVar[str] = "numpy"
    note: ClassVar[str] = "HIPS autograd (forward mode by make_jvp)"

    def __init__(self) -> None:
        try:
            from ._autograd_namespace import namespace
        except ImportError:  # plain NumPy: linear algebra works, differentiation does not
            import array_api_compat.numpy as namespace

            self.has_autodiff = False
            self.note = "no autodiff: pip install autograd (backends/numpy.txt)"
        self._xp = namespace

    @property
    def xp(self) -> Any:
        return self._xp

    def _require_autograd(self, what: str) -> None:
        if not self.has_autodiff:
            raise AutodiffUnavailableError(
                f"{what}() on the numpy backend needs the autograd package: "
                "pip install -r backends/numpy.txt"
            )

    def is_array(self, x: Any) -> bool:
        if isinstance(x, np.ndarray | np.generic):
            return True
        return type(x).__module__.startswith("autograd")

    def asarray(self, x: Any, dtype: Any = None, device: Any = None) -> Array:
        return np.asarray(x, dtype=None if dtype is None else self.dtype(dtype))

    def to_numpy(self, x: Array) -> np.ndarray:
        return np.asarray(getattr(x, "_value", x))

    def host_scalar(self, x: Array) -> Any:
        while not isinstance(x, np.ndarray | np.generic | float | int):  # autograd boxes
            x = x._value
        return np.asarray(x)[()]

    # -- autodiff: a tree becomes a tuple of leaves for autograd ----------------------------
    def vjp(self, f: Callable, x: Tree, has_aux: bool = False) -> Any:
        self._require_autograd("vjp")
        from autograd import make_vjp

        leaves, treedef = flatten(x)
        out: dict = {}
        vjp_fn, y = make_vjp(_traced(f, treedef, out, has_aux))(tuple(leaves))
        out_def = out["treedef"]

        def pullback(u: Tree) -> Tree:
            return unflatten(treedef, list(vjp_fn(_pack(u))))

        if has_aux:
            return _unpack(out_def, y), pullback, out["aux"]
        return _unpack(out_def, y), pullback

    def jvp(self, f: Callable, x: Tree, v: Tree) -> tuple[Tree, Tree]:
        self._require_autograd("jvp")
        from autograd import make_jvp

        leaves, treedef = flatten(x)
        v_leaves, v_def = flatten(v)
        if v_def != treedef:
            raise StructureError(f"tangent structure {v_def!r} does not match {treedef!r}")
        out: dict = {}
        y, dy = make_jvp(_traced(f, treedef, out))(tuple(leaves))(tuple(v_leaves))
        out_def = out["treedef"]
        return _unpack(out_def, y), _unpack(out_def, dy)

    def hvp(self, f: Callable, x: Tree, v: Tree) -> Tree:
        try:
            return super().hvp(f, x, v)
        except NotImplementedError:
            # a primitive without a forward rule: reverse over reverse, d/dx <grad f(x), v>
            from ..tree import vdot

            return self.grad(lambda z: vdot(self.grad(f, z), v), x)

    # -- linear algebra ------------------------------------------------------------------
    def einsum(self, subscripts: str, *operands: Array) -> Array:
        return self.xp.einsum(subscripts, *operands)
