"""Shampoo on an MLP written directly in the framework (torch eager autograd, jitted JAX), the
reference outside the library for ``benchmarks/kronecker.py``: the same algorithm as
:class:`secondorder.optim.Shampoo` without grafting or weight decay (Algorithm 16 of Y. Ren's
thesis; Gupta, Koren and Singer 2018), with the tensors no longer than the block size, so one
block each. For every weight W (d_out x d_in, k = 2) and bias b (k = 1), at step t with g the
gradient of the mean loss::

    m <- mu m + g
    if t % T1 == 0:  L <- beta L + (1 - beta) g g^T,  R <- beta R + (1 - beta) g^T g
                     (a bias: L only; the first update takes the batch value)
    if t % T2 == 0:  H_L = (L + eps I)^{-1/(2k)},  H_R = (R + eps I)^{-1/(2k)}
                     by eigendecomposition (eigenvalues clipped at 0, then shifted by eps)
    W <- W - alpha H_L m H_R    (a bias: b <- b - alpha H_L m)

``tests/test_handwritten.py`` checks that these steps are the library's to 1e-10 in
float64.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

LR, MOMENTUM, BETA, EPS = 0.01, 0.9, 0.9, 1e-4


def torch_shampoo(params: list[dict[str, Any]], x: Any, y: Any, *, activation: str = "tanh",
                  statistics_interval: int = 1, root_interval: int = 100
                  ) -> tuple[Callable[[Any], Any], Any]:
    """``(step, carry)``: ``step(carry) -> carry`` is one Shampoo step in eager torch; the
    parameters after it are ``carry[1]``."""
    import torch
    import torch.nn.functional as F  # noqa: N812 - the usual torch alias

    act = getattr(torch, activation)

    def root(f: Any, power: float) -> Any:
        w, q = torch.linalg.eigh(f)
        return (q * (w.clamp(min=0) + EPS) ** power) @ q.T

    def step(carry: Any) -> Any:
        count, w, mom, stats, roots = carry
        leaves = [t.detach().requires_grad_() for layer in w for t in (layer["w"], layer["b"])]
        a = x
        for i in range(0, len(leaves), 2):
            a = a @ leaves[i].T + leaves[i + 1]
            a = act(a) if i + 2 < len(leaves) else a
        grads = torch.autograd.grad(F.cross_entropy(a, y), leaves)
        with torch.no_grad():
            if count % statistics_interval == 0:
                batch = []
                for gw, gb in zip(grads[0::2], grads[1::2]):
                    batch.append((gw @ gw.T, gw.T @ gw, torch.outer(gb, gb)))
                stats = batch if count == 0 else [
                    tuple(BETA * s + (1 - BETA) * n for s, n in zip(old, new))
                    for old, new in zip(stats, batch)]
            if count % root_interval == 0:
                roots = [(root(left, -0.25), root(right, -0.25), root(bias, -0.5))
                         for left, right, bias in stats]
            mom = [MOMENTUM * b + g for b, g in zip(mom, grads)]
            new = [{"w": layer["w"] - LR * (hl @ mw @ hr), "b": layer["b"] - LR * (hb @ mb)}
                   for (hl, hr, hb), mw, mb, layer in zip(roots, mom[0::2], mom[1::2], w)]
        return count + 1, new, mom, stats, roots

    mom = [torch.zeros_like(t) for layer in params for t in (layer["w"], layer["b"])]
    return step, (0, params, mom, None, None)


def jax_shampoo(params: list[dict[str, Any]], x: Any, y: Any, *, activation: str = "tanh",
                statistics_interval: int = 1, root_interval: int = 100
                ) -> tuple[Callable[[Any], Any], Any]:
    """``(step, carry)``: ``step(carry) -> carry`` is one jitted Shampoo step, its periodic
    work under ``lax.cond``; the parameters after it are ``carry[1]``."""
    import jax
    import jax.numpy as jnp

    act = getattr(jnp, activation)

    def objective(w: Any, xb: Any, yb: Any) -> Any:
        a = xb
        for i, layer in enumerate(w):
            a = a @ layer["w"].T + layer["b"]
            a = act(a) if i + 1 < len(w) else a
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(a), yb[:, None], 1))

    def root(f: Any, power: float) -> Any:
        w, q = jnp.linalg.eigh(f)
        return (q * (jnp.maximum(w, 0) + EPS) ** power) @ q.T

    def statistics(stats: Any, grads: Any, count: Any) -> Any:
        beta = jnp.where(count == 0, 0.0, BETA).astype(x.dtype)
        batch = [(g["w"] @ g["w"].T, g["w"].T @ g["w"], jnp.outer(g["b"], g["b"]))
                 for g in grads]
        return [tuple(beta * s + (1 - beta) * n for s, n in zip(old, new))
                for old, new in zip(stats, batch)]

    def roots_of(stats: Any) -> Any:
        return [(root(left, -0.25), root(right, -0.25), root(bias, -0.5))
                for left, right, bias in stats]

    @jax.jit
    def jitted(carry: Any, xb: Any, yb: Any) -> Any:
        count, w, mom, stats, roots = carry
        grads = jax.grad(objective)(w, xb, yb)
        stats = jax.lax.cond(count % statistics_interval == 0,
                             lambda s: statistics(s, grads, count), lambda s: s, stats)
        roots = jax.lax.cond(count % root_interval == 0, roots_of, lambda s: roots, stats)
        mom = jax.tree_util.tree_map(lambda b, g: MOMENTUM * b + g, mom, grads)
        new = [{"w": layer["w"] - LR * (hl @ mb["w"] @ hr), "b": layer["b"] - LR * (hb @ mb["b"])}
               for (hl, hr, hb), mb, layer in zip(roots, mom, w)]
        return count + 1, new, mom, stats, roots

    def step(carry: Any) -> Any:  # the batch is an argument of the jitted step, not a constant
        return jitted(carry, x, y)

    zeros = [tuple(jnp.zeros((d, d), x.dtype) for d in (layer["w"].shape[0],
                                                         layer["w"].shape[1],
                                                         layer["w"].shape[0]))
             for layer in params]
    mom = jax.tree_util.tree_map(jnp.zeros_like, params)
    return step, (jnp.asarray(0), params, mom, zeros, zeros)
