"""K-FAC on an MLP written directly in the framework (torch eager autograd, jitted JAX), the
reference outside the library for ``benchmarks/kronecker.py``: what a user would write by hand
for the same algorithm, with no library in between.

The algorithm is :class:`secondorder.optim.KFAC`'s with a fixed learning rate (K-FAC paper,
Martens and Grosse 2015; Algorithm 12 of Y. Ren's thesis), on the dense layers
h_l = W_l a_{l-1} + b_l of an MLP with ``activation`` between them (the reference models'
``[{"w": (d_out, d_in), "b": (d_out,)}, ...]`` parameters); at step k on the batch (x, y)::

    every T1 steps:  Omega_l^ = (1/m) sum_i a~_i a~_i^T   (a~ = (a, 1)),
                     Gamma_l^ = (1/m) sum_i Dh_i Dh_i^T   (Dh = d loss_i(y~_i) / d h_l,
                         y~ sampled from the softmax (mode "mc") or the labels ("empirical")),
                     moving averages with decay beta (the first update takes the batch value);
    every T2 steps:  H_Omega = (Omega + pi sqrt(lambda) I)^{-1},
                     H_Gamma = (Gamma + sqrt(lambda)/pi I)^{-1} by Cholesky,
                     pi = sqrt((tr Omega / dim Omega) / (tr Gamma / dim Gamma));
    every step:      m <- mu m + g,  [W b] <- [W b] - alpha H_Gamma [m_W m_b] H_Omega.

The statistics reuse the step's own forward pass (one extra backward pass for the sampled
targets), the least work the algorithm allows. ``tests/test_handwritten.py`` checks that
these steps are the library's to 1e-10 in float64 (``mode="empirical"``, whose targets are
deterministic).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

LR, MOMENTUM, DAMPING, DECAY = 0.01, 0.9, 1e-3, 0.9


def torch_kfac(params: list[dict[str, Any]], x: Any, y: Any, *, activation: str = "tanh",
               statistics_interval: int = 10, inverse_interval: int = 100,
               mode: str = "mc", seed: int = 0
               ) -> tuple[Callable[[Any], Any], Any]:
    """``(step, carry)``: ``step(carry) -> carry`` is one K-FAC step in eager torch; the
    parameters after it are ``carry[1]``."""
    import torch
    import torch.nn.functional as F  # noqa: N812 - the usual torch alias

    act = getattr(torch, activation)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    m = x.shape[0]
    ones = torch.ones((m, 1), dtype=x.dtype, device=x.device)

    def step(carry: Any) -> Any:
        count, w, mom, factors, inverses = carry
        leaves = [t.detach().requires_grad_() for layer in w for t in (layer["w"], layer["b"])]
        a, inputs, pre = x, [], []
        for i in range(0, len(leaves), 2):
            inputs.append(a)
            h = a @ leaves[i].T + leaves[i + 1]
            pre.append(h)
            a = act(h) if i + 2 < len(leaves) else h
        loss = F.cross_entropy(a, y)
        if count % statistics_interval == 0:
            if mode == "mc":
                with torch.no_grad():
                    targets = torch.multinomial(torch.softmax(a, 1), 1, generator=generator)[:, 0]
            else:
                targets = y
            dh = torch.autograd.grad(F.cross_entropy(a, targets, reduction="sum"), pre,
                                     retain_graph=True)
            with torch.no_grad():
                batch = []
                for inp, d in zip(inputs, dh):
                    at = torch.cat([inp, ones], 1)
                    batch.append((d.T @ d / m, at.T @ at / m))
                factors = batch if count == 0 else [
                    (DECAY * g + (1 - DECAY) * gb, DECAY * o + (1 - DECAY) * ob)
                    for (g, o), (gb, ob) in zip(factors, batch)]
        grads = torch.autograd.grad(loss, leaves)
        with torch.no_grad():
            if count % inverse_interval == 0:
                inverses = [_torch_damped_inverses(g, o) for g, o in factors]
            mom = [MOMENTUM * b + g for b, g in zip(mom, grads)]
            new = []
            for (hg, ho), mw, mb, layer in zip(inverses, mom[0::2], mom[1::2], w):
                p = hg @ torch.cat([mw, mb[:, None]], 1) @ ho
                new.append({"w": layer["w"] - LR * p[:, :-1], "b": layer["b"] - LR * p[:, -1]})
        return count + 1, new, mom, factors, inverses

    mom = [torch.zeros_like(t) for layer in params for t in (layer["w"], layer["b"])]
    return step, (0, params, mom, None, None)


def _torch_damped_inverses(g: Any, o: Any) -> tuple[Any, Any]:
    import torch

    pi = torch.sqrt((torch.trace(o) / o.shape[0]) / (torch.trace(g) / g.shape[0]))
    root = DAMPING ** 0.5
    eye_g = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    eye_o = torch.eye(o.shape[0], dtype=o.dtype, device=o.device)
    return (torch.cholesky_inverse(torch.linalg.cholesky(g + root / pi * eye_g)),
            torch.cholesky_inverse(torch.linalg.cholesky(o + pi * root * eye_o)))


def jax_kfac(params: list[dict[str, Any]], x: Any, y: Any, *, activation: str = "tanh",
             statistics_interval: int = 10, inverse_interval: int = 100,
             mode: str = "mc", seed: int = 0
             ) -> tuple[Callable[[Any], Any], Any]:
    """``(step, carry)``: ``step(carry) -> carry`` is one jitted K-FAC step, its periodic
    work under ``lax.cond``; the parameters after it are ``carry[1]``."""
    import jax
    import jax.numpy as jnp

    act = getattr(jnp, activation)
    m = x.shape[0]

    def forward(w: Any, xb: Any, shifts: list[Any]) -> tuple[Any, list[Any]]:
        """The logits, and every layer's input; ``shifts`` are added to the pre-activations
        (zeros: their gradients are the Dh)."""
        a, inputs = xb, []
        for i, (layer, s) in enumerate(zip(w, shifts)):
            inputs.append(a)
            h = a @ layer["w"].T + layer["b"] + s
            a = act(h) if i + 1 < len(w) else h
        return a, inputs

    def nll(logits: Any, labels: Any) -> Any:
        return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

    def statistics(w: Any, xb: Any, yb: Any, factors: Any, count: Any, key: Any) -> Any:
        shifts = [jnp.zeros((m, layer["b"].shape[0]), xb.dtype) for layer in w]
        logits, inputs = forward(w, xb, shifts)
        targets = jax.random.categorical(key, logits) if mode == "mc" else yb
        dh = jax.grad(lambda s: nll(forward(w, xb, s)[0], targets))(shifts)
        ones = jnp.ones((m, 1), xb.dtype)
        batch = []
        for a, d in zip(inputs, dh):
            at = jnp.concatenate([a, ones], 1)
            batch.append((d.T @ d / m, at.T @ at / m))
        beta = jnp.where(count == 0, 0.0, DECAY).astype(xb.dtype)
        return [(beta * g + (1 - beta) * gb, beta * o + (1 - beta) * ob)
                for (g, o), (gb, ob) in zip(factors, batch)]

    def inverses_of(factors: Any) -> Any:
        out = []
        for g, o in factors:
            pi = jnp.sqrt((jnp.trace(o) / o.shape[0]) / (jnp.trace(g) / g.shape[0]))
            root = DAMPING ** 0.5
            out.append(tuple(jax.scipy.linalg.cho_solve(
                (jnp.linalg.cholesky(f + d * jnp.eye(f.shape[0], dtype=f.dtype)), True),
                jnp.eye(f.shape[0], dtype=f.dtype)) for f, d in ((g, root / pi), (o, pi * root))))
        return out

    @jax.jit
    def jitted(carry: Any, xb: Any, yb: Any) -> Any:
        count, w, mom, factors, inverses, key = carry
        key, sub = jax.random.split(key)
        factors = jax.lax.cond(count % statistics_interval == 0,
                               lambda f: statistics(w, xb, yb, f, count, sub), lambda f: f,
                               factors)
        inverses = jax.lax.cond(count % inverse_interval == 0, inverses_of, lambda f: inverses,
                                factors)
        shifts = [jnp.zeros((), xb.dtype) for _ in w]
        grads = jax.grad(lambda v: nll(forward(v, xb, shifts)[0], yb) / m)(w)
        mom = jax.tree_util.tree_map(lambda b, g: MOMENTUM * b + g, mom, grads)
        new = []
        for (hg, ho), mb, layer in zip(inverses, mom, w):
            p = hg @ jnp.concatenate([mb["w"], mb["b"][:, None]], 1) @ ho
            new.append({"w": layer["w"] - LR * p[:, :-1], "b": layer["b"] - LR * p[:, -1]})
        return count + 1, new, mom, factors, inverses, key

    def step(carry: Any) -> Any:  # the batch is an argument of the jitted step, not a constant
        return jitted(carry, x, y)

    def blocks_like(make: Callable[[int], Any]) -> list[tuple[Any, Any]]:
        return [(make(layer["w"].shape[0]), make(layer["w"].shape[1] + 1)) for layer in params]

    zeros = blocks_like(lambda d: jnp.zeros((d, d), x.dtype))
    mom = jax.tree_util.tree_map(jnp.zeros_like, params)
    return step, (jnp.asarray(0), params, mom, zeros, zeros, jax.random.PRNGKey(seed))
