"""The hand-written K-FAC and Shampoo of ``benchmarks/_handwritten_kfac.py`` and
``benchmarks/_handwritten_shampoo.py`` (the references outside the library that
``benchmarks/kronecker.py`` times them against) take the library's steps: a benchmark against a
reference computing something else would measure nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from secondorder import backends, losses, tree
from secondorder.models import MLP
from secondorder.optim import KFAC, Shampoo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _handwritten_kfac as handwritten  # noqa: E402 - the benchmarks' modules, by path
import _handwritten_shampoo as handwritten_shampoo  # noqa: E402


def _problem(name):
    pytest.importorskip(name)
    b = backends.get(name)
    rng = np.random.default_rng(0)
    model = MLP((20, 16, 5), "tanh")
    params = model.init(0, b, dtype="float64")
    x = b.asarray(rng.standard_normal((12, 20)), dtype="float64")
    y = b.asarray(rng.integers(0, 5, 12))
    return model, params, x, y


def _assert_same_steps(opt, step, carry, params, x, y):
    """12 steps of the library's ``opt`` and of the hand-written ``step`` from ``params``."""
    p, s = params, opt.init(params)
    for _ in range(12):
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
