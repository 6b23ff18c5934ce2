"""What the framework integrations cost over the pure ``init``/``step`` API they wrap.

Problem: ``nn.Sequential(Linear(784, 256), Tanh(), Linear(256, 10))``, softmax cross-entropy,
batch 128, float32, torch with one intra-op thread (``--threads``). Per method, in one run,
interleaved rounds after warm-up, the median of each:

* ``torch/<method>``: ``integrations.torch.Optimizer(model, nn.CrossEntropyLoss(), method).step``
  (parameters read from the module, stepped, copied back into it in place) against the pure
  API on the same module, ``from_torch(model)`` and the method built with the defaults the
  integration takes (``CLASS_DEFAULTS``) and stepped with parameters and state carried between
  calls. Target: ratio <= 1.05.
* ``jax/<method>`` (when optax is installed): the method turned into an optax transformation by
  ``integrations.optax`` and stepped with ``optax.apply_updates`` inside one ``jax.jit`` against
  the jitted pure step, on the same MLP written with ``jax.numpy``.

* ``nnx/<method>`` (when flax is installed): the same MLP as a ``flax.nnx`` module through
  ``from_nnx`` and its jitted ``make_step`` (the module merged at every call, its layers tapped
  for K-FAC) against the jitted pure step on the reference MLP with the same weights. The
  methods include ``kfac`` here, which needs the taps. Target: ratio <= 1.05.

Writes ``{"torch": {"<method>": {"ours_ms", "reference_ms", "ratio"}}, "jax": {...},
"nnx": {...}, "_meta": {...}}`` (ours = the integration, reference = the pure API).

    python benchmarks/integrations.py --json benchmarks/results/integrations.json
"""

from __future__ import annotations

import importlib.util
import platform
from importlib.metadata import version
from typing import Any

import numpy as np

import _setup as setup
from secondorder.optim.registry import CLASS_DEFAULTS, METHODS

SIZES = (784, 256, 10)
METHOD_NAMES = ("sgd", "curveball", "hessian-free")


def _case(ms: dict[str, float], ours: str, ref: str) -> dict[str, float]:
    return {"ours_ms": ms[ours], "reference_ms": ms[ref], "ratio": ms[ours] / ms[ref]}


def bench_torch(args: Any) -> dict[str, Any]:
    import torch
    from torch import nn

    from secondorder.integrations.torch import Optimizer
    from secondorder.losses import SoftmaxCrossEntropy
    from secondorder.models import from_torch

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    x = torch.as_tensor(rng.standard_normal((args.batch, SIZES[0])), dtype=torch.float32)
    y = torch.as_tensor(rng.integers(0, SIZES[-1], args.batch))

    def module() -> nn.Module:
        torch.manual_seed(args.seed)
        return nn.Sequential(nn.Linear(SIZES[0], SIZES[1]), nn.Tanh(),
                             nn.Linear(SIZES[1], SIZES[2]))

    fns: dict[str, Any] = {}
    for name in args.methods.split(","):
        opt = Optimizer(module(), nn.CrossEntropyLoss(), method=name)
        fns[f"{name}.ours"] = lambda opt=opt: opt.step((x, y))

        apply, params = from_torch(module())
        factory = METHODS[name].cls if name in CLASS_DEFAULTS else METHODS[name]
        pure = factory(apply, SoftmaxCrossEntropy())  # the defaults the integration takes
        carry = [params, pure.init(params)]

        def pure_step(pure: Any = pure, carry: list = carry) -> Any:
            carry[0], carry[1], info = pure.step(carry[0], carry[1], (x, y))
            return info.loss

        fns[f"{name}.reference"] = pure_step
    ms = setup.interleaved_ms(fns, lambda out: out, warmup=args.warmup, repeats=args.repeats)
    return {name: _case(ms, f"{name}.ours", f"{name}.reference")
            for name in args.methods.split(",")}


def bench_jax(args: Any) -> dict[str, Any]:
    import jax
    import optax

    from secondorder.integrations.optax import as_optax

    b, model, loss, params, x, y = setup.mlp_problem("jax", SIZES, args.batch, args.seed,
                                                     args.threads)
    fns: dict[str, Any] = {}
    for name in args.methods.split(","):
        method = METHODS[name](model, loss)
        transform = as_optax(method)

        @jax.jit
        def optax_step(p: Any, s: Any, transform: Any = transform) -> tuple:
            updates, s = transform.update(None, s, p, batch=(x, y))
            return optax.apply_updates(p, updates), s

        @jax.jit
        def pure_step(p: Any, s: Any, method: Any = method) -> tuple:
            p, s, info = method.step(p, s, (x, y))
            return p, s

        for key, fn, state in (("ours", optax_step, transform.init(params)),
                               ("reference", pure_step, method.init(params))):
            carry = [params, state]

            def call(fn: Any = fn, carry: list = carry) -> Any:
                carry[0], carry[1] = fn(carry[0], carry[1])
                return carry[0]

            fns[f"{name}.{key}"] = call
    ms = setup.interleaved_ms(fns, jax.block_until_ready, warmup=args.warmup,
                              repeats=args.repeats)
    return {name: _case(ms, f"{name}.ours", f"{name}.reference")
            for name in args.methods.split(",")}


def bench_nnx(args: Any) -> dict[str, Any]:
    import jax
    from flax import nnx

    from secondorder.models import from_nnx
    from secondorder.models.layers import channels_last_to_reference

    b, model, loss, params, x, y = setup.mlp_problem("jax", SIZES, args.batch, args.seed,
                                                     args.threads)

    class Net(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.hidden = nnx.Linear(SIZES[0], SIZES[1], rngs=rngs)
            self.out = nnx.Linear(SIZES[1], SIZES[2], rngs=rngs)

        def __call__(self, a: Any) -> Any:
            return self.out(jax.numpy.tanh(self.hidden(a)))

    nnx_model, nnx_params = from_nnx(Net(nnx.Rngs(args.seed)), example=x)
    ref_params = [{"w": channels_last_to_reference(nnx_params[n]["kernel"]),
                   "b": nnx_params[n]["bias"]} for n in ("hidden", "out")]
    names = [*args.methods.split(","), "kfac"]
    fns: dict[str, Any] = {}
    for name in dict.fromkeys(names):
        ours, reference = METHODS[name](nnx_model, loss), METHODS[name](model, loss)
        step = nnx_model.make_step(ours)
        pure = jax.jit(reference.step)
        carries = {"ours": [nnx_params, ours.init(nnx_params), nnx_model.state],
                   "reference": [ref_params, reference.init(ref_params)]}

        def call_ours(step: Any = step, carry: list = carries["ours"]) -> Any:
            carry[0], carry[1], carry[2], _ = step(*carry, (x, y))
            return carry[0]

        def call_reference(pure: Any = pure, carry: list = carries["reference"]) -> Any:
            carry[0], carry[1], _ = pure(carry[0], carry[1], (x, y))
            return carry[0]

        fns[f"{name}.ours"], fns[f"{name}.reference"] = call_ours, call_reference
    ms = setup.interleaved_ms(fns, jax.block_until_ready, warmup=args.warmup,
                              repeats=args.repeats)
    return {name: _case(ms, f"{name}.ours", f"{name}.reference") for name in dict.fromkeys(names)}


def main() -> None:
    p = setup.parser(__doc__, "integrations", batch=128, warmup=10, repeats=60)
    p.set_defaults(backends="torch,jax,nnx")
    p.add_argument("--methods", default=",".join(METHOD_NAMES),
                   help="registered methods to time, comma-separated")
    args = p.parse_args()
    out: dict[str, Any] = {}
    versions = {}
    for name in args.backends.split(","):
        needs = {"torch": ("torch",), "jax": ("jax", "optax"), "nnx": ("jax", "flax")}[name]
        if not all(importlib.util.find_spec(n) for n in needs):
            print(f"{name}: skipped ({', '.join(needs)} not installed)")
            continue
        bench = {"torch": bench_torch, "jax": bench_jax, "nnx": bench_nnx}[name]
        out[name] = bench(args)
        versions.update({n: version(n) for n in needs})
        for method, row in out[name].items():
            print(f"{name:6s} {method:14s} integration {row['ours_ms']:8.3f} ms   pure "
                  f"{row['reference_ms']:8.3f} ms   ratio {row['ratio']:.3f}")
    out["_meta"] = {"versions": versions, "problem": "MLP 784-256-10 tanh, softmax CE, batch "
                    f"{args.batch}, float32", "warmup": args.warmup, "repeats": args.repeats,
                    "torch_threads": args.threads, "machine": platform.machine(),
                    "python": platform.python_version()}
    setup.write_json(args.json, out)


if __name__ == "__main__":
    main()
