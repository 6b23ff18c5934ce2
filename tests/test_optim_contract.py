"""The optimiser contract for SGD, Adam, AdamW and CurveBall: updates against NumPy formulas,
the same first 10 steps on every backend, jax.jit compilation, and the non-finite guard."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_close, back, to
from secondorder import backends, losses, tree
from secondorder.models import MLP
from secondorder.optim import SGD, Adam, AdamW, CurveBall

pytest.importorskip("autograd")

MODEL = MLP([3, 4, 2], "tanh")
METHODS = {
    "sgd": lambda: SGD(MODEL, losses.MSE(), lr=0.1),
    "sgd-nesterov-wd": lambda: SGD(MODEL, losses.MSE(), lr=0.05, momentum=0.9, nesterov=True,
                                   weight_decay=1e-2),
    "adam": lambda: Adam(MODEL, losses.MSE(), lr=0.01, weight_decay=1e-3),
    "adamw": lambda: AdamW(MODEL, losses.MSE(), lr=0.01, weight_decay=0.1),
    "curveball": lambda: CurveBall(MODEL, losses.MSE(), damping=1.0),
    "curveball-hessian": lambda: CurveBall(MODEL, losses.MSE(), damping=1.0,
                                           curvature="hessian"),
    "curveball-fixed": lambda: CurveBall(MODEL, losses.MSE(), rho=0.9, beta=0.05),
}


def _batches(rng, n=10):
    return [(rng.standard_normal((6, 3)), rng.standard_normal((6, 2))) for _ in range(n)]


def _run(opt, backend, batches, step=None):
    params = MODEL.init(0, backend)
    state = opt.init(params)
    step = step or opt.step
    for x, y in batches:
        params, state, info = step(params, state, (to(backend, x), to(backend, y)))
    return params, state, info


@pytest.mark.parametrize("method", sorted(METHODS))
def test_first_ten_steps_agree_across_backends(ad_backend, rng, method):
    batches = _batches(rng)
    reference, _, _ = _run(METHODS[method](), backends.get("numpy"), batches)
    params, _, info = _run(METHODS[method](), ad_backend, batches)
    assert bool(info.finite)
    assert_close(params, back(backends.get("numpy"), reference), rtol=1e-10,
                 backend=ad_backend)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_step_compiles_under_jax_jit(rng, method):
    jax = pytest.importorskip("jax")
    b = backends.get("jax")
    batches = _batches(rng, 5)
    opt = METHODS[method]()
    eager, _, _ = _run(opt, b, batches)
    jitted, _, info = _run(opt, b, batches, step=jax.jit(opt.step))
    assert_close(jitted, back(b, eager), rtol=1e-10, backend=b)
    assert bool(info.finite)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_non_finite_batch_keeps_parameters_and_state(ad_backend, rng, method):
    opt = METHODS[method]()
    params = MODEL.init(0, ad_backend)
    state = opt.init(params)
    x, y = _batches(rng, 1)[0]
    params, state, _ = opt.step(params, state, (to(ad_backend, x), to(ad_backend, y)))
    y_bad = y.copy()
    y_bad[0, 0] = np.inf
    new_params, new_state, info = opt.step(params, state, (to(ad_backend, x),
                                                           to(ad_backend, y_bad)))
    assert not bool(info.finite) and float(info.step_norm) == 0.0
    assert_close(new_params, back(ad_backend, params), rtol=0.0, backend=ad_backend)
    for key, value in state._asdict().items():
        if key == "damping":
            assert float(new_state[key]) == 10.0 * float(value)
        else:
            assert_close(new_state[key], back(ad_backend, value), rtol=0.0,
                         backend=ad_backend)


def test_sgd_and_adam_match_numpy_formulas(rng):
    nb = backends.get("numpy")
    x, y = _batches(rng, 1)[0]
    params = MODEL.init(0, nb)
    _, grad = nb.value_and_grad(lambda p: losses.MSE().value(MODEL.apply(p, x), y), params)
    g, w = tree.ravel(grad)[0], tree.ravel(params)[0]
    # SGD, Nesterov momentum and weight decay, two steps from zero momentum at the same point
    opt = METHODS["sgd-nesterov-wd"]()
    state = opt.init(params)
    p1, state, _ = opt.step(params, state, (x, y))
    gd = g + 1e-2 * w
    assert_close(tree.ravel(p1)[0], w - 0.05 * (gd + 0.9 * gd))
    # AdamW first step: m / (1 - b1) = g, v / (1 - b2) = g^2
    opt = METHODS["adamw"]()
    p1, _, _ = opt.step(params, opt.init(params), (x, y))
    expected = w - 0.01 * g / (np.abs(g) + 1e-8) - 0.01 * 0.1 * w
    assert_close(tree.ravel(p1)[0], expected)
    # Adam with L2: the decay enters the gradient
    opt = METHODS["adam"]()
    p1, _, _ = opt.step(params, opt.init(params), (x, y))
    g2 = g + 1e-3 * w
    assert_close(tree.ravel(p1)[0], w - 0.01 * g2 / (np.abs(g2) + 1e-8))


def test_bad_hyperparameters_raise():
    with pytest.raises(ValueError):
        SGD(MODEL, losses.MSE(), lr=-1.0)
    with pytest.raises(ValueError):
        SGD(MODEL, losses.MSE(), lr=0.1, nesterov=True)
    with pytest.raises(ValueError):
        Adam(MODEL, losses.MSE(), b1=1.0)
    with pytest.raises(ValueError):
        CurveBall(MODEL, losses.MSE(), rho=0.9)
    with pytest.raises(ValueError):
        CurveBall(MODEL, losses.MSE(), rho=0.9, beta=0.1, adapt_damping=True)
