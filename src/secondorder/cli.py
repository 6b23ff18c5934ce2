"""The ``secondorder`` command line.

    secondorder list                 backends found (and what each supports), methods, problems
    secondorder compare [--method M] [--problem P] [--json OUT] [--plot OUT.png]
                                     optimisers on every backend from the same weights and
                                     batches: loss, step time, deviation from float64 NumPy
    secondorder check [--backends numpy,torch] [--json OUT]
                                     the same Kronecker and CG solves on every backend, compared
                                     with a float64 NumPy oracle; exits 1 on a deviation
    secondorder reproduce curveball-table1 [--runs N] [--json OUT]
                                     the CurveBall paper's Table 1 (needs jax)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from . import __version__, backends
from .bench.table import format_table


def _list(args: argparse.Namespace) -> int:
    rows = []
    for info in backends.available():
        rows.append([
            info.name,
            info.installed,
            info.usable,
            info.cpu,
            info.gpu,
            info.autodiff,
            info.float64,
            info.jit,
            ", ".join(info.devices) or "-",
            info.note,
        ])
    print(format_table(
        ["backend", "installed", "usable", "cpu", "gpu", "autodiff", "float64", "jit",
         "devices", "notes"],
        rows,
    ))
    return 0


def _list_all(args: argparse.Namespace) -> int:
    _list(args)
    from .optim.registry import DEFAULT_METHODS, METHODS, SMALL_ONLY
    from .problems import PROBLEMS

    print("\nmethods: " + ", ".join(
        m + (" (small problems)" if m in SMALL_ONLY else "") + (" *" if m in DEFAULT_METHODS
                                                              else "") for m in METHODS))
    print("problems: " + ", ".join(PROBLEMS))
    print("(* run by 'secondorder compare' without --method)")
    return 0


def _unknown_backends(names: list[str] | None, *, list_known: bool = False) -> bool:
    """Whether ``names`` holds a backend that does not exist; if so, say which on stderr
    (followed by the known ones with ``list_known``)."""
    unknown = [n for n in names or () if n not in backends.names()]
    if unknown:
        known = f"; known: {', '.join(backends.names())}" if list_known else ""
        print(f"unknown backend(s): {', '.join(unknown)}{known}", file=sys.stderr)
    return bool(unknown)


def _compare(args: argparse.Namespace) -> int:
    from .bench.compare import TOLERANCE, compare, plot
    from .optim.registry import DEFAULT_METHODS, METHODS
    from .problems import PROBLEMS

    methods = args.method or list(DEFAULT_METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or args.problem not in PROBLEMS:
        print(f"unknown method(s) {unknown} or problem {args.problem!r}; see 'secondorder list'",
              file=sys.stderr)
        return 2
    names = args.backends.split(",") if args.backends else None
    if _unknown_backends(names):
        return 2
    show = not args.quiet and sys.stderr.isatty()
    runs = compare(methods, args.problem, names, steps=args.steps, batch_size=args.batch_size,
                   dtype=args.dtype, seed=args.seed, device=args.device, progress=show)
    rows = [[r.method, r.backend, r.dtype,
             "-" if r.final_loss is None else r.final_loss,
             "-" if r.step_ms is None else r.step_ms,
             "-" if r.step_vs_sgd is None else r.step_vs_sgd,
             "-" if r.max_rel_deviation is None else r.max_rel_deviation,
             r.status] for r in runs]
    print(f"\n{args.problem}: {args.steps} steps, {args.dtype}, seed {args.seed}; deviation = "
          f"max over leaves ||w - w_numpy64|| / ||w_numpy64|| (tolerance "
          f"{TOLERANCE[args.dtype]:g})")
    print(format_table(["method", "backend", "dtype", "final loss", "step ms", "vs sgd",
                        "max rel dev", "status"], rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"problem": args.problem, "steps": args.steps,
                       "tolerance": TOLERANCE[args.dtype],
                       "runs": [r.summary() for r in runs]}, fh, indent=2)
    if args.plot:
        plot(runs, args.plot, f"{args.problem}, {args.dtype}")
        print(f"plot: {args.plot}")
    failed = [r for r in runs if not r.ok]
    if failed:
        print(f"\n{len(failed)} run(s) failed", file=sys.stderr)
        return 1
    return 0


def _check(args: argparse.Namespace) -> int:
    from .bench.consistency import TOLERANCE, run_check

    names = args.backends.split(",") if args.backends else None
    if _unknown_backends(names, list_known=True):
        return 2
    _list(args)
    results = run_check(names, repeats=args.repeats, seed=args.seed, n_a=args.n_a, n_g=args.n_g)
    rows = [[r.backend, r.device, r.task, r.deviation, r.time_ms,
             "-" if r.iterations is None else r.iterations,
             "ok" if r.ok else ("FAIL " + r.error)[:60]] for r in results]
    print(f"\n(A (x) G + lambda I) X = B with A {args.n_a}x{args.n_a}, G {args.n_g}x{args.n_g}, "
          "float64; deviation = ||X - X_numpy_dense|| / ||X_numpy_dense||")
    print(format_table(["backend", "device", "task", "deviation", "median ms", "cg its",
                        "status"], rows))
    failed = [r for r in results if not r.ok]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"tolerance": TOLERANCE, "results": [r.to_dict() for r in results]}, fh,
                      indent=2)
    if failed:
        print(f"\n{len(failed)} check(s) failed (tolerance {TOLERANCE:g})", file=sys.stderr)
        return 1
    print(f"\nall {len(results)} checks agree with the float64 oracle to {TOLERANCE:g}")
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from .bench.curveball_table1 import SETTINGS, reproduce, table

    quiet = args.quiet or not sys.stdout.isatty()
    methods = args.methods.split(",") if args.methods else None
    settings = tuple(args.settings.split(",")) if args.settings else SETTINGS
    results = reproduce(runs=args.runs, tune_runs=args.tune_runs, methods=methods,
                        settings=settings, criterion=args.criterion,
                        progress=None if quiet else print)
    print(f"\nCurveBall paper, Table 1: iterations to an objective below 1e-4 "
          f"({args.runs} runs each; mean +- std of the runs that got there)")
    print(format_table(*table(results)))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="secondorder", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"secondorder {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="backends, methods and problems").set_defaults(func=_list_all)
    cmp_ = sub.add_parser("compare", help="optimisers on every backend: loss, speed, agreement")
    cmp_.add_argument("--method", action="append", help="a method (repeatable); see 'list'")
    cmp_.add_argument("--problem", default="digits-mlp")
    cmp_.add_argument("--backends", help="comma-separated backends (default: every installed)")
    cmp_.add_argument("--steps", type=int, default=100)
    cmp_.add_argument("--batch-size", dest="batch_size", type=int, default=None)
    cmp_.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    cmp_.add_argument("--device", default=None, help="e.g. cuda (default: cpu)")
    cmp_.add_argument("--seed", type=int, default=0)
    cmp_.add_argument("--json", metavar="OUT", help="write the runs as JSON")
    cmp_.add_argument("--plot", metavar="OUT.png", default="compare.png",
                      help="loss against step and wall time (default: compare.png)")
    cmp_.add_argument("--quiet", action="store_true", help="no progress bars")
    cmp_.set_defaults(func=_compare)
    check = sub.add_parser("check", help="cross-backend Kronecker and CG solve vs a float64 oracle")
    check.add_argument("--backends", help="comma-separated backends (default: every installed)")
    check.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    check.add_argument("--repeats", type=int, default=5, help="timed repeats after a warm-up")
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--n-a", dest="n_a", type=int, default=24, help="size of factor A")
    check.add_argument("--n-g", dest="n_g", type=int, default=32, help="size of factor G")
    check.set_defaults(func=_check)
    rep = sub.add_parser("reproduce", help="reproduce a paper's experiment")
    rep.add_argument("experiment", choices=["curveball-table1"])
    rep.add_argument("--runs", type=int, default=100, help="random starts per cell")
    rep.add_argument("--tune-runs", type=int, default=20,
                     help="runs per grid point when tuning SGD and Adam")
    rep.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    rep.add_argument("--criterion", choices=["exact", "noisy"], default="exact",
                     help="tolerance on the noise-free objective or on a fresh noisy draw")
    rep.add_argument("--methods", help="comma-separated subset of the table's methods")
    rep.add_argument("--settings", help="comma-separated subset of the settings")
    rep.add_argument("--quiet", action="store_true", help="no per-cell progress lines")
    rep.set_defaults(func=_reproduce)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
