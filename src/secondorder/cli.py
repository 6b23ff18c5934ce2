"""The ``secondorder`` command line.

    secondorder list                 backends found and what each supports
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


def _check(args: argparse.Namespace) -> int:
    from .bench.consistency import TOLERANCE, run_check

    names = args.backends.split(",") if args.backends else None
    if names:
        unknown = [n for n in names if n not in backends.names()]
        if unknown:
            print(f"unknown backend(s): {', '.join(unknown)}; known: "
                  f"{', '.join(backends.names())}", file=sys.stderr)
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
    from .bench.curveball_table1 import reproduce, table

    quiet = args.quiet or not sys.stdout.isatty()
    from .bench.curveball_table1 import SETTINGS

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
    sub.add_parser("list", help="backends found and what each supports").set_defaults(func=_list)
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
