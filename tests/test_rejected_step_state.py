"""A rejected step keeps the model's running statistics: ``make_step`` of the flax (linen),
nnx and equinox adapters on a batch with a NaN returns the collections / state it was given,
bit for bit, as it returns the old parameters; the next finite step updates them as a step
from that state does. The reference is the adapters' own ``update_collections`` /
``update_state`` on the finite batch, from the same starting state."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
pytest.importorskip("flax")
eqx = pytest.importorskip("equinox")
import flax.linen as nn  # noqa: E402
from flax import nnx  # noqa: E402

from secondorder.losses import SoftmaxCrossEntropy  # noqa: E402
from secondorder.models import from_equinox, from_flax, from_nnx  # noqa: E402
from secondorder.optim import KFAC  # noqa: E402

X = jax.random.normal(jax.random.key(0), (16, 5), dtype=jnp.float32)
Y = jax.random.randint(jax.random.key(1), (16,), 0, 3)
X_NAN = X.at[0, 0].set(jnp.nan)


class _Linen(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
        return nn.Dense(3)(nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x)))


class _Nnx(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(5, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.b = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.b(self.bn(self.a(x)))


class _Eqx(eqx.Module):
    a: eqx.nn.Linear
    bn: eqx.nn.BatchNorm
    b: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.a = eqx.nn.Linear(5, 8, key=k1)
        self.bn = eqx.nn.BatchNorm(8, "batch", mode="batch")
        self.b = eqx.nn.Linear(8, 3, key=k2)

    def __call__(self, x, state):
        h, state = self.bn(self.a(x), state)
        return self.b(h), state


def _model(kind):
    """(model, params, starting collections / state, update function of the adapter)."""
    if kind == "linen":
        module = _Linen()
        variables = module.init(jax.random.key(2), X, train=False)
        model, params = from_flax(module, variables, kwargs={"train": True}, example=X)
        return model, params, model.collections, model.update_collections
    if kind == "nnx":
        model, params = from_nnx(_Nnx(nnx.Rngs(0)), example=X)
        return model, params, model.state, model.update_state
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net, state = eqx.nn.make_with_state(_Eqx)(jax.random.key(3))
    model, params = from_equinox(net, state)
    return model, params, model.state, model.update_state


def _same(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(
        np.array_equal(np.asarray(u), np.asarray(v), equal_nan=True) for u, v in zip(la, lb))


@pytest.mark.parametrize("kind", ["linen", "nnx", "equinox"])
def test_a_rejected_step_keeps_the_running_statistics(kind):
    model, params, start, update = _model(kind)
    dtype = jax.tree_util.tree_leaves(params)[0].dtype  # equinox follows jax_enable_x64
    x, x_nan = X.astype(dtype), X_NAN.astype(dtype)
    opt = KFAC(model, SoftmaxCrossEntropy(), lr=0.1, damping=0.1)
    step = model.make_step(opt)
    state = opt.init(params)
    new_params, state, kept, info = step(params, state, start, (x_nan, Y))
    assert not bool(info.finite)
    assert _same(new_params, params)
    assert _same(kept, start)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(kept)
               if jnp.issubdtype(leaf.dtype, jnp.floating))
    _, _, after, info = step(new_params, state, kept, (x, Y))
    assert bool(info.finite)
    inputs = (model.inputs(x, collections=kept) if kind == "linen"
              else model.inputs(x, state=kept))
    assert _same(after, update(new_params, inputs))
    assert not _same(after, kept)


def test_frozen_variables_and_default_collections_are_kept_on_a_rejected_step():
    """Variables given as a FrozenDict (flax.core.freeze, older flax): the step's collections
    are plain dicts, the old ones frozen; leaves are matched by key path, and make_step with
    collections=None (the model's defaults) keeps them on a rejected step as well."""
    from flax.core import freeze

    module = _Linen()
    variables = freeze(module.init(jax.random.key(2), X, train=False))
    model, params = from_flax(module, variables, kwargs={"train": True}, example=X)
    opt = KFAC(model, SoftmaxCrossEntropy(), lr=0.1, damping=0.1)
    step = model.make_step(opt)
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    start = model.collections
    for collections in (None, start):
        _, _, kept, info = step(params, opt.init(params), collections,
                                (X_NAN.astype(dtype), Y))
        assert not bool(info.finite) and _same(kept, start)
        _, _, after, info = step(params, opt.init(params), collections, (X.astype(dtype), Y))
        assert bool(info.finite)
        assert _same(after, model.update_collections(params, model.inputs(X.astype(dtype))))
