"""Everything in the linear-algebra layer compiles under jax.jit and differentiates through."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_close, dense_kron, spd
from secondorder.linalg import Kronecker, LowRank, ScaledIdentity, cg, inverse_root

jax = pytest.importorskip("jax")
jnp = jax.numpy


def test_jit_builds_kronecker_and_runs_cg(rng):
    a, g = spd(rng, 3), spd(rng, 5)
    b = rng.standard_normal((3, 5))

    @jax.jit
    def solve(a, g, b):
        op = Kronecker(a, g) + ScaledIdentity(0.1, b)
        x_tol, info_tol = cg(op, b, tol=1e-12, history=True)
        x_fix, info_fix = cg(op, b, tol=None, maxiter=15)
        return x_tol, info_tol, x_fix, info_fix

    x_tol, info_tol, x_fix, info_fix = solve(jnp.asarray(a), jnp.asarray(g), jnp.asarray(b))
    expected = np.linalg.solve(dense_kron(a, g) + 0.1 * np.eye(15), b.ravel()).reshape(3, 5)
    assert info_tol.reason == "converged"
    assert_close(np.asarray(x_tol), expected, rtol=1e-10)
    assert int(info_fix.iterations) <= 15
    assert_close(np.asarray(x_fix), expected, rtol=1e-9)
    hist = np.asarray(info_tol.history)
    k = int(info_tol.iterations)
    assert np.all(np.isfinite(hist[: k + 1])) and np.all(np.isnan(hist[k + 1 :]))


def test_jit_matrix_functions_and_woodbury(rng):
    a = spd(rng, 6)
    u = rng.standard_normal((6, 2))

    @jax.jit
    def fn(a, u):
        root = inverse_root(a, 4, method="newton")
        damped = Kronecker(a, a).damped_inverse(0.5, method="exact").to_dense()
        wood = LowRank(u, base=ScaledIdentity(2.0, u[:, 0])).inv().to_dense()
        return root, damped, wood

    root, damped, wood = fn(jnp.asarray(a), jnp.asarray(u))
    w, q = np.linalg.eigh(a)
    assert_close(np.asarray(root), (q * w**-0.25) @ q.T, rtol=1e-5)
    assert_close(np.asarray(damped), np.linalg.inv(np.kron(a, a) + 0.5 * np.eye(36)), rtol=1e-10)
    assert_close(np.asarray(wood), np.linalg.inv(2.0 * np.eye(6) + u @ u.T), rtol=1e-12)


def test_grad_through_fixed_iteration_cg(rng):
    a = spd(rng, 5)
    b = rng.standard_normal(5)
    op_matrix = jnp.asarray(a)

    def total(rhs):
        from secondorder.linalg import Dense

        x, _ = cg(Dense(op_matrix), rhs, tol=None, maxiter=5)
        return jnp.sum(x)

    grad = jax.jit(jax.grad(total))(jnp.asarray(b))
    assert_close(np.asarray(grad), np.linalg.solve(a, np.ones(5)), rtol=1e-8)
