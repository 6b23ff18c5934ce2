"""Data-parallel runs against one process: the check behind ``secondorder check --ranks N``.

Every registered method takes ``steps`` steps on one process with the whole batch (the
reference), and on ``ranks`` processes (gloo, started with ``torch.multiprocessing``), each with
an equal shard of every batch through :func:`~.optimizer.data_parallel`. A row reports the
largest deviation of any rank's parameters from the reference, whether every rank rejected the
same steps, and the collectives of one step (calls and bytes each rank sends, from
:data:`~.collectives.LOG`). The problem is the contract suite's: an MLP 3-5-3 (tanh) with
softmax cross-entropy on batches of 16 samples, float64.
"""

from __future__ import annotations

import ast
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .launch import spawn

#: the largest deviation ``secondorder check --ranks N`` accepts
TOLERANCE = 1e-10
#: the step whose batch ``secondorder check --ranks N`` gives a NaN in the last rank's shard
NAN_STEP = 3
SIZES = (3, 5, 3)
BATCH = 16
#: settings of the check that differ from the registry's defaults. Newton's default damping
#: (1e-3, absolute eigenvalues) leaves directions of curvature near 0 so weakly damped that one
#: process moves by 4e-9 over the 10 steps when only the order of the samples in each batch is
#: changed (a change of rounding alone): a deviation the ranks cannot avoid. At 0.1 that
#: sensitivity is 6e-15.
#: Levenberg-Marquardt runs with D = I: with Moré's scaling (the default) the damping
#: lambda D is weak along parameters whose GGN diagonal is small (down to 2e-3 here, where the
#: GGN of 16 samples x 2 logit directions has rank <= 32 < 38 parameters), and one process
#: moves by up to 5e-12 when the samples of each batch are permuted; with D = I, by 2e-14.
#: SMW-GN's curvature batch is cut to 6 of the 16 samples (the default 30 takes them all),
#: which on 4 ranks takes rank 0's 4 samples and 2 of rank 1's.
OVERRIDES = {"newton": {"damping": 0.1}, "levenberg-marquardt": {"scaling": "identity"},
             "smw-gn": {"curvature_batch": 6}}


@dataclass
class Row:
    """One method's data-parallel run against the single-process one."""

    method: str
    ranks: int
    deviation: float  #: max |params_rank - params_reference| over ranks and entries
    finite: list[bool]  #: info.finite of every step on rank 0
    agree: bool  #: every rank accepted and rejected the same steps as the reference
    calls: dict[str, float] = field(default_factory=dict)  #: collectives per step, by kind
    bytes: dict[str, float] = field(default_factory=dict)  #: bytes sent per step, by kind

    @property
    def ok(self) -> bool:
        return self.agree and self.deviation <= TOLERANCE


def batches(steps: int, seed: int = 7, nan_at: int | None = None
            ) -> list[tuple[np.ndarray, np.ndarray]]:
    """``steps`` batches of the problem; with ``nan_at``, that batch has a NaN in its last
    sample (so on several ranks only the last rank's shard holds it)."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(steps):
        x, y = rng.standard_normal((BATCH, SIZES[0])), rng.integers(0, SIZES[-1], BATCH)
        if t == nan_at:
            x[-1, 0] = np.nan
        out.append((x, y))
    return out


def run(method: str, steps: int, rank: int = 0, ranks: int = 1, nan_at: int | None = None,
        data_parallel: bool = False) -> tuple[np.ndarray, list[bool], dict[str, Any]]:
    """The flat parameters after ``steps`` steps of ``method``, ``info.finite`` of each step and
    the collectives of the run; this rank's shard of every batch when ``data_parallel``."""
    import torch

    from .. import losses
    from .._pytree import flatten
    from ..models import MLP
    from ..optim.registry import METHODS
    from . import collectives
    from .optimizer import data_parallel as wrap

    model, loss = MLP(list(SIZES), "tanh"), losses.SoftmaxCrossEntropy()
    opt = METHODS[method](model, loss, **OVERRIDES.get(method, {}))
    if data_parallel:
        opt = wrap(opt)
    params = model.init(0, "torch", dtype="float64")
    state = opt.init(params)
    rows = BATCH // ranks
    finite = []
    collectives.LOG.reset()
    for x, y in batches(steps, nan_at=nan_at):
        if data_parallel:
            x, y = x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]
        params, state, info = opt.step(params, state, (torch.asarray(x), torch.asarray(y)))
        finite.append(bool(info.finite))
    flat = np.concatenate([np.ravel(a.detach().numpy()) for a in flatten(params)[0]])
    return flat, finite, collectives.LOG.snapshot()


def _worker(rank: int, ranks: int, address: str, methods: list[str], steps: int,
            nan_at: int | None, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=ranks)
    try:
        for method in methods:
            flat, finite, log = run(method, steps, rank, ranks, nan_at, data_parallel=True)
            np.save(Path(out) / f"{method}.{rank}.npy", flat)
            (Path(out) / f"{method}.{rank}.txt").write_text(repr((finite, log)))
    finally:
        dist.destroy_process_group()


def compare(methods: list[str], ranks: int, steps: int = 10, nan_at: int | None = None,
            timeout: float = 600.0) -> list[Row]:
    """One :class:`Row` per method: ``ranks`` processes against one (see the module
    docstring); with ``nan_at``, that step's batch has a NaN in the last rank's shard."""
    if BATCH % ranks:
        raise ValueError(f"--ranks must divide the batch of {BATCH} samples, got {ranks}")
    reference = {m: run(m, steps, nan_at=nan_at) for m in methods}
    with tempfile.TemporaryDirectory() as out:
        spawn(_worker, ranks, methods, steps, nan_at, out, timeout=timeout)
        rows = []
        for m in methods:
            flat_ref, finite_ref, _ = reference[m]
            flats = [np.load(Path(out) / f"{m}.{r}.npy") for r in range(ranks)]
            logs = [ast.literal_eval((Path(out) / f"{m}.{r}.txt").read_text())
                    for r in range(ranks)]
            finite, log = logs[0]
            deviation = max(float(np.max(np.abs(f - flat_ref))) for f in flats)
            agree = all(f == finite_ref for f, _ in logs)
            rows.append(Row(m, ranks, deviation, finite, agree,
                            {k: v / steps for k, v in log["calls"].items()},
                            {k: v / steps for k, v in log["bytes"].items()}))
    return rows
