"""Survey of bad inputs: what the library does with each, per area and backend.

    python benchmarks/bad_inputs.py --json OUT [--backends numpy,torch,jax] [--no-cli]

Every case is classified as

* ``named error``: a :class:`~secondorder.errors.SecondOrderError` subclass with a message;
* ``honest report``: a result that says it failed (cg's reason is not "converged", a step's
  ``info.finite`` is False) or a correct result (checked against a float64 NumPy oracle);
* ``silent``: a result reported as a success that the oracle contradicts, or no error where one
  is due;
* ``traceback``: any other exception (for the command line: an exit code other than 2 with a
  one-line message, or a Python traceback).

The JSON holds, per area and backend, the counts and every silent and traceback case.
"""

# ruff: noqa: B023 - every lambda runs at once, inside record(), in its own loop iteration

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np

from secondorder import backends, losses
from secondorder.errors import SecondOrderError
from secondorder.linalg import Dense, Diagonal, Kronecker, cg, damped_inverse, inverse_root
from secondorder.models import MLP
from secondorder.optim.registry import METHODS

NAMED, HONEST, SILENT, TRACEBACK = "named error", "honest report", "silent", "traceback"
RESULTS: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
CASES: list[dict[str, Any]] = []


class SilentError(Exception):
    """Raised by a judge: the result is reported as a success but is wrong (or no error came)."""


def record(area: str, backend: str, case: str, fn: Callable[[], Any],
           judge: Callable[[Any], None] | None = None) -> None:
    """Run ``fn``; a SecondOrderError is a named error, another exception a traceback; a
    result goes to ``judge``, which raises Silent for a silent wrong answer (no judge: an error
    was due, so any result is silent)."""
    try:
        out = fn()
    except SecondOrderError as err:
        kind, detail = (NAMED, "") if str(err) else (TRACEBACK, "empty message")
    except SilentError as err:
        kind, detail = SILENT, str(err)
    except Exception as err:  # noqa: BLE001 - the survey classifies every exception
        first = str(err).splitlines()[0][:200] if str(err) else ""
        kind, detail = TRACEBACK, f"{type(err).__name__}: {first}"
    else:
        if judge is None:
            kind, detail = SILENT, "no error where one is due"
        else:
            try:
                judge(out)
                kind, detail = HONEST, ""
            except SilentError as err:
                kind, detail = SILENT, str(err)
            except SecondOrderError:
                kind, detail = NAMED, ""
            except Exception as err:  # noqa: BLE001
                kind, detail = TRACEBACK, f"{type(err).__name__}: {err}"
    RESULTS[(area, backend)][kind] += 1
    if kind in (SILENT, TRACEBACK):
        CASES.append({"area": area, "backend": backend, "case": case, "outcome": kind,
                      "detail": detail})


def _np(b: Any, x: Any) -> np.ndarray:
    return np.asarray(b.to_numpy(x), dtype=np.float64)


# ---------------------------------------------------------------- optimisers
MODEL = MLP([3, 4, 3], "tanh")
X = np.random.default_rng(3).standard_normal((6, 3))
Y = np.array([0, 1, 2, 2, 1, 0])


def survey_batches(name: str, b: Any) -> None:
    other = backends.get("torch" if name != "torch" else "numpy")
    for method in sorted(METHODS):
        opt = METHODS[method](MODEL.apply, losses.SoftmaxCrossEntropy())
        params = MODEL.init(0, b, dtype="float64")
        state = opt.init(params)
        x = b.asarray(X)
        cases = {
            "label out of range": (x, b.asarray(np.array([0, 1, 2, 3, 1, 0]))),
            "negative label": (x, b.asarray(np.array([0, 1, -1, 2, 1, 0]))),
            "fractional label": (x, b.asarray(Y + 0.5)),
            "batch sizes 6 and 5": (x, b.asarray(Y[:5])),
            "empty batch": (b.asarray(X[:0]), b.asarray(Y[:0])),
            "float32 x": (b.asarray(X.astype(np.float32)), b.asarray(Y)),
            "x of another backend": (other.asarray(X), b.asarray(Y)),
            "batch not a pair": (x,),
        }
        if name == "torch":
            import torch

            cases["x on the meta device"] = (torch.empty((6, 3), dtype=torch.float64,
                                                         device="meta"), b.asarray(Y))
        for case, batch in cases.items():
            record("batch", name, f"{method}: {case}",
                   lambda batch=batch: opt.step(params, state, batch))
        # states: another method's, another backend's
        donor = "adam" if method != "adam" else "sgd"
        foreign = METHODS[donor](MODEL.apply, losses.SoftmaxCrossEntropy()).init(params)
        record("states", name, f"{method}: state of {donor}",
               lambda: opt.step(params, foreign, (x, b.asarray(Y))))
        other_state = opt.init(MODEL.init(0, other, dtype="float64"))
        record("states", name, f"{method}: state from {other.name}",
               lambda: opt.step(params, other_state, (x, b.asarray(Y))))


def _numeric_arguments(method: str) -> list[str]:
    spec = METHODS[method]
    out = []
    for arg, p in inspect.signature(spec.cls.__init__).parameters.items():
        if arg in ("self", "apply", "loss") or p.kind is not p.KEYWORD_ONLY:
            continue
        default = spec.defaults.get(arg, p.default)
        numeric = isinstance(default, int | float) and not isinstance(default, bool)
        if numeric or any(t in str(p.annotation) for t in ("float", "int")):
            out.append(arg)
    return out


def survey_hyperparameters() -> None:
    """Constructors take no arrays, so this area is backend-independent ("any")."""
    for method in sorted(METHODS):
        for arg in _numeric_arguments(method):
            for label, bad in (("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf),
                               ("a string", "0.1"), ("a list", [0.1])):
                record("hyperparameters", "any", f"{method}({arg}={label})",
                       lambda arg=arg, bad=bad: METHODS[method](
                           MODEL.apply, losses.SoftmaxCrossEntropy(), **{arg: bad}))
            # negative and zero: valid for some (momentum=0); an accepted value must then step
            # to a finite, honest result
            for bad in (-1.0, 0.0):
                def build_and_step(arg: str = arg, bad: float = bad) -> Any:
                    b = backends.get("numpy")
                    opt = METHODS[method](MODEL.apply, losses.SoftmaxCrossEntropy(), **{arg: bad})
                    params = MODEL.init(0, b, dtype="float64")
                    return opt.step(params, opt.init(params), (b.asarray(X), b.asarray(Y)))

                def judge(out: Any, arg: str = arg, bad: float = bad) -> None:
                    _, _, info = out
                    if bool(info.finite) and bad < 0 and arg in ("lr", "learning_rate", "damping"):
                        raise SilentError(f"{arg}={bad} accepted and the step reported finite")

                record("hyperparameters", "any", f"{method}({arg}={bad})", build_and_step,
                       judge)


def survey_losses(name: str, b: Any) -> None:
    from secondorder.optim import SGD

    for loss_name, loss, good in (("mse", losses.MSE(), np.zeros((6, 3))),
                                  ("bce", losses.SigmoidBCE(), np.full((6, 3), 0.5))):
        opt = SGD(MODEL.apply, loss)
        params = MODEL.init(0, b, dtype="float64")
        state = opt.init(params)
        x = b.asarray(X)
        bad_cases = {"nan target": np.where(np.arange(18).reshape(6, 3) == 4, np.nan, good),
                     "inf target": np.where(np.arange(18).reshape(6, 3) == 4, np.inf, good),
                     "targets of shape (6, 2)": good[:, :2], "targets of shape (6,)": good[:, 0]}
        if loss_name == "bce":
            bad_cases["target 2.0"] = np.where(np.arange(18).reshape(6, 3) == 4, 2.0, good)
            bad_cases["target -0.5"] = np.where(np.arange(18).reshape(6, 3) == 4, -0.5, good)

        def judge(out: Any) -> None:
            _, _, info = out
            if bool(info.finite):
                raise SilentError("step reported finite")

        for case, y in bad_cases.items():
            record("losses", name, f"{loss_name}: {case}",
                   lambda y=y: opt.step(params, state, (x, b.asarray(y))), judge)


# ---------------------------------------------------------------- solvers and matrix functions
def _spd(n: int = 4, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * np.geomspace(1, 10, n)) @ q.T


def survey_solvers(name: str, b: Any) -> None:
    a, rhs = _spd(), np.array([1.0, -2.0, 0.5, 3.0])

    def solved_or_reported(expected: np.ndarray | None) -> Callable[[Any], None]:
        def judge(out: Any) -> None:
            x, info = out
            if info.reason != "converged":
                return  # an honest report
            if expected is None:
                raise SilentError("reported converged on a system with no representable solution")
            got = _np(b, x)
            if not np.allclose(got, expected, rtol=1e-8, atol=np.finfo(np.float64).tiny):
                raise SilentError(f"converged but max error {np.abs(got - expected).max():.3g}")
        return judge

    for tol in (1e-10, None):
        for label, bad in (("nan", np.nan), ("inf", np.inf), ("-inf", -np.inf)):
            bb = rhs.copy()
            bb[1] = bad
            record("solvers", name, f"cg tol={tol}: {label} in b",
                   lambda bb=bb, tol=tol: cg(Dense(b.asarray(a)), b.asarray(bb), tol=tol,
                                             maxiter=8), solved_or_reported(None))
            aa = a.copy()
            aa[2, 1] = bad
            record("solvers", name, f"cg tol={tol}: {label} in A",
                   lambda aa=aa, tol=tol: cg(Dense(b.asarray(aa)), b.asarray(rhs), tol=tol,
                                             maxiter=8), solved_or_reported(None))
        for sa, sb in ((1e-300, 1e-300), (1e300, 1e300), (1e-300, 1.0), (1.0, 1e-300),
                       (1e-300, 1e300), (1e300, 1e-300)):
            # the float64 answer: underflow to 0 is the correctly rounded value; overflow has none
            x_star = np.linalg.solve(a, rhs) * (sb / sa)
            representable = bool(np.all(np.isfinite(x_star)))
            record("solvers", name, f"cg tol={tol}: A*{sa:g}, b*{sb:g}",
                   lambda sa=sa, sb=sb, tol=tol: cg(Dense(b.asarray(a * sa)),
                                                    b.asarray(rhs * sb), tol=tol, maxiter=40),
                   solved_or_reported(x_star if representable else None))
    record("solvers", name, "cg: integer b", lambda: cg(Dense(b.asarray(a)),
                                                         b.asarray(np.arange(4))))
    record("solvers", name, "cg: float32 b, float64 A",
           lambda: cg(Dense(b.asarray(a)), b.asarray(rhs, dtype="float32")))
    for kwargs in ({"maxiter": -1}, {"maxiter": 2.5}, {"maxiter": "10"}, {"tol": -1.0},
                   {"tol": math.nan}, {"atol": math.inf}, {"save_at": (-1,)}):
        record("solvers", name, f"cg: {kwargs}",
               lambda kwargs=kwargs: cg(Dense(b.asarray(a)), b.asarray(rhs), **kwargs))


def survey_matrix_functions(name: str, b: Any) -> None:
    q, _ = np.linalg.qr(np.random.default_rng(7).standard_normal((4, 4)))
    bad = {"singular": (q * np.array([0.0, 1.0, 2.0, 3.0])) @ q.T,
           "indefinite": (q * np.array([-1.0, 1.0, 2.0, 3.0])) @ q.T,
           "nan": np.where(np.eye(4) > 0, np.nan, 1.0), "inf": np.where(np.eye(4) > 0, np.inf, 0.5),
           "zero": np.zeros((4, 4))}
    for kind, m in bad.items():
        for method in ("eigh", "newton"):
            for p in (1, 2, 4):
                record("matrix functions", name, f"inverse_root({kind}, p={p}, {method})",
                       lambda m=m, p=p, method=method: inverse_root(b.asarray(m), p,
                                                                    method=method))
        record("matrix functions", name, f"damped_inverse({kind}, 0)",
               lambda m=m: damped_inverse(b.asarray(m), 0.0))
    a = _spd()
    for p in (0, -1, 1.5, True, "2"):
        record("matrix functions", name, f"inverse_root(p={p!r})",
               lambda p=p: inverse_root(b.asarray(a), p))
    record("matrix functions", name, "inverse_root(method='cholesky')",
           lambda: inverse_root(b.asarray(a), 2, method="cholesky"))
    for damping in (-1.0, math.nan, math.inf):
        record("matrix functions", name, f"damped_inverse(damping={damping})",
               lambda damping=damping: damped_inverse(b.asarray(a), damping))

    def oracle_root(scale: float, p: int, expected: np.ndarray) -> Callable[[Any], None]:
        def judge(out: Any) -> None:
            got = _np(b, out) * scale ** (1.0 / p)
            if not np.allclose(got, expected, rtol=1e-5, atol=0):
                raise SilentError(f"max relative error {np.abs(got - expected).max():.3g}")
        return judge

    w, v = np.linalg.eigh(a)
    for scale in (1e-300, 1e300):
        for method in ("eigh", "newton"):
            for p in (1, 2, 4):
                record("matrix functions", name, f"inverse_root(A*{scale:g}, p={p}, {method})",
                       lambda scale=scale, p=p, method=method: inverse_root(
                           b.asarray(a * scale), p, method=method),
                       oracle_root(scale, p, (v * w ** (-1.0 / p)) @ v.T))
    # Kronecker damped inverses and Diagonal
    sing = np.array([[1.0, 1.0], [1.0, 1.0]])
    for split in ("exact", "pi", "equal"):
        record("kronecker/diagonal", name, f"Kronecker(A, singular).damped_inverse(0, {split})",
               lambda split=split: Kronecker(b.asarray(a), b.asarray(sing)).damped_inverse(
                   0.0, split))
        record("kronecker/diagonal", name, f"Kronecker(A, 0).damped_inverse(0, {split})",
               lambda split=split: Kronecker(b.asarray(a), b.asarray(np.zeros((2, 2))))
               .damped_inverse(0.0, split))
        for damping in (-0.5, math.nan):
            record("kronecker/diagonal", name, f"Kronecker.damped_inverse({damping}, {split})",
                   lambda split=split, damping=damping: Kronecker(b.asarray(a), b.asarray(a))
                   .damped_inverse(damping, split))
    record("kronecker/diagonal", name, "Kronecker(A, singular).inv()",
           lambda: Kronecker(b.asarray(a), b.asarray(sing)).inv())
    record("kronecker/diagonal", name, "Kronecker(A, singular).power(-0.5)",
           lambda: Kronecker(b.asarray(a), b.asarray(sing)).power(-0.5))
    record("kronecker/diagonal", name, "Dense(singular).inv()",
           lambda: Dense(b.asarray(bad["singular"])).inv())
    for d, what in (([1.0, 0.0, 2.0], "zero"), ([1.0, np.inf, 2.0], "inf"),
                    ([1.0, np.nan, 2.0], "nan")):
        record("kronecker/diagonal", name, f"Diagonal({what}).inv()",
               lambda d=d: Diagonal(b.asarray(np.array(d))).inv())
        record("kronecker/diagonal", name, f"Diagonal({what}).power(-0.5)",
               lambda d=d: Diagonal(b.asarray(np.array(d))).power(-0.5))


# ---------------------------------------------------------------- the command line
def survey_cli() -> None:
    tmp = tempfile.mkdtemp()
    unwritable = "/proc/secondorder-nope/out.json"
    cases = {
        "compare --json unwritable": ["compare", "--steps", "1", "--json", unwritable],
        "compare --plot unwritable": ["compare", "--steps", "1", "--plot",
                                      "/proc/secondorder-nope/x.png"],
        "compare --method unknown": ["compare", "--method", "nope", "--steps", "1"],
        "compare --problem unknown": ["compare", "--problem", "nope", "--steps", "1"],
        "compare --device bogus": ["compare", "--device", "bogus", "--steps", "1"],
        "compare --backends bogus": ["compare", "--backends", "bogus", "--steps", "1"],
        "compare --steps 0": ["compare", "--steps", "0"],
        "compare --steps -1": ["compare", "--steps", "-1"],
        "compare --batch-size 0": ["compare", "--batch-size", "0", "--steps", "1"],
        "compare --batch-size -3": ["compare", "--batch-size", "-3", "--steps", "1"],
        "compare --steps x": ["compare", "--steps", "x"],
        "compare --dtype float16": ["compare", "--dtype", "float16"],
        "check --n-a -2": ["check", "--n-a", "-2"],
        "check --n-g 0": ["check", "--n-g", "0"],
        "check --repeats 0": ["check", "--repeats", "0"],
        "check --repeats -1": ["check", "--repeats", "-1"],
        "check --json unwritable": ["check", "--json", unwritable],
        "reproduce unknown experiment": ["reproduce", "nope"],
        "reproduce --settings unknown": ["reproduce", "kronecker-mnist1d", "--settings", "nope"],
        "reproduce --methods unknown": ["reproduce", "kronecker-mnist1d", "--methods", "nope"],
        "reproduce --runs -1": ["reproduce", "curveball-table1", "--runs", "-1"],
        "reproduce --epochs 0": ["reproduce", "kronecker-mnist1d", "--epochs", "0"],
        "reproduce --json unwritable": ["reproduce", "curveball-table1", "--json", unwritable],
        "unknown command": ["nope"],
    }
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for case, argv in cases.items():
        try:
            proc = subprocess.run([sys.executable, "-m", "secondorder", *argv], cwd=tmp,
                                  capture_output=True, text=True, timeout=60, env=env)
        except subprocess.TimeoutExpired:
            RESULTS[("cli", "any")][SILENT] += 1
            CASES.append({"area": "cli", "backend": "any", "case": case, "outcome": SILENT,
                          "detail": "still running after 60 s: the bad option was not rejected"})
            continue
        err = proc.stderr.strip()
        if "Traceback" in err:
            kind, detail = TRACEBACK, err.splitlines()[-1][:200]
        elif proc.returncode == 2 and err and len([ln for ln in err.splitlines()
                                                   if "error" in ln]) == 1:
            kind, detail = NAMED, ""
        elif proc.returncode == 0:
            kind, detail = SILENT, f"exit 0: {proc.stdout.strip().splitlines()[-1:]}"
        else:
            kind, detail = TRACEBACK, f"exit {proc.returncode}: {err.splitlines()[-1:]}"
        RESULTS[("cli", "any")][kind] += 1
        if kind in (SILENT, TRACEBACK):
            CASES.append({"area": "cli", "backend": "any", "case": case, "outcome": kind,
                          "detail": detail})


# ---------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="OUT", required=True, help="where to write the JSON")
    parser.add_argument("--backends", default="numpy,torch,jax",
                        help="comma-separated backends (default: numpy,torch,jax)")
    parser.add_argument("--no-cli", action="store_true", help="skip the command-line cases")
    args = parser.parse_args()
    import importlib.util

    if importlib.util.find_spec("jax") is not None:
        import jax

        jax.config.update("jax_enable_x64", True)
    start = time.perf_counter()
    for name in args.backends.split(","):
        b = backends.get(name)
        survey_batches(name, b)
        survey_losses(name, b)
        survey_solvers(name, b)
        survey_matrix_functions(name, b)
        print(f"{name}: done at {time.perf_counter() - start:.0f} s", file=sys.stderr)
    survey_hyperparameters()
    if not args.no_cli:
        survey_cli()
    table = {f"{area} / {backend}": dict(counts) for (area, backend), counts in
             sorted(RESULTS.items())}
    out = {"seconds": round(time.perf_counter() - start, 1), "table": table, "cases": CASES}
    with open(args.json, "w") as fh:
        json.dump(out, fh, indent=1)
    kinds = (NAMED, HONEST, SILENT, TRACEBACK)
    print(f"{'area / backend':38s} " + " ".join(f"{k:>13s}" for k in kinds))
    for key, counts in table.items():
        print(f"{key:38s} " + " ".join(f"{counts.get(k, 0):13d}" for k in kinds))
    for c in CASES:
        print(f"{c['outcome']:9s} {c['area']}/{c['backend']}: {c['case']}: {c['detail']}")


if __name__ == "__main__":
    main()
