"""``secondorder.integrations.optax.as_optax``: any method as an optax transformation.

- ``optax.apply_updates`` with its updates reproduces the pure ``init``/``step`` API to 1e-12
  (float64) for every registered method, and its state carries the step's ``StepInfo``;
- ``optax.chain(optax.clip_by_global_norm(1.0), as_optax(SGD))`` equals the gradient clipped by
  hand and then momentum SGD by hand (and ``optax.sgd`` behind the same clip);
- ``optax.chain(as_optax(m), optax.clip_by_global_norm(c))`` clips the method's step and
  ``optax.chain(as_optax(m), optax.scale_by_schedule(s))`` scales it by s(k), as done by hand;
- ``jax.jit`` of the update gives the eager updates, the state keeps one structure (so
  ``jax.lax.scan`` runs it), and ``jax.vmap`` over a learning rate or a damping gives the
  separate runs.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from helpers import assert_close
from secondorder import backends, losses
from secondorder.errors import SecondOrderError, UnusedUpdatesWarning
from secondorder.models import MLP
from secondorder.optim import SGD, CurveBall, GradientDescent
from secondorder.optim.registry import METHODS

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
pytest.importorskip("autograd")

from secondorder.integrations.optax import OptaxState, as_optax, step_info  # noqa: E402

jnp = jax.numpy
MODEL = MLP([3, 5, 3], "tanh")
CE = losses.SoftmaxCrossEntropy()
STEPS = 2
#: cheaper settings for the slow eager JAX runs (the method is the same)
OVERRIDES = {"hessian-free": {"cg_iters": 3}, "grouped-newton": {"partition": "trivial"}}
#: methods whose eager JAX steps are slow enough to be held to the pure API for one step only
ONE_STEP = {"bfgs", "grouped-newton", "hessian-free"}


def _batches(n=STEPS, seed=11, regression=False):
    b = backends.get("jax")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.standard_normal((16, 3))
        y = 10.0 * rng.standard_normal((16, 3)) if regression else rng.integers(0, 3, 16)
        out.append((b.asarray(x), b.asarray(y)))
    return out


def _params():
    return MODEL.init(0, backends.get("jax"))


def _numpy(tree):
    return jax.tree.map(np.asarray, tree)


def _update_args(opt, params, batch):
    """What a user's loop passes: the gradient and the loss for a first-order method, the
    batch for a second-order one (which computes its own gradient)."""
    if not isinstance(opt, GradientDescent):
        return None, {"batch": batch}
    value, grad = jax.value_and_grad(lambda p: opt.objective(p, batch))(params)
    return grad, {"batch": batch, "value": value}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_apply_updates_reproduces_the_pure_api(name):
    opt = METHODS[name](MODEL.apply, CE, **OVERRIDES.get(name, {}))
    tx = as_optax(opt)
    params = pure = _params()
    state, pure_state = tx.init(params), opt.init(params)
    assert isinstance(state, OptaxState)
    steps = 1 if name in ONE_STEP else STEPS
    for batch in _batches(steps):
        grad, extra = _update_args(opt, params, batch)
        updates, state = tx.update(grad, state, params, **extra)
        params = optax.apply_updates(params, updates)
        pure, pure_state, info = opt.step(pure, pure_state, batch)
        assert_close(_numpy(params), _numpy(pure), rtol=1e-12)
    got = step_info(state)
    assert bool(got.finite)
    assert float(got.loss) == pytest.approx(float(info.loss), rel=1e-12)
    assert float(got.step_norm) == pytest.approx(float(info.step_norm), rel=1e-12)
    # the method declares the extras its steps report, so the state keeps one structure
    assert sorted(got.extras) == sorted(info.extras) == sorted(opt.info_extras)
    assert int(state.inner.count) == steps


def test_without_a_gradient_a_first_order_method_takes_it_from_the_batch():
    opt = SGD(MODEL.apply, CE, lr=0.1, momentum=0.9)
    tx = as_optax(opt)
    params = pure = _params()
    state, pure_state = tx.init(params), opt.init(params)
    for batch in _batches():
        updates, state = tx.update(None, state, params, batch=batch)
        params = optax.apply_updates(params, updates)
        pure, pure_state, info = opt.step(pure, pure_state, batch)
    assert_close(_numpy(params), _numpy(pure), rtol=1e-12)
    assert float(step_info(state).loss) == float(info.loss)


def test_clipping_before_a_first_order_method_clips_the_gradient():
    loss = losses.MSE()
    opt = SGD(MODEL.apply, loss, lr=0.01, momentum=0.9)
    tx = optax.chain(optax.clip_by_global_norm(1.0), as_optax(opt))
    reference = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.01, momentum=0.9))
    params = ref_params = _params()
    state, ref_state = tx.init(params), reference.init(params)
    by_hand = _numpy(params)
    buf = jax.tree.map(np.zeros_like, by_hand)
    norms = []
    for batch in _batches(regression=True):
        grad = jax.grad(lambda p, b=batch: opt.objective(p, b))(params)
        updates, state = tx.update(grad, state, params, batch=batch)
        params = optax.apply_updates(params, updates)
        ref_grad = jax.grad(lambda p, b=batch: opt.objective(p, b))(ref_params)
        ref_updates, ref_state = reference.update(ref_grad, ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, ref_updates)
        # by hand in NumPy: g <- g min(1, 1 / ||g||);  b <- 0.9 b + g;  w <- w - 0.01 b
        g = _numpy(jax.grad(lambda p, b=batch: opt.objective(p, b))(
            jax.tree.map(jnp.asarray, by_hand)))
        norm = np.sqrt(sum(float(np.sum(a * a)) for a in jax.tree.leaves(g)))
        norms.append(norm)
        g = jax.tree.map(lambda a, n=norm: a * min(1.0, 1.0 / n), g)
        buf = jax.tree.map(lambda m, a: 0.9 * m + a, buf, g)
        by_hand = jax.tree.map(lambda w, m: w - 0.01 * m, by_hand, buf)
    assert max(norms) > 1.0  # the clip acted
    assert_close(_numpy(params), by_hand, rtol=1e-12)
    assert_close(_numpy(params), _numpy(ref_params), rtol=1e-12)


def test_a_second_order_method_ignores_what_comes_before_it_and_clipping_after_clips_its_step():
    opt = CurveBall(MODEL.apply, CE, damping=1.0)
    before = optax.chain(optax.clip_by_global_norm(1e-3), as_optax(opt))
    after = optax.chain(as_optax(opt), optax.clip_by_global_norm(0.05))
    p_before = p_after = by_hand = _params()
    s_before, s_after, s_hand = before.init(by_hand), after.init(by_hand), opt.init(by_hand)
    plain, s_plain = _params(), opt.init(by_hand)
    steps = []
    for k, batch in enumerate(_batches()):
        grad = jax.grad(lambda p, b=batch: opt.objective(p, b))(p_before)
        with warnings.catch_warnings(record=True) as caught:  # said once, at the first update
            warnings.simplefilter("always")
            u, s_before = before.update(grad, s_before, p_before, batch=batch)
        unused = [w for w in caught if issubclass(w.category, UnusedUpdatesWarning)]
        assert len(unused) == (k == 0)
        assert k or "transform= to CurveBall" in str(unused[0].message)
        assert k or unused[0].filename == __file__  # the user's call, not optax's chain
        p_before = optax.apply_updates(p_before, u)
        plain, s_plain, _ = opt.step(plain, s_plain, batch)
        u, s_after = after.update(None, s_after, p_after, batch=batch)
        p_after = optax.apply_updates(p_after, u)
        # by hand: the method's step d = new - w, clipped to norm 0.05; the method's own state
        # (the direction z) follows its unclipped step
        new, s_hand, _ = opt.step(by_hand, s_hand, batch)
        d = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), new, by_hand)
        norm = np.sqrt(sum(float(np.sum(a * a)) for a in jax.tree.leaves(d)))
        steps.append(norm)
        by_hand = jax.tree.map(lambda w, a, n=norm: w + a * min(1.0, 0.05 / n), by_hand, d)
    assert max(steps) > 0.05
    assert_close(_numpy(p_before), _numpy(plain), rtol=1e-12)
    assert_close(_numpy(p_after), _numpy(by_hand), rtol=1e-12)


def test_a_schedule_after_the_method_scales_its_step():
    opt = CurveBall(MODEL.apply, CE, damping=1.0)

    def schedule(k):
        return 1.0 / (1.0 + k)

    tx = optax.chain(as_optax(opt), optax.scale_by_schedule(schedule))
    params = by_hand = _params()
    state, s_hand = tx.init(params), opt.init(params)
    for k, batch in enumerate(_batches()):
        updates, state = tx.update(None, state, params, batch=batch)
        params = optax.apply_updates(params, updates)
        new, s_hand, _ = opt.step(by_hand, s_hand, batch)
        by_hand = jax.tree.map(lambda w, n, k=k: w + schedule(k) * (n - w), by_hand, new)
    assert_close(_numpy(params), _numpy(by_hand), rtol=1e-12)


@pytest.mark.parametrize("name", ["sgd", "curveball"])
def test_jit_gives_the_eager_updates_and_scan_runs_the_state(name):
    opt = METHODS[name](MODEL.apply, CE)
    tx = optax.chain(optax.clip_by_global_norm(1.0), as_optax(opt))
    batches = _batches()
    params = eager = _params()
    state = eager_state = tx.init(params)
    update = jax.jit(tx.update)
    for batch in batches:
        grad, extra = _update_args(opt, params, batch)
        u, state = update(grad, state, params, **extra)
        params = optax.apply_updates(params, u)
        grad, extra = _update_args(opt, eager, batch)
        u, eager_state = tx.update(grad, eager_state, eager, **extra)
        eager = optax.apply_updates(eager, u)
    assert_close(_numpy(params), _numpy(eager), rtol=1e-10)
    assert jax.tree.structure(state) == jax.tree.structure(tx.init(params))

    xs = jax.tree.map(lambda *a: jnp.stack(a), *batches)

    def body(carry, batch):
        p, s = carry
        grad, extra = _update_args(opt, p, batch)
        u, s = tx.update(grad, s, p, **extra)
        return (optax.apply_updates(p, u), s), step_info(s).loss

    (scanned, _), losses_seen = jax.lax.scan(body, (_params(), tx.init(_params())), xs)
    assert_close(_numpy(scanned), _numpy(eager), rtol=1e-10)
    assert losses_seen.shape == (STEPS,)


@pytest.mark.parametrize("name", ["adam", "curveball"])
def test_a_donated_train_step_gives_the_eager_updates(name):
    # the usual JAX loop donates the parameters and the optimiser state to the jitted step,
    # which needs every leaf of the state in a buffer of its own
    opt = METHODS[name](MODEL.apply, CE)
    tx = optax.chain(optax.clip_by_global_norm(1.0), as_optax(opt))
    params, eager = _params(), _params()
    state, eager_state = tx.init(params), tx.init(eager)
    buffers = [a.unsafe_buffer_pointer() for a in jax.tree.leaves((params, state))]
    assert len(set(buffers)) == len(buffers)

    def train_step(p, s, batch):
        grad, extra = _update_args(opt, p, batch)
        u, s = tx.update(grad, s, p, **extra)
        return optax.apply_updates(p, u), s

    donated = jax.jit(train_step, donate_argnums=(0, 1))
    for batch in _batches():
        params, state = donated(params, state, batch)
        eager, eager_state = train_step(eager, eager_state, batch)
    assert_close(_numpy(params), _numpy(eager), rtol=1e-10)
    assert float(step_info(state).loss) == pytest.approx(float(step_info(eager_state).loss),
                                                         rel=1e-10)


@pytest.mark.parametrize(("name", "key"), [("sgd", "lr"), ("curveball", "damping")])
def test_vmap_over_a_hyperparameter_gives_the_separate_runs(name, key):
    batches = _batches()
    lrs = np.array([0.1, 0.05]) if name == "sgd" else np.array([1.0, 0.5])

    def run(lr):
        opt = METHODS[name](MODEL.apply, CE, **{key: lr})
        tx = as_optax(opt)
        params = _params()
        state = tx.init(params)
        for batch in batches:
            grad, extra = _update_args(opt, params, batch)
            u, state = tx.update(grad, state, params, **extra)
            params = optax.apply_updates(params, u)
        return params

    mapped = jax.jit(jax.vmap(run))(jnp.asarray(lrs))
    for i, lr in enumerate(lrs):
        single = run(float(lr))
        assert_close(_numpy(jax.tree.map(lambda a, i=i: a[i], mapped)), _numpy(single),
                     rtol=1e-10)


def test_a_second_order_method_needs_the_batch():
    tx = as_optax(CurveBall(MODEL.apply, CE))
    params = _params()
    with pytest.raises(SecondOrderError, match="batch"):
        tx.update(None, tx.init(params), params)


def test_a_jitted_update_compiles_once():
    """The state's blank info sits on the device of the (committed) parameters, as the info a
    jitted update returns does, so three updates reuse the first compilation; the parameters
    equal the method's own three steps."""
    method = CurveBall(MODEL, CE)
    tx = optax.chain(as_optax(method), optax.clip_by_global_norm(1e6))
    params = _params()
    assert all(leaf.committed for leaf in jax.tree.leaves(params))

    @jax.jit
    def update(p, s, batch):
        u, s = tx.update(None, s, p, batch=batch)
        return optax.apply_updates(p, u), s

    p, s = params, tx.init(params)
    q, r = params, method.init(params)
    for batch in _batches(3):
        p, s = update(p, s, batch)
        q, r, _ = method.step(q, r, batch)
    assert update._cache_size() == 1
    assert_close(_numpy(p), _numpy(q), backend=backends.get("jax"))


def test_an_empty_updates_tree_is_no_gradient():
    """nnx.Optimizer hands ``None`` on as an empty State: a first-order method given an
    updates tree without leaves steps on the batch, as with ``updates=None`` (before, the empty
    tree was taken for the gradient and the tree check failed)."""
    opt = SGD(MODEL.apply, CE, lr=0.1, momentum=0.9)
    tx = as_optax(opt)
    params, batch = _params(), _batches(1)[0]
    state = tx.init(params)
    via_none, _ = tx.update(None, state, params, batch=batch)
    via_empty, _ = tx.update({}, state, params, batch=batch)
    assert_close(_numpy(via_empty), _numpy(via_none), rtol=0.0)


def test_a_second_order_method_under_optax_masked_raises_a_named_error():
    """optax.masked hands the transformation MaskedNode placeholders for the masked-out
    parameters; a second-order method cannot evaluate the network on them and says so (a raw
    dot_general shape error before). A masked first-order method given the gradient works."""
    params, batch = _params(), _batches(1)[0]
    mask = jax.tree.map(lambda a: a.ndim == 2, params)  # the biases masked out
    tx = optax.masked(as_optax(CurveBall(MODEL.apply, CE)), mask)
    with pytest.raises(SecondOrderError, match="masked-out entries"):
        # (optax.masked maps the mask over the updates, so they cannot be None here)
        tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params, batch=batch)
    sgd = optax.masked(as_optax(SGD(MODEL.apply, CE, lr=0.1)), mask)
    grad = jax.grad(lambda p: CE.value(MODEL.apply(p, batch[0]), batch[1]))(params)
    updates, _ = sgd.update(grad, sgd.init(params), params)
    for u, g, kept in zip(*(jax.tree.leaves(t) for t in (updates, grad, mask)), strict=True):
        # the weights' SGD step; the biases' gradient passed through, as optax.masked does
        assert_close(np.asarray(u), -0.1 * np.asarray(g) if kept else np.asarray(g), rtol=1e-12)
