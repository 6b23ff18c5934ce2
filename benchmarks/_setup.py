"""The MLP classification problem the benchmarks share: seeded weights and one batch on a
backend (float32), with torch limited to ``threads`` intra-op threads."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import numpy as np

from secondorder import backends, losses
from secondorder.models import MLP


def mlp_problem(name: str, sizes: Sequence[int], batch: int, seed: int, threads: int
                ) -> tuple[Any, MLP, losses.Loss, Any, Any, Any]:
    """``(backend, model, loss, params, x, y)`` for an MLP with tanh and softmax CE."""
    b = backends.get(name)
    if name == "torch":
        import torch

        torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    model, loss = MLP(sizes, "tanh"), losses.SoftmaxCrossEntropy()
    params = model.init(seed, b, dtype="float32")
    x = b.asarray(rng.standard_normal((batch, sizes[0])), dtype="float32")
    y = b.asarray(rng.integers(0, sizes[-1], batch))
    return b, model, loss, params, x, y


def parser(doc: str, name: str, *, batch: int, warmup: int, repeats: int
           ) -> argparse.ArgumentParser:
    """The options every benchmark takes; ``name`` sets the default JSON path."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--json", default=f"benchmarks/results/{name}.json")
    p.add_argument("--backends", default="numpy,torch,jax")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    return p
