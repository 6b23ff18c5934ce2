"""Checkpoints: an optimiser state (and the parameters) in one file, and states across backends.

    from secondorder import checkpoint

    checkpoint.save("run.ckpt", state, params, step=1000, lr=0.1)
    state, params, metadata = checkpoint.load("run.ckpt", like=opt)   # checks the method
    jax_state = checkpoint.convert(state, "jax")                       # a copy on another backend

:func:`save` writes a state (any tree of arrays: a method's typed state, a transform state, a
dict) and optionally the parameters, with JSON metadata of your own, to one file. :func:`load`
reads it back, bit for bit, on the backend it was saved from or on another one (``like=``), and
checks the state against an optimiser when given one. :func:`convert` copies a tree of arrays to
another backend (numpy, torch, jax, cupy) or device: the values are copied exactly, so a float64
run continued from a converted state agrees with the unconverted run to rounding of the
backends' own arithmetic.

The file format
---------------
A ZIP archive (uncompressed, as ``np.savez`` writes) holding

* ``checkpoint.json``: the description of what is stored, readable by any JSON reader
  (``unzip -p run.ckpt checkpoint.json``; :func:`describe` returns it as a dict)::

      {"format": "secondorder.checkpoint", "version": 1, "library": "0.1.0",
       "backend": "torch", "device": "cpu",
       "method": "CurveBall", "state_type": "secondorder.optim.curveball:CurveBallState",
       "state": <tree>, "params": <tree or null>,
       "leaves": [{"kind": "array", "dtype": "float64", "shape": [5, 3]}, ...],
       "metadata": {"step": 1000, "lr": 0.1}}

  A ``<tree>`` is ``{"t": "leaf", "i": 3}`` (the fourth entry of ``leaves``),
  ``{"t": "none"}``, ``{"t": "tuple" | "list", "c": [...]}``,
  ``{"t": "dict", "keys": [...], "order": [...] or null, "ordered": false, "c": [...]}``
  (``keys`` sorted, as the leaves are visited, ``order`` the user's insertion order when it
  differs, ``ordered`` for an ``OrderedDict``) or
  ``{"t": "namedtuple", "class": "module:QualName", "fields": [...], "method": ..., "c": [...]}``
  (the NamedTuple classes of states, e.g. ``CurveBallState``, ``ChainState``, ``EmptyState``,
  with the method a state class names, see :func:`secondorder.optim.state.method_state`).
* ``arrays/<i>.npy``: leaf ``i`` in NumPy's ``.npy`` format (dtype, shape and the raw bytes).
  A leaf that was a NumPy scalar has the kind ``"numpy_scalar"`` and comes back as one; a Python
  number in a tree has the kind ``"python"`` and its value in the JSON.

Loading never executes code from the file: the JSON is parsed as data, the arrays are read with
``allow_pickle=False``, and a NamedTuple class is looked up by name only in ``secondorder``'s own
modules or in modules that the program has already imported. The ZIP's CRC-32 of every member
is checked, so a damaged file raises :class:`~secondorder.errors.CheckpointError` instead of
giving wrong numbers. Trees with JAX pytree nodes other than dicts, lists, tuples and
NamedTuples (equinox modules, flax ``FrozenDict``) cannot be described in JSON: save their
leaves (``secondorder.tree.leaves``) or use the framework's serialisation for those.

Errors
------
:class:`~secondorder.errors.CheckpointNotFoundError` (a missing file or directory, also a
``FileNotFoundError``), :class:`~secondorder.errors.CheckpointError` (a file that is not a
checkpoint, is damaged, or holds what cannot be rebuilt here),
:class:`~secondorder.errors.StateError` (a checkpoint of another method than the optimiser
passed as ``like``),
:class:`~secondorder.errors.BackendNotFoundError` / ``BackendUnavailableError`` (a backend name
that is unknown or not installed), :class:`~secondorder.errors.DTypeError` (a dtype the target
backend cannot hold, such as float64 on JAX without x64 mode).

Examples
--------
Save every 100 steps and resume, on the same backend, bit for bit::

    opt = CurveBall(model, loss)
    ...
    checkpoint.save("run.ckpt", state, params, step=step)
    ...
    state, params, meta = checkpoint.load("run.ckpt", like=opt)
    step = meta["step"]

Continue a NumPy run on torch, on the GPU::

    state, params, _ = checkpoint.load("run.ckpt", backend="torch", device="cuda:0")
    # or, for trees already in memory:
    params, state = checkpoint.convert((params, state), "torch", device="cuda:0")

The torch.optim adapter (:mod:`secondorder.integrations.torch`) keeps torch's own convention:
``torch.save(opt.state_dict(), path)`` and ``opt.load_state_dict(torch.load(path,
weights_only=True))``.
"""

from __future__ import annotations

import importlib
import io
import json
import math
import os
import sys
import tempfile
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from ._pytree import LEAF, NONE, TreeDef, flatten, unflatten
from .backends import Backend, backend_of, get
from .errors import (
    BackendUnavailableError,
    CheckpointError,
    CheckpointNotFoundError,
    DeviceMismatchError,
    DTypeError,
    StateError,
)

__all__ = ["Checkpoint", "convert", "describe", "load", "save"]

FORMAT = "secondorder.checkpoint"
VERSION = 1
_HEADER = "checkpoint.json"

Tree = Any
PathLike = str | os.PathLike


class Checkpoint(NamedTuple):
    """What :func:`load` returns: ``state, params, metadata = checkpoint.load(path)``."""

    state: Any  #: the optimiser state (any tree that was saved as the state)
    params: Any  #: the parameters, or None when none were saved
    metadata: dict[str, Any]  #: the keyword arguments given to :func:`save`


# ----------------------------------------------------------------------------------- converting
def _target(backend: str | Backend) -> Backend:
    if isinstance(backend, Backend):
        return backend
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a backend name such as 'torch' or a Backend, got "
                        f"{type(backend).__name__}")
    return get(backend)  # BackendNotFoundError / BackendUnavailableError name the fix


def _device(backend: Backend, device: Any) -> Any:
    if device is None:
        return None
    if backend.name in ("numpy", "array_api_strict"):
        if str(device) != "cpu":
            raise DeviceMismatchError(
                f"the {backend.name} backend keeps arrays in host memory, so device must be None "
                f"or 'cpu', got {device!r}; choose backend='torch', 'jax' or 'cupy' for a GPU")
        return None
    if isinstance(device, str):
        try:
            return backend.device_from_name(device)
        except (RuntimeError, ValueError, IndexError) as err:
            raise DeviceMismatchError(
                f"{backend.name} has no device {device!r}; its devices are "
                f"{', '.join(backend.devices())}") from err
    return device


def _to_backend(host: np.ndarray, backend: Backend, device: Any, numpy_scalar: bool) -> Any:
    """A NumPy array that nothing else references, as an array of ``backend`` on ``device``
    with the same dtype (checked: JAX without x64 would silently narrow 64-bit types)."""
    if backend.name == "numpy":
        return host[()] if numpy_scalar else host
    try:
        out = backend.asarray(host, device=device)
    except DTypeError:
        raise
    except TypeError as err:
        raise DTypeError(f"{backend.name} cannot hold an array of dtype {host.dtype}: {err}"
                         ) from err
    name = str(out.dtype).removeprefix("torch.")
    if name != host.dtype.name:
        hint = (" (enable 64-bit types with jax.config.update('jax_enable_x64', True) before "
                "creating arrays)" if backend.name == "jax" else "")
        raise DTypeError(
            f"converting a {host.dtype} array to {backend.name} gave {name}{hint}; a "
            "checkpoint is restored with its own dtypes, never narrowed silently")
    return out


def _host_copy(leaf: Any) -> tuple[np.ndarray, bool]:
    """``(a NumPy copy of an array leaf, whether it was a NumPy scalar)``."""
    if isinstance(leaf, np.generic):
        return np.array(leaf), True
    backend = backend_of(leaf)
    if not backend.is_concrete(leaf):
        raise CheckpointError(
            "the tree holds traced values (inside jax.jit, jax.vmap or a torch.func transform), "
            "which have no numbers yet: save or convert the state outside the transformed "
            "function")
    host = np.array(backend.to_numpy(leaf), copy=True)
    if host.dtype.kind in "OV":
        raise CheckpointError(f"cannot store an array of dtype {host.dtype} without pickling; "
                              "checkpoints hold numeric and boolean arrays")
    return host, False


def _is_array_leaf(leaf: Any) -> bool:
    return hasattr(leaf, "shape") and hasattr(leaf, "dtype")


def convert(state: Tree, backend: str | Backend, device: Any = None) -> Tree:
    """A copy of ``state`` (any tree of arrays: an optimiser state, parameters, or a tuple
    ``(params, state)``) with every array on ``backend`` (``"numpy"``, ``"torch"``, ``"jax"``,
    ``"cupy"`` or a :class:`~secondorder.backends.Backend`) and ``device`` (a name such as
    ``"cuda:0"`` or the framework's device object; None for the backend's default).

    The tree keeps its types (the method's NamedTuple, dicts in the user's key order, ``None``
    nodes) and every array its dtype and values exactly: an int32 step count stays int32, a
    random key keeps its bits, float64 stays float64 (JAX needs x64 mode for that, else
    :class:`~secondorder.errors.DTypeError`). Python numbers in the tree are kept as they are.
    Converting to the same backend makes an independent copy.

    >>> import numpy as np
    >>> from secondorder import checkpoint
    >>> state = {"count": np.asarray(3, dtype=np.int32), "m": np.ones(2)}
    >>> checkpoint.convert(state, "numpy")["m"].dtype
    dtype('float64')
    """
    target = _target(backend)
    where = _device(target, device)
    leaves, treedef = flatten(state)
    out = []
    for leaf in leaves:
        if _is_array_leaf(leaf):
            host, scalar = _host_copy(leaf)
            out.append(_to_backend(host, target, where, scalar))
        else:
            out.append(leaf)
    return unflatten(treedef, out)


# ----------------------------------------------------------------------------------- the tree
def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _encode(treedef: TreeDef, counter: list[int]) -> dict[str, Any]:
    kind = treedef.kind
    if kind == "leaf":
        counter[0] += 1
        return {"t": "leaf", "i": counter[0] - 1}
    if kind == "none":
        return {"t": "none"}
    children = [_encode(c, counter) for c in treedef.children]
    if kind in ("tuple", "list"):
        return {"t": kind, "c": children}
    if kind == "dict":
        keys = list(treedef.meta)
        for k in keys:
            if isinstance(k, bool) or not isinstance(k, str | int):
                raise CheckpointError(
                    f"dict key {k!r} ({type(k).__name__}) cannot be stored in a checkpoint's "
                    "JSON description; use string or integer keys")
        order = None
        ordered = False
        if treedef.order is not None:
            cls, user_keys, _ = treedef.order
            ordered = cls is OrderedDict
            if list(user_keys) != keys:
                order = list(user_keys)
        return {"t": "dict", "keys": keys, "order": order, "ordered": ordered, "c": children}
    if kind == "namedtuple":
        cls = treedef.meta
        node = {"t": "namedtuple", "class": _class_name(cls), "fields": list(cls._fields),
                "c": children}
        if getattr(cls, "method", None) is not None:
            node["method"] = cls.method
        return node
    raise CheckpointError(
        f"the tree holds a {treedef.meta} node (a JAX pytree type), which a checkpoint cannot "
        "describe without pickling: save its arrays (secondorder.tree.leaves(tree)) and "
        "rebuild it with secondorder.tree.unflatten, or use the framework's own serialisation")


def _resolve(name: str, fields: list[str]) -> type:
    """The NamedTuple class ``module:QualName`` of a saved tree, looked up without running
    anything from the file: secondorder's own modules are imported, others must already be."""
    module_name, _, qualname = name.partition(":")
    module = sys.modules.get(module_name)
    if module is None:
        if module_name == "secondorder" or module_name.startswith("secondorder."):
            try:
                module = importlib.import_module(module_name)
            except ImportError as err:
                raise CheckpointError(
                    f"the checkpoint needs {name}, but secondorder has no module "
                    f"{module_name!r} (saved by another version?)") from err
        else:
            raise CheckpointError(
                f"the checkpoint holds a {qualname} from module {module_name!r}, which is not "
                f"imported: import {module_name} before loading (checkpoints never import "
                "modules other than secondorder's own)")
    cls: Any = module
    for part in qualname.split("."):
        cls = getattr(cls, part, None)
        if cls is None:
            raise CheckpointError(
                f"the checkpoint needs {name}, which does not exist in this version of "
                f"{module_name}; load it with the version that saved it")
    if not (isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields")):
        raise CheckpointError(f"{name} is not a NamedTuple class; the checkpoint is damaged")
    if list(cls._fields) != list(fields):
        raise CheckpointError(
            f"{name} has the fields {list(cls._fields)} here but {fields} in the checkpoint: "
            "it was saved by another version of the code that defines it")
    return cls


def _decode(node: Any, counter: list[int]) -> TreeDef:
    if not isinstance(node, dict) or "t" not in node:
        raise CheckpointError(f"unreadable tree node {node!r}")
    kind = node["t"]
    if kind == "leaf":
        if node.get("i") != counter[0]:
            raise CheckpointError("the leaves of the tree are out of order")
        counter[0] += 1
        return LEAF
    if kind == "none":
        return NONE
    children = tuple(_decode(c, counter) for c in node["c"])
    if kind in ("tuple", "list"):
        return TreeDef(kind, None, children)
    if kind == "dict":
        keys = tuple(node["keys"])
        if len(keys) != len(children) or list(keys) != sorted(keys):
            raise CheckpointError("a dict node's keys do not match its entries")
        order = None
        user = node.get("order")
        if user is not None or node.get("ordered"):
            user = tuple(keys if user is None else user)
            if sorted(user) != list(keys):
                raise CheckpointError("a dict node's key order does not match its keys")
            position = {k: i for i, k in enumerate(keys)}
            order = (OrderedDict if node.get("ordered") else dict, user,
                     tuple(position[k] for k in user))
        return TreeDef("dict", keys, children, order)
    if kind == "namedtuple":
        cls = _resolve(node["class"], node["fields"])
        if len(children) != len(cls._fields):
            raise CheckpointError(f"{node['class']} has {len(cls._fields)} fields but the "
                                  f"checkpoint stores {len(children)}")
        return TreeDef("namedtuple", cls, children)
    raise CheckpointError(f"unknown tree node kind {kind!r}")


# ----------------------------------------------------------------------------------- saving
def _json_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        if isinstance(value, np.generic):
            return value.item()
        raise TypeError(type(value).__name__)

    try:
        text = json.dumps(dict(metadata), default=plain)
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint metadata must be JSON data (numbers, strings, booleans, None, lists "
            f"and dicts with string keys); {err}: convert arrays with float(x) or x.tolist(), "
            "or save them in the state") from err
    return json.loads(text)


def save(path: PathLike, state: Tree, params: Tree = None, **metadata: Any) -> None:
    """Write ``state`` (and ``params``, when given) to the file ``path``, with ``metadata``
    (JSON data: the step, the epoch, hyperparameters, ...) stored alongside.

    ``state`` may be any tree of arrays of one backend; for an optimiser's state the file also
    records the method (``CurveBallState`` names ``"CurveBall"``), which :func:`load` checks.
    The file is written to a temporary name in the same directory and renamed, so an
    interrupted save never leaves a half-written checkpoint at ``path``. See the module
    docstring for the format.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise CheckpointNotFoundError(
            f"cannot save the checkpoint {path!r}: the directory {directory!r} does not exist; "
            "create it first (os.makedirs)")
    state_leaves, state_def = flatten(state)
    param_leaves, param_def = flatten(params) if params is not None else ([], None)
    counter = [0]
    state_node = _encode(state_def, counter)
    params_node = _encode(param_def, counter) if param_def is not None else None
    leaves = state_leaves + param_leaves
    arrays = [leaf for leaf in leaves if _is_array_leaf(leaf) and not isinstance(leaf, np.generic)]
    backend = backend_of(*arrays) if arrays else get("numpy")
    device = None
    for leaf in arrays:
        device = backend.device(leaf)
        break
    described: list[dict[str, Any]] = []
    stored: list[np.ndarray | None] = []
    for leaf in leaves:
        if _is_array_leaf(leaf):
            host, scalar = _host_copy(leaf)
            described.append({"kind": "numpy_scalar" if scalar else "array",
                              "dtype": host.dtype.str, "shape": list(host.shape)})
            stored.append(host)
        elif leaf is None or isinstance(leaf, bool | int | float | str):
            if isinstance(leaf, float) and not math.isfinite(leaf):
                leaf_value: Any = repr(leaf)
                described.append({"kind": "python", "float": leaf_value})
            else:
                described.append({"kind": "python", "value": leaf})
            stored.append(None)
        else:
            raise CheckpointError(
                f"the tree holds a {type(leaf).__module__}.{type(leaf).__name__}, which is "
                "neither an array nor a Python number; checkpoints store arrays, numbers and "
                "strings only")
    state_cls = type(state)
    header = {
        "format": FORMAT, "version": VERSION,
        "library": sys.modules["secondorder"].__version__,
        "backend": backend.name, "device": None if device is None else str(device),
        "method": getattr(state_cls, "method", None),
        "state_type": _class_name(state_cls),
        "state": state_node, "params": params_node,
        "leaves": described,
        "metadata": _json_metadata(metadata),
    }
    handle, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(handle, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED) as z:
            z.writestr(_HEADER, json.dumps(header, indent=1))
            for i, host in enumerate(stored):
                if host is None:
                    continue
                buffer = io.BytesIO()
                np.lib.format.write_array(buffer, host, allow_pickle=False)
                z.writestr(f"arrays/{i}.npy", buffer.getvalue())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the checkpoint private
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------------- loading
def _damaged(path: str, why: str) -> CheckpointError:
    return CheckpointError(
        f"{path!r} is not a readable secondorder checkpoint: {why}. Save checkpoints with "
        "secondorder.checkpoint.save; a damaged file cannot be repaired, load an earlier one")


def _open(path: PathLike) -> tuple[str, zipfile.ZipFile, dict[str, Any]]:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointNotFoundError(
            f"no checkpoint at {path!r} (cwd {os.getcwd()!r}): check the path, or save one "
            "with secondorder.checkpoint.save(path, state, params)")
    if os.path.isdir(path):
        raise CheckpointError(f"{path!r} is a directory; pass the checkpoint file inside it")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as err:
        raise _damaged(path, "it is not a ZIP archive (truncated, overwritten, or written by "
                       "another program)") from err
    try:
        text = archive.read(_HEADER)
    except KeyError:
        archive.close()
        raise _damaged(path, f"it has no {_HEADER} (a torch.save or np.savez file? load "
                       "those with torch.load or np.load)") from None
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        archive.close()
        raise _damaged(path, f"its description cannot be read ({err})") from err
    try:
        header = json.loads(text)
    except ValueError as err:
        archive.close()
        raise _damaged(path, f"its {_HEADER} is not valid JSON ({err})") from err
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        archive.close()
        raise _damaged(path, f"its {_HEADER} does not describe a {FORMAT}")
    if header.get("version") != VERSION:
        archive.close()
        raise CheckpointError(
            f"{path!r} has checkpoint format version {header.get('version')!r}; this version "
            f"of secondorder reads version {VERSION}: load it with the version that saved it")
    return path, archive, header


def describe(path: PathLike) -> dict[str, Any]:
    """The JSON description of the checkpoint at ``path`` (backend, device, method, state type,
    tree structure, dtypes and shapes of the leaves, metadata) without reading its arrays."""
    _, archive, header = _open(path)
    archive.close()
    return header


def _read_leaves(path: str, archive: zipfile.ZipFile, header: dict[str, Any]) -> list[Any]:
    out: list[Any] = []
    for i, spec in enumerate(header["leaves"]):
        kind = spec.get("kind")
        if kind == "python":
            out.append(float(spec["float"]) if "float" in spec else spec.get("value"))
            continue
        if kind not in ("array", "numpy_scalar"):
            raise _damaged(path, f"leaf {i} has the unknown kind {kind!r}")
        try:
            data = archive.read(f"arrays/{i}.npy")
            host = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
        except KeyError:
            raise _damaged(path, f"the array of leaf {i} is missing") from None
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
            raise _damaged(path, f"the array of leaf {i} cannot be read ({err})") from err
        if host.dtype.str != spec["dtype"] or list(host.shape) != spec["shape"]:
            raise _damaged(path, f"leaf {i} has dtype {host.dtype.str} and shape "
                           f"{list(host.shape)}, but the description says {spec['dtype']} "
                           f"and {spec['shape']}")
        out.append((host, kind == "numpy_scalar"))
    return out


def _is_optimizer(like: Any) -> bool:
    return isinstance(getattr(like, "State", None), type) and callable(
        getattr(like, "init", None)) and callable(getattr(like, "step", None))


def load(path: PathLike, *, like: Any = None, backend: str | Backend | None = None,
         device: Any = None) -> Checkpoint:
    """Read the checkpoint at ``path``: ``state, params, metadata = load(path)``.

    Where the arrays go: by default to the backend they were saved from, on its default device
    (a torch checkpoint saved on a GPU comes back on the CPU unless ``device`` says otherwise);
    ``backend`` (a name or a :class:`~secondorder.backends.Backend`) and ``device`` (a name
    such as ``"cuda:0"`` or a device object) choose another, exactly as :func:`convert` does.

    ``like`` is one of

    * an optimiser (``CurveBall(...)``): the checkpoint must hold that method's state, else
      :class:`~secondorder.errors.StateError` naming both methods; when parameters were
      saved, the state must also have the structure and shapes that ``like.init(params)``
      gives (the same settings, such as momentum or a transform);
    * an array or a tree of arrays (your parameters, say): the arrays go to its backend and
      device;
    * a backend name or :class:`~secondorder.backends.Backend`: the same as ``backend=``.

    Within one backend the state, parameters and metadata come back bit-identical, with their
    types: the method's NamedTuple, int32 counts, random keys, empty transform states, dicts in
    the key order they were saved in.
    """
    optimizer = None
    if like is not None:
        if _is_optimizer(like):
            optimizer = like
        elif isinstance(like, str | Backend):
            if backend is not None:
                raise TypeError("pass the backend either as like= or as backend=, not both")
            backend = like
        else:
            arrays = [leaf for leaf in flatten(like)[0] if _is_array_leaf(leaf)]
            if not arrays:
                raise TypeError(
                    f"like must be an optimiser, a backend name, a Backend or arrays to take the "
                    f"backend and device from, got {type(like).__name__}")
            found = backend_of(*arrays)
            backend = backend if backend is not None else found
            if device is None:
                device = found.device(arrays[0])
    path, archive, header = _open(path)
    with archive:
        try:
            counter = [0]
            state_def = _decode(header["state"], counter)
            params_def = _decode(header["params"], counter) if header["params"] is not None \
                else None
            if counter[0] != len(header["leaves"]):
                raise _damaged(path, f"the trees have {counter[0]} leaves but "
                               f"{len(header['leaves'])} are described")
        except (KeyError, TypeError) as err:
            raise _damaged(path, f"its tree description is incomplete ({err!r})") from err
        if optimizer is not None:
            _check_method(path, header, state_def, optimizer)
        raw = _read_leaves(path, archive, header)
    if backend is None:
        try:
            target = get(header["backend"])
        except BackendUnavailableError as err:
            raise BackendUnavailableError(
                f"{err} The checkpoint {path!r} was saved from {header['backend']}; load it on "
                "another backend with load(path, backend='numpy')") from err
    else:
        target = _target(backend)
    where = _device(target, device)
    leaves = [_to_backend(item[0], target, where, item[1]) if isinstance(item, tuple) else item
              for item in raw]
    n_state = state_def.num_leaves
    state = unflatten(state_def, leaves[:n_state])
    params = unflatten(params_def, leaves[n_state:]) if params_def is not None else None
    if optimizer is not None and params is not None:
        _check_structure(path, state, params, optimizer)
    return Checkpoint(state, params, dict(header.get("metadata") or {}))


def _check_method(path: str, header: dict[str, Any], state_def: TreeDef, optimizer: Any
                  ) -> None:
    expected = optimizer.State
    name = type(optimizer).__name__
    if state_def.kind == "namedtuple" and state_def.meta is expected:
        return
    saved = header.get("method")
    what = (f"a {saved} state ({header.get('state_type', '?').partition(':')[2]})"
            if saved else f"a {header.get('state_type', 'tree').partition(':')[2] or 'tree'}")
    raise StateError(
        f"the checkpoint {path!r} holds {what}, but the optimiser is {name}, which needs a "
        f"{expected.__name__}: load it with {saved or 'the method that saved it'}(...) as like=, "
        f"or start {name} afresh with {name}(...).init(params)")


def _check_structure(path: str, state: Any, params: Any, optimizer: Any) -> None:
    fresh_leaves, fresh_def = flatten(optimizer.init(params))
    leaves, treedef = flatten(state)
    same = fresh_def == treedef and all(
        tuple(getattr(a, "shape", ())) == tuple(getattr(b, "shape", ()))
        for a, b in zip(leaves, fresh_leaves))
    if not same:
        name = type(optimizer).__name__
        raise StateError(
            f"the checkpoint {path!r} holds a {name} state of structure {treedef!r}, but this "
            f"{name} makes states of structure {fresh_def!r} for the saved parameters: build the "
            "optimiser with the settings of the run that saved it (momentum, transform, ...)")
