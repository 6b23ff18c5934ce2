"""Layer taps on equinox models (``from_equinox``): K-FAC's factors of every ``eqx.nn.Linear``
against the secondorder reference MLP with the same weights and against hand-built inputs, under
``jax.jit``, with BatchNorm state and dropout keys, and the named errors for what taps cannot
take (a layer called twice, never, or under the model's own vmap; ``batched=True``)."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
eqx = pytest.importorskip("equinox")
jnp = jax.numpy

from equinox_nets import BNNet  # noqa: E402
from secondorder.curvature import kronecker_factors  # noqa: E402
from secondorder.errors import StructureError  # noqa: E402
from secondorder.losses import MSE  # noqa: E402
from secondorder.models import MLP, LayerInfo, from_equinox  # noqa: E402

F64 = jnp.float64
KEY = jax.random.key(0)


def jitted_factors(model, params, batch, mode="exact"):
    """[(A, G)] of every tapped layer, computed inside one jax.jit."""
    def run(p, x, y):
        return [(f.A, f.G) for f in kronecker_factors(model, MSE(), p, (x, y), mode=mode)]

    return jax.jit(run)(params, *batch)


def max_diff(a, b) -> float:
    return float(jnp.max(jnp.abs(a - b)))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(3)
    return jnp.asarray(rng.standard_normal((7, 4))), jnp.asarray(rng.standard_normal((7, 3)))


def test_equinox_mlp_taps_give_the_reference_kfac_factors(batch):
    x, y = batch
    net = eqx.nn.MLP(4, 3, 5, 2, activation=jnp.tanh, dtype=F64, key=KEY)
    model, params = from_equinox(net)
    ref, ref_params = MLP([4, 5, 5, 3]), [{"w": lin.weight, "b": lin.bias} for lin in net.layers]
    # equinox's leaf order: weight then bias, layer by layer
    assert model.layers == (LayerInfo("dense", 0, 1, 4, 5), LayerInfo("dense", 2, 3, 5, 5),
                            LayerInfo("dense", 4, 5, 5, 3))
    assert model.tap_shapes(x) == ref.tap_shapes(x) == [(7, 5), (7, 5), (7, 3)]
    got = jitted_factors(model, params, batch)
    want = jitted_factors(ref, ref_params, batch)
    for (a, g), (a_ref, g_ref) in zip(got, want, strict=True):
        assert a.shape == a_ref.shape and g.shape == g_ref.shape
        assert max_diff(a, a_ref) < 1e-12 and max_diff(g, g_ref) < 1e-12
    # the recorded inputs themselves: [x, 1], [tanh(x W0^T + b0), 1], ...
    out, inputs = model.apply(params, x, model.zero_taps(x))
    assert max_diff(out, ref(ref_params, x)) < 1e-14
    h0 = jnp.tanh(x @ net.layers[0].weight.T + net.layers[0].bias)
    ones = jnp.ones((7, 1))
    assert max_diff(inputs[0], jnp.concatenate([x, ones], 1)) == 0.0
    assert max_diff(inputs[1], jnp.concatenate([h0, ones], 1)) < 1e-15


class Reversed(eqx.Module):
    """Fields in the reverse of the call order; the first layer has no bias."""

    out: eqx.nn.Linear
    inp: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.out = eqx.nn.Linear(5, 3, dtype=F64, key=k1)
        self.inp = eqx.nn.Linear(4, 5, use_bias=False, dtype=F64, key=k2)

    def __call__(self, x):
        return self.out(jnp.tanh(self.inp(x)))


def test_taps_follow_the_tree_not_the_call_order(batch):
    x, y = batch
    net = Reversed(KEY)
    model, params = from_equinox(net)
    assert model.layers == (LayerInfo("dense", 0, 1, 5, 3), LayerInfo("dense", 2, None, 4, 5))
    (a_out, g_out), (a_in, g_in) = jitted_factors(model, params, batch, mode="empirical")
    # the reference MLP with a zero first bias computes the same function
    ref = MLP([4, 5, 3])
    ref_params = [{"w": net.inp.weight, "b": jnp.zeros(5, dtype=F64)},
                  {"w": net.out.weight, "b": net.out.bias}]
    (a0, g0), (a1, g1) = jitted_factors(ref, ref_params, batch, mode="empirical")
    assert max_diff(a_in, x.T @ x / 7) < 1e-14  # no bias column
    assert max_diff(a_in, a0[:-1, :-1]) < 1e-12 and max_diff(g_in, g0) < 1e-12
    assert max_diff(a_out, a1) < 1e-12 and max_diff(g_out, g1) < 1e-12




def test_taps_take_the_step_state_and_key(batch):
    """Taps on the step's EquinoxInputs: the batch's BatchNorm statistics and one dropout
    mask (read off equinox's own Dropout with the per-example keys)."""
    x, y = batch
    net, state = eqx.nn.make_with_state(BNNet)(KEY, 4, 3)
    model, params = from_equinox(net, state)
    key = jax.random.key(5)
    inputs = model.inputs(x, key=key)
    (a_first, _), (a_last, _) = jitted_factors(model, params, (inputs, y))
    h = x @ net.first.weight.T + net.first.bias
    h = (h - jnp.mean(h, 0)) / jnp.sqrt(jnp.var(h, 0) + 1e-5)  # weight 1, bias 0 at init
    keys = jax.random.split(key, 7)
    h = jax.vmap(lambda hi, k: net.drop(hi, key=k))(jnp.tanh(h), keys)
    a = jnp.concatenate([h, jnp.ones((7, 1))], axis=1)
    xa = jnp.concatenate([x, jnp.ones((7, 1))], axis=1)
    assert max_diff(a_first, xa.T @ xa / 7) < 1e-14
    assert max_diff(a_last, a.T @ a / 7) < 1e-12


class Shared(eqx.Module):
    lin: eqx.nn.Linear

    def __call__(self, x):
        return self.lin(jnp.tanh(self.lin(x)))


class Unused(eqx.Module):
    lin: eqx.nn.Linear
    spare: eqx.nn.Linear

    def __call__(self, x):
        return self.lin(x)


class PerPosition(eqx.Module):
    lin: eqx.nn.Linear

    def __call__(self, x):  # x: (positions, 3)
        return jnp.sum(jax.vmap(self.lin)(x), axis=0)


@pytest.mark.parametrize("case, match", [("shared", "more than once"), ("unused", "not called"),
                                         ("vmap", "under the model's own"),
                                         ("batched", "batched=False")])
def test_what_taps_cannot_take_raises_a_named_error(case, match):
    lin = eqx.nn.Linear(3, 3, dtype=F64, key=KEY)
    x = jnp.ones((2, 3))
    options = {}
    if case == "shared":
        net = Shared(lin)
    elif case == "unused":
        net = Unused(lin, lin)
    elif case == "vmap":
        net, x = PerPosition(lin), jnp.ones((2, 4, 3))
    else:
        net, options = eqx.nn.MLP(3, 3, 3, 1, dtype=F64, key=KEY), {"batched": True}
    model, params = from_equinox(net, **options)
    with pytest.raises(StructureError, match=match):
        model.apply(params, x, model.zero_taps(x))
    with pytest.raises(StructureError, match=match):  # and inside a compiled function
        jax.jit(lambda p: model.apply(p, x, model.zero_taps(x))[0])(params)


def test_multihead_attention_gets_the_methods_that_take_it():
    """eqx.nn.MultiheadAttention calls its projections under its own jax.vmap over the
    positions: K-FAC's tapped pass raises the named error, which names the methods without taps;
    one of them (SMW-NG with the Jacobian Gram matrix) then steps the model."""
    from secondorder.losses import SoftmaxCrossEntropy
    from secondorder.optim import KFAC, SMWNG

    class Attention(eqx.Module):
        att: eqx.nn.MultiheadAttention
        head: eqx.nn.Linear

        def __init__(self, key):
            k1, k2 = jax.random.split(key)
            self.att = eqx.nn.MultiheadAttention(2, 4, dtype=F64, key=k1)
            self.head = eqx.nn.Linear(4, 3, dtype=F64, key=k2)

        def __call__(self, x):  # x: (positions, 4)
            return self.head(jnp.mean(self.att(x, x, x), axis=0))

    model, params = from_equinox(Attention(KEY))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 5, 4)))
    y = jnp.asarray([0, 1, 2, 0, 1, 2])
    kfac = KFAC(model, SoftmaxCrossEntropy())
    with pytest.raises(StructureError, match="MultiheadAttention maps its own projections"):
        kfac.step(params, kfac.init(params), (x, y))
    smw = SMWNG(model, SoftmaxCrossEntropy(), gram="jacobian")
    _, _, info = smw.step(params, smw.init(params), (x, y))
    assert bool(info.finite) and float(info.extras["rho"]) > 0


def test_stacked_layers_are_not_tapped():
    """MLP(scan=True) stacks its hidden layers (a weight of rank 3): they stay outside the
    tapped layers (each method's fallback), the input and output layers are tapped."""
    net = eqx.nn.MLP(3, 2, 4, 3, scan=True, dtype=F64, key=KEY)
    model, params = from_equinox(net)
    assert model.layers == (LayerInfo("dense", 0, 1, 3, 4), LayerInfo("dense", 4, 5, 4, 2))
    x = jax.ShapeDtypeStruct((2, 3), F64)
    out, inputs = jax.eval_shape(lambda p: model.apply(p, x, model.zero_taps(x)), params)
    assert out.shape == (2, 2) and [a.shape for a in inputs] == [(2, 4), (2, 5)]


def test_an_example_batch_is_checked_at_construction(batch):
    """``from_equinox(..., example=x)``, the signature of from_flax and from_nnx: the same model
    and layers as without it; an example the network cannot take fails at construction, with
    the error the forward pass itself would give."""
    x, y = batch
    net = eqx.nn.MLP(4, 3, 5, 2, activation=jnp.tanh, dtype=F64, key=KEY)
    model, params = from_equinox(net)
    checked, same = from_equinox(net, example=x)
    assert checked.layers == model.layers
    assert max_diff(checked(same, x), model(params, x)) == 0.0
    with pytest.raises(Exception) as caught:  # noqa: PT011 - equinox's own error
        net(jnp.zeros(5))
    with pytest.raises(type(caught.value)):
        from_equinox(net, example=jnp.zeros((7, 5)))


def test_an_example_does_not_fail_a_model_only_the_tapped_methods_refuse():
    """A convolution and a Linear mapped over positions under the model's own vmap: the taps
    cannot take it (K-FAC raises), but ``example=`` checks the forward pass only, so the model
    builds for the methods without taps and computes equinox's own outputs."""

    class ConvThenMapped(eqx.Module):
        conv: eqx.nn.Conv1d
        lin: eqx.nn.Linear

        def __init__(self, key):
            k1, k2 = jax.random.split(key)
            self.conv = eqx.nn.Conv1d(2, 3, 3, dtype=F64, key=k1)
            self.lin = eqx.nn.Linear(3, 2, dtype=F64, key=k2)

        def __call__(self, x):  # x: (2, positions)
            return jnp.mean(jax.vmap(self.lin)(self.conv(x).T), axis=0)

    net = ConvThenMapped(KEY)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 2, 8)))
    model, params = from_equinox(net, example=x)
    assert max_diff(model(params, x), jax.vmap(net)(x)) < 1e-15
    with pytest.raises(StructureError, match="under the model's own"):
        model.apply(params, x, model.zero_taps(x))
