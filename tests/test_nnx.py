"""flax.nnx modules through ``from_nnx``: layer taps, per-step state, every tapped method, and
nnx's own ``nnx.Optimizer``.

The references are independent of the adapter:

* the reference MLP and ConvNet of :mod:`secondorder.models` with the nnx weights transposed into
  their layouts (their factors and their steps);
* the tap identity: sum_i sum_t delta_it a~_it^T of every tapped layer is the gradient of the
  summed loss with respect to [W b], computed by ``jax.grad`` through the nnx module itself;
* nnx's own behaviour: a train-mode call of the module (BatchNorm's running statistics, the
  Dropout stream's count) and ``nnx.grad`` of the loss on the merged module.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")
jnp = jax.numpy

from secondorder import tree  # noqa: E402
from secondorder.curvature import kronecker_factors  # noqa: E402
from secondorder.curvature.kfac import layer_statistics  # noqa: E402
from secondorder.errors import SecondOrderError, StructureError, UnsupportedModelError  # noqa: E402
from secondorder.losses import MSE, SoftmaxCrossEntropy  # noqa: E402
from secondorder.models import MLP, ConvNet, NnxInputs, from_flax, from_nnx  # noqa: E402
from secondorder.models.layers import channels_last_to_reference  # noqa: E402
from secondorder.optim import KFAC, SGD  # noqa: E402
from secondorder.optim.registry import METHODS  # noqa: E402

F64 = jnp.float64
LOSS = SoftmaxCrossEntropy()


def _numbers(a):
    """An array's numbers (a random key's words)."""
    a = jnp.asarray(a)
    return jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a


def max_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(_numbers(u) - _numbers(v))))
               for u, v in zip(tree.leaves(a), tree.leaves(b), strict=True))


class NnxMLP(nnx.Module):
    """MLP([4, 5, 4, 3]), tanh."""

    def __init__(self, rngs):
        self.d1 = nnx.Linear(4, 5, param_dtype=F64, rngs=rngs)
        self.d2 = nnx.Linear(5, 4, param_dtype=F64, rngs=rngs)
        self.d3 = nnx.Linear(4, 3, param_dtype=F64, rngs=rngs)

    def __call__(self, x):
        return self.d3(jnp.tanh(self.d2(jnp.tanh(self.d1(x)))))


class NnxCNN(nnx.Module):
    """ConvNet((2, 6, 6), channels=(3,), dense=(4, 3)): NHWC inputs, the pooled features
    flattened channel-major as the reference does."""

    def __init__(self, rngs):
        self.c1 = nnx.Conv(2, 3, (3, 3), padding=1, param_dtype=F64, rngs=rngs)
        self.d1 = nnx.Linear(27, 4, param_dtype=F64, rngs=rngs)
        self.d2 = nnx.Linear(4, 3, param_dtype=F64, rngs=rngs)

    def __call__(self, x):
        from flax.linen import avg_pool

        h = avg_pool(jax.nn.silu(self.c1(x)), (2, 2), (2, 2))
        h = jnp.transpose(h, (0, 3, 1, 2)).reshape(h.shape[0], -1)
        return self.d2(jax.nn.silu(self.d1(h)))


def reference_layout(params, names):
    """The nnx parameters of the layers ``names`` (in call order) as the reference models' list
    of {"w", "b"}, kernels in (out, in) and (C_out, C_in, kh, kw)."""
    return [{"w": channels_last_to_reference(params[n]["kernel"]), "b": params[n]["bias"]}
            for n in names]


def factors(model, loss, params, batch, mode="exact"):
    def run(params, batch):
        return [(f.A, f.G) for f in kronecker_factors(model, loss, params, batch, mode=mode)]

    return jax.jit(run)(params, batch)


def test_nnx_dense_taps_give_the_reference_kfac_factors():
    rng = np.random.default_rng(1)
    x, y = jnp.asarray(rng.standard_normal((7, 4))), jnp.asarray(rng.standard_normal((7, 3)))
    model, params = from_nnx(NnxMLP(nnx.Rngs(0)), example=x)
    ref, ref_params = MLP([4, 5, 4, 3]), reference_layout(params, ["d1", "d2", "d3"])
    assert model.layers == ref.layers  # leaf indices agree: both sort bias before kernel
    assert max_diff(model(params, x), ref(ref_params, x)) < 1e-14
    for mode in ("exact", "empirical"):
        got = factors(model, MSE(), params, (x, y), mode)
        want = factors(ref, MSE(), ref_params, (x, y), mode)
        for (ga, gg), (wa, wg) in zip(got, want, strict=True):
            assert ga.shape == wa.shape and gg.shape == wg.shape
            assert max_diff(ga, wa) < 1e-12 and max_diff(gg, wg) < 1e-12


def test_nnx_conv_taps_give_the_reference_kfac_factors():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((5, 2, 6, 6)))  # NCHW for the reference
    y = jnp.asarray(rng.integers(0, 3, 5))
    x_nhwc = jnp.transpose(x, (0, 2, 3, 1))
    model, params = from_nnx(NnxCNN(nnx.Rngs(1)))
    ref = ConvNet((2, 6, 6), channels=(3,), dense=(4, 3))
    ref_params = reference_layout(params, ["c1", "d1", "d2"])
    assert max_diff(model(params, x_nhwc), ref(ref_params, x)) < 1e-14
    assert model.tap_shapes(x_nhwc) == ref.tap_shapes(x)
    assert model.layers == ref.layers
    got = factors(model, LOSS, params, (x_nhwc, y))
    want = factors(ref, LOSS, ref_params, (x, y))
    for (ga, gg), (wa, wg) in zip(got, want, strict=True):
        assert max_diff(ga, wa) < 1e-12 and max_diff(gg, wg) < 1e-12


class Sequence1D(nnx.Module):
    """A 1-D convolution (settings from the test), a second one with stride and no bias, a
    Linear shared over the positions and a head: every weight-shared tap."""

    def __init__(self, rngs, **conv):
        self.conv = nnx.Conv(2, 3, (3,), param_dtype=F64, rngs=rngs, **conv)
        self.conv2 = nnx.Conv(3, 4, (3,), strides=2, padding="VALID", use_bias=False,
                              param_dtype=F64, rngs=rngs)
        self.mix = nnx.Linear(4, 5, param_dtype=F64, rngs=rngs)
        self.head = nnx.Linear(5, 3, param_dtype=F64, rngs=rngs)

    def __call__(self, x):
        a = jnp.tanh(self.conv2(jnp.tanh(self.conv(x))))
        return self.head(jnp.tanh(self.mix(a)).mean(axis=1))


CONVS = [{"padding": [(1, 1)]}, {"padding": "SAME", "kernel_dilation": 2},
         {"padding": "VALID", "strides": 2, "use_bias": False}, {"padding": "SAME_LOWER"}]


@pytest.mark.parametrize("conv", CONVS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_nnx_weight_shared_taps_give_the_layer_gradients(conv):
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((6, 11, 2)))  # (m, L, C)
    y = jnp.asarray(rng.integers(0, 3, 6))
    net = Sequence1D(nnx.Rngs(0), **conv)
    model, params = from_nnx(net, example=x)
    assert [layer.kind for layer in model.layers] == ["conv", "conv", "dense", "dense"]
    _, pairs = layer_statistics(model, params, x, lambda f: [LOSS.grad(f, y)],
                                lambda i, a, ds: (a, ds[0]))
    got = [d.reshape(-1, d.shape[-1]).T @ a.reshape(-1, a.shape[-1]) for a, d in pairs]

    graphdef, _, rest = nnx.split(net, nnx.Param, ...)

    def total(p):
        logits = nnx.merge(graphdef, p, rest)(x)
        return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    grads = jax.grad(total)(params)
    for g, name in zip(got, ("conv", "conv2", "mix", "head"), strict=True):
        w = channels_last_to_reference(grads[name]["kernel"])
        w = w.reshape(w.shape[0], -1)
        if "bias" in grads[name]:
            w = jnp.concatenate([w, grads[name]["bias"][:, None]], axis=1)
        assert g.shape == w.shape
        assert max_diff(g, w) < 1e-12


@pytest.mark.parametrize("name", ["kfac", "kbfgs", "kbfgs-l", "smw-ng", "tnt"])
def test_nnx_methods_step_as_on_the_reference_convnet(name):
    """Three jitted steps of each tapped method on the nnx CNN equal those on the reference
    ConvNet with the same weights (float64)."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((8, 2, 6, 6)))
    y = jnp.asarray(rng.integers(0, 3, 8))
    x_nhwc = jnp.transpose(x, (0, 2, 3, 1))
    model, params = from_nnx(NnxCNN(nnx.Rngs(3)), example=x_nhwc)
    ref = ConvNet((2, 6, 6), channels=(3,), dense=(4, 3))
    names = ["c1", "d1", "d2"]

    def run(apply, p, batch):
        opt = METHODS[name](apply, LOSS)
        state, step, losses = opt.init(p), jax.jit(opt.step), []
        for _ in range(3):
            p, state, info = step(p, state, batch)
            losses.append(float(info.loss))
        return p, losses

    want, want_losses = run(ref, reference_layout(params, names), (x, y))
    got, got_losses = run(model, params, (x_nhwc, y))
    assert got_losses == pytest.approx(want_losses, rel=1e-12)
    scale = max(float(jnp.max(jnp.abs(leaf))) for leaf in tree.leaves(want))
    assert max_diff(reference_layout(got, names), want) < 1e-12 * scale
    assert max_diff(reference_layout(got, names), reference_layout(params, names)) > 1e-6


class BNDropout(nnx.Module):
    """Linear -> BatchNorm -> tanh -> Dropout -> Linear; the module's own train mode."""

    def __init__(self, rngs):
        self.d1 = nnx.Linear(3, 6, param_dtype=F64, rngs=rngs)
        self.bn = nnx.BatchNorm(6, param_dtype=F64, dtype=F64, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.d2 = nnx.Linear(6, 2, param_dtype=F64, rngs=rngs)

    def __call__(self, x):
        return self.d2(self.drop(jnp.tanh(self.bn(self.d1(x)))))


def _bn_data():
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.standard_normal((16, 3)))
    return x, jnp.asarray(rng.integers(0, 2, 16))


def test_nnx_step_uses_one_mask_and_the_batch_statistics_and_advances_the_state():
    """An SGD step through make_step moves the parameters by the gradient nnx.grad gives on the
    module merged with the step's state (so every forward call of the step drew the same
    Dropout mask and normalised with the batch); the state afterwards is that of the module
    after one call of its own (running statistics updated, the stream's count advanced)."""
    x, y = _bn_data()
    net = BNDropout(nnx.Rngs(0, dropout=1))
    net.train()
    model, params = from_nnx(net, example=x)
    opt = SGD(model, LOSS, lr=0.1, momentum=0.0)
    step = model.make_step(opt)
    p, s, state = params, opt.init(params), model.state
    for k in range(3):
        graphdef, _, _ = nnx.split(net, nnx.Param, ...)
        twin = nnx.merge(graphdef, p, state)

        def loss(module):
            return LOSS.value(module(x), y)

        value, grads = nnx.value_and_grad(loss)(twin)
        want = jax.tree.map(lambda w, g: w - 0.1 * g, p, nnx.as_pure(grads))
        twin_state = nnx.as_pure(nnx.split(twin, nnx.Param, ...)[2])  # after its one call
        p, s, state, info = step(p, s, state, (x, y))
        assert float(info.loss) == pytest.approx(float(value), rel=1e-12)
        assert max_diff(p, want) < 1e-12
        assert max_diff(state, twin_state) == 0.0
        assert int(state["drop"]["rngs"]["count"]) == k + 1
    assert float(jnp.max(jnp.abs(state["bn"]["mean"]))) > 1e-3  # the statistics moved
    nnx.update(net, p, state)  # the user's module takes the results back
    assert max_diff(nnx.as_pure(nnx.state(net, nnx.Param)), p) == 0.0


def test_nnx_kfac_on_batchnorm_and_dropout_uses_the_steps_inputs():
    """A tapped call on the step's inputs records, as the last layer's input, the activation a
    direct call of the module merged with the same state gives that layer (the same Dropout
    mask, the batch's statistics); K-FAC steps the train-mode module jitted, finitely."""
    x, y = _bn_data()
    net = BNDropout(nnx.Rngs(0, dropout=1))
    model, params = from_nnx(net, example=x)
    opt = KFAC(model, LOSS, lr=0.05, damping=0.1, statistics_interval=1, inverse_interval=1)
    step = model.make_step(opt)
    p, s, state = params, opt.init(params), model.state
    inputs = model.inputs(x, state)
    assert isinstance(inputs, NnxInputs)
    # the last layer's recorded input is the dropped-out activation of a direct module call
    twin = model.to_module(params, state)
    seen = {}
    original = type(twin.d2).__call__

    class Spy(type(twin.d2)):
        def __call__(self, a):
            seen["a"] = a
            return original(self, a)

    object.__setattr__(twin.d2, "__class__", Spy)
    twin(x)
    _, recorded = model.apply(params, inputs, model.zero_taps(inputs, params))
    assert max_diff(recorded[1][:, :-1], seen["a"]) < 1e-14
    losses = []
    for _ in range(4):
        p, s, state, info = step(p, s, state, (x, y))
        losses.append(float(info.loss))
    assert all(np.isfinite(losses)) and bool(info.finite)


def test_nnx_optimizer_with_as_optax_follows_the_methods_own_steps():
    """``nnx.Optimizer(module, as_optax(KFAC(...)))`` with ``update(module, None,
    batch=(x, y))`` under ``nnx.jit`` leaves the module with the parameters of K-FAC's own
    three steps."""
    from secondorder.integrations.optax import as_optax

    rng = np.random.default_rng(0)
    x, y = jnp.asarray(rng.standard_normal((16, 4))), jnp.asarray(rng.integers(0, 3, 16))
    net = NnxMLP(nnx.Rngs(0))
    model, params = from_nnx(net, example=x)
    opt = KFAC(model, LOSS, lr=0.1, damping=0.1)
    optimizer = nnx.Optimizer(net, as_optax(opt), wrt=nnx.Param)

    @nnx.jit
    def train(net, optimizer, x, y):
        optimizer.update(net, None, batch=(x, y))

    p, s = params, opt.init(params)
    for _ in range(3):
        train(net, optimizer, x, y)
        p, s, _ = opt.step(p, s, (x, y))
    got = nnx.as_pure(nnx.state(net, nnx.Param))
    assert max_diff(got, p) < 1e-13
    assert max_diff(got, params) > 1e-3


class Shared(nnx.Module):
    def __init__(self, rngs):
        self.d = nnx.Linear(4, 4, param_dtype=F64, rngs=rngs)

    def __call__(self, x):
        return self.d(jnp.tanh(self.d(x)))


class Scaled(nnx.Linear):
    """A Linear with its own call: not a plain dense layer, so not tapped."""

    def __call__(self, x):
        return 2.0 * super().__call__(x)


class WithScaled(nnx.Module):
    def __init__(self, rngs):
        self.s = Scaled(4, 5, param_dtype=F64, rngs=rngs)
        self.d = nnx.Linear(5, 3, param_dtype=F64, rngs=rngs)

    def __call__(self, x):
        return self.d(jnp.tanh(self.s(x)))


class Circular(nnx.Module):
    def __init__(self, rngs):
        self.c = nnx.Conv(1, 2, (3,), padding="CIRCULAR", param_dtype=F64, rngs=rngs)

    def __call__(self, x):
        return self.c(x).mean(axis=1)


def test_nnx_entry_errors_name_the_fix():
    x = jnp.ones((4, 4), dtype=F64)
    net = NnxMLP(nnx.Rngs(0))
    with pytest.raises(UnsupportedModelError, match="from_nnx"):
        from_flax(net)
    with pytest.raises(StructureError, match="from_nnx"):
        KFAC(net, LOSS)
    linen = pytest.importorskip("flax.linen")
    with pytest.raises(SecondOrderError, match="from_flax"):
        from_nnx(linen.Dense(3))
    # a layer called twice is refused by the methods with taps, when they ask for them; the
    # model itself (with example=) is built for the methods without taps
    shared, shared_params = from_nnx(Shared(nnx.Rngs(0)), example=x)
    with pytest.raises(UnsupportedModelError, match="more than once"):
        shared.tap_shapes(x)
    with pytest.raises(UnsupportedModelError, match="more than once"):
        KFAC(shared, LOSS).step(shared_params, KFAC(shared, LOSS).init(shared_params),
                                (x, jnp.zeros(4, dtype=jnp.int32)))
    with pytest.raises(SecondOrderError, match="CIRCULAR"):
        from_nnx(Circular(nnx.Rngs(0)), example=jnp.ones((4, 6, 1), dtype=F64))


def test_a_linear_subclass_with_its_own_call_is_left_to_the_fallback():
    """Only layers with nnx's own call are tapped; the other's parameters take K-FAC's SGD
    fallback, so its step is the learning rate times its momentum-averaged gradient."""
    rng = np.random.default_rng(3)
    x, y = jnp.asarray(rng.standard_normal((8, 4))), jnp.asarray(rng.integers(0, 3, 8))
    model, params = from_nnx(WithScaled(nnx.Rngs(0)), example=x)
    assert [(layer.kind, layer.weight) for layer in model.layers] == [("dense", 1)]
    opt = KFAC(model, LOSS, lr=0.1, damping=0.1, momentum=0.0)
    p, _, info = opt.step(params, opt.init(params), (x, y))
    grads = jax.grad(lambda q: LOSS.value(model(q, x), y))(params)
    want = jax.tree.map(lambda w, g: w - 0.1 * g, params["s"], grads["s"])
    assert max_diff(p["s"], want) < 1e-14
    assert bool(info.finite)


class Backbone(nnx.Module):
    def __init__(self, rngs):
        self.body = nnx.Linear(4, 5, param_dtype=F64, rngs=rngs)
        self.head = nnx.Linear(5, 3, param_dtype=F64, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.body(x)))


def _layer_gradient_identity(model, params, x, y, grads, names):
    """The tap identity for the tapped layers ``names``: sum_i delta_i a~_i^T against the
    module's own gradient of the summed loss (kernel, and bias where trained)."""
    _, pairs = layer_statistics(model, params, x, lambda f: [LOSS.grad(f, y)],
                                lambda i, a, ds: (a, ds[0]))
    for (a, d), name in zip(pairs, names, strict=True):
        want = channels_last_to_reference(grads[name]["kernel"])
        if "bias" in grads[name]:
            want = jnp.concatenate([want, grads[name]["bias"][:, None]], axis=1)
        assert max_diff(d.T @ a, want) < 1e-12


def _summed_grads(net, params, x, y, wrt=nnx.Param):
    graphdef, _, rest = nnx.split(net, wrt, ...)

    def total(p):
        logits = nnx.merge(graphdef, p, rest)(x)
        return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    return jax.grad(total)(params)


def test_a_wrt_filter_leaves_frozen_kernels_untapped_and_frozen_biases_out():
    """Fine-tuning the head only: the frozen body is not a tapped layer (its parameters are not
    trained); training kernels only: each layer is tapped without its bias column. The taps
    give the module's own gradients of what is trained."""
    rng = np.random.default_rng(3)
    x, y = jnp.asarray(rng.standard_normal((6, 4))), jnp.asarray(rng.integers(0, 3, 6))
    head_only = nnx.All(nnx.Param, nnx.PathContains("head"))
    kernels = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("bias")))
    for wrt, names in ((head_only, ["head"]), (kernels, ["body", "head"])):
        net = Backbone(nnx.Rngs(0))
        model, params = from_nnx(net, wrt=wrt, example=x)
        assert [name for name in params] == names
        assert all((layer.bias is None) == (wrt is kernels) for layer in model.layers)
        _layer_gradient_identity(model, params, x, y, _summed_grads(net, params, x, y, wrt),
                                 names)
        p, _, info = KFAC(model, LOSS, lr=0.1, damping=0.1).step(
            params, KFAC(model, LOSS).init(params), (x, y))
        assert bool(info.finite) and max_diff(p, params) > 1e-4


class Scanned(nnx.Module):
    """Three 4 x 4 layers stacked and applied by nnx.scan, then a head."""

    def __init__(self, rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return nnx.Linear(4, 4, param_dtype=F64, rngs=rngs)

        self.stack = make(rngs)
        self.head = nnx.Linear(4, 3, param_dtype=F64, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def body(layer, h):
            return jnp.tanh(layer(h))

        return self.head(body(self.stack, x))


def test_layers_under_an_nnx_transform_are_named_and_left_untapped():
    """A scanned stack's calls run in the scan's trace on slices of a stacked kernel: they are
    named in a warning and in ``untapped`` and stepped by the fallback; the head is tapped and
    its taps give the module's own gradient."""
    rng = np.random.default_rng(4)
    x, y = jnp.asarray(rng.standard_normal((6, 4))), jnp.asarray(rng.integers(0, 3, 6))
    from secondorder.errors import UntappedLayerWarning

    net = Scanned(nnx.Rngs(0))
    with pytest.warns(UntappedLayerWarning, match="'stack'"):
        model, params = from_nnx(net, example=x)
    assert model.untapped == ("stack",)
    assert len(model.layers) == 1
    _layer_gradient_identity(model, params, x, y, _summed_grads(net, params, x, y), ["head"])
    for name in ("kfac", "kbfgs"):
        opt = METHODS[name](model, LOSS)
        p, _, info = jax.jit(opt.step)(params, opt.init(params), (x, y))
        assert bool(info.finite) and max_diff(p["stack"], params["stack"]) > 1e-6


class Sowing(nnx.Module):
    def __init__(self, rngs):
        self.d1 = nnx.Linear(3, 6, param_dtype=F64, rngs=rngs)
        self.d2 = nnx.Linear(6, 2, param_dtype=F64, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.d1(x))
        self.sow(nnx.Intermediate, "h", h)
        return self.d2(h)


def test_nnx_module_entry_checks():
    """Rngs passed at every call are refused by name; what a call sows is not carried as state
    (the state keeps its structure from step to step); the initial parameters are committed,
    so a jitted step compiles once; a batch wrapped in NnxInputs is checked as a plain one."""
    from secondorder.errors import DTypeError

    x, y = _bn_data()
    with pytest.raises(SecondOrderError, match="store it on the module"):
        from_nnx(NnxMLP(nnx.Rngs(0)), kwargs={"rngs": nnx.Rngs(1)})
    model, params = from_nnx(Sowing(nnx.Rngs(0)), example=x)
    opt = KFAC(model, LOSS)
    step = model.make_step(opt)
    p, s, state = params, opt.init(params), model.state
    for _ in range(3):
        p, s, state, info = step(p, s, state, (x, y))
    assert bool(info.finite) and jax.tree_util.tree_leaves(state) == []
    if hasattr(step, "_cache_size"):
        assert step._cache_size() == 1
    model32, params32 = from_nnx(MixedMLP(nnx.Rngs(0), dtype=None), example=x.astype("float32"))
    opt32 = KFAC(model32, LOSS)
    with pytest.raises(DTypeError, match="float64"):
        opt32.step(params32, opt32.init(params32), (model32.inputs(x), y))


class MixedMLP(nnx.Module):
    """float32 parameters; the layers compute in ``dtype`` (bfloat16: mixed precision)."""

    def __init__(self, rngs, dtype):
        self.d1 = nnx.Linear(3, 6, dtype=dtype, rngs=rngs)
        self.d2 = nnx.Linear(6, 2, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.d2(jnp.tanh(self.d1(x)))


def test_a_layer_computing_in_bfloat16_keeps_its_forward_pass_and_float32_statistics():
    """Mixed precision (float32 parameters, bfloat16 computation): the tapped forward pass
    gives the module's own bfloat16 outputs bit for bit, the recorded input of the second layer
    is the module's own bfloat16 activation in float32, and jitted K-FAC steps it finitely."""
    x, y = _bn_data()
    x = x.astype("float32")
    net = MixedMLP(nnx.Rngs(0), dtype=jnp.bfloat16)
    model, params = from_nnx(net, example=x)
    out, recorded = model.apply(params, x, model.zero_taps(x, params))
    assert out.dtype == jnp.bfloat16 and bool(jnp.all(out == net(x)))
    hidden = jnp.tanh(net.d1(x))
    assert recorded[1].dtype == jnp.float32
    assert bool(jnp.all(recorded[1][:, :-1] == hidden.astype(jnp.float32)))
    opt = KFAC(model, LOSS, lr=0.1, damping=0.1)
    step, p, s = jax.jit(opt.step), params, opt.init(params)
    for _ in range(3):
        p, s, info = step(p, s, (x, y))
    assert bool(info.finite) and {str(a.dtype) for a in jax.tree_util.tree_leaves(p)} == {
        "float32"}


def test_nnx_optimizer_recipe_for_a_module_with_state_matches_make_step():
    """The docstring's recipe for nnx.Optimizer on a module with BatchNorm and Dropout (the
    module's state passed in NnxInputs, the updated state written back) steps as make_step:
    same parameters, same state."""
    from secondorder.integrations.optax import as_optax

    x, y = _bn_data()
    net = BNDropout(nnx.Rngs(0, dropout=1))
    model, params = from_nnx(net, example=x)
    opt = KFAC(model, LOSS, lr=0.05, damping=0.1, statistics_interval=1, inverse_interval=2)
    optimizer = nnx.Optimizer(net, as_optax(opt), wrt=nnx.Param)

    @nnx.jit
    def train(net, optimizer, x, y):
        inputs = model.inputs(x, nnx.state(net, nnx.Not(nnx.Param)))
        params = nnx.as_pure(nnx.state(net, nnx.Param))
        optimizer.update(net, None, batch=(inputs, y))
        nnx.update(net, model.update_state(params, inputs))

    step = model.make_step(opt)
    p, s, state = params, opt.init(params), model.state
    for _ in range(3):
        train(net, optimizer, x, y)
        p, s, state, _ = step(p, s, state, (x, y))
    assert max_diff(nnx.as_pure(nnx.state(net, nnx.Param)), p) < 1e-13
    assert max_diff(nnx.as_pure(nnx.state(net, nnx.Not(nnx.Param))), state) < 1e-13
