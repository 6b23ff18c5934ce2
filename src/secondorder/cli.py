"""The ``secondorder`` command line (``python -m secondorder`` runs the same).

    secondorder list                 backends found (and what each supports), methods, problems
    secondorder compare [--method M] [--problem P] [--json OUT] [--plot OUT.png]
                                     optimisers on every backend from the same weights and
                                     batches: final loss and accuracy on the whole training
                                     set, step time, JAX compilation time, deviation from the
                                     float64 NumPy run
    secondorder check [--backends numpy,torch] [--json OUT]
                                     the same Kronecker and CG solves on every backend, compared
                                     with a float64 NumPy oracle; exits 1 on a deviation
    secondorder reproduce curveball-table1 [--runs N] [--json OUT]
                                     the CurveBall paper's Table 1 (needs jax)
    secondorder reproduce kronecker-mnist1d [--epochs N] [--seeds N] [--json OUT] [--plot PNG]
                                     K-FAC, Shampoo and TNT against SGD-momentum and Adam on
                                     MNIST-1D (CNN and MLP), tuned on a validation split
    secondorder reproduce kbfgs-autoencoder [--epochs N] [--seeds N] [--json OUT] [--plot PNG]
                                     the thesis's Table 3.3 shape: final training loss of
                                     K-BFGS, K-BFGS(L), K-FAC, Adam and SGD-momentum on a
                                     digits autoencoder
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

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


def _compare(args: argparse.Namespace) -> int:
    from .bench.compare import TOLERANCE, compare, plot
    from .optim.registry import DEFAULT_METHODS
    from .problems import PROBLEMS

    methods = args.method or list(DEFAULT_METHODS)
    plot_path = None if args.no_plot else (args.plot or "compare.png")
    if plot_path is not None:
        try:
            _writable(plot_path)
        except argparse.ArgumentTypeError as err:
            print(f"secondorder compare: --plot: {err}", file=sys.stderr)
            return 2
    show = not args.quiet and sys.stderr.isatty()
    try:
        problem = PROBLEMS[args.problem]()  # loads the data: a missing package shows here
    except ImportError as err:
        print(f"secondorder compare: {err}", file=sys.stderr)
        return 2
    runs = compare(methods, args.problem, args.backends, steps=args.steps,
                   batch_size=args.batch_size, dtype=args.dtype, seed=args.seed,
                   device=args.device, progress=show)
    n_train = getattr(problem, "x", None)
    measured = (f"final loss and accuracy on the whole training set ({n_train.shape[0]} "
                "samples) after training" if n_train is not None
                else "final loss = the noise-free objective after training")

    def cell(value: Any) -> Any:
        return "-" if value is None else value

    rows = [[r.method, r.backend, r.dtype, cell(r.final_loss), cell(r.final_accuracy),
             cell(r.step_ms), cell(r.compile_ms), cell(r.step_vs_sgd),
             cell(r.max_rel_deviation), r.status] for r in runs]
    print("\n" + textwrap.fill(
        f"{args.problem}: {args.steps} steps, {args.dtype}, seed {args.seed}; {measured}; "
        f"step ms = median step time after the first; "
        f"compile ms = first step less the median (compiling backends only); deviation = max "
        f"over leaves ||w - w_numpy64|| / ||w_numpy64|| (tolerance {TOLERANCE[args.dtype]:g})",
        width=100))
    print(format_table(["method", "backend", "dtype", "final loss", "accuracy", "step ms",
                        "compile ms", "vs sgd", "max rel dev", "status"], rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"problem": args.problem, "steps": args.steps, "dtype": args.dtype,
                       "seed": args.seed, "batch_size": getattr(problem, "batch_size", None)
                       if args.batch_size is None else args.batch_size,
                       "train_size": None if n_train is None else int(n_train.shape[0]),
                       "tolerance": TOLERANCE[args.dtype],
                       "runs": [r.summary() for r in runs]}, fh, indent=2)
    if plot_path is not None:
        try:
            plot(runs, plot_path, f"{args.problem}, {args.dtype}, {args.steps} steps")
            print(f"plot: {plot_path}")
        except ImportError:
            print("no plot: matplotlib is not installed (pip install matplotlib)",
                  file=sys.stderr)
        except OSError as err:
            print(f"no plot: {plot_path} could not be written ({err})", file=sys.stderr)
    failed = [r for r in runs if not r.ok]
    if failed:
        print(f"\n{len(failed)} run(s) failed", file=sys.stderr)
        return 1
    return 0


def _check_ranks(args: argparse.Namespace) -> int:
    """``check --ranks N``: every method on N gloo processes against one process."""
    if importlib.util.find_spec("torch") is None:
        print("check --ranks runs torch.distributed, and torch is not installed: "
              "pip install -r backends/torch.txt", file=sys.stderr)
        return 2
    from .distributed.equivalence import BATCH, NAN_STEP, SIZES, TOLERANCE, compare

    nan_at = NAN_STEP if args.steps > NAN_STEP else None
    from .optim.registry import METHODS

    rows = compare(args.methods or sorted(METHODS), args.ranks, steps=args.steps,
                   nan_at=nan_at)
    table = [[r.method, r.ranks, r.deviation, "yes" if r.agree else "NO",
              f"{r.calls.get('all_reduce', 0):g}", f"{r.bytes.get('all_reduce', 0):g}",
              f"{r.calls.get('all_gather', 0):g}", f"{r.bytes.get('all_gather', 0):g}",
              "ok" if r.ok else "FAIL"] for r in rows]
    print(f"\n{args.steps} steps of an MLP {'-'.join(map(str, SIZES))} on batches of {BATCH} "
          f"(float64), {args.ranks} torch.distributed ranks (gloo) against one process; "
          + (f"batch {NAN_STEP + 1} has a NaN in the last rank's shard, which every rank and "
             "the one process must reject; " if nan_at is not None else "")
          + "deviation = max |params_rank - params_one_process|; communication per step and "
          "rank (calls, bytes sent)")
    print(format_table(["method", "ranks", "deviation", "same skips", "all-reduce",
                        "bytes", "all-gather", "bytes", "status"], table))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"tolerance": TOLERANCE, "ranks": args.ranks, "steps": args.steps,
                       "results": [{"method": r.method, "deviation": r.deviation,
                                    "agree": r.agree, "finite": r.finite, "calls": r.calls,
                                    "bytes": r.bytes, "ok": r.ok} for r in rows]},
                      fh, indent=2)
    failed = [r for r in rows if not r.ok]
    if failed:
        print(f"\n{len(failed)} method(s) deviate from one process by more than "
              f"{TOLERANCE:g}", file=sys.stderr)
        return 1
    print(f"\nall {len(rows)} methods on {args.ranks} ranks agree with one process to "
          f"{TOLERANCE:g}")
    return 0


def _check(args: argparse.Namespace) -> int:
    if args.ranks is not None:
        return _check_ranks(args)
    from .bench.consistency import TOLERANCE, run_check

    _list(args)
    results = run_check(args.backends, repeats=args.repeats, seed=args.seed, n_a=args.n_a,
                        n_g=args.n_g)
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
    if args.experiment == "kronecker-mnist1d":
        return _reproduce_kronecker(args)
    if args.experiment == "kbfgs-autoencoder":
        return _reproduce_autoencoder(args)
    from .bench.curveball_table1 import SETTINGS, reproduce, table

    quiet = args.quiet or not sys.stdout.isatty()
    settings = tuple(args.settings) if args.settings else SETTINGS
    results = reproduce(runs=args.runs, tune_runs=args.tune_runs, methods=args.methods,
                        settings=settings, criterion=args.criterion,
                        progress=None if quiet else print)
    print(f"\nCurveBall paper, Table 1: iterations to an objective below 1e-4 "
          f"({args.runs} runs each; mean +- std of the runs that got there)")
    print(format_table(*table(results)))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


def _reproduce_kronecker(args: argparse.Namespace) -> int:
    from .bench import kronecker_mnist1d as study

    def caption(proto: dict[str, Any]) -> str:
        return (f"{study.EXPERIMENT}: {proto['backend']} {proto['dtype']}, {proto['epochs']} "
                f"epochs, seeds {proto['seeds']}; hyperparameters chosen on "
                f"{proto['validation']} validation signals (best final validation accuracy); "
                "test accuracy mean +- std over seeds; target = SGD-momentum's final test "
                "accuracy; to target: median [min, max] over the seeds that reach it")

    return _reproduce_study(args, study, caption, "constant",
                            models=args.models or list(study.MODELS),
                            validation=args.validation, refit=not args.no_refit)


def _reproduce_autoencoder(args: argparse.Namespace) -> int:
    from .bench import kbfgs_autoencoder as study

    def caption(proto: dict[str, Any]) -> str:
        return (f"{study.EXPERIMENT}: {proto['problem']}, {proto['backend']} {proto['dtype']}, "
                f"{proto['epochs']} epochs ({proto['schedule']} schedule), seeds "
                f"{proto['seeds']}; hyperparameters with the smallest final training loss from "
                "the tuning seed; final training loss mean +- std over seeds, beside the "
                "thesis's Table 3.3 MNIST column (other data and network: compare the order, "
                "not the values)")

    return _reproduce_study(args, study, caption, "step")


def _reproduce_study(args: argparse.Namespace, study: Any, caption: Any, schedule: str,
                     **settings: Any) -> int:
    """Run a reproduction module's ``reproduce`` with the options the studies share and
    ``settings``; print ``caption(protocol)``, its table and the methods not available; write
    the JSON and the plot. 1 if a method failed, 2 if a package is missing."""
    quiet = args.quiet or not sys.stdout.isatty()
    try:
        result = study.reproduce(
            methods=args.methods or list(study.METHOD_NAMES),
            epochs=args.epochs or study.DEFAULT_EPOCHS, seeds=args.seeds or study.DEFAULT_SEEDS,
            grid_size=args.grid_size, backend=args.backend, dtype=args.dtype,
            subset=args.subset, schedule=args.schedule or schedule,
            progress=None if quiet else print, **settings)
    except ImportError as err:  # the data's package (or the backend's framework) is missing
        print(f"secondorder reproduce: {err}", file=sys.stderr)
        return 2
    print(textwrap.fill("\n" + caption(result["protocol"]), width=100))
    print(format_table(*study.table(result)))
    for method in result["not_available"]:
        print(f"{study.METHOD_NAMES.get(method, method)} ({method}): not available (not "
              "registered in secondorder.optim.registry.METHODS); skipped", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    if args.plot:
        try:
            study.plot(result, args.plot)
            print(f"plot: {args.plot}")
        except ImportError:
            print("no plot: matplotlib is not installed (pip install matplotlib)",
                  file=sys.stderr)
    return 1 if _has_error(result["results"]) else 0


def _has_error(node: Any) -> bool:
    """Whether a study's results (nested dicts of entries) hold an entry with an error."""
    if not isinstance(node, dict):
        return False
    return "error" in node or any(_has_error(v) for v in node.values())


def _check_reproduce(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """The checks that depend on the experiment (argparse's own format on failure)."""
    if args.experiment in ("kronecker-mnist1d", "kbfgs-autoencoder"):
        from .bench import kbfgs_autoencoder, kronecker_mnist1d

        names = (kronecker_mnist1d if args.experiment == "kronecker-mnist1d"
                 else kbfgs_autoencoder).METHOD_NAMES
        unknown = [m for m in args.methods or () if m not in names]
        if unknown:
            parser.error(f"argument --methods: {', '.join(unknown)} is not a method of "
                         f"{args.experiment}; choose from {', '.join(names)}")
        try:
            backend = backends.get(args.backend)
        except Exception as err:  # unknown or not installed
            parser.error(f"argument --backend: {err}")
        if not backend.has_autodiff:
            parser.error(f"argument --backend: {args.backend} has no automatic differentiation")
    elif args.methods:
        from .bench.curveball_table1 import PAPER

        unknown = [m for m in args.methods if m not in PAPER]
        if unknown:
            parser.error(f"argument --methods: {', '.join(unknown)} is not a row of "
                         f"curveball-table1; choose from {', '.join(PAPER)}")


DESCRIPTION = "Second-order optimisers on NumPy, PyTorch and JAX: the command line."
EPILOG = "'secondorder COMMAND --help' describes a command and its options."

#: device names --device accepts: a platform with an optional index (cuda:1, gpu:0)
_DEVICE = re.compile(r"(cpu|cuda|gpu|mps|xpu|tpu|rocm)(:\d+)?")


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's layout, with every option's default appended to its help unless the help
    already states it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return text + " (default: off)" if action.default is False else text
        return text + " (default: %(default)s)"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _ranks(text: str) -> int:
    """A number of data-parallel processes that divides the check's batch of 16 samples."""
    value = _positive_int(text)
    if value < 2 or 16 % value:
        raise argparse.ArgumentTypeError(
            f"must be 2, 4, 8 or 16 (it divides the batch of 16 samples), got {value}")
    return value


def _bounded_int(low: int, high: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {value}")
        return value
    return parse


def _device(text: str) -> str:
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"unknown device {text!r}; use cpu, cuda, cuda:N, gpu:N, mps, xpu or tpu")
    return text


def _backend_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in backends.names()]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown backend(s): {', '.join(unknown) or repr(text)}; known: "
            f"{', '.join(backends.names())}")
    return names


def _choice_list(choices: Sequence[str]) -> Any:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in choices]
        if not names or unknown:
            raise argparse.ArgumentTypeError(
                f"unknown: {', '.join(unknown) or repr(text)}; choose from {', '.join(choices)}")
        return names
    return parse


def _writable(text: str) -> str:
    """An output path that can be written, checked before a long run rather than after it: its
    folder must exist, and opening it for appending must succeed (a file the check creates is
    removed again)."""
    path = os.path.abspath(os.path.expanduser(text))
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file")
    if not os.path.isdir(os.path.dirname(path)):
        raise argparse.ArgumentTypeError(f"the folder of {text!r} does not exist")
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as err:
        raise argparse.ArgumentTypeError(
            f"{text!r} cannot be written ({err.strerror or err})") from None
    if not existed:
        os.remove(path)
    return text


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command (also walked by the tests: every option has help
    text and its default)."""
    from .bench.curveball_table1 import PAPER, SETTINGS
    from .optim.registry import DEFAULT_METHODS, METHODS
    from .problems import PROBLEMS

    fmt = {"formatter_class": _HelpFormatter}
    parser = argparse.ArgumentParser(prog="secondorder", description=DESCRIPTION, epilog=EPILOG,
                                     **fmt)
    parser.add_argument("--version", action="version", version=f"secondorder {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands")
    sub.add_parser("list", help="the backends found (and what each supports), the methods and "
                   "the problems",
                   description="The backends secondorder knows (installed or not, what each "
                   "supports, its devices), the registered methods and the problems.",
                   **fmt).set_defaults(func=_list_all)

    cmp_ = sub.add_parser(
        "compare", help="optimisers on every backend from the same weights and batches: final "
        "loss and accuracy on the whole training set, time per step, compilation time, "
        "deviation from the float64 NumPy run",
        description="Train each method on each backend from the same initial weights (drawn "
        "from --seed) and the same mini-batches, then report the final loss (and accuracy, for "
        "classification) on the whole training set, the median time per step, the compilation "
        "time of the first step on compiling backends (JAX), and the largest relative "
        "deviation of the parameters from the float64 NumPy run. Exits 1 if a run fails or "
        "deviates beyond the tolerance (1e-8 in float64, 1e-4 in float32).", **fmt)
    cmp_.add_argument("--method", action="append", choices=list(METHODS), metavar="METHOD",
                      help="a method to run, repeatable: " + ", ".join(METHODS)
                      + " (default: " + ", ".join(DEFAULT_METHODS) + ")")
    cmp_.add_argument("--problem", default="digits-mlp", choices=list(PROBLEMS),
                      metavar="PROBLEM",
                      help="the training problem: " + ", ".join(PROBLEMS))
    cmp_.add_argument("--backends", type=_backend_list, metavar="B1,B2",
                      help="comma-separated backends (default: every installed backend with "
                      "autodiff)")
    cmp_.add_argument("--steps", type=_positive_int, default=100,
                      help="optimiser steps per run, one mini-batch each")
    cmp_.add_argument("--batch-size", dest="batch_size", type=_positive_int, default=None,
                      metavar="N",
                      help="samples per mini-batch (default: the problem's own, 64 for the "
                      "digits and teacher-student problems)")
    cmp_.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                      help="floating-point precision of weights and data")
    cmp_.add_argument("--device", type=_device, default=None,
                      help="device to run on, e.g. cuda, cuda:1 or gpu:0 (default: cpu)")
    cmp_.add_argument("--seed", type=int, default=0,
                      help="seed of the initial weights and of the mini-batch order")
    cmp_.add_argument("--json", metavar="OUT", type=_writable,
                      help="also write the runs as JSON to OUT (default: no JSON)")
    cmp_.add_argument("--plot", metavar="OUT.png", type=_writable, default="compare.png",
                      help="write the figure (loss per step, one line per method; time per "
                      "step per backend) to OUT.png; needs matplotlib")
    cmp_.add_argument("--no-plot", dest="no_plot", action="store_true",
                      help="draw no figure")
    cmp_.add_argument("--quiet", action="store_true", help="no progress bars")
    cmp_.set_defaults(func=_compare)

    check = sub.add_parser(
        "check", help="the same Kronecker and CG solves on every backend against a float64 "
        "NumPy oracle; exits 1 on a deviation",
        description="Solve (A (x) G + lambda I) X = B with random SPD factors on every backend, "
        "by the exact damped Kronecker inverse and by conjugate gradients, in float64, and "
        "compare each X with numpy.linalg.solve on the dense system. Exits 1 if a deviation "
        "exceeds 1e-10.", **fmt)
    check.add_argument("--backends", type=_backend_list, metavar="B1,B2",
                       help="comma-separated backends (default: every installed backend)")
    check.add_argument("--json", metavar="OUT", type=_writable,
                       help="also write the results as JSON to OUT (default: no JSON)")
    check.add_argument("--repeats", type=_positive_int, default=5,
                       help="timed repeats after a warm-up; the median time is reported")
    check.add_argument("--seed", type=int, default=0, help="seed of the random system")
    check.add_argument("--n-a", dest="n_a", type=_positive_int, default=24, metavar="N",
                       help="size of the factor A")
    check.add_argument("--n-g", dest="n_g", type=_positive_int, default=32, metavar="N",
                       help="size of the factor G")
    check.add_argument("--ranks", type=_ranks, default=None, metavar="N",
                       help="instead: run every method on N local torch.distributed processes "
                       "(gloo) and compare with one process, batch 4 holding a NaN on the last "
                       "rank; N in {2, 4, 8, 16} (default: off)")
    check.add_argument("--methods", type=_choice_list(sorted(METHODS)), default=None,
                       metavar="M1,M2",
                       help="with --ranks: the methods (default: every registered method)")
    check.add_argument("--steps", type=_positive_int, default=10,
                       help="with --ranks: steps per method")
    check.set_defaults(func=_check)

    from .bench import kbfgs_autoencoder as kae
    from .bench import kronecker_mnist1d as kmn
    from .bench.training import SCHEDULES

    grid_text = "; ".join(
        f"{name}: " + ", ".join("(" + ", ".join(f"{k}={v:g}" for k, v in point.items()) + ")"
                               for point in kmn.GRIDS[name])
        for name in kmn.METHOD_NAMES)
    fixed_text = "; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in kmn.FIXED[name].items())
                           for name in kmn.METHOD_NAMES if kmn.FIXED[name])
    rep = sub.add_parser(
        "reproduce", help="a paper's experiment: curveball-table1 (the CurveBall paper's "
        "Table 1, needs jax), kronecker-mnist1d (K-FAC, Shampoo and TNT against SGD-momentum "
        "and Adam on MNIST-1D) or kbfgs-autoencoder (the K-BFGS thesis's Table 3.3 shape)",
        description="curveball-table1: iterations to reach an objective below 1e-4 on the "
        "stochastic Rosenbrock function and the linear network, for the methods of the "
        "CurveBall paper's Table 1, next to the paper's numbers. Needs jax. "
        "kronecker-mnist1d: K-FAC, Shampoo and TNT against SGD with momentum and Adam on "
        "MNIST-1D (mnist1d package, generated offline: 4000 training and 1000 test signals) "
        "with the authors' CNN (3 ReLU conv layers, 25 channels, kernels 5/3/3, stride 2, "
        "padding 1, linear 125 -> 10) and MLP (40-100-100-10 ReLU), softmax cross-entropy, "
        "batches of 100. Protocol: --validation training signals (drawn with seed 0) are held "
        f"out; every grid point trains --epochs epochs on the rest from tuning seed "
        f"{kmn.TUNE_SEED} and the point with the best final validation accuracy is kept "
        "(ties: lower validation loss; a one-point grid is not tuned); it is then trained on "
        "all 4000 training signals (unless --no-refit) once per seed 0..--seeds-1 and after "
        "every epoch the training loss, the test accuracy and the training seconds are "
        "recorded. Reported per method: final test accuracy, and the epochs and seconds to "
        "reach SGD-momentum's final test accuracy (median and range over seeds). Methods not "
        "registered in secondorder.optim.registry are reported as not available and skipped. "
        f"Grids (--grid-size N keeps the first N points of each): {grid_text}. Fixed settings: "
        f"{fixed_text}; settings a method's constructor does not take are dropped and listed. "
        "kbfgs-autoencoder: final training loss of K-BFGS, K-BFGS(L), K-FAC, Adam and "
        f"SGD-momentum on the digits autoencoder {'-'.join(map(str, kae.SIZES))} (ReLU, linear "
        "code, sigmoid BCE summed over the pixels; all 1797 images, batches of 128); every "
        f"grid point trains --epochs epochs from tuning seed {kae.TUNE_SEED}, the point with "
        "the smallest final training loss is kept (the thesis's rule) and trained once per "
        "seed; reported beside the thesis's Table 3.3 MNIST column, whose data and network "
        "differ (compare the order of the methods). Grids: " + "; ".join(
            f"{name}: {len(kae.GRIDS[name])} points, first "
            + ", ".join(f"{k}={v:g}" for k, v in kae.GRIDS[name][0].items())
            for name in kae.METHOD_NAMES) + ".",
        **fmt)
    rep.add_argument("experiment",
                     choices=["curveball-table1", "kronecker-mnist1d", "kbfgs-autoencoder"],
                     help="the experiment: curveball-table1, kronecker-mnist1d or "
                     "kbfgs-autoencoder")
    rep.add_argument("--runs", type=_positive_int, default=100,
                     help="curveball-table1: random starts per cell")
    rep.add_argument("--tune-runs", type=_positive_int, default=20,
                     help="curveball-table1: runs per grid point when tuning SGD and Adam")
    rep.add_argument("--json", metavar="OUT", type=_writable,
                     help="also write the results as JSON to OUT (default: no JSON)")
    rep.add_argument("--criterion", choices=["exact", "noisy"], default="exact",
                     help="curveball-table1: apply the tolerance to the noise-free objective "
                     "(exact) or to the loss on a fresh noisy draw (noisy)")
    rep.add_argument("--methods", type=_choice_list([*PAPER, *kmn.METHOD_NAMES]),
                     metavar="M1,M2",
                     help="comma-separated subset of the methods: for curveball-table1 the "
                     "table's rows (" + ", ".join(PAPER) + "); for kronecker-mnist1d registry "
                     "names (" + ", ".join(kmn.METHOD_NAMES) + "); for kbfgs-autoencoder ("
                     + ", ".join(kae.METHOD_NAMES) + ") (default: all)")
    rep.add_argument("--settings", type=_choice_list(list(SETTINGS)), metavar="S1,S2",
                     help="curveball-table1: comma-separated subset of the settings: "
                     + ", ".join(SETTINGS) + " (default: all)")
    rep.add_argument("--models", type=_choice_list(list(kmn.MODELS)), metavar="M1,M2",
                     help="kronecker-mnist1d: comma-separated subset of the models: "
                     + ", ".join(kmn.MODELS) + " (default: all)")
    rep.add_argument("--epochs", type=_positive_int, default=None,
                     help="kronecker-mnist1d and kbfgs-autoencoder: epochs of every run (tuning "
                     f"and evaluation) (default: {kmn.DEFAULT_EPOCHS} and {kae.DEFAULT_EPOCHS})")
    rep.add_argument("--seeds", type=_positive_int, default=None,
                     help="kronecker-mnist1d and kbfgs-autoencoder: evaluation seeds (initial "
                     f"weights and batch order) (default: {kmn.DEFAULT_SEEDS} and "
                     f"{kae.DEFAULT_SEEDS})")
    rep.add_argument("--grid-size", dest="grid_size", type=_positive_int, default=None,
                     metavar="N",
                     help="kronecker-mnist1d and kbfgs-autoencoder: keep the first N points of "
                     "each method's grid (default: the whole grid)")
    rep.add_argument("--backend", default="jax", choices=backends.names(), metavar="NAME",
                     help="kronecker-mnist1d and kbfgs-autoencoder: the backend: "
                     + ", ".join(backends.names()))
    rep.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                     help="kronecker-mnist1d and kbfgs-autoencoder: precision of weights and "
                     "data")
    rep.add_argument("--validation", type=_bounded_int(1, 3999), default=500, metavar="N",
                     help="kronecker-mnist1d: training signals held out for model selection")
    rep.add_argument("--subset", type=_positive_int, default=None, metavar="N",
                     help="kronecker-mnist1d: use only the first N signals of the training, "
                     "validation and test sets; kbfgs-autoencoder: the first N images; for a "
                     "quick run (default: all)")
    rep.add_argument("--schedule", choices=list(SCHEDULES), default=None,
                     help="kronecker-mnist1d and kbfgs-autoencoder: the learning rate over each "
                     "run, the same for every method: constant, cosine (lr (1 + cos(pi t / T)) "
                     "/ 2 over the T steps of the run) or step (a tenth after each third of the "
                     "run) (default: constant and step)")
    rep.add_argument("--no-refit", dest="no_refit", action="store_true",
                     help="kronecker-mnist1d: train the evaluation runs on the training split "
                     "only, not on training plus validation signals")
    rep.add_argument("--plot", metavar="PNG", type=_writable,
                     help="kronecker-mnist1d and kbfgs-autoencoder: write the figure (test "
                     "accuracy, or training loss, against epochs and against seconds) to PNG; "
                     "needs matplotlib (default: no plot)")
    rep.add_argument("--quiet", action="store_true", help="no per-cell progress lines")
    rep.set_defaults(func=_reproduce, check=lambda args: _check_reproduce(args, rep))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``); returns the exit status:
    0 on success, 1 when a run or check fails, 2 on a usage error (argparse prints the
    message)."""
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "check", None) is not None:
            args.check(args)  # checks that depend on more than one option
    except SystemExit as stop:  # --help, --version and usage errors
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
