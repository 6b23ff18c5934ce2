"""The MLP classification problem the benchmarks share: seeded weights and one batch on a
backend (float32), with torch limited to ``threads`` intra-op threads."""

from __future__ import annotations

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
