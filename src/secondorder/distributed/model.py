"""A network whose batch is sharded over torch.distributed ranks, seen as one network on the
whole batch.

``DataParallel(model)(params, x_r)`` runs the network on the local shard ``x_r`` with the
parameters entering through :func:`~.collectives.replicate` and returns the outputs of the
whole batch through :func:`~.collectives.gather_rows`; with layer taps (K-FAC, K-BFGS, SMW) the
taps are whole-batch arrays cut to the shard by :func:`~.collectives.scatter_rows` and the
layers' inputs come back gathered. Every method built on it therefore sees the network of a
single process on the whole batch, and its Jacobian products, J v = gather(J_r v) and
J^T u = sum_r J_r^T u_r, are those of that network: no method has communication code of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._pytree import flatten, tree_map, unflatten
from ..models.base import Model
from . import collectives

Array = Any


def _replicate(params: Any, group: Any) -> Any:
    """``params`` through :func:`~.collectives.replicate` as one flat vector when its leaves
    share a dtype and device (one all-reduce per VJP, like a single gradient bucket), else leaf
    by leaf."""
    leaves, treedef = flatten(params)
    if len(leaves) < 2 or len({(a.dtype, a.device) for a in leaves}) > 1:
        return tree_map(lambda a: collectives.replicate(a, group), params)
    import torch

    flat = collectives.replicate(torch.cat([torch.reshape(a, (-1,)) for a in leaves]), group)
    parts = torch.split(flat, [a.numel() for a in leaves])
    return unflatten(treedef, [torch.reshape(p, a.shape) for p, a in zip(parts, leaves)])


class DataParallel(Model):
    """``model`` (a :class:`~secondorder.models.Model`, e.g. from ``from_torch``, or any
    ``apply(params, x)``) on a batch sharded over the ranks of ``group``.

    Parameters
    ----------
    model:
        The network of one rank, ``apply(params, x)``; its layer taps, if it has them, are
        carried over.
    group: default None
        The ``torch.distributed`` process group (None: the default group). Every rank holds
        an equal share of the batch, in rank order.
    """

    def __init__(self, model: Callable, group: Any = None):
        owner = getattr(model, "__self__", None)  # a model's bound apply: the model, with taps
        if isinstance(owner, Model) and getattr(model, "__name__", "") in ("apply", "__call__"):
            model = owner
        self.inner, self.group = model, group
        self.layers = tuple(getattr(model, "layers", ()))

    def __repr__(self) -> str:
        return f"DataParallel({self.inner!r}, world_size={self.world_size})"

    def __getattr__(self, name: str) -> Any:
        if name in ("inner", "group"):  # not yet set (during unpickling)
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def world_size(self) -> int:
        return collectives.world_size(self.group)

    def global_rows(self, x: Array) -> int:
        """The number of samples of the whole batch when this rank holds ``x``."""
        return int(x.shape[0]) * self.world_size

    def apply(self, params: Any, x: Array, taps: list[Array] | None = None) -> Any:
        group = self.group
        params = _replicate(params, group)
        if taps is None:
            return collectives.gather_rows(self.inner(params, x), group)
        local = [collectives.scatter_rows(t, group) for t in taps]
        f, inputs = self.inner.apply(params, x, local)
        return (collectives.gather_rows(f, group),
                [collectives.gather_rows(a, group) for a in inputs])

    def __call__(self, params: Any, x: Array) -> Array:
        return self.apply(params, x)

    def tap_shapes(self, x: Array) -> list[tuple[int, ...]]:
        n = self.world_size
        return [(int(s[0]) * n, *s[1:]) for s in self.inner.tap_shapes(x)]
