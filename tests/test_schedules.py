"""Schedules for every learning rate and damping (``secondorder.optim.schedules``).

- a schedule that returns a constant gives the steps of that number, bit for bit (for an
  adaptive damping: of the number with the adaptation off, which is what a schedule means);
- a schedule of the step count gives the parameters of an independent reference that rebuilds
  the method with the number changed by hand before every step (for a damping kept in the state:
  the state's damping set by hand), on NumPy, PyTorch and JAX, and under ``jax.jit``;
- a schedule closing over a traced value runs under ``jax.vmap``; optax's own schedules work;
- asking for an adaptive damping and a damping schedule together is an error.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from helpers import assert_close, back
from secondorder import backends, losses, tree
from secondorder.errors import HyperparameterError
from secondorder.models import MLP
from secondorder.optim import (
    BFGS,
    SGD,
    Adam,
    AdamW,
    CurveBall,
    GroupedNewton,
    HessianFree,
    LevenbergMarquardt,
    Newton,
    ProxLinear,
)

pytest.importorskip("autograd")

MODEL = MLP([3, 4, 3], "tanh")
LOSS = losses.SoftmaxCrossEntropy()
STEPS = 2


def decay(base):
    """base / (1 + t / 2): a step-dependent schedule written with arithmetic on t (so it runs on
    every backend's arrays and on Python floats alike)."""
    return lambda t: base / (1.0 + 0.5 * t)


#: name -> (factory(**hyperparameter), hyperparameter, base value, damping kept in the state)
CASES = {
    "sgd-lr": (lambda **h: SGD(MODEL.apply, LOSS, momentum=0.9, **h), "lr", 0.1, False),
    "hessian-free-lr": (lambda **h: HessianFree(MODEL.apply, LOSS, cg_iters=3, **h), "lr",
                        1.0, False),
    "hessian-free-damping": (lambda **h: HessianFree(MODEL.apply, LOSS, cg_iters=3, **h),
                             "damping", 1.0, True),
    "newton-lr": (lambda **h: Newton(MODEL.apply, LOSS, variant="abs", damping=1e-3, **h), "lr",
                  1.0, False),
    "newton-damping": (lambda **h: Newton(MODEL.apply, LOSS, variant="abs", **h), "damping",
                       0.1, False),
    "levenberg-marquardt-damping": (lambda **h: LevenbergMarquardt(MODEL.apply, LOSS, **h),
                                    "damping", 1.0, True),
    "curveball-damping": (lambda **h: CurveBall(MODEL.apply, LOSS, **h), "damping", 1.0, True),
    "curveball-fixed-beta": (lambda **h: CurveBall(MODEL.apply, LOSS, rho=0.9, **h), "beta",
                             0.05, False),
    "prox-linear-gamma": (lambda **h: ProxLinear(MODEL.apply, LOSS, inner_steps=2, **h),
                          "gamma", 1.0, False),
    "prox-linear-eta0": (lambda **h: ProxLinear(MODEL.apply, LOSS, update="armijo", **h),
                         "eta0", 1.0, False),
    "grouped-newton-lr-factor": (lambda **h: GroupedNewton(MODEL.apply, LOSS, tau=2,
                                                           partition="trivial", **h),
                                 "lr_factor", 0.1, False),
    "bfgs-initial-step": (lambda **h: BFGS(MODEL.apply, LOSS, **h), "initial_step", 1.0,
                          False),
}
#: damping schedules switch the adaptation off: the number they are compared with must too
FIXED = {"adapt_damping": False}


def _batches(backend, n=STEPS, seed=3):
    rng = np.random.default_rng(seed)
    return [(backend.asarray(rng.standard_normal((12, 3))), backend.asarray(
        rng.integers(0, 3, 12))) for _ in range(n)]


def _extra(case):
    return FIXED if CASES[case][3] else {}


def _run(opt, params, batches, step=None):
    state = opt.init(params)
    step = step or opt.step
    infos = []
    for batch in batches:
        params, state, info = step(params, state, batch)
        infos.append(info)
    return params, state, infos


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_constant_schedule_gives_the_number_bit_for_bit(case):
    factory, name, value, _ = CASES[case]
    b = backends.get("numpy")
    params, batches = MODEL.init(0, b), _batches(b)
    number, _, n_infos = _run(factory(**{name: value}, **_extra(case)), params, batches)
    scheduled, _, s_infos = _run(factory(**{name: lambda t: value}), params, batches)
    for a, e in zip(tree.leaves(scheduled), tree.leaves(number)):
        assert np.array_equal(np.asarray(a), np.asarray(e)), case
    for i, j in zip(s_infos, n_infos):
        assert float(i.loss) == float(j.loss)
        assert np.array_equal(np.asarray(i.damping), np.asarray(j.damping), equal_nan=True)


def _by_hand(case, backend, params, batches):
    """The reference: before step t the method is rebuilt with the number schedule(t) (a
    damping kept in the state is written into the state), with no schedule anywhere."""
    factory, name, value, in_state = CASES[case]
    sched = decay(value)
    state = None
    for t, batch in enumerate(batches):
        opt = factory(**{name: sched(float(t))}, **_extra(case))
        if state is None:
            state = opt.init(params)
        if in_state:
            state = state._replace(damping=backend.asarray(np.float64(sched(float(t)))))
        params, state, _ = opt.step(params, state, batch)
    return params, state


#: cases whose eager JAX steps take seconds each (line searches, third derivatives): NumPy and
#: PyTorch run them eagerly, and the jit test runs JAX on a selection
SLOW_ON_EAGER_JAX = {"bfgs-initial-step", "grouped-newton-lr-factor", "newton-damping",
                     "prox-linear-eta0"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_step_dependent_schedule_equals_changing_the_number_by_hand(ad_backend, case):
    if ad_backend.name == "jax" and case in SLOW_ON_EAGER_JAX:
        pytest.skip("slow on eager JAX; NumPy and PyTorch run it, the jit test covers JAX")
    factory, name, value, in_state = CASES[case]
    params, batches = MODEL.init(0, ad_backend), _batches(ad_backend)
    expected, expected_state = _by_hand(case, ad_backend, params, batches)
    got, state, infos = _run(factory(**{name: decay(value)}), params, batches)
    assert all(bool(i.finite) for i in infos)
    assert int(state.count) == STEPS
    assert_close(got, back(ad_backend, expected), rtol=1e-12, backend=ad_backend)
    if in_state:  # the state records the damping the last step used
        assert float(state.damping) == pytest.approx(decay(value)(STEPS - 1), rel=1e-15)
        assert float(infos[-1].damping) == float(state.damping)


@pytest.mark.parametrize("case", ["bfgs-initial-step", "curveball-damping",
                                  "hessian-free-damping", "newton-lr", "prox-linear-gamma"])
def test_a_schedule_compiles_under_jit(case):
    jax = pytest.importorskip("jax")
    factory, name, value, _ = CASES[case]
    b = backends.get("jax")
    params, batches = MODEL.init(0, b), _batches(b)
    opt = factory(**{name: decay(value)})
    jitted, state, _ = _run(opt, params, batches, step=jax.jit(opt.step))
    expected, _ = _by_hand(case, b, params, batches)
    assert int(state.count) == STEPS
    assert_close(jitted, back(b, expected), rtol=1e-10, backend=b)


def test_a_schedule_over_a_traced_value_runs_under_vmap():
    jax = pytest.importorskip("jax")
    b = backends.get("jax")
    params, batches = MODEL.init(0, b), _batches(b)
    bases = np.array([1.0, 0.3])

    def run(base):
        opt = CurveBall(MODEL.apply, LOSS, damping=lambda t: base / (1.0 + 0.5 * t))
        return _run(opt, params, batches)[0]

    mapped = jax.jit(jax.vmap(run))(jax.numpy.asarray(bases))
    for i, base in enumerate(bases):
        single = _run(CurveBall(MODEL.apply, LOSS, damping=decay(float(base))), params,
                      batches)[0]
        assert_close(tree.map(lambda a, i=i: a[i], mapped), back(b, single), rtol=1e-10,
                     backend=b)


def test_optax_schedules_are_schedules():
    pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    b = backends.get("jax")
    params, batches = MODEL.init(0, b), _batches(b)
    sched = optax.linear_schedule(1.0, 0.25, transition_steps=2)
    got = _run(CurveBall(MODEL.apply, LOSS, damping=sched), params, batches)[0]
    state = None
    p = params
    for t, batch in enumerate(batches):
        opt = CurveBall(MODEL.apply, LOSS, damping=float(sched(t)), adapt_damping=False)
        state = opt.init(p) if state is None else state._replace(
            damping=b.asarray(np.float64(sched(t))))
        p, state, _ = opt.step(p, state, batch)
    assert_close(got, back(b, p), rtol=1e-12, backend=b)


@pytest.mark.parametrize("cls", [HessianFree, LevenbergMarquardt, CurveBall])
def test_an_adaptive_damping_and_a_damping_schedule_are_refused_together(cls):
    with pytest.raises(HyperparameterError, match="schedule"):
        cls(MODEL.apply, LOSS, damping=decay(1.0), adapt_damping=True)


def test_a_rejected_step_keeps_the_count_the_schedule_reads():
    b = backends.get("numpy")
    params = MODEL.init(0, b)
    seen = []

    def lr(t):
        seen.append(float(t))
        return 1.0

    opt = HessianFree(MODEL.apply, LOSS, cg_iters=3, lr=lr)
    state = opt.init(params)
    x, y = _batches(b, 1)[0]
    bad = (np.full_like(x, np.nan), y)
    params, state, info = opt.step(params, state, bad)
    assert not bool(info.finite) and int(state.count) == 0
    opt.step(params, state, (x, y))
    assert seen == [0.0, 0.0]


@pytest.mark.parametrize("cls", [SGD, Adam, AdamW, BFGS, CurveBall, GroupedNewton, HessianFree,
                                 LevenbergMarquardt, Newton, ProxLinear])
def test_the_docstrings_are_self_contained(cls):
    """``help(cls)`` names every constructor parameter, says which take schedules, and cites no
    file a user does not have."""
    doc = cls.__doc__
    for phrase in ("../shared", "specs/", "module docstring", "sheet"):
        assert phrase not in doc, f"{cls.__name__} refers to {phrase!r}"
    assert "schedule" in doc
    for name in inspect.signature(cls.__init__).parameters:
        if name != "self":
            assert name in doc, f"{cls.__name__} does not document {name!r}"
