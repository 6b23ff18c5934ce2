"""Backend registry: which framework owns an array, and the explicit choice of a backend.

A backend is found from the type of the arrays a function is given, looking only at frameworks
that are already imported (``sys.modules``): asking about a NumPy array never imports torch.
``use(name)`` chooses the backend for work that starts from no arrays (creating data or initial
weights); it applies globally, or for a ``with`` block when used as a context manager. When arrays
are given, their framework decides, and arrays of two frameworks or two devices in one call raise
:class:`~secondorder.errors.MixedBackendError` or :class:`~secondorder.errors.DeviceMismatchError`.
"""

from __future__ import annotations

import contextvars
import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from typing import Any

from .._pytree import flatten
from ..errors import (
    BackendNotFoundError,
    BackendUnavailableError,
    DeviceMismatchError,
    MixedBackendError,
)
from ._base import Backend

__all__ = [
    "Backend",
    "BackendInfo",
    "available",
    "backend_of",
    "current",
    "get",
    "names",
    "namespace",
    "use",
]

#: backend name -> (framework module that owns its arrays, backend module, extra requirement)
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "numpy": ("numpy", "secondorder.backends.numpy", "autograd"),
    "torch": ("torch", "secondorder.backends.torch", "torch"),
    "jax": ("jax", "secondorder.backends.jax", "jax"),
    "cupy": ("cupy", "secondorder.backends.cupy", "cupy"),
    "array_api_strict": (
        "array_api_strict",
        "secondorder.backends.array_api_strict",
        "array_api_strict",
    ),
}
#: top-level module of an array's type -> backend name (autograd boxes are NumPy arrays)
_OWNER = {
    "numpy": "numpy",
    "autograd": "numpy",
    "torch": "torch",
    "jax": "jax",
    "jaxlib": "jax",
    "cupy": "cupy",
    "array_api_strict": "array_api_strict",
}
_INSTANCES: dict[str, Backend] = {}
_CHOSEN: contextvars.ContextVar[str | None] = contextvars.ContextVar("secondorder_backend")
_GLOBAL: list[str] = ["numpy"]


def names() -> list[str]:
    """Every backend ``secondorder`` knows, installed or not."""
    return list(_REGISTRY)


def get(name: str) -> Backend:
    """The backend called ``name`` (imports its framework)."""
    if name not in _REGISTRY:
        raise BackendNotFoundError(
            f"unknown backend {name!r}; choose one of {', '.join(_REGISTRY)}"
        )
    if name not in _INSTANCES:
        _, module, requirement = _REGISTRY[name]
        try:
            mod = importlib.import_module(module)
        except ImportError as err:
            raise BackendUnavailableError(
                f"backend {name!r} needs the package {requirement!r}, which is not installed "
                f"(pip install -r backends/{name}.txt): {err}"
            ) from err
        cls = next(
            v
            for v in vars(mod).values()
            if isinstance(v, type) and issubclass(v, Backend) and v.name == name
        )
        _INSTANCES[name] = cls()
    return _INSTANCES[name]


def current() -> Backend:
    """The explicitly chosen backend (``use``), or NumPy when none was chosen."""
    chosen = _CHOSEN.get(None)
    return get(chosen if chosen is not None else _GLOBAL[0])


class use:  # noqa: N801 - used like a function: secondorder.use("jax")
    """Choose the backend for work that starts from no arrays.

    ``use("jax")`` sets it for the rest of the program; ``with use("jax"): ...`` sets it for the
    block only and restores the previous choice afterwards.
    """

    def __init__(self, name: str) -> None:
        get(name)  # fail now on an unknown or missing backend
        self.name = name
        self._previous_global = _GLOBAL[0]
        _GLOBAL[0] = name
        self._token: contextvars.Token | None = None

    def __enter__(self) -> Backend:
        _GLOBAL[0] = self._previous_global
        self._token = _CHOSEN.set(self.name)
        return get(self.name)

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _CHOSEN.reset(self._token)


#: array type -> backend name, filled on first sight of each type (the answer never changes)
_TYPE_OWNER: dict[type, str] = {}


def _owner(x: Any) -> str | None:
    """Name of the backend whose framework owns ``x``; None for Python scalars and None."""
    name = _TYPE_OWNER.get(type(x))
    if name is not None:
        return name
    if x is None or isinstance(x, bool | int | float | complex):
        return None
    name = _find_owner(x)
    if name is not None:
        _TYPE_OWNER[type(x)] = name
    return name


def _find_owner(x: Any) -> str | None:
    top = type(x).__module__.split(".", 1)[0]
    name = _OWNER.get(top)
    if name is not None:
        return name
    for candidate, (framework, _, _) in _REGISTRY.items():
        if framework in sys.modules and candidate in _INSTANCES:
            if _INSTANCES[candidate].is_array(x):
                return candidate
    # subclasses defined elsewhere (e.g. torch.nn.Parameter subclasses): check the imported ones
    for candidate, (framework, _, _) in _REGISTRY.items():
        if framework in sys.modules:
            try:
                if get(candidate).is_array(x):
                    return candidate
            except BackendUnavailableError:
                continue
    return None


def backend_of(*trees: Any, check_device: bool = True) -> Backend:
    """The backend that owns the arrays in ``trees`` (parameter trees or single arrays).

    Raises :class:`MixedBackendError` for arrays of two frameworks and
    :class:`DeviceMismatchError` for arrays on two devices. With no arrays at all, returns
    :func:`current`. This is where placement is checked: library entry points call it once on
    the data they are given; loops inside the library (CG, tree arithmetic) do not.
    """
    if len(trees) == 1:  # one array: no flattening, no device to compare
        name = _TYPE_OWNER.get(type(trees[0]))
        if name is not None:
            return get(name)
    leaves: list[Any] = []
    for tree in trees:
        leaves.extend(flatten(tree)[0])
    return _backend_of_leaves(leaves, check_device=check_device)


def _backend_of_leaves(leaves: list[Any], *, check_device: bool = True) -> Backend:
    """:func:`backend_of` for leaves that are already flattened (same checks, same errors).

    The framework is decided per type of leaf (one look-up for a tree of one array type);
    ``check_device=False`` skips the device comparison, for operations on data whose
    placement was checked where it entered.
    """
    by_type: dict[type, Any] = {}
    for leaf in leaves:
        if type(leaf) not in by_type:
            by_type[type(leaf)] = leaf
    found: dict[str, Any] = {}
    for leaf in by_type.values():
        name = _owner(leaf)
        if name is not None and name not in found:
            found[name] = leaf
    if len(found) > 1:
        kinds = ", ".join(f"{n} ({type(a).__name__})" for n, a in found.items())
        raise MixedBackendError(
            f"arrays of different frameworks in one call: {kinds}. Convert them to one "
            "framework first, e.g. with secondorder.backends.get(name).asarray(x)."
        )
    if not found:
        return current()
    backend = get(next(iter(found)))
    if check_device and len(leaves) > 1:
        _check_devices(backend, leaves)
    return backend


def _check_devices(backend: Backend, leaves: list[Any]) -> None:
    first = None
    for leaf in leaves:
        if not backend.is_array(leaf) or getattr(leaf, "ndim", None) is None:
            continue
        dev = backend.device(leaf)
        if dev is None:
            continue
        if first is None:
            first = dev
        elif dev != first:
            raise DeviceMismatchError(
                f"arrays on different devices in one call: {first} and {dev}. Move them to one "
                "device first (e.g. tensor.to(device) or jax.device_put)."
            )


def namespace(*trees: Any) -> Any:
    """The array namespace ``xp`` for the arrays in ``trees`` (see :func:`backend_of`)."""
    return backend_of(*trees).xp


@dataclass(frozen=True)
class BackendInfo:
    """What an installed backend can do (the rows of ``secondorder list``)."""

    name: str
    installed: bool
    usable: bool
    autodiff: bool
    jit: bool
    cpu: bool
    gpu: bool
    float64: bool
    devices: list[str] = field(default_factory=list)
    note: str = ""


def available(*, probe: bool = True) -> list[BackendInfo]:
    """Every known backend, whether it is installed, and what it supports.

    With ``probe=True`` (the default) installed frameworks are imported to list their devices;
    with ``probe=False`` only the package metadata is consulted and nothing is imported.
    """
    infos = []
    for name, (framework, _, _) in _REGISTRY.items():
        # the framework, not the extra: numpy without autograd still does linear algebra
        installed = importlib.util.find_spec(framework) is not None
        if not installed:
            infos.append(
                BackendInfo(name, False, False, False, False, False, False, False, [],
                            f"not installed: pip install -r backends/{name}.txt")
            )
            continue
        if not probe:
            infos.append(BackendInfo(name, True, True, False, False, False, False, False))
            continue
        try:
            b = get(name)
        except (BackendUnavailableError, ImportError) as err:
            infos.append(
                BackendInfo(name, True, False, False, False, False, False, False, [], str(err))
            )
            continue
        devices = b.devices()
        infos.append(
            BackendInfo(
                name=name,
                installed=True,
                usable=True,
                autodiff=b.has_autodiff,
                jit=b.has_jit,
                cpu=b.supports_cpu,
                gpu=b.supports_gpu and any(not d.startswith("cpu") for d in devices),
                float64=True,  # jax: once x64 mode is on (see the note)
                devices=devices,
                note=b.note,
            )
        )
    return infos
