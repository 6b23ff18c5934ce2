"""Training runs shared by the reproductions (``kronecker-mnist1d``, ``kbfgs-autoencoder``): one
method on one problem on one backend, from a seed's initial weights and batch order, with the
loss (and, for classifiers, the accuracy) on whole data sets after every epoch and the seconds
of the training steps alone."""

from __future__ import annotations

import inspect
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .. import backends

#: learning-rate schedules over a run of T steps, the same rule for every method:
#: "constant"; "cosine", lr_t = lr (1 + cos(pi t / T)) / 2; "step", lr_t = lr 0.1^floor(3 t / T)
#: (a tenth after each third of the run, the thesis's autoencoder and CNN schedule: 150 epochs
#: with a decay by 0.1 every 50)
SCHEDULES = ("constant", "cosine", "step")


def scheduled(lr: float, schedule: str, horizon: int, xp: Any) -> Any:
    """The learning rate ``lr`` under ``schedule`` (:data:`SCHEDULES`) over ``horizon`` steps:
    ``lr`` itself for "constant", else a callable of the step count t."""
    if schedule == "cosine":
        return lambda t: lr * (0.5 + 0.5 * xp.cos(math.pi * t / horizon))
    if schedule == "step":
        return lambda t: lr * 0.1 ** (3 * t // horizon)
    return lr


def accepted(cls: type, settings: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The settings the constructor of ``cls`` takes, and the names it does not."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(settings), []
    kept = {k: v for k, v in settings.items() if k in params}
    return kept, [k for k in settings if k not in params]


class Trainer:
    """Trains one method on one problem on one backend: builds the optimiser from a grid point,
    compiles the step once per method where the backend compiles (hyperparameters traced), and
    evaluates the loss (and the accuracy when ``classify``) on whole data sets.

    Parameters
    ----------
    method : str
        The method's registry name (for messages).
    factory : callable
        ``factory(model, loss, **settings)`` builds the optimiser (a registry entry).
    problem : Problem
        Has ``model`` and ``loss``.
    backend : Backend
        Where the run happens.
    dtype : str
        Precision of weights and data.
    schedule : str, default "constant"
        One of :data:`SCHEDULES`, applied to the grid point's ``lr``.
    fixed : dict or None, default None
        Settings every run shares; those the constructor does not take are dropped (listed in
        ``dropped``).
    classify : bool, default True
        Evaluate the accuracy of the arg-max output as well as the loss.
    """

    def __init__(self, method: str, factory: Any, problem: Any, backend: backends.Backend,
                 dtype: str, schedule: str = "constant", fixed: dict[str, Any] | None = None,
                 classify: bool = True):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r}: use one of {', '.join(SCHEDULES)}")
        self.method, self.factory, self.problem = method, factory, problem
        self.backend, self.dtype, self.schedule = backend, dtype, schedule
        self.classify = classify
        cls = getattr(factory, "cls", None)
        fixed = dict(fixed or {})
        self.fixed, self.dropped = (accepted(cls, fixed) if cls is not None else (fixed, []))
        self._traced_step: Callable | None = None
        self._traced_ok = backend.has_jit
        model, loss = problem.model, problem.loss
        xp = backend.xp

        def evaluate(params: Any, x: Any, y: Any) -> tuple[Any, Any]:
            f = model.apply(params, x)
            value = xp.mean(loss.per_sample(f, y))
            if not classify:
                return value, value
            correct = xp.astype(xp.argmax(f, axis=1) == y, f.dtype)
            return value, xp.mean(correct)

        self._evaluate = backend.jit(evaluate)

    def grid(self, points: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
        """The distinct grid points with the keys the constructor takes, and the names of the
        settings (fixed or in ``points``) it does not take."""
        cls = getattr(self.factory, "cls", None)
        grid, dropped = [], set(self.dropped)
        for point in points:
            kept, gone = accepted(cls, point) if cls is not None else (dict(point), [])
            dropped.update(gone)
            if kept not in grid:
                grid.append(kept)
        return grid, sorted(dropped)

    def optimiser(self, hp: dict[str, Any]) -> Any:
        """The optimiser of the grid point ``hp``; its ``"horizon"`` entry (the steps of the
        run) turns the learning rate into the run's schedule."""
        hp = dict(hp)
        horizon = hp.pop("horizon", None)
        if horizon is not None and "lr" in hp:
            hp["lr"] = scheduled(hp["lr"], self.schedule, horizon, self.backend.xp)
        return self.factory(self.problem.model, self.problem.loss, **self.fixed, **hp)

    def _step(self, hp: dict[str, Any]) -> Callable:
        """The step for ``hp``: on a compiling backend one compiled function of (hp, params,
        state, batch) shared by every grid point and seed (falling back to compiling per point
        when the method needs its hyperparameters as Python numbers)."""
        b = self.backend
        if not b.has_jit:
            return self.optimiser(hp).step
        if self._traced_ok:
            if self._traced_step is None:
                self._traced_step = b.jit(
                    lambda h, params, state, batch: self.optimiser(h).step(params, state, batch))
            traced = self._traced_step
            arrays = {k: b.asarray(v, dtype=self.dtype) for k, v in hp.items()}
            return lambda params, state, batch: traced(arrays, params, state, batch)
        return b.jit(self.optimiser(hp).step)

    def evaluate(self, params: Any, data: tuple[Any, Any]) -> tuple[float, float]:
        """(loss, accuracy) on ``data``; the accuracy is the loss again when not ``classify``."""
        loss, acc = self._evaluate(params, *data)
        return float(self.backend.to_numpy(loss)), float(self.backend.to_numpy(acc))

    def to_backend(self, x: np.ndarray, y: np.ndarray) -> tuple[Any, Any]:
        y = self.backend.asarray(y, dtype=self.dtype) if y.dtype.kind == "f" else \
            self.backend.asarray(y)
        return (self.backend.asarray(x, dtype=self.dtype), y)

    def train(self, hp: dict[str, Any], seed: int, x: np.ndarray, y: np.ndarray, epochs: int,
              evals: dict[str, tuple[Any, Any]], batch_size: int) -> dict[str, Any]:
        """``epochs`` epochs from the weights of ``seed`` with batches in the order of
        ``default_rng(seed)``; after each epoch, the loss (and accuracy) on each of ``evals``
        and the cumulative seconds of the steps."""
        b = self.backend
        n_batches = x.shape[0] // batch_size
        if n_batches < 1:
            raise ValueError(f"{x.shape[0]} training samples make no batch of {batch_size}")
        hp = {**hp, "horizon": epochs * n_batches}
        params = self.problem.model.init(seed, b, self.dtype)
        state = self.optimiser(hp).init(params)
        rng = np.random.default_rng(seed)
        batch0 = self.to_backend(x[:batch_size], y[:batch_size])
        try:
            step = self._step(hp)
            b.synchronize(step(params, state, batch0))  # compile (discarded) before the clock
        except Exception:
            if not (b.has_jit and self._traced_ok):
                raise
            self._traced_ok = False  # this method wants Python-number hyperparameters
            step = self._step(hp)
            b.synchronize(step(params, state, batch0))
        curves: dict[str, list[float]] = {"seconds": [], "batch_loss": [], "non_finite_steps": []}
        for name in evals:
            curves[f"{name}_loss"] = []
            if self.classify:
                curves[f"{name}_accuracy"] = []
        elapsed = 0.0
        for _ in range(epochs):
            order = rng.permutation(x.shape[0])
            batches = [self.to_backend(x[idx], y[idx])
                       for idx in np.split(order[:n_batches * batch_size], n_batches)]
            losses, finite = [], []
            start = time.perf_counter()
            for batch in batches:
                params, state, info = step(params, state, batch)
                losses.append(info.loss)
                finite.append(info.finite)
            b.synchronize(params)
            elapsed += time.perf_counter() - start
            curves["seconds"].append(elapsed)
            curves["batch_loss"].append(float(np.mean([scalar(b, v) for v in losses])))
            curves["non_finite_steps"].append(int(sum(not scalar(b, f) for f in finite)))
            for name, data in evals.items():
                loss, acc = self.evaluate(params, data)
                curves[f"{name}_loss"].append(loss)
                if self.classify:
                    curves[f"{name}_accuracy"].append(acc)
        return curves


def spread(values: Sequence[float]) -> dict[str, Any]:
    """n, mean, population std, median, min and max of ``values`` (None where empty)."""
    vals = [float(v) for v in values]
    if not vals:
        return {"n": 0, "mean": None, "std": None, "median": None, "min": None, "max": None}
    return {"n": len(vals), "mean": statistics.fmean(vals),
            "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0,
            "median": statistics.median(vals), "min": min(vals), "max": max(vals)}


def scalar(b: backends.Backend, value: Any) -> float:
    """A step's 0-d result (an array of the backend, or a Python number) as a float."""
    return float(np.asarray(b.to_numpy(value)) if hasattr(value, "shape") else value)


def finite(value: float, default: float = -math.inf) -> float:
    """``value`` where finite, else ``default``."""
    return value if math.isfinite(value) else default
