"""Time per prox-linear direction, dual vs primal at equal inner (CG) steps, as m k / p varies.

An MLP (64 -> H -> H -> 10, tanh) on the scikit-learn digits data (tiled when the batch exceeds
the 1797 samples), softmax cross-entropy, JAX (jit-compiled direction functions, float64), one
direction = one linearisation + ``--inner-steps`` CG iterations. p is fixed by ``--hidden`` and
m k / p varies with the batch size m.

    python benchmarks/prox_linear.py --json /tmp/prox_linear.json [--png /tmp/prox_linear.png]

writes {"points": [{"mk_over_p", "m", "primal_ms", "dual_ms", "ratio"}, ...], "p", ...} and a
log-log plot of both times against m k / p (the crossing is where the dual stops paying).
"""

from __future__ import annotations

import argparse
import platform

import numpy as np

import _setup as setup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="output JSON path")
    ap.add_argument("--png", default=None, help="plot path (default: JSON path with .png)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--inner-steps", type=int, default=4)
    ap.add_argument("--batches", type=int, nargs="+",
                    default=[1, 4, 16, 64, 256, 1024, 4096, 8192])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--gamma", type=float, default=1.0)
    args = ap.parse_args()

    import jax

    jax.config.update("jax_enable_x64", True)

    from secondorder import tree
    from secondorder.curvature import Linearization
    from secondorder.losses import SoftmaxCrossEntropy
    from secondorder.models import MLP
    from secondorder.optim.prox_linear import dual_direction, primal_direction
    from secondorder.problems.datasets import load_digits

    x_all, y_all = load_digits()
    model = MLP([64, args.hidden, args.hidden, 10])
    loss = SoftmaxCrossEntropy()
    params = model.init(0, "jax")
    p = tree.size(params)
    k = 10

    def make(fn):
        def direction(params, x, y):
            lin = Linearization(model.apply, params, x)
            return fn(lin, loss, y, gamma=args.gamma, inner_steps=args.inner_steps).direction
        return jax.jit(direction)

    primal, dual = make(primal_direction), make(dual_direction)

    def timed(fn, *a):  # one call to compile, then the median of --reps calls
        return setup.interleaved_ms({"fn": lambda: fn(*a)}, jax.block_until_ready, warmup=1,
                                    repeats=args.reps)["fn"]

    points = []
    for m in args.batches:
        idx = np.arange(m) % x_all.shape[0]
        x = jax.numpy.asarray(x_all[idx])
        y = jax.numpy.asarray(y_all[idx])
        t_p = timed(primal, params, x, y)
        t_d = timed(dual, params, x, y)
        point = {"m": m, "mk_over_p": m * k / p, "primal_ms": t_p, "dual_ms": t_d,
                 "ratio": t_p / t_d}
        points.append(point)
        print(f"m={m:6d} mk/p={m * k / p:9.5f} primal {t_p:9.3f} ms  dual {t_d:9.3f} ms  "
              f"primal/dual {t_p / t_d:6.2f}", flush=True)

    crossing = None
    for a, b in zip(points, points[1:]):
        if a["ratio"] >= 1 > b["ratio"]:
            # log-linear interpolation of the ratio = 1 crossing in m k / p
            la, lb = np.log(a["mk_over_p"]), np.log(b["mk_over_p"])
            t = (np.log(a["ratio"])) / (np.log(a["ratio"]) - np.log(b["ratio"]))
            crossing = float(np.exp(la + t * (lb - la)))
            break
    out = {"points": points, "p": p, "k": k, "hidden": args.hidden,
           "inner_steps": args.inner_steps, "backend": "jax (jit, float64)",
           "device": jax.devices()[0].platform, "machine": platform.processor() or
           platform.machine(), "crossing_mk_over_p": crossing}
    setup.write_json(args.json, out)
    print(f"p = {p}; crossing at m k / p ~ {crossing}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = [q["mk_over_p"] for q in points]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.loglog(r, [q["primal_ms"] for q in points], "o-", label="primal (CG in R^p)")
    ax.loglog(r, [q["dual_ms"] for q in points], "s-", label="dual (CG in R^{m x k})")
    if crossing is not None:
        ax.axvline(crossing, color="grey", ls="--", label=f"crossing ~ {crossing:.2g}")
    ax.set_xlabel("m k / p")
    ax.set_ylabel("time per direction (ms)")
    ax.set_title(f"prox-linear direction, MLP on digits, p={p}, {args.inner_steps} CG steps")
    ax.legend()
    fig.tight_layout()
    png = args.png or args.json.rsplit(".", 1)[0] + ".png"
    fig.savefig(png, dpi=120)
    print(f"wrote {args.json} and {png}")


if __name__ == "__main__":
    main()
