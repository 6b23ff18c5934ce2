"""Quasi-Newton updates of an inverse-curvature estimate H, written over the array namespace so
that every piece runs eagerly on NumPy and PyTorch and compiles under ``jax.jit`` (no Python
branch on array values; a few ``where`` selects instead).

Notation: s a step, y the change of gradient (the secant pair), H ~ B^{-1} symmetric positive
definite, rho = 1 / (s^T y). Vectors are 1-d arrays of length n; H is (n, n).

* :func:`bfgs_inverse_update`: the BFGS update of H (Nocedal and Wright, eq. 6.17; Y. Ren's
  thesis eq. 2.6 / 3.11)  H+ = (I - rho s y^T) H (I - rho y s^T) + rho s s^T.
* :func:`powell_damping_h`: Powell's damping on H (thesis sec. 2.3.1):
  s~ = theta s + (1 - theta) H y with theta = (1 - mu) y^T H y / (y^T H y - s^T y) when
  s^T y < mu y^T H y, else 1; afterwards s~^T y >= mu y^T H y.
* :func:`double_damping`: DD (thesis Algorithm 3): Powell's damping on H with mu1, then
  Powell's damping with B = I: y~ = theta2 y + (1 - theta2) s~ with
  theta2 = (1 - mu2) s~^T s~ / (s~^T s~ - s~^T y) when s~^T y < mu2 s~^T s~, else 1; afterwards
  s~^T y~ >= mu2 s~^T s~ (for mu2 in (0, 1]).
* :func:`powell_lm_damping`: D_P D_LM (thesis Algorithm 8): Powell's damping on H with mu1,
  then the Levenberg-Marquardt shift y~ = y + mu2 s~ (mu2 in (0, inf)); afterwards
  s~^T y~ >= mu2 s~^T s~.
* :class:`LBFGSMemory`, :func:`lbfgs_init`, :func:`lbfgs_push`, :func:`lbfgs_apply`: L-BFGS
  (Nocedal and Wright, Algorithm 7.4) over a fixed-size buffer of the last ``memory`` pairs,
  oldest first, applied by the two-loop recursion to a vector or, column by column, to a
  matrix; empty slots hold rho = 0 and change nothing, so the arrays keep one shape and the
  recursion compiles with ``fori_loop``; :func:`lbfgs_apply_compact` gives the same product
  through the compact representation (Byrd, Nocedal and Schnabel 1994), without loops.

A pair with s^T y <= 0 (or a non-finite one) cannot keep H positive definite; the updates here
skip it (H is returned unchanged, the L-BFGS buffer is not advanced), which is what BFGS codes
do when the curvature condition fails. The damping functions exist so that this does not
happen: after either of them s~^T y~ > 0 whenever s~ != 0.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ..backends import backend_of

Array = Any

__all__ = [
    "LBFGSMemory",
    "bfgs_inverse_update",
    "double_damping",
    "lbfgs_apply",
    "lbfgs_apply_compact",
    "lbfgs_init",
    "lbfgs_push",
    "powell_damping_h",
    "powell_lm_damping",
]


def _dot(a: Array, b: Array, xp: Any) -> Array:
    return xp.sum(a * b)


def _safe_reciprocal(sy: Array, xp: Any) -> Array:
    """1 / (s^T y) where s^T y > 0 and finite, else 0 (the pair is skipped)."""
    ok = xp.logical_and(sy > 0, xp.isfinite(sy))
    return xp.where(ok, 1.0 / xp.where(ok, sy, xp.ones_like(sy)), xp.zeros_like(sy))


def _unit_pair(s: Array, y: Array, xp: Any) -> tuple[Array, Array]:
    """(c s, c y) with c = 1 / ||s|| (c = 1 where ||s|| is 0 or not finite). BFGS and L-BFGS
    are unchanged by a common scaling of a pair (rho = 1 / (s^T y) scales by 1 / c^2, every
    term rho s y^T, rho s s^T by 1), but their intermediates are not: near convergence in
    float32, s^T y ~ 1e-20 makes rho^2 ~ 1e40 overflow in the expanded update. With ||s|| = 1
    the pair's own scale is gone, and s^T y is its curvature along s (bounded below by the pair
    damping, e.g. lambda_G after D_LM)."""
    length = xp.sqrt(_dot(s, s, xp))
    ok = xp.logical_and(length > 0, xp.isfinite(length))
    c = xp.where(ok, 1.0 / xp.where(ok, length, xp.ones_like(length)), xp.ones_like(length))
    return c * s, c * y


def bfgs_inverse_update(h: Array, s: Array, y: Array) -> Array:
    """The BFGS update of the inverse estimate H with the pair (s, y):

        H+ = (I - rho s y^T) H (I - rho y s^T) + rho s s^T,   rho = 1 / (s^T y),

    expanded as H+ = H - rho (s u^T + u s^T) + (rho^2 y^T H y + rho) s s^T with u = H y
    (two matrix-vector products and three rank-one terms, O(n^2)). H+ y = s (the secant
    condition) and H+ is positive definite when H is and s^T y > 0. A pair with s^T y <= 0 or
    non-finite is skipped: rho = 0 gives H+ = H exactly. The pair is first scaled to ||s|| = 1,
    which leaves H+ unchanged in exact arithmetic and keeps rho^2 y^T H y from overflowing.
    """
    xp = backend_of(h).xp
    s, y = _unit_pair(s, y, xp)
    u = h @ y
    rho = _safe_reciprocal(_dot(s, y, xp), xp)
    # where the pair is skipped, u and y^T H y may be anything: zero them so nothing leaks
    yhy = xp.where(rho > 0, _dot(y, u, xp), xp.zeros_like(rho))
    u = xp.where(rho > 0, u, xp.zeros_like(u))
    s = xp.where(rho > 0, s, xp.zeros_like(s))
    su = s[:, None] * u[None, :]
    out = h - rho * (su + xp.matrix_transpose(su)) + (rho * rho * yhy + rho) * (
        s[:, None] * s[None, :])
    # exact symmetry against rounding drift (e.g. an H from a solve); a skipped pair keeps H
    return xp.where(rho > 0, 0.5 * (out + xp.matrix_transpose(out)), h)


def powell_damping_h(s: Array, y: Array, hy: Array, mu: Any) -> Array:
    """Powell's damping on H (thesis sec. 2.3.1; Algorithm 3 lines 1-2, Algorithm 8 lines
    2-7): s~ = theta s + (1 - theta) H y, with ``hy`` = H y and

        theta = (1 - mu) y^T H y / (y^T H y - s^T y)   if s^T y < mu y^T H y,   else 1,

    so that s~^T y >= mu y^T H y (equality when damped). ``mu`` in (0, 1)."""
    xp = backend_of(s).xp
    sy, yhy = _dot(s, y, xp), _dot(y, hy, xp)
    damp = sy < mu * yhy
    # y^T H y - s^T y > (1 - mu) y^T H y >= 0 where damped; 1 elsewhere keeps it finite
    theta = xp.where(damp, (1 - mu) * yhy / xp.where(damp, yhy - sy, xp.ones_like(sy)),
                     xp.ones_like(sy))
    return theta * s + (1 - theta) * hy


def double_damping(s: Array, y: Array, hy: Array, mu1: Any, mu2: Any
                   ) -> tuple[Array, Array]:
    """DD, the double damping of the thesis's Algorithm 3 (Ch. 2): Powell's damping on H with
    ``mu1`` (:func:`powell_damping_h`), then Powell's damping with B = I and ``mu2``:

        theta2 = (1 - mu2) s~^T s~ / (s~^T s~ - s~^T y)   if s~^T y < mu2 s~^T s~,   else 1,
        y~ = theta2 y + (1 - theta2) s~.

    Returns (s~, y~) with s~^T y >= mu1 y^T H y and s~^T y~ >= mu2 s~^T s~. ``mu1`` in (0, 1),
    ``mu2`` in (0, 1] (y~ a convex combination of y and s~; the thesis sets mu2 = lambda_G)."""
    xp = backend_of(s).xp
    st = powell_damping_h(s, y, hy, mu1)
    sty, sts = _dot(st, y, xp), _dot(st, st, xp)
    damp = sty < mu2 * sts
    theta = xp.where(damp, (1 - mu2) * sts / xp.where(damp, sts - sty, xp.ones_like(sts)),
                     xp.ones_like(sts))
    return st, theta * y + (1 - theta) * st


def powell_lm_damping(s: Array, y: Array, hy: Array, mu1: Any, mu2: Any
                      ) -> tuple[Array, Array]:
    """D_P D_LM, the thesis's Algorithm 8 (Ch. 3): Powell's damping on H with ``mu1``
    (:func:`powell_damping_h`), then the Levenberg-Marquardt shift y~ = y + mu2 s~.

    Returns (s~, y~) with s~^T y >= mu1 y^T H y >= 0 and hence s~^T y~ >= mu2 s~^T s~ (the
    curvature along s~ is bounded below by mu2, as if mu2 I had been added to H^{-1}).
    ``mu1`` in (0, 1), ``mu2`` > 0 (the thesis sets mu2 = lambda_G)."""
    st = powell_damping_h(s, y, hy, mu1)
    return st, y + mu2 * st


class LBFGSMemory(NamedTuple):
    """The last ``memory`` L-BFGS pairs, oldest first: ``s`` and ``y`` (memory, n) and
    ``rho`` (memory,) = 1 / (s_i^T y_i), 0 for an empty slot (which the two-loop recursion then
    passes over). Slots fill from the end: after k < memory pushes the first memory - k are
    empty."""

    s: Array
    y: Array
    rho: Array


def lbfgs_init(n: int, memory: int, like: Array) -> LBFGSMemory:
    """An empty memory of ``memory`` pairs of length ``n``, with the namespace, dtype and
    device of the array ``like``."""
    backend = backend_of(like)
    xp, dev = backend.xp, backend.device(like)
    def zeros(*shape: int) -> Array:  # a buffer per field: shared ones could not be donated
        return xp.zeros(shape, dtype=like.dtype, device=dev)

    return LBFGSMemory(zeros(memory, n), zeros(memory, n), zeros(memory))


def lbfgs_push(mem: LBFGSMemory, s: Array, y: Array) -> LBFGSMemory:
    """``mem`` with the pair (s, y) appended as the newest and the oldest dropped; a pair with
    s^T y <= 0 or non-finite is skipped (``mem`` is returned with the same values). The pair is
    stored scaled to ||s|| = 1 (the L-BFGS matrix is the same; see :func:`_unit_pair`)."""
    xp = backend_of(s).xp
    s, y = _unit_pair(s, y, xp)
    rho = _safe_reciprocal(_dot(s, y, xp), xp)
    keep = rho > 0

    def shift(old: Array, new: Array) -> Array:
        pushed = xp.concat([old[1:], new[None]], axis=0)
        return xp.where(keep, pushed, old)

    return LBFGSMemory(shift(mem.s, s), shift(mem.y, y), shift(mem.rho, rho))


def lbfgs_apply(mem: LBFGSMemory, v: Array, h0: Any) -> Array:
    """H v for the L-BFGS matrix H of the pairs in ``mem`` over H_0 = ``h0`` I (the two-loop
    recursion, Nocedal and Wright Algorithm 7.4):

        q = v;  for i = newest .. oldest:  alpha_i = rho_i s_i^T q,  q -= alpha_i y_i
        r = h0 q;  for i = oldest .. newest:  beta = rho_i y_i^T r,  r += (alpha_i - beta) s_i

    ``v`` is a vector (n,) or a matrix (n, k), whose columns are multiplied at once. H equals
    the dense matrix built from H_0 by :func:`bfgs_inverse_update` with the same pairs, oldest
    first. The loops run through the backend's ``fori_loop`` over all slots (empty ones have
    rho = 0 and change nothing), so the work is fixed and the function compiles."""
    backend = backend_of(v)
    xp = backend.xp
    memory = mem.rho.shape[0]
    matrix = v.ndim == 2
    q = v if matrix else v[:, None]
    rho_s = mem.rho[:, None] * mem.s  # rows rho_i s_i and rho_i y_i, formed once
    rho_y = mem.rho[:, None] * mem.y
    if backend.is_concrete(v):
        r = _two_loop_eager(rho_s, rho_y, mem.s, mem.y, q, h0)
        return r if matrix else r[:, 0]

    def first(j: int, carry: tuple[Array, Array]) -> tuple[Array, Array]:
        q, alphas = carry
        i = memory - 1 - j
        alpha = rho_s[i] @ q  # (k,)
        q = q - mem.y[i][:, None] * alpha[None, :]
        alphas = _set_row(alphas, i, alpha, backend)
        return q, alphas

    alphas0 = xp.zeros((memory, q.shape[1]), dtype=q.dtype, device=backend.device(q))
    q, alphas = backend.fori_loop(0, memory, first, (q, alphas0))
    r = h0 * q

    def second(i: int, r: Array) -> Array:
        beta = rho_y[i] @ r
        return r + mem.s[i][:, None] * (alphas[i] - beta)[None, :]

    r = backend.fori_loop(0, memory, second, r)
    return r if matrix else r[:, 0]


def _two_loop_eager(rho_s: Array, rho_y: Array, s: Array, y: Array, q: Array, h0: Any
                    ) -> Array:
    """The two-loop recursion on eager arrays: a Python loop (JAX's eager ``fori_loop`` would
    compile its body at every call) with the alphas in a list and the rows split once, so each
    pair costs four array operations. Empty slots (rho = 0) give alpha = beta = 0 and change
    nothing, as in the traced loop."""
    rows_rs, rows_ry = list(rho_s), list(rho_y)
    rows_s, rows_y = list(s), list(y)
    alphas: list[Array] = [None] * len(rows_s)  # type: ignore[list-item]
    for i in reversed(range(len(rows_s))):
        alphas[i] = rows_rs[i] @ q
        q = q - rows_y[i][:, None] * alphas[i][None, :]
    r = h0 * q
    for i in range(len(rows_s)):
        r = r + rows_s[i][:, None] * (alphas[i] - rows_ry[i] @ r)[None, :]
    return r


def lbfgs_apply_compact(mem: LBFGSMemory, v: Array, h0: Any) -> Array:
    """H v for the L-BFGS matrix of :func:`lbfgs_apply`, through the compact representation
    (R. Byrd, J. Nocedal and R. Schnabel, "Representations of quasi-Newton matrices and their
    use in limited memory methods", Math. Prog. 63, 1994, eq. 2.6; the thesis's "non-loop"
    implementation, sec. 3.4.3). With the pairs as the rows of S and Y (oldest first),
    R = triu(S Y^T) (R_ij = s_i^T y_j, i <= j), D = diag(s_i^T y_i) and H_0 = h0 I:

        H = h0 I + [S^T  h0 Y^T] [[R^{-T} (D + h0 Y Y^T) R^{-1}, -R^{-T}], [-R^{-1}, 0]] [S; Y],

    applied as u = R^{-1} S v, t = R^{-T} ((D + h0 Y Y^T) u - h0 Y v),
    H v = h0 v + S^T t - h0 Y^T u: two triangular solves of the memory's size and six
    products with S or Y, so a matrix v costs O(memory n k) in a few large operations instead
    of 4 memory small ones. An empty slot (s = y = 0) gets R_ii = 1, which leaves its u_i = 0
    and its row out of the product.

    For a matrix v (n x k) the products with S and Y cost about 6 memory n k multiply-adds;
    when forming H itself (the same products on the n x n identity, 6 memory n^2) and then
    H v (n^2 k) is cheaper, as for K-BFGS(L)'s H_G (n = d_out) on a wide layer, that is what
    is done."""
    backend = backend_of(v)
    xp = backend.xp
    matrix = v.ndim == 2
    n, memory = v.shape[0], mem.s.shape[0]
    if matrix and 6 * memory * n * n + n * n * v.shape[1] < 6 * memory * n * v.shape[1]:
        eye = xp.eye(n, dtype=v.dtype, device=backend.device(v))
        return lbfgs_apply_compact(mem, eye, h0) @ v
    q = v if matrix else v[:, None]
    s, y = mem.s, mem.y
    filled = mem.rho > 0
    sy = s @ xp.matrix_transpose(y)  # (memory, memory), entries s_i^T y_j
    eye = xp.eye(sy.shape[0], dtype=sy.dtype, device=backend.device(sy))
    diagonal = xp.linalg.diagonal(sy)
    r = xp.triu(sy) + eye * (xp.where(filled, diagonal, xp.ones_like(diagonal))
                             - diagonal)[None, :]
    d = xp.where(filled, diagonal, xp.zeros_like(diagonal))
    sv, yv = s @ q, y @ q
    u = backend.solve_triangular(r, sv, lower=False)
    rhs = d[:, None] * u + h0 * (y @ (xp.matrix_transpose(y) @ u)) - h0 * yv
    t = backend.solve_triangular(xp.matrix_transpose(r), rhs, lower=True)
    out = h0 * q + xp.matrix_transpose(s) @ t - h0 * (xp.matrix_transpose(y) @ u)
    return out if matrix else out[:, 0]


def _set_row(a: Array, i: Any, row: Array, backend: Any) -> Array:
    """``a`` with row ``i`` replaced, functionally and with ``i`` possibly traced (a masked
    select: O(memory k) per call, which the recursion's O(n k) per pair dominates unless
    memory > n)."""
    xp = backend.xp
    mask = xp.arange(a.shape[0], device=backend.device(a)) == i
    return xp.where(mask[:, None], row[None, :], a)
