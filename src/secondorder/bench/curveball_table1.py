"""``secondorder reproduce curveball-table1``: the protocol of Table 1 of the CurveBall paper
(J. F. Henriques, S. Ehrhardt, S. Albanie, A. Vedaldi, "Small steps and giant leaps: Minimal
Newton solvers for deep learning", ICCV 2019).

Iterations to reach an objective below 1e-4 on the stochastic Rosenbrock function (deterministic,
eps ~ U[0, 1], eps ~ U[0, 3]) and the Rahimi & Recht linear network, for SGD with momentum, Adam,
Levenberg-Marquardt, BFGS, Newton (absolute eigenvalues) and CurveBall, from random starting
points (see :mod:`secondorder.problems` for the starts and the noise). The paper names a cubic
line search for its BFGS and no step rule for its Newton; ours is globalised by the textbook
choice, an Armijo backtracking search with cubic interpolation and the default constants
(c1 = 1e-4, unit first trial, safeguard [0.1, 0.5]), on the step's own batch. Every run is one
``jax.jit``-compiled ``while_loop`` of the library's optimiser steps, and the runs of a method are
vectorised with ``jax.vmap``. SGD and Adam take the paper's grids: each grid point is run on
separate tuning seeds, the point with the fewest mean iterations (a failure counts as the cap) is
kept, and its statistics on the evaluation seeds are reported. Mean and standard deviation are
over the runs that reach the tolerance; ``failures`` counts the others. The tolerance applies to
the noise-free objective after each step (``criterion="exact"``), or to the loss on a fresh noise
draw (``"noisy"``): the paper does not say which; on these problems the counts barely differ.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import backends
from ..problems import LinearNetwork, Problem, Rosenbrock

TOLERANCE = 1e-4
SETTINGS = ("deterministic", "U[0,1]", "U[0,3]", "linear-network")
#: Table 1 of the paper (mean iterations)
PAPER = {
    "SGD + momentum": (370, 846, 4069, 95),
    "Adam": (799, 1290, 2750, 95),
    "Levenberg-Marquardt": (16, 14, 17, 9),
    "BFGS": (19, 44, 63, 43),
    "Newton (abs eigenvalues)": (14, 10, 17, 9),
    "CurveBall": (13, 12, 13, 35),
}
LRS = (0.1, 0.05, 0.01, 0.005, 0.001, 0.0005, 0.0001)
GRIDS = {
    "SGD + momentum": [{"lr": lr, "momentum": mu}
                       for lr, mu in itertools.product(LRS, (0.9, 0.95, 0.99))],
    "Adam": [{"lr": lr, "b1": b1, "b2": b2}
             for lr, b1, b2 in itertools.product(LRS, (0.9, 0.99), (0.99, 0.999))],
}
#: iteration caps: first-order methods on Rosenbrock need thousands of steps (the paper's SGD
#: mean on U[0, 3] is 4069); everything else gets 1000 (the paper's worst mean there is 95)
FIRST_ORDER_ROSENBROCK_CAP = 20000
DEFAULT_CAP = 1000


def cap_for(method: str, setting: str) -> int:
    """The iteration cap of a cell: 20000 for SGD and Adam on the Rosenbrock settings, 1000
    otherwise; a run that has not reached the tolerance by then counts as a failure."""
    if method in GRIDS and setting != "linear-network":
        return FIRST_ORDER_ROSENBROCK_CAP
    return DEFAULT_CAP


def make_problem(setting: str) -> Problem:
    """The problem of a setting: ``LinearNetwork()`` for ``"linear-network"``, else
    ``Rosenbrock(setting)`` with that noise (``"deterministic"``, ``"U[0,1]"``, ``"U[0,3]"``)."""
    return LinearNetwork() if setting == "linear-network" else Rosenbrock(setting)


def optimiser_factory(method: str, problem: Problem) -> Callable[[dict], Any]:
    """A function of the hyperparameters (possibly traced arrays) returning the optimiser."""
    from .. import optim

    apply, loss = problem.apply, problem.loss
    factories: dict[str, Callable[[dict], Any]] = {
        "SGD + momentum": lambda hp: optim.SGD(apply, loss, lr=hp["lr"], momentum=hp["momentum"]),
        "Adam": lambda hp: optim.Adam(apply, loss, lr=hp["lr"], b1=hp["b1"], b2=hp["b2"]),
        "CurveBall": lambda hp: optim.CurveBall(apply, loss, damping=1.0),
    }
    if hasattr(optim, "LevenbergMarquardt"):
        factories["Levenberg-Marquardt"] = lambda hp: optim.LevenbergMarquardt(apply, loss)
    if hasattr(optim, "BFGS"):
        factories["BFGS"] = lambda hp: optim.BFGS(apply, loss)
    if hasattr(optim, "Newton"):
        factories["Newton (abs eigenvalues)"] = lambda hp: optim.Newton(
            apply, loss, variant="abs", line_search="cubic")
    if method not in factories:
        raise KeyError(f"method {method!r} is not available")
    return factories[method]


def _runner(method: str, problem: Problem, cap: int, criterion: str) -> Callable:
    import jax
    import jax.numpy as jnp

    factory = optimiser_factory(method, problem)

    def run(hp: dict, start: Any, key: Any) -> tuple[Any, Any]:
        opt = factory(hp)
        state = opt.init(start)

        def keep_going(carry: tuple) -> Any:
            k, _, _, _, done = carry
            return jnp.logical_and(k < cap, jnp.logical_not(done))

        def measured(params: Any, key: Any) -> Any:
            if criterion == "exact":
                return problem.objective(params)
            x, y = problem.jax_batch(key, jnp.float64)  # a fresh draw of the noise
            return problem.loss.value(problem.apply(params, x), y)

        def body(carry: tuple) -> tuple:
            k, params, state, key, _ = carry
            key, sub, probe = jax.random.split(key, 3)
            batch = problem.jax_batch(sub, jnp.float64)
            params, state, _ = opt.step(params, state, batch)
            return k + 1, params, state, key, measured(params, probe) < TOLERANCE

        key, probe = jax.random.split(key)
        done0 = measured(start, probe) < TOLERANCE
        k, params, _, _, done = jax.lax.while_loop(keep_going, body,
                                                   (0, start, state, key, done0))
        return k, done

    return jax.jit(jax.vmap(run))  # every argument batched along axis 0


def _starts(problem: Problem, seeds: range) -> Any:
    import jax.numpy as jnp

    from .._pytree import tree_map

    b = backends.get("jax")
    starts = [problem.init(s, b) for s in seeds]
    return tree_map(lambda *xs: jnp.stack(xs), *starts)


def _run(method: str, setting: str, hps: list[dict], seeds: range,
         criterion: str = "exact") -> np.ndarray:
    """Iterations (cap + 1 for a failure) of every (hyperparameter, seed) pair."""
    import jax
    import jax.numpy as jnp

    from .._pytree import tree_map

    problem = make_problem(setting)
    cap = cap_for(method, setting)
    n = len(seeds)
    starts = _starts(problem, seeds)
    starts = tree_map(lambda a: jnp.concatenate([a] * len(hps)), starts)
    hp = {k: jnp.repeat(jnp.asarray([h[k] for h in hps], dtype=jnp.float64), n)
          for k in hps[0]}
    keys = jax.random.split(jax.random.PRNGKey(seeds[0] + 7919), n)
    keys = jnp.concatenate([keys] * len(hps))
    iterations, done = _runner(method, problem, cap, criterion)(hp, starts, keys)
    its = np.asarray(iterations).astype(float)
    its[~np.asarray(done)] = cap + 1
    return its.reshape(len(hps), n)


def _stats(its: np.ndarray, cap: int) -> dict[str, Any]:
    ok = its <= cap
    return {"mean": float(its[ok].mean()) if ok.any() else None,
            "std": float(its[ok].std()) if ok.any() else None,
            "failures": int((~ok).sum()), "runs": int(its.size)}


def reproduce(runs: int = 100, methods: list[str] | None = None,
              settings: tuple[str, ...] = SETTINGS, tune_runs: int = 20,
              criterion: str = "exact",
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the protocol (see the module docstring) for ``methods`` (default: every row of
    ``PAPER``) on ``settings``: ``runs`` evaluation starts per cell (seeds 1000, 1001, ...),
    and ``tune_runs`` starts per grid point (seeds 5000, ...) to pick SGD's and Adam's
    hyperparameters; ``criterion`` is ``"exact"`` or ``"noisy"``; ``progress`` receives one
    line per finished cell. Needs jax (float64 is switched on). Returns
    ``{method: {setting: cell}}`` where a cell holds ``mean`` and ``std`` (None if no run got
    there), ``failures``, ``runs``, ``paper_mean``, ``cap``, ``criterion``, ``seconds`` and, for
    SGD and Adam, the chosen ``hyperparameters``."""
    import jax

    jax.config.update("jax_enable_x64", True)
    methods = list(PAPER) if methods is None else methods
    results: dict[str, Any] = {}
    eval_seeds = range(1000, 1000 + runs)
    tune_seeds = range(5000, 5000 + tune_runs)
    for method in methods:
        results[method] = {}
        for setting in settings:
            start = time.perf_counter()
            cap = cap_for(method, setting)
            entry: dict[str, Any]
            if method in GRIDS:
                grid = GRIDS[method]
                tuned = _run(method, setting, grid, tune_seeds, criterion).mean(axis=1)
                best = grid[int(np.argmin(tuned))]
                entry = _stats(_run(method, setting, [best], eval_seeds, criterion)[0], cap)
                entry["hyperparameters"] = best
            else:
                entry = _stats(_run(method, setting, [{"unused": 0.0}], eval_seeds,
                                    criterion)[0], cap)
            entry["paper_mean"] = PAPER[method][SETTINGS.index(setting)]
            entry["cap"] = cap
            entry["criterion"] = criterion
            entry["seconds"] = round(time.perf_counter() - start, 2)
            results[method][setting] = entry
            if progress:
                progress(f"{method:<26} {setting:<15} {_cell(entry)}  ({entry['seconds']} s)")
    return results


def _cell(entry: dict[str, Any]) -> str:
    if entry["mean"] is None:
        return f"all {entry['failures']} failed"
    text = f"{entry['mean']:.1f} +- {entry['std']:.1f}"
    return text + (f" ({entry['failures']} failed)" if entry["failures"] else "")


def table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows for :func:`secondorder.bench.table.format_table`: one row per method,
    one column per setting holding "mean +- std (failures) | paper mean"."""
    headers = ["method"] + [f"{s} (ours | paper)" for s in SETTINGS]
    rows = []
    for method, per_setting in results.items():
        row = [method]
        for setting in SETTINGS:
            entry = per_setting.get(setting)
            row.append("-" if entry is None else f"{_cell(entry)} | {entry['paper_mean']}")
        rows.append(row)
    return headers, rows
