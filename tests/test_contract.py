"""The optimiser contract, run for every method in ``secondorder.optim.registry.METHODS``.

A method registered later joins these tests with no code of its own:
- the first steps agree across backends (float64, 1e-10 relative, against the numpy run);
- ``jax.jit(opt.step)`` gives the eager steps; ``jax.vmap`` over the registered scalar
  hyperparameter gives the runs made one value at a time;
- a non-finite batch keeps the parameters and every state leaf bit-identical (the damping of a
  damped method is multiplied by ``damping_boost_on_failure``, and nothing else moves);
- a state saved to NumPy, pickled and restored continues exactly as the original;
- float32 in gives float32 out (parameters, every floating state leaf, the loss) and an int32
  step count;
- a state of another method, or of another backend, raises StateError.
"""

from __future__ import annotations

import inspect
import pickle

import numpy as np
import pytest

from helpers import assert_close, back, to
from secondorder import backends, losses, tree
from secondorder.errors import StateError
from secondorder.models import MLP
from secondorder.optim.registry import METHODS

pytest.importorskip("autograd")

NAMES = sorted(METHODS)
MODEL = MLP([3, 5, 3], "tanh")
LOSS = losses.SoftmaxCrossEntropy()


def _batches(n: int, seed: int = 7) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((16, 3)), rng.integers(0, 3, 16)) for _ in range(n)]


def _convert(backend, batch, dtype="float64"):
    x, y = batch
    return backend.asarray(np.asarray(x, dtype=dtype)), backend.asarray(y)


def _run(name, backend, batches, *, step=None, dtype="float64", params=None, state=None,
         **overrides):
    opt = METHODS[name](MODEL.apply, LOSS, **overrides)
    if params is None:
        params = MODEL.init(0, backend, dtype=dtype)
    if state is None:
        state = opt.init(params)
    step = step or opt.step
    info = None
    for batch in batches:
        params, state, info = step(params, state, _convert(backend, batch, dtype))
    return params, state, info


def _to_numpy(backend, t):
    return tree.map(lambda a: np.array(backend.to_numpy(a)), t)


def _from_numpy(backend, t):
    return tree.map(lambda a: backend.asarray(a), t)


def _default(name):
    spec = METHODS[name]
    key = spec.vmap_over
    if key in spec.defaults:
        return spec.defaults[key]
    return inspect.signature(spec.cls.__init__).parameters[key].default


@pytest.mark.parametrize("name", NAMES)
def test_first_steps_agree_across_backends(ad_backend, name):
    batches = _batches(5)
    reference, _, _ = _run(name, backends.get("numpy"), batches)
    params, _, info = _run(name, ad_backend, batches)
    assert bool(info.finite)
    assert_close(params, back(backends.get("numpy"), reference), rtol=1e-10,
                 backend=ad_backend)


@pytest.mark.parametrize("name", NAMES)
def test_jit_gives_the_eager_steps(name):
    jax = pytest.importorskip("jax")
    b = backends.get("jax")
    batches = _batches(4)
    opt = METHODS[name](MODEL.apply, LOSS)
    eager, eager_state, _ = _run(name, b, batches)
    jitted, jit_state, info = _run(name, b, batches, step=jax.jit(opt.step))
    assert bool(info.finite)
    assert_close(jitted, back(b, eager), rtol=1e-10, backend=b)
    assert int(jit_state.count) == int(eager_state.count) == len(batches)


@pytest.mark.parametrize("name", NAMES)
def test_vmap_over_a_hyperparameter_gives_the_separate_runs(name):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    b = backends.get("jax")
    batches = _batches(2)
    key = METHODS[name].vmap_over
    values = np.array([_default(name), 0.5 * _default(name)], dtype=np.float64)
    params0 = MODEL.init(0, b)

    def run(h):
        return _run(name, b, batches, params=params0, **{key: h})[0]

    mapped = jax.vmap(run)(jnp.asarray(values))
    for i, v in enumerate(values):
        single = _run(name, b, batches, **{key: float(v)})[0]
        assert_close(tree.map(lambda a, i=i: a[i], mapped), back(b, single), rtol=1e-10,
                     backend=b)


@pytest.mark.parametrize("name", NAMES)
def test_non_finite_batch_keeps_parameters_and_state(ad_backend, name):
    opt = METHODS[name](MODEL.apply, LOSS)
    params, state, _ = _run(name, ad_backend, _batches(1))
    x, y = _batches(1, seed=8)[0]
    x = x.copy()
    x[0, 0] = np.inf
    new_params, new_state, info = opt.step(params, state, _convert(ad_backend, (x, y)))
    assert not bool(info.finite) and float(info.step_norm) == 0.0
    assert_close(new_params, back(ad_backend, params), rtol=0.0, backend=ad_backend)
    for field, old in state._asdict().items():
        new = getattr(new_state, field)
        if field == "damping":
            assert float(new) == opt.damping_boost_on_failure * float(old)
        else:
            for a, e in zip(tree.leaves(new), tree.leaves(old)):
                np.testing.assert_array_equal(ad_backend.to_numpy(a), ad_backend.to_numpy(e))


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_round_trip_continues_exactly(ad_backend, name):
    batches = _batches(4)
    params, state, _ = _run(name, ad_backend, batches[:2])
    saved = pickle.dumps((_to_numpy(ad_backend, params), _to_numpy(ad_backend, state)))
    r_params, r_state = pickle.loads(saved)
    r_params, r_state = _from_numpy(ad_backend, r_params), _from_numpy(ad_backend, r_state)
    assert type(r_state) is type(state)
    cont, _, _ = _run(name, ad_backend, batches[2:], params=params, state=state)
    restored, _, _ = _run(name, ad_backend, batches[2:], params=r_params, state=r_state)
    assert_close(restored, back(ad_backend, cont), rtol=0.0, backend=ad_backend)


@pytest.mark.parametrize("name", NAMES)
def test_float32_stays_float32(ad_backend, name):
    params, state, info = _run(name, ad_backend, _batches(2), dtype="float32")
    assert bool(info.finite)
    xp = ad_backend.xp
    for leaf in tree.leaves(params):
        assert leaf.dtype == xp.float32
    for leaf in tree.leaves(state):
        if xp.isdtype(leaf.dtype, "real floating"):
            assert leaf.dtype == xp.float32, (name, leaf.dtype)
    assert state.count.dtype == xp.int32 and int(state.count) == 2
    assert info.loss.dtype == xp.float32


@pytest.mark.parametrize("name", NAMES)
def test_a_state_of_another_method_or_backend_is_refused(name):
    numpy_backend = backends.get("numpy")
    params = MODEL.init(0, numpy_backend)
    other = "adam" if name != "adam" else "sgd"
    opt = METHODS[name](MODEL.apply, LOSS)
    foreign = METHODS[other](MODEL.apply, LOSS).init(params)
    batch = _convert(numpy_backend, _batches(1)[0])
    with pytest.raises(StateError, match=type(foreign).method):
        opt.step(params, foreign, batch)
    with pytest.raises(StateError, match="dict"):
        opt.step(params, {"momentum": params}, batch)
    torch_backend = pytest.importorskip("torch") and backends.get("torch")
    torch_state = opt.init(to(torch_backend, back(numpy_backend, params)))
    with pytest.raises(StateError, match="torch"):
        opt.step(params, torch_state, batch)
