"""Cost of the GroupedNewton summaries (g_bar, H_bar and the diagonal of D3) as the number of
groups S grows, relative to one gradient, per backend.

Problem: MLP 256-128x7-10 (tanh; 8 layers, 16 tensors), softmax cross-entropy, batch 256,
float32. Partition ``blocks-S`` for S = 2, 4, 8, 16; direction u = the gradient. The summaries go
through phi(eta) = L(theta + V eta): one reverse pass plus S forward-over-forward-over-reverse
passes. Median of interleaved rounds after warm-up (jitted on JAX).

    python benchmarks/grouped_newton.py --json benchmarks/results/grouped_newton.json

Writes ``{"<backend>": {"<S>": {"summaries_ms", "gradient_ms", "ratio"}}}``.
"""

from __future__ import annotations

import argparse
import importlib.util
from typing import Any

import _setup as setup
from secondorder.optim import partitions
from secondorder.optim.grouped_newton import summaries

SIZES = (256,) + (128,) * 7 + (10,)
GROUPS = (2, 4, 8, 16)


def _no_sync(out: Any) -> None:
    return None


def bench_backend(name: str, args: argparse.Namespace) -> dict[str, Any]:
    b, model, loss, params, x, y = setup.mlp_problem(name, SIZES, args.batch, args.seed,
                                                     args.threads)

    def f(p: Any) -> Any:
        return loss.value(model(p, x), y)

    def gradient(p: Any) -> Any:
        return b.value_and_grad(f, p)

    u = b.grad(f, params)
    fns: dict[str, Any] = {}
    sync: Any = _no_sync
    grad_fn = gradient
    if name == "jax":
        import jax

        sync = jax.block_until_ready
        grad_fn = jax.jit(gradient)
    fns["gradient"] = lambda: grad_fn(params)
    for s in GROUPS:
        part = partitions.blocks(params, s)

        def summ(p: Any, v: Any, part: Any = part) -> Any:
            return summaries(f, p, v, part, backend=b)

        if name == "jax":
            summ = jax.jit(summ)
        fns[str(s)] = (lambda summ=summ: summ(params, u))
    ms = setup.interleaved_ms(fns, sync, warmup=args.warmup, repeats=args.repeats)
    return {str(s): {"summaries_ms": ms[str(s)], "gradient_ms": ms["gradient"],
                     "ratio": ms[str(s)] / ms["gradient"]} for s in GROUPS}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = setup.parser(__doc__, "grouped_newton", batch=256, warmup=2, repeats=10)
    args = parser.parse_args(argv)
    out: dict[str, Any] = {}
    for name in args.backends.split(","):
        if importlib.util.find_spec(setup.NEEDS[name]) is None:
            print(f"{name}: not installed, skipped")
            continue
        out[name] = bench_backend(name, args)
        for s, row in out[name].items():
            print(f"{name:6s} S={s:>2s}: summaries {row['summaries_ms']:8.2f} ms, gradient "
                  f"{row['gradient_ms']:7.2f} ms, ratio {row['ratio']:6.2f}")
    setup.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
