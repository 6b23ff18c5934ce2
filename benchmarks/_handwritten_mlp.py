"""What the hand-written Shampoo and TNT of the benchmarks share, in arithmetic that torch
tensors and JAX arrays both take (``@``, ``.T``): the MLP's forward pass on the reference
models' ``[{"w": (d_out, d_in), "b": (d_out,)}, ...]`` layers, the per-layer Gram statistics of
a gradient (weight: G G^T and G^T G; bias: g g^T), their moving average and the step
W <- W - alpha L m R, b <- b - alpha B m_b with per-layer matrices (L, R, B)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def logits(layers: Sequence[dict[str, Any]], x: Any, act: Callable[[Any], Any]) -> Any:
    """a_l = act(a_{l-1} W_l^T + b_l), no activation after the last layer."""
    a = x
    for i, layer in enumerate(layers):
        a = a @ layer["w"].T + layer["b"]
        a = act(a) if i + 1 < len(layers) else a
    return a


def as_layers(leaves: Sequence[Any]) -> list[dict[str, Any]]:
    """The flat ``[w_1, b_1, w_2, b_2, ...]`` (what torch's autograd differentiates) as
    layers."""
    return [{"w": w, "b": b} for w, b in zip(leaves[0::2], leaves[1::2])]


def gram_statistics(grads: Sequence[dict[str, Any]], outer: Callable[[Any, Any], Any]
                    ) -> list[tuple[Any, Any, Any]]:
    """(G G^T, G^T G, g g^T) of every layer's weight gradient G and bias gradient g."""
    return [(g["w"] @ g["w"].T, g["w"].T @ g["w"], outer(g["b"], g["b"])) for g in grads]


def moving_average(old: Sequence[tuple[Any, ...]], new: Sequence[tuple[Any, ...]], beta: Any
                   ) -> list[tuple[Any, ...]]:
    """beta old + (1 - beta) new, factor by factor."""
    return [tuple(beta * s + (1 - beta) * n for s, n in zip(o, b)) for o, b in zip(old, new)]


def kronecker_step(layers: Sequence[dict[str, Any]], momentum: Sequence[dict[str, Any]],
                   matrices: Sequence[tuple[Any, Any, Any]], lr: float
                   ) -> list[dict[str, Any]]:
    """W - lr L m_W R and b - lr B m_b for every layer's (L, R, B)."""
    return [{"w": layer["w"] - lr * (left @ m["w"] @ right), "b": layer["b"] - lr * (bias @ m["b"])}
            for (left, right, bias), m, layer in zip(matrices, momentum, layers)]


def factor_sizes(params: Sequence[dict[str, Any]]) -> list[tuple[int, int, int]]:
    """(d_out, d_in, d_out): the sizes of every layer's three factors."""
    return [(p["w"].shape[0], p["w"].shape[1], p["w"].shape[0]) for p in params]
