"""TNT (thesis Algorithm 15) against independent float64 references: the normalisation (4.10)
(equal tr(U~_i)/d_i; the Kronecker product equals the covariance exactly for tensor-normal
gradients, from the exact expectations E[G^(i)] = U_i prod_{j != i} tr(U_j)); the first steps
(T1 = 2, T2 = 3) against a NumPy re-implementation with the same sampled labels; a training
run; a torch nn.Sequential with Conv2d as a 3-way tensor."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_close, dense_kron, spd
from secondorder import backends, losses, random, tree
from secondorder.errors import HyperparameterError
from secondorder.models import MLP
from secondorder.optim import TNT
from secondorder.optim.tnt import normalise

pytest.importorskip("autograd")

MODEL = MLP([3, 4, 3], "tanh")
LOSS = losses.SoftmaxCrossEntropy()
NP = backends.get("numpy")


def _batches(n: int, seed: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((8, 3)), rng.integers(0, 3, 8)) for _ in range(n)]


def test_normalised_factors_have_equal_average_eigenvalues():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((2, 3, 5))
    stats = [np.moveaxis(g, i, 0).reshape(g.shape[i], -1) for i in range(3)]
    tilde = normalise([u @ u.T for u in stats], np)
    ratios = [np.trace(u) / u.shape[0] for u in tilde]
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-14)
    # c0 = (||G||^2 / prod d)^(1/k)
    np.testing.assert_allclose(ratios[0], (np.sum(g * g) / g.size) ** (1 / 3), rtol=1e-14)


@pytest.mark.parametrize("dims", [(4,), (3, 2), (2, 3, 4)])
def test_kronecker_of_normalised_factors_is_the_tensor_normal_covariance(dims):
    rng = np.random.default_rng(1)
    us = [spd(rng, d, cond=5.0) * rng.uniform(0.1, 3.0) for d in dims]
    traces = [np.trace(u) for u in us]
    expected = [u * np.prod([t for j, t in enumerate(traces) if j != i])
                for i, u in enumerate(us)]
    tilde = normalise(expected, np)
    np.testing.assert_allclose(dense_kron(*tilde), dense_kron(*us), rtol=1e-12, atol=0)


def test_monte_carlo_mode_statistics_of_tensor_normal_samples():
    # E[G^(i)] estimated from tensor-normal draws G = Z x_1 L_1 x_2 L_2 (U_i = L_i L_i^T)
    rng = np.random.default_rng(2)
    us = [spd(rng, 3, cond=4.0), spd(rng, 2, cond=3.0) * 2.0]
    ls = [np.linalg.cholesky(u) for u in us]
    z = rng.standard_normal((20000, 3, 2))
    g = np.einsum("ia,jb,nab->nij", ls[0], ls[1], z)
    e1 = np.einsum("nij,nkj->ik", g, g) / len(g)
    e2 = np.einsum("nij,nik->jk", g, g) / len(g)
    tilde = normalise([e1, e2], np)
    cov = np.cov(g.reshape(len(g), -1).T, bias=True)
    truth = dense_kron(*us)
    assert np.linalg.norm(dense_kron(*tilde) - truth) < 0.05 * np.linalg.norm(truth)
    assert np.linalg.norm(cov - truth) < 0.05 * np.linalg.norm(truth)


def _reference(params, batches, *, lr, mu, beta, eps, wd, t1, t2, estimate, seed):
    """Algorithm 15 in NumPy with the optimiser's labels (drawn from the same keys, which
    advance at the statistics steps)."""
    leaves = [np.array(a) for a in tree.leaves(params)]
    treedef = tree.structure(params)
    m = [np.zeros_like(a) for a in leaves]
    stats: dict = {}
    inverses: dict = {}
    key = random.key(seed, NP)
    for t, (x, y) in enumerate(batches):
        p_tree = tree.unflatten(treedef, leaves)
        grad = tree.leaves(NP.grad(lambda p, x=x, y=y: LOSS.value(MODEL.apply(p, x), y),
                                   p_tree))
        if t % t1 == 0:
            keys = random.split(key)
            key, sample_key = keys[0], keys[1]
            labels = LOSS.sample(MODEL.apply(p_tree, x), key=sample_key)
            s = 1.0 if estimate == "batch_mean" else np.sqrt(len(x))
            sampled = tree.leaves(NP.grad(
                lambda p, x=x, z=labels: LOSS.value(MODEL.apply(p, x), z), p_tree))
        new = []
        for j, (w, g) in enumerate(zip(leaves, grad)):
            k = w.ndim
            if t % t1 == 0:
                gs = s * np.array(sampled[j])
                batch = [np.moveaxis(gs, i, 0).reshape(w.shape[i], -1) for i in range(k)]
                batch = [u @ u.T for u in batch]
                stats[j] = batch if j not in stats else [beta * a + (1 - beta) * b
                                                         for a, b in zip(stats[j], batch)]
            if t % t2 == 0:
                size = w.size
                c0 = (np.mean([np.trace(e) for e in stats[j]]) / size) ** (1 / k)
                tilde = [e / (c0 ** (k - 1) * size / e.shape[0]) for e in stats[j]]
                inverses[j] = [np.linalg.inv(u + eps * np.eye(len(u))) for u in tilde]
            m[j] = mu * m[j] + np.array(g)
            p = m[j]
            for i in range(k):
                p = np.moveaxis(np.tensordot(inverses[j][i], p, axes=(1, i)), 0, i)
            new.append(w - lr * (p + wd * w))
        leaves = new
    return tree.unflatten(treedef, leaves)


@pytest.mark.parametrize("estimate", ["batch_mean", "per_example"])
def test_first_steps_equal_a_numpy_reimplementation_of_algorithm_15(estimate):
    hp = {"lr": 1e-3, "mu": 0.9, "beta": 0.8, "eps": 0.05, "wd": 0.01, "t1": 2, "t2": 3,
          "estimate": estimate, "seed": 11}
    batches = _batches(6)
    params = MODEL.init(0, NP)
    opt = TNT(MODEL.apply, LOSS, lr=hp["lr"], momentum=hp["mu"], beta=hp["beta"],
              eps=hp["eps"], weight_decay=hp["wd"], statistics_interval=hp["t1"],
              inverse_interval=hp["t2"], fisher_estimate=estimate, seed=hp["seed"])
    state = opt.init(params)
    out = params
    for batch in batches:
        out, state, info = opt.step(out, state, batch)
        assert bool(info.finite) and float(info.extras["inverses_kept"]) == 0
    assert_close(out, _reference(params, batches, **hp), rtol=1e-11)


def test_training_decreases_the_loss():
    x, y = _batches(1, seed=6)[0]
    opt = TNT(MODEL.apply, LOSS, lr=1e-2, eps=0.1)
    params = MODEL.init(1, NP)
    state = opt.init(params)
    first = None
    for _ in range(15):
        params, state, info = opt.step(params, state, (x, y))
        first = float(info.loss) if first is None else first
    assert float(info.loss) < 0.8 * first


@pytest.mark.parametrize("bad", [{"eps": 0.0}, {"momentum": 1.0}, {"inverse_interval": 0},
                                 {"fisher_estimate": "sum"}, {"kernel_layout": "nchw"}])
def test_bad_hyperparameters_are_refused(bad):
    with pytest.raises(HyperparameterError):
        TNT(MODEL.apply, LOSS, **bad)


def test_torch_sequential_with_linear_and_conv2d_steps():
    torch = pytest.importorskip("torch")
    from secondorder.models import from_torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Tanh(), torch.nn.Flatten(),
                              torch.nn.Linear(8, 3)).double()
    apply, params = from_torch(net)
    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.standard_normal((6, 1, 4, 4)))
    y = torch.as_tensor(rng.integers(0, 3, 6))
    opt = TNT(apply, LOSS, lr=5e-3, eps=0.1)
    state = opt.init(params)
    # the kernel (2, 1, 3, 3) is the 3-way tensor (out 2, in 1, filter 9)
    dims = sorted(tuple(f.shape[0] for f in b[0].factors) for b in state.blocks)
    assert (2, 1, 9) in dims and (3, 8) in dims
    seen = []
    for _ in range(8):
        params, state, info = opt.step(params, state, (x, y))
        seen.append(float(info.loss))
    assert bool(info.finite) and seen[-1] < seen[0]


def test_conv1d_kernel_direction_equals_a_dense_kronecker_oracle():
    """A Conv1DNet kernel stored (C_out, C_in, 1, k) is the 3-way tensor (C_out, C_in, k): the
    first direction (T1 = T2 = 1, no momentum) on every leaf equals the dense solve
    ((x)_i (U~_i + eps I)) vec~(P) = vec~(g), with U~_i from the mode statistics of the
    sampled gradient by (4.10) written out here, for both mini-batch scalings."""
    from secondorder.models import Conv1DNet

    model = Conv1DNet(length=12, channels=(3, 2), kernels=(3, 2), strides=2, padding=1,
                      dense=(3,))
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((7, 12)), rng.integers(0, 3, 7)
    params = model.init(2, NP)
    eps, seed = 0.07, 9
    labels = LOSS.sample(model.apply(params, x), key=random.split(random.key(seed, NP))[1])
    grad = tree.leaves(NP.grad(lambda p: LOSS.value(model.apply(p, x), y), params))
    sampled = tree.leaves(NP.grad(lambda p: LOSS.value(model.apply(p, x), labels), params))
    for estimate, s in (("batch_mean", 1.0), ("per_example", np.sqrt(7.0))):
        opt = TNT(model.apply, LOSS, lr=1.0, momentum=0.0, eps=eps, seed=seed,
                  fisher_estimate=estimate)
        new, _, info = opt.step(params, opt.init(params), (x, y))
        assert bool(info.finite)
        for w, w_new, g, gs in zip(tree.leaves(params), tree.leaves(new), grad, sampled):
            w, g, gs = np.asarray(w), np.asarray(g), s * np.asarray(gs)
            if w.ndim == 4:  # (out, in, 1, k) -> (out, in, k)
                assert w.shape[2] == 1
                g, gs = g[:, :, 0, :], gs[:, :, 0, :]
            dims, k = g.shape, g.ndim
            stats = [np.tensordot(gs, gs, axes=([j for j in range(k) if j != i],) * 2)
                     for i in range(k)]
            c0 = (np.sum(gs * gs) / gs.size) ** (1 / k)
            tilde = [e / (c0 ** (k - 1) * gs.size / d) for e, d in zip(stats, dims)]
            dense = dense_kron(*[u + eps * np.eye(len(u)) for u in tilde])
            expected = np.linalg.solve(dense, g.reshape(-1)).reshape(w.shape)
            np.testing.assert_allclose(w - np.asarray(w_new), expected, rtol=1e-12,
                                       atol=1e-14 * np.abs(expected).max())
