"""Softmax cross-entropy with a softmax per position: logits (m, T..., k), labels (m, T...).

References: the same loss on the (m T, k) rows of the flattened positions (the library's
established 2-D formulas), a block-diagonal Hessian assembled with SciPy, torch's
``F.cross_entropy`` on the flattened tokens (``outputs="mean"``) and ``torch.optim.Adam``
stepping a language-model-like module, and K-FAC's exact-mode factors of a Linear layer shared
over the positions against their dense formulas.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.linalg import block_diag

from secondorder import backends
from secondorder.errors import LabelError, ShapeError
from secondorder.losses import SoftmaxCrossEntropy, as_loss

pytest.importorskip("autograd")

M, T, K = 3, 4, 5


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng, rng.standard_normal((M, T, K)), rng.integers(0, K, (M, T))


@pytest.mark.parametrize("name", ["numpy", "torch", "jax"])
def test_per_position_formulas_are_those_of_the_flattened_rows(name):
    """value, grad, hvp, sampling: per position, the 2-D loss on the m T rows; the per-sample
    loss sums the positions; the Hessian is block diagonal (SciPy) and S S^T = H."""
    if name != "numpy":
        pytest.importorskip(name)
    b = backends.get(name)
    rng, f, y = _data()
    rows = np.random.default_rng(1).dirichlet(np.ones(K), (M, T))
    v = rng.standard_normal(f.shape)
    loss = SoftmaxCrossEntropy()
    fb, yb, vb = b.asarray(f), b.asarray(y), b.asarray(v)
    flat_f, flat_y = b.asarray(f.reshape(-1, K)), b.asarray(y.reshape(-1))

    def np_(a):
        return np.asarray(b.to_numpy(a))

    per_token = np_(loss.per_sample(flat_f, flat_y)).reshape(M, T)
    np.testing.assert_allclose(np_(loss.per_sample(fb, yb)), per_token.sum(1), rtol=1e-13)
    np.testing.assert_allclose(np_(loss.per_sample(fb, b.asarray(rows))),
                               np_(loss.per_sample(flat_f, b.asarray(rows.reshape(-1, K))))
                               .reshape(M, T).sum(1), rtol=1e-13)
    np.testing.assert_allclose(np_(loss.grad(fb, yb)),
                               np_(loss.grad(flat_f, flat_y)).reshape(f.shape), atol=1e-15)
    np.testing.assert_allclose(np_(loss.hvp(fb, yb, vb)),
                               np_(loss.hvp(flat_f, flat_y, b.asarray(v.reshape(-1, K))))
                               .reshape(f.shape), atol=1e-15)
    blocks = np_(loss.hessian(flat_f, flat_y)).reshape(M, T, K, K)
    h = np_(loss.hessian(fb, yb))
    for i in range(M):
        np.testing.assert_allclose(h[i], block_diag(*blocks[i]), atol=1e-15)
    np.testing.assert_allclose(np.einsum("mij,mj->mi", h, v.reshape(M, -1)),
                               np_(loss.hvp(fb, yb, vb)).reshape(M, -1), atol=1e-14)
    s = np_(loss.hessian_sqrt(fb, yb))
    np.testing.assert_allclose(s @ s.transpose(0, 2, 1), h, atol=1e-14)
    noise = loss.noise(f.shape, np.random.default_rng(2))
    assert noise.shape == (M, T)
    np.testing.assert_array_equal(
        np_(loss.sample(fb, b.asarray(noise))),
        np_(loss.sample(flat_f, b.asarray(noise.reshape(-1)))).reshape(M, T))


def test_outputs_mean_is_torchs_mean_over_the_flattened_tokens():
    torch = pytest.importorskip("torch")
    _, f, y = _data(3)
    ours = SoftmaxCrossEntropy(outputs="mean")
    theirs = torch.nn.functional.cross_entropy(torch.tensor(f).reshape(-1, K),
                                               torch.tensor(y).reshape(-1))
    np.testing.assert_allclose(float(ours.value(f, y)), float(theirs), rtol=1e-14)
    summed = torch.nn.functional.cross_entropy(torch.tensor(f).reshape(-1, K),
                                               torch.tensor(y).reshape(-1), reduction="sum")
    np.testing.assert_allclose(float(SoftmaxCrossEntropy(reduction="sum").value(f, y)),
                               float(summed), rtol=1e-14)
    # on (m, k) outputs there is one position: outputs="mean" changes nothing
    np.testing.assert_allclose(float(ours.value(f[:, 0], y[:, 0])),
                               float(SoftmaxCrossEntropy().value(f[:, 0], y[:, 0])), rtol=1e-15)


def test_layouts_that_cannot_be_read_raise_named_errors_that_say_what_to_do():
    torch = pytest.importorskip("torch")
    _, f, y = _data()
    loss = SoftmaxCrossEntropy()
    with pytest.raises(ShapeError, match="movedim\\(1, -1\\)"):  # torch's (m, k, T) layout
        loss.value(f.transpose(0, 2, 1), y)
    with pytest.raises(LabelError, match="integer targets"):
        loss.value(f, np.eye(K, dtype=int)[y])
    with pytest.raises(LabelError, match="lie in \\[0, 4\\].*ignore_index"):
        loss.value(f, np.where(y == 0, -100, y))
    converted = as_loss(torch.nn.CrossEntropyLoss())
    assert isinstance(converted, SoftmaxCrossEntropy)
    with pytest.raises(ShapeError, match="SoftmaxCrossEntropy\\(outputs='mean'\\)"):
        converted.value(torch.tensor(f), torch.tensor(y))
    np.testing.assert_allclose(float(converted.value(torch.tensor(f[:, 0]), torch.tensor(y[:, 0]))),
                               float(loss.value(f[:, 0], y[:, 0])), rtol=1e-15)


def _language_model(torch, vocabulary: int = 11):
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(nn.Embedding(vocabulary, 6), nn.Linear(6, 8), nn.Tanh(),
                         nn.Linear(8, vocabulary)).double()


def test_adam_on_a_language_model_follows_torch_optim_adam():
    """The torch Optimizer with the per-token mean cross-entropy steps a token model as
    torch.optim.Adam with F.cross_entropy on the flattened (batch * tokens, vocabulary)."""
    torch = pytest.importorskip("torch")
    from secondorder.integrations.torch import Optimizer

    g = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, 11, (4, 7), generator=g), torch.randint(0, 11, (4, 7), generator=g))
            for _ in range(3)]
    ours, theirs = _language_model(torch), _language_model(torch)
    opt = Optimizer(ours, SoftmaxCrossEntropy(outputs="mean"), method="adam", lr=0.01)
    ref = torch.optim.Adam(theirs.parameters(), lr=0.01)
    for x, y in data:
        loss = opt.step((x, y))
        ref.zero_grad()
        expected = torch.nn.functional.cross_entropy(theirs(x).reshape(-1, 11), y.reshape(-1))
        expected.backward()
        ref.step()
        np.testing.assert_allclose(float(loss), float(expected.detach()), rtol=1e-13)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-10,
                                   atol=1e-13, err_msg=name)


def test_kfac_exact_factors_of_a_linear_layer_over_tokens_are_the_dense_formulas():
    """A Linear layer on (m, T, d) under the per-position cross-entropy: K-FAC's exact-mode
    factors are A = (1/m) sum_it a~_it a~_it^T (bias column last) and
    G = (1/(m T)) sum_it H_it with H_it = diag(s_it) - s_it s_it^T (the layer's output is the
    logits), the convention of a dense layer shared over T positions."""
    torch = pytest.importorskip("torch")
    from secondorder.models import from_torch
    from secondorder.optim import KFAC

    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Linear(3, K)).double()
    apply, params = from_torch(net)
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((M, T, 3)), rng.integers(0, K, (M, T))
    from secondorder.curvature.kfac import kronecker_factors

    opt = KFAC(apply, SoftmaxCrossEntropy(), mode="exact", statistics_interval=1,
               inverse_interval=1)
    batch = (torch.tensor(x), torch.tensor(y))
    _, state, info = opt.step(params, opt.init(params), batch)
    assert bool(info.finite)
    g_factor, a_factor = (np.asarray(f) for f in state.blocks[0].factors)
    # the curvature layer's kronecker_factors (which checks the loss on the outputs) agrees
    (factors,) = kronecker_factors(apply, SoftmaxCrossEntropy(), params, batch, mode="exact")
    np.testing.assert_allclose(np.asarray(factors.A), a_factor, rtol=1e-13)
    np.testing.assert_allclose(np.asarray(factors.G), g_factor, rtol=1e-13, atol=1e-16)
    a = np.concatenate([x, np.ones((M, T, 1))], axis=2)
    w, bias = net[0].weight.detach().numpy(), net[0].bias.detach().numpy()
    logits = x @ w.T + bias
    s = np.exp(logits - logits.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    hess = np.einsum("mtk,kl->mtkl", s, np.eye(K)) - np.einsum("mtk,mtl->mtkl", s, s)
    np.testing.assert_allclose(a_factor, np.einsum("mti,mtj->ij", a, a) / M, rtol=1e-12)
    np.testing.assert_allclose(g_factor, hess.sum((0, 1)) / (M * T), rtol=1e-12, atol=1e-15)
