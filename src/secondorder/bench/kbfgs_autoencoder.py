"""``secondorder reproduce kbfgs-autoencoder``: the shape of Table 3.3 of Ren's thesis (final
training loss of K-BFGS, K-BFGS(L), K-FAC, Adam and SGD with momentum on deep autoencoders) on
the 8 x 8 digits that scikit-learn ships.

Protocol
--------
* Data: the 1797 digits images, pixels scaled to [0, 1]; as in the thesis, the training set
  alone (no test set: the table measures optimisation).
* Model: the thesis's autoencoder shape scaled to 64 pixels, :data:`SIZES` =
  64-128-64-32-8-32-64-128-64 (eight layers, like its MNIST 784-1000-500-250-30-...-784), ReLU
  hidden layers, a linear code and output; sigmoid binary cross-entropy summed over the
  pixels and averaged over the batch (the thesis's MNIST loss, there over 784 pixels).
  Mini-batches of ``batch_size`` (default 128, the thesis's Ch. 3 size), one pass over a fresh
  permutation per epoch (the last incomplete batch dropped).
* Model selection, the thesis's rule: every point of a method's grid (:data:`GRIDS`, a product
  over the thesis's ranges, its Table 3.5 MNIST pair first; ``grid_size`` keeps a prefix)
  trains ``epochs`` epochs from the tuning seed (:data:`TUNE_SEED`); the point with the
  smallest final training loss on the whole training set is kept.
* Evaluation: the chosen point trains once per seed 0, ..., ``seeds`` - 1 (the thesis: 5);
  after every epoch the training loss on the whole set and the seconds of the training steps
  (the evaluation not timed; JAX compiles the step once, before the clock).
* Schedule: the thesis decays every method's rate by 0.1 every 50 of 150 epochs (its
  second-order methods; 60 of 200 for the first-order ones, to equalise the time); here every
  method runs the same ``epochs`` and, by default, the rate drops by 0.1 after each third of
  them (``schedule="step"``; ``"cosine"`` and ``"constant"`` are the alternatives).
* Fixed settings (:data:`FIXED`): momentum 0.9 for SGD, K-FAC, K-BFGS and K-BFGS(L) (the
  thesis's g_hat = beta g_hat + g); K-BFGS and K-BFGS(L) update their curvature every step (the
  table's main rows; T = 20 is its dagger row), K-BFGS(L) keeps the sheet's p = 100 pairs;
  K-FAC's statistics every step and inverses every 20 (the thesis's autoencoder setting).

The thesis's MNIST column (:data:`THESIS_MNIST`) is printed beside the result for the order of
the methods only: its data, network width and budget differ, so its losses are not comparable
in value with these.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from .. import backends
from .training import Trainer, finite, spread

EXPERIMENT = "kbfgs-autoencoder"
#: the table's rows, by registry name, with the names the report uses
METHOD_NAMES = {"kbfgs": "K-BFGS", "kbfgs-l": "K-BFGS(L)", "kfac": "K-FAC", "adam": "Adam",
                "sgd": "SGD-momentum"}
#: the thesis's Table 3.3, MNIST column: final training loss (mean of 5 seeds)
THESIS_MNIST = {"kbfgs": 51.60, "kbfgs-l": 51.53, "kfac": 51.24, "adam": 52.76, "sgd": 54.75}
SIZES = (64, 128, 64, 32, 8, 32, 64, 128, 64)
ACTIVATION = "relu"


def _product(first: dict[str, float], **ranges: Sequence[float]) -> list[dict[str, float]]:
    """``first``, then the rest of the product of ``ranges`` in order."""
    keys = list(ranges)
    rest = [dict(zip(keys, values)) for values in itertools.product(*ranges.values())]
    return [first] + [p for p in rest if p != first]


_KRONECKER = {"lr": (0.03, 0.01, 0.1, 0.3, 1.0), "damping": (0.3, 1.0, 0.1, 3.0, 10.0, 30.0)}
#: grids from the thesis's ranges (lr 3e-5 .. 1; damping 0.03 .. 30 for the Kronecker methods,
#: Adam's eps 1e-8 .. 0.1), cut to the decades around its Table 3.5 MNIST values, which lead,
#: and reaching past every point a first run chose (K-FAC lr 0.3, Adam lr 0.01)
GRIDS: dict[str, list[dict[str, float]]] = {
    "kbfgs": _product({"lr": 0.03, "damping": 0.3}, **_KRONECKER),
    "kbfgs-l": _product({"lr": 0.03, "damping": 0.3}, **_KRONECKER),
    "kfac": _product({"lr": 0.03, "damping": 1.0}, **_KRONECKER),
    "adam": _product({"lr": 1e-4, "eps": 1e-4}, lr=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1),
                     eps=(1e-4, 1e-8, 1e-3)),
    "sgd": _product({"lr": 3e-3, "momentum": 0.9}, lr=(3e-3, 1e-3, 0.01, 0.03, 0.1, 0.3),
                    momentum=(0.9,)),
}
FIXED: dict[str, dict[str, Any]] = {
    "kbfgs": {"momentum": 0.9, "curvature_interval": 1},
    "kbfgs-l": {"momentum": 0.9, "curvature_interval": 1, "memory": 100},
    "kfac": {"momentum": 0.9, "statistics_interval": 1, "inverse_interval": 20},
    "adam": {},
    "sgd": {},
}
TUNE_SEED = 1000
DEFAULT_EPOCHS = 60
DEFAULT_SEEDS = 5
BATCH_SIZE = 128


def reproduce(methods: Sequence[str] = tuple(METHOD_NAMES), epochs: int = DEFAULT_EPOCHS,
              seeds: int = DEFAULT_SEEDS, grid_size: int | None = None, backend: str = "jax",
              dtype: str = "float32", batch_size: int = BATCH_SIZE, schedule: str = "step",
              subset: int | None = None,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the protocol of the module docstring.

    Parameters
    ----------
    methods : sequence of str, default every key of :data:`METHOD_NAMES`
        Registry names; those not registered are reported under ``"not_available"``.
    epochs : int, default 60
        Epochs of every run (tuning and evaluation).
    seeds : int, default 5
        Evaluation seeds 0, ..., seeds - 1.
    grid_size : int or None, default None
        Keep the first ``grid_size`` points of each grid (None: the whole grid).
    backend : str, default ``"jax"``
        Backend name (``dtype="float64"`` switches JAX's x64 on).
    dtype : str, default ``"float32"``
        Precision of weights and data.
    batch_size : int, default 128
        Images per mini-batch.
    schedule : {"step", "cosine", "constant"}, default "step"
        The learning rate over each run (:data:`secondorder.bench.training.SCHEDULES`).
    subset : int or None, default None
        Train on the first ``subset`` images only (a quick run; None: all 1797).
    progress : callable or None, default None
        Receives one line per finished run.

    Returns a JSON-ready dict: ``experiment``, ``protocol`` (the settings, grids, fixed
    settings, seeds and selection rule), ``not_available``, ``thesis_mnist`` and
    ``results[method]`` with ``name``, ``hyperparameters`` (chosen), ``fixed``, ``dropped``,
    ``tuning`` (per grid point: hyperparameters, final training loss, seconds), ``runs`` (per
    seed: ``seed``, ``train_loss``, ``seconds``, ``batch_loss``, ``non_finite_steps``, one
    entry per epoch), ``final_train_loss`` (a spread: n, mean, std, median, min, max) and
    ``seconds_per_epoch``; or ``error`` if the method raised.
    """
    from ..optim.registry import METHODS
    from ..problems import PROBLEMS

    if backend == "jax" and dtype == "float64":
        import jax

        jax.config.update("jax_enable_x64", True)
    b = backends.get(backend)
    problem = PROBLEMS["digits-autoencoder"](batch_size=batch_size, sizes=SIZES,
                                             activation=ACTIVATION)
    x = problem.x if subset is None else problem.x[:subset]
    seed_list = list(range(seeds))
    out: dict[str, Any] = {
        "experiment": EXPERIMENT,
        "protocol": {
            "problem": f"digits autoencoder {'-'.join(map(str, SIZES))}, {ACTIVATION}, "
                       "sigmoid BCE summed over pixels", "samples": int(x.shape[0]),
            "methods": list(methods), "epochs": epochs, "seeds": seed_list,
            "tune_seed": TUNE_SEED, "grid_size": grid_size, "backend": backend, "dtype": dtype,
            "batch_size": batch_size, "schedule": schedule, "subset": subset,
            "selection": "smallest final training loss on the whole training set",
            "grids": {m: GRIDS.get(m, [{}])[:grid_size] for m in methods},
            "fixed": {m: FIXED.get(m, {}) for m in methods},
        },
        "not_available": [m for m in methods if m not in METHODS],
        "thesis_mnist": {m: THESIS_MNIST.get(m) for m in methods},
        "results": {},
    }
    for method in (m for m in methods if m in METHODS):
        entry: dict[str, Any] = {"name": METHOD_NAMES.get(method, method)}
        out["results"][method] = entry
        try:
            trainer = Trainer(method, METHODS[method], problem, b, dtype, schedule,
                              FIXED.get(method, {}), classify=False)
            _study(trainer, entry, method, grid_size, seed_list, epochs, batch_size, x,
                   progress)
        except Exception as err:  # a broken method is reported, the others still run
            entry["error"] = f"{type(err).__name__}: {err}"
            if progress:
                progress(f"{method:<8} failed: {entry['error']}")
    return out


def _study(trainer: Trainer, entry: dict[str, Any], method: str, grid_size: int | None,
           seeds: list[int], epochs: int, batch_size: int, x: Any,
           progress: Callable[[str], None] | None) -> None:
    grid, dropped = trainer.grid(GRIDS.get(method, [{}])[:grid_size])
    entry["fixed"], entry["dropped"] = trainer.fixed, dropped
    evals = {"train": trainer.to_backend(x, x)}
    tuning = []
    if len(grid) > 1:
        for hp in grid:
            start = time.perf_counter()
            curves = trainer.train(hp, TUNE_SEED, x, x, epochs, evals, batch_size)
            tuning.append({"hyperparameters": hp, "train_loss": curves["train_loss"][-1],
                           "seconds": round(time.perf_counter() - start, 2)})
            if progress:
                progress(f"{method:<8} tune {hp}: training loss {tuning[-1]['train_loss']:.4f}")
        chosen = min(tuning, key=lambda t: finite(t["train_loss"], math.inf))["hyperparameters"]
    else:
        chosen = grid[0]
    entry["hyperparameters"], entry["tuning"] = chosen, tuning
    runs = []
    for seed in seeds:
        curves = trainer.train(chosen, seed, x, x, epochs, evals, batch_size)
        runs.append({"seed": seed, **curves})
        if progress:
            progress(f"{method:<8} seed {seed}: training loss {curves['train_loss'][-1]:.4f} "
                     f"after {epochs} epochs, {curves['seconds'][-1]:.1f} s")
    entry["runs"] = runs
    entry["final_train_loss"] = spread([r["train_loss"][-1] for r in runs])
    entry["seconds_per_epoch"] = spread([r["seconds"][-1] / epochs for r in runs])


def table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows for :func:`secondorder.bench.table.format_table`: per method the chosen
    hyperparameters, the final training loss (mean +- std over seeds), its rank here and the
    rank of the thesis's MNIST loss among the same methods, the thesis's loss, and the seconds
    per epoch."""
    headers = ["method", "hyperparameters", "final training loss", "rank", "thesis MNIST",
               "thesis rank", "s / epoch"]
    entries = result["results"]
    done = {m: e["final_train_loss"]["mean"] for m, e in entries.items() if "error" not in e}
    thesis = {m: v for m, v in result["thesis_mnist"].items() if v is not None and m in done}
    rank = {m: i + 1 for i, m in enumerate(sorted(done, key=lambda m: finite(done[m], math.inf)))}
    thesis_rank = {m: i + 1 for i, m in enumerate(sorted(thesis, key=thesis.get))}
    rows = []
    for method, entry in entries.items():
        if "error" in entry:
            rows.append([entry["name"], "-", "failed: " + entry["error"][:60], "-", "-", "-",
                         "-"])
            continue
        loss = entry["final_train_loss"]
        hp = ", ".join(f"{k}={v:g}" for k, v in entry["hyperparameters"].items()) or "-"
        rows.append([entry["name"], hp, f"{loss['mean']:.4f} +- {loss['std']:.4f}",
                     str(rank[method]),
                     "-" if method not in thesis else f"{thesis[method]:.2f}",
                     "-" if method not in thesis else str(thesis_rank[method]),
                     f"{entry['seconds_per_epoch']['mean']:.3g}"])
    for method in result["not_available"]:
        rows.append([METHOD_NAMES.get(method, method), "not available", "-", "-", "-", "-", "-"])
    return headers, rows


def plot(result: dict[str, Any], path: str) -> None:
    """Training loss against epochs (left) and against training seconds (right), one line per
    method (the mean over seeds, shaded between the lowest and highest seed). Needs
    matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, entry in enumerate(result["results"].values()):
        if "runs" not in entry:
            continue
        loss = np.array([r["train_loss"] for r in entry["runs"]])
        sec = np.array([r["seconds"] for r in entry["runs"]])
        ep = np.arange(1, loss.shape[1] + 1)
        colour = f"C{i % 10}"
        by_epoch.plot(ep, loss.mean(0), color=colour, label=entry["name"])
        by_epoch.fill_between(ep, loss.min(0), loss.max(0), color=colour, alpha=0.2)
        by_time.plot(sec.mean(0), loss.mean(0), color=colour, label=entry["name"])
        by_time.fill_between(sec.mean(0), loss.min(0), loss.max(0), color=colour, alpha=0.2)
    for ax in (by_epoch, by_time):
        ax.set_ylabel("training loss (BCE summed over pixels)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    by_epoch.set_xlabel("epoch")
    by_time.set_xlabel("training seconds (evaluation excluded)")
    by_time.set_xscale("log")
    by_epoch.set_title(f"digits autoencoder {'-'.join(map(str, SIZES))}, {ACTIVATION}",
                       fontsize=10)
    by_epoch.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
