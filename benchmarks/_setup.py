"""What the benchmarks share: the MLP classification problem (seeded weights and one batch on a
backend, float32, with torch limited to ``threads`` intra-op threads), the command-line options,
interleaved timing, the package each backend needs and the JSON writer."""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from secondorder import backends, losses
from secondorder.models import MLP

#: the package a backend's benchmarks need (NumPy differentiates with autograd)
NEEDS = {"torch": "torch", "jax": "jax", "numpy": "autograd"}


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


def single_threaded_blas() -> None:
    """Keep OpenBLAS (NumPy's and SciPy's; JAX's CPU LAPACK calls such as ``eigh``, Cholesky
    and triangular solves go through SciPy's) to one thread. After each call OpenBLAS's idle
    threads spin for a while, and on a machine with few cores they take the cores from XLA's
    own thread pool: K-BFGS(L)'s jitted ConvNet step, with eight 100 x 100 triangular solves,
    took 100-112 ms with the default threads and 70 ms with one (SGD: 52-54 ms). Uses
    ``threadpoolctl`` (installed with scikit-learn, backends/data.txt); without it the limit
    is left to ``OPENBLAS_NUM_THREADS=1`` in the environment."""
    try:
        import scipy.linalg  # noqa: F401 - loads SciPy's OpenBLAS, so that the limit reaches it
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(1, user_api="blas")


def parser(doc: str, name: str, *, batch: int, warmup: int, repeats: int
           ) -> argparse.ArgumentParser:
    """The options every benchmark takes; ``name`` sets the default JSON path. Building it
    also limits BLAS to one thread (:func:`single_threaded_blas`), as torch runs with
    ``--threads`` intra-op threads."""
    single_threaded_blas()
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--json", default=f"benchmarks/results/{name}.json")
    p.add_argument("--backends", default="numpy,torch,jax")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    return p


def interleaved_ms(fns: dict[str, Callable[[], Any]], sync: Callable[[Any], Any], *,
                   warmup: int, repeats: int) -> dict[str, float]:
    """Median milliseconds per call of each function, timed in interleaved rounds (one call of
    each per round) so that all of them see the same machine load. Each round calls them in a
    new random order (seeded): in a fixed order every function would always follow the same
    one, and the first of a pair (ours, reference) would always meet the caches and allocator
    that the previous case left: ``overhead.py``'s torch SGD ratio was 1.20-1.26 in the fixed
    order and 1.08-1.09 shuffled (two runs each, alternated, on an idle machine)."""
    for fn in fns.values():
        for _ in range(warmup):
            sync(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = np.random.default_rng(0)
    names = list(fns)
    for _ in range(repeats):
        for i in order.permutation(len(names)):
            name, fn = names[i], fns[names[i]]
            start = time.perf_counter()
            sync(fn())
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


def installed(backends: str, results: dict[str, Any]) -> list[str]:
    """The backends of the comma-separated ``backends`` whose framework is installed; each
    missing one gets ``{"skipped": "<package> is not installed"}`` in ``results``."""
    names = []
    for name in backends.split(","):
        package = NEEDS.get(name, name)
        if importlib.util.find_spec(package) is None:
            results[name] = {"skipped": f"{package} is not installed"}
        else:
            names.append(name)
    return names


def write_json(path: str | Path, data: Any) -> None:
    """``data`` as indented JSON at ``path``, creating its parent folders."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))
