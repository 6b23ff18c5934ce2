"""An equinox network with state and randomness for the equinox tests (imported after their
``pytest.importorskip("equinox")``): Linear, BatchNorm (EMA, axis "batch"), tanh, Dropout 0.25,
Linear, in float64."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp


class BNNet(eqx.Module):
    first: eqx.nn.Linear
    norm: eqx.nn.BatchNorm
    drop: eqx.nn.Dropout
    last: eqx.nn.Linear

    def __init__(self, key: jax.Array, d_in: int, d_out: int, width: int = 6,
                 rate: float = 0.25):
        k1, k2 = jax.random.split(key)
        self.first = eqx.nn.Linear(d_in, width, dtype=jnp.float64, key=k1)
        self.norm = eqx.nn.BatchNorm(width, axis_name="batch", momentum=0.9,
                                     dtype=jnp.float64, mode="ema")
        self.drop = eqx.nn.Dropout(rate)
        self.last = eqx.nn.Linear(width, d_out, dtype=jnp.float64, key=k2)

    def __call__(self, x: jax.Array, state: eqx.nn.State, *, key: jax.Array) -> tuple:
        h, state = self.norm(self.first(x), state)
        return self.last(self.drop(jnp.tanh(h), key=key)), state
