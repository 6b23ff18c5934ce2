"""Reference models: identical on every backend, checked against NumPy and torch.nn oracles, and
their taps give each layer's homogeneous input and output gradient (the K-FAC statistics)."""

from __future__ import annotations

import functools
import importlib.util

import numpy as np
import pytest

from helpers import assert_close, back, to
from secondorder import backends, tree
from secondorder.errors import SecondOrderError
from secondorder.models import (
    AUTOENCODER_SIZES,
    MLP,
    Autoencoder,
    ConvNet,
    LayerInfo,
    from_jax,
    from_torch,
)
from secondorder.models.layers import im2col

HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")

NP_ACT = {
    "tanh": np.tanh,
    "relu": lambda z: np.maximum(z, 0.0),
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    "silu": lambda z: z / (1.0 + np.exp(-z)),
}
MLPS = [MLP((4, 6, 5, 3), a) for a in NP_ACT] + [Autoencoder((6, 5, 2, 5, 6), "relu")]
CONV_CFGS = [  # in_shape, channels, dense, padding, pool, activation
    ((1, 6, 6), (2,), (4, 3), 0, "avg", "silu"),
    ((1, 6, 6), (2,), (3,), 0, "max", "tanh"),
    ((2, 5, 5), (2, 3), (4, 3), 1, "avg", "relu"),
    ((1, 6, 6), (3, 2), (3,), 1, "max", "sigmoid"),
]
CONVS = [ConvNet(s, c, d, padding=p, pool=q, activation=a) for s, c, d, p, q, a in CONV_CFGS]
MODELS = MLPS + CONVS


def batch(model, rng, m=4):
    shape = (model.sizes[0],) if isinstance(model, MLP) else model.in_shape
    return rng.standard_normal((m, *shape))


def sample(model, m=4):
    """Seeded initial weights with random (non-zero) biases, and a batch, as NumPy arrays."""
    rng = np.random.default_rng(5)
    params = model.init(3, "numpy")
    for p in params:
        p["b"] = rng.standard_normal(p["b"].shape)
    return params, batch(model, rng, m)


def hom(a):
    return np.concatenate([a, np.ones((*a.shape[:-1], 1))], axis=-1)


def np_mlp(model, params, x):
    """Explicit forward pass: outputs and each layer's homogeneous input."""
    a, inputs = x, []
    for i, p in enumerate(params):
        inputs.append(hom(a))
        a = a @ p["w"].T + p["b"]
        if i not in model.linear:
            a = NP_ACT[model.activation](a)
    return a, inputs


def loop_patches(x, k, stride=1, pad=0):
    """im2col by loops: row = output position (row-major), columns (c, i, j) then a 1."""
    m, c, h, w = x.shape
    xpad = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    out = np.ones((m, ho * wo, c * k * k + 1))
    for n in range(m):
        for r in range(ho):
            for s in range(wo):
                out[n, r * wo + s, :-1] = [xpad[n, ci, r * stride + i, s * stride + j]
                                           for ci in range(c) for i in range(k) for j in range(k)]
    return out


def np_convnet(model, params, x):
    """Explicit forward pass: outputs and each layer's raw input (4-D for conv layers)."""
    act, k, n_conv = NP_ACT[model.activation], model.kernel, len(model.channels)
    a, inputs = x, []
    for p in params[:n_conv]:
        inputs.append(a)
        m, _, h, w = a.shape
        ho, wo = h + 2 * model.padding - k + 1, w + 2 * model.padding - k + 1
        kernel = np.concatenate([p["w"].reshape(len(p["b"]), -1), p["b"][:, None]], axis=1)
        s = loop_patches(a, k, 1, model.padding) @ kernel.T  # (m, positions, C_out)
        s = act(s.transpose(0, 2, 1).reshape(m, -1, ho, wo))
        blocks = s[:, :, : ho // 2 * 2, : wo // 2 * 2].reshape(m, -1, ho // 2, 2, wo // 2, 2)
        a = blocks.mean(axis=(3, 5)) if model.pool == "avg" else blocks.max(axis=(3, 5))
    a = a.reshape(len(a), -1)
    for j, p in enumerate(params[n_conv:]):
        inputs.append(a)
        a = a @ p["w"].T + p["b"]
        if j < len(model.dense_sizes) - 1:
            a = act(a)
    return a, inputs


def torch_sequential(model, params):
    """The torch.nn.Sequential equivalent of a ConvNet, float64, with ``params`` copied in."""
    import torch
    from torch import nn

    act = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "silu": nn.SiLU}
    pool = {"avg": nn.AvgPool2d, "max": nn.MaxPool2d}[model.pool]
    mods, c = [], model.in_shape[0]
    for c_out in model.channels:
        mods += [nn.Conv2d(c, c_out, model.kernel, padding=model.padding),
                 act[model.activation](), pool(2)]
        c = c_out
    mods.append(nn.Flatten())
    d = model.features
    for j, d_out in enumerate(model.dense_sizes):
        mods.append(nn.Linear(d, d_out))
        if j < len(model.dense_sizes) - 1:
            mods.append(act[model.activation]())
        d = d_out
    seq = nn.Sequential(*mods).double()
    layers = [mod for mod in seq if isinstance(mod, nn.Conv2d | nn.Linear)]
    with torch.no_grad():
        for mod, p in zip(layers, params):
            mod.weight.copy_(torch.from_numpy(p["w"]))
            mod.bias.copy_(torch.from_numpy(p["b"]))
    return seq


@functools.cache
def forward(name, model):
    """(f, f with zero taps, tap inputs) on backend ``name`` for ``sample(model)``, in NumPy;
    one jax.jit per model on jax, which is slow op by op."""
    backend = backends.get(name)

    def f(params, x):
        return model.apply(params, x), *model.apply(params, x, model.zero_taps(x))

    if backend.has_jit:
        import jax

        f = jax.jit(f)
    return back(backend, f(*to(backend, sample(model))))


def tap_results(backend, model, params, x):
    """(deltas, inputs, param grads) in NumPy for L = 0.5 mean_i ||f_i||^2 (jitted on jax,
    which is slow op by op)."""
    xp = backend.xp
    assert [tuple(t.shape) for t in model.zero_taps(x)] == [tuple(s) for s in model.tap_shapes(x)]

    def loss(f):
        return 0.5 * xp.sum(f * f) / f.shape[0]

    def compute(params, x):
        taps = model.zero_taps(x)
        f, pullback = backend.vjp(lambda t: model.apply(params, x, t)[0], taps)
        inputs = model.apply(params, x, taps)[1]
        grads = backend.grad(lambda p: loss(model.apply(p, x)), params)
        return pullback(f / f.shape[0]), inputs, grads

    if backend.has_jit:
        import jax

        compute = jax.jit(compute)
    return back(backend, compute(params, x))


# --------------------------------------------------------------- 1. same on every backend
@pytest.mark.parametrize("model", MODELS, ids=repr)
def test_same_weights_and_outputs_on_every_backend(backend, model, rng):
    ref = model.init(7, "numpy")
    params = model.init(7, backend)
    for a, e in zip(tree.leaves(back(backend, params)), tree.leaves(ref), strict=True):
        assert a.dtype == e.dtype and np.array_equal(a, e)
    x = batch(model, rng)
    assert_close(model.apply(params, to(backend, x)), model.apply(ref, x), backend=backend)
    assert_close(model(params, to(backend, x)), model.apply(ref, x), backend=backend)


# ------------------------------------------------------------------- 2. independent oracles
@pytest.mark.parametrize("model", MLPS, ids=repr)
def test_mlp_matches_explicit_numpy(backend, model):
    assert_close(forward(backend.name, model)[0], np_mlp(model, *sample(model))[0])


@pytest.mark.parametrize("model", CONVS, ids=repr)
def test_convnet_matches_explicit_numpy(backend, model):
    assert_close(forward(backend.name, model)[0], np_convnet(model, *sample(model))[0])


@needs_torch
@pytest.mark.parametrize("model", CONVS, ids=repr)
def test_convnet_matches_torch_sequential_and_adapter(model):
    import torch

    params, x = sample(model)
    seq = torch_sequential(model, params)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        expected = seq(xt).numpy()
    assert_close(model.apply(params, x), expected)
    adapter, tparams = from_torch(seq)
    assert_close(adapter.apply(tparams, xt).detach().numpy(), expected)


# ------------------------------------------------------------------------------ 3. taps
@pytest.mark.parametrize("model", MODELS, ids=repr)
def test_zero_taps_leave_outputs_unchanged(backend, model):
    out, tapped, inputs = forward(backend.name, model)
    assert np.array_equal(tapped, out)
    shapes = model.tap_shapes(sample(model)[1])
    assert len(inputs) == len(shapes) == len(model.layers)
    for info, a, t in zip(model.layers, inputs, shapes, strict=True):
        assert a.shape[:-1] == t[:-1]
        assert (a.shape[-1], t[-1]) == (info.in_features + 1, info.out_features)


@pytest.mark.parametrize("model", MLPS, ids=repr)
def test_mlp_tap_inputs_are_homogeneous_activations(backend, model):
    assert_close(forward(backend.name, model)[2], np_mlp(model, *sample(model))[1])


@pytest.mark.parametrize("model", CONVS, ids=repr)
def test_convnet_tap_inputs_are_patches(backend, model):
    inputs = forward(backend.name, model)[2]
    raw = np_convnet(model, *sample(model))[1]
    n_conv = len(model.channels)
    expected = [loop_patches(a, model.kernel, 1, model.padding) for a in raw[:n_conv]]
    assert_close(inputs, expected + [hom(a) for a in raw[n_conv:]])
    if HAS_TORCH:
        import torch

        for a, got in zip(raw[:n_conv], inputs):
            unf = torch.nn.functional.unfold(torch.from_numpy(a), model.kernel,
                                             padding=model.padding).transpose(1, 2).numpy()
            assert_close(got[..., :-1], unf)


@pytest.mark.parametrize(("k", "stride", "pad"), [(3, 1, 0), (3, 1, 1), (2, 2, 0), (3, 2, 1)])
def test_im2col_matches_loops(backend, rng, k, stride, pad):
    x = rng.standard_normal((2, 2, 5, 5))
    expected = loop_patches(x, k, stride, pad)[..., :-1]
    assert_close(im2col(to(backend, x), k, k, stride, pad), expected, backend=backend)


# ------------------------------------------------------------------ 4. taps give gradients
@pytest.mark.parametrize("model", MODELS, ids=repr)
def test_tap_deltas_give_parameter_gradients(ad_backend, model):
    params, x = sample(model)
    deltas, inputs, grads = tap_results(ad_backend, model, to(ad_backend, params),
                                        to(ad_backend, x))
    leaves = tree.leaves(grads)
    for info, d, a, p in zip(model.layers, deltas, inputs, params, strict=True):
        gw, gb = leaves[info.weight], leaves[info.bias]
        assert gw.shape == p["w"].shape and gb.shape == p["b"].shape
        if info.kind == "conv":  # sum over samples and output positions
            assert_close(gb, d.sum(axis=(0, 1)))
            assert_close(gw, np.einsum("mto,mtk->ok", d, a[..., :-1]).reshape(p["w"].shape))
        else:
            assert_close(gb, d.sum(axis=0))
            assert_close(gw, d.T @ a[..., :-1])


@needs_torch
@pytest.mark.parametrize("model", CONVS, ids=repr)
def test_torch_adapter_taps_match_reference(model):
    import torch

    torch_backend = backends.get("torch")
    params, x = sample(model)
    adapter, tparams = from_torch(torch_sequential(model, params))
    assert [(i.kind, i.in_features, i.out_features) for i in adapter.layers] == [
        (i.kind, i.in_features, i.out_features) for i in model.layers]
    xt = torch.from_numpy(x)
    assert adapter.tap_shapes(xt) == model.tap_shapes(xt)
    got = tap_results(torch_backend, adapter, tparams, xt)
    expected = tap_results(torch_backend, model, to(torch_backend, params), xt)
    assert_close(got[:2], expected[:2])
    for info, ref in zip(adapter.layers, model.layers):
        assert_close([tree.leaves(got[2])[info.bias], tree.leaves(got[2])[info.weight]],
                     [tree.leaves(expected[2])[ref.bias], tree.leaves(expected[2])[ref.weight]])


# ---------------------------------------------------------------------- 5. LayerInfo metadata
@pytest.mark.parametrize("model", MODELS, ids=repr)
def test_layer_info_points_at_leaves(model):
    leaves = tree.leaves(model.init(0, "numpy"))
    assert len(leaves) == 2 * len(model.layers)
    for i, info in enumerate(model.layers):
        assert (info.bias, info.weight) == (2 * i, 2 * i + 1)
        w, b = leaves[info.weight], leaves[info.bias]
        assert b.shape == (info.out_features,)
        assert w.shape[0] == info.out_features and w[0].size == info.in_features
        assert w.ndim == (4 if info.kind == "conv" else 2)


def test_mlp_layer_info_and_tap_shapes():
    model = MLP((4, 6, 3))
    assert model.layers == (LayerInfo("dense", 1, 0, 4, 6), LayerInfo("dense", 3, 2, 6, 3))
    assert model.tap_shapes(np.zeros((5, 4))) == [(5, 6), (5, 3)]
    conv = ConvNet((2, 5, 5), (2, 3), (4,), padding=1)
    assert conv.layers[0] == LayerInfo("conv", 1, 0, 18, 2)
    assert conv.layers[1] == LayerInfo("conv", 3, 2, 18, 3)
    assert conv.layers[2] == LayerInfo("dense", 5, 4, 3, 4)
    assert conv.tap_shapes(np.zeros((3, 2, 5, 5))) == [(3, 25, 2), (3, 4, 3), (3, 4)]


@needs_torch
def test_torch_adapter_leaf_indices_follow_sorted_names(rng):
    import torch
    from torch import nn

    mods = [nn.Linear(3, 4)] + [m for _ in range(5) for m in (nn.Tanh(), nn.Linear(4, 4))]
    mods.append(nn.Linear(4, 2, bias=False))
    seq = nn.Sequential(*mods).double()  # names "10.weight" sort before "2.weight"
    adapter, tparams = from_torch(seq)
    leaves = tree.leaves(tparams)
    linears = [m for m in seq if isinstance(m, nn.Linear)]
    for info, mod in zip(adapter.layers, linears, strict=True):
        assert torch.equal(leaves[info.weight], mod.weight)
        assert info.bias is None if mod.bias is None else torch.equal(leaves[info.bias], mod.bias)
    xt = torch.from_numpy(rng.standard_normal((3, 3)))
    _, inputs = adapter.apply(tparams, xt, adapter.zero_taps(xt))
    assert [tuple(a.shape) for a in inputs] == [(3, 4)] + [(3, 5)] * 5 + [(3, 4)]


def test_autoencoder_code_layer_is_linear():
    model = Autoencoder((6, 5, 2, 5, 6), "relu")
    assert model.linear == {1, 3}
    params, x = sample(model, 5)
    out, inputs = model.apply(params, x, model.zero_taps(x))
    code = inputs[2][:, :-1]
    assert (code < 0).any(), "a relu code layer cannot be negative"
    expected_out, expected_inputs = np_mlp(model, params, x)
    assert_close(code, expected_inputs[2][:, :-1])
    assert_close(out, expected_out)


@pytest.mark.parametrize(("name", "code"), [("mnist", 3), ("faces", 3), ("curves", 5)])
def test_autoencoder_sizes_build(name, code):
    sizes = AUTOENCODER_SIZES[name]
    model = Autoencoder(sizes)
    n = len(sizes) - 1
    assert model.linear == {code, n - 1} and len(model.layers) == n
    assert [(i.in_features, i.out_features) for i in model.layers] == list(
        zip(sizes[:-1], sizes[1:]))
    assert model.tap_shapes(np.zeros((2, sizes[0]))) == [(2, d) for d in sizes[1:]]


# ------------------------------------------------------------------ 6. bad configuration
BAD = {
    "mlp-activation": lambda: MLP((3, 2), "bogus"),
    "autoencoder-activation": lambda: Autoencoder((4, 2, 4), "bogus"),
    "convnet-activation": lambda: ConvNet((1, 6, 6), (2,), (3,), activation="bogus"),
    "convnet-pool": lambda: ConvNet((1, 6, 6), (2,), (3,), pool="bogus"),  # at construction
    "mlp-one-size": lambda: MLP((3,)),
    "convnet-too-small": lambda: ConvNet((1, 4, 4), (2, 2), (3,), padding=0),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_configuration_raises(name):
    with pytest.raises(ValueError):
        BAD[name]()


def test_from_jax_wraps_function_without_taps(rng):
    jnp = pytest.importorskip("jax.numpy")

    def apply_fn(p, x):
        return jnp.tanh(x @ p["w"]) + p["b"]

    params = {"w": jnp.asarray(rng.standard_normal((3, 2))), "b": jnp.asarray(rng.random(2))}
    model, same = from_jax(apply_fn, params)
    x = jnp.asarray(rng.standard_normal((4, 3)))
    assert same is params and model.layers == () and model.tap_shapes(x) == []
    assert_close(np.asarray(model.apply(params, x)), np.asarray(apply_fn(params, x)))
    assert_close(np.asarray(model(params, x)), np.asarray(apply_fn(params, x)))
    with pytest.raises(SecondOrderError):
        model.apply(params, x, [])


def test_a_zero_taps_override_with_the_old_signature_keeps_working():
    """A Model subclass written against the one-argument ``zero_taps(self, x)`` of earlier
    releases: K-FAC (which calls ``zero_taps(x, params)``) steps it as the plain MLP."""
    from secondorder.losses import SoftmaxCrossEntropy
    from secondorder.optim import KFAC

    class OldTaps(MLP):
        def zero_taps(self, x):
            xp = backends.namespace(x)
            return [xp.zeros(s, dtype=x.dtype) for s in self.tap_shapes(x)]

    rng = np.random.default_rng(0)
    b = backends.get("numpy")
    x, y = b.asarray(rng.standard_normal((6, 4))), b.asarray(rng.integers(0, 3, 6))
    runs = []
    for model in (OldTaps([4, 5, 3]), MLP([4, 5, 3])):
        opt = KFAC(model, SoftmaxCrossEntropy(), lr=0.1, damping=0.1)
        params = model.init(0, b)
        state = opt.init(params)
        for _ in range(2):
            params, state, info = opt.step(params, state, (x, y))
        runs.append(params)
    assert tree.norm(tree.sub(runs[0], runs[1])) < 1e-14
    assert bool(info.finite)
