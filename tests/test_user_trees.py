"""Parameter trees as users have them: dicts in their own key order (``from_torch``), ``None``
nodes, NamedTuples, equinox modules and flax ``FrozenDict``s, through the tree arithmetic, the
backends' autodiff, the curvature operators, CG and every registered method."""

from __future__ import annotations

from collections import OrderedDict
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import pytest

from helpers import assert_close, back
from secondorder import backends, losses, tree
from secondorder.errors import StructureError
from secondorder.optim.registry import METHODS

# --------------------------------------------------------------------------- the oracle
# f(W, b) = sum_ij tanh(x W^T + b)_ij^2: its gradient by hand, dW = D^T x and db = sum_i D_i with
# D = 2 h (1 - h^2), h = tanh(x W^T + b); the JVP along (V, c) is <dW, V> + <db, c>.
X = np.random.default_rng(7).standard_normal((5, 3))


def _f(p, x):
    xp = backends.namespace(p["w"])
    h = xp.tanh(x @ p["w"].T + p["b"])
    return xp.sum(h * h)


def _grad_by_hand(w, b):
    h = np.tanh(X @ w.T + b)
    d = 2.0 * h * (1.0 - h * h)
    return {"w": d.T @ X, "b": d.sum(axis=0)}


def _user_dict(rng):
    """Keys inserted out of sorted order, nested, as a user (or torch) builds them."""
    return {"z": rng.standard_normal((2, 3)), "a": rng.standard_normal(4),
            "m": {"y": rng.standard_normal(2), "b": rng.standard_normal((3, 1))}}


def _orders(t):
    """The key order of every dict in ``t``, outermost first."""
    if isinstance(t, dict):
        return [list(t)] + [o for k in t for o in _orders(t[k])]
    return []


# ------------------------------------------------------------------- dicts in the user's order
def test_tree_ops_keep_the_users_dict_order(rng):
    d, e = _user_dict(rng), _user_dict(rng)
    order = [["z", "a", "m"], ["y", "b"]]
    assert [a.shape for a in tree.leaves(d)] == [(4,), (3, 1), (2,), (2, 3)]  # canonical: sorted
    results = {
        "add": (tree.add(d, e), lambda u, v: u + v),
        "sub": (tree.sub(d, e), lambda u, v: u - v),
        "axpy": (tree.axpy(-0.3, d, e), lambda u, v: -0.3 * u + v),
        "map": (tree.map(lambda u, v: u * v, d, e), lambda u, v: u * v),
        "scale": (tree.scale(2.5, d), lambda u, v: 2.5 * u),
        "unflatten": (tree.unflatten(tree.structure(d), tree.leaves(d)), lambda u, v: u),
        "zeros_like": (tree.zeros_like(d), lambda u, v: 0 * u),
    }
    flat, unravel = tree.ravel(d)
    results["unravel"] = (unravel(flat), lambda u, v: u)
    results["tree.unravel"] = (tree.unravel(2.0 * flat, d), lambda u, v: 2.0 * u)
    for name, (out, formula) in results.items():
        assert _orders(out) == order, name
        for got, u, v in zip(tree.leaves(out), tree.leaves(d), tree.leaves(e)):
            np.testing.assert_array_equal(got, formula(u, v), err_msg=name)
    assert_close(flat, np.concatenate([d["a"], d["m"]["b"].ravel(), d["m"]["y"],
                                       d["z"].ravel()]))


def test_dicts_with_one_key_set_in_two_orders_are_one_structure(rng):
    d = _user_dict(rng)
    s = {"a": rng.standard_normal(4), "m": {"b": rng.standard_normal((3, 1)),
                                            "y": rng.standard_normal(2)},
         "z": rng.standard_normal((2, 3))}  # sorted, as jax.grad returns it
    assert tree.structure(d) == tree.structure(s)
    assert hash(tree.structure(d)) == hash(tree.structure(s))
    first, second = tree.add(d, s), tree.add(s, d)
    # the user's order wins over the canonical (sorted) one that jax.grad returns, whichever
    # operand carries it (check_same_structure)
    assert _orders(first) == [["z", "a", "m"], ["y", "b"]]
    assert _orders(second) == [["z", "a", "m"], ["y", "b"]]
    for a, b, u, v in zip(tree.leaves(first), tree.leaves(second), tree.leaves(d),
                          tree.leaves(s)):
        np.testing.assert_array_equal(a, u + v)
        np.testing.assert_array_equal(b, v + u)
    assert_close(tree.vdot(d, s), sum(np.sum(u * v) for u, v in zip(tree.leaves(d),
                                                                      tree.leaves(s))))
    with pytest.raises(StructureError, match="do not match"):
        tree.add(d, {**s, "extra": s["a"]})


def test_ordered_dict_comes_back_as_an_ordered_dict(rng):
    od = OrderedDict([("w", rng.standard_normal(2)), ("b", rng.standard_normal(1))])
    out = tree.scale(2.0, od)
    assert type(out) is OrderedDict and list(out) == ["w", "b"]
    np.testing.assert_array_equal(out["w"], 2.0 * od["w"])


def test_unsortable_dict_keys_raise_a_named_error(rng):
    with pytest.raises(StructureError, match="sortable"):
        tree.leaves({1: rng.standard_normal(2), "a": rng.standard_normal(2)})


def test_none_is_an_empty_node(rng):
    t = {"w": rng.standard_normal(3), "static": None, "pair": (None, rng.standard_normal(2))}
    assert len(tree.leaves(t)) == 2 and tree.size(t) == 5
    doubled = tree.scale(2.0, t)
    assert doubled["static"] is None and doubled["pair"][0] is None
    np.testing.assert_array_equal(doubled["pair"][1], 2.0 * t["pair"][1])
    assert tree.structure(t) != tree.structure({**t, "static": rng.standard_normal(1)})
    flat, unravel = tree.ravel(t)
    assert flat.shape == (5,) and unravel(flat)["static"] is None


class Layer(NamedTuple):
    w: object
    b: object


def test_namedtuple_parameters(ad_backend, rng):
    w, b = rng.standard_normal((2, 3)), rng.standard_normal(2)
    p = Layer(ad_backend.asarray(w), ad_backend.asarray(b))
    x = ad_backend.asarray(X)
    g = ad_backend.grad(lambda q: _f({"w": q.w, "b": q.b}, x), p)
    assert type(g) is Layer
    expected = _grad_by_hand(w, b)
    assert_close(back(ad_backend, g), Layer(expected["w"], expected["b"]))
    assert type(tree.axpy(-0.1, g, p)) is Layer


# ----------------------------------------------------------- through each backend's autodiff
def test_autodiff_keeps_the_users_dict_order(ad_backend, rng):
    w, b = rng.standard_normal((2, 3)), rng.standard_normal(2)
    vw, vb = rng.standard_normal((2, 3)), rng.standard_normal(2)
    p = {"w": ad_backend.asarray(w), "b": ad_backend.asarray(b)}  # not sorted
    v = {"b": ad_backend.asarray(vb), "w": ad_backend.asarray(vw)}  # sorted: another order
    x = ad_backend.asarray(X)
    expected = _grad_by_hand(w, b)

    def f(q):
        return _f(q, x)

    g = ad_backend.grad(f, p)
    value, g2 = ad_backend.value_and_grad(f, p)
    y, pullback = ad_backend.vjp(f, p)
    g3 = pullback(ad_backend.xp.ones_like(y))
    for grad in (g, g2, g3):
        assert list(grad) == ["w", "b"]
        assert_close(back(ad_backend, grad), expected)
    _, dy = ad_backend.jvp(f, p, v)
    assert_close(back(ad_backend, dy), np.sum(expected["w"] * vw) + np.sum(expected["b"] * vb))
    y_lin, jvp_fn, pullback_lin = ad_backend.linearize_vjp(f, p)
    assert_close(back(ad_backend, jvp_fn(v)), back(ad_backend, dy))
    assert list(pullback_lin(ad_backend.xp.ones_like(y_lin))) == ["w", "b"]
    # a function that returns a dict in its own order: outputs and tangents keep it
    y_out, dy_out = ad_backend.jvp(lambda q: {"s": f(q), "a": q["b"]}, p, v)
    assert list(y_out) == list(dy_out) == ["s", "a"]
    assert_close(back(ad_backend, dy_out["a"]), vb)


# ------------------------------------------------------------------------------ from_torch
def _torch_problem():
    torch = pytest.importorskip("torch")
    from secondorder.models import from_torch

    gen = torch.Generator().manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    net = net.to(torch.float64)
    with torch.no_grad():
        for prm in net.parameters():
            prm.copy_(0.5 * torch.randn(prm.shape, generator=gen, dtype=torch.float64))
    apply, params = from_torch(net)
    x = torch.randn(12, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(12, 2, generator=gen, dtype=torch.float64)
    return torch, net, apply, params, (x, y)


MODULE_ORDER = ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_from_torch_params_are_in_module_order():
    _, _, _, params, _ = _torch_problem()
    assert list(params) == MODULE_ORDER


def _dense_ggn_oracle(torch, net, params, x):
    """(1/m) sum_i J_i^T J_i (the MSE loss Hessian is I) by torch.func.jacrev, in the
    coordinates of the sorted parameter names."""
    from torch.func import functional_call, jacrev

    names = sorted(params)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    flat = torch.cat([params[n].reshape(-1) for n in names])

    def outputs(theta):
        pieces = dict(zip(names, (t.reshape(s) for t, s in
                                  zip(torch.split(theta, sizes), shapes))))
        return functional_call(net, pieces, (x,))

    jac = jacrev(outputs)(flat)  # (m, k, p)
    return torch.einsum("mkp,mkq->pq", jac, jac) / x.shape[0], flat


def test_ggn_of_from_torch_params_against_jacrev():
    torch, net, apply, params, (x, y) = _torch_problem()
    from secondorder.curvature import GGN

    ggn = GGN(apply, losses.MSE(), params, (x, y))
    dense, _ = _dense_ggn_oracle(torch, net, params, x)
    assert_close(ggn.to_dense().numpy(), dense.numpy())
    v = tree.map(torch.ones_like, params)
    assert list(ggn @ v) == MODULE_ORDER


def test_cg_on_from_torch_params_against_a_dense_solve():
    torch, net, apply, params, (x, y) = _torch_problem()
    from secondorder.curvature import GGN
    from secondorder.linalg import cg

    ggn = GGN(apply, losses.MSE(), params, (x, y))
    damping = 0.1
    b = {n: torch.linspace(-1.0, 1.0, p.numel(), dtype=torch.float64).reshape(p.shape)
         for n, p in params.items()}
    sol, info = cg(lambda u: tree.axpy(damping, u, ggn @ u), b, maxiter=500, tol=1e-13)
    assert info.reason == "converged" and list(sol) == MODULE_ORDER
    dense, _ = _dense_ggn_oracle(torch, net, params, x)
    names = sorted(params)
    rhs = torch.cat([b[n].reshape(-1) for n in names])
    expected = torch.linalg.solve(dense + damping * torch.eye(len(rhs), dtype=torch.float64), rhs)
    got = torch.cat([sol[n].reshape(-1) for n in names])
    assert_close(got.numpy(), expected.numpy(), rtol=1e-10)


def test_first_sgd_step_on_from_torch_params_matches_torch_func():
    torch, net, apply, params, (x, y) = _torch_problem()
    from torch.func import functional_call, grad

    from secondorder.optim import SGD

    lr = 0.1
    new, _, _ = SGD(apply, losses.MSE(), lr=lr).step(params, SGD(apply, losses.MSE(), lr=lr)
                                                     .init(params), (x, y))

    def loss(p):  # the MSE loss written out: (1/m) sum_i 1/2 ||f_i - y_i||^2
        r = functional_call(net, p, (x,)) - y
        return 0.5 * torch.sum(r * r) / x.shape[0]

    g = grad(loss)(params)
    assert list(new) == MODULE_ORDER
    for n in params:
        assert_close(new[n].numpy(), (params[n] - lr * g[n]).numpy())


# ------------------------------------------------------------------------- JAX pytrees
def _equinox_problem():
    jax = pytest.importorskip("jax")
    eqx = pytest.importorskip("equinox")
    jnp = jax.numpy
    model = eqx.nn.MLP(3, 2, 6, 1, activation=jnp.tanh, key=jax.random.PRNGKey(0))
    params, static = eqx.partition(model, eqx.is_array)

    def apply(p, x):
        return jax.vmap(eqx.combine(p, static))(x)

    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.standard_normal((12, 3)))
    y = jnp.asarray(rng.standard_normal((12, 2)))
    return jax, eqx, params, apply, (x, y), model


def test_equinox_partition_is_a_parameter_tree():
    jax, eqx, params, apply, (x, y), _ = _equinox_problem()
    leaves = tree.leaves(params)
    assert leaves[0].dtype == jax.numpy.float64
    # the same leaves, in the same order, as JAX's own flattening (None fields are empty)
    assert len(leaves) == 4
    for a, b in zip(leaves, jax.tree_util.tree_leaves(params)):
        assert a is b
    doubled = tree.add(params, params)
    assert type(doubled) is type(params) and doubled.layers[0].bias is not None
    for a, b in zip(tree.leaves(doubled), leaves):
        np.testing.assert_array_equal(np.asarray(a), 2.0 * np.asarray(b))
    flat, unravel = tree.ravel(params)
    assert flat.shape == (tree.size(params),) == (3 * 6 + 6 + 6 * 2 + 2,)
    assert jax.tree_util.tree_structure(unravel(flat)) == jax.tree_util.tree_structure(params)

    def loss(p):
        return 0.5 * jax.numpy.mean(jax.numpy.sum((apply(p, x) - y) ** 2, axis=1))

    b = backends.get("jax")
    g = b.grad(loss, params)
    expected = jax.grad(loss)(params)
    assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(params)
    for a, e in zip(tree.leaves(g), jax.tree_util.tree_leaves(expected)):
        assert_close(np.asarray(a), np.asarray(e))
    with pytest.raises(StructureError, match="do not match"):
        tree.add(params, tree.leaves(params))


def test_flax_frozendict_is_a_parameter_tree():
    jax = pytest.importorskip("jax")
    pytest.importorskip("flax")
    from flax.core import FrozenDict

    rng = np.random.default_rng(5)
    w, bias = rng.standard_normal((2, 3)), rng.standard_normal(2)
    p = FrozenDict({"params": {"w": jax.numpy.asarray(w), "b": jax.numpy.asarray(bias)}})
    assert [a.shape for a in tree.leaves(p)] == [(2,), (2, 3)]
    x = jax.numpy.asarray(X)
    g = backends.get("jax").grad(lambda q: _f(q["params"], x), p)
    assert isinstance(g, FrozenDict)
    assert_close(back(backends.get("jax"), dict(g["params"])), _grad_by_hand(w, bias))
    stepped = tree.axpy(-0.5, g, p)
    assert isinstance(stepped, FrozenDict)
    assert_close(np.asarray(stepped["params"]["w"]), w - 0.5 * _grad_by_hand(w, bias)["w"])


# ---------------------------------------------------------------- every registered method
def _check_three_steps(opt, params, batch, finite, changed):
    state = opt.init(params)
    p = params
    losses_seen = []
    for _ in range(3):
        p, state, info = opt.step(p, state, batch)
        assert finite(info.loss)
        losses_seen.append(float(info.loss))
    moved = [changed(a, b) for a, b in zip(tree.leaves(p), tree.leaves(params))]
    assert all(finite(a) for a in tree.leaves(p))
    assert any(moved), "the parameters did not change"
    return p, losses_seen


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_steps_on_from_torch_params(method):
    torch, net, apply, params, batch = _torch_problem()
    opt = METHODS[method](apply, losses.MSE())
    p, seen = _check_three_steps(
        opt, params, batch, finite=lambda a: bool(torch.all(torch.isfinite(a))),
        changed=lambda a, b: not torch.equal(a, b))
    assert list(p) == MODULE_ORDER
    assert all(p[n].dtype == torch.float64 and p[n].shape == params[n].shape for n in params)
    final = float(losses.MSE().value(apply(p, batch[0]), batch[1]))
    assert final < seen[0], f"{method}: loss {seen[0]:.6g} -> {final:.6g}"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_steps_on_equinox_params(method):
    """Every method, the per-layer ones (K-FAC, K-BFGS, SMW's tap Gram matrix) included, on the
    parameters of an equinox MLP through from_equinox (layer taps on its eqx.nn.Linear)."""
    from secondorder.models import from_equinox

    jax, eqx, params, _, batch, net = _equinox_problem()
    jnp = jax.numpy
    apply, eqx_params = from_equinox(net)
    assert [(info.weight, info.bias) for info in apply.layers] == [(0, 1), (2, 3)]
    assert jax.tree_util.tree_structure(eqx_params) == jax.tree_util.tree_structure(params)
    opt = METHODS[method](apply, losses.MSE())
    # jitted: one compilation instead of eager JAX's per-operation dispatch
    jitted = SimpleNamespace(init=opt.init, step=jax.jit(opt.step))
    p, seen = _check_three_steps(
        jitted, eqx_params, batch, finite=lambda a: bool(jnp.all(jnp.isfinite(a))),
        changed=lambda a, b: not bool(jnp.array_equal(a, b)))
    assert type(p) is type(params)
    assert jax.tree_util.tree_structure(p) == jax.tree_util.tree_structure(params)
    assert all(a.dtype == jnp.float64 for a in tree.leaves(p))
    final = float(losses.MSE().value(apply(p, batch[0]), batch[1]))
    assert final < seen[0], f"{method}: loss {seen[0]:.6g} -> {final:.6g}"


@pytest.mark.parametrize("method, options", [("kfac", {}), ("kbfgs", {}), ("kbfgs-l", {}),
                                             ("smw-gn", {"gram": "taps"})])
def test_tap_methods_on_a_plain_equinox_function_name_the_fix(method, options):
    """A plain function of the equinox partition has no layer taps: the per-layer methods say
    so and name from_equinox, instead of failing inside a step."""
    _, _, _, apply, _, _ = _equinox_problem()
    with pytest.raises(StructureError, match="layer taps") as err:
        METHODS[method](apply, losses.MSE(), **options)
    assert "from_equinox" in str(err.value)
