"""secondorder.optim.KFAC against independent float64 references: dense GGN blocks, dense
Kronecker products of pi-split damped inverses, a hand-written NumPy K-FAC (Algorithm 12 of the
thesis, with manual backpropagation) and torch autograd. The contract suite
(tests/test_contract.py) covers cross-backend agreement, jit, vmap, the guard and checkpoints."""

from __future__ import annotations

import numpy as np
import pytest

from secondorder import backends, losses, tree
from secondorder.errors import HyperparameterError, StructureError
from secondorder.models import MLP
from secondorder.optim import KFAC

pytest.importorskip("autograd")

NP = backends.get("numpy")


def _batch(rng: np.random.Generator, m: int, d: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.standard_normal((m, d)), rng.standard_normal((m, k))


def _pi_inverses(a: np.ndarray, g: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """(A + pi sqrt(lam) I)^-1 and (G + sqrt(lam)/pi I)^-1, pi from the normalised traces."""
    pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g)))
    return (np.linalg.inv(a + pi * np.sqrt(lam) * np.eye(len(a))),
            np.linalg.inv(g + np.sqrt(lam) / pi * np.eye(len(g))))


def test_single_linear_layer_kfac_is_the_ggn_block_and_the_step_its_damped_newton_step():
    """f = W x + b under squared loss: A (x) G (exact mode) is the GGN exactly, and with the
    exact damping (eigh cache) one step with lr 1 is -(GGN + lambda I)^{-1} g."""
    rng = np.random.default_rng(0)
    x, y = _batch(rng, 12, 3, 2)
    model = MLP([3, 2])
    params = model.init(0, NP)
    w, b = params[0]["w"], params[0]["b"]
    lam = 0.3
    opt = KFAC(model, losses.MSE(), lr=1.0, momentum=0.0, damping=lam, mode="exact",
               cache="eigh", damping_split="exact", statistics_interval=1, inverse_interval=1)
    new, state, info = opt.step(params, opt.init(params), (x, y))
    # dense oracle in the column-major vec of W~ = [W b]: J_i = a~_i^T (x) I, H = I
    xh = np.hstack([x, np.ones((12, 1))])
    jac = np.stack([np.kron(a[None, :], np.eye(2)) for a in xh])  # (m, 2, 8)
    ggn = np.einsum("mki,mkj->ij", jac, jac) / 12
    g_factor, a_factor = (np.asarray(f) for f in state.blocks[0].factors)
    np.testing.assert_allclose(np.kron(a_factor, g_factor), ggn, rtol=1e-13, atol=1e-15)
    r = x @ w.T + b - y
    grad = np.hstack([r.T @ x, r.sum(0)[:, None]]) / 12  # dL/dW~
    step = -np.linalg.solve(ggn + lam * np.eye(8), grad.flatten(order="F"))
    got = np.hstack([new[0]["w"] - w, (new[0]["b"] - b)[:, None]]).flatten(order="F")
    np.testing.assert_allclose(got, step, rtol=1e-11, atol=1e-14)
    assert float(info.loss) == pytest.approx(0.5 * np.mean(np.sum(r * r, axis=1)), rel=1e-14)


def test_pi_split_inverse_is_the_dense_kronecker_product_of_damped_factor_inverses():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((10, 3))
    y = rng.integers(0, 3, 10)
    model, loss = MLP([3, 4, 3], "tanh"), losses.SoftmaxCrossEntropy()
    params = model.init(1, NP)
    lam, lr = 0.05, 0.7
    opt = KFAC(model, loss, lr=lr, momentum=0.0, damping=lam, mode="exact",
               statistics_interval=1, inverse_interval=1)
    new, state, _ = opt.step(params, opt.init(params), (x, y))
    grad = NP.value_and_grad(lambda p: loss.value(model.apply(p, x), y), params)[1]
    for layer, block in zip(range(2), state.blocks):
        g_factor, a_factor = (np.asarray(f) for f in block.factors)
        h_a, h_g = _pi_inverses(a_factor, g_factor, lam)
        dw = np.hstack([grad[layer]["w"], grad[layer]["b"][:, None]])
        dense = np.kron(h_a, h_g) @ dw.flatten(order="F")  # (A^-1 (x) G^-1) vec(dW~)
        got = np.hstack([new[layer]["w"] - params[layer]["w"],
                         (new[layer]["b"] - params[layer]["b"])[:, None]])
        np.testing.assert_allclose(got.flatten(order="F"), -lr * dense, rtol=1e-11,
                                   atol=1e-15)


def _mlp_by_hand(ws: list[np.ndarray], x: np.ndarray, y: np.ndarray):
    """Loss, mean gradients [dW~_l] and the per-example (a~_l, delta_l) of a tanh MLP under
    squared loss (1/2 |f - y|^2 per sample), by manual backpropagation."""
    acts, pre = [x], []
    a = x
    for i, w in enumerate(ws):
        s = np.hstack([a, np.ones((len(a), 1))]) @ w.T
        pre.append(s)
        a = s if i == len(ws) - 1 else np.tanh(s)
        acts.append(a)
    r = a - y
    loss = 0.5 * np.mean(np.sum(r * r, axis=1))
    delta = r  # per-example dl/ds of the last layer
    grads, stats = [None] * len(ws), [None] * len(ws)
    for i in reversed(range(len(ws))):
        ah = np.hstack([acts[i], np.ones((len(x), 1))])
        grads[i] = delta.T @ ah / len(x)
        stats[i] = (ah, delta)
        if i:
            delta = (delta @ ws[i][:, :-1]) * (1 - np.tanh(pre[i - 1]) ** 2)
    return loss, grads, stats


def test_first_steps_equal_a_numpy_algorithm_12():
    """Six steps with T1 = 2, T2 = 3 (statistics at steps 0, 2, 4; inverses at 0, 3), the
    moving average, heavy-ball momentum on the gradient and L2 weight decay, against NumPy."""
    rng = np.random.default_rng(2)
    sizes = [3, 4, 2]
    batches = [_batch(rng, 8, 3, 2) for _ in range(6)]
    lr, lam, mu, wd, beta = 0.1, 0.05, 0.9, 1e-2, 0.9
    model = MLP(sizes, "tanh")
    params = model.init(3, NP)
    opt = KFAC(model, losses.MSE(), lr=lr, damping=lam, momentum=mu, weight_decay=wd,
               statistics_decay=beta, statistics_interval=2, inverse_interval=3,
               mode="empirical")
    state = opt.init(params)
    ws = [np.hstack([p["w"], p["b"][:, None]]) for p in params]
    mom = [np.zeros_like(w) for w in ws]
    omega, gamma, h = [None] * 2, [None] * 2, [None] * 2
    for k, (x, y) in enumerate(batches):
        params, state, info = opt.step(params, state, (x, y))
        loss, grads, stats = _mlp_by_hand(ws, x, y)
        if k % 2 == 0:
            for lyr, (ah, d) in enumerate(stats):
                om, ga = ah.T @ ah / len(x), d.T @ d / len(x)
                first = omega[lyr] is None
                omega[lyr] = om if first else beta * omega[lyr] + (1 - beta) * om
                gamma[lyr] = ga if first else beta * gamma[lyr] + (1 - beta) * ga
        if k % 3 == 0:
            h = [_pi_inverses(omega[lyr], gamma[lyr], lam) for lyr in range(2)]
        for lyr in range(2):
            mom[lyr] = mu * mom[lyr] + grads[lyr] + wd * ws[lyr]
            h_a, h_g = h[lyr]
            ws[lyr] = ws[lyr] - lr * h_g @ mom[lyr] @ h_a
        assert float(info.loss) == pytest.approx(loss, rel=1e-13)
    for p, w in zip(params, ws):
        np.testing.assert_allclose(np.hstack([p["w"], p["b"][:, None]]), w, rtol=1e-11,
                                   atol=1e-14)
    assert int(state.count) == 6 and int(state.blocks[0].count) == 3


def _jax_problem():
    """A small MLP, its parameters and one batch (x, y) on JAX."""
    jb = backends.get("jax")
    rng = np.random.default_rng(3)
    x = jb.asarray(rng.standard_normal((32, 3)))
    y = jb.asarray(rng.integers(0, 3, 32))
    model = MLP([3, 4, 3], "tanh")
    return model, model.init(0, jb), x, y


def test_jitted_monte_carlo_step_draws_new_noise_every_step():
    jax = pytest.importorskip("jax")
    model, params, x, y = _jax_problem()
    # decay 0: the factors are the last batch's statistics; the same parameters and batch at
    # every step, so only the sampled targets can change G (A depends on the inputs only)
    opt = KFAC(model, losses.SoftmaxCrossEntropy(), statistics_decay=0.0,
               statistics_interval=1, inverse_interval=1)
    step = jax.jit(opt.step)
    state = opt.init(params)
    factors, keys = [], []
    for _ in range(3):
        _, state, info = step(params, state, (x, y))
        assert bool(info.finite)
        factors.append([np.asarray(f) for f in state.blocks[1].factors])
        keys.append(np.asarray(state.key))
    assert len({k.tobytes() for k in keys}) == 3
    for i in range(2):
        np.testing.assert_array_equal(factors[i][1], factors[i + 1][1])  # A
        assert np.abs(factors[i][0] - factors[i + 1][0]).max() > 1e-3  # G: new targets


@pytest.mark.parametrize("name", ["kfac", "tnt"])
def test_the_key_advances_at_statistics_steps_only_and_each_draws_its_own_targets(name):
    # T1 = 2, the same parameters and batch at every step: the key moves on at steps 0 and 2
    # and on no other (a split at every step costs an eager torch step 4%), and the statistics
    # of step 2 are not those of step 0 (new targets from the advanced key); jitted
    jax = pytest.importorskip("jax")
    from secondorder.optim import TNT

    model, params, x, y = _jax_problem()
    kw = {"statistics_interval": 2, "inverse_interval": 1}
    opt = (KFAC(model, losses.SoftmaxCrossEntropy(), statistics_decay=0.0, **kw)
           if name == "kfac" else TNT(model, losses.SoftmaxCrossEntropy(), beta=0.0, **kw))
    step = jax.jit(opt.step)
    state = opt.init(params)
    keys, stats = [np.asarray(state.key)], []
    for _ in range(4):
        _, state, info = step(params, state, (x, y))
        assert bool(info.finite)
        keys.append(np.asarray(state.key))
        last = state.blocks[-1] if name == "kfac" else state.blocks[-1][0]
        stats.append(np.asarray(last.factors[0]))  # G of the output layer (TNT: of its bias)
    changes = [not np.array_equal(a, b) for a, b in zip(keys, keys[1:])]
    assert changes == [True, False, True, False]
    assert np.abs(stats[0] - stats[2]).max() > 1e-4 and np.array_equal(stats[0], stats[1])


def test_torch_sequential_steps_as_the_reference_mlp_and_layernorm_takes_the_sgd_fallback():
    torch = pytest.importorskip("torch")
    from secondorder.models import from_torch

    tb = backends.get("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    net = net.double()
    apply, params = from_torch(net)
    rng = np.random.default_rng(4)
    batches = [_batch(rng, 8, 3, 2) for _ in range(3)]
    kw = {"lr": 0.2, "damping": 0.1, "mode": "exact", "statistics_interval": 1,
          "inverse_interval": 2}
    ref_model = MLP([3, 4, 2], "tanh")
    ref = [{"w": params[f"{i}.weight"].numpy().copy(), "b": params[f"{i}.bias"].numpy().copy()}
           for i in (0, 2)]
    opt, ref_opt = KFAC(apply, losses.MSE(), **kw), KFAC(ref_model, losses.MSE(), **kw)
    state, ref_state = opt.init(params), ref_opt.init(ref)
    for x, y in batches:
        params, state, _ = opt.step(params, state, (tb.asarray(x), tb.asarray(y)))
        ref, ref_state, _ = ref_opt.step(ref, ref_state, (x, y))
    for i, r in zip((0, 2), ref):
        np.testing.assert_allclose(params[f"{i}.weight"].numpy(), r["w"], rtol=1e-12)
        np.testing.assert_allclose(params[f"{i}.bias"].numpy(), r["b"], rtol=1e-12,
                                   atol=1e-15)

    # a LayerNorm is outside the tapped layers: its step is -lr times the gradient
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Tanh(),
                              torch.nn.Linear(4, 2)).double()
    apply, params = from_torch(net)
    x, y = (torch.asarray(a) for a in batches[0])
    out = net(x)
    (0.5 * ((out - y) ** 2).sum(1).mean()).backward()
    opt = KFAC(apply, losses.MSE(), **kw)
    new, _, info = opt.step(params, opt.init(params), (x, y))
    assert bool(info.finite)
    for name in ("1.weight", "1.bias"):
        expected = -0.2 * dict(net.named_parameters())[name].grad.numpy()
        np.testing.assert_allclose((new[name] - params[name]).numpy(), expected, rtol=1e-12)


def test_torch_conv2d_step_is_the_kfc_pi_split_step_and_the_curvlinops_convention():
    """Conv2d(1, 2, 3) -> tanh -> Linear on 4 x 4 images (T = 4 output positions): the conv
    kernel's step is -lr H_G dW~ H_A with A summing over positions and G averaging (im2col by
    hand). With curvlinops' factors (A / T, T G) the pi-split gives the same step (pi scales
    by 1/T, so the damped factors are (A + pi sqrt(l) I) / T and T (G + sqrt(l)/pi I)); the
    equal split does not, and matches the dense product of its own damped inverses."""
    torch = pytest.importorskip("torch")
    from secondorder.models import from_torch

    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Tanh(), torch.nn.Flatten(),
                              torch.nn.Linear(8, 3)).double()
    apply, params = from_torch(net)
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((4, 1, 4, 4)), rng.standard_normal((4, 3))
    w, b = params["0.weight"].numpy().reshape(2, 9), params["0.bias"].numpy()
    w2, b2 = params["3.weight"].numpy(), params["3.bias"].numpy()
    patches = np.stack([np.stack([x[i, 0, r:r + 3, c:c + 3].ravel() for r in (0, 1)
                                  for c in (0, 1)]) for i in range(4)])
    ph = np.concatenate([patches, np.ones((4, 4, 1))], axis=2)  # (m, T, 10)
    h = np.tanh(ph @ np.hstack([w, b[:, None]]).T)  # (m, T, C)
    f = h.transpose(0, 2, 1).reshape(4, 8) @ w2.T + b2
    ds = ((f - y) @ w2).reshape(4, 2, 4).transpose(0, 2, 1) * (1 - h**2)  # (m, T, C)
    a = np.einsum("mti,mtj->ij", ph, ph) / 4
    g = np.einsum("mti,mtj->ij", ds, ds) / 16
    dw = np.einsum("mtc,mti->ci", ds, ph) / 4
    lam, lr, T = 0.1, 0.5, 4
    xt, yt = torch.asarray(x), torch.asarray(y)

    def conv_step(**kw):
        opt = KFAC(apply, losses.MSE(), lr=lr, momentum=0.0, damping=lam, mode="empirical",
                   statistics_interval=1, inverse_interval=1, **kw)
        new, _, _ = opt.step(params, opt.init(params), (xt, yt))
        return np.hstack([(new["0.weight"] - params["0.weight"]).numpy().reshape(2, 9),
                          (new["0.bias"] - params["0.bias"]).numpy()[:, None]])

    h_a, h_g = _pi_inverses(a, g, lam)
    np.testing.assert_allclose(conv_step(), -lr * h_g @ dw @ h_a, rtol=1e-11, atol=1e-15)
    np.testing.assert_allclose(conv_step(conv_convention="curvlinops"), conv_step(),
                               rtol=1e-11, atol=1e-15)
    s = np.sqrt(lam)
    for conv, (a_c, g_c) in (("kfc", (a, g)), ("curvlinops", (a / T, T * g))):
        h_a = np.linalg.inv(a_c + s * np.eye(10))
        h_g = np.linalg.inv(g_c + s * np.eye(2))
        np.testing.assert_allclose(conv_step(conv_convention=conv, damping_split="equal"),
                                   -lr * h_g @ dw @ h_a, rtol=1e-11, atol=1e-15)


@pytest.mark.parametrize("options", [
    {"lr": 0.05, "damping": 0.1},
    {"lr": None, "momentum": None, "damping": 0.1, "adapt_damping": True, "cache": "eigh"},
    {"lr": 0.05, "damping": 0.1, "adapt_damping": True, "damping_interval": 2},
], ids=["fixed", "quadratic-model-adaptive", "adaptive-damping"])
def test_a_short_training_run_decreases_the_loss(options):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((64, 4))
    y = np.argmax(x @ rng.standard_normal((4, 3)), axis=1)
    model, loss = MLP([4, 8, 3], "tanh"), losses.SoftmaxCrossEntropy()
    params = model.init(0, NP)
    opt = KFAC(model, loss, statistics_interval=2, inverse_interval=4, **options)
    state = opt.init(params)
    start = float(loss.value(model.apply(params, x), y))
    for _ in range(25):
        i = rng.integers(0, 64, 16)
        params, state, info = opt.step(params, state, (x[i], y[i]))
        assert bool(info.finite)
    end = float(loss.value(model.apply(params, x), y))
    assert end < 0.5 * start, (start, end)
    assert set(info.extras) == set(KFAC.info_extras)


def test_bad_arguments_raise_named_errors():
    model, loss = MLP([3, 2]), losses.MSE()
    with pytest.raises(StructureError, match="layer taps"):
        KFAC(lambda p, x: x, loss)
    with pytest.raises(HyperparameterError, match="damping"):
        KFAC(model, loss, damping=-1.0)
    with pytest.raises(HyperparameterError, match="lr=None and momentum=None"):
        KFAC(model, loss, lr=None)
    with pytest.raises(HyperparameterError, match="mode"):
        KFAC(model, loss, mode="fisher")
    with pytest.raises(HyperparameterError, match="exact damping needs cache='eigh'"):
        KFAC(model, loss, damping_split="exact")
    with pytest.raises(HyperparameterError, match="statistics_interval"):
        KFAC(model, loss, statistics_interval=0)
    params = model.init(0, NP)
    assert tree.size(KFAC(model, loss).init(params).blocks[0].factors) == 2 * 2 + 4 * 4


@pytest.mark.parametrize("name", ["numpy", "torch"])
def test_a_singular_damped_factor_rejects_the_step_and_raises_the_damping(name):
    # an input feature that is always 0 gives A a zero eigenvalue; with lambda = 1e-20 the
    # damped factor A + pi sqrt(lambda) I is singular to working precision in float32. The step
    # must not raise: it keeps the parameters and the state and multiplies lambda by 10, and
    # the steps after it repeat the inverse with the larger damping until one is accepted
    pytest.importorskip("torch" if name == "torch" else "autograd")
    b = backends.get(name)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 4))
    x[:, 0] = 0.0
    batch = (b.asarray(x, dtype="float32"), b.asarray(rng.integers(0, 3, 16)))
    model = MLP([4, 5, 3], "tanh")
    params = model.init(0, b, dtype="float32")
    opt = KFAC(model, losses.SoftmaxCrossEntropy(), damping=1e-20)
    state = opt.init(params)
    new_params, new_state, info = opt.step(params, state, batch)
    assert not bool(info.finite)
    for a, c in zip(tree.leaves(new_params), tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    assert float(new_state.damping) == pytest.approx(1e-19, rel=1e-6)
    assert int(new_state.count) == 0
    rejected = 1
    while not bool(info.finite):
        new_params, new_state, info = opt.step(new_params, new_state, batch)
        rejected += not bool(info.finite)
        assert rejected < 20
    assert int(new_state.count) == 1
    assert float(new_state.damping) == pytest.approx(1e-20 * 10.0 ** rejected, rel=1e-5)


@pytest.mark.parametrize("name", ["numpy", "jax"])
def test_statistics_that_overflow_reject_the_step_although_the_update_is_finite(name):
    # float32, a linear first layer: inputs of 1e21 give a finite loss and, through the
    # step-0 inverses (T2 = 100), a finite update, but A = (1/m) sum a a^T overflows at the
    # statistics step (T1 = 1); the step must be rejected and the state kept, eager and jitted
    if name == "jax":
        pytest.importorskip("jax")
    b = backends.get(name)
    model = MLP([3, 4, 2], "tanh", linear=(0,))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3))
    y = b.asarray(rng.integers(0, 2, 8))
    opt = KFAC(model, losses.SoftmaxCrossEntropy(), statistics_interval=1)
    step = b.jit(opt.step)
    params = model.init(0, b, dtype="float32")
    params, state, info = step(params, opt.init(params), (b.asarray(x, dtype="float32"), y))
    assert bool(info.finite)
    new_params, new_state, info = step(params, state, (b.asarray(1e21 * x, dtype="float32"), y))
    assert np.isfinite(float(info.loss)) and not bool(info.finite)
    for a, c in zip(tree.leaves(new_params), tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    for a, c in zip(tree.leaves(new_state.blocks), tree.leaves(state.blocks)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
