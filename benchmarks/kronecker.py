"""Step time of the Kronecker-factored methods (K-FAC, Shampoo, TNT) against SGD and Adam.

Problems (float32, softmax cross-entropy, batch 128, seeded weights and one batch):

* ``mlp``: MLP 784-256-10, tanh;
* ``convnet``: ConvNet on 1 x 28 x 28 images, conv 16 - conv 32 (3 x 3, average pooling), dense
  128 - 10, tanh.

Methods, each with its periodic work as the issue sets it:

* ``kfac``: K-FAC with statistics every 10 steps (T1) and damped inverses every 100 (T2);
* ``shampoo``: statistics every step, inverse roots every 100;
* ``tnt``: statistics every 10 steps, inverses every 100;
* ``sgd`` (momentum 0.9) and ``adam``: the library's first-order steps;
* ``handwritten_sgd``: the SGD + momentum step written in the framework around the same model's
  forward pass (``torch.func.grad_and_value`` of ``F.cross_entropy``; a jitted
  ``jax.value_and_grad``), the reference outside the library;
* ``handwritten_kfac``, ``handwritten_shampoo`` and ``handwritten_tnt`` (MLP): the same steps
  written directly in the framework (eager torch autograd, jitted JAX;
  ``benchmarks/_handwritten_{kfac,shampoo,tnt}.py``), the least work the algorithms need,
  against which ``kfac``, ``shampoo`` and ``tnt`` also get ``ratio_to_handwritten_<method>``.

A periodic method's cost is its average over a whole period, not its median step (which would
hide the inverse every 100 steps). So every method runs ``--block`` consecutive steps (default
100, one T2 period; each step continues from the previous one) per round, in interleaved rounds
after warm-up (torch with one intra-op thread; jitted JAX; each block ends by waiting for the
device: ``block_until_ready``, ``torch.cuda.synchronize`` with ``--device cuda:0``), and
``step_ms`` is the median over rounds of the block's time divided by its steps. Ratios divide
medians of the same run: ``ratio_to_sgd``, ``ratio_to_adam`` and ``ratio_to_handwritten_sgd``.

The targets (issue 13): K-FAC <= 1.5x SGD, Shampoo <= 1.5x Adam, TNT <= 1.5x SGD, on torch and
JAX. ``--kfac-jax`` adds kfac-jax's own optimiser (``kfac_jax.Optimizer``, the same T1/T2, MLP
only) to the JAX rounds; kfac-jax 0.0.8 needs jax 0.7.2, so that run belongs to the
``peers-kfac-jax`` nox session, not the default environment.

    python benchmarks/kronecker.py --json benchmarks/results/kronecker.json

Writes ``{"<backend>": {"<problem>": {"<method>": {"step_ms", "ratio_to_sgd", ...}}},
"kfac_jax": {"<problem>": {...}}, "_meta": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable
from typing import Any

import numpy as np

import _handwritten_kfac as handwritten
import _handwritten_shampoo as handwritten_shampoo
import _handwritten_tnt as handwritten_tnt
import _setup as setup
from secondorder import backends, losses, optim, tree
from secondorder.models import MLP, ConvNet

PERIOD = 100
PROBLEMS = ("mlp", "convnet")


def problem(name: str, backend: str, batch: int, seed: int, device: str | None = None
            ) -> tuple[Any, Any, Any, Any]:
    """``(model, params, x, y)`` in float32 on ``backend`` (on ``device``, a name such as
    ``"cuda:0"``, when given)."""
    b = backends.get(backend)
    where = None if device is None else b.device_from_name(device)
    rng = np.random.default_rng(seed)
    if name == "mlp":
        model: Any = MLP((784, 256, 10), "tanh")
        x = rng.standard_normal((batch, 784))
    else:
        model = ConvNet((1, 28, 28), channels=(16, 32), dense=(128, 10), activation="tanh")
        x = rng.standard_normal((batch, 1, 28, 28))
    params = tree.map(lambda a: b.asarray(a, device=where), model.init(seed, b, dtype="float32"))
    return (model, params, b.asarray(x, dtype="float32", device=where),
            b.asarray(rng.integers(0, 10, batch), device=where))


def methods(model: Any, loss: Any) -> dict[str, Any]:
    """The library's optimisers, with the periods of the module docstring."""
    return {
        "sgd": optim.SGD(model, loss, lr=0.01, momentum=0.9),
        "adam": optim.Adam(model, loss, lr=1e-3),
        "kfac": optim.KFAC(model, loss, lr=0.01, damping=1e-3, statistics_interval=10,
                           inverse_interval=PERIOD),
        "shampoo": optim.Shampoo(model, loss, lr=0.01, statistics_interval=1,
                                 root_interval=PERIOD),
        "tnt": optim.TNT(model, loss, lr=0.01, statistics_interval=10, inverse_interval=PERIOD),
    }


class Block:
    """``steps`` consecutive calls of ``step(carry) -> carry``, continuing across blocks."""

    def __init__(self, step: Callable[[Any], Any], carry: Any, steps: int) -> None:
        self.step, self.carry, self.steps = step, carry, steps

    def __call__(self) -> Any:
        for _ in range(self.steps):
            self.carry = self.step(self.carry)
        return self.carry


def handwritten_sgd(backend: str, model: Any, x: Any, y: Any
                    ) -> Callable[[tuple[Any, Any]], tuple[Any, Any]]:
    """``(w, buf) -> (w, buf)``: b <- mu b + g, w <- w - lr b with the framework's own
    autodiff and cross-entropy around ``model.apply``."""
    lr, mu = 0.01, 0.9
    if backend == "torch":
        import torch
        import torch.nn.functional as F  # noqa: N812 - the usual torch alias

        grad_and_value = torch.func.grad_and_value(
            lambda w: F.cross_entropy(model.apply(w, x), y))

        def step(carry: tuple[Any, Any]) -> tuple[Any, Any]:
            w, buf = carry
            g, _ = grad_and_value(w)
            buf = torch.utils._pytree.tree_map(lambda b, gi: mu * b + gi, buf, g)
            return torch.utils._pytree.tree_map(lambda wi, b: wi - lr * b, w, buf), buf

        return step
    import jax

    def objective(w: Any) -> Any:
        logits = model.apply(w, x)
        return -jax.numpy.mean(jax.numpy.take_along_axis(
            jax.nn.log_softmax(logits), y[:, None], axis=1))

    @jax.jit
    def jax_step(carry: tuple[Any, Any]) -> tuple[Any, Any]:
        w, buf = carry
        g = jax.grad(objective)(w)
        buf = jax.tree_util.tree_map(lambda b, gi: mu * b + gi, buf, g)
        return jax.tree_util.tree_map(lambda wi, b: wi - lr * b, w, buf), buf

    return jax_step


def kfac_jax_step(x: Any, y: Any, params: Any, seed: int) -> Callable[[Any], Any]:
    """kfac-jax's optimiser on the MLP (its own layer registration by graph matching), with
    T1 = 10, T2 = 100, fixed learning rate, momentum and damping: ``carry -> carry``.

    The kernels are given in kfac-jax's (d_in, d_out) layout and applied as ``x @ W + b``: its
    graph matcher recognises only that form as a dense layer (with ``x @ W.T`` it falls back to
    diagonal blocks, a cheaper and different method)."""
    import jax
    import jax.numpy as jnp
    import kfac_jax

    params = [{"w": layer["w"].T, "b": layer["b"]} for layer in params]

    def apply(w: Any, xb: Any) -> Any:
        a = jnp.tanh(xb @ w[0]["w"] + w[0]["b"])
        return a @ w[1]["w"] + w[1]["b"]

    def loss_fn(w: Any, data: tuple[Any, Any]) -> Any:
        xb, yb = data
        logits = apply(w, xb)
        kfac_jax.register_softmax_cross_entropy_loss(logits, yb)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], axis=1))

    opt = kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(loss_fn), l2_reg=0.0,
        use_adaptive_learning_rate=False, use_adaptive_momentum=False,
        use_adaptive_damping=False, learning_rate_schedule=lambda t: 0.01,
        momentum_schedule=lambda t: 0.9, damping_schedule=lambda t: 1e-3,
        curvature_update_period=10, inverse_update_period=PERIOD, num_burnin_steps=0,
        multi_device=False)
    key = jax.random.PRNGKey(seed)
    batch = (x, y)
    state = opt.init(params, key, batch)
    kinds = {type(block).__name__ for block in opt._estimator.blocks}  # noqa: SLF001
    if kinds != {"DenseTwoKroneckerFactored"}:
        raise RuntimeError(f"kfac-jax registered {sorted(kinds)}, not Kronecker dense blocks")

    def step(carry: Any) -> Any:
        w, s, k = carry
        k, sub = jax.random.split(k)
        w, s, _ = opt.step(w, s, sub, batch=batch, global_step_int=None)
        return w, s, k

    return step, (params, state, key)


def handwritten_steps(backend: str, seed: int) -> dict[str, Callable[..., Any]]:
    """The methods written directly in the framework, each as ``(params, x, y) -> (step,
    carry)``, with the periods of :func:`methods`."""
    if backend == "torch":
        return {"kfac": lambda *a: handwritten.torch_kfac(*a, seed=seed),
                "shampoo": handwritten_shampoo.torch_shampoo,
                "tnt": lambda *a: handwritten_tnt.torch_tnt(*a, seed=seed)}
    return {"kfac": lambda *a: handwritten.jax_kfac(*a, seed=seed),
            "shampoo": handwritten_shampoo.jax_shampoo,
            "tnt": lambda *a: handwritten_tnt.jax_tnt(*a, seed=seed)}


def step_ms(backend: str, name: str, args: argparse.Namespace,
            make_methods: Callable[[Any, Any], dict[str, Any]], *, kfac_jax: bool = False,
            handwritten: bool = False) -> dict[str, float]:
    """Milliseconds per step of each optimiser of ``make_methods(model, loss)`` and of the
    hand-written SGD (with ``handwritten``, on the MLP, also the hand-written K-FAC, Shampoo
    and TNT; with ``kfac_jax``, kfac-jax's optimiser) on ``problem(name)``, each timed over
    blocks of ``args.block`` consecutive steps in interleaved rounds (the module docstring)."""
    b = backends.get(backend)
    if backend == "torch":
        import torch

        torch.set_num_threads(args.threads)
    model, params, x, y = problem(name, backend, args.batch, args.seed, args.device)
    loss = losses.SoftmaxCrossEntropy()
    batch = (x, y)
    sync: Callable[[Any], Any] = b.synchronize  # waits for a GPU's queued kernels
    if backend == "jax":
        import jax

        sync = jax.block_until_ready
    fns: dict[str, Callable[[], Any]] = {}
    for label, opt in make_methods(model, loss).items():
        step = b.jit(opt.step)

        def advance(carry: tuple[Any, Any], step: Callable = step) -> tuple[Any, Any]:
            p, s, _ = step(carry[0], carry[1], batch)
            return p, s

        fns[label] = Block(advance, (params, opt.init(params)), args.block)
    fns["handwritten_sgd"] = Block(handwritten_sgd(backend, model, x, y),
                                   (params, tree.zeros_like(params)), args.block)
    if handwritten and name == "mlp":
        for method, write in handwritten_steps(backend, args.seed).items():
            fns[f"handwritten_{method}"] = Block(*write(params, x, y), args.block)
    if kfac_jax:
        step, carry = kfac_jax_step(x, y, params, args.seed)
        fns["kfac_jax"] = Block(step, carry, args.block)
    ms = setup.interleaved_ms(fns, sync, warmup=args.warmup, repeats=args.repeats)
    return {label: t / args.block for label, t in ms.items()}


def bench(backend: str, name: str, args: argparse.Namespace) -> dict[str, Any]:
    per_step = step_ms(backend, name, args, methods, handwritten=True,
                       kfac_jax=backend == "jax" and args.kfac_jax and name == "mlp")
    rows = {label: {"step_ms": t, "ratio_to_sgd": t / per_step["sgd"],
                    "ratio_to_adam": t / per_step["adam"],
                    "ratio_to_handwritten_sgd": t / per_step["handwritten_sgd"]}
            for label, t in per_step.items()}
    for method in ("kfac", "shampoo", "tnt"):
        if f"handwritten_{method}" in per_step:
            rows[method][f"ratio_to_handwritten_{method}"] = (
                per_step[method] / per_step[f"handwritten_{method}"])
    return rows


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """``--device``, which :func:`step_ms` reads (also for ``benchmarks/kbfgs_smw.py``)."""
    parser.add_argument("--device", default=None,
                        help="run on this device, e.g. cuda:0 (default: the backend's own)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = setup.parser(__doc__, "kronecker", batch=128, warmup=1, repeats=5)
    parser.set_defaults(backends="torch,jax")
    parser.add_argument("--problems", default=",".join(PROBLEMS),
                        help="comma-separated subset of " + ",".join(PROBLEMS))
    parser.add_argument("--block", type=int, default=PERIOD,
                        help="consecutive steps per timed block (default: one T2 period)")
    add_device_option(parser)
    parser.add_argument("--kfac-jax", action="store_true",
                        help="also time kfac_jax.Optimizer on the MLP (needs kfac-jax)")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"_meta": {
        "problems": {"mlp": "MLP 784-256-10 tanh",
                     "convnet": "ConvNet 1x28x28, conv 16-32, dense 128-10, tanh"},
        "batch": args.batch, "dtype": "float32", "block": args.block,
        "warmup_blocks": args.warmup, "rounds": args.repeats, "torch_threads": args.threads,
        "device": args.device or "default", "python": platform.python_version()}}
    for backend in setup.installed(args.backends, results):
        results[backend] = {}
        for name in args.problems.split(","):
            rows = bench(backend, name, args)
            if "kfac_jax" in rows:
                results.setdefault("kfac_jax", {})[name] = rows.pop("kfac_jax")
            results[backend][name] = rows
            print(backend, name, json.dumps({k: round(v["ratio_to_sgd"], 3)
                                             for k, v in rows.items()}))
            setup.write_json(args.json, results)  # after each problem: a cut-short run keeps it
    setup.write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
