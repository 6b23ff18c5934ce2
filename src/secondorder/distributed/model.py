"""A network whose batch is sharded over torch.distributed ranks, seen as one network on the
whole batch.

``DataParallel(model)(params, x_r)`` runs the network on the local shard ``x_r`` with the
parameters entering through :func:`~.collectives.replicate` and returns the outputs of the
whole batch through :func:`~.collectives.gather_rows`; with layer taps of the whole batch
(K-BFGS, SMW) the taps are cut to the shard by :func:`~.collectives.scatter_rows` and the
layers' inputs come back gathered, while with taps of the shard (K-FAC's factors, which are
batch means) the inputs stay local and the statistics are averaged by :meth:`mean_reduce`.
Every method built on it therefore sees the network of a single process on the whole batch, and
its Jacobian products, J v = gather(J_r v) and J^T u = sum_r J_r^T u_r, are those of that
network: no method has communication code of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._pytree import flatten
from ..models.base import Model
from . import collectives

Array = Any


def _rows(x: Any) -> int:
    """The samples of this rank's inputs: the leading axis of ``x`` or of its first leaf."""
    return int(flatten(x)[0][0].shape[0])


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
        """The number of samples of the whole batch when this rank holds ``x`` (an array, or a
        tree of arrays with the samples along the leading axis of each)."""
        return _rows(x) * self.world_size

    def apply(self, params: Any, x: Array, taps: list[Array] | None = None) -> Any:
        """The outputs of the whole batch; with ``taps`` of the whole batch (``zero_taps``),
        also every tapped layer's inputs of the whole batch. With taps of this rank's shard
        (``local_zero_taps``) the layer inputs stay this rank's: for statistics that are batch
        means, reduced afterwards with :meth:`mean_reduce` instead of gathered."""
        group = self.group
        params = collectives.through_one_vector(params,
                                                lambda a: collectives.replicate(a, group))
        if taps is None:
            return collectives.gather_rows(self.inner(params, x), group)
        local = bool(taps) and self.world_size > 1 and int(taps[0].shape[0]) == _rows(x)
        if not local:
            taps = [collectives.scatter_rows(t, group) for t in taps]
        f, inputs = self.inner.apply(params, x, taps)
        if not local:
            inputs = [collectives.gather_rows(a, group) for a in inputs]
        return collectives.gather_rows(f, group), inputs

    def local_zero_taps(self, x: Array, params: Any = None) -> list[Array]:
        """Zero taps of this rank's shard ``x`` (see :meth:`apply`), in the dtype of
        ``params``' tapped weights."""
        return self.inner.zero_taps(x, params)

    def mean_reduce(self, tree: Any) -> Any:
        """The mean over the ranks of a tree of per-rank batch means (equal shards make it the
        mean over the whole batch), as one all-reduce of the flattened leaves."""
        return collectives.mean_over_ranks(tree, self.group)

    def __call__(self, params: Any, x: Array) -> Array:
        return self.apply(params, x)

    def tap_shapes(self, x: Array) -> list[tuple[int, ...]]:
        n = self.world_size
        return [(int(s[0]) * n, *s[1:]) for s in self.inner.tap_shapes(x)]
