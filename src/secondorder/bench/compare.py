"""``secondorder compare``: the same optimisers, weights and batches on every backend.

For each (method, backend) the run starts from the weights of ``problem.init(seed)`` and sees
the same sequence of batches, drawn once with NumPy's Generator. Reported per run: the final
training loss, the median step time (after the first step, which includes compilation on JAX),
the step time relative to SGD on the same backend, and the largest relative deviation
max_leaf ||w - w_ref|| / ||w_ref|| of the parameters from the float64 NumPy run of the same method
after the same number of steps. A deviation above the dtype's tolerance is a failure.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .. import backends
from .._pytree import flatten
from ..optim.registry import METHODS
from ..problems import PROBLEMS
from ._sync import wait

#: relative deviation from the float64 NumPy run that counts as agreement
TOLERANCE = {"float64": 1e-8, "float32": 1e-4}


@dataclass
class Run:
    method: str
    backend: str
    dtype: str
    final_loss: float | None = None
    step_ms: float | None = None
    step_vs_sgd: float | None = None
    max_rel_deviation: float | None = None
    ok: bool = True
    status: str = "ok"
    losses: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("losses")
        out.pop("wall")
        return out


class Progress:
    """A one-line progress bar on a terminal; silent otherwise."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def update(self, label: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        width = 24
        filled = int(width * done / total)
        sys.stderr.write(f"\r{label:<32} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def train(problem: Any, method: str, backend: backends.Backend, dtype: str,
          batches: list[tuple[np.ndarray, np.ndarray]], seed: int, device: Any = None,
          progress: Progress | None = None) -> tuple[Run, Any]:
    """One run; returns the report and the final parameters."""
    run = Run(method, backend.name, dtype)
    params = problem.init(seed, backend, dtype)
    if device is not None:
        params = _to_device(backend, params, device)
    opt = METHODS[method](problem.apply, problem.loss)
    state = opt.init(params)
    step = backend.jit(opt.step)  # compiled where the backend compiles (has_jit)
    times = []
    for i, (x, y) in enumerate(batches):
        xb = backend.asarray(x, dtype=dtype, device=device)
        yb = backend.asarray(y, dtype=None if y.dtype.kind in "iu" else dtype, device=device)
        t0 = time.perf_counter()
        params, state, info = step(params, state, (xb, yb))
        wait(backend, params)
        times.append(time.perf_counter() - t0)
        run.losses.append(float(backend.to_numpy(info.loss)))
        run.wall.append(sum(times[1:]))  # step time only: no compilation, no data transfer
        if progress:
            progress.update(f"{method} / {backend.name} ({dtype})", i + 1, len(batches))
    run.final_loss = run.losses[-1]
    run.step_ms = 1e3 * float(np.median(times[1:] if len(times) > 1 else times))
    return run, params


def _to_device(backend: backends.Backend, params: Any, device: Any) -> Any:
    from .._pytree import tree_map

    return tree_map(lambda a: backend.asarray(backend.to_numpy(a), device=device), params)


def deviation(backend: backends.Backend, params: Any, reference: Any) -> float:
    """max over leaves of ||w - w_ref|| / ||w_ref|| (float64 on the host)."""
    worst = 0.0
    for a, r in zip(flatten(params)[0], flatten(reference)[0]):
        a = np.asarray(backend.to_numpy(a), dtype=np.float64)
        r = np.asarray(r, dtype=np.float64)
        scale = np.linalg.norm(r)
        err = np.linalg.norm(a - r) / (scale if scale > 0 else 1.0)
        worst = max(worst, float(err) if np.isfinite(err) else float("inf"))
    return worst


def compare(methods: list[str], problem_name: str = "digits-mlp",
            backend_names: list[str] | None = None, steps: int = 100,
            batch_size: int | None = None, dtype: str = "float64", seed: int = 0,
            device: str | None = None, progress: bool = False) -> list[Run]:
    """Every method on every requested backend; see the module docstring."""
    problem = PROBLEMS[problem_name]()
    if batch_size is not None and hasattr(problem, "batch_size"):
        problem.batch_size = int(batch_size)
    rng = np.random.default_rng(seed)
    batches = [problem._numpy_batch(rng) for _ in range(steps)]
    infos = {i.name: i for i in backends.available()}
    if backend_names is None:
        backend_names = [n for n, i in infos.items() if i.installed and i.usable and i.autodiff]
    if "jax" in backend_names and dtype == "float64" and infos["jax"].installed:
        import jax

        jax.config.update("jax_enable_x64", True)
    bar = Progress(progress)
    runs: list[Run] = []
    numpy_backend = backends.get("numpy")  # NumPy is a hard dependency: this cannot fail
    for method in methods:
        reference, ref_run = None, None
        try:
            if numpy_backend.has_autodiff:
                ref_run, ref_params = train(problem, method, numpy_backend, "float64", batches,
                                            seed, progress=bar)
                reference = [np.asarray(numpy_backend.to_numpy(a)) for a in
                             flatten(ref_params)[0]]
        except Exception as err:  # the reference is a report item, not a crash
            reference = err
        for name in backend_names:
            info = infos.get(name)
            if info is not None and not (info.installed and info.usable):
                runs.append(Run(method, name, dtype, status=f"skipped: {info.note}"[:120]))
                continue
            try:
                backend = backends.get(name)
                if not backend.has_autodiff:
                    raise RuntimeError(f"{name} has no autodiff")
                dev = _device_for(backend, device)
                if name == "numpy" and dtype == "float64" and ref_run is not None:
                    run, params = ref_run, ref_params  # the reference is this very run
                else:
                    run, params = train(problem, method, backend, dtype, batches, seed, dev,
                                        bar)
            except Exception as err:
                runs.append(Run(method, name, dtype, ok=False,
                                status=f"not run: {type(err).__name__}: {err}"[:120]))
                continue
            if isinstance(reference, list):
                run.max_rel_deviation = deviation(backend, params, reference)
                if not run.max_rel_deviation <= TOLERANCE[dtype]:
                    run.ok = False
                    run.status = f"DEVIATES (> {TOLERANCE[dtype]:g})"
            else:
                run.status = "no float64 numpy reference"
            runs.append(run)
    sgd = {r.backend: r.step_ms for r in runs if r.method == "sgd" and r.step_ms}
    for r in runs:
        if r.step_ms and r.backend in sgd:
            r.step_vs_sgd = r.step_ms / sgd[r.backend]
    return runs


def _device_for(backend: backends.Backend, device: str | None) -> Any:
    if device in (None, "cpu"):
        return None
    return backend.device_from_name(device)


def plot(runs: list[Run], path: str, title: str) -> None:
    """Loss against step and against wall time, one line per (method, backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    methods = list(dict.fromkeys(r.method for r in runs))
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    styles = {"numpy": "-", "torch": "--", "jax": ":", "cupy": "-."}
    for r in runs:
        if not r.losses:
            continue
        kw = {"color": colours[r.method], "linestyle": styles.get(r.backend, "-"),
              "label": f"{r.method} / {r.backend}"}
        by_step.plot(np.arange(1, len(r.losses) + 1), r.losses, **kw)
        by_time.plot(r.wall, r.losses, **kw)
    for ax, xlabel in ((by_step, "step"), (by_time, "time in steps (s, compilation excluded)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training loss (batch)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    by_time.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
