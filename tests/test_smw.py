"""SMW-GN and SMW-NG (thesis Ch. 5, Algorithm 23) against independent dense float64 references.

- (5.6) and (5.7) against the dense inverse of G = lambda I + (1/N2) J^T H J;
- the per-layer Gram identities against explicit per-example gradients and explicit Jacobians
  (autograd), for dense and convolution layers;
- the first steps of both methods on a tiny MLP (softmax cross-entropy and squared loss) against
  a brute-force NumPy Algorithm 23 with dense p x p matrices, the LM damping sequence included;
- the LM rule itself, a short training run, and a torch ``nn.Sequential`` with biases.

Everything runs on NumPy (autograd) except the torch test; the contract suite covers the other
backends, jit and vmap.
"""

from __future__ import annotations

import numpy as np
import pytest

from secondorder import backends, losses, tree
from secondorder.errors import HyperparameterError, StructureError
from secondorder.models import MLP, ConvNet
from secondorder.optim import SMWGN, SMWNG
from secondorder.optim.smw import (
    block_diagonal,
    gram_from_taps,
    lm_damping,
    smw_coefficients,
    tap_gram,
)

autograd = pytest.importorskip("autograd")
anp = pytest.importorskip("autograd.numpy")

NP = backends.get("numpy")


# ------------------------------------------------------------------ independent references
def _softmax(f):
    e = anp.exp(f - anp.max(f, axis=1, keepdims=True))
    return e / anp.sum(e, axis=1, keepdims=True)


def _per_sample(kind, f, y):
    """Per-sample losses written here, not taken from secondorder.losses."""
    if kind == "ce":
        z = f - anp.max(f, axis=1, keepdims=True)
        logz = anp.log(anp.sum(anp.exp(z), axis=1))
        return logz - z[np.arange(f.shape[0]), y]
    if kind == "bce":  # log(1 + e^f) - y f, summed over the outputs
        return anp.sum(anp.logaddexp(0.0, f) - y * f, axis=1)
    return 0.5 * anp.sum((f - y) ** 2, axis=1)


def _hessians(kind, f):
    """Per-sample output-space Hessians: diag(s) - s s^T (softmax CE) or I (squared loss)."""
    m, k = f.shape
    if kind == "ce":
        s = _softmax(f)
        return np.stack([np.diag(si) - np.outer(si, si) for si in s])
    if kind == "bce":
        s = 1.0 / (1.0 + np.exp(-f))
        return np.stack([np.diag(si * (1 - si)) for si in s])
    return np.broadcast_to(np.eye(k), (m, k, k))


def _dense_blockdiag(blocks):
    m, k, _ = blocks.shape
    out = np.zeros((m * k, m * k))
    for i in range(m):
        out[i * k:(i + 1) * k, i * k:(i + 1) * k] = blocks[i]
    return out


def _brute_force(model, kind, curvature, params, batches, *, n2, lr=1.0, damping=1.0,
                 tau=1e-3, boost=1.01, drop=0.99, eps=0.25):
    """Algorithm 23 with dense p x p matrices: G = B + lambda I inverted by np.linalg.solve."""
    theta, unravel = tree.ravel(params)
    lam_lm, dampings, rhos = damping, [], []
    for x, y in batches:
        def mean_loss(th, x=x, y=y):
            return anp.mean(_per_sample(kind, model.apply(unravel(th), x), y))

        g = autograd.grad(mean_loss)(theta)
        x2, y2 = x[:n2], y[:n2]
        p = theta.size
        if curvature == "gn":
            f2 = model.apply(unravel(theta), x2)
            jac = autograd.jacobian(lambda th, x2=x2: model.apply(unravel(th), x2))(theta)
            jac = jac.reshape(-1, p)
            b = jac.T @ _dense_blockdiag(_hessians(kind, f2)) @ jac / n2
        else:
            rows = autograd.jacobian(
                lambda th, x2=x2, y2=y2: _per_sample(kind, model.apply(unravel(th), x2), y2))(
                    theta)
            b = rows.T @ rows / n2
        lam = lam_lm + tau
        step = -np.linalg.solve(b + lam * np.eye(p), g)
        predicted = g @ step + 0.5 * step @ b @ step
        rho = (mean_loss(theta) - mean_loss(theta + step)) / -predicted
        if rho < eps:
            lam_lm *= boost
        elif rho > 1 - eps:
            lam_lm *= drop
        theta = theta + lr * step
        dampings.append(lam_lm)
        rhos.append(rho)
    return theta, dampings, rhos


def _data(kind, n, d, k, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    if kind == "ce":
        return x, rng.integers(0, k, n)
    if kind == "bce":
        return x, (rng.random((n, k)) < 0.5).astype(float)
    return x, rng.standard_normal((n, k))


LOSSES = {"ce": losses.SoftmaxCrossEntropy(), "mse": losses.MSE(), "bce": losses.SigmoidBCE()}


# ------------------------------------------------------------------ (5.6) and (5.7)
def _random_problem(rng, n2, k, p):
    """J scaled so that (1/N2) J^T H J has eigenvalues of order 1: G is then well conditioned
    for the dampings below, and a dense float64 inverse is itself accurate to ~1e-15 (at
    lambda = 1e-3 the condition number ~1e4 would limit both sides to ~1e-12 rounding)."""
    jac = rng.standard_normal((n2 * k, p)) / np.sqrt(p)
    g = rng.standard_normal(p)
    return jac, g


@pytest.mark.parametrize("lam", [0.05, 0.7, 25.0])
def test_56_equals_the_dense_inverse_for_invertible_hessians(lam):
    rng = np.random.default_rng(0)
    n2, k, p = 4, 3, 20
    jac, g = _random_problem(rng, n2, k, p)
    a = rng.standard_normal((n2, k, k))
    blocks = a @ np.transpose(a, (0, 2, 1)) + 0.5 * np.eye(k)  # SPD per sample
    h = _dense_blockdiag(blocks)
    dense = np.linalg.inv(lam * np.eye(p) + jac.T @ h @ jac / n2) @ g
    w = smw_coefficients(jac @ jac.T, jac @ g, lam, n2, h, formula="5.6")
    smw = (g - jac.T @ w / n2) / lam
    np.testing.assert_allclose(smw, dense, rtol=1e-12, atol=1e-12 * np.abs(dense).max())
    # (5.7) holds for invertible H as well and gives the same vector
    w7 = smw_coefficients(jac @ jac.T, jac @ g, lam, n2, h, formula="5.7")
    np.testing.assert_allclose((g - jac.T @ w7 / n2) / lam, dense, rtol=1e-12,
                               atol=1e-12 * np.abs(dense).max())


@pytest.mark.parametrize("lam", [0.05, 0.7, 25.0])
def test_57_equals_the_dense_inverse_for_softmax_hessians(lam):
    rng = np.random.default_rng(1)
    n2, k, p = 5, 4, 30
    jac, g = _random_problem(rng, n2, k, p)
    h = _dense_blockdiag(_hessians("ce", rng.standard_normal((n2, k))))
    assert np.linalg.matrix_rank(h) == n2 * (k - 1)  # singular: (5.6) does not apply
    dense = np.linalg.inv(lam * np.eye(p) + jac.T @ h @ jac / n2) @ g
    w = smw_coefficients(jac @ jac.T, jac @ g, lam, n2, h, formula="5.7")
    np.testing.assert_allclose((g - jac.T @ w / n2) / lam, dense, rtol=1e-12,
                               atol=1e-12 * np.abs(dense).max())


def test_ng_system_is_n2_by_n2_and_equals_the_dense_inverse():
    rng = np.random.default_rng(2)
    n2, p, lam = 6, 25, 0.3
    rows = rng.standard_normal((n2, p)) / np.sqrt(p)  # per-example gradients
    g = rng.standard_normal(p)
    dense = np.linalg.inv(lam * np.eye(p) + rows.T @ rows / n2) @ g
    w = smw_coefficients(rows @ rows.T, rows @ g, lam, n2)
    assert w.shape == (n2,)
    np.testing.assert_allclose((g - rows.T @ w / n2) / lam, dense, rtol=1e-12,
                               atol=1e-12 * np.abs(dense).max())


def test_block_diagonal_places_the_blocks():
    blocks = np.random.default_rng(3).standard_normal((3, 2, 2))
    np.testing.assert_array_equal(block_diagonal(NP, blocks), _dense_blockdiag(blocks))


# ------------------------------------------------------------------ Gram identities
def _explicit_jacobian(model, params, x):
    theta, unravel = tree.ravel(params)
    jac = autograd.jacobian(lambda th: model.apply(unravel(th), x))(theta)
    return jac.reshape(-1, theta.size)


@pytest.mark.parametrize("model", [MLP([3, 5, 4, 3], "tanh"),
                                   ConvNet((1, 4, 4), channels=(2,), dense=(3,), kernel=3)],
                         ids=["mlp", "convnet"])
def test_tap_grams_equal_explicit_jacobians_and_per_example_gradients(model):
    params = model.init(0, NP)
    rng = np.random.default_rng(4)
    n = 5
    x = rng.standard_normal((n, 3)) if isinstance(model, MLP) else rng.standard_normal(
        (n, 1, 4, 4))
    y = rng.integers(0, 3, n)
    jac = _explicit_jacobian(model, params, x)
    gn = gram_from_taps(model, params, x)
    np.testing.assert_allclose(gn, jac @ jac.T, rtol=1e-12, atol=1e-12)
    # NG: the cotangent is the loss gradient; rows are the explicit per-example gradients
    theta, unravel = tree.ravel(params)
    rows = autograd.jacobian(lambda th: _per_sample("ce", model.apply(unravel(th), x), y))(
        theta)
    f = model.apply(params, x)
    u = _softmax(f) - np.eye(3)[y]
    ng = gram_from_taps(model, params, x, u)
    assert ng.shape == (n, n)
    np.testing.assert_allclose(ng, rows @ rows.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("positions", [2, 9], ids=["position-pairs", "per-example"])
def test_conv_tap_gram_both_contractions(positions):
    """Both ways tap_gram contracts a convolution's positions (pairs of positions when
    n r T^2 <= d_in d_out, the per-example gradients otherwise) equal the explicit
    sum_t delta_t a_t^T outer products."""
    rng = np.random.default_rng(5)
    n, r, d_in, d_out = 3, 2, 5, 4
    a = rng.standard_normal((n, positions, d_in))
    d = rng.standard_normal((n, r, positions, d_out))
    explicit = np.stack([sum(np.outer(d[i, c, t], a[i, t]) for t in range(positions)).ravel()
                         for i in range(n) for c in range(r)])
    np.testing.assert_allclose(tap_gram(NP, a, d), explicit @ explicit.T, rtol=1e-12,
                               atol=1e-12)


# ------------------------------------------------------------------ the method vs brute force
@pytest.mark.parametrize("cls", [SMWGN, SMWNG], ids=["gn", "ng"])
@pytest.mark.parametrize("kind", ["ce", "mse", "bce"])
@pytest.mark.parametrize("n2,lr", [(6, 0.5), (None, 1.0)], ids=["N2<N1", "N2=N1"])
def test_first_steps_equal_brute_force_algorithm_23(cls, kind, n2, lr):
    model = MLP([3, 4, 3], "tanh")
    params = model.init(0, NP)
    batches = [_data(kind, 10, 3, 3, seed) for seed in range(3)]
    kwargs = {} if n2 is None else {"curvature_batch": n2}
    opt = cls(model, LOSSES[kind], lr=lr, damping=0.5, **kwargs)
    state = opt.init(params)
    dampings, rhos = [], []
    for batch in batches:
        params, state, info = opt.step(params, state, batch)
        assert bool(info.finite)
        dampings.append(float(state.damping))
        rhos.append(float(info.extras["rho"]))
    expected, expected_dampings, expected_rhos = _brute_force(
        model, kind, "gn" if cls is SMWGN else "ng", model.init(0, NP), batches,
        n2=10 if n2 is None else n2, lr=lr, damping=0.5)
    np.testing.assert_allclose(tree.ravel(params)[0], expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(rhos, expected_rhos, rtol=1e-8)
    np.testing.assert_allclose(dampings, expected_dampings, rtol=1e-14)
    assert float(info.damping) == pytest.approx(dampings[-1] + 1e-3, rel=1e-14)


def test_both_formulas_agree_where_both_apply():
    """Scaled squared loss (torch's MSELoss: c = 2/k): "auto" takes (5.6) with H = c I, and
    (5.7) gives the same steps; sigmoid BCE (H = diag(s(1 - s)) > 0) likewise."""
    model = MLP([3, 4, 2], "tanh")
    for loss, kind in ((losses.MSE(scale=2.0, outputs="mean"), "mse"),
                       (losses.SigmoidBCE(), "bce")):
        batches = [_data(kind, 10, 3, 2, seed) for seed in range(2)]
        out = []
        for inverse in ("5.6", "5.7"):
            opt = SMWGN(model, loss, curvature_batch=6, inverse=inverse)
            params = model.init(0, NP)
            state = opt.init(params)
            for batch in batches:
                params, state, _ = opt.step(params, state, batch)
            out.append(tree.ravel(params)[0])
        np.testing.assert_allclose(out[0], out[1], rtol=1e-12, atol=1e-14)
    assert SMWGN(model, losses.MSE(scale=2.0, outputs="mean")).inverse == "5.6"
    assert SMWGN(model, losses.SigmoidBCE()).inverse == "5.7"


def test_taps_and_jacobian_grams_give_the_same_steps():
    model = MLP([3, 4, 3], "tanh")
    batches = [_data("ce", 10, 3, 3, seed) for seed in range(2)]
    out = []
    for gram in ("taps", "jacobian"):
        opt = SMWGN(model, LOSSES["ce"], curvature_batch=7, gram=gram)
        params = model.init(0, NP)
        state = opt.init(params)
        for batch in batches:
            params, state, _ = opt.step(params, state, batch)
        out.append(tree.ravel(params)[0])
    np.testing.assert_allclose(out[0], out[1], rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------ the LM rule
def test_lm_rule_and_the_quadratic_case():
    rho = np.array([-np.inf, -1.0, 0.2, 0.25, 0.5, 0.75, 0.8, 2.0, np.nan])
    lam = np.full_like(rho, 2.0)
    got = lm_damping(rho, lam, 1.01, 0.99, 0.25)
    np.testing.assert_array_equal(got, [2.02, 2.02, 2.02, 2.0, 2.0, 2.0, 1.98, 1.98, 2.0])
    # a linear network under the squared loss with N2 = N1: the quadratic model is the
    # objective, rho = 1 at every step, so lambda_LM = 0.99^t exactly as the rule says
    model = MLP([3, 2], "identity")
    opt = SMWGN(model, LOSSES["mse"], damping=1.0)
    params = model.init(0, NP)
    state = opt.init(params)
    for t in range(1, 4):
        params, state, info = opt.step(params, state, _data("mse", 8, 3, 2, t))
        assert float(info.extras["rho"]) == pytest.approx(1.0, abs=1e-10)
        assert float(state.damping) == pytest.approx(0.99**t, rel=1e-14)


def test_a_trial_point_with_a_non_finite_loss_is_not_taken():
    model = MLP([3, 4, 3], "tanh")
    params = model.init(0, NP)

    opt = SMWGN(model, LOSSES["ce"])
    state = opt.init(params)
    batch = _data("ce", 6, 3, 3, 0)
    calls = []
    original = opt.objective

    def objective(p, b):  # the trial loss is infinite
        calls.append(1)
        return original(p, b) + np.inf

    opt.objective = objective
    new, new_state, info = opt.step(params, state, batch)
    assert calls and bool(info.finite) and float(info.step_norm) == 0.0
    assert float(info.extras["rho"]) == -np.inf
    assert float(new_state.damping) == pytest.approx(1.01)
    np.testing.assert_array_equal(tree.ravel(new)[0], tree.ravel(params)[0])


# ------------------------------------------------------------------ training and adapters
@pytest.mark.parametrize("cls", [SMWGN, SMWNG], ids=["gn", "ng"])
def test_a_short_training_run_decreases_the_loss(cls):
    model = MLP([4, 8, 3], "tanh")
    rng = np.random.default_rng(6)
    x = rng.standard_normal((64, 4))
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5).astype(int)
    opt = cls(model, LOSSES["ce"], curvature_batch=16)
    params = model.init(0, NP)
    state = opt.init(params)
    first = float(opt.objective(params, (x, y)))
    for _ in range(6):
        for i in range(0, 64, 32):
            params, state, info = opt.step(params, state, (x[i:i + 32], y[i:i + 32]))
            assert bool(info.finite)
    assert float(opt.objective(params, (x, y))) < 0.6 * first


def test_from_torch_sequential_with_biases_steps():
    torch = pytest.importorskip("torch")
    from secondorder.models import from_torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(),
                              torch.nn.Linear(5, 3)).double()
    apply, params = from_torch(net)
    x, y = _data("ce", 12, 3, 3, 1)
    batch = (torch.as_tensor(x), torch.as_tensor(y))
    steps = {}
    for gram in ("taps", "jacobian"):
        opt = SMWGN(apply, LOSSES["ce"], curvature_batch=8, gram=gram)
        p, state = params, opt.init(params)
        losses_seen = []
        for _ in range(3):
            p, state, info = opt.step(p, state, batch)
            assert bool(info.finite)
            losses_seen.append(float(info.loss))
        assert losses_seen[-1] < losses_seen[0]
        steps[gram] = np.concatenate([v.detach().numpy().ravel() for v in p.values()])
    np.testing.assert_allclose(steps["taps"], steps["jacobian"], rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------ errors
def test_bad_hyperparameters_raise_named_errors():
    model = MLP([3, 4, 3], "tanh")
    loss = LOSSES["ce"]
    with pytest.raises(HyperparameterError, match="eps"):
        SMWGN(model, loss, eps=0.5)
    with pytest.raises(HyperparameterError, match="drop"):
        SMWNG(model, loss, drop=1.5)
    with pytest.raises(HyperparameterError, match="inverse"):
        SMWGN(model, loss, inverse="5.8")
    with pytest.raises(HyperparameterError, match="curvature_batch"):
        SMWGN(model, loss, curvature_batch=2.5)
    with pytest.raises(StructureError, match="taps"):
        SMWGN(lambda p, x: model.apply(p, x), loss, gram="taps")
