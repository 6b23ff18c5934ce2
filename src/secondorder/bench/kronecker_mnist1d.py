"""``secondorder reproduce kronecker-mnist1d``: K-FAC, Shampoo, TNT, K-BFGS, K-BFGS(L), SMW-GN and
SMW-NG against SGD with momentum
and Adam on MNIST-1D (S. Greydanus and D. Kobak, "Scaling down deep learning with MNIST-1D",
ICML 2024), with the authors' small CNN and MLP.

Protocol
--------
* Data: ``mnist1d``'s ``make_dataset(get_dataset_args())``: 4000 training and 1000 test signals
  of length 40, 10 classes. ``validation`` (default 500) training signals, drawn with
  ``numpy.random.default_rng(0)``, form the validation set; the test set is never looked at
  until the hyperparameters are fixed.
* Models: ``mnist1d-cnn`` (:class:`~secondorder.models.Conv1DNet`: three ReLU convolutions,
  25 channels, kernels 5, 3, 3, stride 2, padding 1, then 125 -> 10) and ``mnist1d-mlp``
  (40-100-100-10, ReLU); softmax cross-entropy; mini-batches of 100 (the authors'), one pass
  over a fresh permutation per epoch (the last incomplete batch is dropped).
* Model selection: every point of a method's grid (:data:`GRIDS`, below; ``grid_size`` keeps
  the first points of each list) trains for ``epochs`` epochs on the training split from
  initial weights and batch order of the tuning seed (:data:`TUNE_SEED`); the point with the
  highest final validation accuracy is kept (ties: lower validation loss). A grid of one point
  is not tuned. The methods' other settings are fixed (:data:`FIXED`).
* Evaluation: the chosen point trains on the whole training set (training split plus
  validation split: the 4000 signals the authors train on; ``refit=False`` keeps the training
  split) for ``epochs`` epochs, once per evaluation seed (0, 1, ..., ``seeds`` - 1: the
  initial weights and the batch order). After every epoch: the loss on the whole training set,
  the test accuracy and loss, and the wall-clock seconds of the training steps so far (the
  evaluation is not timed; on JAX the step is compiled once before the clock starts, with
  traced hyperparameters, so neither grid points nor seeds recompile).
* Schedule (``schedule``): every run, tuning and evaluation, keeps its learning rate constant
  (the default) or decays it by a cosine to 0 over its steps (``"cosine"``), the same rule for
  every method. With a constant rate the CNN's validation accuracy oscillates by several
  points from epoch to epoch (K-FAC between 82% and 90% over 20 epochs); the cosine makes the
  final epoch, on which both selection and reporting rest, a converged one.
* Target: SGD-momentum's final test accuracy (mean over the seeds). For each method and seed,
  the first epoch whose test accuracy reaches it, and the seconds at that epoch; reported as
  the median and the range over the seeds that reach it, with the count.

Methods are looked up by name in :data:`secondorder.optim.registry.METHODS`: ``sgd`` (SGD with
momentum 0.9), ``adam``, ``kfac``, ``shampoo``, ``tnt``, ``kbfgs``, ``kbfgs-l``, ``smw-gn`` and
``smw-ng``. A name that is not registered is
reported as not available and skipped. Grid keys (and fixed settings) that a method's
constructor does not take are dropped and listed in the result.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .. import backends
from .training import Trainer, finite, spread

EXPERIMENT = "kronecker-mnist1d"
#: the methods compared, by registry name, with the names the report uses
METHOD_NAMES = {"sgd": "SGD-momentum", "adam": "Adam", "kfac": "K-FAC", "shampoo": "Shampoo",
                "tnt": "TNT", "kbfgs": "K-BFGS", "kbfgs-l": "K-BFGS(L)", "smw-gn": "SMW-GN",
                "smw-ng": "SMW-NG"}
#: the reference whose final test accuracy is the target
REFERENCE = "sgd"
MODELS = {"cnn": "mnist1d-cnn", "mlp": "mnist1d-mlp"}
#: hyperparameter grids, most promising first (``grid_size`` keeps a prefix of each list). The
#: Kronecker-factored grids are placed by the scale of each method's step (measured on the CNN,
#: jax float32, 5-epoch probes on the validation split):
#:
#: * TNT: with the thesis's mini-batch scaling (statistics of the batch-mean sampled gradient,
#:   m = 100) the normalised factors of the CNN's conv kernels (k = 3 modes) have mean
#:   eigenvalue c0 ~ 0.035 at initialisation (the 10 x 125 dense weight ~ 0.01, biases < 1e-3),
#:   and the direction on a k-way leaf is about g / (c0 + eps)^k: up to eps^-k times the
#:   gradient, 10^3 for the conv kernels at eps = 0.1 against 10^2 for the MLP's matrices. The
#:   CNN diverges once lr / (c0 + eps)^3 exceeds about 1 (eps 0.03: lr 3e-4; eps 0.1: 3e-3;
#:   eps 0.3: 3e-2) and trains best near a third of that; the first grid (lr 3e-3 at eps 0.1)
#:   sat on that edge and stayed at chance. Each eps's row of lr straddles the edge (the MLP,
#:   with 2-way leaves, tolerates the larger values), with lr ~ (c0 + eps)^3.
#: * K-FAC: a direction of curvature lambda moves by lr / (lambda + damping), so lr / damping
#:   is the gain on flat directions; ~1/3 (3 x SGD-momentum's lr) trained best at dampings
#:   0.1 .. 1, 1 stalled and 3 diverged. The grid keeps that ratio over the damping, then 0.1.
#: * Shampoo: the step is invariant to the gradient's scale (statistics quadratic in g, each
#:   factor to the power -1/(2k)), so lr is an absolute step length; with Adam grafting
#:   (:data:`FIXED`) it is Adam's. eps 1e-4 is below the statistics' eigenvalues. Without
#:   grafting the CNN reached 88.6% validation accuracy in 60 cosine epochs at lr 0.03 (94.0%
#:   with it): Conv1DNet's kernels (C_out, C_in, 1, k) are 4-way for Shampoo, and the
#:   per-tensor norm of Adam's step fixes the step length that the roots leave open.
#: * K-BFGS and K-BFGS(L): the step H_G grad H_A has the damping split between the two factors
#:   (sqrt(lambda) each on dense layers), so, as for K-FAC, lr / damping is the gain on flat
#:   directions; the same two ratios (1/3, then 1/10) over dampings 0.3 .. 3. (The thesis's best
#:   MNIST-autoencoder pair, lr 0.3 and damping 30, is a ratio of 1/100 for its T = 20.)
#: * SMW-GN and SMW-NG: Levenberg-Marquardt steps whose damping adapts from the reduction ratio
#:   (initial lambda_LM, then x1.01 / x0.99 a step), so the grid sets the initial damping and
#:   the step's fraction lr of the damped Newton step.
KBFGS_GRID = [{"lr": lr, "damping": d} for lr, d in ((0.1, 0.3), (0.3, 1.0), (1.0, 3.0),
                                                     (0.03, 0.3), (0.1, 1.0), (0.3, 3.0))]
SMW_GRID = [{"lr": lr, "damping": d} for lr, d in ((1.0, 1.0), (1.0, 0.1), (0.5, 1.0),
                                                   (1.0, 10.0))]
GRIDS: dict[str, list[dict[str, float]]] = {
    "sgd": [{"lr": lr, "momentum": 0.9} for lr in (0.1, 0.03, 0.3, 0.01)],
    "adam": [{"lr": lr} for lr in (1e-2, 3e-3, 3e-2, 1e-3)],
    "kfac": [{"lr": lr, "damping": d} for lr, d in ((0.1, 0.3), (0.03, 0.1), (0.3, 1.0),
                                                     (0.03, 0.3), (0.01, 0.1), (0.1, 1.0))],
    "shampoo": [{"lr": lr, "eps": e} for e in (1e-4, 1e-3) for lr in (0.03, 0.01, 0.1)],
    "tnt": [{"lr": lr, "eps": e} for e, lrs in ((0.03, (1e-4, 3e-4, 3e-5)),
                                                (0.1, (1e-3, 3e-3, 3e-4))) for lr in lrs],
    "kbfgs": KBFGS_GRID,
    "kbfgs-l": KBFGS_GRID,
    "smw-gn": SMW_GRID,
    "smw-ng": SMW_GRID,
}
#: settings every run of a method shares (statistics every 5 steps and inverses or roots every
#: 20 for the Kronecker-factored methods, momentum 0.9 where the method has it, Shampoo's step
#: length grafted from Adam's as in Distributed Shampoo, TNT's thesis scaling, for which its
#: grid above was placed, now that TNT's default is "per_example")
FIXED: dict[str, dict[str, Any]] = {
    "sgd": {},
    "adam": {},
    "kfac": {"momentum": 0.9, "statistics_interval": 5, "inverse_interval": 20},
    "shampoo": {"momentum": 0.9, "statistics_interval": 1, "root_interval": 20,
                "graft": "adam"},
    "tnt": {"momentum": 0.9, "statistics_interval": 5, "inverse_interval": 20,
            "fisher_estimate": "batch_mean"},
    "kbfgs": {"momentum": 0.9, "curvature_interval": 5},
    "kbfgs-l": {"momentum": 0.9, "curvature_interval": 5, "memory": 10},
    "smw-gn": {"curvature_batch": 30},
    "smw-ng": {"curvature_batch": 30},
}
TUNE_SEED = 1000
DEFAULT_EPOCHS = 100
DEFAULT_SEEDS = 3
BATCH_SIZE = 100


# -- the study -------------------------------------------------------------------------------

def time_to_target(runs: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """Epochs and seconds each run needs until its test accuracy first reaches ``target``:
    ``{"target", "reached" (runs that got there), "runs", "epochs": spread, "seconds": spread}``
    where a spread has n, mean, std, median, min and max over the runs that got there."""
    epochs, seconds = [], []
    for run in runs:
        acc = run["test_accuracy"]
        hit = next((i for i, a in enumerate(acc) if a >= target - 1e-12), None)
        if hit is not None:
            epochs.append(hit + 1)
            seconds.append(run["seconds"][hit])
    return {"target": target, "reached": len(epochs), "runs": len(runs),
            "epochs": spread(epochs), "seconds": spread(seconds)}


def reproduce(models: Sequence[str] = tuple(MODELS), methods: Sequence[str] = tuple(METHOD_NAMES),
              epochs: int = DEFAULT_EPOCHS, seeds: int = DEFAULT_SEEDS,
              grid_size: int | None = None, backend: str = "jax", dtype: str = "float32",
              validation: int = 500, refit: bool = True, batch_size: int = BATCH_SIZE,
              subset: int | None = None, schedule: str = "constant",
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the protocol of the module docstring.

    Parameters
    ----------
    models : sequence of str, default ``("cnn", "mlp")``
        Keys of :data:`MODELS`.
    methods : sequence of str, default every key of :data:`METHOD_NAMES`
        Registry names; those not registered are reported under ``"not_available"``.
    epochs : int, default 100
        Epochs of every run (tuning and evaluation).
    seeds : int, default 3
        Evaluation seeds 0, ..., seeds - 1.
    grid_size : int or None, default None
        Keep the first ``grid_size`` points of each grid (None: the whole grid).
    backend : str, default ``"jax"``
        Backend name (JAX runs in float64 only with ``dtype="float64"``, which switches x64 on).
    dtype : str, default ``"float32"``
        Precision of weights and data.
    validation : int, default 500
        Training signals held out for model selection.
    refit : bool, default True
        Train the evaluation runs on training plus validation signals (else the training split).
    batch_size : int, default 100
        Signals per mini-batch.
    subset : int or None, default None
        Use only the first ``subset`` signals of the training split, the validation split and
        the test set (a quick run; None: all of them).
    schedule : {"constant", "cosine", "step"}, default "constant"
        The learning rate over a run (:data:`secondorder.bench.training.SCHEDULES`), the same
        rule for every method and every run: ``"cosine"`` decays each grid point's lr to 0 over
        the run's steps, ``"step"`` by a tenth after each third of them.
    progress : callable or None, default None
        Receives one line per finished run.

    Returns a JSON-ready dict: ``experiment``, ``protocol`` (every setting above, the grids and
    fixed settings used, the seeds, the selection rule), ``not_available`` (registry names
    missing), ``target`` (per model: SGD-momentum's mean final test accuracy, or None), and
    ``results[model][method]`` with ``name``, ``hyperparameters`` (chosen), ``fixed``,
    ``dropped`` (settings the constructor does not take), ``tuning`` (per grid point: its
    hyperparameters, final validation accuracy and loss, seconds), ``runs`` (per seed:
    ``seed``, ``train_loss``, ``test_accuracy``, ``test_loss``, ``seconds``, ``batch_loss``,
    ``non_finite_steps``, one entry per epoch), ``final_test_accuracy`` (a spread: n, mean,
    std, median, min, max), ``seconds_per_epoch`` and ``to_target`` (see
    :func:`time_to_target`); or ``error`` if the method raised.
    """
    from ..optim.registry import METHODS
    from ..problems import PROBLEMS

    if backend == "jax" and dtype == "float64":
        import jax

        jax.config.update("jax_enable_x64", True)
    b = backends.get(backend)
    available = [m for m in methods if m in METHODS]
    missing = [m for m in methods if m not in METHODS]
    ordered = ([REFERENCE] if REFERENCE in available else []) + [
        m for m in available if m != REFERENCE]
    seed_list = list(range(seeds))
    out: dict[str, Any] = {
        "experiment": EXPERIMENT,
        "protocol": {
            "models": {m: MODELS[m] for m in models}, "methods": list(methods),
            "epochs": epochs, "seeds": seed_list, "tune_seed": TUNE_SEED,
            "grid_size": grid_size, "backend": backend, "dtype": dtype,
            "validation": validation, "refit": refit, "batch_size": batch_size,
            "subset": subset, "schedule": schedule, "reference": REFERENCE,
            "selection": "highest final validation accuracy (ties: lower validation loss)",
            "grids": {m: GRIDS.get(m, [{}])[:grid_size] for m in methods},
            "fixed": {m: FIXED.get(m, {}) for m in methods},
        },
        "not_available": missing,
        "target": {},
        "results": {},
    }
    for model_key in models:
        problem = PROBLEMS[MODELS[model_key]](batch_size=batch_size, validation=validation)
        cut = slice(None) if subset is None else slice(0, subset)
        x_tr, y_tr = problem.x[cut], problem.y[cut]
        x_val, y_val = problem.x_val[cut], problem.y_val[cut]
        x_te, y_te = problem.x_test[cut], problem.y_test[cut]
        x_fit = np.concatenate([x_tr, x_val]) if refit else x_tr
        y_fit = np.concatenate([y_tr, y_val]) if refit else y_tr
        per_method: dict[str, Any] = {}
        out["results"][model_key] = per_method
        for method in ordered:
            entry: dict[str, Any] = {"name": METHOD_NAMES.get(method, method)}
            per_method[method] = entry
            try:
                runner = Trainer(method, METHODS[method], problem, b, dtype, schedule,
                                 FIXED.get(method, {}))
                _study(runner, entry, method, grid_size, seed_list, epochs, batch_size,
                       (x_tr, y_tr), (x_val, y_val), (x_fit, y_fit), (x_te, y_te), progress,
                       model_key)
            except Exception as err:  # a broken method is reported, the others still run
                entry["error"] = f"{type(err).__name__}: {err}"
                if progress:
                    progress(f"{model_key:<4} {method:<8} failed: {entry['error']}")
        ref = per_method.get(REFERENCE, {})
        target = (ref.get("final_test_accuracy") or {}).get("mean")
        out["target"][model_key] = target
        for entry in per_method.values():
            if "runs" in entry and target is not None:
                entry["to_target"] = time_to_target(entry["runs"], target)
    return out


def _study(runner: Trainer, entry: dict[str, Any], method: str, grid_size: int | None,
           seeds: list[int], epochs: int, batch_size: int, train: tuple, val: tuple,
           fit: tuple, test: tuple, progress: Callable[[str], None] | None,
           model_key: str) -> None:
    grid, dropped = runner.grid(GRIDS.get(method, [{}])[:grid_size])
    entry["fixed"], entry["dropped"] = runner.fixed, dropped
    tuning = []
    if len(grid) > 1:
        val_data = runner.to_backend(*val)
        for hp in grid:
            start = time.perf_counter()
            curves = runner.train(hp, TUNE_SEED, *train, epochs, {"val": val_data}, batch_size)
            tuning.append({"hyperparameters": hp, "val_accuracy": curves["val_accuracy"][-1],
                           "val_loss": curves["val_loss"][-1],
                           "seconds": round(time.perf_counter() - start, 2)})
            if progress:
                progress(f"{model_key:<4} {method:<8} tune {hp}: validation accuracy "
                         f"{tuning[-1]['val_accuracy']:.4f}")
        best = min(tuning, key=lambda t: (-finite(t["val_accuracy"]),
                                          finite(t["val_loss"], math.inf)))
        chosen = best["hyperparameters"]
    else:
        chosen = grid[0]
    entry["hyperparameters"], entry["tuning"] = chosen, tuning
    evals = {"train": runner.to_backend(*fit), "test": runner.to_backend(*test)}
    runs = []
    for seed in seeds:
        curves = runner.train(chosen, seed, *fit, epochs, evals, batch_size)
        runs.append({"seed": seed, **curves})
        if progress:
            progress(f"{model_key:<4} {method:<8} seed {seed}: test accuracy "
                     f"{curves['test_accuracy'][-1]:.4f} after {epochs} epochs, "
                     f"{curves['seconds'][-1]:.1f} s")
    entry["runs"] = runs
    entry["final_test_accuracy"] = spread([r["test_accuracy"][-1] for r in runs])
    entry["seconds_per_epoch"] = spread([r["seconds"][-1] / epochs for r in runs])


# -- report ----------------------------------------------------------------------------------

def _range(values: dict[str, Any], fmt: str) -> str:
    if not values["n"]:
        return "-"
    return f"{values['median']:{fmt}} [{values['min']:{fmt}}, {values['max']:{fmt}}]"


def table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows for :func:`secondorder.bench.table.format_table`: per model and
    method the chosen hyperparameters, the final test accuracy (mean +- std over seeds), the
    seconds per epoch, and the epochs and seconds to SGD-momentum's final test accuracy
    (median [min, max] over the seeds that reach it, and how many do)."""
    headers = ["model", "method", "hyperparameters", "test accuracy", "s / epoch",
               "epochs to target", "seconds to target", "reached"]
    rows = []
    for model, per_method in result["results"].items():
        for entry in per_method.values():
            if "error" in entry:
                rows.append([model, entry["name"], "-", "failed: " + entry["error"][:60], "-",
                             "-", "-", "-"])
                continue
            acc, spe = entry["final_test_accuracy"], entry["seconds_per_epoch"]
            hp = ", ".join(f"{k}={v:g}" for k, v in entry["hyperparameters"].items()) or "-"
            tt = entry.get("to_target")
            rows.append([
                model, entry["name"], hp, f"{acc['mean']:.4f} +- {acc['std']:.4f}",
                f"{spe['mean']:.3g}",
                "-" if tt is None else _range(tt["epochs"], "g"),
                "-" if tt is None else _range(tt["seconds"], ".3g"),
                "-" if tt is None else f"{tt['reached']}/{tt['runs']}",
            ])
    for method in result["not_available"]:
        rows.append(["-", METHOD_NAMES.get(method, method), "not available", "-", "-", "-",
                     "-", "-"])
    return headers, rows


def plot(result: dict[str, Any], path: str) -> None:
    """Test accuracy against epochs (left) and against training seconds (right), one row per
    model, one line per method (the mean over seeds, shaded between the lowest and highest
    seed), with SGD-momentum's final accuracy (the target) dotted. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["results"])
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.6 * max(len(models), 1)),
                             squeeze=False)
    for row, model in enumerate(models):
        by_epoch, by_time = axes[row]
        for i, (_method, entry) in enumerate(result["results"][model].items()):
            if "runs" not in entry:
                continue
            acc = np.array([r["test_accuracy"] for r in entry["runs"]])
            sec = np.array([r["seconds"] for r in entry["runs"]])
            ep = np.arange(1, acc.shape[1] + 1)
            colour = f"C{i % 10}"
            label = entry["name"]
            by_epoch.plot(ep, acc.mean(0), color=colour, label=label)
            by_epoch.fill_between(ep, acc.min(0), acc.max(0), color=colour, alpha=0.2)
            by_time.plot(sec.mean(0), acc.mean(0), color=colour, label=label)
            by_time.fill_between(sec.mean(0), acc.min(0), acc.max(0), color=colour, alpha=0.2)
        target = result["target"].get(model)
        for ax in (by_epoch, by_time):
            if target is not None:
                ax.axhline(target, color="k", ls=":", lw=1, label="SGD-momentum final")
            ax.set_ylabel("test accuracy")
            ax.grid(alpha=0.3)
        by_epoch.set_xlabel("epoch")
        by_time.set_xlabel("training seconds (evaluation excluded)")
        by_time.set_xscale("log")
        by_epoch.set_title(f"MNIST-1D, {MODELS.get(model, model)}", fontsize=10)
        by_epoch.legend(fontsize=8, loc="lower right")
    proto = result["protocol"]
    fig.suptitle(f"{EXPERIMENT}: {proto['backend']} {proto['dtype']}, {proto['epochs']} "
                 f"epochs, {len(proto['seeds'])} seed(s); mean over seeds, band = min-max",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

