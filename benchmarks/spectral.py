"""Spectral tools on the digits CNN: the top Hessian eigenvalue and the dense GGN.

The problem: scikit-learn's 8 x 8 digits (the first ``--batch`` images, inputs in [0, 1]) and a
ConvNet (1, 8, 8) -> conv 3x3 (``--channels``) -> tanh -> 2x2 average pool (per block) -> dense
``--dense`` (tanh between dense layers) with softmax cross-entropy, float32, seeded weights; torch
limited to ``--threads`` intra-op threads. Per backend it times, as medians after warm-up calls:

* ``top_eigenvalue_s``: building the Hessian operator (the linearisation of the gradient) and
  ``secondorder.linalg.eigsh(H, 1)`` to its default float32 tolerance, with the Lanczos
  iterations taken (the issue's target: under 2 s);
* ``to_dense_s``: ``GGN(...).to_dense()`` through the backend's ``vmap`` in chunks of
  ``--chunk`` columns;
* ``to_dense_columns_s`` (with ``--columns``): the same matrix one column at a time, the previous
  implementation, and the ratio of the two;
* with ``--peers`` (torch): curvlinops' ``GGNLinearOperator`` of an equivalent ``nn.Sequential``
  holding the same weights, materialised as ``op @ I`` (``curvlinops_to_dense_s``,
  ``to_dense_over_curvlinops``: the issue's target is at most 2, and the relative difference of
  the two matrices). Run it in the ``bench-peers`` nox session, which installs curvlinops.

Writes ``{"problem": {...}, "<backend>": {...}}`` as JSON to ``--json``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from _setup import installed, parser, write_json
from secondorder import backends, losses
from secondorder.curvature import GGN, Hessian
from secondorder.linalg import eigsh
from secondorder.models import ConvNet
from secondorder.problems.datasets import load_digits


def _median_s(fn: Any, sync: Any, warmup: int, repeats: int) -> tuple[float, Any]:
    out = None
    for _ in range(warmup):
        out = sync(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = sync(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


def run_backend(name: str, args: Any) -> dict[str, Any]:
    b = backends.get(name)
    if name == "torch":
        import torch

        torch.set_num_threads(args.threads)
    x_np, y_np = load_digits()
    m = args.batch
    model = ConvNet((1, 8, 8), channels=args.channels, dense=args.dense, activation="tanh")
    loss = losses.SoftmaxCrossEntropy()
    params = model.init(args.seed, b, dtype="float32")
    x = b.asarray(x_np[:m].reshape(m, 1, 8, 8), dtype="float32")
    y = b.asarray(y_np[:m])
    batch = (x, y)
    sync = b.synchronize

    def top() -> Any:
        return eigsh(Hessian(model, loss, params, batch), 1, info=True,
                     return_eigenvectors=False)

    eig_s, (value, info) = _median_s(top, sync, args.warmup, args.repeats)
    ggn = GGN(model, loss, params, batch)
    ggn.chunk = args.chunk
    dense_s, dense = _median_s(ggn.to_dense, sync, args.warmup, args.repeats)
    out = {"parameters": int(ggn.shape[0]), "top_eigenvalue": float(b.to_numpy(value)[0]),
           "lanczos_iterations": int(info.iterations), "converged": bool(info.converged),
           "top_eigenvalue_s": eig_s, "to_dense_s": dense_s, "vectorised": bool(ggn._vmap_ok)}
    if args.peers and name == "torch":
        out.update(curvlinops_dense(model, params, batch, dense, sync, args))
        out["to_dense_over_curvlinops"] = dense_s / out["curvlinops_to_dense_s"]
    if args.columns:
        ggn._vmap_ok = False  # the column loop
        cols_s, cols = _median_s(ggn.to_dense, sync, 0, 1)
        a, c = b.to_numpy(dense), b.to_numpy(cols)
        out.update(to_dense_columns_s=cols_s, columns_over_vmap=cols_s / dense_s,
                   max_abs_difference=float(np.abs(a - c).max()))
    return out


def curvlinops_dense(model: Any, params: Any, batch: Any, ours: Any, sync: Any, args: Any
                     ) -> dict[str, Any]:
    """curvlinops' GGN of the same network (an equivalent ``nn.Sequential`` holding our weights,
    its parameters listed in our canonical order) materialised as ``op @ I``: its seconds, ours
    over them, and the largest difference from our matrix relative to its largest entry."""
    import torch
    from curvlinops import GGNLinearOperator
    from torch import nn

    layers: list[nn.Module] = []
    c_in = 1
    for c_out in args.channels:
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2)]
        c_in = c_out
    layers.append(nn.Flatten())
    width = c_in * (8 // 2 ** len(args.channels)) ** 2
    for j, d in enumerate(args.dense):
        layers.append(nn.Linear(width, d))
        if j < len(args.dense) - 1:
            layers.append(nn.Tanh())
        width = d
    net = nn.Sequential(*layers)
    ours_layers = [m for m in net if isinstance(m, nn.Conv2d | nn.Linear)]
    order = []
    with torch.no_grad():
        for m, p in zip(ours_layers, params):
            m.weight.copy_(p["w"])
            m.bias.copy_(p["b"])
            order += [m.bias, m.weight]  # our leaves in canonical (sorted-key) order
    x, y = batch
    if not torch.allclose(net(x), model.apply(params, x), atol=1e-5):
        raise RuntimeError("the nn.Sequential does not reproduce the ConvNet")
    op = GGNLinearOperator(net, nn.CrossEntropyLoss(), order, [(x, y)], progressbar=False,
                           check_deterministic=False)
    n = int(ours.shape[0])
    eye = torch.eye(n, dtype=x.dtype)
    peer_s, theirs = _median_s(lambda: op @ eye, sync, args.warmup, args.repeats)
    theirs = theirs.detach().numpy() if hasattr(theirs, "detach") else np.asarray(theirs)
    a = ours.detach().numpy()
    return {"curvlinops_to_dense_s": peer_s,
            "to_dense_over_curvlinops": None,  # filled by the caller, which has ours
            "curvlinops_relative_difference": float(np.abs(a - theirs).max()
                                                    / np.abs(theirs).max())}


def main() -> None:
    p = parser(__doc__, "spectral", batch=128, warmup=1, repeats=3)
    p.set_defaults(backends="torch,jax")
    p.add_argument("--channels", type=int, nargs="+", default=[8, 16],
                   help="output channels of the conv blocks (default: 8 16)")
    p.add_argument("--dense", type=int, nargs="+", default=[10],
                   help="sizes of the dense layers after the conv blocks (default: 10)")
    p.add_argument("--chunk", type=int, default=256,
                   help="columns per vmapped call in to_dense (default: 256)")
    p.add_argument("--columns", action="store_true",
                   help="also time to_dense one column at a time (slow)")
    p.add_argument("--peers", action="store_true",
                   help="also materialise curvlinops' GGN of the same network (torch; needs "
                   "the bench-peers nox session, which installs curvlinops)")
    args = p.parse_args()
    results: dict[str, Any] = {"problem": {
        "data": "sklearn digits 8x8", "batch": args.batch, "channels": args.channels,
        "dense": args.dense, "dtype": "float32", "threads": args.threads}}
    for name in installed(args.backends, results):
        results[name] = run_backend(name, args)
        print(name, results[name], flush=True)
    write_json(args.json, results)


if __name__ == "__main__":
    main()
