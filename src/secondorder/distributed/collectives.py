"""The three collectives of data-parallel training on torch, as differentiable functions.

Each of R processes (ranks) holds a shard of the batch and a replica of the parameters. The
library views the replicated computation as one logical computation on the whole batch:

* ``replicate(p)``: the parameters entering the network. Forward and JVP: the identity. VJP:
  the cotangents of all ranks summed (an all-reduce), since the logical parameter feeds every
  shard: d/dp sum_r L_r = sum_r J_r^T u_r.
* ``gather_rows(a)``: a per-sample array (outputs, layer inputs) of the local shard, returned
  as the whole batch, rows of rank 0 first. Forward and JVP: an all-gather. VJP: the cotangent's
  rows of the local shard (the cotangent is the same logical value on every rank).
* ``scatter_rows(t)``: the dual of ``gather_rows``: a whole-batch array (a layer tap) cut to the
  local shard. Forward and JVP: the local rows. VJP: an all-gather of the local cotangents.

With these, J v = gather(J_r v), J^T u = sum_r J_r^T u_r and every output-space quantity (the
loss, its derivatives, CurveBall's 2x2 system, the dual Gauss-Newton system, sampled targets) is
the one of a single process on the whole batch, computed identically on every rank. The
all-reduce in ``replicate``'s VJP is the one point at which batch means over parameters are
reduced (:meth:`secondorder.backends.Backend.mean_reduce` documents it). Every call is counted in
:data:`LOG` (calls and bytes per kind) for ``benchmarks/distributed.py``.

All three are ``torch.autograd.Function`` s with ``setup_context``, a ``jvp`` and a ``vmap``
rule, so they work under eager autograd and under ``torch.func`` (``grad``, ``vjp``, ``jvp``,
``vmap`` and their compositions, e.g. Hessian-vector products as forward-over-reverse).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .._pytree import flatten, tree_map, unflatten


@dataclass
class CommunicationLog:
    """Collective calls and the bytes each rank sends into them, by kind
    (``"all_reduce"``, ``"all_gather"``)."""

    calls: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)

    def record(self, kind: str, tensor: torch.Tensor) -> None:
        self.calls[kind] += 1
        self.bytes[kind] += tensor.numel() * tensor.element_size()

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {"calls": dict(self.calls), "bytes": dict(self.bytes)}


#: the log every collective of this module writes to
LOG = CommunicationLog()


def world_size(group: Any = None) -> int:
    """The number of ranks of ``group`` (the default group when None); 1 without an initialised
    process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def rank(group: Any = None) -> int:
    """This process's rank in ``group``; 0 without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group: Any) -> torch.Tensor:
    out = x.detach().clone().contiguous()
    LOG.record("all_reduce", out)
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def _all_gather(x: torch.Tensor, group: Any, dim: int = 0) -> torch.Tensor:
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(world_size(group))]
    LOG.record("all_gather", x)
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def _local_rows(x: torch.Tensor, group: Any, dim: int = 0) -> torch.Tensor:
    r, n = rank(group), world_size(group)
    rows = x.shape[dim] // n
    return x.narrow(dim, r * rows, rows)


class _Sum(torch.autograd.Function):
    """``reduce=True``: sum_r x_r on every rank, per-rank values into one logical value (the
    all-reduce); ``reduce=False``: one logical value into a copy per rank (the identity). Each
    is the other's VJP, and its own JVP."""

    @staticmethod
    def forward(x: torch.Tensor, group: Any, reduce: bool) -> torch.Tensor:
        return _all_reduce(x, group) if reduce else x.view_as(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        ctx.group, ctx.reduce = inputs[1], inputs[2]

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:
        return _Sum.apply(g, ctx.group, not ctx.reduce), None, None

    @staticmethod
    def jvp(ctx: Any, t: torch.Tensor, *_: Any) -> torch.Tensor:
        return _Sum.apply(t, ctx.group, ctx.reduce)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, x: torch.Tensor, group: Any, reduce: bool) -> tuple:
        return _Sum.apply(x, group, reduce), in_dims[0]


class _Rows(torch.autograd.Function):
    """``gather=True``: the rows of every rank, concatenated in rank order along ``dim``;
    ``gather=False``: the local rank's rows of a whole-batch array. Each is the other's VJP, and
    its own JVP."""

    @staticmethod
    def forward(x: torch.Tensor, group: Any, dim: int, gather: bool) -> torch.Tensor:
        return _all_gather(x, group, dim) if gather else _local_rows(x, group, dim).clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        ctx.group, ctx.dim, ctx.gather = inputs[1], inputs[2], inputs[3]

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:
        return _Rows.apply(g, ctx.group, ctx.dim, not ctx.gather), None, None, None

    @staticmethod
    def jvp(ctx: Any, t: torch.Tensor, *_: Any) -> torch.Tensor:
        return _Rows.apply(t, ctx.group, ctx.dim, ctx.gather)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, x: torch.Tensor, group: Any, dim: int, gather: bool
             ) -> tuple:
        b = in_dims[0]
        if b is None:
            return _Rows.apply(x, group, dim, gather), None
        return _Rows.apply(x.movedim(b, 0), group, dim + 1, gather), 0


def all_reduce(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """sum_r x_r on every rank (differentiable); ``x`` itself on one process."""
    return x if world_size(group) == 1 else _Sum.apply(x, group, True)


def replicate(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """``x`` itself, whose cotangent is summed over the ranks (see the module docstring)."""
    return x if world_size(group) == 1 else _Sum.apply(x, group, False)


def gather_rows(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """The whole batch from every rank's shard ``x`` (rank order along axis 0)."""
    return x if world_size(group) == 1 else _Rows.apply(x, group, 0, True)


def scatter_rows(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """This rank's shard of the whole-batch array ``x`` (axis 0)."""
    return x if world_size(group) == 1 else _Rows.apply(x, group, 0, False)


def all_gather_sizes(n: int, group: Any = None, device: Any = None) -> list[int]:
    """The integer ``n`` of every rank, in rank order (one small all-gather of a tensor on
    ``device``: a CUDA device with NCCL, which moves only GPU tensors)."""
    t = torch.tensor([n], dtype=torch.int64, device=device)
    return [int(v) for v in _all_gather(t, group)]


def broadcast(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """``x`` overwritten in place with rank 0's values (not differentiable)."""
    if world_size(group) > 1:
        LOG.record("broadcast", x)
        dist.broadcast(x, src=dist.get_global_rank(group, 0) if group is not None else 0,
                       group=group)
    return x


def through_one_vector(tree: Any, fn: Callable[[Any], Any]) -> Any:
    """``tree`` with ``fn`` applied to its leaves concatenated into one flat vector (one
    collective instead of one per leaf, like a single gradient bucket), then split back; leaf by
    leaf when the leaves differ in dtype or device."""
    leaves, treedef = flatten(tree)
    if len(leaves) < 2 or len({(a.dtype, a.device) for a in leaves}) > 1:
        return tree_map(fn, tree)
    flat = fn(torch.cat([torch.reshape(a, (-1,)) for a in leaves]))
    parts = torch.split(flat, [a.numel() for a in leaves])
    return unflatten(treedef, [torch.reshape(p, a.shape) for p, a in zip(parts, leaves)])


def mean_over_ranks(tree: Any, group: Any = None) -> Any:
    """(1/R) sum_r tree_r leaf by leaf, as one all-reduce of the flattened leaves (``tree``
    itself on one process)."""
    n = world_size(group)
    if n == 1:
        return tree
    return through_one_vector(tree, lambda a: all_reduce(a, group) / n)
