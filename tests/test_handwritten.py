"""The hand-written K-FAC, Shampoo and TNT of ``benchmarks/_handwritten_*.py`` (the references
outside the library that ``benchmarks/kronecker.py`` times them against) take the library's
steps: a benchmark against a reference computing something else would measure nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from secondorder import backends, losses, random, tree
from secondorder.models import MLP
from secondorder.optim import KFAC, TNT, Shampoo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _handwritten_kfac as handwritten  # noqa: E402 - the benchmarks' modules, by path
import _handwritten_shampoo as handwritten_shampoo  # noqa: E402
import _handwritten_tnt as handwritten_tnt  # noqa: E402


def _problem(name):
    pytest.importorskip(name)
    b = backends.get(name)
    rng = np.random.default_rng(0)
    model = MLP((20, 16, 5), "tanh")
    params = model.init(0, b, dtype="float64")
    x = b.asarray(rng.standard_normal((12, 20)), dtype="float64")
    y = b.asarray(rng.integers(0, 5, 12))
    return model, params, x, y


def _assert_same_steps(opt, step, carry, params, x, y, steps=12):
    """``steps`` steps of the library's ``opt`` and of the hand-written ``step`` from
    ``params``."""
    p, s = params, opt.init(params)
    for _ in range(steps):
        p, s, info = opt.step(p, s, (x, y))
        carry = step(carry)
        assert bool(info.finite)
    moved = max(float(np.abs(np.asarray(a) - np.asarray(c)).max())
                for a, c in zip(tree.leaves(p), tree.leaves(params)))
    assert moved > 0.05  # the steps are not negligible next to the tolerance
    for ours, theirs in zip(tree.leaves(p), tree.leaves(carry[1])):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-10,
                                   atol=1e-12)


@pytest.mark.parametrize("name", ["torch", "jax"])
def test_handwritten_kfac_steps_are_the_library_kfac_steps(name):
    model, params, x, y = _problem(name)
    # the empirical Fisher: the targets are the labels on both sides (the Monte-Carlo targets
    # come from different generators); T1 = 2 and T2 = 5 cross both periods within 12 steps
    periods = {"statistics_interval": 2, "inverse_interval": 5}
    opt = KFAC(model, losses.SoftmaxCrossEntropy(), lr=handwritten.LR,
               damping=handwritten.DAMPING, momentum=handwritten.MOMENTUM,
               statistics_decay=handwritten.DECAY, mode="empirical", **periods)
    write = handwritten.torch_kfac if name == "torch" else handwritten.jax_kfac
    _assert_same_steps(opt, *write(params, x, y, mode="empirical", **periods), params, x, y)


@pytest.mark.parametrize("name", ["torch", "jax"])
def test_handwritten_shampoo_steps_are_the_library_shampoo_steps(name):
    model, params, x, y = _problem(name)
    hs = handwritten_shampoo
    periods = {"statistics_interval": 2, "root_interval": 5}
    opt = Shampoo(model, losses.SoftmaxCrossEntropy(), lr=hs.LR, momentum=hs.MOMENTUM,
                  beta=hs.BETA, eps=hs.EPS, **periods)
    write = hs.torch_shampoo if name == "torch" else hs.jax_shampoo
    _assert_same_steps(opt, *write(params, x, y, **periods), params, x, y)


@pytest.mark.parametrize("name", ["torch", "jax"])
def test_handwritten_tnt_steps_are_the_library_tnt_steps(name):
    # the sampled targets come from the library's keys, split as TNT splits them (once per
    # statistics step), so both sides draw the same labels. eps 1: with the benchmark's 0.01
    # the 12 samples' Fisher is so small that the steps blow up (weights of 30 by step 6) and
    # multiply rounding by about 10 a step (the library's own NumPy and torch steps then
    # differ by 2e-8 at step 12)
    model, params, x, y = _problem(name)
    ht = handwritten_tnt
    loss = losses.SoftmaxCrossEntropy()
    periods = {"statistics_interval": 2, "inverse_interval": 5}
    opt = TNT(model, loss, lr=ht.LR, momentum=ht.MOMENTUM, beta=ht.BETA, eps=1.0, seed=3,
              **periods)

    def draw(key, logits):
        keys = random.split(key)
        return keys[0, :], loss.sample(logits, key=keys[1, :])

    write = ht.torch_tnt if name == "torch" else ht.jax_tnt
    step, carry = write(params, x, y, draw=draw, key=random.key(3, backends.get(name)),
                        eps=1.0, **periods)
    _assert_same_steps(opt, step, carry, params, x, y)
