"""The rest of the backend protocol: ``has_aux``, ``vmap``, ``jit``, ``synchronize``,
``mean_reduce`` and the declared capabilities, each against an independent reference (formulas
written out in NumPy, a Python loop, the plain gradient)."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_close, back
from secondorder import backends
from secondorder.errors import ShapeError, StructureError

X = np.random.default_rng(3).standard_normal((5, 3))


def _model(p, x):
    """h = tanh(x W^T + b); value sum h^2, aux the batch statistics (mean, max) of h."""
    xp = backends.namespace(p["w"])
    h = xp.tanh(x @ p["w"].T + p["b"])
    return xp.sum(h * h), {"mean": xp.mean(h, axis=0), "max": xp.max(h)}


def _by_hand(w, b):
    h = np.tanh(X @ w.T + b)
    d = 2.0 * h * (1.0 - h * h)
    return float(np.sum(h * h)), {"w": d.T @ X, "b": d.sum(axis=0)}, \
        {"mean": h.mean(axis=0), "max": h.max()}


def _params(backend, rng):
    w, b = rng.standard_normal((2, 3)), rng.standard_normal(2)
    return w, b, {"w": backend.asarray(w), "b": backend.asarray(b)}


def test_value_and_grad_with_aux(ad_backend, rng):
    w, b, p = _params(ad_backend, rng)
    x = ad_backend.asarray(X)
    value, grad, aux = _by_hand(w, b)
    (v, a), g = ad_backend.value_and_grad(lambda q: _model(q, x), p, has_aux=True)
    assert_close(back(ad_backend, v), value)
    assert_close(back(ad_backend, g), grad)
    assert list(a) == ["mean", "max"]
    assert_close(back(ad_backend, a), aux)
    # the same gradient as without aux, and aux is a plain (concrete) array of the framework
    assert_close(back(ad_backend, g),
                 back(ad_backend, ad_backend.grad(lambda q: _model(q, x)[0], p)))
    assert all(ad_backend.is_array(leaf) and ad_backend.is_concrete(leaf) for leaf in a.values())
    g2, a2 = ad_backend.grad(lambda q: _model(q, x), p, has_aux=True)
    assert_close(back(ad_backend, g2), grad)
    assert_close(back(ad_backend, a2), aux)


def test_vjp_with_aux(ad_backend, rng):
    w, b, p = _params(ad_backend, rng)
    x = ad_backend.asarray(X)
    _, _, aux = _by_hand(w, b)
    u = rng.standard_normal((5, 2))

    def f(q):
        out, stats = _model(q, x)
        xp = backends.namespace(out)
        return xp.tanh(x @ q["w"].T + q["b"]), stats

    y, pullback, a = ad_backend.vjp(f, p, has_aux=True)
    assert_close(back(ad_backend, a), aux)
    h = np.tanh(X @ w.T + b)
    assert_close(back(ad_backend, y), h)
    d = u * (1.0 - h * h)  # J^T u for h = tanh(x W^T + b)
    assert_close(back(ad_backend, pullback(ad_backend.asarray(u))), {"w": d.T @ X,
                                                                      "b": d.sum(axis=0)})


def test_has_aux_needs_a_pair_on_numpy(rng):
    b = backends.get("numpy")
    if not b.has_autodiff:
        pytest.skip(b.note)
    _, _, p = _params(b, rng)
    with pytest.raises(StructureError, match="pair"):
        b.value_and_grad(lambda q: _model(q, X)[0], p, has_aux=True)


# ----------------------------------------------------------------------------------- vmap
def test_vmap_against_a_python_loop(backend, rng):
    xp = backend.xp
    a = rng.standard_normal((4, 3))
    w = rng.standard_normal((2, 3))
    c = rng.standard_normal((3, 4))

    def f(row, p):
        return xp.tanh(p["w"] @ row) + xp.sum(row), p["w"] * row[0]

    p = {"w": backend.asarray(w)}
    out, scaled = backend.vmap(f, in_axes=(0, None))(backend.asarray(a), p)
    assert_close(back(backend, out), np.stack([np.tanh(w @ r) + r.sum() for r in a]))
    assert_close(back(backend, scaled), np.stack([w * r[0] for r in a]))
    # a mapped tree, another mapped axis, out_axes per output
    k = rng.standard_normal(4)
    moved, same = backend.vmap(lambda t, kk, s: (t["c"] * kk, 2.0 * s), in_axes=(1, 0, None),
                               out_axes=(1, None))({"c": backend.asarray(c)},
                                                   backend.asarray(k), backend.asarray(w))
    assert_close(back(backend, moved), c * k)
    assert_close(back(backend, same), 2.0 * w)


def test_vmap_of_grad_gives_per_sample_gradients(ad_backend, rng):
    w, b, p = _params(ad_backend, rng)

    def per_sample(q, xi):
        xp = backends.namespace(xi)
        h = xp.tanh(q["w"] @ xi + q["b"])
        return xp.sum(h * h)

    grads = ad_backend.vmap(lambda xi: ad_backend.grad(lambda q: per_sample(q, xi), p))(
        ad_backend.asarray(X))
    h = np.tanh(X @ w.T + b)
    d = 2.0 * h * (1.0 - h * h)
    assert_close(back(ad_backend, grads), {"w": d[:, :, None] * X[:, None, :], "b": d})


@pytest.mark.parametrize("name", ["numpy", "array_api_strict"])
def test_loop_vmap_rejects_bad_axes_with_named_errors(name):
    pytest.importorskip(name)
    backend = backends.get(name)
    a, b = backend.asarray(np.ones((3, 2))), backend.asarray(np.ones((4, 2)))
    with pytest.raises(ShapeError, match="same size"):
        backend.vmap(lambda u, v: u + v)(a, b)
    with pytest.raises(ShapeError, match="at least one mapped"):
        backend.vmap(lambda u: u, in_axes=None)(a)
    with pytest.raises(StructureError, match="one int or None per argument"):
        backend.vmap(lambda u, v: u, in_axes=(0,))(a, b)
    with pytest.raises(ShapeError, match="out of range"):
        backend.vmap(lambda u: u, in_axes=2)(a)


# ------------------------------------------------------------- jit, synchronize, reduction
def test_jit_compiles_where_the_backend_compiles(backend, rng):
    a = rng.standard_normal(4)

    def f(x):
        return backend.xp.sin(x) * 2.0

    compiled = backend.jit(f)
    assert_close(back(backend, compiled(backend.asarray(a))), 2.0 * np.sin(a))
    if backend.has_jit:
        assert compiled is not f and hasattr(compiled, "lower")  # jax.jit's wrapper
    else:
        assert compiled is f


def test_synchronize_and_mean_reduce_return_their_argument(backend, rng):
    t = {"a": backend.asarray(rng.standard_normal(3)), "b": None}
    assert backend.synchronize(t) is t
    assert backend.synchronize() is None
    assert backend.mean_reduce(t) is t  # one process: the identity


def test_declared_capabilities(backend):
    assert backend.subspace_route in ("phi", "theta")
    assert backend.subspace_route == ("theta" if backend.name in ("torch", "cupy") else "phi")
    assert backend.has_jit == (backend.name == "jax")
    if backend.name == "jax":
        import jax

        assert backend.device_from_name("cpu") == jax.devices("cpu")[0]
    else:
        assert backend.device_from_name("cpu") == "cpu"


def test_jax_control_flow_is_python_eagerly_and_lax_under_jit():
    """Eagerly, fori_loop / while_loop / cond run the Python body with concrete values (no
    compilation of a new closure at every call); under jax.jit they are lax primitives; the
    results agree (sum of squares 0..9, the first power of 2 above 100, a branch)."""
    jax = pytest.importorskip("jax")
    b = backends.get("jax")
    seen = []

    def body(i, s):
        seen.append(type(i))
        return s + i * i

    def run(x):
        total = b.fori_loop(0, 10, body, x)
        power = b.while_loop(lambda v: v < 100.0, lambda v: 2.0 * v, x + 1.0)
        sign = b.cond(total > 0, lambda t: t, lambda t: -t, total)
        return total, power, sign

    eager = run(jax.numpy.asarray(0.0))
    assert seen == [int] * 10
    seen.clear()
    jitted = jax.jit(run)(jax.numpy.asarray(0.0))
    assert len(seen) == 1 and issubclass(seen[0], jax.core.Tracer)
    assert [float(v) for v in eager] == [float(v) for v in jitted] == [285.0, 128.0, 285.0]
