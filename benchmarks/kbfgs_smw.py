"""K-BFGS and K-BFGS(L) step time against SGD; SMW-GN and SMW-NG against Hessian-free in time
and epochs to a target training loss.

Step time (issue 14: K-BFGS <= 1.4x SGD on torch and JAX; the thesis reports "about 1/3 more"
than first-order methods). The problems, the timing protocol and the references are those of
``benchmarks/kronecker.py`` (imported from it): MLP 784-256-10 and the ConvNet on 1 x 28 x 28,
float32, batch 128, one seeded batch; torch eager with one intra-op thread, JAX jitted. Methods:
``kbfgs`` and ``kbfgs_l`` (memory 100) with the curvature pass every T = 20 steps (the thesis's
CNN setting) and momentum 0.9, ``sgd`` (momentum 0.9) and ``handwritten_sgd`` (the framework's
own SGD step around the same forward pass). Each method runs ``--block`` consecutive steps
(default 20, one period T) per round, in interleaved rounds; ``step_ms`` is the median block time
over its steps, so the second pass every T steps is included.

Training (the thesis: SMW-GN is always faster than Hessian-free, in epochs and wall-clock). Two
problems of :mod:`secondorder.problems`: ``digits-autoencoder`` (64-32-8-32-64, sigmoid, BCE,
batch 64) and ``mnist1d-mlp`` (40-100-100-10, ReLU, softmax cross-entropy, batch 100); torch
float64, one thread, the same initial weights and shuffled mini-batches (one seed) for every
method. Methods with their settings (none tuned here): ``hessian_free`` (GGN, 50 CG iterations,
Martens' damping rule and backtracking, the library's defaults); ``smw_gn`` and ``smw_ng``
(lr 1, lambda_LM0 = 1 and the thesis's LM rule, N2 = 8 samples for the autoencoder's GN, whose
system is N2 x 64 outputs, N2 = 30 elsewhere). The target training loss is the mean loss on the
whole training set that Hessian-free reaches after ``--hf-epochs`` epochs (default 3); each
method then runs up to ``--max-epochs`` epochs (default 6) and reports the first epoch and the
training time (steps only, the full-data evaluations excluded) at which its full-data loss is at
or below the target (``null`` if it is not reached), with the loss after every epoch.

    python benchmarks/kbfgs_smw.py --json benchmarks/results/kbfgs_smw.json

Writes ``{"<backend>": {"<problem>": {"<method>": {"step_ms", "ratio_to_sgd",
"ratio_to_handwritten_sgd"}}}, "training": {"<problem>": {"target_loss", "<method>":
{"epochs_to_target", "seconds_to_target", "losses", "seconds"}}}, "_meta": {...}}``.
"""

from __future__ import annotations

import json
import platform
import time
from typing import Any

import numpy as np

import _setup as setup
import kronecker
from secondorder import backends, optim

PERIOD = 20  # K-BFGS's curvature interval T (and the default timed block)
PROBLEMS = ("mlp", "convnet")
TRAINING = ("digits-autoencoder", "mnist1d-mlp")


# ------------------------------------------------------------------------------ step time
def step_methods(model: Any, loss: Any) -> dict[str, Any]:
    return {
        "sgd": optim.SGD(model, loss, lr=0.01, momentum=0.9),
        "kbfgs": optim.KBFGS(model, loss, lr=0.01, curvature_interval=PERIOD),
        "kbfgs_l": optim.KBFGSL(model, loss, lr=0.01, curvature_interval=PERIOD, memory=100),
    }


def bench_steps(backend: str, name: str, args: Any) -> dict[str, Any]:
    per_step = kronecker.step_ms(backend, name, args, step_methods)
    return {label: {"step_ms": t, "ratio_to_sgd": t / per_step["sgd"],
                    "ratio_to_handwritten_sgd": t / per_step["handwritten_sgd"]}
            for label, t in per_step.items()}


# ------------------------------------------------------------------------------ training
def training_methods(name: str, problem: Any) -> dict[str, Any]:
    n2_gn = 8 if name == "digits-autoencoder" else 30
    return {
        "hessian_free": optim.HessianFree(problem.apply, problem.loss),
        "smw_gn": optim.SMWGN(problem.apply, problem.loss, curvature_batch=n2_gn),
        "smw_ng": optim.SMWNG(problem.apply, problem.loss, curvature_batch=30),
    }


def _batches(problem: Any, b: Any, epoch_seed: int) -> list[tuple[Any, Any]]:
    """One epoch of shuffled mini-batches (the last partial batch dropped)."""
    order = np.random.default_rng(epoch_seed).permutation(problem.x.shape[0])
    size = problem.batch_size
    out = []
    for start in range(0, len(order) - size + 1, size):
        idx = order[start:start + size]
        out.append(tuple(b.asarray(a, dtype=None if a.dtype.kind in "iu" else "float64")
                         for a in (problem.x[idx], problem.y[idx])))
    return out


def train(opt: Any, problem: Any, b: Any, params: Any, epochs: int, seed: int,
          target: float | None = None) -> dict[str, Any]:
    """``epochs`` epochs (fewer once ``target`` is reached): the full-data loss and the
    cumulative step time after every epoch."""
    x_all, y_all = problem.full_batch(b, "float64")
    state = opt.init(params)
    losses_, seconds, elapsed = [], [], 0.0
    for epoch in range(epochs):
        batches = _batches(problem, b, seed + epoch)
        start = time.perf_counter()
        for batch in batches:
            params, state, _ = opt.step(params, state, batch)
        elapsed += time.perf_counter() - start
        losses_.append(float(problem.loss.value(problem.apply(params, x_all), y_all)))
        seconds.append(elapsed)
        if target is not None and losses_[-1] <= target:
            break
    return {"losses": losses_, "seconds": seconds}


def bench_training(name: str, args: Any) -> dict[str, Any]:
    import torch

    from secondorder import problems

    torch.set_num_threads(args.threads)
    b = backends.get("torch")
    problem = problems.PROBLEMS[name]()
    params = problem.init(args.seed, b, "float64")
    opts = training_methods(name, problem)
    hf = train(opts.pop("hessian_free"), problem, b, params, args.hf_epochs, args.seed)
    target = hf["losses"][-1]
    out: dict[str, Any] = {"target_loss": target,
                           "target": f"Hessian-free's training loss after {args.hf_epochs} "
                                     "epochs"}
    runs = {"hessian_free": hf}
    for label, opt in opts.items():
        runs[label] = train(opt, problem, b, params, args.max_epochs, args.seed, target)
    for label, run in runs.items():
        hit = next((i for i, v in enumerate(run["losses"]) if v <= target), None)
        out[label] = {"epochs_to_target": None if hit is None else hit + 1,
                      "seconds_to_target": None if hit is None else run["seconds"][hit],
                      **run}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = setup.parser(__doc__, "kbfgs_smw", batch=128, warmup=1, repeats=5)
    parser.set_defaults(backends="torch,jax")
    parser.add_argument("--problems", default=",".join(PROBLEMS),
                        help="comma-separated subset of " + ",".join(PROBLEMS))
    parser.add_argument("--training", default=",".join(TRAINING),
                        help="comma-separated subset of " + ",".join(TRAINING) + " ('' skips)")
    parser.add_argument("--block", type=int, default=PERIOD,
                        help="consecutive steps per timed block (default: one period T)")
    kronecker.add_device_option(parser)
    parser.add_argument("--hf-epochs", type=int, default=3,
                        help="Hessian-free's epochs; its final training loss is the target")
    parser.add_argument("--max-epochs", type=int, default=6,
                        help="the most epochs SMW-GN and SMW-NG get to reach the target")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    for backend in setup.installed(args.backends, results):
        results[backend] = {}
        for name in args.problems.split(","):
            rows = bench_steps(backend, name, args)
            results[backend][name] = rows
            print(backend, name, json.dumps({k: round(v["ratio_to_sgd"], 3)
                                             for k, v in rows.items()}), flush=True)
    results["training"] = {}
    for name in filter(None, args.training.split(",")):
        rows = bench_training(name, args)
        results["training"][name] = rows
        print("training", name, f"target {rows['target_loss']:.5f}", json.dumps(
            {k: (v["epochs_to_target"], None if v["seconds_to_target"] is None
                 else round(v["seconds_to_target"], 2))
             for k, v in rows.items() if isinstance(v, dict)}), flush=True)
    results["_meta"] = {
        "problems": {"mlp": "MLP 784-256-10 tanh",
                     "convnet": "ConvNet 1x28x28, conv 16-32, dense 128-10, tanh",
                     "digits-autoencoder": "64-32-8-32-64 sigmoid, BCE, batch 64, float64",
                     "mnist1d-mlp": "40-100-100-10 ReLU, softmax CE, batch 100, float64"},
        "batch": args.batch, "dtype": "float32 (step time), float64 (training)",
        "block": args.block, "curvature_interval": PERIOD, "warmup_blocks": args.warmup,
        "rounds": args.repeats, "hf_epochs": args.hf_epochs, "max_epochs": args.max_epochs,
        "torch_threads": args.threads, "python": platform.python_version()}
    setup.write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
