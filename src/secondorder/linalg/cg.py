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
iterations (``fori_loop`` on JAX, so it is reverse-differentiable there) unless a guard fires or
the residual falls under ``atol``. With ``tol=None`` and ``atol=0`` the loop is a ``fori_loop`` on
every backend: eager frameworks run it as a Python loop that never reads a value back to the host
(no device synchronisation per iteration), and iterations after a guard fires change nothing that
is returned; with a residual threshold, eager frameworks check it after every iteration and leave
the loop there.

Speed: the tree is flattened once per solve and the iteration runs on lists of leaves (the
operator, preconditioner and projector get trees: one unflatten and flatten per product); the
placement of b, x0 and operators is checked once on entry, not per iteration; without a
preconditioner or projector z = r, so <r, z> is the squared residual norm computed once.

``save_at`` (static iteration counts) keeps copies of the iterate x after those many iterations in
``info.saved``, one tree per entry, for Hessian-free CG backtracking; an entry past the last
iteration taken holds the final iterate, and 0 holds the initial guess. Under ``jax.jit`` each copy
is a ``where`` on the iteration counter, so the loop's carry keeps a static shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from .._pytree import check_same_structure, flatten, unflatten
from ..backends import backend_of
from ..errors import MixedBackendError, ShapeError
from ..tree import _axpy_leaves as _axpy
from ..tree import _dot_leaves as _dot
from .operator import LinearOperator
from .structure import Structure

Tree = Any

#: meaning of ``CGInfo.status``
REASONS = ("maxiter", "converged", "nonpositive_curvature", "breakdown")
MAXITER, CONVERGED, NONPOSITIVE_CURVATURE, BREAKDOWN = range(4)  # cg relies on the first two


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


Leaves = list[Any]


def _as_function(op: Any, leaves: Leaves, what: str) -> Callable[[Tree], Tree] | None:
    """The product of ``op`` as a function of trees; a LinearOperator's structure and placement
    are checked here once (against the leaves of b), so the loop calls its unchecked product."""
    if op is None:
        return None
    if isinstance(op, LinearOperator):
        op._check_placement(leaves, what)
        return op._matvec
    if callable(op):
        return op
    raise TypeError(f"expected a LinearOperator or a function, got {type(op).__name__}")


def _on_leaves(fn: Callable[[Tree], Tree] | None, treedef: Any
               ) -> Callable[[Leaves], Leaves] | None:
    """``fn`` on lists of leaves: unflatten, apply, flatten (a result of another structure
    raises :class:`StructureError`)."""
    if fn is None:
        return None

    def apply(leaves: Leaves) -> Leaves:
        out, out_def = flatten(fn(unflatten(treedef, leaves)))
        if out_def is not treedef:
            check_same_structure(treedef, out_def)
        return out

    return apply


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
    backend = backend_of(b, x0)  # placement of the data, checked once per solve
    xp = backend.xp
    b_struct = Structure.of(b)
    b_leaves, treedef = flatten(b)
    if isinstance(op, LinearOperator):
        if not op.is_square:
            raise ShapeError(f"cg needs a square operator, got {op!r}")
        if op.backend.name != backend.name:
            raise MixedBackendError(
                f"the operator holds {op.backend.name} arrays but b is a {backend.name} array; "
                "build the operator and the right-hand side in one framework"
            )
        op.in_structure.check(b, "right-hand side b")
    x0_leaves = None if x0 is None else b_struct.check(x0, "initial guess x0")
    if maxiter is None:
        maxiter = 10 * b_struct.size
    maxiter = int(maxiter)
    save_at = tuple(int(s) for s in save_at)
    if any(s < 0 for s in save_at):
        raise ValueError(f"save_at needs iteration counts >= 0, got {save_at}")
    matvec = _on_leaves(_as_function(op, b_leaves, "right-hand side b"), treedef)
    precond = _on_leaves(_as_function(M, b_leaves, "right-hand side b"), treedef)
    project = _on_leaves(_as_function(projector, b_leaves, "right-hand side b"), treedef)
    where = xp.where
    # how x follows the iterations (see body): "select" in a traced fixed-length loop, "mask" in
    # an eager one (no host synchronisation), "defer" in a loop that stops at a stop
    if tol is None and backend.has_jit:
        x_update = "select"
    elif tol is None and isinstance(atol, int | float) and atol == 0:
        x_update = "mask"
    else:
        x_update = "defer"
    # without a preconditioner, ||p||^2 for the curvature guard follows the CG recurrence
    # ||p_k||^2 = <r_k, z_k> + beta_k^2 ||p_{k-1}||^2 (r_k is orthogonal to p_{k-1}; P r_k too)
    track_pp = precond is None

    def preconditioned(r: Leaves) -> tuple[Leaves, Any, Any]:
        """z = P M P r, <r, z> and the residual norm ||P r||."""
        pr = r if project is None else project(r)
        rr = _dot(xp, pr, pr)
        if precond is None and project is None:
            return pr, rr, xp.sqrt(rr)  # z = r: <r, z> is ||r||^2
        z = pr
        if precond is not None:
            z = precond(pr)
            if project is not None:
                z = project(z)
        return z, _dot(xp, r, z), xp.sqrt(rr)

    if x0_leaves is None:
        x, r = [xp.zeros_like(a) for a in b_leaves], b_leaves
    else:
        x = x0_leaves
        r = [bi - ai for bi, ai in zip(b_leaves, matvec(x0_leaves))]
    z, rz, res = preconditioned(r)
    pb = b_leaves if project is None else project(b_leaves)
    b_norm = xp.sqrt(_dot(xp, pb, pb))
    threshold = atol if tol is None else xp.maximum(tol * b_norm, atol)
    eps = xp.finfo(res.dtype).eps
    device = backend.device(res)
    k0 = xp.asarray(0, device=device)
    codes = [xp.asarray(c, dtype=k0.dtype, device=device) for c in range(len(REASONS))]

    status0 = where(res <= threshold, codes[CONVERGED], codes[MAXITER])
    hist0 = None
    if history:
        steps = xp.arange(maxiter + 1, device=device)
        hist0 = where(steps == 0, res, xp.full((maxiter + 1,), float("nan"), dtype=res.dtype,
                                               device=device))

    def body(state: tuple, x_update: str) -> tuple:
        # Only x, res, k, status, hist and saved are returned, and an iteration that takes no
        # step ends the run (status leaves MAXITER for good), so r, z, p and <r, z> need no
        # selection: after such an iteration they are never used for anything returned. x:
        #   "defer"  the loop ends after the first iteration without a step, so x_new is
        #            carried with the x before it and chosen once after the loop;
        #   "select" a fixed loop runs on: x is kept by a select per leaf (fused when traced);
        #   "mask"   x += where(step, alpha, 0) p, exact while p is finite; when a guard has
        #            fired (p may not be), cg re-runs the solve with "defer" (one check at the end).
        k, x, x_prev, r, z, p, rz, pp, res, status, hist, saved, last_step = state
        active = status == codes[MAXITER]
        ap = matvec(p)
        pap = _dot(xp, p, ap)
        curved = pap > eps * (pp if track_pp else _dot(xp, p, p))
        alpha = where(curved, rz / where(curved, pap, 1.0), 0.0)
        if x_update != "mask":
            x_new = _axpy(alpha, p, x)
        r_new = [b - alpha * a for a, b in zip(ap, r)]  # the bits of axpy(-alpha, ap, r)
        z_new, rz_new, res_new = preconditioned(r_new)
        ok = xp.isfinite(rz_new) & (rz_new >= 0)
        positive = rz > 0
        beta = where(positive, rz_new / where(positive, rz, 1.0), 0.0)
        p_new = _axpy(beta, p, z_new)
        # MAXITER = 0, CONVERGED = 1: the comparison as an integer is the code of a good step
        new_status = where(curved, where(ok, xp.astype(res_new <= threshold, k.dtype),
                                         codes[BREAKDOWN]), codes[NONPOSITIVE_CURVATURE])
        step = active & curved & ok
        if x_update == "mask":
            x_new, x = _axpy(where(step, alpha, 0.0), p, x), None
        elif x_update == "select":
            x_new, x = [where(step, a, c) for a, c in zip(x_new, x)], None
        k_next = k + xp.astype(step, k.dtype)
        if hist is not None:
            hist = where(step & (steps == k_next), res_new, hist)
        saved = tuple([where(step & (k_next == s), a, c) for a, c in zip(x_new, old)]
                      for s, old in zip(save_at, saved))
        pp_new = rz_new + beta * beta * pp if track_pp else None
        return (k_next, x_new, x, r_new, z_new, p_new, rz_new, pp_new,
                where(step, res_new, res), where(active, new_status, status), hist, saved, step)

    def running(state: tuple) -> Any:
        k, status = state[0], state[9]
        return (k < maxiter) & (status == codes[MAXITER])

    def solve(x_update: str) -> tuple:
        pp0 = _dot(xp, z, z) if track_pp else None
        state = (k0, x, x if x_update == "defer" else None, r, z, z, rz, pp0, res, status0,
                 hist0, tuple(x for _ in save_at), xp.asarray(True, device=device))
        if x_update == "defer":
            state = backend.while_loop(running, lambda s: body(s, x_update), state)
            last, prev, step = state[1], state[2], state[12]
            return (*state[:1], [where(step, a, c) for a, c in zip(last, prev)], *state[2:])
        return backend.fori_loop(0, maxiter, lambda i, s: body(s, x_update), state)

    state = solve(x_update)
    if x_update == "mask" and bool(state[9] >= NONPOSITIVE_CURVATURE):
        state = solve("defer")  # a guard fired: the exact iterate where it did
    k, x, _, _, _, _, _, _, res, status, hist, saved, _ = state
    # counts never reached (CG stopped or maxiter is smaller) hold the final iterate
    saved = tuple(unflatten(treedef, [where(k < s, a, c) for a, c in zip(x, old)])
                  for s, old in zip(save_at, saved))
    return unflatten(treedef, x), CGInfo(k, res, status, hist, saved)
