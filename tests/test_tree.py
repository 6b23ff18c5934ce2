"""Parameter trees as vectors, against the same arithmetic on one flat NumPy vector."""

from __future__ import annotations

from collections import namedtuple

import numpy as np
import pytest

import secondorder
from helpers import assert_close, back, to
from secondorder import tree
from secondorder.errors import StructureError

Layer = namedtuple("Layer", ["w", "b"])


def _trees(rng):
    shape = {"conv": Layer(rng.standard_normal((2, 3, 3)), rng.standard_normal(2)),
             "dense": [rng.standard_normal((4, 5)), rng.standard_normal(4)]}
    other = tree.map(lambda a: rng.standard_normal(a.shape), shape)
    return shape, other


def _flat(t):
    return np.concatenate([np.ravel(a) for a in tree.leaves(t)])


def test_leaf_order_is_canonical(rng):
    x, _ = _trees(rng)
    leaves = tree.leaves(x)
    assert [a.shape for a in leaves] == [(2, 3, 3), (2,), (4, 5), (4,)]  # keys sorted
    assert tree.size(x) == 18 + 2 + 20 + 4
    rebuilt = tree.unflatten(tree.structure(x), leaves)
    assert isinstance(rebuilt["conv"], Layer) and isinstance(rebuilt["dense"], list)


def test_vector_arithmetic(backend, rng):
    x, y = _trees(rng)
    bx, by = to(backend, x), to(backend, y)
    fx, fy = _flat(x), _flat(y)
    assert_close(_flat(back(backend, tree.add(bx, by))), fx + fy)
    assert_close(_flat(back(backend, tree.sub(bx, by))), fx - fy)
    assert_close(_flat(back(backend, tree.scale(0.3, bx))), 0.3 * fx)
    assert_close(_flat(back(backend, tree.axpy(-1.7, bx, by))), -1.7 * fx + fy)
    assert_close(_flat(back(backend, tree.neg(bx))), -fx)
    assert_close(back(backend, tree.vdot(bx, by)), fx @ fy)
    assert_close(back(backend, tree.norm(bx)), np.linalg.norm(fx))
    assert_close(_flat(back(backend, tree.zeros_like(bx))), np.zeros_like(fx))
    assert_close(_flat(back(backend, tree.ones_like(bx))), np.ones_like(fx))


def test_ravel_unravel_round_trip(backend, rng):
    x, _ = _trees(rng)
    flat, unravel = tree.ravel(to(backend, x))
    assert_close(back(backend, flat), _flat(x))
    assert_close(back(backend, unravel(flat)), x)
    assert_close(back(backend, tree.unravel(flat, x)), x)
    with pytest.raises(StructureError, match="length 44"):
        unravel(flat[:-1])


def test_partition_and_combine(backend, rng):
    x, _ = _trees(rng)
    bx = to(backend, x)
    groups = [[0, 1], [3], [2]]
    parts = tree.partition(bx, groups)
    leaves = tree.leaves(x)
    assert [len(p) for p in parts] == [2, 1, 1]
    assert_close(back(backend, parts[1][0]), leaves[3])
    doubled = [tuple(2.0 * a for a in p) for p in parts]
    assert_close(back(backend, tree.combine(doubled, groups, bx)), tree.scale(2.0, x))
    with pytest.raises(StructureError, match="exactly once"):
        tree.partition(bx, [[0, 1], [2]])


def test_mismatched_structures_raise(rng):
    x, y = _trees(rng)
    with pytest.raises(StructureError, match="do not match"):
        tree.add(x, {"conv": y["conv"]})
    with pytest.raises(StructureError, match="shapes"):
        tree.vdot({"a": np.ones(3)}, {"a": np.ones(4)})


def test_tree_ops_inside_jax_transforms(rng):
    jax = pytest.importorskip("jax")
    x, y = _trees(rng)
    jx, jy = to(secondorder.backends.get("jax"), x), to(secondorder.backends.get("jax"), y)

    @jax.jit
    def fn(a, b):
        flat, unravel = tree.ravel(tree.axpy(2.0, a, b))
        return tree.vdot(a, b), unravel(flat), jax.grad(lambda z: tree.vdot(z, z))(a)

    dot, rebuilt, grad = fn(jx, jy)
    assert_close(np.asarray(dot), _flat(x) @ _flat(y))
    assert_close(tree.map(np.asarray, rebuilt), tree.axpy(2.0, x, y))
    assert_close(tree.map(np.asarray, grad), tree.scale(2.0, x))


def test_tree_ops_inside_torch_func(rng):
    torch = pytest.importorskip("torch")
    x, y = _trees(rng)
    b = secondorder.backends.get("torch")
    tx, ty = to(b, x), to(b, y)
    grad = torch.func.grad(lambda z: tree.vdot(z, tree.axpy(1.0, z, ty)))(tx)
    assert_close(back(b, grad), tree.add(tree.scale(2.0, x), y))
    hv = torch.func.jvp(torch.func.grad(lambda z: tree.norm(z) ** 2), (tx,), (ty,))[1]
    assert_close(back(b, hv), tree.scale(2.0, y))


def test_state_round_trips_through_npz(tmp_path):
    """An optimiser state saved as arrays with np.savez comes back, through tree.unflatten and
    the structure of a fresh init, equal to the one saved, and steps on identically."""
    from secondorder import tree
    from secondorder.losses import SoftmaxCrossEntropy
    from secondorder.models import MLP
    from secondorder.optim import CurveBall

    rng = np.random.default_rng(0)
    model = MLP([3, 4, 2])
    params = model.init(seed=0, backend="numpy")
    batch = (rng.standard_normal((6, 3)), rng.integers(0, 2, 6))
    opt = CurveBall(model, SoftmaxCrossEntropy())
    params, state, _ = opt.step(params, opt.init(params), batch)
    np.savez(tmp_path / "state.npz", *tree.leaves(state))
    with np.load(tmp_path / "state.npz") as f:
        arrays = [f[f"arr_{i}"] for i in range(len(f.files))]
    restored = tree.unflatten(tree.structure(opt.init(params)), arrays)
    assert type(restored) is type(state)
    for a, b in zip(tree.leaves(restored), tree.leaves(state)):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    p1, _, _ = opt.step(params, state, batch)
    p2, _, _ = opt.step(params, restored, batch)
    for a, b in zip(tree.leaves(p1), tree.leaves(p2)):
        np.testing.assert_array_equal(a, b)


def test_jax_node_types_are_found_without_is_tree_node(monkeypatch):
    """jax releases without ``jax.tree_util.is_tree_node`` (0.7.2, which the kfac-jax peer
    session pins) still get registered node types flattened into their children."""
    jax = pytest.importorskip("jax")

    class Pair:  # a fresh type: its kind is not cached yet
        def __init__(self, a, b):
            self.a, self.b = a, b

    jax.tree_util.register_pytree_node(Pair, lambda p: ((p.a, p.b), None),
                                       lambda _, c: Pair(*c))
    monkeypatch.delattr(jax.tree_util, "is_tree_node", raising=False)  # absent in 0.7.2
    a, b = np.arange(3.0), np.ones(2)
    leaves = tree.leaves({"p": Pair(a, b), "c": np.zeros(1)})
    assert [x.shape for x in leaves] == [(1,), (3,), (2,)]
