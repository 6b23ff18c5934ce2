"""Data-parallel training: the batch sharded over processes, every rank taking the step of one
process on the whole batch.

* torch: an initialised ``torch.distributed`` process group (gloo on CPU, NCCL on GPU, launched
  with ``torchrun``); :func:`data_parallel` turns any optimiser of :mod:`secondorder.optim` into
  its data-parallel form, :class:`DataParallel` any network, and
  :class:`secondorder.integrations.torch.Optimizer` does it by itself when a process group is
  initialised. See :mod:`.collectives` for how the three collectives carry every batch mean.
* JAX: nothing to wrap: shard the batch over a ``jax.sharding.Mesh`` and jit the step (see
  ``docs/distributed.md``).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["DataParallel", "DataParallelOptimizer", "data_parallel", "mesh", "replicate",
           "shard_batch"]


def __getattr__(name: str) -> Any:  # torch is imported only when one of these is asked for
    where = {"DataParallel": "model", "DataParallelOptimizer": "optimizer",
             "data_parallel": "optimizer", "mesh": "sharding", "replicate": "sharding",
             "shard_batch": "sharding"}.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{where}"), name)
