"""Native models as pure functions: ``apply, params = from_torch(module)`` or ``from_jax``.

``from_torch`` calls the module through ``torch.func.functional_call`` with a parameter dict (one
entry per named parameter, in the module's order, which every tree operation and optimiser step
keeps; the canonical leaf order, and so the layer table's leaf indices, sorts the names), so the
result differentiates with ``torch.func`` like any other function of a parameter tree. Its
``nn.Linear`` and ``nn.Conv2d`` layers are tappable through forward hooks: the hook adds the tap
to the layer's output and records its input (im2col patches for convolutions, by
``torch.nn.functional.unfold``), with the same layouts as the reference models. ``from_jax``
wraps any pure JAX apply function (flax ``Module.apply``, an equinox model split into arrays and
static parts, ...) as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import SecondOrderError
from .base import Array, LayerInfo, Model


class TorchModel(Model):
    """A ``torch.nn.Module`` as ``apply(params, x, taps=None)``."""

    def __init__(self, module: Any):
        import torch

        self.module = module
        names = sorted(name for name, _ in module.named_parameters())
        index = {name: i for i, name in enumerate(names)}
        self.names = names
        self._tapped = []
        layers = []
        for prefix, sub in module.named_modules():
            if isinstance(sub, torch.nn.Linear | torch.nn.Conv2d):
                kind = "dense" if isinstance(sub, torch.nn.Linear) else "conv"
                w = index[f"{prefix}.weight" if prefix else "weight"]
                b_name = f"{prefix}.bias" if prefix else "bias"
                b = index.get(b_name) if sub.bias is not None else None
                fan_in = sub.weight[0].numel()
                layers.append(LayerInfo(kind, w, b, fan_in, sub.weight.shape[0]))
                self._tapped.append(sub)
        self.layers = tuple(layers)
        self._shapes: dict[tuple, list[tuple[int, ...]]] = {}

    def params(self) -> dict[str, Array]:
        """The module's current parameters, detached copies keyed by name."""
        return {n: p.detach().clone() for n, p in self.module.named_parameters()}

    def apply(self, params: Any, x: Array, taps: list[Array] | None = None) -> Any:
        from torch.func import functional_call

        if taps is None:
            return functional_call(self.module, params, (x,))
        inputs: list[Array] = [None] * len(self._tapped)  # by layer, whatever the call order
        handles = [sub.register_forward_hook(self._hook(k, tap, inputs))
                   for k, (sub, tap) in enumerate(zip(self._tapped, taps))]
        try:
            out = functional_call(self.module, params, (x,))
        finally:
            for h in handles:
                h.remove()
        return out, inputs

    @staticmethod
    def _hook(k: int, tap: Array, inputs: list[Array]) -> Callable:
        import torch

        def hook(mod: Any, args: tuple, out: Array) -> Array:
            a = args[0]
            if isinstance(mod, torch.nn.Conv2d):
                a = torch.nn.functional.unfold(a, mod.kernel_size, mod.dilation, mod.padding,
                                               mod.stride).transpose(1, 2)
                m, c_out, ho, wo = out.shape
                out = out + tap.transpose(1, 2).reshape(m, c_out, ho, wo)
            else:
                out = out + tap
            if mod.bias is not None:
                a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
            inputs[k] = a
            return out

        return hook

    def tap_shapes(self, x: Array) -> list[tuple[int, ...]]:
        import torch

        key = tuple(x.shape)
        if key not in self._shapes:
            shapes: list[tuple[int, ...]] = []

            def record(mod: Any, args: tuple, out: Array) -> None:
                if out.ndim == 4:
                    m, c, h, w = out.shape
                    shapes.append((m, h * w, c))
                else:
                    shapes.append(tuple(out.shape))

            handles = [sub.register_forward_hook(record) for sub in self._tapped]
            try:
                with torch.no_grad():
                    self.module(x)
            finally:
                for h in handles:
                    h.remove()
            self._shapes[key] = shapes
        return self._shapes[key]


def from_torch(module: Any) -> tuple[TorchModel, dict[str, Array]]:
    """``(apply, params)`` for a ``torch.nn.Module``: ``apply(params, x)`` is the module's
    forward pass with ``params`` (a dict name -> tensor) in place of its own parameters."""
    model = TorchModel(module)
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
