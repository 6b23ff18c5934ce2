"""flax.linen and equinox models: per-step BatchNorm statistics and dropout masks under jax.jit,
layer taps on flax Dense and Conv, and equinox models under every registered method.

The references are independent of the adapters: the same networks written by hand in jax.numpy
(BatchNorm from its formula, the dropout mask read off flax's own Dropout and applied as a
constant), the secondorder reference MLP and ConvNet with the flax weights transposed into their
layouts, and flax's own ``module.apply(..., mutable=["batch_stats"])``.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")
eqx = pytest.importorskip("equinox")
jnp = jax.numpy

from equinox_nets import BNNet  # noqa: E402
from secondorder import tree  # noqa: E402
from secondorder.curvature import kronecker_factors  # noqa: E402
from secondorder.curvature.kfac import LayerFactors  # noqa: E402
from secondorder.errors import RandomKeyError  # noqa: E402
from secondorder.losses import MSE, SoftmaxCrossEntropy  # noqa: E402
from secondorder.models import (  # noqa: E402
    MLP,
    ConvNet,
    FlaxInputs,
    from_equinox,
    from_flax,
    from_jax,
)
from secondorder.optim.registry import METHODS  # noqa: E402

F64 = jnp.float64
RATE = 0.25  # dropout rate
EPS = 1e-5  # BatchNorm epsilon (flax's and equinox's default)


def max_diff(a, b) -> float:
    """The largest entry of |a - b| over the floating-point leaves of two trees."""
    pairs = [(u, v) for u, v in zip(tree.leaves(a), tree.leaves(b), strict=True)
             if jnp.issubdtype(jnp.asarray(u).dtype, jnp.inexact)]
    return max(float(jnp.max(jnp.abs(u - v))) for u, v in pairs)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(20261125)
    x = rng.standard_normal((16, 3))
    y = np.stack([np.sin(x[:, 0]), x[:, 1] * x[:, 2]], axis=1)
    return jnp.asarray(x), jnp.asarray(y)


class BNDropoutNet(nn.Module):
    """Dense -> BatchNorm -> tanh -> Dropout -> Dense, train mode through ``train``."""

    @nn.compact
    def __call__(self, x, train: bool):
        h = nn.Dense(6, param_dtype=F64)(x)
        h = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=EPS,
                         param_dtype=F64, dtype=F64)(h)
        h = nn.Dropout(RATE, deterministic=not train)(jnp.tanh(h))
        return nn.Dense(2, param_dtype=F64)(h)


@pytest.fixture(scope="module")
def bn_net(data):
    module = BNDropoutNet()
    variables = module.init(jax.random.key(0), data[0], train=False)
    return module, variables


def dropout_scale(module, variables, x, key):
    """The mask flax's Dropout draws from ``key`` on ``x``, scaled by 1 / (1 - rate): read off
    one train-mode call as output / input."""
    seen = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, nn.Dropout):
            seen["scale"] = out / args[0]
        return out

    with nn.intercept_methods(record):
        module.apply(variables, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"])
    return jax.lax.stop_gradient(seen["scale"])


def handwritten(scale):
    """BNDropoutNet in train mode written out, with a fixed dropout ``scale``."""
    def apply(p, x):
        h = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
        mean = jnp.mean(h, axis=0)
        var = jnp.mean(h * h, axis=0) - mean * mean
        h = (h - mean) / jnp.sqrt(var + EPS) * p["BatchNorm_0"]["scale"] + p["BatchNorm_0"]["bias"]
        h = jnp.tanh(h) * scale
        return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]

    return apply


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sgd", "curveball", "hessian-free"])
def test_flax_bn_dropout_trains_under_jit(data, bn_net, name):
    """A jitted training loop through ``make_step``. Its first step equals the same step on the
    hand-written network with flax's mask for the step's key baked in: CurveBall and Hessian-free
    call the network many times per step (JVPs, VJPs, CG products, trial points), and with a mask
    drawn per call (or batch statistics from anything but the step's batch) the gradient,
    curvature products and trial losses would each see another network and the steps would
    differ at O(1). The running statistics after the step are those of one flax forward pass
    over the step's batch, and the loss decreases."""
    x, y = data
    module, variables = bn_net
    model, params = from_flax(module, variables, kwargs={"train": True})
    opt = METHODS[name](model, MSE())
    opt_state = opt.init(params)
    step = model.make_step(opt)
    collections = model.collections
    probe = jax.jit(lambda p: MSE().value(model(p, model.inputs(x, rng=jax.random.key(99))), y))
    start = float(jnp.mean(probe(params)))
    key = jax.random.key(1)
    for i in range(3):
        key, sub = jax.random.split(key)
        new_params, opt_state, new_collections, info = step(params, opt_state, collections,
                                                            (x, y), sub)
        if i == 0:
            scale = dropout_scale(module, variables, x, sub)
            assert 0 < int(jnp.sum(scale == 0)) < scale.size  # dropout is active
            reference, _ = from_jax(handwritten(scale), params)
            ref_opt = METHODS[name](reference, MSE())
            want, _, _ = jax.jit(ref_opt.step)(params, ref_opt.init(params), (x, y))
            assert max_diff(new_params, want) < 1e-12
            assert max_diff(new_params, params) > 1e-3  # the step moved
            _, flax_updates = module.apply({"params": params, **collections}, x, train=True,
                                           rngs={"dropout": sub}, mutable=["batch_stats"])
            assert max_diff(new_collections["batch_stats"], flax_updates["batch_stats"]) < 1e-14
            assert max_diff(new_collections["batch_stats"], collections["batch_stats"]) > 1e-3
        if i == 1:  # flax starts batch_stats in float32, so the float64 update compiles again
            compiled = step._cache_size()
        params, collections = new_params, new_collections
    assert float(jnp.mean(probe(params))) < 0.9 * start
    assert step._cache_size() == compiled  # keys and statistics are traced, not baked in


def test_flax_module_without_a_key_names_the_fix(data, bn_net):
    module, variables = bn_net
    model, params = from_flax(module, variables, kwargs={"train": True})
    with pytest.raises(RandomKeyError, match=r"model\.inputs\(x, rng=key\)"):
        model(params, data[0])
    # a secondorder.random key (int32 words) is the raw JAX key with the same bits
    from secondorder import random

    a = model(params, model.inputs(data[0], rng=random.key(3)))
    b = model(params, model.inputs(data[0], rng=jax.random.PRNGKey(3)))
    assert max_diff(a, b) == 0.0


class FlaxMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(5, param_dtype=F64)(x))
        h = jnp.tanh(nn.Dense(4, param_dtype=F64)(h))
        return nn.Dense(3, param_dtype=F64)(h)


class FlaxCNN(nn.Module):
    """ConvNet((2, 6, 6), channels=(3,), dense=(4, 3)) in flax: NHWC inputs, the features
    flattened channel-major as the reference does."""

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(3, (3, 3), padding=1, param_dtype=F64)(x)
        h = nn.avg_pool(jax.nn.silu(h), (2, 2), (2, 2))
        h = jnp.transpose(h, (0, 3, 1, 2)).reshape(h.shape[0], -1)
        h = jax.nn.silu(nn.Dense(4, param_dtype=F64)(h))
        return nn.Dense(3, param_dtype=F64)(h)


def factors(model, loss, params, batch, mode="exact"):
    """``kronecker_factors`` under one ``jax.jit`` (one compilation instead of one per eager
    operation), with the layer table of the traced call."""
    def run(params, batch):
        return [(f.A, f.G) for f in kronecker_factors(model, loss, params, batch, mode=mode)]

    pairs = jax.jit(run)(params, batch)
    return [LayerFactors(layer, a, g) for layer, (a, g) in zip(model.layers, pairs, strict=True)]


def _reference_layout(p):
    """The flax parameters in the reference models' layout: a list of {"w", "b"} in call order,
    dense kernels transposed to (out, in), conv kernels to (C_out, C_in, kh, kw)."""
    out = []
    for name in sorted(p, key=lambda n: (not n.startswith("Conv"), int(n.split("_")[1]))):
        k = p[name]["kernel"]
        w = k.T if k.ndim == 2 else jnp.transpose(k, (3, 2, 0, 1))
        out.append({"w": w, "b": p[name]["bias"]})
    return out


def test_adapters_commit_the_initial_parameters_so_a_jitted_step_compiles_once():
    """flax and equinox create their parameters uncommitted; a jitted step returns committed
    arrays. The adapters commit the initial ones, so steps 2 and 3 reuse step 1's compilation."""
    rng = np.random.default_rng(0)
    x, y = jnp.asarray(rng.standard_normal((8, 4))), jnp.asarray(rng.standard_normal((8, 3)))
    module = FlaxMLP()
    flax_model, flax_params = from_flax(module, module.init(jax.random.key(0), x), example=x)
    eqx_model, eqx_params = from_equinox(
        eqx.nn.MLP(4, 3, 5, 2, activation=jnp.tanh, key=jax.random.key(0), dtype=F64))
    for model, params in ((flax_model, flax_params), (eqx_model, eqx_params)):
        assert all(leaf.committed for leaf in jax.tree_util.tree_leaves(params))
        opt = METHODS["kfac"](model, MSE())
        step, state = jax.jit(opt.step), opt.init(params)
        for _ in range(3):
            params, state, info = step(params, state, (x, y))
        assert bool(info.finite) and step._cache_size() == 1


def test_flax_dense_taps_give_the_reference_kfac_factors():
    rng = np.random.default_rng(1)
    x, y = jnp.asarray(rng.standard_normal((7, 4))), jnp.asarray(rng.standard_normal((7, 3)))
    module = FlaxMLP()
    model, params = from_flax(module, module.init(jax.random.key(0), x), example=x)
    ref_params = _reference_layout(params)
    ref = MLP([4, 5, 4, 3])
    assert model.layers == ref.layers  # leaf indices agree: both sort b before w
    assert max_diff(model(params, x), ref(ref_params, x)) < 1e-14
    for mode in ("exact", "empirical"):
        got = factors(model, MSE(), params, (x, y), mode=mode)
        want = factors(ref, MSE(), ref_params, (x, y), mode=mode)
        for g, w in zip(got, want, strict=True):
            assert g.A.shape == w.A.shape and g.G.shape == w.G.shape
            assert max_diff(g.A, w.A) < 1e-12 and max_diff(g.G, w.G) < 1e-12


def test_flax_conv_taps_give_the_reference_kfac_factors():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((5, 2, 6, 6)))  # NCHW for the reference
    y = jax.nn.one_hot(jnp.arange(5) % 3, 3, dtype=F64)
    x_nhwc = jnp.transpose(x, (0, 2, 3, 1))
    module = FlaxCNN()
    model, params = from_flax(module, module.init(jax.random.key(1), x_nhwc))
    ref = ConvNet((2, 6, 6), channels=(3,), dense=(4, 3))
    ref_params = _reference_layout(params)
    assert max_diff(model(params, x_nhwc), ref(ref_params, x)) < 1e-14
    assert model.tap_shapes(x_nhwc) == ref.tap_shapes(x)
    assert model.layers == ref.layers
    got = factors(model, SoftmaxCrossEntropy(), params, (x_nhwc, y))
    want = factors(ref, SoftmaxCrossEntropy(), ref_params, (x, y))
    for g, w in zip(got, want, strict=True):
        assert max_diff(g.A, w.A) < 1e-12 and max_diff(g.G, w.G) < 1e-12


def test_flax_taps_take_the_step_inputs(data, bn_net):
    """Taps on a model with BatchNorm and Dropout: the factors of the step's inputs (one mask,
    the batch statistics) are those of the hand-written network's last layer input."""
    x, y = data
    module, variables = bn_net
    model, params = from_flax(module, variables, kwargs={"train": True})
    key = jax.random.key(5)
    inputs = model.inputs(x, rng=key)
    assert isinstance(inputs, FlaxInputs)
    found = factors(model, MSE(), params, (inputs, y))
    assert [f.layer.kind for f in found] == ["dense", "dense"]
    scale = dropout_scale(module, variables, x, key)
    p = params
    h = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    mean, var = jnp.mean(h, 0), jnp.var(h, 0)
    h = (h - mean) / jnp.sqrt(var + EPS) * p["BatchNorm_0"]["scale"] + p["BatchNorm_0"]["bias"]
    a = jnp.concatenate([jnp.tanh(h) * scale, jnp.ones((x.shape[0], 1))], axis=1)
    assert max_diff(found[1].A, a.T @ a / x.shape[0]) < 1e-12


@pytest.fixture(scope="module")
def equinox_mlp():
    net = eqx.nn.MLP(3, 2, 4, 1, activation=jnp.tanh, dtype=F64, key=jax.random.key(0))

    def apply(p, x):  # the same network by hand, on a list of (W, b) in equinox's leaf order
        (w0, b0), (w1, b1) = p
        return jnp.tanh(x @ w0.T + b0) @ w1.T + b1

    return net, apply, [(lin.weight, lin.bias) for lin in net.layers]


# three methods that reach every route of the adapter (gradient only; JVP + VJP curvature
# products; dense Hessian): every registered method on equinox parameters is already exercised by
# tests/test_user_trees.py, and each eager JAX method here costs ~10 s of compilation
@pytest.mark.parametrize("name", ["sgd", "curveball", "newton"])
def test_equinox_mlp_trains_like_the_handwritten_network(data, equinox_mlp, name):
    x, y = data
    net, ref_apply, ref_params = equinox_mlp
    model, params = from_equinox(net)
    reference, _ = from_jax(jax.jit(ref_apply), ref_params)
    opt, ref_opt = METHODS[name](model, MSE()), METHODS[name](reference, MSE())
    state, ref_state = opt.init(params), ref_opt.init(ref_params)
    start = params
    for _ in range(2):
        params, state, _ = opt.step(params, state, (x, y))
        ref_params, ref_state, _ = ref_opt.step(ref_params, ref_state, (x, y))
    assert max_diff(params, ref_params) < 1e-12
    assert max_diff(params, start) > 1e-4
    trained = model.to_module(params)
    assert isinstance(trained, eqx.nn.MLP)
    assert max_diff(jax.vmap(trained)(x), ref_apply(ref_params, x)) < 1e-12




def test_equinox_batchnorm_dropout_trains_under_jit(data):
    x, y = data
    net, state0 = eqx.nn.make_with_state(BNNet)(jax.random.key(3), 3, 2, rate=RATE)
    model, params = from_equinox(net, state0)
    opt = METHODS["curveball"](model, MSE())
    step = model.make_step(opt)
    opt_state, state = opt.init(params), state0
    probe = jax.jit(lambda p: MSE().value(model(p, model.inputs(x, key=jax.random.key(9))), y))
    start = float(jnp.mean(probe(params)))
    key = jax.random.key(4)
    for i in range(4):
        key, sub = jax.random.split(key)
        new_params, opt_state, new_state, _ = step(params, opt_state, state, (x, y), sub)
        if i == 0:  # the state of one equinox forward pass over the step's batch
            keys = jax.random.split(sub, x.shape[0])
            _, direct = jax.vmap(net, in_axes=(0, None), out_axes=(0, None),
                                 axis_name="batch")(x, state, key=keys)
            assert max_diff(new_state, direct) < 1e-14
            assert max_diff(new_state, state) > 1e-3
        if i == 1:  # the first call may see other placements or dtypes than the steps' outputs
            compiled = step._cache_size()
        params, state = new_params, new_state
    assert float(jnp.mean(probe(params))) < 0.9 * start
    assert step._cache_size() == compiled  # keys and state are traced, not baked in


class SquareMLP(nn.Module):
    """4 -> 5 -> 5 -> 3: the middle kernel is square, so reading it untransposed would fit."""

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(5, param_dtype=F64)(x))
        h = jnp.tanh(nn.Dense(5, param_dtype=F64)(h))
        return nn.Dense(3, param_dtype=F64)(h)


def test_flax_kfac_operator_equals_the_reference_operator():
    """``model.kfac`` acts on flax-layout trees as ``KFAC`` on the reference MLP acts on the
    transposed trees: products, damped inverses and powers."""
    from secondorder.curvature import KFAC

    rng = np.random.default_rng(3)
    x, y = jnp.asarray(rng.standard_normal((9, 4))), jnp.asarray(rng.standard_normal((9, 3)))
    module = SquareMLP()
    model, params = from_flax(module, module.init(jax.random.key(2), x))
    ref_params = _reference_layout(params)
    v = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), params)

    def products(op, v):
        return [op @ v, op.damped_inverse(0.1) @ v, op.power(0.5) @ v,
                op.damped_inverse(0.1, "exact") @ v]

    got = jax.jit(lambda p, v: products(model.kfac(MSE(), p, (x, y)), v))(params, v)
    want = jax.jit(lambda p, v: products(KFAC(MLP([4, 5, 5, 3]), MSE(), p, (x, y)), v))(
        ref_params, _reference_layout(v))
    for g, w in zip(got, want, strict=True):
        scale = max(float(jnp.max(jnp.abs(leaf))) for leaf in tree.leaves(w))
        assert max_diff(_reference_layout(g), w) < 1e-12 * scale


class DepthwiseCNN(nn.Module):
    """A depthwise convolution (feature_group_count = channels), a 1 x 1 convolution, a Dense."""

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(2, (3, 3), feature_group_count=2, padding="VALID", param_dtype=F64)(x)
        h = jnp.tanh(nn.Conv(3, (1, 1), param_dtype=F64)(h))
        return nn.Dense(3, param_dtype=F64)(h.reshape(h.shape[0], -1))


def test_flax_grouped_convolutions_are_left_untapped():
    """A grouped convolution is not a Kronecker block: from_flax taps the other layers only (as
    from_torch does), with the factors of the same layers' inputs, and K-FAC steps."""
    from secondorder import optim

    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((6, 5, 5, 2)))
    y = jnp.asarray(np.arange(6) % 3)
    module = DepthwiseCNN()
    model, params = from_flax(module, module.init(jax.random.key(2), x), example=x)
    assert [layer.kind for layer in model.layers] == ["conv", "dense"]
    assert [s[1:] for s in model.tap_shapes(x)] == [(9, 3), (3,)]
    opt = optim.KFAC(model, SoftmaxCrossEntropy(), lr=0.1, damping=1e-2)
    state, losses = opt.init(params), []
    for _ in range(3):
        params, state, info = opt.step(params, state, (x, y))
        losses.append(float(info.loss))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_tnt_reads_flax_kernels_in_flax_layout_by_default():
    """TNT merges a convolution kernel's spatial axes into one mode. On a from_flax model its
    default reads the kernel as (kh, kw, C_in, C_out), so three steps equal TNT's on the same
    network as the reference ConvNet (kernels (C_out, C_in, kh, kw)), float64; the PyTorch
    layout forced on the flax kernel groups other axes and steps elsewhere."""
    from secondorder.optim import TNT

    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((8, 2, 6, 6)))
    y = jnp.asarray(rng.integers(0, 3, 8))
    x_nhwc = jnp.transpose(x, (0, 2, 3, 1))
    module = FlaxCNN()
    model, params = from_flax(module, module.init(jax.random.key(1), x_nhwc), example=x_nhwc)
    ref = ConvNet((2, 6, 6), channels=(3,), dense=(4, 3))

    def run(opt, p, batch):
        state = opt.init(p)
        for _ in range(3):
            p, state, info = opt.step(p, state, batch)
        return p

    loss = SoftmaxCrossEntropy()
    want = run(TNT(ref, loss, lr=1e-3), _reference_layout(params), (x, y))
    got = _reference_layout(run(TNT(model, loss, lr=1e-3), params, (x_nhwc, y)))
    scale = max_diff(want, jax.tree.map(jnp.zeros_like, want))
    assert max_diff(got, want) < 1e-12 * scale
    forced = _reference_layout(run(TNT(model, loss, lr=1e-3, kernel_layout="oihw"), params,
                                   (x_nhwc, y)))
    assert max_diff(forced, want) > 1e-6 * scale


class ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return jnp.tanh(nn.Dense(4, param_dtype=F64)(h)), None


class ScannedNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                        length=3)
        h, _ = stack()(x, None)
        return nn.Dense(3, param_dtype=F64)(h)


def test_flax_layers_under_nn_scan_are_named_and_left_to_the_fallback():
    """linen's lifted scan runs its Dense in the scan's trace on slices of a stacked kernel: the
    layer is named in a warning and left untapped, the head is tapped, and K-FAC's step moves
    the stacked kernel by its SGD fallback: -lr times the gradient (momentum 0)."""
    from secondorder.errors import UntappedLayerWarning
    from secondorder.optim import KFAC

    rng = np.random.default_rng(2)
    x, y = jnp.asarray(rng.standard_normal((6, 4))), jnp.asarray(rng.integers(0, 3, 6))
    module = ScannedNet()
    with pytest.warns(UntappedLayerWarning, match="ScanBlock_0/Dense_0") as seen:
        model, params = from_flax(module, module.init(jax.random.key(0), x), example=x)
    assert seen[0].filename == __file__  # the user's from_flax(...), not flax's tracing
    assert len(model.layers) == 1 and model.layers[0].out_features == 3
    stack = model.untapped[0].split("/")[0]  # the scanned module's name
    loss = SoftmaxCrossEntropy()
    opt = KFAC(model, loss, lr=0.1, damping=0.1, momentum=0.0)
    new, _, info = jax.jit(opt.step)(params, opt.init(params), (x, y))
    grads = jax.grad(lambda p: loss.value(module.apply({"params": p}, x), y))(params)
    want = jax.tree.map(lambda w, g: w - 0.1 * g, params[stack], grads[stack])
    assert params[stack]["Dense_0"]["kernel"].shape == (3, 4, 4)
    assert bool(info.finite) and max_diff(new[stack], want) < 1e-14


def test_donating_the_collections_leaves_the_models_defaults():
    """The README's linen loop donates the batch_stats it starts from (model.collections):
    they are a copy (committed, so the jitted step compiles once), and the model's defaults,
    which inputs() and update_collections() fall back on, survive the donation."""
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train=True):
            return nn.Dense(3)(nn.BatchNorm(use_running_average=not train)(nn.Dense(5)(x)))

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 4)), dtype=jnp.float32)
    y = jnp.asarray(rng.standard_normal((8, 3)), dtype=jnp.float32)
    module = Net()
    model, params = from_flax(module, module.init(jax.random.key(0), x, train=False),
                              kwargs={"train": True})
    start = jax.tree_util.tree_map(np.asarray, model.collections)
    opt = METHODS["sgd"](model, MSE())
    step = jax.jit(model.make_step(opt, jit=False), donate_argnums=(0, 1, 2))
    params, state, cols = dict(params), opt.init(params), model.collections
    assert all(leaf.committed for leaf in jax.tree_util.tree_leaves(cols))
    for _ in range(3):
        params, state, cols, info = step(params, state, cols, (x, y))
    assert bool(info.finite) and step._cache_size() == 1
    for leaf in jax.tree_util.tree_leaves(model.collections):
        leaf.delete()  # what a donation does (the suite's XLA settings may skip the aliasing)
    kept = model.collections
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(
        jax.tree_util.tree_leaves(start), jax.tree_util.tree_leaves(kept)))
    fresh = model.update_collections(params, x)  # the defaults are still readable
    assert not np.array_equal(np.asarray(jax.tree_util.tree_leaves(fresh)[0]),
                              jax.tree_util.tree_leaves(start)[0])


def test_a_reused_layer_with_example_still_serves_the_methods_without_taps():
    """example= finds the layers early; a linen Dense called twice cannot be tapped, but the
    model is built and CurveBall steps exactly as on the model built without example= (it
    raised at construction before); K-FAC names the reused layer when it asks for taps."""
    import flax.linen as nn

    from secondorder.errors import UnsupportedModelError

    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x):
            dense = nn.Dense(4, param_dtype=F64)
            return dense(jnp.tanh(dense(x)))

    rng = np.random.default_rng(0)
    x, y = jnp.asarray(rng.standard_normal((6, 4))), jnp.asarray(rng.integers(0, 4, 6))
    module = Twice()
    variables = module.init(jax.random.key(0), x)
    (early, params), (late, _) = (from_flax(module, variables, example=x),
                                  from_flax(module, variables))
    loss = SoftmaxCrossEntropy()
    steps = [METHODS["curveball"](m, loss) for m in (early, late)]
    (p1, _, i1), (p2, _, _) = (s.step(params, s.init(params), (x, y)) for s in steps)
    assert bool(i1.finite) and max_diff(p1, p2) == 0.0
    with pytest.raises(UnsupportedModelError, match="more than once"):
        METHODS["kfac"](early, loss).init(params)
    # SMW's Gram matrix from the Jacobian when the layers cannot be tapped (gram='auto')
    smw = [METHODS["smw-gn"](early, loss, gram=g) for g in ("auto", "jacobian")]
    (p1, _, i1), (p2, _, _) = (s.step(params, s.init(params), (x, y)) for s in smw)
    assert bool(i1.finite) and max_diff(p1, p2) == 0.0
