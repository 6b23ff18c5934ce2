"""Conjugate gradients for A x = b with A symmetric positive (semi-)definite.

``cg`` works on parameter trees, takes a preconditioner M (~ A^{-1}) and a projector P (a
symmetric idempotent operator onto the feasible subspace, for constrained systems such as the dual
Gauss-Newton system, where every iterate must satisfy 1^T beta = 0). The preconditioned, projected
residual is z = P M P r. Each iteration, with r the residual and p the search direction:

    alpha = <r, z> / <p, A p>,   x += alpha p,   r -= alpha A p,
    z' = P M P r,                beta = <r, z'> / <r_old, z_old>,   p = z' + beta p.

Guards, never a division by (nearly) zero: when <p, A p> <= eps ||p||^2 the step is not taken and
CG stops with reason ``"nonpositive_curvature"`` (the Hessian-free convention: the last iterate is
returned); a non-finite or negative <r, z> (an indefinite preconditioner) stops it with
``"breakdown"``. Both modes compile under ``jax.jit``: ``tol`` (relative to ||P b||, with an
absolute floor ``atol``) loops with ``while_loop``; ``tol=None`` runs exactly ``maxiter``
iterations (``fori_loop`` on JAX, so it is reverse-differentiable there) unless a guard fires.

``save_at`` (static iteration counts) keeps copies of the iterate x after those many iterations in
``info.saved``, one tree per entry, for Hessian-free CG backtracking; an entry past the last
iteration taken holds the final iterate, and 0 holds the initial guess. Under ``jax.jit`` each copy
is a ``where`` on the iteration counter, so the loop's carry keeps a static shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from .._pytree import tree_map
from ..backends import backend_of
from ..errors import MixedBackendError, ShapeError
from ..tree import axpy, vdot
from .operator import LinearOperator
from .structure import Structure

Tree = Any

#: meaning of ``CGInfo.status``
REASONS = ("maxiter", "converged", "nonpositive_curvature", "breakdown")
MAXITER, CONVERGED, NONPOSITIVE_CURVATURE, BREAKDOWN = range(4)


class CGInfo(NamedTuple):
    """What CG did: iterations taken, final residual norm ||P r||, why it stopped,
    (with ``history=True``) the residual norm after each iteration (NaN past the last), and
    (with ``save_at``) the iterates after the requested iteration counts."""

    iterations: Any
    residual_norm: Any
    status: Any
    history: Any = None
    saved: tuple = ()

    @property
    def reason(self) -> str:
        """The stopping reason as text (needs concrete values: not inside ``jax.jit``)."""
        return REASONS[int(self.status)]

    @property
    def converged(self) -> bool:
        return int(self.status) == CONVERGED


def _as_function(op: Any) -> Callable[[Tree], Tree] | None:
    if op is None:
        return None
    if isinstance(op, LinearOperator):
        return op.matvec
    if callable(op):
        return op
    raise TypeError(f"expected a LinearOperator or a function, got {type(op).__name__}")


def cg(
    op: LinearOperator | Callable[[Tree], Tree],
    b: Tree,
    x0: Tree = None,
    M: LinearOperator | Callable[[Tree], Tree] | None = None,
    projector: LinearOperator | Callable[[Tree], Tree] | None = None,
    *,
    maxiter: int | None = None,
    tol: float | None = 1e-5,
    atol: float = 0.0,
    history: bool = False,
    save_at: tuple[int, ...] = (),
) -> tuple[Tree, CGInfo]:
    """Solve A x = b by (preconditioned, projected) conjugate gradients.

    Returns ``(x, info)``; see :class:`CGInfo`. ``x0`` must be feasible (P x0 = x0) when a
    projector is given; the default is 0. ``maxiter`` defaults to 10 n (rounding makes exact
    arithmetic's n iterations too few on ill-conditioned systems). ``save_at``: iteration
    counts (Python ints >= 0) whose iterates are returned in ``info.saved``.
    """
    backend = backend_of(b, x0)
    xp = backend.xp
    b_struct = Structure.of(b)
    if isinstance(op, LinearOperator):
        if not op.is_square:
            raise ShapeError(f"cg needs a square operator, got {op!r}")
        if op.backend.name != backend.name:
            raise MixedBackendError(
                f"the operator holds {op.backend.name} arrays but b is a {backend.name} array; "
                "build the operator and the right-hand side in one framework"
            )
        op.in_structure.check(b, "right-hand side b")
    if x0 is not None:
        b_struct.check(x0, "initial guess x0")
    if maxiter is None:
        maxiter = 10 * b_struct.size
    maxiter = int(maxiter)
    save_at = tuple(int(s) for s in save_at)
    if any(s < 0 for s in save_at):
        raise ValueError(f"save_at needs iteration counts >= 0, got {save_at}")
    matvec = _as_function(op)
    precond = _as_function(M)
    project = _as_function(projector)
    where = xp.where

    def preconditioned(r: Tree) -> tuple[Tree, Any]:
        """z = P M P r and the residual norm ||P r||."""
        pr = r if project is None else project(r)
        z = pr
        if precond is not None:
            z = precond(pr)
            if project is not None:
                z = project(z)
        return z, xp.sqrt(vdot(pr, pr))

    x = tree_map(xp.zeros_like, b) if x0 is None else x0
    r = b if x0 is None else tree_map(lambda bi, ai: bi - ai, b, matvec(x0))
    z, res = preconditioned(r)
    rz = vdot(r, z)
    pb = b if project is None else project(b)
    b_norm = xp.sqrt(vdot(pb, pb))
    threshold = atol if tol is None else xp.maximum(tol * b_norm, atol)
    eps = xp.finfo(res.dtype).eps
    device = backend.device(res)
    k0 = xp.asarray(0, device=device)

    def code(c: int) -> Any:
        return xp.asarray(c, dtype=k0.dtype, device=device)

    status0 = where(res <= threshold, code(CONVERGED), code(MAXITER))
    hist0 = None
    if history:
        steps = xp.arange(maxiter + 1, device=device)
        hist0 = where(steps == 0, res, xp.full((maxiter + 1,), float("nan"), dtype=res.dtype,
                                               device=device))

    def body(state: tuple) -> tuple:
        k, x, r, z, p, rz, res, status, hist, saved = state
        active = status == MAXITER
        ap = matvec(p)
        pap = vdot(p, ap)
        curved = pap > eps * vdot(p, p)
        alpha = where(curved, rz / where(curved, pap, 1.0), 0.0)
        x_new = axpy(alpha, p, x)
        r_new = axpy(-alpha, ap, r)
        z_new, res_new = preconditioned(r_new)
        rz_new = vdot(r_new, z_new)
        ok = xp.logical_and(xp.isfinite(rz_new), rz_new >= 0)
        beta = where(rz > 0, rz_new / where(rz > 0, rz, 1.0), 0.0)
        p_new = axpy(beta, p, z_new)
        new_status = where(
            xp.logical_not(curved),
            code(NONPOSITIVE_CURVATURE),
            where(
                xp.logical_not(ok),
                code(BREAKDOWN),
                where(res_new <= threshold, code(CONVERGED), code(MAXITER)),
            ),
        )
        step = xp.logical_and(active, xp.logical_and(curved, ok))

        def pick(new: Any, old: Any) -> Any:
            return tree_map(lambda a, c: where(step, a, c), new, old)

        k_next = k + xp.astype(step, k.dtype)
        if hist is not None:
            hist = where(xp.logical_and(step, steps == k_next), res_new, hist)
        status = where(active, new_status, status)
        saved = tuple(
            tree_map(lambda a, c, s=s: where(xp.logical_and(step, k_next == s), a, c), x_new, old)
            for s, old in zip(save_at, saved)
        )
        return (k_next, pick(x_new, x), pick(r_new, r), pick(z_new, z), pick(p_new, p),
                where(step, rz_new, rz), where(step, res_new, res), status, hist, saved)

    def running(state: tuple) -> Any:
        k, status = state[0], state[7]
        return xp.logical_and(k < maxiter, status == MAXITER)

    saved0 = tuple(x for _ in save_at)
    state = (k0, x, r, z, z, rz, res, status0, hist0, saved0)
    if tol is None and backend.has_jit:
        state = backend.fori_loop(0, maxiter, lambda i, s: body(s), state)
    else:
        state = backend.while_loop(running, body, state)
    k, x, _, _, _, _, res, status, hist, saved = state
    # counts never reached (CG stopped or maxiter is smaller) hold the final iterate
    saved = tuple(tree_map(lambda a, c, s=s: where(k < s, a, c), x, old)
                  for s, old in zip(save_at, saved))
    return x, CGInfo(k, res, status, hist, saved)
