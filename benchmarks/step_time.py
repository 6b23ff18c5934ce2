"""Step time of each optimiser relative to an SGD step on the same backend and problem.

Problem: MLP 784-256-10 (tanh), softmax cross-entropy, batch 128, float32. Per backend, every
method's step is timed in interleaved rounds (one step of each per round, after warm-up; jitted
on JAX), and the median is divided by SGD's median from the same run. The same rounds time the
SGD + momentum step hand-written in the framework (``handwritten_SGD``: torch.func, jitted JAX,
autograd; from ``overhead.py``), and every method's median is also divided by it: a ratio to our
own SGD hides the overhead both share. Newton,
Levenberg-Marquardt and BFGS form p x p matrices (p = 203,530 here) and are left out: they are
small-problem methods.

    python benchmarks/step_time.py --json benchmarks/results/step_time.json

Writes ``{"<backend>": {"<method>": {"step_ms", "ratio_to_sgd", "ratio_to_handwritten_sgd"}}}``.
"""

from __future__ import annotations

import argparse
import json
import platform
from typing import Any

import _setup as setup
from overhead import flat_params, sgd_reference
from secondorder import optim, tree

SIZES = (784, 256, 10)


def methods(model: Any, loss: Any) -> dict[str, Any]:
    found = {
        "SGD": optim.SGD(model, loss, lr=0.01, momentum=0.9),
        "Adam": optim.Adam(model, loss, lr=1e-3),
        "CurveBall": optim.CurveBall(model, loss, damping=10.0),
    }
    if hasattr(optim, "HessianFree"):
        found["HessianFree"] = optim.HessianFree(model, loss, cg_iters=10)
    return found


def bench_backend(name: str, args: argparse.Namespace) -> dict[str, Any]:
    b, model, loss, params, x, y = setup.mlp_problem(name, SIZES, args.batch, args.seed,
                                                     args.threads)
    fns, sync = {}, (lambda out: None)
    if name == "jax":
        import jax

        sync = jax.block_until_ready
    for label, opt in methods(model, loss).items():
        state = opt.init(params)
        step = jax.jit(opt.step) if name == "jax" else opt.step
        fns[label] = (lambda step=step, state=state: step(params, state, (x, y)))
    hand_step, w0 = sgd_reference(name, params, x, y), flat_params(params)
    buf0 = tree.zeros_like(w0)
    fns["handwritten_SGD"] = lambda: hand_step(w0, buf0)
    ms = setup.interleaved_ms(fns, sync, warmup=args.warmup, repeats=args.repeats)
    return {label: {"step_ms": t, "ratio_to_sgd": t / ms["SGD"],
                    "ratio_to_handwritten_sgd": t / ms["handwritten_SGD"]}
            for label, t in ms.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = setup.parser(__doc__, "step_time", batch=128, warmup=3, repeats=30)
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    for name in setup.installed(args.backends, results):
        results[name] = bench_backend(name, args)
        print(name, json.dumps({k: round(v["ratio_to_sgd"], 3) for k, v in results[name].items()}))
    results["_meta"] = {"problem": f"MLP {'-'.join(map(str, SIZES))} tanh, softmax CE, "
                                   f"batch {args.batch}, float32",
                        "warmup": args.warmup, "repeats": args.repeats,
                        "torch_threads": args.threads, "python": platform.python_version()}
    setup.write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
