"""torch attention (``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``) and ``nn.LSTM``
under the methods.

References, all outside the library's own derivative code:

* torch's autograd on the module itself: the gradients of the tapped layers (the tap identity,
  sum_i sum_t delta_it a~_it^T = grad [W b] of the summed loss) and of the attention
  projections that K-FAC steps with its SGD fallback;
* reverse mode for forward mode: the Jacobian by ``torch.autograd.functional.jacobian`` (one
  VJP per output, through the fused attention kernel's and oneDNN's LSTM backward) times v
  against the library's JVP, which needs other kernels' forward-mode formulas;
* the curvature operators and SMW-GN / SMW-NG steps on a sequence's logits (m, T, k) against
  brute force: the Hessian of the mean loss by ``torch.autograd.functional.hessian`` of
  ``F.cross_entropy`` (equal to the GGN for a network linear in its parameters), and the
  empirical Fisher from per-sample gradients by autograd, on numpy, torch and jax; the SMW
  steps are -(B + lambda I)^{-1} g solved densely.
"""

from __future__ import annotations

import numpy as np
import pytest

from secondorder import backends, tree
from secondorder.curvature import GGN, Fisher
from secondorder.curvature.kfac import layer_statistics
from secondorder.errors import ShapeError
from secondorder.losses import SoftmaxCrossEntropy
from secondorder.optim import SMWGN, SMWNG

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from secondorder.backends import torch as torch_backend  # noqa: E402
from secondorder.integrations.torch import Optimizer  # noqa: E402
from secondorder.models import from_torch  # noqa: E402

V, D, T, B = 11, 8, 5, 4


class TinyLM(nn.Module):
    """Embedding, one Transformer encoder layer (4 heads, no dropout), output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.layer = nn.TransformerEncoderLayer(D, 4, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(D, V)

    def forward(self, x):
        return self.head(self.layer(self.emb(x)))


def _lm(train: bool):
    torch.manual_seed(0)
    module = TinyLM().double().train(train)
    x = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    return module, x, torch.roll(x, -1, 1)


@pytest.mark.parametrize("train", [True, False])
def test_transformer_layer_taps_give_the_feed_forward_and_head_gradients(train):
    """linear1, linear2 and head are tapped (and out_proj, applied by F.linear inside
    nn.MultiheadAttention, is not); their taps give torch's gradients, in train mode and in eval
    mode. (The hooks of a tapped pass turn torch's fused inference path off by themselves; the
    untapped pass is covered by the eval-mode JVP test below.)"""
    module, x, y = _lm(train)
    model, params = from_torch(module)
    tapped = [model.names[layer.weight] for layer in model.layers]
    assert tapped == ["layer.linear1.weight", "layer.linear2.weight", "head.weight"]
    loss = SoftmaxCrossEntropy()
    _, pairs = layer_statistics(model, params, x, lambda f: [loss.grad(f, y)],
                                lambda i, a, ds: (a, ds[0]))
    module.zero_grad()
    F.cross_entropy(module(x).reshape(-1, V), y.reshape(-1), reduction="sum").backward()
    for (a, d), sub in zip(pairs, (module.layer.linear1, module.layer.linear2, module.head)):
        ours = d.reshape(-1, d.shape[-1]).T @ a.reshape(-1, a.shape[-1])
        theirs = torch.cat([sub.weight.grad, sub.bias.grad[:, None]], 1)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_kfac_steps_the_attention_projections_with_its_fallback():
    """K-FAC runs on a Transformer layer: the attention's parameters (in_proj, out_proj), the
    norms and the embedding take the SGD fallback, -lr g with autograd's g at the first step
    (momentum 0), while the tapped layers take a preconditioned step."""
    module, x, y = _lm(True)
    module.zero_grad()
    F.cross_entropy(module(x).reshape(-1, V), y.reshape(-1)).backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    lr = 0.1
    opt = Optimizer(module, SoftmaxCrossEntropy(outputs="mean"), "kfac", lr=lr, momentum=0.0,
                    statistics_interval=1, inverse_interval=1)
    opt.step((x, y))
    assert bool(opt.info.finite)
    after = dict(module.named_parameters())
    for name in ("layer.self_attn.out_proj.weight", "layer.self_attn.out_proj.bias",
                 "layer.self_attn.in_proj_weight", "layer.norm1.weight", "emb.weight"):
        torch.testing.assert_close(after[name].detach() - before[name], -lr * grads[name],
                                   rtol=1e-10, atol=1e-14)
    moved = after["layer.linear1.weight"].detach() - before["layer.linear1.weight"]
    assert not torch.allclose(moved, -lr * grads["layer.linear1.weight"], rtol=1e-3)


@pytest.mark.parametrize("train", [True, False])
def test_jvp_through_attention_is_reverse_modes(train, monkeypatch):
    """The library's JVP of the Transformer model (whose attention kernel has no forward-mode
    formula, so the math kernel takes over) against the reverse-mode Jacobian times v,
    float64."""
    monkeypatch.setattr(torch_backend, "_FORWARD_MODE_KEPT", set())
    module, x, _ = _lm(train)
    model, params = from_torch(module)
    gen = torch.Generator().manual_seed(2)
    v = {n: torch.randn(p.shape, dtype=p.dtype, generator=gen) for n, p in params.items()}
    b = backends.get("torch")
    out, tangent = b.jvp(lambda p: model.apply(p, x), params, v)
    assert torch_backend._FORWARD_MODE_KEPT == {"attention"}

    def f(*leaves):
        return model.apply(dict(zip(params, leaves)), x)

    torch.testing.assert_close(tangent, _reverse_mode_jvp(f, params, v), rtol=1e-10,
                               atol=1e-12)
    torch.testing.assert_close(out, f(*params.values()), rtol=1e-12, atol=1e-12)


def _reverse_mode_jvp(f, params, v):
    """J v from the Jacobian of ``f`` (a function of the leaves in ``params``' order) by
    ``torch.autograd.functional.jacobian``: one VJP per output entry."""
    leaves = tuple(params.values())
    out = f(*leaves)
    jacobians = torch.autograd.functional.jacobian(f, leaves)
    return sum((j.reshape(out.numel(), -1) @ t.reshape(-1)).reshape(out.shape)
               for j, t in zip(jacobians, v.values()))


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 6, num_layers=2, batch_first=True)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def test_jvp_through_an_lstm_is_reverse_modes():
    """nn.LSTM in float32 on CPU runs oneDNN's kernel, which has no forward-mode formula; the
    JVP runs on aten's kernels instead, and equals the reverse-mode Jacobian times v of the same
    network in float64 (to float32's rounding). oneDNN stays on afterwards."""
    torch.manual_seed(0)
    module = Recurrent()
    x = torch.randn(5, 4, 3)
    if torch.backends.mkldnn.is_available() and torch._C._get_mkldnn_enabled():
        from torch.autograd import forward_ad
        with pytest.raises(NotImplementedError, match="mkldnn"), forward_ad.dual_level():
            module(forward_ad.make_dual(x, torch.ones_like(x)))  # the kernel the retry replaces
    model, params = from_torch(module)
    gen = torch.Generator().manual_seed(2)
    v = {n: torch.randn(p.shape, generator=gen) for n, p in params.items()}
    mkldnn = torch._C._get_mkldnn_enabled()
    _, tangent = backends.get("torch").jvp(lambda p: model.apply(p, x), params, v)
    assert tangent.dtype == torch.float32
    assert torch._C._get_mkldnn_enabled() == mkldnn

    double, params64 = from_torch(Recurrent().double())
    params64 = {n: p.double() for n, p in params.items()}

    def f(*leaves):
        return double.apply(dict(zip(params64, leaves)), x.double())

    reference = _reverse_mode_jvp(f, params64, {n: t.double() for n, t in v.items()})
    torch.testing.assert_close(tangent.double(), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["curveball", "hessian-free"])
@pytest.mark.parametrize("net", ["transformer", "lstm"])
def test_forward_mode_methods_train_attention_and_recurrent_networks(method, net):
    """The methods built on JVPs step a Transformer language model and an LSTM classifier
    (train mode, float32) and lower their loss by torch's own cross-entropy."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if net == "transformer":
        module, loss_fn = TinyLM(), SoftmaxCrossEntropy(outputs="mean")
        x = torch.randint(0, V, (16, T), generator=gen)
        y = torch.roll(x, -1, 1)
    else:
        module, loss_fn = Recurrent(), nn.CrossEntropyLoss()
        x, y = torch.randn(16, 4, 3, generator=gen), torch.randint(0, 4, (16,), generator=gen)

    def loss() -> float:
        with torch.no_grad():
            f = module(x)
            return float(F.cross_entropy(f.reshape(-1, f.shape[-1]), y.reshape(-1)))

    start = loss()
    opt = Optimizer(module, loss_fn, method)
    for _ in range(5):
        opt.step((x, y))
        assert bool(opt.info.finite)
    assert loss() < start


# ----------------------------------------------------------------- curvature of (m, T, k) logits
M2, T2, D2, K2 = 3, 4, 3, 5


def _sequence_problem():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((M2, T2, D2))
    y = rng.integers(0, K2, (M2, T2))
    w = 0.5 * rng.standard_normal((D2, K2))
    b = 0.1 * rng.standard_normal(K2)
    return x, y, w, b


def _torch_oracles(x, y, w, b):
    """The Hessian of the mean loss (torch's mean over the m T tokens) at (w, b), the empirical
    Fisher (1/m) sum_i g_i g_i^T of the per-sample losses (the mean over a sample's T tokens)
    and the gradient of the mean loss, by autograd, in the flat order [w, b]."""
    xt, yt = torch.tensor(x), torch.tensor(y)

    def mean_loss(wt, bt, rows=slice(None)):
        logits = xt[rows] @ wt + bt
        return F.cross_entropy(logits.reshape(-1, K2), yt[rows].reshape(-1))

    wt, bt = torch.tensor(w), torch.tensor(b)
    h = torch.autograd.functional.hessian(mean_loss, (wt, bt))
    n_w = w.size
    dense = np.zeros((n_w + K2, n_w + K2))
    blocks = [[h[0][0].reshape(n_w, n_w), h[0][1].reshape(n_w, K2)],
              [h[1][0].reshape(K2, n_w), h[1][1]]]
    dense[:n_w, :n_w], dense[:n_w, n_w:] = blocks[0][0], blocks[0][1]
    dense[n_w:, :n_w], dense[n_w:, n_w:] = blocks[1][0], blocks[1][1]
    gw, gb = torch.autograd.grad(mean_loss(wt.requires_grad_(), bt.requires_grad_()), (wt, bt))
    grad = np.concatenate([gw.reshape(-1).numpy(), gb.numpy()])
    fisher = np.zeros_like(dense)
    for i in range(M2):
        gw, gb = torch.autograd.grad(mean_loss(wt.requires_grad_(), bt.requires_grad_(),
                                               slice(i, i + 1)), (wt, bt))
        g = np.concatenate([gw.reshape(-1).numpy(), gb.numpy()])
        fisher += np.outer(g, g) / M2
    return dense, fisher, grad


def _linear_sequence_model(name):
    """On backend ``name``: the network x W + b on (m, T, d) inputs as a plain function, its
    parameters {"w", "b"}, the batch, the oracles of :func:`_torch_oracles` and the index that
    puts the oracles' [w, b] order into the library's flat order (sorted keys: b, then w)."""
    if name != "numpy":
        pytest.importorskip(name)
    bk = backends.get(name)
    xp = bk.xp
    x, y, w, b = _sequence_problem()

    def apply(p, inputs):
        return xp.matmul(inputs, p["w"]) + p["b"]

    params = {"w": bk.asarray(w), "b": bk.asarray(b)}
    order = np.r_[np.arange(w.size, w.size + K2), np.arange(w.size)]
    return (bk, apply, params, (bk.asarray(x), bk.asarray(y)), _torch_oracles(x, y, w, b),
            order)


@pytest.mark.parametrize("name", ["numpy", "torch", "jax"])
def test_curvature_of_sequence_logits_against_autograd(name):
    """GGN and empirical Fisher operators on logits (m, T, k) with the mean over positions:
    to_dense and a product against the brute-force matrices (a network linear in its
    parameters, so the GGN is the Hessian)."""
    bk, apply, params, batch, (hessian, fisher, _), order = _linear_sequence_model(name)
    loss = SoftmaxCrossEntropy(outputs="mean")
    for operator, dense in ((GGN(apply, loss, params, batch), hessian),
                            (Fisher(apply, loss, params, batch, kind="empirical"), fisher)):
        ours = np.asarray(bk.to_numpy(operator.to_dense()))
        np.testing.assert_allclose(ours, dense[np.ix_(order, order)], rtol=1e-12, atol=1e-14)
        v = np.random.default_rng(3).standard_normal(len(order))
        product = operator.matvec(bk.asarray(v))
        np.testing.assert_allclose(np.asarray(bk.to_numpy(product)),
                                   dense[np.ix_(order, order)] @ v, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("cls", [SMWGN, SMWNG])
def test_smw_steps_on_sequence_logits_are_the_dense_damped_steps(name, cls):
    """SMW-GN and SMW-NG (Jacobian Gram matrix) on logits (m, T, k): the first step is
    -(B + lambda I)^{-1} g with B the brute-force GGN (the Hessian here) or empirical Fisher and
    lambda = damping + tau (the whole batch is the curvature batch)."""
    bk, apply, params, batch, (hessian, fisher, grad), order = _linear_sequence_model(name)
    dense = hessian if cls is SMWGN else fisher
    method = cls(apply, SoftmaxCrossEntropy(outputs="mean"), damping=0.5, tau=1e-3)
    new, _, info = method.step(params, method.init(params), batch)
    assert bool(info.finite)
    expected = -np.linalg.solve(dense + 0.501 * np.eye(len(grad)), grad)[order]
    moved = tree.ravel(tree.sub(new, params))[0]
    np.testing.assert_allclose(np.asarray(bk.to_numpy(moved)), expected, rtol=1e-10,
                               atol=1e-13)


@pytest.mark.parametrize("cls", [SMWGN, SMWNG])
def test_smw_tap_grams_on_a_torch_linear_over_positions(cls):
    """The same steps from the layer taps of a torch ``nn.Linear`` applied to (m, T, d)
    inputs (``gram="taps"``: the per-layer Gram identities summed over positions)."""
    x, y, w, b = _sequence_problem()
    hessian, fisher, grad = _torch_oracles(x, y, w, b)
    dense = hessian if cls is SMWGN else fisher
    layer = nn.Linear(D2, K2).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(w.T))
        layer.bias.copy_(torch.tensor(b))
    model, params = from_torch(layer)
    # our flat order: bias, then weight (k, d) row-major, which is w (d, k) transposed
    order = np.r_[np.arange(w.size, w.size + K2),
                  [d * K2 + c for c in range(K2) for d in range(D2)]]
    method = cls(model, SoftmaxCrossEntropy(outputs="mean"), damping=0.5, tau=1e-3,
                 gram="taps")
    new, _, info = method.step(params, method.init(params), (torch.tensor(x), torch.tensor(y)))
    assert bool(info.finite)
    expected = -np.linalg.solve(dense + 0.501 * np.eye(len(grad)), grad)[order]
    moved = torch.cat([(new[n] - params[n]).reshape(-1) for n in ("bias", "weight")])
    np.testing.assert_allclose(moved.numpy(), expected, rtol=1e-10, atol=1e-13)


def test_prox_linear_needs_two_dimensional_outputs_and_says_so():
    """Prox-linear solves its dual in the (m, k) output space: a sequence's logits get a
    ShapeError naming the method, not a broadcasting error."""
    module, x, y = _lm(True)
    opt = Optimizer(module, SoftmaxCrossEntropy(outputs="mean"), "prox-linear")
    with pytest.raises(ShapeError, match="needs the network to return \\(batch, outputs\\)"):
        opt.step((x, y))
