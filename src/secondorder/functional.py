"""Numerically stable elementwise functions over the array namespace, shared by losses and
layers: sigmoid and softplus without overflow, and the rectifier."""

from __future__ import annotations

from typing import Any

from .backends import namespace

Array = Any


def relu(x: Array) -> Array:
    """max(x, 0)."""
    xp = namespace(x)
    return xp.where(x > 0, x, xp.zeros_like(x))


def sigmoid(x: Array) -> Array:
    """1 / (1 + exp(-x)), through exp(-|x|) in both branches so nothing overflows."""
    xp = namespace(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def softplus(x: Array) -> Array:
    """log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|))."""
    xp = namespace(x)
    return xp.where(x > 0, x, xp.zeros_like(x)) + xp.log1p(xp.exp(-xp.abs(x)))
