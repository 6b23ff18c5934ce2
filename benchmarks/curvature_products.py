"""GGN-vector products: secondorder against the same product hand-written in each framework.

Problem: MLP 784-256-10 (tanh), softmax cross-entropy, batch 128, float32, one seed. Per backend,
in one run, the median time (after warm-up) of

* ``ours``: ``GGN(model, loss, params, batch)`` built once, then ``op.matvec(v)`` (on JAX the
  construction and the product are jitted together, as a user would jit them);
* ``handwritten``: the same product written directly with the framework: the VJP closure saved
  once, then one JVP, the loss-Hessian product and the pullback (torch.func / autograd); on JAX a
  jitted function of jvp, the Hessian product and vjp;
* ``fwd_bwd``: one forward and backward pass (value and gradient of the mean loss);
* with ``--peers`` on torch: curvlinops' ``GGNLinearOperator`` on the same model and batch
  (needs the ``bench-peers`` nox session, which installs curvlinops).

Writes ``{"<backend>": {"ours_ms", "handwritten_ms", "fwd_bwd_ms", "overhead"}}`` (overhead =
ours / handwritten) and, with peers, ``curvlinops_ms`` and ``ours_over_curvlinops`` under torch.

    python benchmarks/curvature_products.py --json benchmarks/results/curvature_products.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import _setup as setup
from secondorder import backends, losses, tree
from secondorder.curvature import GGN
from secondorder.models import MLP

SIZES = (784, 256, 10)


def _summary(ms: dict[str, float], diff: float) -> dict[str, float]:
    return {"ours_ms": ms["ours"], "handwritten_ms": ms["handwritten"],
            "fwd_bwd_ms": ms["fwd_bwd"], "overhead": ms["ours"] / ms["handwritten"],
            "relative_difference": diff}


def problem(batch: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    model = MLP(SIZES, "tanh")
    return {
        "model": model,
        "x": rng.standard_normal((batch, SIZES[0])).astype(np.float32),
        "y": rng.integers(0, SIZES[-1], batch),
        "v": tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32),
                      model.init(seed, "numpy")),
        "seed": seed,
    }


def _ce_hvp(s: Any, u: Any) -> Any:
    """Softmax cross-entropy Hessian product for probabilities s, written out:
    s * u - <u, s> s, divided by the batch size (mean loss)."""
    return (s * u - (u * s).sum(axis=1, keepdims=True) * s) / s.shape[0]


def bench_torch(p: dict, args: argparse.Namespace) -> dict[str, float]:
    import torch

    torch.set_num_threads(args.threads)
    b = backends.get("torch")
    model, loss = p["model"], losses.SoftmaxCrossEntropy()
    params = model.init(p["seed"], b, dtype="float32")
    x, y = b.asarray(p["x"]), b.asarray(p["y"])
    v = tree.map(b.asarray, p["v"])
    sync = lambda out: None  # noqa: E731 - CPU tensors are ready when returned

    op = GGN(model, loss, params, (x, y))

    def f(w: Any) -> Any:
        return model.apply(w, x)

    out, vjp_fn = torch.func.vjp(f, params)

    def handwritten() -> Any:
        _, jv = torch.func.jvp(f, (params,), (v,))
        return vjp_fn(_ce_hvp(torch.softmax(out, 1), jv))[0]

    value_grad = torch.func.grad_and_value(lambda w: loss.value(f(w), y))
    fns = {"ours": lambda: op.matvec(v), "handwritten": handwritten,
           "fwd_bwd": lambda: value_grad(params)}
    if args.peers:
        fns["curvlinops"] = curvlinops_product(p, params, x, y, v)
    ms = setup.interleaved_ms(fns, sync, warmup=args.warmup, repeats=args.repeats)
    diff = tree.norm(tree.sub(op.matvec(v), handwritten())) / tree.norm(handwritten())
    result = _summary(ms, float(diff))
    if args.peers:
        result.update({"curvlinops_ms": ms["curvlinops"],
                       "ours_over_curvlinops": ms["ours"] / ms["curvlinops"],
                       "curvlinops_relative_difference": _peer_agreement(
                           fns["curvlinops"](), op.matvec(v))})
    return result


def curvlinops_product(p: dict, params: Any, x: Any, y: Any, v: Any) -> Callable[[], Any]:
    """curvlinops' GGN-vector product on an equivalent torch.nn model with our weights."""
    import torch
    from curvlinops import GGNLinearOperator

    sizes = p["model"].sizes
    layers: list[torch.nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(d_in, d_out))
        if i < len(sizes) - 2:
            layers.append(torch.nn.Tanh())
    net = torch.nn.Sequential(*layers)
    with torch.no_grad():
        for i, layer in enumerate(net[::2]):
            layer.weight.copy_(params[i]["w"])
            layer.bias.copy_(params[i]["b"])
    peer_params = [q for q in net.parameters() if q.requires_grad]
    op = GGNLinearOperator(net, torch.nn.CrossEntropyLoss(), peer_params, [(x, y)],
                           progressbar=False, check_deterministic=False)
    # the peer orders parameters as the module does: (w0, b0, w1, b1)
    vec = [t for layer_v in v for t in (layer_v["w"], layer_v["b"])]
    try:
        op @ vec  # curvlinops >= 3 multiplies tensor lists
        return lambda: op @ vec
    except Exception:
        flat = torch.cat([t.reshape(-1) for t in vec]).detach().numpy()
        return lambda: op @ flat  # older releases: NumPy vectors


def _peer_agreement(got: Any, mine: Any) -> float:
    import torch

    got = torch.cat([torch.as_tensor(t).reshape(-1)
                     for t in (got if isinstance(got, list | tuple) else [got])])
    mine = torch.cat([t.reshape(-1) for layer in mine for t in (layer["w"], layer["b"])])
    return float(torch.linalg.norm(got - mine) / torch.linalg.norm(mine))


def bench_jax(p: dict, args: argparse.Namespace) -> dict[str, float]:
    import jax

    b = backends.get("jax")
    model, loss = p["model"], losses.SoftmaxCrossEntropy()
    params = model.init(p["seed"], b, dtype="float32")
    x, y = b.asarray(p["x"]), b.asarray(p["y"])
    v = tree.map(b.asarray, p["v"])
    sync = jax.block_until_ready

    ours_fn = jax.jit(lambda w, t: GGN(model, loss, w, (x, y)).matvec(t))

    @jax.jit
    def handwritten(w: Any, t: Any) -> Any:
        def f(q: Any) -> Any:
            return model.apply(q, x)

        out, jv = jax.jvp(f, (w,), (t,))
        _, vjp_fn = jax.vjp(f, w)
        return vjp_fn(_ce_hvp(jax.nn.softmax(out, axis=1), jv))[0]

    value_grad = jax.jit(jax.value_and_grad(lambda w: loss.value(model.apply(w, x), y)))
    fns = {"ours": lambda: ours_fn(params, v), "handwritten": lambda: handwritten(params, v),
           "fwd_bwd": lambda: value_grad(params)}
    ms = setup.interleaved_ms(fns, sync, warmup=args.warmup, repeats=args.repeats)
    a, h = ours_fn(params, v), handwritten(params, v)
    return _summary(ms, float(tree.norm(tree.sub(a, h)) / tree.norm(h)))


def bench_numpy(p: dict, args: argparse.Namespace) -> dict[str, float]:
    from autograd import make_jvp, make_vjp

    b = backends.get("numpy")
    model, loss = p["model"], losses.SoftmaxCrossEntropy()
    params = model.init(p["seed"], b, dtype="float32")
    x, y, v = p["x"], p["y"], p["v"]
    sync = lambda out: None  # noqa: E731

    op = GGN(model, loss, params, (x, y))

    flat, unravel = tree.ravel(params)
    flat_v = tree.ravel(v)[0]

    def f(w: Any) -> Any:
        return model.apply(unravel(w), x)

    vjp_fn, out = make_vjp(f)(flat)
    z = np.exp(out - out.max(axis=1, keepdims=True))
    probs = z / z.sum(axis=1, keepdims=True)
    jvp_at = make_jvp(f)(flat)

    def handwritten() -> Any:
        _, jv = jvp_at(flat_v)
        return vjp_fn(_ce_hvp(probs, jv))

    fns = {"ours": lambda: op.matvec(v), "handwritten": handwritten,
           "fwd_bwd": lambda: b.value_and_grad(lambda w: loss.value(model.apply(w, x), y),
                                                params)}
    ms = setup.interleaved_ms(fns, sync, warmup=args.warmup, repeats=args.repeats)
    diff = np.linalg.norm(tree.ravel(op.matvec(v))[0] - handwritten()) / np.linalg.norm(
        handwritten())
    return _summary(ms, float(diff))


BENCHES = {"torch": bench_torch, "jax": bench_jax, "numpy": bench_numpy}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = setup.parser(__doc__, "curvature_products", batch=128, warmup=5, repeats=60)
    parser.add_argument("--peers", action="store_true", help="also time curvlinops (torch)")
    args = parser.parse_args(argv)
    p = problem(args.batch, args.seed)
    results: dict[str, Any] = {}
    for name in setup.installed(args.backends, results):
        results[name] = BENCHES[name](p, args)
        print(name, json.dumps(results[name]))
    from importlib.metadata import version

    versions = {n: version(n) for n in ("torch", "jax", "autograd")
                if importlib.util.find_spec(n) is not None}
    shape = "-".join(map(str, SIZES))
    results["_meta"] = {"versions": versions,
                        "problem": f"MLP {shape} tanh, softmax CE, batch {args.batch}, float32",
                        "warmup": args.warmup, "repeats": args.repeats,
                        "torch_threads": args.threads, "machine": platform.machine(),
                        "python": platform.python_version()}
    out = Path(args.json)
    if args.peers and out.exists():  # the peer run adds its fields to the main run's file
        merged = json.loads(out.read_text())
        peer_fields = {k: v for k, v in results.get("torch", {}).items()
                       if k.startswith("curvlinops") or k == "ours_over_curvlinops"}
        peer_fields["peer_run"] = {"ours_ms": results["torch"].get("ours_ms"),
                                   **results["_meta"]}
        merged.setdefault("torch", {}).update(peer_fields)
        results = merged
    setup.write_json(out, results)
    return results


if __name__ == "__main__":
    main()
