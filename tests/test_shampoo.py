"""Shampoo (thesis Algorithm 16) against independent float64 references: the inverse 2k-th roots
by eigh and by the coupled Newton iteration against SciPy's fractional matrix power; the first
steps (statistics every T1 = 2, roots every T2 = 3, blocking and Adam grafting) against a
brute-force NumPy re-implementation; a training run; a torch nn.Sequential with Conv2d."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from helpers import assert_close
from secondorder import backends, losses, tree
from secondorder.curvature.blocks import TensorBlock
from secondorder.errors import HyperparameterError, NotPositiveDefiniteError
from secondorder.models import MLP
from secondorder.optim import Shampoo
from secondorder.optim import _tensor_blocks as tb

pytest.importorskip("autograd")

MODEL = MLP([3, 4, 2], "tanh")
LOSS = losses.SoftmaxCrossEntropy()
NP = backends.get("numpy")


def _batches(n: int, seed: int = 3) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((8, 3)), rng.integers(0, 2, 8)) for _ in range(n)]


@pytest.mark.parametrize("shape", [(4, 3), (3, 2, 2)])
def test_roots_by_eigh_and_coupled_newton_equal_the_dense_oracle(shape):
    rng = np.random.default_rng(0)
    block = TensorBlock(shape)
    state = block.update_statistics(block.init(np.zeros(1)),
                                    block.batch_statistics(rng.standard_normal(shape)), 0.9)
    eps, k = 1e-3, len(shape)
    eigh = block.update_cache(state, eps, kind="root", split="each", method="eigh")
    newton = block.update_cache(state, eps, kind="root", split="each", method="newton")
    for f, r_eigh, r_newton in zip(state.factors, eigh.cache.factors, newton.cache.factors):
        oracle = np.real(scipy.linalg.fractional_matrix_power(f + eps * np.eye(len(f)),
                                                              -1.0 / (2 * k)))
        assert_close(r_eigh, oracle, rtol=1e-10)
        # the iteration stops at max |X^p A - I| < 1e-6
        assert_close(r_newton, oracle, rtol=1e-6)
        assert_close(r_newton, r_eigh, rtol=1e-6)


def test_newton_steps_match_eigh_steps():
    batches = _batches(3)
    runs = []
    for method in ("eigh", "newton"):
        opt = Shampoo(MODEL.apply, LOSS, lr=0.1, eps=1e-3, root_method=method)
        params = MODEL.init(0, NP)
        state = opt.init(params)
        for batch in batches:
            params, state, info = opt.step(params, state, batch)
        runs.append(params)
    assert_close(runs[1], runs[0], rtol=1e-6)


def _unfold_stat(g: np.ndarray, i: int) -> np.ndarray:
    u = np.moveaxis(g, i, 0).reshape(g.shape[i], -1)
    return u @ u.T


def _mode_product(x: np.ndarray, r: np.ndarray, i: int) -> np.ndarray:
    return np.moveaxis(np.tensordot(r, x, axes=(1, i)), 0, i)


def _root(f: np.ndarray, eps: float, k: int) -> np.ndarray:
    w, q = np.linalg.eigh(f)
    return (q * (np.maximum(w, 0) + eps) ** (-1.0 / (2 * k))) @ q.T


def _blocks(shape: tuple[int, ...], size: int) -> list[tuple[slice, ...]]:
    cuts = [[slice(a, min(a + size, n)) for a in range(0, n, size)] for n in shape]
    return [tuple(cuts[a][j] for a, j in enumerate(idx))
            for idx in np.ndindex(*[len(c) for c in cuts])]


def _reference(params, batches, *, lr, mu, beta, eps, wd, t1, t2, size, b1, b2, aeps):
    """Algorithm 16 with blocking and Adam grafting, written out in NumPy (float64)."""
    leaves = [np.array(a) for a in tree.leaves(params)]
    treedef = tree.structure(params)
    m = [np.zeros_like(a) for a in leaves]
    a1 = [np.zeros_like(a) for a in leaves]
    v = [np.zeros_like(a) for a in leaves]
    stats: dict = {}
    roots: dict = {}
    for t, (x, y) in enumerate(batches):
        grad = tree.leaves(NP.grad(
            lambda p, x=x, y=y: LOSS.value(MODEL.apply(p, x), y),
            tree.unflatten(treedef, leaves)))
        new = []
        for j, (w, g) in enumerate(zip(leaves, grad)):
            g = np.array(g)
            m[j] = mu * m[j] + g
            a1[j] = b1 * a1[j] + (1 - b1) * g
            v[j] = b2 * v[j] + (1 - b2) * g * g
            p = np.zeros_like(w)
            for b, window in enumerate(_blocks(w.shape, size)):
                # a block's axes of length 1 are not modes (Distributed Shampoo's convention)
                block = tuple(n for n in g[window].shape if n != 1) or (1,)
                gb, k = g[window].reshape(block), len(block)
                if t % t1 == 0:
                    s = [_unfold_stat(gb, i) for i in range(k)]
                    old = stats.get((j, b))
                    stats[j, b] = s if old is None else [beta * o + (1 - beta) * n
                                                         for o, n in zip(old, s)]
                if t % t2 == 0:
                    roots[j, b] = [_root(f, eps, k) for f in stats[j, b]]
                pb = m[j][window].reshape(block)
                for i in range(k):
                    pb = _mode_product(pb, roots[j, b][i], i)
                p[window] = pb.reshape(p[window].shape)
            q = (a1[j] / (1 - b1 ** (t + 1))) / (np.sqrt(v[j] / (1 - b2 ** (t + 1))) + aeps)
            p = p * np.linalg.norm(q) / np.linalg.norm(p) + wd * w
            new.append(w - lr * p)
        leaves = new
    return tree.unflatten(treedef, leaves)


def test_first_steps_equal_a_numpy_reimplementation_of_algorithm_16():
    hp = {"lr": 0.05, "mu": 0.9, "beta": 0.8, "eps": 1e-3, "wd": 0.01, "t1": 2, "t2": 3,
          "size": 3, "b1": 0.9, "b2": 0.99, "aeps": 1e-8}
    batches = _batches(6)
    params = MODEL.init(0, NP)
    opt = Shampoo(MODEL.apply, LOSS, lr=hp["lr"], momentum=hp["mu"], beta=hp["beta"],
                  eps=hp["eps"], weight_decay=hp["wd"], statistics_interval=hp["t1"],
                  root_interval=hp["t2"], block_size=hp["size"], graft="adam",
                  graft_b1=hp["b1"], graft_b2=hp["b2"], graft_eps=hp["aeps"])
    state = opt.init(params)
    # the 4 x 3 kernel is cut into 3 x 3 and 1 x 3 blocks, the bias of 4 into 3 and 1
    # (leaves in sorted-key order: b1, w1, b2, w2); w2 (2 x 4) into 2 x 3 and 2 x 1; the blocks
    # 1 x 3 and 2 x 1 are vectors, with one factor each
    assert [len(b) for b in state.blocks] == [2, 2, 1, 2]
    assert [[len(block.factors) for block in leaf] for leaf in state.blocks] == [
        [1, 1], [2, 1], [1], [2, 1]]
    out = params
    for batch in batches:
        out, state, info = opt.step(out, state, batch)
        assert bool(info.finite) and float(info.extras["roots_kept"]) == 0
    assert_close(out, _reference(params, batches, **hp), rtol=1e-12)


def test_plain_algorithm_16_without_grafting_matches_the_reference_direction():
    # no grafting and no blocking: one step is -lr (m x_1 R_1 x_2 R_2) with m = g
    x, y = _batches(1)[0]
    params = MODEL.init(0, NP)
    opt = Shampoo(MODEL.apply, LOSS, lr=0.1, eps=1e-2)
    new, _, _ = opt.step(params, opt.init(params), (x, y))
    grad = tree.leaves(NP.grad(lambda p: LOSS.value(MODEL.apply(p, x), y), params))
    for w, w_new, g in zip(tree.leaves(params), tree.leaves(new), grad):
        p = np.array(g)
        for i in range(g.ndim):
            p = _mode_product(p, _root(_unfold_stat(np.array(g), i), 1e-2, g.ndim), i)
        np.testing.assert_allclose(w_new, w - 0.1 * p, rtol=1e-12, atol=1e-15)


def test_blocks_split_and_join_round_trip():
    plan = tb.plan_leaf((7, 5), (7, 5), 3)
    assert plan.block_shapes == [(3, 3), (3, 2), (3, 3), (3, 2), (1, 3), (1, 2)]
    x = np.arange(35.0).reshape(7, 5)
    parts = tb.split(x, plan, NP.xp)
    np.testing.assert_array_equal(parts[3], x[3:6, 3:5])
    np.testing.assert_array_equal(tb.join(parts, plan, NP.xp), x)


def test_blocks_drop_axes_of_length_one_when_the_plan_squeezes():
    plan = tb.plan_leaf((7, 1, 5), (7, 1, 5), 3, squeeze=True)
    assert plan.tensor == (7, 5)
    assert plan.block_shapes == [(3, 3), (3, 2), (3, 3), (3, 2), (3,), (2,)]
    x = np.arange(35.0).reshape(7, 1, 5)
    parts = tb.split(x, plan, NP.xp)
    np.testing.assert_array_equal(parts[4], x[6, 0, 0:3])
    np.testing.assert_array_equal(tb.join(parts, plan, NP.xp), x)
    assert tb.plan_leaf((1, 1), (1, 1), None, squeeze=True).block_shapes == [(1,)]


def test_axes_of_length_one_are_not_modes():
    """A (1, 3, 2) kernel is preconditioned as the 3 x 2 matrix it holds (k = 2, exponent
    -1/4) and a (2, 1) one as a vector (k = 1, exponent -1/2): the first step against the
    dense roots of the squeezed gradients."""
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((8, 3)), rng.integers(0, 2, 8)
    params = {"w": rng.standard_normal((1, 3, 2)), "v": rng.standard_normal((2, 1))}

    def apply(p, x):
        return (x @ p["w"][0]) * p["v"][:, 0]

    opt = Shampoo(apply, LOSS, lr=0.1, eps=1e-2)
    new, state, _ = opt.step(params, opt.init(params), (x, y))
    grad = NP.grad(lambda p: LOSS.value(apply(p, x), y), params)
    gw, gv = np.array(grad["w"])[0], np.array(grad["v"])[:, 0]
    pw = _root(gw @ gw.T, 1e-2, 2) @ gw @ _root(gw.T @ gw, 1e-2, 2)
    pv = _root(np.outer(gv, gv), 1e-2, 1) @ gv
    np.testing.assert_allclose(new["w"], params["w"] - 0.1 * pw[None], rtol=1e-12)
    np.testing.assert_allclose(new["v"], params["v"] - 0.1 * pv[:, None], rtol=1e-12)


def test_a_failing_root_keeps_the_previous_one():
    block = TensorBlock((2, 2))
    state = block.init(np.zeros(1))

    def fails():
        raise NotPositiveDefiniteError("diverged")

    kept, failed = tb.guarded_cache(NP, state, fails)
    assert kept is state and float(failed) == 1.0
    bad = state._replace(factors=(np.full((2, 2), np.nan), np.eye(2)))
    kept, failed = tb.guarded_cache(NP, bad, fails)
    assert kept is bad and float(failed) == 1.0


def test_training_decreases_the_loss():
    x, y = _batches(1, seed=5)[0]
    opt = Shampoo(MODEL.apply, LOSS, lr=0.05, eps=1e-3, graft="sgd")
    params = MODEL.init(1, NP)
    state = opt.init(params)
    first = None
    for _ in range(15):
        params, state, info = opt.step(params, state, (x, y))
        first = float(info.loss) if first is None else first
    assert float(info.loss) < 0.7 * first


@pytest.mark.parametrize("bad", [{"eps": 0.0}, {"beta": 1.0}, {"root_interval": 0},
                                 {"block_size": 2.5}, {"graft": "adagrad"},
                                 {"root_method": "svd"}])
def test_bad_hyperparameters_are_refused(bad):
    with pytest.raises(HyperparameterError):
        Shampoo(MODEL.apply, LOSS, **bad)


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
    opt = Shampoo(apply, LOSS, lr=0.05, eps=1e-3, graft="adam")
    state = opt.init(params)
    # the kernel (2, 1, 3, 3) has one input channel: three factors (2, 3, 3) and roots -1/6
    kernel = [b for b in state.blocks if len(b[0].factors) == 3]
    assert len(kernel) == 1 and float(kernel[0][0].cache.power) == -1.0 / 6
    assert [f.shape for f in kernel[0][0].factors] == [(2, 2), (3, 3), (3, 3)]
    losses_seen = []
    for _ in range(10):
        params, state, info = opt.step(params, state, (x, y))
        losses_seen.append(float(info.loss))
    assert bool(info.finite) and losses_seen[-1] < losses_seen[0]


@pytest.mark.parametrize("name", ["numpy", "jax"])
def test_statistics_that_overflow_reject_the_step_although_the_update_is_finite(name):
    # float32, a linear network: inputs of 1e21 give finite logits and loss (~1e19) and a
    # finite update through the step-0 roots, but g g^T (~1e38 and beyond) overflows; the
    # statistics' check (read from their diagonals) must reject the step and keep the state
    b = backends.get(name)
    if name == "jax":
        pytest.importorskip("jax")
    model = MLP([3, 4, 2], "tanh", linear=(0,))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3))
    y = b.asarray(rng.integers(0, 2, 8))
    opt = Shampoo(model, LOSS, lr=1e-3, root_interval=100)
    step = b.jit(opt.step)
    params = model.init(0, b, dtype="float32")
    params, state, info = step(params, opt.init(params), (b.asarray(x, dtype="float32"), y))
    assert bool(info.finite)
    huge = (b.asarray(1e21 * x, dtype="float32"), y)
    new_params, new_state, info = step(params, state, huge)
    trial = opt.step(params, state._replace(count=state.count * 0 + 1), huge)  # eager, rejected
    assert np.isfinite(float(info.loss)) and not bool(info.finite) and not bool(trial[2].finite)
    for a, c in zip(tree.leaves((new_params, new_state)), tree.leaves((params, state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
