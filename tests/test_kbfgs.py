"""K-BFGS and K-BFGS(L) (thesis Ch. 3, Algorithm 9) and the quasi-Newton pieces they are built
from (``secondorder.linalg.quasi_newton``), against independent NumPy float64 references:
Theorem 1 against Sherman-Morrison and a dense inverse, the damping inequalities of
Algorithms 3 and 8, positive definiteness on adversarial pairs, the L-BFGS two-loop recursion
against the dense BFGS matrix, and the optimiser's steps against a brute-force re-implementation
of Algorithm 9 with hand-written forward and backward passes (an MLP and a torch Conv2d net).

The contract suite (tests/test_contract.py) runs both methods across backends, under jit and
vmap, through the guard and checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest

from helpers import softmax
from secondorder import losses, tree
from secondorder.errors import HyperparameterError, StructureError
from secondorder.linalg import quasi_newton as qn
from secondorder.models import MLP
from secondorder.optim import KBFGS, KBFGSL

# ------------------------------------------------------------------ independent references


def _bfgs(h: np.ndarray, s: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The textbook product form (I - rho s y^T) H (I - rho y s^T) + rho s s^T."""
    rho = 1.0 / (s @ y)
    e = np.eye(len(s))
    return (e - rho * np.outer(s, y)) @ h @ (e - rho * np.outer(y, s)) + rho * np.outer(s, s)


def _powell(s, y, h, mu1):
    hy = h @ y
    sy, yhy = s @ y, y @ hy
    theta = (1 - mu1) * yhy / (yhy - sy) if sy < mu1 * yhy else 1.0
    return theta * s + (1 - theta) * hy


def _damp(s, y, h, mu1, mu2, rule):
    st = _powell(s, y, h, mu1)
    if rule == "dp-dlm":
        return st, y + mu2 * st
    sty, sts = st @ y, st @ st
    theta = (1 - mu2) * sts / (sts - sty) if sty < mu2 * sts else 1.0
    return st, theta * y + (1 - theta) * st


def _spd(rng, n, low=1.0, high=2.0):
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * rng.uniform(low, high, n)) @ q.T


# ------------------------------------------------------------------ the pieces


def test_theorem_1_hessian_action_bfgs_is_sherman_morrison():
    """H = A^{-1}, s = H a, y = (A + c a a^T) s: the BFGS update gives (A + c a a^T)^{-1}, which
    is H - H a (1/c + a^T H a)^{-1} a^T H (thesis Theorem 1 and the formula after it)."""
    rng = np.random.default_rng(0)
    for n, c in ((5, 0.7), (8, 3.0)):
        a_mat = _spd(rng, n)
        h = np.linalg.inv(a_mat)
        a = rng.standard_normal(n)
        s = h @ a
        y = (a_mat + c * np.outer(a, a)) @ s
        updated = qn.bfgs_inverse_update(h, s, y)
        sherman = h - np.outer(h @ a, a @ h) / (1.0 / c + a @ h @ a)
        dense = np.linalg.inv(a_mat + c * np.outer(a, a))
        np.testing.assert_allclose(updated, sherman, rtol=0, atol=1e-14)
        np.testing.assert_allclose(updated, dense, rtol=0, atol=1e-14)


def test_bfgs_update_is_the_product_form_and_skips_a_pair_without_curvature():
    rng = np.random.default_rng(1)
    h = _spd(rng, 6)
    s, y = rng.standard_normal(6), rng.standard_normal(6)
    y = y if s @ y > 0 else -y
    np.testing.assert_allclose(qn.bfgs_inverse_update(h, s, y), _bfgs(h, s, y), rtol=1e-13)
    np.testing.assert_allclose(qn.bfgs_inverse_update(h, s, y) @ y, s, rtol=1e-12)  # secant
    np.testing.assert_array_equal(qn.bfgs_inverse_update(h, s, -y), h)  # s^T y < 0: skipped


@pytest.mark.parametrize("rule", ["dd", "dp-dlm"])
def test_damping_inequalities_on_adversarial_pairs(rule):
    """After DD (Algorithm 3) and D_P D_LM (Algorithm 8): s~^T y >= mu1 y^T H y and
    s~^T y~ >= mu2 s~^T s~, on pairs with s^T y < 0; the result equals the branchy reference.
    The bounds hold with equality where a damping acts, so they are checked to rounding."""
    rng = np.random.default_rng(2)
    mu1 = 0.2
    for _ in range(200):
        n = int(rng.integers(2, 7))
        h = _spd(rng, n, 0.1, 5.0)
        s, y = rng.standard_normal(n), rng.standard_normal(n)
        if s @ y > 0:
            y = -y  # adversarial: negative curvature along s
        mu2 = float(rng.uniform(0.05, 1.0 if rule == "dd" else 10.0))
        fn = qn.double_damping if rule == "dd" else qn.powell_lm_damping
        st, yt = fn(s, y, h @ y, mu1, mu2)
        rs, ry = _damp(s, y, h, mu1, mu2, rule)
        np.testing.assert_allclose(st, rs, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(yt, ry, rtol=1e-12, atol=1e-14)
        yhy, sts = y @ h @ y, st @ st
        slack = 1e-13
        assert st @ y >= mu1 * yhy * (1 - slack)
        assert st @ yt >= mu2 * sts * (1 - slack)


@pytest.mark.parametrize("rule", ["dd", "dp-dlm"])
def test_damped_updates_stay_positive_definite(rule):
    """60 damped BFGS updates of H from adversarial pairs (y^T s < 0, y of growing size): the
    smallest eigenvalue stays positive; the undamped pairs would be refused."""
    rng = np.random.default_rng(3)
    n = 5
    h = np.eye(n)
    fn = qn.double_damping if rule == "dd" else qn.powell_lm_damping
    for k in range(60):
        s = rng.standard_normal(n)
        y = -(1 + k / 10) * (s + 0.3 * rng.standard_normal(n))
        assert s @ y < 0
        st, yt = fn(s, y, h @ y, 0.2, 0.5)
        h = qn.bfgs_inverse_update(h, st, yt)
        assert np.linalg.eigvalsh(h).min() > 0
        np.testing.assert_allclose(h, h.T, rtol=0, atol=0)


@pytest.mark.parametrize("pushes", [3, 7])
def test_lbfgs_two_loop_equals_dense_bfgs(pushes):
    """The two-loop recursion and the compact representation over a memory of 5 (after 3
    pushes: partly empty; after 7: the two oldest dropped) equal the dense matrix built from
    h0 I by BFGS with the kept pairs, oldest first, on a vector and on a matrix; a pair with
    s^T y <= 0 is not stored."""
    rng = np.random.default_rng(4)
    n, memory, h0 = 6, 5, 0.7
    b = _spd(rng, n)
    mem = qn.lbfgs_init(n, memory, np.zeros(1))
    pairs = []
    for _ in range(pushes):
        s = rng.standard_normal(n)
        y = b @ s + 0.1 * rng.standard_normal(n)
        assert s @ y > 0
        mem = qn.lbfgs_push(mem, s, y)
        pairs.append((s, y))
        skipped = qn.lbfgs_push(mem, s, -y)  # negative curvature: the memory is unchanged
        for a, e in zip(skipped, mem):
            np.testing.assert_array_equal(a, e)
    dense = h0 * np.eye(n)
    for s, y in pairs[-memory:]:
        dense = _bfgs(dense, s, y)
    v, m = rng.standard_normal(n), rng.standard_normal((n, 4))
    for product in (qn.lbfgs_apply, qn.lbfgs_apply_compact):
        np.testing.assert_allclose(product(mem, v, h0), dense @ v, rtol=1e-12)
        np.testing.assert_allclose(product(mem, m, h0), dense @ m, rtol=1e-12)


def test_tiny_pairs_in_float32_give_the_float64_update():
    """Near convergence the pairs are tiny: at ||s|| ~ ||y|| ~ 3e-15, s^T y ~ 1e-29 and
    rho^2 ~ 1e58 overflows float32 in the expanded update. The BFGS update, the L-BFGS memory
    and both products in float32 still equal the float64 textbook matrix of the same pairs to
    float32 precision (the pair is scaled to ||s|| = 1 inside, which BFGS does not see)."""
    rng = np.random.default_rng(11)
    n, h0 = 6, 0.5
    b = _spd(rng, n)
    pairs = []
    for _ in range(3):
        s = 1e-15 * rng.standard_normal(n)
        pairs.append((s, b @ s))
    dense = h0 * np.eye(n)
    h32 = np.float32(h0) * np.eye(n, dtype=np.float32)
    mem = qn.lbfgs_init(n, 4, np.zeros(1, np.float32))
    for s, y in pairs:
        dense = _bfgs(dense, s, y)
        s32, y32 = s.astype(np.float32), y.astype(np.float32)
        h32 = qn.bfgs_inverse_update(h32, s32, y32)
        mem = qn.lbfgs_push(mem, s32, y32)
    assert h32.dtype == np.float32 and np.isfinite(h32).all()
    np.testing.assert_allclose(h32, dense, rtol=1e-5, atol=1e-6 * np.abs(dense).max())
    filled = mem.rho > 0
    np.testing.assert_allclose(np.linalg.norm(mem.s[filled], axis=1), 1.0, rtol=1e-6)
    v = rng.standard_normal((n, 2)).astype(np.float32)
    for product in (qn.lbfgs_apply, qn.lbfgs_apply_compact):
        out = product(mem, v, np.float32(h0))
        np.testing.assert_allclose(out, dense @ v, rtol=1e-4, atol=1e-5 * np.abs(dense @ v).max())


# ------------------------------------------------------------------ Algorithm 9 by brute force


def _reference(fb, ws, steps, *, lr, lam, period, memory=None, rule="dp-dlm", mom=0.9,
               beta=0.9, mu1=0.2, wd=0.0):
    """Algorithm 9 re-implemented with dense NumPy matrices. ``fb(ws)`` returns, per layer,
    the gradient of the mean loss as W~ = [W b], the homogeneous inputs (m, T, d_in) and the
    per-example pre-activation gradients dl_n/dh_nt (m, T, d_out). ``memory``: H_G from the
    last ``memory`` damped pairs, rebuilt densely from I / lambda_G (K-BFGS(L))."""
    ws = [w.copy() for w in ws]
    n_layers = len(ws)
    h_a, h_g, s_g, y_g, buf = [None] * n_layers, [None] * n_layers, [], [], []
    pairs = [[] for _ in ws]
    for k in range(steps):
        grads, inputs, deltas = fb(ws)
        lams = []
        for a in inputs:
            t = a.shape[1]
            lams.append((math.sqrt(t) * math.sqrt(lam), math.sqrt(lam) / math.sqrt(t)))
        a_mats = [np.einsum("mti,mtj->ij", a, a) / a.shape[0] for a in inputs]
        if k == 0:
            for i in range(n_layers):
                h_a[i] = np.linalg.inv(a_mats[i] + lams[i][0] * np.eye(len(a_mats[i])))
                h_g[i] = np.eye(ws[i].shape[0]) / lams[i][1]
            s_g = [np.zeros(w.shape[0]) for w in ws]
            y_g = [np.zeros(w.shape[0]) for w in ws]
            buf = [np.zeros_like(w) for w in ws]
        new = []
        for i in range(n_layers):
            buf[i] = mom * buf[i] + grads[i]
            p = h_g[i] @ buf[i] @ h_a[i]
            new.append(ws[i] - lr * (p + wd * ws[i]))
        if k % period == 0:
            _, inputs2, deltas2 = fb(new)
            for i in range(n_layers):
                lam_a, lam_g = lams[i]
                a_bar = inputs[i].mean(axis=(0, 1))
                s_a = h_a[i] @ a_bar
                h_a[i] = _bfgs(h_a[i], s_a, a_mats[i] @ s_a + lam_a * s_a)
                h_plus = new[i] @ inputs2[i].mean(axis=(0, 1))
                s_g[i] = beta * s_g[i] + (1 - beta) * (h_plus - ws[i] @ a_bar)
                y_g[i] = beta * y_g[i] + (1 - beta) * (
                    deltas2[i].mean(axis=(0, 1)) - deltas[i].mean(axis=(0, 1)))
                st, yt = _damp(s_g[i], y_g[i], h_g[i], mu1, lam_g, rule)
                if memory is None:
                    h_g[i] = _bfgs(h_g[i], st, yt)
                else:
                    pairs[i].append((st, yt))
                    h_g[i] = np.eye(len(st)) / lam_g
                    for ps, py in pairs[i][-memory:]:
                        h_g[i] = _bfgs(h_g[i], ps, py)
        ws = new
    return ws, h_a, h_g


def _mlp_fb(x, y):
    """Hand-written forward and backward passes of MLP([4, 6, 3], "tanh") under softmax
    cross-entropy (mean over the batch)."""
    m = x.shape[0]
    one = np.ones((m, 1))

    def fb(ws):
        a0 = np.hstack([x, one])
        z1 = np.tanh(a0 @ ws[0].T)
        a1 = np.hstack([z1, one])
        f = a1 @ ws[1].T
        d2 = softmax(f) - np.eye(f.shape[1])[y]
        d1 = (d2 @ ws[1][:, :-1]) * (1 - z1**2)
        grads = [d1.T @ a0 / m, d2.T @ a1 / m]
        return grads, [a0[:, None], a1[:, None]], [d1[:, None], d2[:, None]]

    return fb


def _mlp_problem():
    model = MLP([4, 6, 3], "tanh")
    params = model.init(0, "numpy")
    rng = np.random.default_rng(11)
    x, y = rng.standard_normal((12, 4)), rng.integers(0, 3, 12)
    # nonzero biases so that every part of W~ = [W b] matters
    params = [{"b": 0.1 * rng.standard_normal(p["b"].shape), "w": p["w"]} for p in params]
    return model, params, x, y


def _tilde(p):
    return np.hstack([p["w"], p["b"][:, None]])


@pytest.mark.parametrize(("cls", "memory", "rule", "product"), [
    (KBFGS, None, "dp-dlm", None), (KBFGS, None, "dd", None),
    (KBFGSL, 2, "dp-dlm", "compact"), (KBFGSL, 2, "dd", "two-loop")])
def test_mlp_steps_equal_brute_force_algorithm_9(cls, memory, rule, product):
    """Seven steps with T = 3 (curvature at steps 0, 3 and 6), momentum and weight decay: the
    parameters and the final H_A, H_G of both layers equal the dense re-implementation. With
    K-BFGS(L) and memory 2, the third curvature update drops the first pair."""
    model, params, x, y = _mlp_problem()
    lr, lam, period, wd = 0.2, 0.3, 3, 1e-3
    kw = {} if memory is None else {"memory": memory, "product": product}
    opt = cls(model, losses.SoftmaxCrossEntropy(), lr=lr, damping=lam, curvature_interval=period,
              pair_damping=rule, weight_decay=wd, **kw)
    state = opt.init(params)
    p = params
    for _ in range(7):
        p, state, info = opt.step(p, state, (x, y))
        assert bool(info.finite)
    ws, h_a, h_g = _reference(_mlp_fb(x, y), [_tilde(q) for q in params], 7, lr=lr, lam=lam,
                              period=period, memory=memory, rule=rule, wd=wd)
    for i in range(2):
        np.testing.assert_allclose(_tilde(p[i]), ws[i], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(state.layers[i].h_a, h_a[i], rtol=1e-11, atol=1e-13)
        if memory is None:
            np.testing.assert_allclose(state.layers[i].h_g, h_g[i], rtol=1e-11, atol=1e-13)
        else:
            lam_g = math.sqrt(lam)
            dense = qn.lbfgs_apply(state.layers[i].h_g, np.eye(len(h_g[i])), 1 / lam_g)
            np.testing.assert_allclose(dense, h_g[i], rtol=1e-11, atol=1e-13)
    assert float(np.abs(ws[0] - _tilde(params[0])).max()) > 1e-3  # the weights moved


def test_kbfgsl_with_a_long_memory_is_kbfgs():
    """With every pair kept, the L-BFGS H_G is the dense BFGS H_G: the runs agree."""
    model, params, x, y = _mlp_problem()
    runs = []
    kw = {"lr": 0.2, "damping": 0.3, "curvature_interval": 1}
    ce = losses.SoftmaxCrossEntropy()
    for opt in (KBFGS(model, ce, **kw), KBFGSL(model, ce, memory=8, **kw)):
        p, state = params, opt.init(params)
        for _ in range(5):
            p, state, _ = opt.step(p, state, (x, y))
        runs.append(tree.ravel(p)[0])
    np.testing.assert_allclose(runs[1], runs[0], rtol=1e-12)


def test_torch_conv2d_steps_equal_brute_force_with_the_position_split():
    """Conv2d(1, 2, 3) -> tanh -> Linear(8, 3) on 4 x 4 images under MSE (|T| = 4 output
    positions): three steps with T = 2 equal Algorithm 9 with im2col by hand, where the
    convolution's damping is split as lambda_A = sqrt(|T| lambda), lambda_G = sqrt(lambda/|T|)
    and the dense layer's as sqrt(lambda) each; the equal split (Ch. 2's) differs."""
    torch = pytest.importorskip("torch")
    from secondorder.models import from_torch

    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Tanh(), torch.nn.Flatten(),
                              torch.nn.Linear(8, 3)).double()
    apply, params = from_torch(net)
    rng = np.random.default_rng(5)
    m = 6
    x, y = rng.standard_normal((m, 1, 4, 4)), rng.standard_normal((m, 3))
    patches = np.stack([np.stack([x[i, 0, r:r + 3, c:c + 3].ravel() for r in (0, 1)
                                  for c in (0, 1)]) for i in range(m)])
    ph = np.concatenate([patches, np.ones((m, 4, 1))], axis=2)  # (m, T, 10)

    def fb(ws):
        h = np.tanh(ph @ ws[0].T)  # (m, T, C)
        feats = np.hstack([h.transpose(0, 2, 1).reshape(m, 8), np.ones((m, 1))])
        f = feats @ ws[1].T
        d2 = f - y  # MSE: l_n = 1/2 ||f_n - y_n||^2
        d1 = (d2 @ ws[1][:, :-1]).reshape(m, 2, 4).transpose(0, 2, 1) * (1 - h**2)
        grads = [np.einsum("mtc,mti->ci", d1, ph) / m, d2.T @ feats / m]
        return grads, [ph, feats[:, None]], [d1, d2[:, None]]

    def tilde(p, w, b):
        return np.hstack([p[w].numpy().reshape(p[w].shape[0], -1), p[b].numpy()[:, None]])

    names = (("0.weight", "0.bias"), ("3.weight", "3.bias"))
    xt, yt = torch.asarray(x), torch.asarray(y)
    results, states = {}, {}
    for split in ("positions", "equal"):
        opt = KBFGS(apply, losses.MSE(), lr=0.3, damping=0.5, curvature_interval=2,
                    damping_split=split)
        p, state = params, opt.init(params)
        for _ in range(3):
            p, state, info = opt.step(p, state, (xt, yt))
            assert bool(info.finite)
        results[split] = [tilde(p, w, b) for w, b in names]
        states[split] = state
    ws, h_a, _ = _reference(fb, [tilde(params, w, b) for w, b in names], 3, lr=0.3, lam=0.5,
                            period=2)
    for i in range(2):
        np.testing.assert_allclose(results["positions"][i], ws[i], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(states["positions"].layers[i].h_a.numpy(), h_a[i],
                                   rtol=1e-11, atol=1e-13)
    assert np.abs(results["equal"][0] - ws[0]).max() > 1e-6


@pytest.mark.parametrize("cls", [KBFGS, KBFGSL])
def test_a_short_training_run_decreases_the_loss(cls):
    """40 steps on a fixed batch of a 3-class problem (numpy, T = 2): the loss falls below
    half its initial value. K-BFGS(L) keeps 8 pairs, so its 20 curvature updates wrap the
    buffer (and the test avoids NumPy's 100 x 100 solves, slow on a shared machine)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((32, 4))
    y = np.argmax(x[:, :3] + 0.3 * rng.standard_normal((32, 3)), axis=1)
    model = MLP([4, 8, 3], "tanh")
    kw = {"memory": 8} if cls is KBFGSL else {}
    opt = cls(model, losses.SoftmaxCrossEntropy(), lr=0.2, damping=0.3, curvature_interval=2,
              **kw)
    params = model.init(0, "numpy")
    state = opt.init(params)
    losses_seen = []
    for _ in range(40):
        params, state, info = opt.step(params, state, (x, y))
        losses_seen.append(float(info.loss))
    assert losses_seen[-1] < 0.5 * losses_seen[0], losses_seen[::8]


def test_errors_name_the_fix():
    model = MLP([3, 4, 2], "tanh")
    with pytest.raises(HyperparameterError, match="pair_damping"):
        KBFGS(model, losses.MSE(), pair_damping="powell")
    with pytest.raises(HyperparameterError, match="damping <= 1"):
        KBFGS(model, losses.MSE(), pair_damping="dd", damping=4.0)
    with pytest.raises(HyperparameterError, match="product"):
        KBFGSL(model, losses.MSE(), product="dense")
    with pytest.raises(HyperparameterError, match="memory"):
        KBFGSL(model, losses.MSE(), memory=2.5)
    with pytest.raises(HyperparameterError, match="curvature_interval"):
        KBFGS(model, losses.MSE(), curvature_interval=0)
    with pytest.raises(StructureError, match="layer taps"):
        KBFGS(lambda p, x: x, losses.MSE())


def test_parameters_outside_tapped_layers_take_the_fallback():
    """A LayerNorm between two tapped Linear layers: its first step is -lr g with the SGD
    fallback and -lr g / (|g| + eps) with the Adam one (Adam's v^ = g^2 after one step)."""
    torch = pytest.importorskip("torch")
    from secondorder.models import from_torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Tanh(),
                              torch.nn.Linear(4, 2)).double()
    apply, params = from_torch(net)
    rng = np.random.default_rng(9)
    x, y = torch.asarray(rng.standard_normal((8, 3))), torch.asarray(rng.standard_normal((8, 2)))
    (0.5 * ((net(x) - y) ** 2).sum(1).mean()).backward()
    lr, eps = 0.2, 1e-8
    for fallback in ("sgd", "adam"):
        opt = KBFGS(apply, losses.MSE(), lr=lr, damping=0.3, fallback=fallback,
                    fallback_eps=eps)
        new, _, info = opt.step(params, opt.init(params), (x, y))
        assert bool(info.finite)
        for name in ("1.weight", "1.bias"):
            g = dict(net.named_parameters())[name].grad.numpy()
            expected = -lr * (g if fallback == "sgd" else g / (np.abs(g) + eps))
            np.testing.assert_allclose((new[name] - params[name]).numpy(), expected,
                                       rtol=1e-10, atol=1e-15)


# ------------------------------------------------------------------ a layer followed by BatchNorm


def _bn_net(torch):
    """Conv2d(1, 3, 3) -> BatchNorm2d -> ReLU -> Linear on 6 x 6 images (|T| = 16): BatchNorm's
    backward removes the per-channel mean, so the convolution's Dh_bar is 0 in exact
    arithmetic, and the computed one rounding noise (~1e-17)."""
    nn = torch.nn
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 3)).double()


def _bn_data(torch, dtype=None):
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(8, 1, 6, 6, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]
    return [(x.to(dtype or torch.float64), y) for x, y in data]


@pytest.mark.parametrize("method", ["kbfgs", "kbfgs-l"])
def test_a_layer_before_batchnorm_is_insensitive_to_rounding(method):
    """Three steps of the torch Optimizer (the class's defaults) on the conv + BatchNorm net, from
    the initial parameters and from them times (1 + 1e-14): the parameters differ by < 1e-10
    relative (K-FAC's 1e-14). Without the zeroing of Dh_bar below its rounding level, the noise
    in y_G decided the sign of s^T y in the Powell damping and the convolution moved 6e-3
    apart."""
    torch = pytest.importorskip("torch")
    from secondorder.integrations.torch import Optimizer

    runs = []
    for factor in (1.0, 1.0 + 1e-14):
        net = _bn_net(torch)
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(factor)
        opt = Optimizer(net, torch.nn.CrossEntropyLoss(), method=method)
        for batch in _bn_data(torch):
            opt.step(batch)
        runs.append([p.detach().clone() for p in net.parameters()])
    for a, b in zip(*runs):
        assert float((a - b).norm() / a.norm()) < 1e-10


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("cls", [KBFGS, KBFGSL])
def test_h_g_of_a_layer_before_batchnorm_is_its_exact_arithmetic_value(cls, dtype):
    """The exact-arithmetic run, by hand: the convolution's Dh_bar = 0 at every pass, so y_G = 0;
    the damping (Algorithm 8) leaves s~ = s_G (s^T y = 0 = mu1 y^T H y) and gives
    y~ = lambda_G s~; with H_G = I / lambda_G, H_G y~ = s~ already holds, so the BFGS update
    leaves H_G = I / lambda_G (lambda_G = sqrt(lambda / |T|), |T| = 16), for K-BFGS(L) the
    pairs are (s~, lambda_G s~) and the L-BFGS matrix from H_0 = I / lambda_G is I / lambda_G.
    After three curvature updates along nonzero s_G the state is that, to rounding; the dense
    layer's Dh_bar is torch's gradient of its bias (|T| = 1), untouched, the convolution's is
    exactly 0 where torch's bias gradient is rounding noise."""
    torch = pytest.importorskip("torch")
    from secondorder.models import from_torch

    net = _bn_net(torch).to(getattr(torch, dtype))
    apply, params = from_torch(net)
    lam, positions = 0.3, 16
    kw = {"memory": 3} if cls is KBFGSL else {}
    opt = cls(apply, losses.SoftmaxCrossEntropy(), lr=0.1, damping=lam, curvature_interval=1,
              **kw)
    data = _bn_data(torch, getattr(torch, dtype))
    # the dense layer's Dh_bar against torch's bias gradient; the convolution's is exactly 0
    x, y = data[0]
    torch.nn.functional.cross_entropy(net(x), y).backward()
    layers = opt._layers(tree.flatten(params)[0])
    dh = opt._pass(params, layers, data[0], with_grad=False)[2]
    eps = float(torch.finfo(x.dtype).eps)
    assert float(net[0].bias.grad.abs().max()) < 64 * eps  # rounding noise (~1e-17 in float64)
    np.testing.assert_array_equal(dh[0].dh_bar.numpy(), 0.0)
    np.testing.assert_allclose(dh[1].dh_bar.numpy(), net[4].bias.grad.numpy(), rtol=100 * eps)

    p, state = params, opt.init(params)
    for batch in data:
        p, state, info = opt.step(p, state, batch)
        assert bool(info.finite)
    conv = state.layers[0]
    assert float(torch.linalg.vector_norm(conv.s_g)) > 1e-3  # the updates had a direction
    np.testing.assert_array_equal(conv.y_g.numpy(), 0.0)
    lam_g = math.sqrt(lam / positions)
    expected = np.eye(3) / lam_g
    if cls is KBFGSL:
        mem = conv.h_g
        assert int((mem.rho > 0).sum()) == 3
        np.testing.assert_allclose(mem.y.numpy(), lam_g * mem.s.numpy(), rtol=0,
                                   atol=10 * eps * lam_g)
        h0 = torch.tensor(1 / lam_g, dtype=x.dtype)
        h_g = qn.lbfgs_apply(mem, torch.eye(3, dtype=x.dtype), h0)
    else:
        h_g = conv.h_g
    np.testing.assert_allclose(h_g.numpy(), expected, rtol=0, atol=16 * eps / lam_g)
