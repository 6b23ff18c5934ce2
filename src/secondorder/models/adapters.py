"""Native models as pure functions: ``apply, params = from_torch(module)`` or ``from_jax``.

``from_torch`` calls the module through ``torch.func.functional_call`` with a parameter dict (one
entry per named parameter, in the module's order, which every tree operation and optimiser step
keeps; the canonical leaf order, and so the layer table's leaf indices, sorts the names), so the
result differentiates with ``torch.func`` like any other function of a parameter tree. Its
``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` layers are tappable through forward hooks: the
hook adds the tap to the layer's output and records its input (im2col patches for convolutions,
by ``torch.nn.functional.unfold``, after the layer's own padding: a ``padding_mode`` or an
asymmetric ``padding="same"``; a ``Conv1d`` as a 2-D convolution on a 1 x L image), with the
same layouts as the reference models. A ``Linear`` layer on (m, ..., d_in) inputs (a sequence)
shares its weight over the middle axes, like a convolution with a 1 x 1 kernel over positions:
its input is recorded as (m, positions, d_in [+1]) and its tap is (m, positions, d_out). Taps
are matched to layers in the module's registration order, whatever order the forward pass calls
them in; a tapped layer must be called exactly once per forward pass (else
``UnsupportedModelError``). Grouped convolutions (``groups > 1``), the projections of
``nn.MultiheadAttention`` (its ``in_proj_weight`` is a bare parameter and it applies
``out_proj``'s weight without calling ``out_proj``; so also in ``nn.TransformerEncoderLayer``,
whose feed-forward ``linear1`` and ``linear2`` are tapped) and every other layer type are not
tapped: methods with per-layer blocks treat their parameters as they treat any untapped leaf
(K-FAC's and K-BFGS's ``fallback``). Torch's fused inference path for attention (eval mode
without autograd's tape), which has no derivatives, is turned off inside ``apply``. A weight
tied between layers (``b.weight = a.weight``) is one parameter, named after the
first module that registers it; the first Linear or convolution that uses it is tapped, the
others are not (their use of the weight reaches its gradient, not its curvature block). So a
language model's output layer tied to its embedding (``head.weight = emb.weight``) is tapped,
its curvature block taken from the output layer alone. ``from_jax`` wraps any pure JAX apply
function (flax ``Module.apply``, an equinox model split into arrays and static parts, ...) as
it is.

Modules with state (``from_torch``). An optimiser calls ``apply`` many times per step, inside
``torch.func`` transforms, so ``apply`` itself never writes to the module:

- normalisation layers in train mode (``BatchNorm*``, ``InstanceNorm*`` with running statistics)
  normalise with the batch statistics, as in any train-mode forward pass, but leave their
  running statistics and ``num_batches_tracked`` untouched (in-place updates of captured buffers
  are impossible under ``torch.func`` and would count every call of a step). Layers in eval mode
  use their running statistics, as usual. :meth:`TorchModel.update_buffers` is the one
  train-mode forward pass per step that updates them;
- random layers (``Dropout``, ...) draw from torch's generator; inside
  ``with model.randomness(seed):`` every call of ``apply`` starts from the same generator state,
  so all the forward passes of one step use one dropout mask, and the caller's generator is
  restored afterwards. Outside that context each call draws afresh.

:class:`secondorder.integrations.torch.Optimizer` does both for every step.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .._pytree import flatten
from ..errors import SecondOrderError, UnsupportedModelError
from .base import Array, LayerInfo, Model, check_batch_axis


class TorchModel(Model):
    """A ``torch.nn.Module`` as ``apply(params, x, taps=None)``.

    ``apply`` never mutates the module (see the module docstring): normalisation layers in train
    mode use batch statistics without updating their running statistics, and inside
    :meth:`randomness` every call draws the same random numbers. :meth:`update_buffers` runs the
    one forward pass that updates the running statistics.
    """

    #: buffers of a normalisation layer that its train-mode forward pass updates in place
    _STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")

    def __init__(self, module: Any, trainable_only: bool = False):
        import torch
        from torch.nn.modules.batchnorm import _NormBase

        module = unwrap(module)
        self.module = module
        self.trainable_only = trainable_only
        names = sorted(name for name, p in module.named_parameters()
                       if p.requires_grad or not trainable_only)
        index = {name: i for i, name in enumerate(names)}
        self.names = names
        self._tapped = []
        layers = []
        norms = []
        # a parameter's name is the first that registers it (a tied weight has one); a layer
        # whose weight is tied is tapped unless an earlier tapped layer holds that weight, so
        # a language model's output layer tied to its (untapped) embedding is tapped
        name_of = {id(p): name for name, p in module.named_parameters() if name in index}
        attention = [sub for sub in module.modules()
                     if isinstance(sub, torch.nn.MultiheadAttention)]
        # nn.MultiheadAttention applies its out_proj's weight with F.linear, never through
        # out_proj's forward: no hook sees it, so it stays untapped like in_proj_weight
        claimed: set[int] = {id(p) for sub in attention for p in sub.out_proj.parameters()}
        #: whether the module holds nn.MultiheadAttention (whose fused inference kernel
        #: ``apply`` turns off: it has no derivatives)
        self.attention = bool(attention)
        for prefix, sub in module.named_modules():
            # grouped convolutions are not tapped (their weight is block-diagonal over groups,
            # which the Kronecker blocks do not model): their parameters are left untapped,
            # like those of every other layer type
            own = ([id(p) for p in (sub.weight, sub.bias) if p is not None and id(p) in name_of]
                   if isinstance(sub, torch.nn.Linear | torch.nn.Conv1d | torch.nn.Conv2d)
                   else [])
            if (own and id(sub.weight) in name_of and getattr(sub, "groups", 1) == 1
                    and claimed.isdisjoint(own)):
                claimed.update(own)
                kind = "dense" if isinstance(sub, torch.nn.Linear) else "conv"
                w = index[name_of[id(sub.weight)]]
                b = (index[name_of[id(sub.bias)]]
                     if sub.bias is not None and id(sub.bias) in name_of else None)
                fan_in = sub.weight[0].numel()
                layers.append(LayerInfo(kind, w, b, fan_in, sub.weight.shape[0]))
                self._tapped.append(sub)
            if isinstance(sub, _NormBase):  # BatchNorm*, SyncBatchNorm, InstanceNorm*
                buffers = [f"{prefix}.{b}" if prefix else b for b in self._STAT_BUFFERS
                           if getattr(sub, b, None) is not None]
                if buffers:
                    norms.append((sub, buffers))
        self.layers = tuple(layers)
        # leaves that more than one module holds (tied weights): a tap sees one module's use
        # of them, so a Gram matrix or gradient assembled from taps alone would miss the rest
        holders = Counter(id(p) for sub in module.modules() for p in sub.parameters(recurse=False))
        #: indices of the leaves held by more than one module (tied parameters)
        self.shared = frozenset(index[name_of[i]] for i, n in holders.items()
                                if n > 1 and i in name_of)
        self._norms = norms
        #: whether a forward pass may draw random numbers: a dropout-type layer, or a module
        #: class of the user's (whose forward we cannot see); a composition of torch.nn's own
        #: deterministic layers needs no per-step seeding
        self.random = any(
            isinstance(sub, torch.nn.modules.dropout._DropoutNd | torch.nn.RReLU)
            or not type(sub).__module__.startswith("torch.nn.")
            for sub in module.modules())
        self._rng: list[tuple[Any, Any]] | None = None  # (generator, state) pairs
        self._shapes: dict[tuple, list[tuple[int, ...]]] = {}

    def params(self) -> dict[str, Array]:
        """The module's current parameters, detached copies keyed by name (only those with
        ``requires_grad`` when the model was built with ``trainable_only``)."""
        return {n: p.detach().clone() for n, p in self.module.named_parameters()
                if p.requires_grad or not self.trainable_only}

    @property
    def has_running_stats(self) -> bool:
        """True when some normalisation layer is in train mode and tracks running statistics
        (then :meth:`update_buffers` has work to do)."""
        return any(sub.training for sub, _ in self._norms)

    def batches_tracked(self) -> list[int]:
        """``num_batches_tracked`` of every normalisation layer that has it, in module order
        (how many train-mode forward passes updated its running statistics)."""
        import torch

        counts = [sub.num_batches_tracked for sub, _ in self._norms
                  if getattr(sub, "num_batches_tracked", None) is not None]
        return torch.stack(counts).tolist() if counts else []  # one device read for all

    def _frozen_stats(self) -> dict[str, None]:
        """Overrides for ``functional_call`` that hide the running statistics of train-mode
        normalisation layers: with ``running_mean = running_var = None`` a layer normalises with
        the batch statistics and updates nothing."""
        return {name: None for sub, names in self._norms if sub.training for name in names}

    def _call(self, params: Any, x: Array) -> Any:
        import torch

        if self._rng is not None and self.module.training:
            self._restore_rng()
        overrides = self._frozen_stats()
        if overrides:
            params = {**params, **overrides}
        out = self._functional_call(params, x)
        if not isinstance(out, torch.Tensor):
            raise UnsupportedModelError(
                f"the module's forward returned a {type(out).__name__}, not a tensor: the "
                "methods differentiate the network's output array against the loss. Wrap the "
                "module so that forward returns the output the loss reads (e.g. "
                "`return self.net(x)[0]`, or `.logits` of a model output object)")
        return out

    def _functional_call(self, params: Any, x: Array) -> Any:
        """The module's forward pass on ``x`` with ``params`` in place of its own (a partial
        dict keeps the others), attention's fused inference path off (:func:`_without_fastpath`).
        """
        from torch.func import functional_call

        if self.attention:
            return _without_fastpath(functional_call, self.module, params, (x,))
        return functional_call(self.module, params, (x,))

    def apply(self, params: Any, x: Array, taps: list[Array] | None = None) -> Any:
        if taps is None:
            return self._call(params, x)
        inputs: list[Array] = [None] * len(self._tapped)  # by layer, whatever the call order
        handles = [sub.register_forward_hook(
                       self._hook(k, tap, inputs, self.layers[k].bias is not None))
                   for k, (sub, tap) in enumerate(zip(self._tapped, taps))]
        try:
            out = self._call(params, x)
        finally:
            for h in handles:
                h.remove()
        return out, inputs

    # ------------------------------------------------------------------ state of the module
    @contextmanager
    def randomness(self, seed: int) -> Iterator[None]:
        """Within the block, every call of :meth:`apply` (and :meth:`update_buffers`) on a module
        in train mode starts from the state that seeding the default generators with ``seed``
        gives: all forward passes draw the same dropout masks. The generators of the CPU and of
        the CUDA devices that hold parameters are restored on exit, so the caller's random
        stream is untouched."""
        import torch

        devices = sorted({p.device.index or 0 for p in self.module.parameters() if p.is_cuda})
        if devices:
            torch.cuda.init()
        generators = [torch.default_generator,
                      *(torch.cuda.default_generators[d] for d in devices)]
        saved = [g.get_state() for g in generators]
        previous = self._rng
        try:
            states = []
            for g in generators:  # Generator.manual_seed: torch.manual_seed costs ~2 ms a call
                g.manual_seed(seed)
                states.append(g.get_state())
            self._rng = list(zip(generators, states))
            yield
        finally:
            self._rng = previous
            for g, state in zip(generators, saved):
                g.set_state(state)

    def _restore_rng(self) -> None:
        for generator, state in self._rng:
            generator.set_state(state)

    def update_buffers(self, x: Array, params: Any = None) -> None:
        """One train-mode forward pass over ``x`` without gradients, at ``params`` (the module's
        own parameters when None), that updates the running statistics of the normalisation
        layers in train mode once (``num_batches_tracked`` += 1). Inside :meth:`randomness` it
        draws the masks every :meth:`apply` of the block draws. Nothing to do (and no forward
        pass) when no such layer is in train mode."""
        import torch
        from torch.func import functional_call

        if not self.has_running_stats:
            return
        if self._rng is not None and self.module.training:
            self._restore_rng()
        with torch.no_grad():
            if params is None:
                self.module(x)
            else:
                functional_call(self.module, params, (x,))

    @staticmethod
    def _hook(k: int, tap: Array, inputs: list[Array], bias: bool) -> Callable:
        """The forward hook of tapped layer ``k``: adds the tap to its output and records its
        input (with the column of ones when its bias is one of the tapped parameters; a bias
        left out, frozen with ``trainable_only``, is a constant)."""
        import torch

        def hook(mod: Any, args: tuple, out: Array) -> Array:
            a = args[0]
            if isinstance(mod, torch.nn.Conv1d | torch.nn.Conv2d):
                padding = mod.padding
                if mod.padding_mode != "zeros" or isinstance(padding, str):
                    # the patches the layer sees: reflect / replicate / circular padding, and
                    # padding="same" (asymmetric for even kernels), applied as the layer does
                    mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
                    a = torch.nn.functional.pad(a, mod._reversed_padding_repeated_twice, mode)
                    padding = (0,) * len(mod.kernel_size)
                geometry = (mod.kernel_size, mod.dilation, padding, mod.stride)
                if isinstance(mod, torch.nn.Conv1d):  # a 2-D convolution on a 1 x L image
                    a = a.unsqueeze(-2)
                    kernel, dilation, pads, stride = geometry
                    geometry = ((1, *kernel), (1, *dilation), (0, *pads), (1, *stride))
                a = torch.nn.functional.unfold(a, *geometry).transpose(1, 2)
                out = out + tap.transpose(1, 2).reshape(out.shape)
            else:  # a Linear layer, on (m, d_in) or weight-shared on (m, ..., d_in)
                if a.ndim > 2:
                    a = a.reshape(a.shape[0], -1, a.shape[-1])
                out = out + tap.reshape(out.shape)
            if bias:
                a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
            inputs[k] = a
            return out

        return hook

    def _tap_placement(self, x: Array) -> tuple[Any, Any, Any]:
        """The batch's device, the dtype of the module's floating parameters."""
        import torch

        dtype = next((p.dtype for p in self.module.parameters() if p.is_floating_point()),
                     torch.get_default_dtype())
        return torch, _tensors(x)[0].device, dtype

    def tap_shapes(self, x: Array) -> list[tuple[int, ...]]:
        """The output shape of every tapped layer, in the order of :attr:`layers` (the
        module's registration order, which need not be the order its forward pass calls them),
        from one forward pass without gradients at the module's own parameters. Raises
        :class:`~secondorder.errors.UnsupportedModelError` for a tapped layer that the forward
        pass calls not exactly once (its tap would be missing or ambiguous)."""
        import torch

        # a batch of several tensors (a dict or tuple the forward takes as one argument) is
        # keyed by all their shapes; its samples are the first axis of its first tensor
        arrays = _tensors(x)
        key = tuple(tuple(a.shape) for a in arrays)
        if key not in self._shapes:
            shapes: list[tuple[int, ...] | None] = [None] * len(self._tapped)
            calls = [0] * len(self._tapped)

            def recorder(k: int) -> Callable:
                def record(mod: Any, args: tuple, out: Array) -> None:
                    calls[k] += 1
                    m = out.shape[0]
                    if isinstance(mod, torch.nn.Linear):  # (m, d_out) or (m, ..., d_out)
                        shapes[k] = ((m, out.shape[-1]) if out.ndim == 2
                                     else (m, math.prod(out.shape[1:-1]), out.shape[-1]))
                    else:  # (m, C_out, *spatial)
                        shapes[k] = (m, math.prod(out.shape[2:]), out.shape[1])

                return record

            handles = [sub.register_forward_hook(recorder(k))
                       for k, sub in enumerate(self._tapped)]
            try:
                with torch.no_grad(), torch.random.fork_rng(devices=[]):
                    # the module's own parameters; running statistics left as they are
                    self._functional_call(self._frozen_stats(), x)
            finally:
                for h in handles:
                    h.remove()
            if any(n != 1 for n in calls):
                names = {id(sub): prefix or type(sub).__name__
                         for prefix, sub in self.module.named_modules()}
                wrong = [f"{names[id(sub)]!r} ({n} calls)"
                         for sub, n in zip(self._tapped, calls) if n != 1]
                raise UnsupportedModelError(
                    "this method taps every Linear, Conv1d and Conv2d layer (its input and output "
                    "gradient), so each must be called exactly once per forward pass through its "
                    f"own forward(); here {', '.join(wrong)} are not (a layer reused, or its "
                    "weight applied directly, as in F.linear(x, self.fc.weight)). Call the layer "
                    "itself once per forward pass (a second use as a separate layer), or use a "
                    "method without taps for this model: 'shampoo', 'tnt', 'sgd' or 'adam' "
                    "(gradients only), 'curveball' or 'hessian-free'")
            names = {id(sub): prefix for prefix, sub in self.module.named_modules()}
            check_batch_axis([(names[id(sub)], s) for sub, s in zip(self._tapped, shapes)],
                             int(arrays[0].shape[0]))
            self._shapes[key] = shapes
        return self._shapes[key]


def _without_fastpath(f: Callable, *args: Any) -> Any:
    """``f(*args)`` with torch's fused inference path of nn.MultiheadAttention and the
    Transformer layers turned off (``torch.backends.mha``): in eval mode, without autograd's
    tape (a forward-mode pass, ``torch.no_grad``), those layers would otherwise call one fused
    kernel that has no derivatives and bypasses their submodules."""
    import torch

    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        return f(*args)
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def _tensors(x: Any) -> list[Any]:
    """The tensors of a batch: ``x`` itself, or those of a dict, tuple or list of them that
    the module's forward takes as one argument."""
    import torch

    return [a for a in flatten(x)[0] if isinstance(a, torch.Tensor)]


def unwrap(module: Any) -> Any:
    """The module that a wrapper runs: ``DistributedDataParallel`` and ``DataParallel`` hold
    it as ``module``, ``torch.compile`` as ``_orig_mod``. The methods call the network through
    ``torch.func`` with parameters of their choosing, which none of the wrappers supports
    (``DataParallel`` raises, a compiled module skips the layer hooks); the wrapped module shares
    its parameters with the wrapper, so the wrapper sees every step."""
    import torch

    while True:
        if isinstance(module, torch.nn.DataParallel | torch.nn.parallel.DistributedDataParallel):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), torch.nn.Module):
            module = module._orig_mod  # noqa: SLF001 - torch.compile's OptimizedModule
        else:
            return module


def from_torch(module: Any, trainable_only: bool = False
               ) -> tuple[TorchModel, dict[str, Array]]:
    """``(apply, params)`` for a ``torch.nn.Module``: ``apply(params, x)`` is the module's
    forward pass with ``params`` (a dict name -> tensor) in place of its own parameters.

    ``trainable_only`` (default False): when True, ``params`` holds only the parameters with
    ``requires_grad`` (frozen ones stay the module's own constants inside ``apply``, and a
    layer whose weight is frozen is not tapped); when False, every parameter."""
    model = TorchModel(module, trainable_only)
    return model, model.params()


class JaxModel(Model):
    """A pure JAX apply function ``apply_fn(params, x)`` as a model (no taps)."""

    def __init__(self, apply_fn: Callable[[Any, Array], Array]):
        self.apply_fn = apply_fn

    def apply(self, params: Any, x: Array, taps: list[Array] | None = None) -> Any:
        if taps is not None:
            raise SecondOrderError(
                "a wrapped JAX apply function has no layer taps; use a secondorder reference "
                "model (MLP, ConvNet) for per-layer Kronecker statistics"
            )
        return self.apply_fn(params, x)

    def tap_shapes(self, x: Array) -> list[tuple[int, ...]]:
        return []


def from_jax(apply_fn: Callable[[Any, Array], Array], params: Any) -> tuple[JaxModel, Any]:
    """``(apply, params)`` for a pure JAX apply function and its parameter tree."""
    return JaxModel(apply_fn), params
