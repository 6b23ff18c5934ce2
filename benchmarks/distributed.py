"""Communication of every registered method in data-parallel training (torch.distributed, gloo),
measured per step and per period, against a formula in the problem's sizes.

Each method runs on R = ``--ranks`` processes (default 2, spawned with torch.multiprocessing
as ``secondorder check --ranks`` does) through ``secondorder.distributed.data_parallel``; every
collective goes through ``secondorder.distributed.collectives`` and is counted in its ``LOG``
(calls and bytes each rank sends, by kind). The counts are per rank and depend only on the
method, the network's shapes, B, R and the dtype, never on the machine.

Problems (float32, softmax cross-entropy, seeded weights, standard-normal inputs of MNIST-1D's
shape and uniform labels; the values matter only where a method's own inner loop adapts):

* ``mnist1d-mlp``: MLP 40-100-100-10, ReLU (the MNIST-1D MLP), B = 100;
* ``mnist1d-cnn``: Conv1DNet, three ReLU convolutions of 25 channels (kernels 5, 3, 3,
  stride 2) and a dense 125 -> 10 (the MNIST-1D CNN), B = 100;
* ``small-mlp``: MLP 4-6-3, tanh, B = 100, for the methods of ``SMALL_ONLY`` (Newton,
  Levenberg-Marquardt, BFGS), which form P x P matrices.

Methods: every name of ``optim.registry.METHODS`` with the registry's defaults (the Kronecker
family's short periods: K-FAC T1 = 2 / T2 = 3, Shampoo roots every 2, TNT inverses every 2,
K-BFGS curvature every 2; SMW's curvature batch of 30 of the B samples). The period of a
method is the lcm of its intervals; it runs one period of warm-up, then ``--periods`` periods
(at least 6 steps) are measured.

The formula. With s the itemsize, n = B / R the rows of a shard, k the outputs, P the
parameters, and per tapped layer l: T_l positions per sample (1 for a dense layer), d_in_l
(+ 1 for the bias) and d_out_l, the units are

* ``L0 = 8 + 8 n``: the all-gather of the shard sizes and of the int64 labels (every step);
* ``O = n k s``: one gather of the outputs (every forward evaluation, and once more per JVP,
  since ``torch.func.jvp`` re-runs the primal under data parallelism);
* ``A = sum_l n T_l (d_in_l + 1) s``: the tapped layer inputs of one statistics pass;
* ``G = sum_l n T_l d_out_l s``: the tap cotangents of one statistics pass (a VJP through
  ``scatter_rows``);
* ``F = sum_l ((d_in_l + 1)^2 + d_out_l^2) s``: K-FAC's factors of one statistics pass,
  formed on each rank's shard and averaged over the ranks by one all-reduce (K-BFGS and SMW
  gather A and G instead: they need per-sample rows or means beyond the factors);
* ``PO = P O``: a JVP vmapped over P tangents (the Jacobian of Newton and LM);
* ``V = P s``: one VJP's parameter all-reduce; ``VP = P^2 s``: a VJP vmapped over P
  cotangents (Newton's Hessian).

Bytes each rank sends per step: ``all_gather = L0 + c_O O + c_A A + c_G G + c_PO PO`` and
``all_reduce = c_V V + c_VP VP + c_F F``, with the counts c_* of :data:`COUNTS` (functions of
the step
number t, the method's intervals, CG iterations m = info.inner_iterations and objective
evaluations e, counted by wrapping the optimiser's ``objective``). Calls: ``2 + c_O + c_PO +
L (c_A + c_G)`` all-gathers (L tapped layers) and ``(c_V + c_VP) x calls per VJP + c_F``
all-reduces, where the calls per VJP (1 with the parameters replicated as one flat vector,
else one per leaf) are measured on SGD's step and reported. The benchmark checks every
measured step against the formula and reports the largest mismatch (0 when the model holds).

Wall-clock, a sanity check only (2 processes on whatever cores this machine has, one torch
thread each): the mean step over each measured period, median over periods, on R ranks and
on one process with the whole batch.

    python benchmarks/distributed.py --json benchmarks/results/distributed.json

Writes ``{"<problem>": {"<method>": {"per_step": [...], "per_period": {...}, "formula": {...},
"check": {...}, "ms_per_step": {...}}}, "_meta": {...}}``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import _setup as setup
from secondorder.distributed.launch import spawn
from secondorder.optim.registry import METHODS

PROBLEMS = ("mnist1d-mlp", "mnist1d-cnn", "small-mlp")
#: settings that differ from the registry's defaults (see the module docstring)
#: the interval attributes whose lcm is a method's period
INTERVALS = ("statistics_interval", "inverse_interval", "root_interval", "curvature_interval",
             "tau")


# ----------------------------------------------------------------------------- the problems
def build(problem: str, batch: int) -> tuple[Any, Any, int, int]:
    """``(model, loss, input width, classes)``."""
    from secondorder import losses
    from secondorder.models import MLP, Conv1DNet

    if problem == "mnist1d-mlp":
        model: Any = MLP((40, 100, 100, 10), "relu")
        d, k = 40, 10
    elif problem == "mnist1d-cnn":
        model = Conv1DNet()
        d, k = 40, 10
    elif problem == "small-mlp":
        model = MLP((4, 6, 3), "tanh")
        d, k = 4, 3
    else:
        raise ValueError(f"unknown problem {problem!r}; choose from {', '.join(PROBLEMS)}")
    return model, losses.SoftmaxCrossEntropy(), d, k


def methods_for(problem: str, names: list[str]) -> list[str]:
    from secondorder.optim.registry import SMALL_ONLY

    if problem == "small-mlp":
        return [m for m in names if m in SMALL_ONLY]
    return [m for m in names if m not in SMALL_ONLY]



def intervals(opt: Any) -> dict[str, int]:
    """The method's periodic intervals that are in force."""
    out = {}
    for name in INTERVALS:
        v = getattr(opt, name, None)
        if isinstance(v, int) and v >= 1:
            out[name] = v
    if getattr(opt, "adapt_damping", False) is True:  # CurveBall's and K-FAC's damping rule
        v = getattr(opt, "interval", getattr(opt, "damping_interval", None))
        if isinstance(v, int) and v >= 1:
            out["damping_interval"] = v
    return out


def period_of(opt: Any) -> int:
    return math.lcm(1, *intervals(opt).values())


def batches(steps: int, batch: int, d: int, k: int, seed: int) -> list[tuple[Any, Any]]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((batch, d)).astype(np.float32), rng.integers(0, k, batch))
            for _ in range(steps)]


# ------------------------------------------------------------------------------ the formula
def units(model: Any, batch: int, ranks: int, k: int, params: Any, itemsize: int
          ) -> dict[str, int]:
    """The byte units of the module docstring, from the model's shapes."""
    from secondorder import tree

    n = batch // ranks
    P = int(tree.size(params)) if hasattr(tree, "size") else sum(
        int(np.prod(leaf.shape)) for leaf in _leaves(params))
    x = np.zeros((n, *_input_shape(model)), dtype=np.float32)
    shapes = model.tap_shapes(x) if getattr(model, "layers", ()) else []
    A = G = F = 0
    layers = []
    for info, shape in zip(getattr(model, "layers", ()), shapes):
        T = int(np.prod(shape[1:-1])) if len(shape) > 2 else 1
        d_in = info.in_features + (info.bias is not None)
        A += n * T * d_in * itemsize
        G += n * T * info.out_features * itemsize
        F += (d_in ** 2 + info.out_features ** 2) * itemsize
        layers.append({"kind": info.kind, "positions": T, "d_in": info.in_features,
                       "d_out": info.out_features})
    out = n * k * itemsize
    return {"n": n, "k": k, "P": P, "s": itemsize, "L": len(layers), "L0": 8 + 8 * n,
            "O": out, "A": A, "G": G, "F": F, "PO": P * out, "V": P * itemsize,
            "VP": P * P * itemsize,
            "layers": layers}


def _leaves(params: Any) -> list[Any]:
    from secondorder._pytree import flatten

    return flatten(params)[0]


def _input_shape(model: Any) -> tuple[int, ...]:
    if hasattr(model, "sizes"):
        return (int(model.sizes[0]),)
    return (int(model.length),)


def _every(t: int, interval: int) -> int:
    return int(t % interval == 0)


#: per method: (text, counts(t, m, e, opt, u)) with the counts c_O, c_A, c_G, c_PO, c_V, c_VP
#: of one step t (m: info.inner_iterations, e: objective evaluations, u: the units)
COUNTS: dict[str, tuple[str, Callable[..., dict[str, int]]]] = {
    "sgd": ("O; V", lambda t, m, e, o, u: {"O": 1, "V": 1}),
    "adam": ("O; V", lambda t, m, e, o, u: {"O": 1, "V": 1}),
    "shampoo": ("O; V (statistics and roots are local)",
                lambda t, m, e, o, u: {"O": 1, "V": 1}),
    "tnt": ("O; (1 + s1) V, s1 = [t mod T1 = 0] (a sampled-label VJP for the statistics)",
            lambda t, m, e, o, u: {"O": 1, "V": 1 + _every(t, o.statistics_interval)}),
    "kfac": ("(1 + s1) O; V + s1 F, s1 = [t mod T1 = 0] (the factors of each rank's shard "
             "all-reduced; inverses are local)",
             lambda t, m, e, o, u: {"O": 1 + _every(t, o.statistics_interval), "V": 1,
                                    "F": _every(t, o.statistics_interval)}),
    "kbfgs": ("(1 + c)(O + A + G); V, c = [t mod T = 0] (the second tapped pass)",
              lambda t, m, e, o, u: {**dict.fromkeys(
                  "OAG", 1 + _every(t, o.curvature_interval)), "V": 1}),
    "kbfgs-l": ("(1 + c)(O + A + G); V, c = [t mod T = 0]",
                lambda t, m, e, o, u: {**dict.fromkeys(
                    "OAG", 1 + _every(t, o.curvature_interval)), "V": 1}),
    "curveball": ("(5 + e) O; V (e = [(t + 1) mod T_lambda = 0]: the damping rescaling's "
                  "loss evaluation)",
                  lambda t, m, e, o, u: {"O": 5 + e, "V": 1}),
    "hessian-free": ("(2 m + 5 + e) O; (m + 3) V (m CG iterations, e = 1 + saved iterates)",
                     lambda t, m, e, o, u: {"O": 2 * m + 5 + e, "V": m + 3}),
    "prox-linear": ("(2 m + 3 + e) O; (m + 1) V (m inner CG iterations, e Armijo trials)",
                    lambda t, m, e, o, u: {"O": 2 * m + 3 + e, "V": m + 1}),
    "smw-gn": ("(3 + e) O + (O + A + k G); 2 V (k tap VJPs for the Gram matrix)",
               lambda t, m, e, o, u: {"O": 4 + e, "A": 1, "G": u["k"], "V": 2}),
    "smw-ng": ("(3 + e) O + (O + A + G); 2 V",
               lambda t, m, e, o, u: {"O": 4 + e, "A": 1, "G": 1, "V": 2}),
    "newton": ("(3 + e) O + PO; 3 V + VP (Hessian by forward-over-reverse vmapped over P "
               "tangents; e line-search trials)",
               lambda t, m, e, o, u: {"O": 3 + e, "PO": 1, "V": 3, "VP": 1}),
    "levenberg-marquardt": ("(3 + e) O + PO; V (the Jacobian by a JVP vmapped over P "
                            "tangents; e = 1 trial)",
                            lambda t, m, e, o, u: {"O": 3 + e, "PO": 1, "V": 1}),
    "bfgs": ("e O; e V (every line-search trial is a value and gradient)",
             lambda t, m, e, o, u: {"O": e, "V": e}),
}


def grouped_newton_counts(t: int, m: int, e: int, o: Any, u: dict[str, int]
                          ) -> dict[str, int]:
    """GroupedNewton: one value and gradient; every tau steps the summaries (gradient,
    group Hessian and third-order terms of S groups) by nested JVP/VJP."""
    if not _every(t, o.tau):
        return {"O": 1, "V": 1}
    S = u["groups"]
    return {"O": 2 + 4 * S, "V": 2 + 4 * S}


COUNTS["grouped-newton"] = (
    "O; V, and every tau steps (2 + 4 S) O; (2 + 4 S) V for S parameter groups (summaries)",
    grouped_newton_counts)


def predict(method: str, t: int, m: int, e: int, opt: Any, u: dict[str, Any],
            calls_per_vjp: int) -> dict[str, dict[str, int]]:
    c = COUNTS[method][1](t, m, e, opt, u)
    get = c.get
    gather = (u["L0"] + get("O", 0) * u["O"] + get("A", 0) * u["A"] + get("G", 0) * u["G"]
              + get("PO", 0) * u["PO"])
    reduce = get("V", 0) * u["V"] + get("VP", 0) * u["VP"] + get("F", 0) * u["F"]
    calls_g = 2 + get("O", 0) + get("PO", 0) + u["L"] * (get("A", 0) + get("G", 0))
    calls_r = (get("V", 0) + get("VP", 0)) * calls_per_vjp + get("F", 0)
    return {"calls": {"all_gather": calls_g, "all_reduce": calls_r},
            "bytes": {"all_gather": gather, "all_reduce": reduce}}


# ---------------------------------------------------------------------------------- the runs
def run_method(problem: str, method: str, args: Any, rank: int, ranks: int,
               data_parallel: bool) -> dict[str, Any]:
    """Warm-up and measured periods of one method: per-step LOG snapshots (data parallel),
    inner iterations, objective evaluations and step times."""
    import torch

    from secondorder.distributed import collectives
    from secondorder.distributed import data_parallel as wrap

    model, loss, d, k = build(problem, args.batch)
    opt = METHODS[method](model, loss)
    period = period_of(opt)
    measured = period * max(args.periods, math.ceil(6 / period))
    if data_parallel:
        opt = wrap(opt)
    inner = opt.inner if data_parallel else opt
    evaluations = [0]
    objective = inner.objective

    def counted(*a: Any, **kw: Any) -> Any:
        evaluations[0] += 1
        return objective(*a, **kw)

    inner.objective = counted
    params = model.init(args.seed, "torch", dtype="float32")
    state = opt.init(params)
    rows = args.batch // ranks
    steps = []
    for t, (x, y) in enumerate(batches(period + measured, args.batch, d, k, args.seed)):
        if data_parallel:
            x, y = x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]
        xb, yb = torch.asarray(x), torch.asarray(y)
        collectives.LOG.reset()
        evaluations[0] = 0
        start = time.perf_counter()
        params, state, info = opt.step(params, state, (xb, yb))
        seconds = time.perf_counter() - start
        if t >= period:
            steps.append({"t": t, "inner_iterations": int(info.inner_iterations),
                          "evaluations": evaluations[0], "finite": bool(info.finite),
                          "ms": 1e3 * seconds, **collectives.LOG.snapshot()})
    return {"period": period, "intervals": intervals(inner), "steps": steps}


def _worker(rank: int, ranks: int, address: str, jobs: list[tuple[str, str]], args: Any,
            out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=ranks)
    try:
        for problem, method in jobs:
            result = run_method(problem, method, args, rank, ranks, data_parallel=True)
            (Path(out) / f"{problem}.{method}.{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def period_ms(steps: list[dict[str, Any]], period: int) -> float:
    """The median over measured periods of the mean step time within each period."""
    per = [float(np.mean([s["ms"] for s in steps[i:i + period]]))
           for i in range(0, len(steps), period)]
    return float(np.median(per))


def summarise(problem: str, method: str, dp: dict[str, Any], one: dict[str, Any],
              args: Any) -> dict[str, Any]:
    import torch

    from secondorder.distributed import collectives

    model, loss, d, k = build(problem, args.batch)
    opt = METHODS[method](model, loss)
    params = model.init(args.seed, "torch", dtype="float32")
    u = units(model, args.batch, args.ranks, k, params, 4)
    u["groups"] = int(opt.partition(params).size) if method == "grouped-newton" else 0
    del torch, collectives
    period, steps = dp["period"], dp["steps"]
    calls_per_vjp = args.calls_per_vjp
    mismatch = 0
    rows = []
    for s in steps:
        want = predict(method, s["t"], s["inner_iterations"], s["evaluations"], opt, u,
                       calls_per_vjp)
        for part in ("calls", "bytes"):
            for kind in ("all_gather", "all_reduce"):
                mismatch = max(mismatch, abs(s[part].get(kind, 0) - want[part][kind]))
        rows.append({**{k2: s[k2] for k2 in ("t", "inner_iterations", "evaluations")},
                     "calls": s["calls"], "bytes": s["bytes"], "predicted": want})
    periods = len(steps) // period

    def total(part: str, kind: str) -> float:
        return sum(s[part].get(kind, 0) for s in steps) / periods

    gradient_bytes = u["V"]
    per_period = {f"{part}_{kind}": total(part, kind)
                  for part in ("calls", "bytes") for kind in ("all_gather", "all_reduce")}
    per_period["all_reduce_over_gradient"] = per_period["bytes_all_reduce"] / gradient_bytes
    per_period["all_gather_over_gradient"] = per_period["bytes_all_gather"] / gradient_bytes
    per_step = {k2: v / period for k2, v in per_period.items()}
    ms_dp, ms_one = period_ms(steps, period), period_ms(one["steps"], period)
    return {"period": period, "intervals": dp["intervals"], "P": u["P"],
            "gradient_bytes": gradient_bytes, "per_step": per_step, "per_period": per_period,
            "steps": rows,
            "formula": {"counts": COUNTS[method][0], "units": {
                key: u[key] for key in ("n", "k", "P", "s", "L", "L0", "O", "A", "G", "F",
                                        "PO", "V", "VP")}},
            "check": {"max_abs_mismatch": mismatch, "holds": mismatch == 0},
            "ms_per_step": {"ranks": ms_dp, "one_process": ms_one, "ratio": ms_dp / ms_one,
                            "note": "sanity check only: depends on this machine"}}


def table(results: dict[str, Any]) -> str:
    """A markdown table of the per-step communication."""
    lines = ["| problem | method | period | P | all-gather calls/step | all-gather bytes/step "
             "| all-reduce calls/step | all-reduce bytes/step | all-reduce / gradient "
             "| formula holds | ms/step R ranks / 1 process |",
             "|" + "---|" * 11]
    for problem, rows in results.items():
        if problem.startswith("_"):
            continue
        for method, r in rows.items():
            ps = r["per_step"]
            ms = r["ms_per_step"]
            lines.append(
                f"| {problem} | {method} | {r['period']} | {r['P']} | "
                f"{ps['calls_all_gather']:.3g} | {ps['bytes_all_gather']:.0f} | "
                f"{ps['calls_all_reduce']:.3g} | {ps['bytes_all_reduce']:.0f} | "
                f"{ps['all_reduce_over_gradient']:.3g} | "
                f"{'yes' if r['check']['holds'] else 'NO (' + str(r['check']['max_abs_mismatch']) + ')'}"  # noqa: E501
                f" | {ms['ranks']:.2f} / {ms['one_process']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = setup.parser(__doc__, "distributed", batch=100, warmup=1, repeats=3)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--problems", default=",".join(PROBLEMS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--periods", type=int, default=3,
                        help="measured periods (at least 6 steps in all)")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    parser.add_argument("--resnet50", action="store_true",
                        help="print the ResNet-50 prediction of docs/distributed.md and exit")
    args = parser.parse_args(argv)
    if args.resnet50:
        rows = resnet50_prediction()
        print(resnet50_table(rows))
        return {"resnet50": rows}
    if args.batch % args.ranks:
        parser.error(f"--ranks must divide --batch ({args.batch})")
    import torch

    torch.set_num_threads(args.threads)
    names = args.methods.split(",")
    jobs = [(p, m) for p in args.problems.split(",") for m in methods_for(p, names)]
    if not any(m == "sgd" for _, m in jobs) and jobs:
        jobs.insert(0, (jobs[0][0], "sgd"))
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        spawn(_worker, args.ranks, jobs, args, out, timeout=args.timeout)
        dp = {job: [json.loads((Path(out) / f"{job[0]}.{job[1]}.{r}.json").read_text())
                    for r in range(args.ranks)] for job in jobs}
        print(f"{len(jobs)} runs on {args.ranks} ranks in {time.perf_counter() - started:.0f} s")
    sgd = next(v for (p, m), v in dp.items() if m == "sgd")[0]["steps"][0]
    args.calls_per_vjp = sgd["calls"]["all_reduce"]
    for problem, method in jobs:
        ranks = dp[(problem, method)]
        same = all(r["steps"] == ranks[0]["steps"] or _same_counts(r, ranks[0]) for r in ranks)
        one = run_method(problem, method, args, 0, 1, data_parallel=False)
        row = summarise(problem, method, ranks[0], one, args)
        row["ranks_agree"] = same
        results.setdefault(problem, {})[method] = row
        ps = row["per_step"]
        print(f"{problem:12s} {method:20s} period {row['period']:2d}  gather "
              f"{ps['calls_all_gather']:6.2f} calls {ps['bytes_all_gather']:10.0f} B  reduce "
              f"{ps['calls_all_reduce']:5.2f} calls {ps['bytes_all_reduce']:10.0f} B "
              f"({ps['all_reduce_over_gradient']:.2f} x grad)  formula "
              f"{'holds' if row['check']['holds'] else 'off by ' + str(row['check']['max_abs_mismatch'])}"  # noqa: E501
              f"  ms {row['ms_per_step']['ranks']:.2f} / {row['ms_per_step']['one_process']:.2f}")
    results["_meta"] = {
        "ranks": args.ranks, "batch": args.batch, "dtype": "float32", "backend": "torch gloo",
        "calls_per_vjp": args.calls_per_vjp, "periods": args.periods,
        "torch_threads": args.threads, "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "note": "counts and bytes are per rank and machine-independent; ms are a sanity check"}
    if args.markdown:
        print(table(results))
    setup.write_json(args.json, results)
    off = [f"{p}/{m}" for p, rows in results.items() if not p.startswith("_")
           for m, r in rows.items() if not r["check"]["holds"]]
    print(f"formula holds on {len(jobs) - len(off)} of {len(jobs)} runs"
          + (f"; off: {', '.join(off)}" if off else ""))
    if off:
        raise SystemExit(1)
    return results


def _same_counts(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return [(s["calls"], s["bytes"]) for s in a["steps"]] == \
        [(s["calls"], s["bytes"]) for s in b["steps"]]


# ------------------------------------------------- the cost model past one machine (docs)
#: assumptions of the ResNet-50 prediction (docs/distributed.md lists them)
ASSUME = {
    "batch_per_gpu": 32, "itemsize": 4,
    "bandwidth": {8: 300e9, 64: 25e9},  # bytes/s: NVLink in one node; InfiniBand across nodes
    "eigh_flops": 9.0, "eigh_rate": 0.5e12, "eigh_latency": 1e-3,  # 9 d^3 at 0.5 TFLOP/s
    "inverse_rate": 5e12, "inverse_latency": 2e-4,  # d^3 (Cholesky + solve) at 5 TFLOP/s
    "matmul_rate": 15e12,  # preconditioning products, fp32
    "T1": 10, "T2": 100, "root_interval": 100, "kbfgs_T": 20, "block": 1024,
}


def resnet50_layers() -> list[dict[str, int]]:
    """The 53 convolutions and the fc layer of ResNet-50 (torchvision, stride in the 3 x 3
    convolution, 224 x 224 inputs): C_in, C_out, kernel k and output positions T."""
    layers = [{"c_in": 3, "c_out": 64, "k": 7, "T": 112 * 112}]
    c = 64
    for width, blocks, side in ((64, 3, 56), (128, 4, 28), (256, 6, 14), (512, 3, 7)):
        for i in range(blocks):
            first_side = side * 2 if (i == 0 and width != 64) else side
            layers.append({"c_in": c, "c_out": width, "k": 1, "T": first_side ** 2})
            layers.append({"c_in": width, "c_out": width, "k": 3, "T": side ** 2})
            layers.append({"c_in": width, "c_out": 4 * width, "k": 1, "T": side ** 2})
            if i == 0:
                layers.append({"c_in": c, "c_out": 4 * width, "k": 1, "T": side ** 2})
            c = 4 * width
    layers.append({"c_in": 2048 + 1, "c_out": 1000, "k": 1, "T": 1})  # fc with its bias
    return layers


def _eigh_s(d: int) -> float:
    a = ASSUME
    return a["eigh_latency"] + a["eigh_flops"] * d ** 3 / a["eigh_rate"]


def _inverse_s(d: int) -> float:
    a = ASSUME
    return a["inverse_latency"] + d ** 3 / a["inverse_rate"]


def makespan(costs: list[float], ranks: int) -> float:
    """Greedy (longest task first, to the least loaded rank) assignment: the slowest rank."""
    loads = [0.0] * ranks
    for c in sorted(costs, reverse=True):
        i = loads.index(min(loads))
        loads[i] += c
    return max(loads)


def shampoo_blocks(d_out: int, d_in: int, block: int) -> list[tuple[int, int]]:
    """(rows, cols) of the blocks of a (d_out, d_in) weight cut into block x block tiles."""
    def cuts(n: int) -> list[int]:
        return [min(block, n - i) for i in range(0, n, block)]
    return [(r, c) for r in cuts(d_out) for c in cuts(d_in)]


def resnet50_prediction() -> list[dict[str, Any]]:
    """Per-step milliseconds (periodic work amortised over its period) of communication and
    of inverse/root computation, redundant against layer-distributed, on 8 and 64 GPUs."""
    a, s = ASSUME, ASSUME["itemsize"]
    layers = resnet50_layers()
    P = sum(x["c_in"] * x["k"] ** 2 * x["c_out"] for x in layers)
    d_in = [x["c_in"] * x["k"] ** 2 for x in layers]
    d_out = [x["c_out"] for x in layers]
    rows_in = sum(x["T"] * d for x, d in zip(layers, d_in))  # patch floats per sample
    rows_out = sum(x["T"] * d for x, d in zip(layers, d_out))
    factor_floats = sum(d * d for d in d_in + d_out)
    blocks = [b for x, di, do in zip(layers, d_in, d_out)
              for b in shampoo_blocks(do, di, a["block"])]
    root_floats = sum(r * r + c * c for r, c in blocks)
    out = []
    for R in (8, 64):
        bw, b = a["bandwidth"][R], a["batch_per_gpu"]
        ring = 2 * (R - 1) / R / bw  # seconds per byte all-reduced
        gather = (R - 1) / R / bw  # seconds per byte of the gathered whole
        grad_ms = 1e3 * ring * P * s
        # K-FAC: statistics every T1 (gather patches and tap cotangents, or all-reduce factors)
        stats_gather = 1e3 * gather * R * b * (rows_in + rows_out) * s / a["T1"]
        stats_reduce = 1e3 * ring * factor_floats * s / a["T1"]
        kfac_tasks = [_eigh_s(d) for d in d_in + d_out]
        kfac_red = 1e3 * sum(kfac_tasks) / a["T2"]
        kfac_dist = 1e3 * makespan(kfac_tasks, R) / a["T2"]
        inv_gather = 1e3 * gather * factor_floats * s / a["T2"]  # eigenvectors to all ranks
        grad_gather = 1e3 * gather * P * s  # preconditioned gradients, every step
        precond_flops = sum(2 * (o * o * i + o * i * i) for i, o in zip(d_in, d_out))
        precond_red = 1e3 * precond_flops / a["matmul_rate"]
        precond_dist = precond_red / R
        # Shampoo: statistics from the all-reduced gradient; roots (eigh) every root_interval
        sh_tasks = [_eigh_s(r) + _eigh_s(c) for r, c in blocks]
        sh_red = 1e3 * sum(sh_tasks) / a["root_interval"]
        sh_dist = 1e3 * makespan(sh_tasks, R) / a["root_interval"]
        sh_roots_gather = 1e3 * gather * root_floats * s / a["root_interval"]
        # K-BFGS: A statistics every step, a second tapped pass every T, inverses of A every T
        kb_gather = 1e3 * gather * R * b * (rows_in + rows_out) * s * (1 + 1 / a["kbfgs_T"])
        kb_reduce = 1e3 * ring * (sum(d * d for d in d_in) + 2 * sum(d_out)) * s
        kb_tasks = [_inverse_s(d) for d in d_in]
        kb_red = 1e3 * sum(kb_tasks) / a["kbfgs_T"]
        kb_dist = 1e3 * makespan(kb_tasks, R) / a["kbfgs_T"]
        kb_inv_gather = 1e3 * gather * sum(d * d for d in d_in) * s / a["kbfgs_T"]
        out += [
            {"method": "K-FAC", "gpus": R, "gradient_ms": grad_ms,
             "stats_gather_ms": stats_gather, "stats_allreduce_ms": stats_reduce,
             "redundant_compute_ms": kfac_red + precond_red,
             "distributed_compute_ms": kfac_dist + precond_dist,
             "inverse_allgather_ms": inv_gather, "gradient_allgather_ms": grad_gather,
             "largest_task_ms": 1e3 * max(kfac_tasks)},
            {"method": "Shampoo", "gpus": R, "gradient_ms": grad_ms,
             "stats_gather_ms": 0.0, "stats_allreduce_ms": 0.0,
             "redundant_compute_ms": sh_red, "distributed_compute_ms": sh_dist,
             "inverse_allgather_ms": sh_roots_gather, "gradient_allgather_ms": grad_gather,
             "largest_task_ms": 1e3 * max(sh_tasks)},
            {"method": "K-BFGS", "gpus": R, "gradient_ms": grad_ms,
             "stats_gather_ms": kb_gather, "stats_allreduce_ms": kb_reduce,
             "redundant_compute_ms": kb_red, "distributed_compute_ms": kb_dist,
             "inverse_allgather_ms": kb_inv_gather, "gradient_allgather_ms": grad_gather,
             "largest_task_ms": 1e3 * max(kb_tasks)},
        ]
    for row in out:
        row.update(P=P, patch_floats_per_sample=rows_in, cotangent_floats_per_sample=rows_out,
                   factor_floats=factor_floats, shampoo_blocks=len(blocks),
                   root_floats=root_floats)
    return out


def resnet50_table(rows: list[dict[str, Any]]) -> str:
    keys = ("gradient_ms", "stats_gather_ms", "stats_allreduce_ms", "redundant_compute_ms",
            "distributed_compute_ms", "inverse_allgather_ms", "gradient_allgather_ms")
    head = "| method | GPUs | " + " | ".join(keys) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 2)]
    for r in rows:
        lines.append(f"| {r['method']} | {r['gpus']} | "
                     + " | ".join(f"{r[k]:.3g}" for k in keys) + " |")
    r = rows[0]
    lines.append(f"\nP = {r['P']}, patch floats/sample = {r['patch_floats_per_sample']}, "
                 f"cotangent floats/sample = {r['cotangent_floats_per_sample']}, "
                 f"K-FAC factor floats = {r['factor_floats']}, Shampoo blocks = "
                 f"{r['shampoo_blocks']} ({r['root_floats']} root floats)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
