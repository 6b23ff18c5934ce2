"""Any registered method as a ``torch.optim.Optimizer`` on your own ``nn.Module``.

Your loop changes in two lines, the constructor and the step, which takes the batch::

    from secondorder.integrations.torch import Optimizer

    opt = Optimizer(model, nn.CrossEntropyLoss(), method="curveball")   # was torch.optim.SGD(...)
    for x, y in loader:
        opt.zero_grad()                      # harmless (the method takes its own derivatives)
        loss = criterion(model(x), y)        # harmless, if you want the number
        loss.backward()                      # harmless
        opt.step((x, y))                     # was opt.step()

Why the batch and not a closure: ``torch.optim.LBFGS``'s closure returns a scalar loss after
``backward()``, but second-order methods need the network output and the loss separately
(curvature products J^T H_L J v, forward-mode derivatives, the GGN), evaluated many times at
parameters of their own choosing. So ``step`` takes the batch ``(x, y)`` and calls the module
itself through :func:`~secondorder.models.from_torch`; ``step(closure)`` raises
:class:`~secondorder.errors.MissingBatchError`.

After each step the new parameters are in the module's own tensors, written in place (copied
there; the gradient methods add their update into them directly, with ``donate=True``), so
``model.state_dict()``, ``model(x)``, other references to the parameters and checkpoints all see
the trained weights.

Modules in train mode: all the forward passes of one step (there are many, inside ``torch.func``
transforms) use the same dropout mask, drawn from a per-step seed derived from ``dropout_seed``
and the step number (your global generator is left untouched); normalisation layers normalise
with the batch statistics, and their running statistics are updated once per step: by your
own ``model(x)`` if your loop still runs one, else by one train-mode forward pass over the step's
batch at the parameters the step started from (under ``torch.no_grad``, with the step's dropout
mask; see ``update_buffers``). In eval mode the module runs as it is.

Data-parallel training: with an initialised ``torch.distributed`` process group of more than
one rank (``torchrun``), each rank passes its own shard of the batch to ``step`` and every rank
takes the step of one process on the whole batch (:mod:`secondorder.distributed`); the module
may be plain or wrapped in ``DistributedDataParallel`` (its ``module`` is trained). The
parameters and buffers of rank 0 are broadcast to the others when the optimiser is built, as
``DistributedDataParallel`` does. Normalisation layers in train mode normalise with the
statistics of the local shard and dropout masks are drawn per shard, so for such networks the
step is a data-parallel one (the same on every rank) but not that of one process on the whole
batch; after every step the running statistics of rank 0 are broadcast to the others, as
``DistributedDataParallel`` does before each forward pass. For the one-process step, use
normalisation without batch statistics (``LayerNorm``, ``GroupNorm``) or eval mode.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from itertools import chain
from typing import Any

import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from .._pytree import flatten, unflatten
from .._stack import caller_level
from ..errors import (
    HyperparameterError,
    MissingBatchError,
    NonFiniteLossWarning,
    StateError,
    StructureError,
)
from ..models.adapters import TorchModel, unwrap
from ..optim.base import StepInfo
from ..optim.gradient_descent import GradientDescent
from ..optim.state import carry_over

__all__ = ["Optimizer"]

_SKIP = ("self", "apply", "loss")


def _is_plain(value: Any) -> bool:
    """A value that a state dict can hold and ``torch.load(weights_only=True)`` can read."""
    if isinstance(value, bool | int | float | str | type(None)):
        return True
    if isinstance(value, tuple | list):
        return all(_is_plain(v) for v in value)
    return False


def _hyperparameters(factory: Any, class_first: bool = False
                     ) -> tuple[dict[str, Any], set[str], bool]:
    """The defaults of every hyperparameter a method factory accepts, the accepted names, and
    whether it also takes arbitrary keywords. The defaults are the class's (its signature)
    overridden by the registry's, or with ``class_first`` the class's own, those a JAX or
    NumPy user of the class gets, where the registry's are the test suite's choices
    (:data:`~secondorder.optim.registry.CLASS_DEFAULTS`); the registry's then fill in only
    what the signature does not give."""
    target = getattr(factory, "cls", factory)
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # a builtin or an opaque callable: trust the user
        return dict(getattr(factory, "defaults", {})), set(), True
    defaults: dict[str, Any] = {}
    names: set[str] = set()
    open_keywords = False
    for name, p in signature.parameters.items():
        if p.kind is p.VAR_KEYWORD:
            open_keywords = True
            continue
        if name in _SKIP or p.kind is p.VAR_POSITIONAL:
            continue
        names.add(name)
        if p.default is not p.empty:
            defaults[name] = p.default
    registry_defaults = dict(getattr(factory, "defaults", {}))
    names |= set(registry_defaults)
    if class_first:
        return {**registry_defaults, **defaults}, names, open_keywords
    return {**defaults, **registry_defaults}, names, open_keywords


def _to_loss(loss: Any) -> Any:
    """A library loss for ``loss`` (a library loss, or a torch loss module mapped with its exact
    scale by :func:`secondorder.losses.as_loss`)."""
    from ..losses import Loss

    if isinstance(loss, Loss):
        return loss
    try:
        from ..losses import as_loss
    except ImportError:  # pragma: no cover - the converter ships with the losses
        raise HyperparameterError(
            f"Optimizer needs a secondorder loss (secondorder.losses.MSE(), "
            f"SoftmaxCrossEntropy(), SigmoidBCE()); got {loss!r}") from None
    return as_loss(loss)


def _step_hooks(func: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.optim.Optimizer.profile_hook_step`` (global and per-optimiser pre- and
    post-hooks, the profiler's ``Optimizer.step#...`` label), with its ``record_function`` only
    while a profiler runs: without one the label records nothing, but the kernels of a step
    inside it ran slower (torch 2.13, CPU, one thread: a 784x256 linear 8% slower, our SGD step
    0.3 ms). Marked ``hooked`` so that torch does not wrap it again."""
    hooked = torch.optim.Optimizer.profile_hook_step(func)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if torch._C._autograd._profiler_enabled():
            return hooked(*args, **kwargs)
        self = args[0]
        for pre_hook in chain(_global_optimizer_pre_hooks.values(),
                              self._optimizer_step_pre_hooks.values()):
            result = pre_hook(self, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(f"{func} must return None or a tuple of (new_args, "
                                       f"new_kwargs), but got {result}.")
                args, kwargs = result
        out = func(*args, **kwargs)
        self._optimizer_step_code()
        for post_hook in chain(self._optimizer_step_post_hooks.values(),
                               _global_optimizer_post_hooks.values()):
            post_hook(self, args, kwargs)
        return out

    wrapper.hooked = True  # type: ignore[attr-defined]
    return wrapper


def _step_seed(seed: int, step: int) -> int:
    """A seed for step ``step``: distinct steps get distinct, well-mixed seeds (splitmix64)."""
    z = (seed + (step + 1) * 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) % 2**63


def _broadcast_from_rank0(model: torch.nn.Module, group: Any, parameters: bool = True) -> None:
    """Rank 0's parameters (unless ``parameters`` is False) and buffers on every rank, as
    DistributedDataParallel does when it is built and before every forward pass."""
    from ..distributed.collectives import broadcast

    with torch.no_grad():
        for t in chain(model.parameters() if parameters else (), model.buffers()):
            broadcast(t, group)


class Optimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that trains ``model`` with any registered second-order (or
    first-order) method of :data:`secondorder.optim.registry.METHODS`.

    Usage::

        opt = Optimizer(model, nn.CrossEntropyLoss(), method="curveball")
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
        for epoch in range(epochs):
            for x, y in loader:
                loss = opt.step((x, y))  # the mean loss before the step, like a closure's value
            sched.step()

    Parameters
    ----------
    model : torch.nn.Module
        The network to train. Every parameter of ``model.named_parameters()`` with
        ``requires_grad=True`` is optimised (one parameter group; frozen parameters stay
        constants of the forward pass); the new values are written into these tensors in
        place after every step. Train mode and eval mode are honoured as the module docstring says.
    loss : secondorder.losses.Loss or torch loss module
        The objective on the module's output: a library loss (``MSE()``,
        ``SoftmaxCrossEntropy()``, ``SigmoidBCE()``) or ``nn.MSELoss``, ``nn.CrossEntropyLoss``,
        ``nn.BCEWithLogitsLoss`` (mean or sum reduction), mapped to the library's loss with the
        same scale by :func:`secondorder.losses.as_loss`.
    method : str, default ``"curveball"``
        A name in :data:`~secondorder.optim.registry.METHODS` (``"sgd"``, ``"adam"``,
        ``"curveball"``, ``"hessian-free"``, ``"newton"``, ``"levenberg-marquardt"``,
        ``"bfgs"``, ``"prox-linear"``, ``"grouped-newton"``, and any method registered later).
    dropout_seed : int or None, default None
        Seed of the random draws (dropout masks) of the module's forward passes: step ``t``
        uses one mask, drawn from a seed mixed from ``dropout_seed`` and ``t``, for all its
        forward passes. ``None`` takes ``torch.initial_seed()`` (so ``torch.manual_seed``
        makes runs reproducible); the generator itself is neither advanced nor reseeded. Saved
        in :meth:`state_dict`. The CPU generator and those of the CUDA devices holding
        parameters are handled; random draws on other devices are not fixed per step.
    data_parallel : bool or "auto", default "auto"
        Take data-parallel steps over the ranks of ``process_group`` (see the module
        docstring). ``"auto"``: when ``torch.distributed`` is initialised with more than one
        rank. ``True`` without an initialised process group raises
        :class:`~secondorder.errors.HyperparameterError`.
    process_group : default None
        The ``torch.distributed`` group of the data-parallel ranks (None: the default group).
    update_buffers : bool or "auto", default "auto"
        Whether to run, after an accepted step, one train-mode forward pass over the step's
        batch, at the parameters the step started from and without gradients, that updates the
        running statistics of the normalisation layers in train mode once
        (``num_batches_tracked`` += 1). ``True``: after every step. ``False``: never (the
        statistics stay as they are unless your own code runs the module in train mode).
        ``"auto"``: unless the module already ran a train-mode forward pass since the previous
        step (its ``num_batches_tracked`` moved), as the ``model(x)`` left in a torch loop does;
        then that pass has updated them, and they are updated once per step either way.
        Nothing to do when no normalisation layer is in train mode.
    lr : float, default: the method's
        The learning rate, a key of the parameter group that ``torch.optim.lr_scheduler``
        schedules. For methods with a learning rate (``sgd``, ``adam``, ``newton``,
        ``hessian-free`` and the Kronecker family) it is that hyperparameter, with its
        default. For methods that take a step of their own length (``curveball``,
        ``levenberg-marquardt``, ``prox-linear``) it is a multiplier on that step, default 1.0,
        applied through the method's ``transform=`` as ``scale(lr)`` (after your own
        ``transform``, if you give one); at exactly 1.0 without a transform no transform is
        added, so the step is bit-identical to the method's own. ``bfgs`` and
        ``grouped-newton`` have neither (their line search or cubic model sets the step):
        their ``lr`` is 1.0 and any other value raises
        :class:`~secondorder.errors.HyperparameterError`. A schedule (a callable of the step
        count) instead of a number is kept on the optimiser, outside the parameter group.
    **hyperparameters
        The method's own hyperparameters (``damping``, ``cg_iters``, ``momentum``, ...; see its
        class docstring), overriding the defaults: for ``sgd``, ``adam``, ``adamw`` and the
        Kronecker-factored methods the class's own (those a user of the class gets on JAX or
        NumPy: ``Adam``'s lr 1e-3 as ``torch.optim.Adam``, ``SGD``'s lr 0.01 without momentum,
        ``KFAC``'s T1 = 10 and T2 = 100), for the others the registry's, which make the class
        usable on a network (Newton's damping and line search, CurveBall's damping 1). Numbers,
        strings, booleans and tuples of them go into ``param_groups[0]`` next to ``lr``, where a
        scheduler or your code may change them between steps: the method object is then rebuilt
        with the new values (cheap in eager mode) and keeps its state; a value that switches
        momentum or weight decay on or off adds that transform's state (zeros) or drops it, as
        ``torch.optim.SGD`` creates or ignores its momentum buffer. Adam's ``b1`` and ``b2`` sit
        there as torch's ``betas`` pair (``betas=`` is accepted), which ``OneCycleLR`` and
        ``CyclicLR`` cycle. Hyperparameters that also seed the state (the initial ``damping`` of
        the damped methods) take effect at the first step; later the state's own, adapted value
        is used. Objects (a ``transform`` chain, an inner ``optimizer``, a partition) are kept
        on the optimiser, not in the parameter group, so :meth:`state_dict` stays loadable with
        ``weights_only=True``; pass them again when you rebuild the optimiser to resume.

    Attributes
    ----------
    method : str
        The method's name.
    info : StepInfo or None
        What the last step did (loss, step norm, damping, inner iterations, extras).
    method_state : NamedTuple or None
        The method's typed state (None before the first step).

    Notes
    -----
    ``step((x, y))`` returns the mean loss at the parameters the step started from (a 0-d
    tensor). ``zero_grad()`` works as in any optimiser; ``.grad`` is not read, so clip with
    ``transform=clip_by_global_norm(c)`` instead of ``clip_grad_norm_``. One parameter
    group only: :meth:`step` raises :class:`~secondorder.errors.HyperparameterError` if more
    were added. :meth:`state_dict` holds the parameter group (hyperparameters), the step count,
    the dropout seed and the method's state as a flat list of tensors, so
    ``torch.save(opt.state_dict(), f)`` and ``opt.load_state_dict(torch.load(f))`` (with the
    default ``weights_only=True``) resume bit-identically when the module's state is restored
    as well.
    """

    def __init__(self, model: torch.nn.Module, loss: Any, method: str = "curveball", *,
                 dropout_seed: int | None = None, update_buffers: bool | str = "auto",
                 data_parallel: bool | str = "auto", process_group: Any = None,
                 **hyperparameters: Any):
        from ..distributed.collectives import world_size
        from ..optim.registry import CLASS_DEFAULTS, METHODS

        # a DDP's forward and its gradient synchronisation are not used (nor DataParallel's or
        # a compiled module's forward): the step calls the module through torch.func
        model = unwrap(model) if isinstance(model, torch.nn.Module) else model

        if not isinstance(model, torch.nn.Module):
            raise StructureError(
                f"Optimizer takes the nn.Module itself, Optimizer(model, loss, method=...), not "
                f"{type(model).__name__}: second-order methods call the network's forward pass, "
                "so model.parameters() alone is not enough")
        if method not in METHODS:
            raise HyperparameterError(
                f"unknown method {method!r}; choose one of {', '.join(sorted(METHODS))} "
                "(secondorder.optim.registry.METHODS), or register your own with "
                "secondorder.optim.registry.register")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise StructureError(
                f"the module {type(model).__name__} has no parameters to optimise (none with "
                "requires_grad=True)")
        factory = METHODS[method]
        defaults, names, open_keywords = _hyperparameters(factory, method in CLASS_DEFAULTS)
        self._takes_transform = "transform" in names
        if "lr" in names:
            self._lr_mode = "native"
        elif "transform" in names:
            self._lr_mode = "transform"
        else:
            self._lr_mode = "none"
        # Adam's (b1, b2) sit in the group as torch.optim.Adam's "betas", which OneCycleLR and
        # CyclicLR cycle (they need "momentum" or "betas"); betas= is accepted too
        self._betas = {"b1", "b2"} <= names
        if self._betas and "betas" in hyperparameters:
            betas = hyperparameters.pop("betas")
            if "b1" in hyperparameters or "b2" in hyperparameters:
                raise HyperparameterError("pass betas=(b1, b2) or b1= and b2=, not both")
            if not (isinstance(betas, tuple | list) and len(betas) == 2):
                raise HyperparameterError(f"betas must be a pair (b1, b2), got {betas!r}")
            hyperparameters["b1"], hyperparameters["b2"] = betas
        unknown = set(hyperparameters) - names - {"lr"}
        if unknown and not open_keywords:
            raise HyperparameterError(
                f"method {method!r} has no hyperparameter {', '.join(sorted(unknown))}; it takes "
                f"{', '.join(sorted(names))} (and lr)")
        self._user_transform = hyperparameters.pop("transform", None)
        # a 0-d tensor (torch.optim takes lr=torch.tensor(0.1)) goes into the group as the
        # number it holds, where schedulers can read and scale it
        values = {**defaults, **{k: v.item() if isinstance(v, torch.Tensor) and v.ndim == 0
                                 else v for k, v in hyperparameters.items()}}
        values.pop("transform", None)
        if self._lr_mode != "native":
            values.setdefault("lr", 1.0)
        self._fixed = {k: v for k, v in values.items() if not _is_plain(v)}
        group = {k: v for k, v in values.items() if _is_plain(v)}
        if self._betas and "b1" in group and "b2" in group:
            group["betas"] = (group.pop("b1"), group.pop("b2"))
        self._names = (names | set(group) | set(self._fixed)) - {"transform"}
        super().__init__([{"params": [p for _, p in named], **group}], dict(group))

        self.method = method
        self.model = model
        self.loss = _to_loss(loss)
        if update_buffers not in (True, False, "auto"):
            raise HyperparameterError(
                f"update_buffers must be True, False or 'auto', got {update_buffers!r}")
        self.update_buffers = update_buffers
        self.dropout_seed = int(torch.initial_seed() if dropout_seed is None else dropout_seed)
        self.info: StepInfo | None = None
        if data_parallel not in (True, False, "auto"):
            raise HyperparameterError(
                f"data_parallel must be True, False or 'auto', got {data_parallel!r}")
        ranks = world_size(process_group)
        if data_parallel is True and ranks == 1 and not torch.distributed.is_initialized():
            raise HyperparameterError(
                "data_parallel=True needs an initialised torch.distributed process group: call "
                "torch.distributed.init_process_group(...) first (torchrun sets its variables)")
        self.data_parallel = bool(data_parallel) and ranks > 1
        self.process_group = process_group
        if self.data_parallel:
            _broadcast_from_rank0(model, process_group)
        self._factory = factory
        self._adapter = TorchModel(model, trainable_only=True)
        self._param_names = [n for n, _ in named]
        # the version of each .grad when autograd last finished writing it (a hook after every
        # backward's accumulation), so that a change made after backward() (clip_grad_norm_)
        # is told apart from autograd's own in-place accumulation
        versions: dict[int, int] = {}

        def record(p: torch.Tensor) -> None:
            versions[id(p)] = p.grad._version

        self._grad_versions = versions
        self._grad_hooks = [p.register_post_accumulate_grad_hook(record) for _, p in named]
        #: num_batches_tracked of the normalisation layers after the last step ("auto")
        self._tracked = self._adapter.batches_tracked()
        self._state: Any = None
        self._steps = 0
        self._built: tuple[Any, Any] | None = None  # (hyperparameters, method object)
        self._current_method()  # bad hyperparameter values fail here, not at the first step

    # ---------------------------------------------------------------- the method object
    @property
    def method_state(self) -> Any:
        """The method's typed state (a NamedTuple of tensors), None before the first step."""
        return self._state

    def _group(self) -> dict[str, Any]:
        if len(self.param_groups) != 1:
            raise HyperparameterError(
                f"secondorder's Optimizer runs one method on the whole module and supports one "
                f"parameter group, got {len(self.param_groups)}; build one Optimizer per module "
                "instead of add_param_group")
        return self.param_groups[0]

    def _current_method(self) -> Any:
        """The method object for the parameter group's current hyperparameters, rebuilt when
        a value changed (a scheduler, or user code)."""
        group = self._group()
        values = {k: group[k] for k in self._names if k in group}
        if self._built is not None:
            try:
                same = values == self._built[0]
            except RuntimeError:  # tensors of several elements compared by ==
                same = False
            if same:
                return self._built[1]
        hp = {**{k: v for k, v in values.items() if k not in ("lr", "betas")}, **self._fixed}
        if "betas" in values:
            if "b1" in values or "b2" in values:
                raise HyperparameterError(
                    "the parameter group holds Adam's moments as 'betas' = (b1, b2); set "
                    "group['betas'], not group['b1'] or group['b2']")
            hp["b1"], hp["b2"] = values["betas"]
        lr = values["lr"] if "lr" in values else hp.pop("lr", 1.0)  # a number, or a schedule
        if self._lr_mode == "native":
            hp["lr"] = lr
            if self._user_transform is not None:
                hp["transform"] = self._user_transform
        elif self._lr_mode == "transform":
            hp["transform"] = self._lr_transform(lr)
        elif not (isinstance(lr, int | float) and lr == 1.0):
            raise HyperparameterError(
                f"method {self.method!r} has no learning rate (its line search or model sets the "
                f"length of each step), so its parameter group's lr must stay 1.0, got {lr!r}; "
                "schedule it with a method that has one")
        method = self._factory(self._adapter, self.loss, **hp)
        if self.data_parallel:
            from ..distributed import data_parallel

            method = data_parallel(method, self.process_group)
        if self._state is not None and not self._keeps_structure(values):
            # momentum or weight decay switched on or off adds or drops a transform's state
            self._state = carry_over(self._state, method.init(self._params()))
        self._built = (dict(values), method)
        return method

    def _warn_if_stuck(self, info: StepInfo) -> None:
        """Warn once when a rejected step's loss, at the parameters it started from, is not
        finite: no step can be taken from there (each one is rejected the same way), which
        only ``info.finite`` would otherwise say."""
        if getattr(self, "_warned_loss", False) or bool(torch.isfinite(info.loss)):
            return
        self._warned_loss = True
        warnings.warn(
            f"the loss at the module's current parameters is {float(info.loss)}, so the step "
            "was rejected and the parameters left as they are; every later step will be "
            "rejected the same way. An earlier step diverged (or the model's output is not "
            "finite at these parameters): restore a checkpoint (model and optimizer "
            "state_dict) and train with a smaller lr or a larger damping",
            NonFiniteLossWarning, stacklevel=caller_level())

    def _warn_if_grad_edited(self) -> None:
        """Warn once when a parameter's ``.grad`` was changed in place after the backward pass
        that wrote it (its version counter moved since autograd's last accumulation:
        ``clip_grad_norm_``, a scaling by hand): the step computes its own gradient from the
        batch, so such a change does nothing, and a user who clips there would train
        unclipped without knowing."""
        if getattr(self, "_warned_grad", False):
            return
        versions = self._grad_versions
        edited = [n for n, p in self._named() if p.grad is not None and id(p) in versions
                  and p.grad._version != versions[id(p)]]
        if edited:
            self._warned_grad = True
            clip = ("clip with transform=secondorder.optim.transforms.clip_by_global_norm(c)"
                    if self._takes_transform else
                    f"{self.method!r} takes no transform (its line search sets the step)")
            warnings.warn(
                f"the .grad of {len(edited)} parameter(s) ({', '.join(edited[:3])}"
                f"{', ...' if len(edited) > 3 else ''}) was changed in place after backward() "
                "(clip_grad_norm_, say). secondorder's step computes its gradient from the "
                f"batch it is given and does not read .grad, so the change has no effect: {clip}",
                stacklevel=3)

    def _keeps_structure(self, values: dict[str, Any]) -> bool:
        """Whether ``values`` differ from the built ones only in numbers that cannot change
        the state's structure, so the rebuilt method need not initialise a template state (a
        copy of the parameters and zeros for every buffer) to merge the old state into: a
        numeric lr given to the method itself, or a real-valued hyperparameter (Adam's betas,
        momentum, weight decay, damping) that stays non-zero or stays zero (a value that
        switches momentum or weight decay on or off adds or drops a transform's state; an
        integer hyperparameter may set the state's shapes). A scheduler that cycles
        ``betas`` or ``momentum`` at every step (``OneCycleLR``) takes this path."""
        if self._built is None or self._lr_mode != "native":
            return False
        old = self._built[0]
        if set(old) != set(values):
            return False
        spec = getattr(getattr(self._factory, "cls", None), "hyperparameters", None) or {}

        def real(v: Any) -> bool:
            return isinstance(v, int | float) and not isinstance(v, bool)

        def same_kind(a: Any, b: Any) -> bool:
            if isinstance(a, tuple | list) and isinstance(b, tuple | list):
                return len(a) == len(b) and all(map(same_kind, a, b))
            return real(a) and real(b) and (a == 0) == (b == 0)

        for key, value in values.items():
            if value is old[key]:
                continue
            if key == "lr":
                if not (real(value) and real(old[key])):
                    return False
            elif key == "betas":
                if not same_kind(value, old[key]):
                    return False
            elif key not in spec or "integer" in spec[key] or not same_kind(value, old[key]):
                return False
        return True

    def _lr_transform(self, lr: Any) -> Any:
        """The transform that multiplies the method's step by ``lr`` (a number, or a schedule
        of the step count), after the user's own transform."""
        from ..optim.transforms import chain, scale, scale_by_schedule

        multiplier = scale_by_schedule(lr) if callable(lr) else scale(lr)
        if self._user_transform is None:
            if isinstance(lr, int | float) and lr == 1.0:
                return None  # the method's own step, to the last bit
            return multiplier
        return chain(self._user_transform, multiplier)

    def _named(self) -> zip:
        """(name, tensor) of the parameters, the tensors as the parameter group holds them."""
        return zip(self._param_names, self._group()["params"], strict=True)

    def _params(self) -> dict[str, torch.Tensor]:
        """Copies of the module's current parameters (the method may keep references to the
        parameters it is given; the module's tensors are overwritten in place)."""
        return {n: p.detach().clone() for n, p in self._named()}

    def _aliases(self) -> dict[str, torch.Tensor]:
        """The module's parameters as detached tensors that share their storage (no copy): a
        pure step only reads them (a donated gradient step adds its update into them, after its
        guard accepted it); :meth:`_write_back` protects any state leaf that still shares their
        storage before overwriting them."""
        return {n: p.detach() for n, p in self._named()}

    def _write_back(self, new: dict[str, torch.Tensor], state: Any) -> Any:
        """Copy ``new`` into the module's parameters in place, first cloning the leaves of
        ``state`` that share storage with them (a method that keeps the parameters it was given,
        e.g. as an anchor, must keep the old values). Returns the state."""
        targets = [p for _, p in self._named()]
        storage = {p.untyped_storage().data_ptr() for p in targets}
        leaves, treedef = flatten(state)
        if any(isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() in storage
               for v in leaves):
            state = unflatten(treedef, [
                v.clone() if isinstance(v, torch.Tensor)
                and v.untyped_storage().data_ptr() in storage else v for v in leaves])
        pairs = [(p, new[n]) for n, p in zip(self._param_names, targets)
                 if new[n].data_ptr() != p.data_ptr()]
        if pairs:
            with torch.no_grad():
                torch._foreach_copy_([p for p, _ in pairs], [v for _, v in pairs])
        return state

    # ---------------------------------------------------------------- stepping
    @_step_hooks
    def step(self, batch: Any = None, closure: Any = None) -> torch.Tensor:  # type: ignore[override]
        """One step of the method on the batch ``(x, y)``: the module's parameters are
        replaced in place by the new ones, running statistics of train-mode normalisation
        layers updated once (see ``update_buffers``). Returns the mean loss at the parameters
        the step started from (a 0-d tensor, detached).

        ``closure`` exists only to explain that it cannot be used: pass the batch instead.
        """
        if closure is not None or callable(batch):
            raise MissingBatchError(
                "secondorder's Optimizer.step takes the batch, not a closure: second-order "
                "methods need the model output and the loss separately, at parameters of their "
                "own choosing. Call opt.step((x, y)) with the inputs and targets of the batch")
        if batch is None:
            raise MissingBatchError(
                "Optimizer.step needs the batch: call opt.step((x, y)) with the inputs and "
                "targets the loss compares the module's output with")
        if not (isinstance(batch, tuple | list) and len(batch) == 2):
            raise MissingBatchError(
                f"Optimizer.step takes the batch as a pair (x, y), got {type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, tuple | list) else ""))
        x, y = batch
        self._warn_if_grad_edited()
        method = self._current_method()
        frozen = self._frozen_since_built()
        params = self._aliases()
        if self._state is None:
            self._state = method.init(self._params())
        training = self.model.training
        context = (self._adapter.randomness(_step_seed(self.dropout_seed, self._steps))
                   if training and self._adapter.random else nullcontext())
        # the gradient methods add their update into the module's tensors (no new tree to
        # copy back), unless the running statistics still need the old parameters
        donate = (isinstance(method, GradientDescent) and not frozen
                  and not (training and self._adapter.has_running_stats))
        with context:
            new, state, info = (method.step(params, self._state, (x, y), donate=True)
                                if donate else method.step(params, self._state, (x, y)))
            accepted = bool(info.finite)
            if accepted and training and self._should_update_buffers():
                self._adapter.update_buffers(x)  # the module still holds the old parameters
        if self.data_parallel and training and self._adapter.has_running_stats:
            # running statistics of the local shard: rank 0's everywhere, as DDP does
            _broadcast_from_rank0(self.model, self.process_group, parameters=False)
        if frozen:  # frozen since the optimiser was built: they keep their values
            new = {n: params[n] if n in frozen else v for n, v in new.items()}
        self._state = self._write_back(new, state)
        self._steps += 1
        self.info = info
        if not accepted:
            self._warn_if_stuck(info)
        if self.update_buffers == "auto":
            self._tracked = self._adapter.batches_tracked()
        return info.loss.detach()

    def _frozen_since_built(self) -> set[str]:
        """The names of the optimised parameters whose ``requires_grad`` was switched off
        after the optimiser was built; they are kept fixed, as ``torch.optim`` skips them. A
        warning (once per set) says what this does not change: the method still treats them as
        variables in its curvature (exact for the per-layer methods, SGD, Adam and the
        Kronecker family, not for those that couple all parameters), and a parameter unfrozen
        since is not trained; a new optimiser takes the new set."""
        frozen = {n for n, p in self._named() if not p.requires_grad}
        optimised = set(self._param_names)
        unfrozen = sorted(n for n, p in self.model.named_parameters()
                          if p.requires_grad and n not in optimised)
        change = (tuple(sorted(frozen)), tuple(unfrozen))
        if any(change) and change != getattr(self, "_warned_freeze", None):
            self._warned_freeze = change
            parts = []
            if frozen:
                parts.append(f"{sorted(frozen)} were frozen after the optimiser was built and are "
                             "kept fixed, but the method still treats them as variables in its "
                             "curvature")
            if unfrozen:
                parts.append(f"{unfrozen} require grad but were frozen when it was built, and "
                             "are not trained")
            warnings.warn(f"parameters {'; '.join(parts)}. Build a new Optimizer for the new "
                          "set of trainable parameters", UserWarning, stacklevel=4)
        return frozen

    def _should_update_buffers(self) -> bool:
        if self.update_buffers != "auto":
            return bool(self.update_buffers)
        return self._adapter.has_running_stats and self._adapter.batches_tracked() == self._tracked

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch's state dict (the parameter group with its hyperparameters) plus, under
        ``state["secondorder"]``, the method's name, the step count, the dropout seed and the
        method's state as a flat list of tensors (None before the first step): only tensors,
        numbers, strings, lists and dicts, so ``torch.load`` with ``weights_only=True`` reads
        it."""
        out = super().state_dict()
        leaves = None if self._state is None else list(flatten(self._state)[0])
        out["state"]["secondorder"] = {"method": self.method, "step": self._steps,
                                       "dropout_seed": self.dropout_seed,
                                       "batches_tracked": list(self._tracked), "leaves": leaves}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved, into an optimiser built with the same method
        on a module of the same structure (restore the module with its own
        ``load_state_dict``)."""
        state = dict(state_dict.get("state", {}))
        ours = state.pop("secondorder", None)
        if not isinstance(ours, dict) or "leaves" not in ours:
            raise StateError(
                "this state dict was not saved by secondorder.integrations.torch.Optimizer "
                "(no 'secondorder' entry in its 'state')")
        if ours.get("method") != self.method:
            raise StateError(
                f"the state dict holds a {ours.get('method')!r} state; this optimiser runs "
                f"{self.method!r}: build it with method={ours.get('method')!r}")
        super().load_state_dict({**state_dict, "state": state})
        self.state.clear()
        self._steps = int(ours["step"])
        self.dropout_seed = int(ours["dropout_seed"])
        self._tracked = list(ours.get("batches_tracked", self._adapter.batches_tracked()))
        self._built = None
        self._state = None
        method = self._current_method()
        if ours["leaves"] is None:
            return
        params = self._params()
        template_leaves, treedef = flatten(method.init(params))
        leaves = list(ours["leaves"])
        if len(leaves) != len(template_leaves) or any(
                getattr(a, "shape", None) != getattr(b, "shape", None)
                for a, b in zip(leaves, template_leaves)):
            raise StateError(
                f"the saved {self.method} state does not fit this module's parameters "
                f"({len(leaves)} arrays saved, {len(template_leaves)} expected, or their shapes "
                "differ)")
        device = next(iter(params.values())).device
        # on the parameters' device, and floating leaves in the template's dtype (a float32 run
        # resumed on a module converted with .double(), as torch.optim casts its state)
        self._state = unflatten(treedef, [
            v.to(device=device, dtype=t.dtype if v.is_floating_point()
                 and isinstance(t, torch.Tensor) and t.is_floating_point() else v.dtype)
            if isinstance(v, torch.Tensor) else v for v, t in zip(leaves, template_leaves)])
