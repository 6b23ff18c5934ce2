"""The optimiser interface shared by every method in ``secondorder``.

    opt = Method(apply, loss, **hyperparameters)
    state = opt.init(params)
    params, state, info = opt.step(params, state, (x, y))

``apply(params, x)`` is the network (a model from :mod:`secondorder.models`, a native model
through an adapter, or a residual function for problems with no network) and ``loss`` a
:class:`~secondorder.losses.Loss`; the objective is the mean loss of ``apply(params, x)`` against
``y``. ``step`` is a pure function: the state is a typed tree of arrays that names its method
(:mod:`secondorder.optim.state`), nothing is mutated, and ``jax.jit(opt.step)`` compiles. A step
that meets a non-finite loss, gradient or update returns the old parameters and state unchanged,
with ``info.finite`` false (damped methods also raise their damping in that case:
:meth:`Optimizer.guard`). On eager backends the guard is one Python branch on one finiteness
flag; the leaf-by-leaf ``where`` select is used only inside traced code (``jax.jit``,
``torch.func`` transforms), where a Python branch is impossible.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import re
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from .._pytree import flatten, tree_map
from ..backends import Backend, backend_of
from ..backends.bridge import runs_on_torch
from ..errors import (
    DeviceMismatchError,
    DTypeError,
    HyperparameterError,
    MixedBackendError,
    ShapeError,
    StructureError,
)
from ..losses import Loss, as_loss
from ..models.base import batch_data
from ..tree import norm
from .state import check_state

Tree = Any
Array = Any
Batch = tuple[Any, Any]


class StepInfo(NamedTuple):
    """What one step did. Fields a method does not have are NaN (or 0 iterations)."""

    loss: Array  #: the mean loss at the parameters the step started from
    step_norm: Array  #: ||params_new - params|| (0 when the step was rejected)
    damping: Array  #: the damping in force after the step (NaN for undamped methods)
    finite: Array  #: False when a non-finite value made the step keep the old parameters
    inner_iterations: Array  #: iterations of an inner solver (CG, line search), else 0
    inner_residual: Array  #: final residual of the inner solver, else NaN
    #: method-specific diagnostics (e.g. CurveBall's rho and beta, the model's predicted change,
    #: Hessian-free's reduction ratio), 0-d arrays by name
    extras: Mapping[str, Array] = {}  # noqa: RUF012 - never mutated; a dict is a pytree


#: (module that defines the class, class name, the adapter that turns it into apply and params)
_NATIVE_MODELS = (
    ("torch.nn", "Module", "apply, params = secondorder.models.from_torch(model), or "
     "secondorder.integrations.torch.Optimizer(model, loss, method=...) for a torch.optim-style "
     "optimiser"),
    ("flax.linen", "Module", "apply, params = secondorder.models.from_flax(module, variables)"),
    ("flax.nnx", "Module", "apply, params = secondorder.models.from_nnx(module)"),
    ("equinox", "Module", "apply, params = secondorder.models.from_equinox(model)"),
)


def check_apply(apply: Any, method: str) -> Any:
    """``apply`` itself when it can be the network ``apply(params, x)``; a named
    :class:`~secondorder.errors.StructureError` that names the adapter when it is a framework's
    model object (an ``nn.Module``, a flax or equinox module) or not callable at all (for
    example ``model.parameters()``)."""
    for package, name, fix in _NATIVE_MODELS:
        module = sys.modules.get(package)
        cls = getattr(module, name, None) if module is not None else None
        if isinstance(cls, type) and isinstance(apply, cls):
            raise StructureError(
                f"{method} takes the network as a function apply(params, x) and the parameters "
                f"separately, not a {package} {type(apply).__name__} object: use {fix}")
    if not callable(apply):
        raise StructureError(
            f"{method}'s first argument is the network apply(params, x), got "
            f"{type(apply).__name__}; for a torch model use "
            "secondorder.integrations.torch.Optimizer(model, loss, method=...) (it takes the "
            "module, not model.parameters()), or apply, params = "
            "secondorder.models.from_torch(model)")
    return apply


def is_number(*values: Any) -> bool:
    """True when every value is a Python number: hyperparameters may also be arrays (e.g. traced
    by ``jax.vmap`` over a grid), and those are not validated on the host."""
    return all(isinstance(v, int | float) for v in values)


_RANGE = re.compile(r"^(?P<int>integer\s+)?(?:(?P<op>>=|>|<=|<)\s*(?P<bound>\S+)"
                    r"|(?P<left>[\[(])\s*(?P<low>[^,\s]+)\s*,\s*(?P<high>[^\])\s]+)\s*"
                    r"(?P<right>[\])]))$")


@functools.cache
def _parse_range(spec: str) -> Callable[[float], bool]:
    """The test of a range written as ``"> 0"``, ``">= 1"``, ``"[0, 1)"``, ``"(0, 1]"`` or
    ``"integer >= 1"``."""
    m = _RANGE.match(spec.strip())
    if m is None:
        raise ValueError(f"unreadable hyperparameter range {spec!r}")
    integer = m["int"] is not None
    if m["op"]:
        bound = float(m["bound"])
        compare = {">": float.__gt__, ">=": float.__ge__, "<": float.__lt__,
                   "<=": float.__le__}[m["op"]]

        def inside(v: float) -> bool:
            return compare(float(v), bound)
    else:
        low, high = float(m["low"]), float(m["high"])
        low_ok = float.__ge__ if m["left"] == "[" else float.__gt__
        high_ok = float.__le__ if m["right"] == "]" else float.__lt__

        def inside(v: float) -> bool:
            return low_ok(float(v), low) and high_ok(float(v), high)

    if integer:
        return lambda v: float(v) == int(v) and inside(v)
    return inside


def check_hyperparameter(method: str, name: str, value: Any, valid: str | None = None) -> None:
    """The one rule for hyperparameters: a concrete number (a Python or NumPy real, not a bool)
    must be finite and, when ``valid`` gives its range (``"> 0"``, ``"[0, 1)"``,
    ``"integer >= 1"``, see :func:`_parse_range`), lie in it; a tuple or list of numbers is
    checked entry by entry, except for a parameter with a range, which takes one number: there a
    string, tuple, list, dict or set raises. Anything else (a schedule, an array, a tracer of
    ``jax.vmap`` over the hyperparameter, None) is left alone. Raises
    :class:`~secondorder.errors.HyperparameterError` naming the method, the parameter, the value
    and the valid range."""
    if valid is not None and isinstance(value, str | bytes | tuple | list | dict | set):
        # a parameter with a numeric range in the class's table takes one number (or a
        # schedule, an array): "0.1" or [0.1] was accepted and failed later inside a step
        rule = f"an {valid}" if valid.startswith("integer") else f"a number {valid}"
        raise HyperparameterError(
            f"{method}: {name}={value!r} is not valid; {name} must be {rule} (or an array or a "
            f"schedule), not a {type(value).__name__}")
    if isinstance(value, tuple | list):
        for i, v in enumerate(value):
            check_hyperparameter(method, f"{name}[{i}]", v)
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return
    if not math.isfinite(value) or (valid is not None and not _parse_range(valid)(value)):
        rule = f"a finite number {valid}" if valid is not None else "a finite number"
        if valid is not None and valid.startswith("integer"):
            rule = f"a finite {valid}"
        elif valid is not None and valid[0] in "[(":
            rule = f"a finite number in {valid}"
        hint = ""
        if name == "lr" and value == 0:
            hint = ("; a warm-up must start above 0 for this method (only SGD and Adam take "
                    "lr = 0), e.g. (t + 1) / n of the full rate at step t")
        raise HyperparameterError(
            f"{method}: {name}={value!r} is not valid; {name} must be {rule}{hint}")


def xp_float(backend: Backend, a: Any) -> bool:
    """True when the array ``a`` has a real floating dtype."""
    return bool(backend.xp.isdtype(a.dtype, "real floating"))


def all_finite(*trees: Any) -> Any:
    """A 0-d boolean array: every entry of every floating leaf is finite.

    Computed as isfinite(sum_leaves sum(0 * leaf)): 0 * x is 0 for every finite x and NaN for
    inf or NaN, so the total is NaN exactly when some entry is not finite, and it cannot
    overflow. One multiply-and-sum per leaf and one test, instead of an ``isfinite`` array and a
    reduction per leaf (six times faster on one CPU thread).
    """
    leaves = [leaf for t in trees for leaf in flatten(t)[0]]
    xp = backend_of(leaves[0]).xp
    total = None
    for leaf in leaves:
        if not xp.isdtype(leaf.dtype, "real floating"):
            continue
        term = xp.sum(leaf * 0)
        total = term if total is None else total + term
    return xp.asarray(True) if total is None else xp.isfinite(total)


def select(pred: Any, new: Tree, old: Tree) -> Tree:
    """``new`` where the 0-d boolean ``pred`` holds, ``old`` elsewhere, leaf by leaf."""
    def pick(a: Any, b: Any) -> Any:
        return backend_of(a).xp.where(pred, a, b)

    return tree_map(pick, new, old)


def choose(ok: Any, new: Tree, old: Tree) -> Tree:
    """``new`` if the 0-d flag ``ok`` holds, else ``old``: a Python branch where ``ok`` is
    concrete (as :meth:`Optimizer.guard` decides on eager backends), :func:`select` in traced
    code."""
    backend = backend_of(ok)
    if backend.is_concrete(ok):
        return new if bool(ok) else old
    return select(ok, new, old)


def adapt_damping(rho: Any, damping: Any, increase: Any, decrease: Any) -> Any:
    """Moré's rule on the reduction ratio ``rho``: ``damping * increase`` if rho < 1/4,
    ``damping * decrease`` if rho > 3/4, else unchanged (also for NaN)."""
    xp = backend_of(damping).xp
    return xp.where(rho < 0.25, damping * increase,
                    xp.where(rho > 0.75, damping * decrease, damping))


class Optimizer(ABC):
    """Base class: holds the objective and the helpers every method uses."""

    #: multiplier applied to the damping when a step is rejected as non-finite
    damping_boost_on_failure: float = 10.0
    #: the NamedTuple class of this method's state (see :mod:`secondorder.optim.state`)
    State: type = tuple
    #: the keys of ``info.extras`` that every step of this method reports
    info_extras: tuple[str, ...] = ()
    #: the floating dtypes its parameters may have (None: any): a method that factorises a
    #: matrix (Cholesky, LU) needs float32 or float64, which the frameworks' CPU and GPU
    #: factorisations take; half precision is refused at the step's entry (DTypeError)
    param_dtypes: tuple[str, ...] | None = None
    #: the valid range of each numeric constructor argument, as :func:`check_hyperparameter`
    #: reads it; every numeric argument, listed or not, must be finite
    hyperparameters: Mapping[str, str] = {}  # noqa: RUF012 - never mutated

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Give every subclass's constructor the one hyperparameter rule: before the body runs,
        each concrete number among its arguments goes through :func:`check_hyperparameter` (its
        range from :attr:`hyperparameters`, finiteness for all), so no constructor repeats the
        checks and none can forget them; and its ``init`` and ``step`` the CuPy bridge
        (:func:`~secondorder.backends.bridge.runs_on_torch`)."""
        super().__init_subclass__(**kwargs)
        # on CuPy parameters, init and step run on torch over the same GPU memory
        for name in ("init", "step"):
            if name in cls.__dict__:
                setattr(cls, name, runs_on_torch(cls.__dict__[name]))
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "_checks_hyperparameters", False):
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def checked_init(self: Any, *args: Any, **kw: Any) -> None:
            try:
                bound = signature.bind(self, *args, **kw).arguments
            except TypeError:
                bound = {}  # the constructor itself reports the bad call
            method = type(self).__name__
            ranges = type(self).hyperparameters
            for name, value in bound.items():
                if name not in ("self", "apply", "loss"):
                    check_hyperparameter(method, name, value, ranges.get(name))
            # the outermost constructor's arguments, to build the same method on another
            # network (secondorder.distributed.data_parallel)
            self.__dict__.setdefault("arguments", (args, kw))
            init(self, *args, **kw)

        checked_init._checks_hyperparameters = True  # type: ignore[attr-defined]
        cls.__init__ = checked_init  # type: ignore[method-assign]

    def __init__(self, apply: Callable[[Tree, Any], Array], loss: Loss):
        self.apply = check_apply(apply, type(self).__name__)
        self.loss = as_loss(loss)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # ---------------------------------------------------------------- interface
    @abstractmethod
    def init(self, params: Tree) -> dict[str, Array]:
        """The initial optimiser state (a dict of arrays) for ``params``."""

    @abstractmethod
    def step(self, params: Tree, state: dict[str, Array], batch: Batch
             ) -> tuple[Tree, dict[str, Array], StepInfo]:
        """One step: ``(new_params, new_state, info)``, pure (nothing is mutated)."""

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def backend(params: Tree) -> Backend:
        return backend_of(params)

    def check_state(self, params: Tree, state: Any) -> Backend:
        """The backend of ``params``, after checking that ``state`` is this method's state on
        that backend (:class:`~secondorder.errors.StateError` otherwise)."""
        backend = backend_of(flatten(params)[0][0])
        check_state(state, self.State, backend, type(self).__name__)
        return backend

    def check_batch(self, params: Tree, state: Any, batch: Any) -> Backend:
        """The entry check of every ``step``: the backend of ``params``, after checking that
        ``state`` is this method's state on that backend (:meth:`check_state`) and that the
        batch fits them.

        ``batch`` must be a pair ``(x, y)``. When x is an array: its framework, device and
        (floating) dtype are those of the parameters, and its first axis has y's length, which
        is not 0; a floating y has the parameters' dtype too. Errors: StructureError,
        MixedBackendError, DeviceMismatchError, DTypeError, ShapeError. Only types, shapes,
        dtypes and devices are read here, which are known even inside ``jax.jit`` (so these
        checks hold there too) and cost no device work. The values of the targets (class labels
        in range, probability rows) are checked by the loss where it meets the outputs
        (:meth:`Loss.check_values <secondorder.losses.Loss.check_values>`), once per batch and
        only on concrete arrays; under ``jax.jit`` use :func:`secondorder.checked`.
        """
        leaf = flatten(params)[0][0]  # flattened once for the state check and the batch's
        backend = backend_of(leaf)
        method = type(self).__name__
        check_state(state, self.State, backend, method)
        if not isinstance(batch, tuple | list) or len(batch) != 2:
            raise StructureError(
                f"{method}.step takes the batch as a pair (x, y) of inputs and targets, got "
                f"{type(batch).__name__}" + (f" of length {len(batch)}"
                                             if isinstance(batch, tuple | list) else ""))
        if self.param_dtypes is not None and xp_float(backend, leaf) and (
                dtype := str(leaf.dtype).removeprefix("torch.")) not in self.param_dtypes:
            raise DTypeError(
                f"{method} factorises curvature matrices, which needs "
                f"{' or '.join(self.param_dtypes)} parameters, not {dtype}: train a float32 copy "
                "of the model (module.float(), or params cast with astype), or use a method "
                "without factorisations ('sgd', 'adam', 'curveball', 'hessian-free', 'shampoo')")
        x, y = batch
        for what, a in (("x", batch_data(x)), ("y", y)):
            if not hasattr(a, "shape") or isinstance(a, numbers.Number):
                continue  # a structured input (a tree of arrays): the model reads it
            if not backend.is_array(a):
                raise MixedBackendError(
                    f"{method}.step: the batch's {what} is a {type(a).__module__}."
                    f"{type(a).__name__} but the parameters are {backend.name} arrays; convert "
                    f"the batch with secondorder.backends.get({backend.name!r}).asarray(...)")
            if len(a.shape) == 0:
                raise ShapeError(f"{method}.step: the batch's {what} is 0-d; x and y need a "
                                 "leading batch axis")
            if (xp_float(backend, a) and xp_float(backend, leaf)
                    and a.dtype != leaf.dtype):
                raise DTypeError(
                    f"{method}.step: the batch's {what} has dtype {a.dtype} but the parameters "
                    f"{leaf.dtype}; convert the batch to the parameters' dtype (or the "
                    "parameters to the batch's): mixing them would silently change the "
                    "precision of the step")
            here, there = backend.device(a), backend.device(leaf)
            if here is not None and there is not None and here != there:
                raise DeviceMismatchError(
                    f"{method}.step: the batch's {what} is on {here} but the parameters on "
                    f"{there}; move the batch to the parameters' device")
        if hasattr(x, "shape") and hasattr(y, "shape") and len(x.shape) and len(y.shape):
            # a network on a sharded batch (secondorder.distributed) takes this rank's inputs
            # with the targets of the whole batch
            rows = getattr(self.apply, "global_rows", lambda a: a.shape[0])(x)
            if rows != y.shape[0]:
                raise ShapeError(
                    f"{method}.step: x has {rows} samples (shape {tuple(x.shape)}) but y "
                    f"has {y.shape[0]} (shape {tuple(y.shape)}); the batch's inputs and targets "
                    "must have the same length")
            if x.shape[0] == 0:
                raise ShapeError(f"{method}.step: the batch is empty (0 samples); the mean loss "
                                 "of no samples is undefined, so skip empty batches")
        return backend

    def objective(self, params: Tree, batch: Batch) -> Array:
        """The mean loss of ``apply(params, x)`` against ``y``."""
        x, y = batch
        return self.loss.value(self.apply(params, x), y)

    @runs_on_torch  # on CuPy, like init and step: the objective closes over the batch
    def value_and_grad(self, params: Tree, batch: Batch) -> tuple[Array, Tree]:
        """The mean loss and its gradient in ``params``."""
        return backend_of(params).value_and_grad(lambda p: self.objective(p, batch), params)

    @staticmethod
    def scalar(like: Tree, value: Any) -> Array:
        """A 0-d array of ``value`` with the dtype and device of the leaves of ``like``."""
        leaf = flatten(like)[0][0]
        backend = backend_of(leaf)
        if hasattr(value, "shape") and not backend.is_concrete(value):
            # a hyperparameter traced by jax.vmap / jax.jit: its placement is the trace's
            return backend.xp.astype(value, leaf.dtype)
        return backend.xp.asarray(value, dtype=leaf.dtype, device=backend.device(leaf))

    def info(self, like: Tree, loss: Array, step_norm: Any = float("nan"),
             damping: Any = float("nan"), finite: Any = True, inner_iterations: Any = 0,
             inner_residual: Any = float("nan"), extras: Mapping[str, Array] | None = None
             ) -> StepInfo:
        backend = backend_of(loss)
        xp, device = backend.xp, backend.device(loss)
        # a floating loss has the parameters' dtype and device: a leaf to copy them from
        # without flattening the parameters
        source = loss if xp.isdtype(loss.dtype, "real floating") else like

        def as_array(v: Any) -> Array:
            return v if hasattr(v, "shape") else self.scalar(source, v)

        iters = inner_iterations if hasattr(inner_iterations, "shape") else xp.asarray(
            inner_iterations, device=device)
        fin = finite if hasattr(finite, "shape") else xp.asarray(bool(finite), device=device)
        return StepInfo(loss, as_array(step_norm), as_array(damping), fin, iters,
                        as_array(inner_residual), dict(extras or {}))

    @staticmethod
    def verdict(loss: Array, *checks: Any, new_params: Tree = None, update: Tree | None = None
                ) -> tuple[Array, Array | None]:
        """``(ok, step_norm)``: the flag of :meth:`guard` (the loss, the ``checks`` and the new
        parameters all finite, the latter through ||update|| when ``update`` is given) and
        ||update|| (None without ``update``). Computed first by a method that forms its new
        parameters with ``select(ok, ...)`` in traced code and hands both to :meth:`guard`."""
        xp = backend_of(loss).xp
        ok = xp.all(xp.isfinite(loss))
        if update is not None:
            step_norm = norm(update)
            ok = xp.logical_and(ok, xp.isfinite(step_norm))
            if checks:
                ok = xp.logical_and(ok, all_finite(*checks))
            return ok, step_norm
        return xp.logical_and(ok, all_finite(new_params, *checks)), None

    def guard(self, params: Tree, state: Any, new_params: Tree, new_state: Any, loss: Array,
              *checks: Any, damping_key: str | None = None, update: Tree | None = None,
              verdict: tuple[Array, Array | None] | None = None, selected: bool = False
              ) -> tuple[Tree, Any, Array, Array]:
        """Accept ``(new_params, new_state)`` only if the loss, the new parameters and the
        ``checks`` (trees) are all finite; otherwise keep the old ones and, for damped methods
        (``damping_key``, a field of the state), multiply the old damping by
        :attr:`damping_boost_on_failure`.

        ``update``, when the method has it, is ``new_params - params``: then the step norm
        ||update|| also serves as the finiteness test of the new parameters (it is finite exactly
        when every entry of the update is, unless the step is astronomically long, |u| >
        sqrt(max float), which is rejected too; finite parameters plus a finite update stay
        finite), which saves two passes over the parameters.

        ``verdict``: ``(ok, step_norm)`` from :meth:`verdict` with the same arguments, when the
        method computed it first. ``selected``: in traced code, ``new_params`` were formed as
        ``select(ok, ..., params)`` with that verdict's flag, so they are returned as they are
        (one pass over the parameters fewer: XLA does not fold a select into an equal one).

        Returns ``(params, state, finite, step_norm)``. On eager backends this is one Python
        branch on one flag; in traced code every leaf is selected with ``where``.
        """
        backend = backend_of(loss)
        xp = backend.xp
        if verdict is None:
            verdict = self.verdict(loss, *checks, new_params=new_params, update=update)
        ok, step_norm = verdict
        if backend.is_concrete(ok):
            if bool(ok):
                if step_norm is None:
                    step_norm = norm(tree_map(lambda a, b: a - b, new_params, params))
                return new_params, new_state, ok, step_norm
            if damping_key is not None:
                boosted = getattr(state, damping_key) * self.damping_boost_on_failure
                state = state._replace(**{damping_key: boosted})
            return params, state, ok, xp.zeros_like(loss)
        out_params = new_params if selected else select(ok, new_params, params)
        out_state = select(ok, new_state, state)
        if damping_key is not None:
            out_state = out_state._replace(**{damping_key: xp.where(
                ok, getattr(new_state, damping_key),
                getattr(state, damping_key) * self.damping_boost_on_failure)})
        if step_norm is not None:
            return out_params, out_state, ok, xp.where(ok, step_norm, xp.zeros_like(loss))
        diff = tree_map(lambda a, b: xp.where(ok, a - b, xp.zeros_like(a)), new_params, params)
        return out_params, out_state, ok, norm(diff)
