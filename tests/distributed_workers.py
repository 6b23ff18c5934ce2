"""Rank functions for tests/test_distributed.py (module level, so spawned processes import
them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: (method, wrapped in DistributedDataParallel, a CNN instead of an MLP)
CONFIGS = (("kfac", False, False), ("kfac", True, False), ("curveball", False, False),
           ("curveball", True, False), ("kfac", True, True), ("kbfgs", False, True))


def module(seed: int, conv: bool = False):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    if conv:  # the 3 inputs as a 1-channel 1-D signal: tapped Conv1d patches get gathered too
        return nn.Sequential(nn.Unflatten(1, (1, 3)), nn.Conv1d(1, 2, 2), nn.Tanh(),
                             nn.Flatten(), nn.Linear(4, 3)).double()
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def train(model, batches, method: str, rank: int = 0, ranks: int = 1) -> np.ndarray:
    """The module's flat parameters after one torch-Optimizer step per batch, on this rank's
    shard of each."""
    import torch
    from torch import nn

    from secondorder.integrations.torch import Optimizer

    opt = Optimizer(model, nn.CrossEntropyLoss(), method=method)
    rows = len(batches[0][1]) // ranks
    for x, y in batches:
        x, y = x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]
        opt.step((torch.asarray(x), torch.asarray(y)))
    inner = getattr(model, "module", model)
    return np.concatenate([p.detach().numpy().ravel() for p in inner.parameters()])


def integration(rank: int, ranks: int, address: str, out: str) -> None:
    """Every rank starts from other weights (rank 0's are broadcast) and trains its shard."""
    import torch
    import torch.distributed as dist

    from secondorder.distributed.equivalence import batches

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=ranks)
    try:
        from secondorder import backends

        mean = backends.get("torch").mean_reduce(
            {"r": torch.tensor([rank, 1.0], dtype=torch.float64)})
        np.save(Path(out) / f"mean.{rank}.npy", mean["r"].numpy())
        for method, ddp, conv in CONFIGS:
            model = module(seed=rank, conv=conv)
            if ddp:
                model = torch.nn.parallel.DistributedDataParallel(model)
            flat = train(model, batches(5), method, rank, ranks)
            np.save(Path(out) / f"{method}.{ddp}.{conv}.{rank}.npy", flat)
        # BatchNorm in train mode: local statistics, but the same step and buffers on every rank
        torch.manual_seed(rank)
        net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.BatchNorm1d(5),
                                  torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
        train(net, batches(3), "curveball", rank, ranks)
        state = np.concatenate([t.detach().numpy().ravel() for t in net.state_dict().values()])
        np.save(Path(out) / f"batchnorm.{rank}.npy", state)
        # shards of different sizes: the same named error on every rank, nothing moved
        from secondorder import losses, optim
        from secondorder.distributed import data_parallel
        from secondorder.errors import ShapeError
        from secondorder.models import MLP

        model = MLP([3, 5, 3])
        opt = data_parallel(optim.SGD(model, losses.SoftmaxCrossEntropy(), lr=0.1))
        params = model.init(0, "torch")
        rows = 8 - 2 * rank
        try:
            opt.step(params, opt.init(params), (torch.zeros(rows, 3, dtype=torch.float64),
                                                torch.zeros(rows, dtype=torch.int64)))
        except ShapeError as err:
            (Path(out) / f"uneven.{rank}.txt").write_text(str(err))
    finally:
        dist.destroy_process_group()
