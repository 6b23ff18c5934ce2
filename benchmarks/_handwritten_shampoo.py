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

import _handwritten_mlp as mlp

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
        grads = torch.autograd.grad(F.cross_entropy(mlp.logits(mlp.as_layers(leaves), x, act), y),
                                    leaves)
        with torch.no_grad():
            grads = mlp.as_layers(grads)
            if count % statistics_interval == 0:
                batch = mlp.gram_statistics(grads, torch.outer)
                stats = batch if count == 0 else mlp.moving_average(stats, batch, BETA)
            if count % root_interval == 0:
                roots = [(root(left, -0.25), root(right, -0.25), root(bias, -0.5))
                         for left, right, bias in stats]
            mom = [{k: MOMENTUM * m[k] + g[k] for k in m} for m, g in zip(mom, grads)]
            new = mlp.kronecker_step(w, mom, roots, LR)
        return count + 1, new, mom, stats, roots

    mom = [{k: torch.zeros_like(t) for k, t in layer.items()} for layer in params]
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
        logp = jax.nn.log_softmax(mlp.logits(w, xb, act))
        return -jnp.mean(jnp.take_along_axis(logp, yb[:, None], 1))

    def root(f: Any, power: float) -> Any:
        w, q = jnp.linalg.eigh(f)
        return (q * (jnp.maximum(w, 0) + EPS) ** power) @ q.T

    def statistics(stats: Any, grads: Any, count: Any) -> Any:
        beta = jnp.where(count == 0, 0.0, BETA).astype(x.dtype)
        return mlp.moving_average(stats, mlp.gram_statistics(grads, jnp.outer), beta)

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
        return count + 1, mlp.kronecker_step(w, mom, roots, LR), mom, stats, roots

    def step(carry: Any) -> Any:  # the batch is an argument of the jitted step, not a constant
        return jitted(carry, x, y)

    zeros = [tuple(jnp.zeros((d, d), x.dtype) for d in sizes)
             for sizes in mlp.factor_sizes(params)]
    mom = jax.tree_util.tree_map(jnp.zeros_like, params)
    return step, (jnp.asarray(0), params, mom, zeros, zeros)
