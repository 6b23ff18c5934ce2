"""``secondorder compare``: the same optimisers, weights and batches on every backend.

For each (method, backend) the run starts from the weights of ``problem.init(seed)`` and sees
the same sequence of mini-batches, drawn once before any run with
``rng = numpy.random.default_rng(seed)`` and ``problem._numpy_batch(rng)`` per step. Reported per
run:

* ``final_loss``: after training, the loss of the final parameters on the whole training set
  (the mean of the per-sample losses over every sample, evaluated in one pass in chunks of
  ``EVAL_CHUNK`` samples), and ``final_accuracy``, the fraction of samples whose largest output is
  the label, where the problem is a classification (integer labels); ``None`` otherwise. A problem
  without a data set in memory (Rosenbrock) reports its noise-free objective instead;
  ``final_loss_on`` says which. ``final_batch_loss`` is the loss of the last mini-batch, as
  reported by the last step;
* ``step_ms``: the median time of one step after the first;
* ``compile_ms``: on a backend that compiles (``has_jit``, JAX), the time of the first step less
  the median step time, i.e. tracing and compilation; ``None`` on eager backends;
* ``step_vs_sgd``: the step time relative to SGD on the same backend;
* ``max_rel_deviation``: max over leaves of ||w - w_ref|| / ||w_ref||, the parameters against the
  float64 NumPy run of the same method after the same number of steps. A deviation above the
  dtype's tolerance (``TOLERANCE``) is a failure.
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
#: samples per chunk when the final loss is evaluated on the whole training set
EVAL_CHUNK = 4096


@dataclass
class Run:
    """One (method, backend) run; see the module docstring for the fields. ``losses`` (the
    mini-batch loss after each step) and ``wall`` (cumulative step time, compilation excluded)
    are the curves; they stay out of :meth:`summary`."""

    method: str
    backend: str
    dtype: str
    final_loss: float | None = None
    step_ms: float | None = None
    step_vs_sgd: float | None = None
    max_rel_deviation: float | None = None
    ok: bool = True
    status: str = "ok"
    final_accuracy: float | None = None
    final_loss_on: str | None = None
    final_batch_loss: float | None = None
    compile_ms: float | None = None
    losses: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The run as a JSON-ready dict: every field but the curves."""
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
    """One run over ``batches``; returns the report and the final parameters. The final loss
    and accuracy are those of :func:`evaluate` on the final parameters."""
    run = Run(method, backend.name, dtype)
    params = problem.init(seed, backend, dtype)
    if device is not None:
        params = _to_device(backend, params, device)
    # the model itself where the problem has one: layer-tap methods (K-FAC, K-BFGS) need it,
    # and it computes the same outputs as problem.apply
    opt = METHODS[method](getattr(problem, "model", None) or problem.apply, problem.loss)
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
    run.final_batch_loss = run.losses[-1] if run.losses else None
    steady = times[1:] if len(times) > 1 else times
    run.step_ms = 1e3 * float(np.median(steady))
    if backend.has_jit and len(times) > 1:
        run.compile_ms = max(1e3 * times[0] - run.step_ms, 0.0)
    run.final_loss, run.final_accuracy, run.final_loss_on = evaluate(
        problem, backend, params, dtype, device)
    return run, params


def evaluate(problem: Any, backend: backends.Backend, params: Any, dtype: str = "float64",
             device: Any = None, chunk: int = EVAL_CHUNK
             ) -> tuple[float, float | None, str]:
    """The loss of ``params`` on the whole training set, and the accuracy where the problem is
    a classification; returns ``(loss, accuracy or None, what the loss was measured on)``.

    A problem with its data in memory (``problem.x``, ``problem.y``: the digits and
    teacher-student problems) is evaluated in one pass over its samples, ``chunk`` at a time:
    the loss is the sum of the per-sample losses over all N samples divided by N (the same mean
    the training loss takes over a batch), the accuracy the fraction of samples whose largest
    output is the integer label. A problem without a data set (Rosenbrock) reports its
    noise-free ``objective(params)``.
    """
    x_all, y_all = getattr(problem, "x", None), getattr(problem, "y", None)
    if x_all is None or y_all is None:
        value = backend.to_numpy(problem.objective(params))
        return float(np.asarray(value, dtype=np.float64)), None, "objective"
    n = x_all.shape[0]
    labels = y_all.dtype.kind in "iu"
    total, correct = 0.0, 0
    for start in range(0, n, max(int(chunk), 1)):
        x = backend.asarray(x_all[start:start + chunk], dtype=dtype, device=device)
        y = backend.asarray(y_all[start:start + chunk], dtype=None if labels else dtype,
                            device=device)
        f = problem.apply(params, x)
        per_sample = np.asarray(backend.to_numpy(problem.loss.per_sample(f, y)),
                                dtype=np.float64)
        total += float(per_sample.sum())
        if labels:
            pred = np.argmax(np.asarray(backend.to_numpy(f)), axis=-1)
            correct += int((pred == y_all[start:start + chunk]).sum())
    return total / n, (correct / n if labels else None), "training set"


def _to_device(backend: backends.Backend, params: Any, device: Any) -> Any:
    from .._pytree import tree_map

    return tree_map(lambda a: backend.asarray(backend.to_numpy(a), device=device), params)


def deviation(backend: backends.Backend, params: Any, reference: Any) -> float:
    """max over leaves of ||w - w_ref|| / ||w_ref|| (Frobenius norms, float64 on the host;
    ||w - w_ref|| alone for a zero reference leaf; inf for a non-finite one)."""
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
    """Every method of ``methods`` (names from ``secondorder.optim.registry.METHODS``) on every
    backend of ``backend_names`` (default: every installed, usable backend with autodiff), on
    the problem ``problem_name`` (a key of ``secondorder.problems.PROBLEMS``).

    All runs start from ``problem.init(seed)`` and take ``steps`` steps on the same mini-batches
    (``batch_size`` samples each, default the problem's own), drawn once from
    ``numpy.random.default_rng(seed)``; weights and data are in ``dtype``, on ``device`` (a name
    such as ``"cuda:0"``; ``None`` or ``"cpu"`` for the host). Each method also runs on NumPy in
    float64 as the reference its parameters are compared with (that run is reported as the
    NumPy run when ``dtype`` is float64). A backend that is not installed is reported as
    skipped, a run that raises as not run, a deviation above ``TOLERANCE[dtype]`` as failed
    (``ok`` False); nothing raises. ``progress`` draws a bar on stderr. Returns one
    :class:`Run` per (method, backend), in that order; the fields are described in the module
    docstring.
    """
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


def curve_deviation(losses: list[float], reference: list[float]) -> float:
    """max over steps of |l - l_ref| / |l_ref| between two loss curves (inf where their lengths
    differ or a value is not finite)."""
    if len(losses) != len(reference) or not losses:
        return float("inf")
    a, r = np.asarray(losses, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    err = np.abs(a - r) / np.maximum(np.abs(r), np.finfo(np.float64).tiny)
    return float(err.max()) if np.all(np.isfinite(err)) else float("inf")


def plot(runs: list[Run], path: str, title: str,
         tolerance: float | None = None) -> dict[str, Any]:
    """Write the comparison figure to ``path``; returns the loss panel's texts,
    ``{"title": ..., "legend": [labels]}``.

    Left: the mini-batch loss against the step, one line per method, drawn from the method's
    first run (NumPy where it ran), with its final whole-training-set loss as a star. Every
    other backend of the method is compared with that line; one whose curve deviates by more
    than ``tolerance`` (relative, at any step; default the consistency tolerance of the runs'
    dtype) or whose parameters failed the consistency check is drawn as its own dashed line
    with markers and labelled "DEVIATES"; the title names the backends that coincide. Right:
    the median time per step of each method on each backend as horizontal bars on a log axis,
    with the compilation time of the first step of compiling backends written beside its bar
    (it is not part of the bar).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, timing) = plt.subplots(1, 2, figsize=(13, 4.8),
                                          gridspec_kw={"width_ratios": [1.2, 1]})
    methods = list(dict.fromkeys(r.method for r in runs))
    names = list(dict.fromkeys(r.backend for r in runs))
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    coincide: set[str] = set()
    deviates: set[str] = set()
    for method in methods:
        mine = [r for r in runs if r.method == method and r.losses]
        if not mine:
            continue
        base = next((r for r in mine if r.backend == "numpy"), mine[0])
        tol = TOLERANCE.get(base.dtype, 1e-8) if tolerance is None else tolerance
        steps = np.arange(1, len(base.losses) + 1)
        by_step.plot(steps, base.losses, color=colours[method], label=method)
        if base.final_loss is not None:
            by_step.plot([steps[-1]], [base.final_loss], marker="*", markersize=11,
                         color=colours[method], linestyle="none")
        for r in mine:
            if r is base:
                coincide.add(r.backend)
                continue
            dev = curve_deviation(r.losses, base.losses)
            if r.ok and dev <= tol:
                coincide.add(r.backend)
                continue
            deviates.add(r.backend)
            by_step.plot(np.arange(1, len(r.losses) + 1), r.losses, color=colours[method],
                         linestyle="--", marker="x", markevery=max(len(r.losses) // 10, 1),
                         label=f"{method} / {r.backend}: DEVIATES ({dev:.1e})")
    by_step.plot([], [], marker="*", color="grey", linestyle="none",
                 label="final loss, whole training set")
    by_step.set_xlabel("step")
    by_step.set_ylabel("mini-batch loss")
    by_step.set_yscale("log")
    by_step.grid(alpha=0.3)
    by_step.legend(fontsize=7)
    shown = [n for n in names if n in coincide and n not in deviates]
    tol_text = "the consistency tolerance" if tolerance is None else f"{tolerance:g}"
    if runs and tolerance is None and len({r.dtype for r in runs}) == 1:
        tol_text = f"{TOLERANCE.get(runs[0].dtype, 1e-8):g}"
    panel_title = (f"one line per method: {', '.join(shown) or 'no backend'} coincide "
                   f"(relative {tol_text} at every step)")
    if deviates:
        panel_title += f";\n{', '.join(n for n in names if n in deviates)} deviates where marked"
    by_step.set_title(panel_title, fontsize=9)

    height = 0.8 / max(len(names), 1)
    slowest = max((r.step_ms for r in runs if r.step_ms), default=1.0)
    for j, name in enumerate(names):
        ys, widths = [], []
        for i, method in enumerate(methods):
            r = next((r for r in runs if r.method == method and r.backend == name), None)
            if r is None or not r.step_ms:
                continue
            y = i + (j - (len(names) - 1) / 2) * height
            ys.append(y)
            widths.append(r.step_ms)
            note = f" {r.step_ms:.3g} ms"
            if r.compile_ms is not None:
                note += f" (+ compile {r.compile_ms / 1e3:.2g} s, once)"
            timing.text(r.step_ms, y, note, va="center", fontsize=6)
        timing.barh(ys, widths, height=height, color=f"C{j % 10}", alpha=0.7, label=name)
    timing.set_yticks(range(len(methods)), methods, fontsize=8)
    timing.invert_yaxis()
    timing.set_xscale("log")
    timing.set_xlim(right=slowest * 30)  # room for the labels beside the bars
    timing.set_xlabel("median time per step (ms, log scale; compilation excluded)")
    timing.grid(alpha=0.3, axis="x")
    timing.legend(fontsize=7, title="backend", title_fontsize=7)
    timing.set_title("time per step", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    legend = [t.get_text() for t in by_step.get_legend().get_texts()]
    return {"title": panel_title, "legend": legend}
