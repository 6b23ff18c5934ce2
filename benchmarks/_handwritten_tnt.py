"""TNT on an MLP written directly in the framework (torch eager autograd, jitted JAX), the
reference outside the library for ``benchmarks/kronecker.py``: the algorithm of
:class:`secondorder.optim.TNT` with its defaults' structure (Algorithm 15 of Y. Ren's thesis;
Ren and Goldfarb 2021), every weight W (d_out x d_in, k = 2) and bias b (k = 1) its own block.
At step t with g the gradient of the mean loss::

    if t % T1 == 0:  y~ sampled from the softmax at the batch,
                     G = sqrt(m) x the gradient of the mean loss at y~ (the sampled gradient,
                     the library's default ``fisher_estimate="per_example"``),
                     E_1 <- beta E_1 + (1 - beta) G G^T,  E_2 <- beta E_2 + (1 - beta) G^T G
                     (a bias: E_1 only; the first update takes the batch value)
    if t % T2 == 0:  U~_i = E_i / (c0^{k-1} prod_{j != i} d_j),  c0 = (tr E / prod_j d_j)^{1/k}
                     (the normalisation (4.10)),  C_i = (U~_i + eps I)^{-1} by Cholesky
    m <- mu m + g,   W <- W - alpha C_1 m C_2   (a bias: b <- b - alpha C_1 m)

The targets are drawn by ``draw(key, logits) -> (key, labels)`` (default: the framework's own
random numbers; ``tests/test_handwritten.py`` passes the library's keys and checks that these
steps are the library's to 1e-10 in float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import _handwritten_mlp as mlp

LR, MOMENTUM, BETA, EPS = 0.01, 0.9, 0.9, 0.01


def _normalised(factors: list[Any], trace: Callable[[Any], Any]) -> list[Any]:
    """(4.10) for the factors of one k-way block (framework-neutral arithmetic)."""
    k = len(factors)
    dims = [f.shape[0] for f in factors]
    total = 1
    for d in dims:
        total *= d
    c0 = (sum(trace(f) for f in factors) / k / total) ** (1.0 / k)
    return [f / (c0 ** (k - 1) * (total // d)) for f, d in zip(factors, dims)]


def _inverses(stats: Any, inverse: Callable[[Any], Any], trace: Callable[[Any], Any]) -> Any:
    """(C_1, C_2, C_b) of every layer from its statistics."""
    out = []
    for left, right, bias in stats:
        pair = _normalised([left, right], trace)
        out.append((inverse(pair[0]), inverse(pair[1]), inverse(_normalised([bias], trace)[0])))
    return out


def torch_tnt(params: list[dict[str, Any]], x: Any, y: Any, *, activation: str = "tanh",
              statistics_interval: int = 10, inverse_interval: int = 100, eps: float = EPS,
              seed: int = 0, draw: Callable[[Any, Any], tuple[Any, Any]] | None = None,
              key: Any = None) -> tuple[Callable[[Any], Any], Any]:
    """``(step, carry)``: ``step(carry) -> carry`` is one TNT step in eager torch; the
    parameters after it are ``carry[1]``."""
    import torch
    import torch.nn.functional as F  # noqa: N812 - the usual torch alias

    act = getattr(torch, activation)
    if draw is None:
        key = torch.Generator(device=x.device).manual_seed(seed)

        def draw(generator: Any, logits: Any) -> tuple[Any, Any]:
            labels = torch.multinomial(torch.softmax(logits, 1), 1, generator=generator)[:, 0]
            return generator, labels

    def inverse(f: Any) -> Any:
        eye = torch.eye(f.shape[0], dtype=f.dtype, device=f.device)
        return torch.cholesky_inverse(torch.linalg.cholesky(f + eps * eye))

    def step(carry: Any) -> Any:
        count, w, mom, stats, inverses, k = carry
        leaves = [t.detach().requires_grad_() for layer in w for t in (layer["w"], layer["b"])]
        a = mlp.logits(mlp.as_layers(leaves), x, act)
        if count % statistics_interval == 0:
            k, targets = draw(k, a.detach())
            sampled = torch.autograd.grad(F.cross_entropy(a, targets) * math.sqrt(x.shape[0]),
                                          leaves, retain_graph=True)
            with torch.no_grad():
                batch = mlp.gram_statistics(mlp.as_layers(sampled), torch.outer)
                stats = batch if count == 0 else mlp.moving_average(stats, batch, BETA)
        grads = mlp.as_layers(torch.autograd.grad(F.cross_entropy(a, y), leaves))
        with torch.no_grad():
            if count % inverse_interval == 0:
                inverses = _inverses(stats, inverse, torch.trace)
            mom = [{n: MOMENTUM * m[n] + g[n] for n in m} for m, g in zip(mom, grads)]
            new = mlp.kronecker_step(w, mom, inverses, LR)
        return count + 1, new, mom, stats, inverses, k

    mom = [{n: torch.zeros_like(t) for n, t in layer.items()} for layer in params]
    return step, (0, params, mom, None, None, key)


def jax_tnt(params: list[dict[str, Any]], x: Any, y: Any, *, activation: str = "tanh",
            statistics_interval: int = 10, inverse_interval: int = 100, eps: float = EPS,
            seed: int = 0, draw: Callable[[Any, Any], tuple[Any, Any]] | None = None,
            key: Any = None) -> tuple[Callable[[Any], Any], Any]:
    """``(step, carry)``: ``step(carry) -> carry`` is one jitted TNT step, its periodic work
    under ``lax.cond``; the parameters after it are ``carry[1]``."""
    import jax
    import jax.numpy as jnp

    act = getattr(jnp, activation)
    m = x.shape[0]
    if draw is None:
        key = jax.random.PRNGKey(seed)

        def draw(k: Any, logits: Any) -> tuple[Any, Any]:
            k, sub = jax.random.split(k)
            return k, jax.random.categorical(sub, logits)

    def mean_nll(w: Any, xb: Any, labels: Any) -> Any:
        logp = jax.nn.log_softmax(mlp.logits(w, xb, act))
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], 1))

    def statistics(carry: tuple[Any, Any], w: Any, xb: Any, count: Any) -> tuple[Any, Any]:
        stats, k = carry
        k, targets = draw(k, mlp.logits(w, xb, act))
        sampled = jax.grad(lambda v: mean_nll(v, xb, targets) * math.sqrt(m))(w)
        beta = jnp.where(count == 0, 0.0, BETA).astype(xb.dtype)
        return mlp.moving_average(stats, mlp.gram_statistics(sampled, jnp.outer), beta), k

    def inverse(f: Any) -> Any:
        eye = jnp.eye(f.shape[0], dtype=f.dtype)
        return jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(f + eps * eye), True), eye)

    @jax.jit
    def jitted(carry: Any, xb: Any, yb: Any) -> Any:
        count, w, mom, stats, inverses, k = carry
        stats, k = jax.lax.cond(count % statistics_interval == 0,
                                lambda c: statistics(c, w, xb, count), lambda c: c, (stats, k))
        inverses = jax.lax.cond(count % inverse_interval == 0,
                                lambda s: _inverses(s, inverse, jnp.trace), lambda s: inverses,
                                stats)
        grads = jax.grad(mean_nll)(w, xb, yb)
        mom = jax.tree_util.tree_map(lambda b, g: MOMENTUM * b + g, mom, grads)
        return count + 1, mlp.kronecker_step(w, mom, inverses, LR), mom, stats, inverses, k

    def step(carry: Any) -> Any:  # the batch is an argument of the jitted step, not a constant
        return jitted(carry, x, y)

    zeros = [tuple(jnp.zeros((d, d), x.dtype) for d in sizes)
             for sizes in mlp.factor_sizes(params)]
    mom = jax.tree_util.tree_map(jnp.zeros_like, params)
    return step, (jnp.asarray(0), params, mom, zeros, zeros, key)
