"""Any optimiser of :mod:`secondorder.optim` on a batch sharded over torch.distributed ranks.

    opt = data_parallel(optim.KFAC(model, loss, lr=0.05))
    state = opt.init(params)                          # the same params on every rank
    params, state, info = opt.step(params, state, (x_r, y_r))   # this rank's shard

The method is rebuilt on :class:`~.model.DataParallel` (its network on the whole batch) and each
step gathers the targets, so every rank takes the step of one process on the whole batch and
keeps identical parameters and state: there is no method-specific communication (see
:mod:`.collectives` for the three collectives and their counts).
"""

from __future__ import annotations

from typing import Any

import torch

from .._pytree import flatten
from ..errors import MixedBackendError, ShapeError, StructureError
from ..optim.base import Optimizer
from . import collectives
from .model import DataParallel


class DataParallelOptimizer:
    """``optimizer`` rebuilt on :class:`DataParallel` (see the module docstring).

    Parameters
    ----------
    optimizer:
        A :mod:`secondorder.optim` method built on the network of one rank.
    group: default None
        The ``torch.distributed`` process group (None: the default group).
    """

    def __init__(self, optimizer: Optimizer, group: Any = None):
        if isinstance(optimizer, DataParallelOptimizer):
            optimizer = optimizer.inner
        if not isinstance(optimizer, Optimizer) or "arguments" not in vars(optimizer):
            raise StructureError(
                f"data_parallel takes an optimiser of secondorder.optim (e.g. "
                f"optim.KFAC(model, loss)), got {type(optimizer).__name__}")
        args, kwargs = optimizer.arguments
        apply = args[0] if args else kwargs["apply"]
        if isinstance(apply, DataParallel):
            apply = apply.inner
        self.model = DataParallel(apply, group)
        if args:
            args = (self.model, *args[1:])
        else:
            kwargs = {**kwargs, "apply": self.model}
        self.inner = type(optimizer)(*args, **kwargs)
        self.group = group

    def __repr__(self) -> str:
        return f"data_parallel({self.inner!r}, world_size={self.model.world_size})"

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def init(self, params: Any) -> Any:
        return self.inner.init(params)

    def step(self, params: Any, state: Any, batch: Any) -> Any:
        """One step of the method on the whole batch, from this rank's shard ``(x_r, y_r)``.
        Every rank must hold the same number of samples (a :class:`ShapeError` on every rank
        otherwise)."""
        if not isinstance(batch, tuple | list) or len(batch) != 2:
            return self.inner.step(params, state, batch)  # its own StructureError
        x, y = batch
        if self.model.world_size > 1 and not all(
                isinstance(a, torch.Tensor) for a in flatten(params)[0]):
            raise MixedBackendError(
                f"{type(self.inner).__name__}.step: data_parallel runs on torch.distributed "
                "and takes torch parameters; for JAX shard the batch over a Mesh instead "
                "(secondorder.distributed.sharding, docs/jax_sharding.md)")
        if isinstance(y, torch.Tensor) and y.ndim and self.model.world_size > 1:
            sizes = collectives.all_gather_sizes(int(y.shape[0]), self.group, y.device)
            if len(set(sizes)) != 1:
                raise ShapeError(
                    f"{type(self.inner).__name__}.step: the ranks hold {sizes} samples; a "
                    "data-parallel step needs the same number on every rank (drop the last, "
                    "short batch, e.g. DistributedSampler(drop_last=True) with a DataLoader "
                    "of drop_last=True)")
            with torch.no_grad():
                y = collectives.gather_rows(y, self.group)
        return self.inner.step(params, state, (x, y))


def data_parallel(optimizer: Optimizer, group: Any = None) -> DataParallelOptimizer:
    """``optimizer`` taking data-parallel steps over the ranks of ``group`` (see the module
    docstring)."""
    return DataParallelOptimizer(optimizer, group)
