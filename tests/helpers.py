"""Shared test helpers: NumPy float64 oracles and conversions to and from a backend."""

from __future__ import annotations

from typing import Any

import numpy as np

from secondorder import tree
from secondorder.backends import Backend

#: float64 agreement demanded between any backend and the NumPy oracle (relative, norm-wise)
RTOL64 = 1e-12


def to(backend: Backend, x: Any) -> Any:
    """A tree of NumPy arrays converted leaf by leaf to ``backend`` (float64 kept)."""
    return tree.map(lambda a: backend.asarray(np.asarray(a, dtype=np.float64)), x)


def back(backend: Backend, x: Any) -> Any:
    """A backend tree converted back to NumPy."""
    return tree.map(lambda a: np.asarray(backend.to_numpy(a), dtype=np.float64), x)


def raveled(backend: Backend, x: Any) -> np.ndarray:
    """A backend tree converted back to NumPy and raveled by ``secondorder.tree.ravel``."""
    return tree.ravel(back(backend, x))[0]


def softmax(f: np.ndarray) -> np.ndarray:
    """Row-wise softmax of a NumPy array (shifted by each row's maximum)."""
    z = np.exp(f - f.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def assert_close(actual: Any, expected: Any, rtol: float = RTOL64, backend: Backend | None = None
                 ) -> None:
    """Norm-wise relative agreement ||a - e|| <= rtol ||e|| (absolute when e = 0), leaf by leaf."""
    if backend is not None:
        actual = back(backend, actual)
    a_leaves, e_leaves = tree.leaves(actual), tree.leaves(expected)
    assert len(a_leaves) == len(e_leaves), "different number of leaves"
    for a, e in zip(a_leaves, e_leaves):
        a, e = np.asarray(a, dtype=np.float64), np.asarray(e, dtype=np.float64)
        assert a.shape == e.shape, f"shape {a.shape} != {e.shape}"
        err = np.linalg.norm(a - e)
        scale = np.linalg.norm(e)
        bound = rtol * scale if scale > 0 else rtol
        assert err <= bound, f"error {err:.3e} > {bound:.3e} (norm of expected: {scale:.3e})"


def spd(rng: np.random.Generator, n: int, cond: float = 10.0) -> np.ndarray:
    """A random symmetric positive definite matrix with condition number ``cond``."""
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    w = np.geomspace(1.0, cond, n)
    return (q * w) @ q.T


def dense_kron(*factors: np.ndarray) -> np.ndarray:
    out = factors[0]
    for f in factors[1:]:
        out = np.kron(out, f)
    return out


def textbook_cg(a, b, x0=None, iterations=10, save_at=()):
    """Plain CG on a x = b from x0 (default 0), written out as the NumPy oracle.

    Returns the final x, the iterates after the counts in ``save_at`` (the final one for counts
    past the end) and the final residual norm.
    """
    x = np.zeros_like(b) if x0 is None else x0.copy()
    r = b - a @ x
    p = r.copy()
    saved = {0: x.copy()}
    for k in range(1, iterations + 1):
        ap = a @ p
        alpha = (r @ r) / (p @ ap)
        x = x + alpha * p
        r_new = r - alpha * ap
        p = r_new + (r_new @ r_new) / (r @ r) * p
        r = r_new
        saved[k] = x.copy()
    return x, [saved.get(s, x) for s in save_at], np.linalg.norm(r)


def flat(t):
    """Row-major flat coordinates of a NumPy tree (dict keys sorted, tuples in order), written
    out independently of ``secondorder.tree``."""
    if isinstance(t, dict):
        return np.concatenate([np.ravel(t[k]) for k in sorted(t)])
    if isinstance(t, tuple):
        return np.concatenate([np.ravel(a) for a in t])
    return np.ravel(t)
