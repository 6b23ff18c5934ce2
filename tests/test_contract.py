"""The optimiser contract, run for every method in ``secondorder.optim.registry.METHODS``.

A method registered later joins these tests with no code of its own:
- the first steps agree across backends (float64, 1e-10 relative, against the numpy run);
- ``jax.jit(opt.step)``, with the parameters and the state donated, gives the eager (NumPy)
  steps (no two state leaves share a buffer); ``jax.jit(jax.vmap(...))`` over the
  registered scalar hyperparameter gives the runs made one value at a time;
- a non-finite batch keeps the parameters and every state leaf bit-identical (the damping of a
  damped method is multiplied by ``damping_boost_on_failure``, and nothing else moves);
- a state saved to NumPy, pickled and restored continues exactly as the original, and so does a
  state saved with ``secondorder.checkpoint`` to a file and loaded back;
- a NumPy state converted to torch and jax (``checkpoint.convert``) is an exact copy, and runs on
  there as the same state made on that backend does;
- a NaN met inside a step (in the loss, its gradient, the network's Jacobian or the loss's
  curvature: ``tests/faults.py``) is caught: the parameters and every state leaf stay
  bit-identical, ``info.finite`` is False, and training on clean batches then continues exactly
  as if the bad step had not been taken;
- float32 in gives float32 out (parameters, every floating state leaf, the loss) and an int32
  step count;
- a state of another method, or of another backend, raises StateError.
"""

from __future__ import annotations

import inspect
import pickle
from typing import Any

import numpy as np
import pytest

import faults
from helpers import assert_close, back, to
from secondorder import backends, checkpoint, losses, tree
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
    # the eager reference is the NumPy run: eager JAX agrees with it to 1e-10 (the test above),
    # and it costs a fraction of eager JAX's op-by-op compilation. The parameters and the state
    # are donated, as a JAX training loop does: that needs every leaf in a buffer of its own.
    jax = pytest.importorskip("jax")
    b = backends.get("jax")
    batches = _batches(4)
    opt = METHODS[name](MODEL.apply, LOSS)
    params = MODEL.init(0, b)
    state = opt.init(params)
    buffers = [leaf.unsafe_buffer_pointer() for leaf in tree.leaves((params, state))
               if isinstance(leaf, jax.Array)]
    assert len(set(buffers)) == len(buffers), "two leaves of the state share one buffer"
    eager, eager_state, _ = _run(name, backends.get("numpy"), batches)
    jitted, jit_state, info = _run(name, b, batches, params=params, state=state,
                                   step=jax.jit(opt.step, donate_argnums=(0, 1)))
    assert bool(info.finite)
    assert_close(jitted, back(backends.get("numpy"), eager), rtol=1e-10, backend=b)
    assert int(jit_state.count) == int(eager_state.count) == len(batches)


@pytest.mark.parametrize("name", NAMES)
def test_vmap_over_a_hyperparameter_gives_the_separate_runs(name):
    # vmap under jit (how a sweep is run; the hyperparameter is a batched tracer in the
    # constructor either way), against eager NumPy runs made one value at a time
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    b, numpy = backends.get("jax"), backends.get("numpy")
    batches = _batches(2)
    key = METHODS[name].vmap_over
    values = np.array([_default(name), 0.5 * _default(name)], dtype=np.float64)
    params0 = MODEL.init(0, b)

    def run(h):
        return _run(name, b, batches, params=params0, **{key: h})[0]

    mapped = jax.jit(jax.vmap(run))(jnp.asarray(values))
    for i, v in enumerate(values):
        single = _run(name, numpy, batches, **{key: float(v)})[0]
        assert_close(tree.map(lambda a, i=i: a[i], mapped), back(numpy, single), rtol=1e-10,
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


def _host(backend, leaf: Any) -> Any:
    return np.asarray(backend.to_numpy(leaf)) if hasattr(leaf, "shape") else leaf


def _assert_identical(actual: Any, expected: Any, backend, *, scalars: bool = True) -> None:
    """Same tree structure (NamedTuple classes, dict key order), same leaf types and dtypes, the
    same bits (NaN where NaN). ``scalars=False`` lets a 0-d array stand for a NumPy scalar (what
    a state that visited another framework comes back with)."""
    a_leaves, a_def = tree.flatten(actual)
    e_leaves, e_def = tree.flatten(expected)
    assert a_def == e_def and repr(a_def) == repr(e_def), (a_def, e_def)
    for a, e in zip(a_leaves, e_leaves):
        if not scalars and isinstance(e, np.generic):
            e = np.asarray(e)
        assert type(a) is type(e), (type(a), type(e))
        a, e = _host(backend, a), _host(backend, e)
        if isinstance(e, np.ndarray):
            assert a.dtype == e.dtype and a.shape == e.shape, (a.dtype, e.dtype)
            np.testing.assert_array_equal(np.ascontiguousarray(a).reshape(-1).view(np.uint8),
                                          np.ascontiguousarray(e).reshape(-1).view(np.uint8))
        else:
            assert a == e


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_round_trip_continues_exactly(ad_backend, name, tmp_path):
    batches = _batches(4)
    params, state, _ = _run(name, ad_backend, batches[:2])
    saved = pickle.dumps((_to_numpy(ad_backend, params), _to_numpy(ad_backend, state)))
    r_params, r_state = pickle.loads(saved)
    r_params, r_state = _from_numpy(ad_backend, r_params), _from_numpy(ad_backend, r_state)
    assert type(r_state) is type(state)
    cont, cont_state, _ = _run(name, ad_backend, batches[2:], params=params, state=state)
    restored, _, _ = _run(name, ad_backend, batches[2:], params=r_params, state=r_state)
    assert_close(restored, back(ad_backend, cont), rtol=0.0, backend=ad_backend)
    # through a file written by secondorder.checkpoint: bit-identical, checked against the method
    opt = METHODS[name](MODEL.apply, LOSS)
    checkpoint.save(tmp_path / "run.ckpt", state, params, step=2)
    loaded = checkpoint.load(tmp_path / "run.ckpt", like=opt)
    assert loaded.metadata == {"step": 2}
    _assert_identical(loaded.state, state, ad_backend)
    _assert_identical(loaded.params, params, ad_backend)
    f_params, f_state, _ = _run(name, ad_backend, batches[2:], params=loaded.params,
                                state=loaded.state)
    _assert_identical(f_params, cont, ad_backend)
    _assert_identical(f_state, cont_state, ad_backend)


@pytest.mark.parametrize("target", ["torch", "jax"])
@pytest.mark.parametrize("name", NAMES)
def test_a_converted_state_continues_the_run(name, target):
    """A float64 NumPy state converted with checkpoint.convert is an exact copy (every leaf's
    bits, dtype and type; back to NumPy it is the original) and continues on the new backend
    exactly as the same numbers put there leaf by leaf with the backend's own asarray do; the
    continued run agrees with the unconverted NumPy run to the suite's cross-backend tolerance
    (test_first_steps_agree_across_backends)."""
    pytest.importorskip(target)
    numpy_backend, other = backends.get("numpy"), backends.get(target)
    batches = _batches(3)
    params, state, _ = _run(name, numpy_backend, batches[:2])
    unconverted, _, _ = _run(name, numpy_backend, batches[2:], params=params, state=state)
    c_params, c_state = checkpoint.convert((params, state), target)
    _assert_identical(checkpoint.convert((c_params, c_state), "numpy"), (params, state),
                      numpy_backend, scalars=False)
    by_hand = tree.map(lambda a: other.asarray(np.asarray(a)), (params, state))
    _assert_identical((c_params, c_state), by_hand, other)
    cont, cont_state, info = _run(name, other, batches[2:], params=c_params, state=c_state)
    ref, ref_state, _ = _run(name, other, batches[2:], params=by_hand[0], state=by_hand[1])
    assert bool(info.finite)
    _assert_identical((cont, cont_state), (ref, ref_state), other)
    assert_close(cont, back(numpy_backend, unconverted), rtol=1e-10, backend=other)


def _identical_except_damping(opt, new_state, old_state, backend) -> None:
    """Every leaf of ``new_state`` equals ``old_state``'s, except a ``damping`` field, which the
    guard multiplies by ``damping_boost_on_failure``."""
    for field, old in old_state._asdict().items():
        new = getattr(new_state, field)
        if field == "damping":
            assert float(new) == opt.damping_boost_on_failure * float(old)
        else:
            _assert_identical(new, old, backend)


@pytest.mark.parametrize("backend_name", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("name", NAMES)
def test_a_nan_inside_a_step_is_caught_and_training_continues(name, backend_name):
    """For each injection point of tests/faults.py, armed during the second step only: the step
    is rejected with the parameters and every state leaf bit-identical (damping boosted),
    info.finite False and a zero step norm, and the same clean batches then give exactly the
    run that never met the NaN (for damped methods: the run whose damping was boosted once).
    A NaN in the curvature that a method never computes (first-order methods) must leave the
    step exactly the clean one."""
    backend = pytest.importorskip(backend_name) and backends.get(backend_name)
    fault = faults.Fault()
    model = faults.FaultyMLP([3, 5, 3], "tanh", fault)
    opt = METHODS[name](model.apply, faults.FaultyCrossEntropy(fault))
    b0, b1, b2 = (_convert(backend, batch) for batch in _batches(3))
    params0 = model.init(0, backend)
    p1, s1, _ = opt.step(params0, opt.init(params0), b0)
    p2, s2, _ = opt.step(p1, s1, b1)
    p3, s3, _ = opt.step(p2, s2, b2)
    damped = "damping" in s1._fields
    for point in faults.POINTS:
        fault.point, fault.fired, fault.targets = point, 0, b1[1]
        try:
            with np.errstate(divide="ignore", invalid="ignore"):  # autograd's 0 * inf
                q, t, info = opt.step(p1, s1, b1)
        finally:
            fault.point = None
        if bool(info.finite):
            assert point not in faults.ALWAYS_SEEN, f"{name} missed a NaN in the {point}"
            assert fault.fired == 0, f"{name} used a NaN {point} and reported a finite step"
            _assert_identical((q, t), (p2, s2), backend)  # the NaN had no influence at all
            continue
        assert float(info.step_norm) == 0.0, point
        _assert_identical(q, p1, backend)
        _identical_except_damping(opt, t, s1, backend)
        q2, t2, _ = opt.step(q, t, b1)
        q3, t3, info3 = opt.step(q2, t2, b2)
        assert bool(info3.finite), point
        if damped:  # the run that never met the NaN, its damping boosted once
            boosted = s1._replace(damping=s1.damping * opt.damping_boost_on_failure)
            r2, u2, _ = opt.step(p1, boosted, b1)
            expected = opt.step(r2, u2, b2)[:2]
        else:
            expected = (p3, s3)
        _assert_identical((q3, t3), expected, backend)


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
