"""Layer taps of native layers that share their weight over positions: torch ``Conv1d`` and
``Linear`` on sequences, flax 1-D ``Conv`` and ``Dense`` on sequences.

Three independent references:

* the tap identity: for every tapped layer, sum_i sum_t delta_it a~_it^T (the per-sample loss
  gradients pulled back to the taps, times the recorded inputs) is the gradient of the summed
  loss with respect to [W b], which the framework's own autodiff computes from the module;
* the same layer written another way: a ``Conv1d`` is a ``Conv2d`` on a 1 x L image, and a
  ``Linear`` on (m, T, d) is a ``Conv1d`` with a kernel of 1 on (m, d, T); K-FAC steps both
  identically;
* the other framework: K-FAC on a torch network and on the same flax network, float64.
"""

from __future__ import annotations

import numpy as np
import pytest

from secondorder.curvature.kfac import layer_statistics
from secondorder.losses import SoftmaxCrossEntropy
from secondorder.models.layers import channels_last_to_reference

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from secondorder.integrations.torch import Optimizer  # noqa: E402
from secondorder.models import from_torch  # noqa: E402


def tap_gradients(model, params, x, y) -> list:
    """sum_i sum_t delta_it a~_it^T of every tapped layer, (d_out, d_in [+1]), from the taps."""
    loss = SoftmaxCrossEntropy()
    _, pairs = layer_statistics(model, params, x, lambda f: [loss.grad(f, y)],
                                lambda i, a, ds: (a, ds[0]))
    return [d.reshape(-1, d.shape[-1]).T @ a.reshape(-1, a.shape[-1]) for a, d in pairs]


def torch_layer_gradients(module, x, y) -> list:
    """[grad W  grad b] of every Linear / Conv1d layer of ``module`` for the summed loss, by
    torch's autograd on the module itself."""
    module.zero_grad()
    F.cross_entropy(module(x), y, reduction="sum").backward()
    out = []
    for sub in module.modules():
        if isinstance(sub, nn.Linear | nn.Conv1d):
            g = sub.weight.grad.reshape(sub.weight.shape[0], -1)
            out.append(g if sub.bias is None else torch.cat([g, sub.bias.grad[:, None]], 1))
    return out


class Conv1dNet(nn.Module):
    def __init__(self, **conv) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 3, **conv)
        self.conv2 = nn.Conv1d(3, 4, 3, stride=2, bias=False)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        a = torch.tanh(self.conv2(torch.tanh(self.conv(x))))
        return self.head(a.mean(dim=2))


class SequenceNet(nn.Module):
    """Linear layers on (m, ..., d) inputs, then a mean over the positions."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 6, bias=bias)
        self.mix = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        a = torch.tanh(self.mix(torch.tanh(self.embed(x))))
        return self.head(a.mean(dim=tuple(range(1, a.ndim - 1))) if a.ndim > 2 else a)


CONVS = [
    {"kernel_size": 3, "padding": 1},
    {"kernel_size": 4, "padding": "same"},
    {"kernel_size": 3, "padding": 2, "padding_mode": "reflect"},
    {"kernel_size": 3, "padding": 1, "padding_mode": "circular"},
    {"kernel_size": 3, "dilation": 2, "stride": 2},
]


@pytest.mark.parametrize("conv", CONVS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_torch_conv1d_taps_give_the_layer_gradients(conv):
    torch.manual_seed(0)
    module = Conv1dNet(**conv).double()
    x, y = torch.randn(6, 2, 11, dtype=torch.float64), torch.randint(0, 3, (6,))
    model, params = from_torch(module)
    assert [layer.kind for layer in model.layers] == ["conv", "conv", "dense"]
    for got, want in zip(tap_gradients(model, params, x, y),
                         torch_layer_gradients(module, x, y), strict=True):
        assert got.shape == want.shape
        assert torch.allclose(got, want, rtol=0.0, atol=1e-12)


@pytest.mark.parametrize("shape", [(6, 5, 4), (6, 2, 3, 4), (6, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_torch_linear_on_sequences_taps_give_the_layer_gradients(shape, bias):
    torch.manual_seed(1)
    module = SequenceNet(bias).double()
    x, y = torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (shape[0],))
    model, params = from_torch(module)
    positions = int(np.prod(shape[1:-1]))
    want_shapes = [(6, 6), (6, 5), (6, 3)] if positions == 1 else [
        (6, positions, 6), (6, positions, 5), (6, 3)]
    assert [tuple(s) for s in model.tap_shapes(x)] == want_shapes
    for got, want in zip(tap_gradients(model, params, x, y),
                         torch_layer_gradients(module, x, y), strict=True):
        assert torch.allclose(got, want, rtol=0.0, atol=1e-12)


def test_torch_taps_of_token_inputs_take_the_parameters_dtype():
    """Integer token indices do not decide the taps' dtype: a float32 network on token inputs
    gets float32 taps (a float64 tap used to promote its layers and crash LayerNorm)."""
    torch.manual_seed(2)
    module = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(),
                           nn.Flatten(), nn.Linear(6 * 5, 3))
    tokens, y = torch.randint(0, 10, (8, 5)), torch.randint(0, 3, (8,))
    model, params = from_torch(module)
    assert {t.dtype for t in model.zero_taps(tokens)} == {torch.float32}
    for got, want in zip(tap_gradients(model, params, tokens, y),
                         torch_layer_gradients(module, tokens, y), strict=True):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    opt = Optimizer(module, nn.CrossEntropyLoss(), "kfac", lr=0.1)
    losses = [float(opt.step((tokens, y))) for _ in range(3)]
    assert bool(opt.info.finite) and losses[-1] < losses[0]


def _kfac_runs(first: nn.Module, second: nn.Module, x1, x2, y, steps: int = 3,
               **options) -> tuple[list[float], list[float], float]:
    """K-FAC (exact GGN factors, statistics and inverses every step) on two networks that
    compute the same function with the same weights laid out differently: the losses of each
    run and the largest difference between their final weights."""
    opts = [Optimizer(m, nn.CrossEntropyLoss(), "kfac", lr=0.2, mode="exact",
                      statistics_interval=1, inverse_interval=1, **options)
            for m in (first, second)]
    losses = [[float(opt.step((x, y))) for _ in range(steps)] for opt, x in zip(opts, (x1, x2))]
    gap = max(float((p - q.reshape(p.shape)).abs().max())
              for p, q in zip(first.parameters(), second.parameters(), strict=True))
    return losses[0], losses[1], gap


def test_torch_conv1d_steps_as_a_conv2d_on_a_one_row_image():
    torch.manual_seed(3)
    one = nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(),
                        nn.Linear(3 * 6, 3)).double()
    two = nn.Sequential(nn.Conv2d(2, 3, (1, 3), stride=(1, 2), padding=(0, 1)), nn.Tanh(),
                        nn.Flatten(), nn.Linear(3 * 6, 3)).double()
    with torch.no_grad():
        for p, q in zip(one.parameters(), two.parameters(), strict=True):
            q.copy_(p.reshape(q.shape))
    x, y = torch.randn(10, 2, 11, dtype=torch.float64), torch.randint(0, 3, (10,))
    one_losses, two_losses, gap = _kfac_runs(one, two, x, x.unsqueeze(2), y)
    assert one_losses == pytest.approx(two_losses, rel=1e-12, abs=0.0)
    assert gap <= 1e-12


class PointwiseConv(nn.Module):
    """SequenceNet with each Linear written as a Conv1d of kernel 1 on (m, d, T)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.mix = nn.Conv1d(4, 6, 1), nn.Conv1d(6, 5, 1)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.mix(torch.tanh(self.embed(x)))).mean(dim=2))


@pytest.mark.parametrize("convention", ["kfc", "curvlinops"])
def test_torch_linear_on_sequences_steps_as_a_pointwise_conv1d(convention):
    """In both conventions for factors over positions; with the "equal" damping split, which
    tells the conventions apart."""
    torch.manual_seed(4)
    seq, conv = SequenceNet().double(), PointwiseConv().double()
    with torch.no_grad():
        for p, q in zip(seq.parameters(), conv.parameters(), strict=True):
            q.copy_(p.reshape(q.shape))
    x, y = torch.randn(10, 7, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    seq_losses, conv_losses, gap = _kfac_runs(seq, conv, x, x.transpose(1, 2), y,
                                              conv_convention=convention,
                                              damping_split="equal")
    assert seq_losses == pytest.approx(conv_losses, rel=1e-12, abs=0.0)
    assert gap <= 1e-12


# ---------------------------------------------------------------------------- flax

def _flax():
    jax = pytest.importorskip("jax")
    linen = pytest.importorskip("flax.linen")
    return jax, linen


def _flax_net(linen):
    class Net(linen.Module):
        """Conv1dNet's first two layers, then SequenceNet's mix on the positions."""

        @linen.compact
        def __call__(self, x):
            a = jnp_tanh(linen.Conv(3, (3,), padding=[(1, 1)], name="conv")(x))
            a = jnp_tanh(linen.Conv(4, (3,), strides=(2,), use_bias=False, padding="VALID",
                                    name="conv2")(a))
            a = jnp_tanh(linen.Dense(5, name="mix")(a))  # shared over the positions
            return linen.Dense(3, name="head")(a.mean(axis=1))

    return Net()


def jnp_tanh(a):
    import jax.numpy as jnp

    return jnp.tanh(a)


class TorchTwin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.conv2 = nn.Conv1d(3, 4, 3, stride=2, bias=False)
        self.mix = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        a = torch.tanh(self.conv2(torch.tanh(self.conv(x)))).transpose(1, 2)
        return self.head(torch.tanh(self.mix(a)).mean(dim=1))


def _flax_layer_gradients(jax, module, params, x, y) -> list:
    import jax.numpy as jnp

    def total(p):
        logits = module.apply({"params": p}, x)
        return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    grads = jax.grad(total)(params)
    out = []
    for name in ("conv", "conv2", "mix", "head"):
        g = channels_last_to_reference(grads[name]["kernel"])
        g = g.reshape(g.shape[0], -1)
        if "bias" in grads[name]:
            g = jnp.concatenate([g, grads[name]["bias"][:, None]], axis=1)
        out.append(g)
    return out


def test_flax_conv1d_and_dense_on_sequences_taps_give_the_layer_gradients():
    jax, linen = _flax()
    from secondorder.models import from_flax

    rng = np.random.default_rng(5)
    x = jax.numpy.asarray(rng.standard_normal((6, 11, 2)))  # (m, L, C)
    y = jax.numpy.asarray(rng.integers(0, 3, 6))
    module = _flax_net(linen)
    variables = jax.tree.map(lambda a: a.astype("float64"), module.init(jax.random.key(0), x))
    model, params = from_flax(module, variables, example=x)
    assert [layer.kind for layer in model.layers] == ["conv", "conv", "dense", "dense"]
    assert [tuple(s) for s in model.tap_shapes(x)] == [(6, 11, 3), (6, 5, 4), (6, 5, 5), (6, 3)]
    for got, want in zip(tap_gradients(model, params, x, y),
                         _flax_layer_gradients(jax, module, params, x, y), strict=True):
        assert got.shape == want.shape
        assert float(np.max(np.abs(np.asarray(got) - np.asarray(want)))) < 1e-12


def test_kfac_steps_agree_on_torch_and_flax_weight_shared_layers():
    """K-FAC, float64, exact factors, statistics and inverses every step: a torch network of
    Conv1d and Linear-on-sequence layers and the same flax network (1-D Conv, Dense on the
    positions) take the same three steps."""
    jax, linen = _flax()
    from secondorder.models import from_flax
    from secondorder.optim import KFAC

    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((10, 2, 11)), rng.integers(0, 3, 10)
    torch.manual_seed(6)
    twin = TorchTwin().double()
    t_model, t_params = from_torch(twin)
    module = _flax_net(linen)
    x_nlc = jax.numpy.asarray(np.transpose(x, (0, 2, 1)))
    f_model, f_params = from_flax(module, module.init(jax.random.key(0), x_nlc),
                                  example=x_nlc)
    # the torch weights, in flax's layouts
    f_params = {name: {"kernel": jax.numpy.asarray(
        np.transpose(t_params[f"{name}.weight"].numpy(),
                     (1, 0) if name in ("mix", "head") else (2, 1, 0))),
        **({"bias": jax.numpy.asarray(t_params[f"{name}.bias"].numpy())}
           if f"{name}.bias" in t_params else {})}
        for name in ("conv", "conv2", "mix", "head")}
    options = {"lr": 0.2, "mode": "exact", "statistics_interval": 1, "inverse_interval": 1}
    runs = []
    for model, params, batch in (
            (t_model, t_params, (torch.from_numpy(x), torch.from_numpy(y))),
            (f_model, f_params, (x_nlc, jax.numpy.asarray(y)))):
        opt = KFAC(model, SoftmaxCrossEntropy(), **options)
        state = opt.init(params)
        losses = []
        for _ in range(3):
            params, state, info = opt.step(params, state, batch)
            losses.append(float(info.loss))
        runs.append((params, losses))
    (t_out, t_losses), (f_out, f_losses) = runs
    assert np.allclose(t_losses, f_losses, rtol=1e-12, atol=0.0)
    for name in ("conv", "conv2", "mix", "head"):
        w = channels_last_to_reference(f_out[name]["kernel"])
        assert np.max(np.abs(np.asarray(w) - t_out[f"{name}.weight"].numpy())) < 1e-12


def test_a_tied_weight_is_tapped_in_the_layer_that_registers_it():
    """``b.weight = a.weight``: one parameter, named a.weight; layer a is tapped with it and
    layer b is not (its bias is an untapped leaf), and the tap identity still holds for a."""
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))

    torch.manual_seed(7)
    module = Tied().double()
    model, params = from_torch(module)
    names = sorted(params)  # the layer table's leaf indices are in the sorted-name order
    assert "b.weight" not in names
    assert [(names[layer.weight], names[layer.bias]) for layer in model.layers] == [
        ("a.weight", "a.bias"), ("head.weight", "head.bias")]
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    tap_a = tap_gradients(model, params, x, y)[0]
    # the tap of layer a alone: its own use of the weight, without layer b's
    out_a = module.a(x).detach().requires_grad_(True)
    loss = F.cross_entropy(module.head(torch.tanh(module.b(torch.tanh(out_a)))), y,
                           reduction="sum")
    (delta,) = torch.autograd.grad(loss, out_a)
    want = delta.T @ torch.cat([x, torch.ones(6, 1, dtype=torch.float64)], 1)
    assert torch.allclose(tap_a, want, rtol=0.0, atol=1e-12)


def test_an_output_layer_tied_to_the_embedding_is_tapped():
    """``head.weight = emb.weight`` (a language model's tied output layer): the parameter is
    named emb.weight, the embedding is not tapped, and the head is, with that weight: K-FAC's
    factors equal those of the same network with the weight untied (a copy), whose head is
    tapped as any Linear."""
    from secondorder.optim import KFAC

    class LM(nn.Module):
        def __init__(self, tie: bool) -> None:
            super().__init__()
            self.emb, self.mid, self.head = nn.Embedding(11, 6), nn.Linear(6, 6), nn.Linear(6, 11)
            if tie:
                self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(torch.tanh(self.mid(self.emb(x))))

    torch.manual_seed(8)
    tied = LM(True).double()
    untied = LM(False).double()
    untied.load_state_dict({**tied.state_dict(), "head.weight": tied.emb.weight.detach()})
    model, params = from_torch(tied)
    names = sorted(params)
    assert [(names[layer.weight], names[layer.bias]) for layer in model.layers] == [
        ("mid.weight", "mid.bias"), ("emb.weight", "head.bias")]
    x = torch.randint(0, 11, (5, 4))
    opts = {"mode": "exact", "statistics_interval": 1, "inverse_interval": 1}
    batch = (x, torch.randint(0, 11, (5, 4)))
    factors = []
    for net in (tied, untied):
        apply, p = from_torch(net)
        opt = KFAC(apply, SoftmaxCrossEntropy(), **opts)
        _, state, info = opt.step(p, opt.init(p), batch)
        assert bool(info.finite)
        factors.append([np.asarray(f) for block in state.blocks for f in block.factors])
    for a, b in zip(*factors, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


def test_smw_takes_the_jacobian_gram_when_a_tapped_weight_is_tied():
    """A tap sees one module's use of a tied weight, so SMW's Gram matrix from taps would miss
    the embedding's share of J: gram='auto' takes the Jacobian (the step equals
    gram='jacobian'), gram='taps' refuses with a named error. A bias tied between two Linears
    is tapped once (the second layer is left untapped)."""
    from secondorder.errors import StructureError
    from secondorder.optim import SMWGN

    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.head = nn.Embedding(7, 4), nn.Linear(4, 7)
            self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(torch.tanh(self.emb(x).mean(1)))

    torch.manual_seed(0)
    apply, params = from_torch(Pooled().double())
    x, y = torch.randint(0, 7, (6, 3)), torch.randint(0, 7, (6,))
    steps = []
    for gram in ("auto", "jacobian"):
        opt = SMWGN(apply, SoftmaxCrossEntropy(), gram=gram)
        steps.append(opt.step(params, opt.init(params), (x, y))[0])
    for name in params:
        assert torch.allclose(steps[0][name], steps[1][name], rtol=1e-13, atol=1e-15), name
    opt = SMWGN(apply, SoftmaxCrossEntropy(), gram="taps")
    with pytest.raises(StructureError, match="tied"):
        opt.step(params, opt.init(params), (x, y))
    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).double()
    net[2].bias = net[0].bias
    model, params = from_torch(net)
    names = sorted(params)
    assert [(names[layer.weight], names[layer.bias]) for layer in model.layers] == [
        ("0.weight", "0.bias")]


class TimeMajor(nn.Module):
    """A Linear on a time-major (T, m, d) sequence, or on the rows flattened to (m T, d)."""

    def __init__(self, flatten: bool) -> None:
        super().__init__()
        self.flatten = flatten
        self.mix, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):  # x: (m, T, 4)
        m = x.shape[0]
        if self.flatten:
            return self.head(torch.tanh(self.mix(x.reshape(-1, 4))).reshape(m, -1, 5).mean(1))
        return self.head(torch.tanh(self.mix(x.transpose(0, 1))).mean(0))


@pytest.mark.parametrize("flatten", [False, True])
def test_a_layer_that_sees_the_batch_off_its_first_axis_is_refused(flatten):
    """Taps read a layer's input rows as samples: a time-major or flattened layout would give
    factors off by m / T (and per-sample Gram matrices of the wrong rows), so it is refused
    by name before any step."""
    from secondorder.errors import UnsupportedModelError

    x, y = torch.randn(8, 3, 4), torch.randint(0, 3, (8,))
    for method in ("kfac", "smw-ng"):
        module = TimeMajor(flatten)
        opt = Optimizer(module, nn.CrossEntropyLoss(), method)
        before = [p.detach().clone() for p in module.parameters()]
        with pytest.raises(UnsupportedModelError, match="'mix'.*batch axis first"):
            opt.step((x, y))
        assert all(torch.equal(p, q) for p, q in zip(module.parameters(), before))


def test_flax_conv_with_an_int_kernel_is_one_dimensional():
    """flax reads kernel_size=3 as a 1-D kernel (3,): tapped so, the taps give the layer
    gradients; a 1-D kernel over two spatial axes (flax's extra batch axes) is refused."""
    jax, linen = _flax()
    from secondorder.errors import ShapeError
    from secondorder.models import from_flax

    class Net(linen.Module):
        @linen.compact
        def __call__(self, x):
            a = jnp_tanh(linen.Conv(3, kernel_size=3, name="conv")(x))
            return linen.Dense(3, name="head")(a.reshape(a.shape[0], -1))

    rng = np.random.default_rng(9)
    x = jax.numpy.asarray(rng.standard_normal((5, 9, 2)))
    y = jax.numpy.asarray(rng.integers(0, 3, 5))
    module = Net()
    variables = jax.tree.map(lambda a: a.astype("float64"), module.init(jax.random.key(0), x))
    model, params = from_flax(module, variables, example=x)
    assert [tuple(s) for s in model.tap_shapes(x)] == [(5, 9, 3), (5, 3)]
    grads = jax.grad(lambda p: -jax.numpy.sum(jax.numpy.take_along_axis(
        jax.nn.log_softmax(module.apply({"params": p}, x)), y[:, None], 1)))(params)
    got = tap_gradients(model, params, x, y)[0]
    g = channels_last_to_reference(grads["conv"]["kernel"])
    want = jax.numpy.concatenate([g.reshape(3, -1), grads["conv"]["bias"][:, None]], axis=1)
    assert float(np.max(np.abs(np.asarray(got) - np.asarray(want)))) < 1e-12
    x4 = jax.numpy.asarray(rng.standard_normal((5, 2, 9, 2)))
    wide = Net()
    with pytest.raises(ShapeError, match="1-D kernel"):
        from_flax(wide, wide.init(jax.random.key(0), x4), example=x4)
