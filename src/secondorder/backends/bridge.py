"""Optimiser calls on CuPy arrays, run by torch over the same GPU memory.

CuPy has no automatic differentiation; the cupy backend differentiates a function by handing
its argument to ``torch.func`` through DLPack. A step differentiates closures of the batch
(``lambda p: loss(apply(p, x), y)``), whose ``x`` and ``y`` torch cannot take as CuPy arrays.
So a method's ``init`` and ``step`` on CuPy parameters (and the direction functions that take a
batch) hand every array they are given (the parameters, the state, the batch) to torch (zero
copy, same device), run there, and hand the results back: the same kernels a torch user of that
GPU gets, and CuPy arrays in and out. The curvature operators, which keep their batch, hold it
for their derivatives in torch's form (:func:`for_autodiff`).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .._pytree import flatten
from ..errors import MixedBackendError
from ._base import Backend


def first_array(tree: Any) -> Any:
    """The first leaf of ``tree`` that is an array (has a shape), or None."""
    return next((a for a in flatten(tree)[0] if hasattr(a, "shape")), None)


def holds_cupy(args: tuple[Any, ...]) -> bool:
    """Whether the first array among ``args`` (each flattened in turn, until one holds an
    array) is a ``cupy.ndarray``; False, at the cost of a dictionary lookup, while CuPy has not
    been imported."""
    cupy = sys.modules.get("cupy")
    if cupy is None:
        return False
    for arg in args:
        first = first_array(arg)
        if first is not None:
            return isinstance(first, cupy.ndarray)
    return False


@contextmanager
def mixing_named(what: str) -> Iterator[None]:
    """A TypeError or RuntimeError from a CuPy array meeting a torch tensor, raised as
    :class:`~secondorder.errors.MixedBackendError` that starts with ``what`` and names the fix
    (:func:`alike`); a MixedBackendError already named passes through."""
    try:
        yield
    except (TypeError, RuntimeError) as err:
        text = str(err)
        meets = ("ndarray" in text and "Tensor" in text) or "__cuda_array_interface__" in text
        if not meets or isinstance(err, MixedBackendError):
            raise
        raise MixedBackendError(
            f"{what} met a CuPy array it holds (a batch, a constant) as torch tensors reached "
            "it: torch cannot take CuPy arrays. Hold them in the argument's framework where "
            "the function meets its argument, secondorder.backends.bridge.alike(arrays, "
            f"argument) (torch.from_dlpack, no copy) ({type(err).__name__}: {err})") from err


def runs_on_torch(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` unchanged, except that when its positional arguments hold CuPy arrays (the first
    array found decides: the parameters of ``step(self, params, state, batch)``) they go to
    torch and its results come back as CuPy arrays."""
    if getattr(fn, "_runs_on_torch", False):
        return fn

    @functools.wraps(fn)
    def bridged(*args: Any, **kwargs: Any) -> Any:
        if not holds_cupy(args):
            return fn(*args, **kwargs)
        from .cupy import _to_cupy, _to_torch

        with mixing_named(f"{fn.__qualname__} on CuPy arrays runs on torch (same memory), and "
                          "a function it was given (the model's apply, say)"):
            out = fn(*_to_torch(args), **_to_torch(kwargs))
        return _to_cupy(out)

    bridged._runs_on_torch = True  # type: ignore[attr-defined]
    return bridged


def alike(tree: Any, like: Any) -> Any:
    """``tree`` with its CuPy arrays as torch tensors on the same memory when the first array
    of ``like`` is a torch tensor, else ``tree`` itself. A function handed to the library on
    CuPy (a model's apply, an objective) that holds CuPy constants meets torch tensors wherever
    the library differentiates it or runs a step; ``c = alike(c, x)`` with ``x`` its argument
    gives the constants in the argument's framework, inside those calls and outside alike."""
    torch = sys.modules.get("torch")
    if sys.modules.get("cupy") is None or torch is None:
        return tree
    if not isinstance(first_array(like), torch.Tensor):
        return tree
    from .cupy import _to_torch

    return _to_torch(tree)


def for_autodiff(backend: Backend, tree: Any) -> Any:
    """``tree`` in the form a function differentiated on ``backend`` may close over it: on CuPy,
    whose derivatives run on torch, its CuPy arrays as torch tensors on the same memory (the
    batch of a curvature operator, say); on every other backend ``tree`` itself."""
    if backend.name != "cupy":
        return tree
    from .cupy import _to_torch

    return _to_torch(tree)
