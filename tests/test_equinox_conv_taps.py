"""Layer taps on equinox convolutions (``eqx.nn.Conv1d``, ``Conv2d``, ``Conv3d``).

References: the tap identity (sum_i sum_t delta_it a~_it^T, from the taps, is the gradient of
the summed loss with respect to [W b], which ``jax.grad`` computes from the module itself) for
every padding the layer takes; and the reference ConvNet with the same weights, whose K-FAC
factors, K-FAC operator and K-FAC and K-BFGS steps the equinox network must reproduce (its conv
bias is a (C_out, 1, 1) leaf, the reference's a (C_out,) vector).
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
eqx = pytest.importorskip("equinox")
jnp = jax.numpy

from secondorder import curvature, tree  # noqa: E402
from secondorder.curvature import kronecker_factors  # noqa: E402
from secondorder.curvature.kfac import layer_statistics  # noqa: E402
from secondorder.losses import SoftmaxCrossEntropy  # noqa: E402
from secondorder.models import ConvNet, from_equinox  # noqa: E402
from secondorder.optim import KBFGS, KFAC, SMWNG  # noqa: E402

F64 = jnp.float64
LOSS = SoftmaxCrossEntropy()


def max_diff(a, b) -> float:
    return float(jnp.max(jnp.abs(jnp.asarray(a) - jnp.asarray(b))))


class Head(eqx.Module):
    """One convolution, tanh, a mean over the positions, a Linear."""

    conv: eqx.nn.Conv
    out: eqx.nn.Linear

    def __init__(self, dims: int, key, **conv):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv(dims, 2, 3, dtype=F64, key=k1, **conv)
        self.out = eqx.nn.Linear(3, 4, dtype=F64, key=k2)

    def __call__(self, x):
        a = jnp.tanh(self.conv(x))
        return self.out(a.reshape(a.shape[0], -1).mean(axis=1))


CONVS = [
    (1, {"kernel_size": 3, "padding": 1}),
    (1, {"kernel_size": 4, "padding": "SAME"}),
    (1, {"kernel_size": 3, "padding": 2, "padding_mode": "REFLECT", "use_bias": False}),
    (2, {"kernel_size": 3, "stride": 2, "dilation": 2}),
    (2, {"kernel_size": (2, 3), "padding": 1, "padding_mode": "CIRCULAR"}),
    (3, {"kernel_size": 2, "padding": ((0, 1), (1, 0), (1, 1))}),
]


@pytest.mark.parametrize(("dims", "conv"), CONVS, ids=lambda c: str(c))
def test_equinox_conv_taps_give_the_layer_gradients(dims, conv):
    rng = np.random.default_rng(dims)
    net = Head(dims, jax.random.key(dims), **conv)
    x = jnp.asarray(rng.standard_normal((5, 2, *(7,) * dims)))
    y = jnp.asarray(rng.integers(0, 4, 5))
    model, params = from_equinox(net)
    assert [layer.kind for layer in model.layers] == ["conv", "dense"]
    _, pairs = layer_statistics(model, params, x, lambda f: [LOSS.grad(f, y)],
                                lambda i, a, ds: (a, ds[0]))
    got = [d.reshape(-1, d.shape[-1]).T @ a.reshape(-1, a.shape[-1]) for a, d in pairs]

    def total(p):
        logits = model.apply(p, x)
        return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    grads = model.to_module(jax.grad(total)(params))
    for g, layer in zip(got, (grads.conv, grads.out), strict=True):
        w = layer.weight.reshape(layer.weight.shape[0], -1)
        want = w if layer.bias is None else jnp.concatenate(
            [w, layer.bias.reshape(-1, 1)], axis=1)
        assert g.shape == want.shape
        assert max_diff(g, want) < 1e-12


class Twin(eqx.Module):
    """ConvNet((2, 6, 6), channels=(3,), dense=(4, 3)) in equinox: conv, silu, 2 x 2 average
    pool, flattened channel-major, dense, silu, dense."""

    conv: eqx.nn.Conv2d
    pool: eqx.nn.AvgPool2d
    hidden: eqx.nn.Linear
    out: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv = eqx.nn.Conv2d(2, 3, 3, padding=1, dtype=F64, key=k1)
        self.pool = eqx.nn.AvgPool2d(2, 2)
        self.hidden = eqx.nn.Linear(27, 4, dtype=F64, key=k2)
        self.out = eqx.nn.Linear(4, 3, dtype=F64, key=k3)

    def __call__(self, x):
        a = self.pool(jax.nn.silu(self.conv(x))).reshape(-1)
        return self.out(jax.nn.silu(self.hidden(a)))


@pytest.fixture(scope="module")
def twins():
    rng = np.random.default_rng(8)
    x, y = jnp.asarray(rng.standard_normal((9, 2, 6, 6))), jnp.asarray(rng.integers(0, 3, 9))
    net = Twin(jax.random.key(8))
    model, params = from_equinox(net)
    ref = ConvNet((2, 6, 6), channels=(3,), dense=(4, 3))
    ref_params = [{"w": net.conv.weight, "b": net.conv.bias.reshape(-1)},
                  {"w": net.hidden.weight, "b": net.hidden.bias},
                  {"w": net.out.weight, "b": net.out.bias}]
    assert max_diff(model.apply(params, x), ref.apply(ref_params, x)) < 1e-14
    return model, params, ref, ref_params, (x, y)


def _as_reference(model, params):
    net = model.to_module(params)
    return [{"w": net.conv.weight, "b": net.conv.bias.reshape(-1)},
            {"w": net.hidden.weight, "b": net.hidden.bias},
            {"w": net.out.weight, "b": net.out.bias}]


def test_equinox_conv_taps_give_the_reference_kfac_factors_and_operator(twins):
    model, params, ref, ref_params, batch = twins
    assert model.tap_shapes(batch[0]) == ref.tap_shapes(batch[0])
    got = kronecker_factors(model, LOSS, params, batch)
    want = kronecker_factors(ref, LOSS, ref_params, batch)
    for g, w in zip(got, want, strict=True):
        assert max_diff(g.A, w.A) < 1e-12 and max_diff(g.G, w.G) < 1e-12
    v = tree.tree_map(lambda a: jnp.cos(jnp.arange(a.size, dtype=F64)).reshape(a.shape), params)
    ref_v = _as_reference(model, v)
    op = curvature.KFAC(model, LOSS, params, batch)
    ref_op = curvature.KFAC(ref, LOSS, ref_params, batch)
    for got_v, want_v in ((op @ v, ref_op @ ref_v),
                          (op.damped_inverse(0.1) @ v, ref_op.damped_inverse(0.1) @ ref_v)):
        assert tree.leaves(got_v)[1].shape == (3, 1, 1)  # the bias keeps equinox's shape
        for g, w in zip(tree.leaves(_as_reference(model, got_v)), tree.leaves(want_v),
                        strict=True):
            assert max_diff(g, w) < 1e-12


@pytest.mark.parametrize("method", [KFAC, KBFGS, SMWNG])
def test_equinox_conv_net_steps_as_the_reference_convnet(twins, method):
    """Three steps of K-FAC (exact factors, statistics and inverses every step), K-BFGS and
    SMW-NG (its Gram matrix from the taps), float64, under jax.jit: the equinox network and the
    reference ConvNet take the same steps."""
    model, params, ref, ref_params, batch = twins
    options = ({"lr": 0.2, "mode": "exact", "statistics_interval": 1, "inverse_interval": 1}
               if method is KFAC else {"lr": 0.2})
    runs = []
    for m, p in ((model, params), (ref, ref_params)):
        opt = method(m, LOSS, **options)
        state, step = opt.init(p), jax.jit(opt.step)
        for _ in range(3):
            p, state, info = step(p, state, batch)
        assert bool(info.finite)
        runs.append(p)
    got, want = _as_reference(model, runs[0]), runs[1]
    assert runs[0].conv.bias.shape == (3, 1, 1)
    scale = max(float(jnp.max(jnp.abs(leaf))) for leaf in tree.leaves(want))
    for g, w in zip(tree.leaves(got), tree.leaves(want), strict=True):
        assert max_diff(g, w) < 1e-12 * scale
