"""Update transforms against NumPy formulas on every backend and against optax, the peer
library whose interface they follow, on JAX arrays."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_close, back, to
from secondorder import tree
from secondorder.errors import HyperparameterError
from secondorder.optim.transforms import (
    add_decayed_weights,
    chain,
    clip_by_global_norm,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    trace,
)


def _trees(rng, n=4):
    params = {"w": rng.standard_normal((3, 2)), "b": rng.standard_normal(2)}
    grads = [{"w": rng.standard_normal((3, 2)), "b": rng.standard_normal(2)} for _ in range(n)]
    return params, grads


def _apply(transform, backend, params, grads):
    p = to(backend, params)
    state = transform.init(p)
    outs = []
    for g in grads:
        u, state = transform.update(to(backend, g), state, p)
        outs.append(back(backend, u))
    return outs, state


def test_momentum_adam_decay_clip_and_schedule_match_numpy(backend, rng):
    params, grads = _trees(rng)
    w = tree.ravel(params)[0]
    gs = [tree.ravel(g)[0] for g in grads]
    # Nesterov momentum with L2 decay and a schedule lr(t) = 0.1 / (1 + t)
    out, state = _apply(chain(add_decayed_weights(0.01), trace(0.9, nesterov=True),
                              scale_by_learning_rate(lambda t: 0.1 / (1.0 + t))),
                        backend, params, grads)
    b = np.zeros_like(w)
    for t, (g, u) in enumerate(zip(gs, out)):
        d = g + 0.01 * w
        b = 0.9 * b + d
        assert_close(tree.ravel(u)[0], -0.1 / (1 + t) * (d + 0.9 * b))
    # Adam, bias-corrected
    out, state = _apply(scale_by_adam(0.8, 0.95, 1e-6), backend, params, grads)
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, (g, u) in enumerate(zip(gs, out), start=1):
        m, v = 0.8 * m + 0.2 * g, 0.95 * v + 0.05 * g * g
        expected = (m / (1 - 0.8**t)) / (np.sqrt(v / (1 - 0.95**t)) + 1e-6)
        assert_close(tree.ravel(u)[0], expected)
    assert int(state.count) == len(grads)
    # clipping: above the threshold the norm becomes max_norm, below it nothing changes
    big = max(np.linalg.norm(g) for g in gs)
    out, _ = _apply(clip_by_global_norm(0.5), backend, params, grads)
    for g, u in zip(gs, out):
        assert_close(tree.ravel(u)[0], g * min(1.0, 0.5 / np.linalg.norm(g)))
    out, _ = _apply(clip_by_global_norm(2 * big), backend, params, grads)
    for g, u in zip(gs, out):
        assert_close(tree.ravel(u)[0], g)
    out, _ = _apply(scale(-3.0), backend, params, grads[:1])
    assert_close(tree.ravel(out[0])[0], -3.0 * gs[0])


def test_clip_of_a_zero_direction_is_zero(backend):
    zero = {"w": np.zeros((2, 2))}
    out, _ = _apply(clip_by_global_norm(1.0), backend, zero, [zero])
    assert_close(out[0]["w"], np.zeros((2, 2)), rtol=0.0)


@pytest.mark.parametrize("case", ["sgd", "nesterov", "adamw", "clip-adam-schedule"])
def test_chains_equal_optax(rng, case):
    optax = pytest.importorskip("optax")
    jax = pytest.importorskip("jax")
    from secondorder import backends

    b = backends.get("jax")
    params, grads = _trees(rng, n=6)

    def sched(t):  # powers of two: exact whatever precision the count is given in
        return 0.0625 * 0.5 ** (t // 3)

    ours, theirs = {
        "sgd": (chain(trace(0.9), scale_by_learning_rate(0.1)), optax.sgd(0.1, momentum=0.9)),
        "nesterov": (chain(trace(0.9, nesterov=True), scale_by_learning_rate(0.1)),
                     optax.sgd(0.1, momentum=0.9, nesterov=True)),
        "adamw": (chain(scale_by_adam(0.9, 0.999, 1e-8), add_decayed_weights(1e-2),
                        scale_by_learning_rate(1e-3)),
                  optax.adamw(1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2)),
        "clip-adam-schedule": (
            chain(clip_by_global_norm(0.7), scale_by_adam(), scale_by_learning_rate(sched)),
            optax.chain(optax.clip_by_global_norm(0.7), optax.scale_by_adam(),
                        optax.scale_by_learning_rate(sched))),
    }[case]
    p = to(b, params)
    s_ours, s_theirs = ours.init(p), theirs.init(p)
    for g in grads:
        g = to(b, g)
        u_ours, s_ours = ours.update(g, s_ours, p)
        u_theirs, s_theirs = theirs.update(g, s_theirs, p)
        assert_close(u_ours, back(b, u_theirs), rtol=1e-12, backend=b)
    # ours compiles, and composes with optax's own transforms in one chain
    mixed = chain(optax.clip_by_global_norm(0.7), ours)
    state = mixed.init(p)
    jitted = jax.jit(mixed.update)
    u, state = jitted(to(b, grads[0]), state, p)
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in tree.leaves(u))


def test_bad_settings_raise_named_errors():
    for make in (lambda: trace(-0.1), lambda: trace(0.0, nesterov=True),
                 lambda: scale_by_adam(b1=1.0), lambda: scale_by_adam(eps=0.0),
                 lambda: add_decayed_weights(-1.0), lambda: clip_by_global_norm(0.0),
                 lambda: scale_by_learning_rate(-0.1),
                 lambda: scale_by_learning_rate(float("nan"))):
        with pytest.raises(HyperparameterError):
            make()
    with pytest.raises(HyperparameterError):
        chain(trace(0.9), "not a transform")


def test_adam_in_bfloat16_equals_optax(rng):
    """bfloat16 rounds 0.999 to 1, so the bias correction 1 - b2^t is computed from a float32
    count and cast: Adam's update on a bfloat16 tree agrees with optax's over 300 steps (random
    gradients) to within two bfloat16 ulps of 1, where before it was 0 at every step."""
    optax = pytest.importorskip("optax")
    jnp = pytest.importorskip("jax.numpy")
    from secondorder.optim.schedules import count_as_float

    p = {"w": jnp.zeros(50, jnp.bfloat16)}
    ours, theirs = scale_by_adam(), optax.scale_by_adam()
    s_ours, s_theirs = ours.init(p), theirs.init(p)
    for _ in range(300):
        g = {"w": jnp.asarray(rng.standard_normal(50)).astype(jnp.bfloat16)}
        u_ours, s_ours = ours.update(g, s_ours, p)
        u_theirs, s_theirs = theirs.update(g, s_theirs, p)
        assert u_ours["w"].dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(u_ours["w"], dtype=np.float64),
                                   np.asarray(u_theirs["w"], dtype=np.float64), rtol=0,
                                   atol=2.0**-6)
    assert float(count_as_float(s_ours.count + 1, p)) == 301.0  # bfloat16 would read 300


def test_adam_in_bfloat16_on_torch_takes_a_step():
    """The first Adam step is m/c1 / sqrt(v/c2) = g / |g| (eps aside) in any precision; on a
    torch bfloat16 tree it was 0 (1 - 0.999 rounded to 0)."""
    torch = pytest.importorskip("torch")
    g = {"w": torch.tensor([0.5, -2.0, 3.0], dtype=torch.bfloat16)}
    t = scale_by_adam()
    u, _ = t.update(g, t.init({"w": torch.zeros(3, dtype=torch.bfloat16)}))
    assert u["w"].dtype == torch.bfloat16
    np.testing.assert_allclose(u["w"].double().numpy(), [1.0, -1.0, 1.0], rtol=0, atol=2.0**-7)


def test_torch_adam_in_multi_tensor_calls_is_the_formula_and_writes_nothing(rng, monkeypatch):
    """The torch backend's Adam (torch._foreach_* over every leaf, as torch.optim.Adam) gives
    the default leaf-by-leaf formula to rounding and leaves the moments it was given as they
    were."""
    torch = pytest.importorskip("torch")
    from secondorder import backends
    from secondorder.backends._base import Backend

    b = backends.get("torch")
    shapes = [(4, 3), (3,), (2, 2, 2)]
    mu, nu, g = ([torch.tensor(f(rng.standard_normal(s))) for s in shapes]
                 for f in (lambda a: a, np.abs, lambda a: a))
    kept = [a.clone() for a in (*mu, *nu)]
    c1, c2 = torch.tensor(1 - 0.9**3, dtype=torch.float64), torch.tensor(1 - 0.99**3,
                                                                         dtype=torch.float64)
    calls = []
    lerp = torch._foreach_lerp
    monkeypatch.setattr(torch, "_foreach_lerp", lambda *a: calls.append(1) or lerp(*a))
    fused = b.adam(mu, nu, g, 0.9, 0.99, c1, c2, 1e-8)
    plain = Backend.adam(b, mu, nu, g, 0.9, 0.99, c1, c2, 1e-8)
    assert calls == [1]  # one multi-tensor call for every leaf
    for got, want in zip(fused, plain):
        assert_close([a.numpy() for a in got], [a.numpy() for a in want], rtol=1e-14)
    assert all(torch.equal(a, k) for a, k in zip((*mu, *nu), kept))
