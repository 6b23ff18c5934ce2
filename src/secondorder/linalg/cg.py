"""Conjugate gradients for A x = b with A symmetric positive (semi-)definite.

``cg`` works on parameter trees, takes a preconditioner M (~ A^{-1}) and a projector P (a
symmetric idempotent operator onto the feasible subspace, for constrained systems such as the dual
Gauss-Newton system, where every iterate must satisfy 1^T beta = 0). The preconditioned, projected
residual is z = P M P r. Each iteration, with r the residual and p the search direction:

    alpha = <r, z> / <p, A p>,   x += alpha p,   r -= alpha A p,
    z' = P M P r,                beta = <r, z'> / <r_old, z_old>,   p = z' + beta p.

Guards, never a division by (nearly) zero: when <p, A p> <= eps ||p||^2 rho, with rho the largest
Rayleigh quotient <p, A p> / ||p||^2 of the earlier iterations (0 before the first, so the first
step only needs <p, A p> > 0), the step is not taken and CG stops with reason
``"nonpositive_curvature"`` (the Hessian-free convention: the last iterate is returned); a negative
<r, z> (an indefinite preconditioner) stops it with ``"breakdown"``. Scaling A by any factor
leaves these decisions unchanged.

Non-finite values: CG never reports ``"converged"`` (or a curvature verdict) on NaN or inf. A
right-hand side, initial residual, operator, preconditioner or projector output that is not finite
stops it with reason ``"non_finite"``; the check rides on numbers the iteration computes anyway
(<p, A p> and <r, z> are NaN or inf exactly when a product or a coefficient is), so it costs no
extra pass over the vectors and no host synchronisation. An iterate that overflows when unscaled
(below) is also reported ``"non_finite"``.

Scale: the system is solved as A y = b / s, x = s y, with s the power of two nearest below
max |b_i|. Multiplying by a power of two is exact, so on ordinary systems every number CG computes
is the one the unscaled iteration would compute (the same bits), while systems at 1e+-300, whose
squared norms would underflow or overflow, are solved (or, when x itself is out of range, reported
``"non_finite"``). Only b is scaled, not A: when A itself is at 1e-300, a fixed-length run that
goes on after the residual has reached rounding level can see <p, A p> underflow to 0 and stop with
``"nonpositive_curvature"``, returning the converged iterate. ``atol``, the residual norms, the
history and the saved iterates are given in
the units of b.

Input checks (before any work): ``maxiter`` and ``save_at`` must be integers >= 0 and ``tol`` /
``atol`` (when Python numbers; NumPy scalars and arrays are taken as data) finite and >= 0, else
:class:`~secondorder.errors.HyperparameterError`; b must have a real floating dtype and x0, a
:class:`LinearOperator` and every product the same dtype as b, else
:class:`~secondorder.errors.DTypeError` (convert with ``astype`` first; nothing is promoted).

Both modes compile under ``jax.jit``: ``tol`` (relative to ||P b||, with an
absolute floor ``atol``) loops with ``while_loop``; ``tol=None`` runs exactly ``maxiter``
iterations (``fori_loop`` on JAX, so it is reverse-differentiable there) unless a guard fires or
the residual falls under ``atol``. With ``tol=None`` and ``atol=0`` the loop is a ``fori_loop`` on
every backend: eager frameworks on a device (CUDA) run it as a Python loop that never reads a value
back to the host (no device synchronisation per iteration), and iterations after a guard fires
change nothing that is returned; with a residual threshold, eager frameworks check it after every
iteration and leave the loop there. Eager arrays in host memory (NumPy, CPU torch; see
:meth:`Backend.host_scalar`) run the same iteration with its scalar bookkeeping (the guards,
||p||^2, rho, the status) on NumPy scalars of the array dtype, read with a cheap copy, and leave
the loop at the first iteration without a step: the same array operations on the leaves and the
same decisions, so the same bits, at two reads per iteration instead of some thirty operations
on 0-d arrays.

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

import math
import numbers
import operator as _operator
from collections.abc import Callable
from functools import reduce
from typing import Any, NamedTuple

import numpy as np

from .._pytree import check_same_structure, flatten, unflatten
from ..backends import backend_of
from ..errors import DTypeError, HyperparameterError, MixedBackendError, ShapeError
from ..tree import _axpy_leaves as _axpy
from ..tree import _dot_leaves as _dot
from .operator import LinearOperator
from .structure import Structure

Tree = Any

#: meaning of ``CGInfo.status``
REASONS = ("maxiter", "converged", "nonpositive_curvature", "breakdown", "non_finite")
#: cg relies on the first two; every code >= NONPOSITIVE_CURVATURE is a guard that stopped it
MAXITER, CONVERGED, NONPOSITIVE_CURVATURE, BREAKDOWN, NON_FINITE = range(5)


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


def _on_leaves(fn: Callable[[Tree], Tree] | None, treedef: Any, dtypes: list[Any], what: str
               ) -> Callable[[Leaves], Leaves] | None:
    """``fn`` on lists of leaves: unflatten, apply, flatten (a result of another structure
    raises :class:`StructureError`, of another dtype than b :class:`DTypeError`)."""
    if fn is None:
        return None

    def apply(leaves: Leaves) -> Leaves:
        out, out_def = flatten(fn(unflatten(treedef, leaves)))
        if out_def is not treedef:
            check_same_structure(treedef, out_def)
        for a, dtype in zip(out, dtypes):
            if a.dtype != dtype:
                raise DTypeError(
                    f"the {what} returned {a.dtype} for a {dtype} vector; cg runs in the dtype "
                    "of b: build the operator in that dtype or convert b with astype"
                )
        return out

    return apply


def _count(value: Any, what: str) -> int:
    """A Python int >= 0 from an integer-valued number, else :class:`HyperparameterError`."""
    try:
        out = _operator.index(value)
    except TypeError:
        ok = isinstance(value, numbers.Real) and float(value).is_integer()
        if not ok:
            raise HyperparameterError(f"{what} must be an integer >= 0, got {value!r}") from None
        out = int(value)
    if isinstance(value, bool) or out < 0:
        raise HyperparameterError(f"{what} must be an integer >= 0, got {value!r}")
    return out


def _check_tolerance(value: Any, what: str) -> None:
    """Finite and >= 0 for Python numbers, the caller's settings. NumPy scalars and arrays
    (possibly traced) are data computed by the caller, e.g. ``atol = tol * ||g||`` from a
    gradient that may be NaN: they are not read, and a non-finite one shows in the report."""
    if type(value) in (int, float) and not (float(value) >= 0 and math.isfinite(value)):
        raise HyperparameterError(f"{what} must be a finite number >= 0, got {value!r}")


def _check_dtypes(xp: Any, b_leaves: Leaves, x0_leaves: Leaves | None, op: Any) -> list[Any]:
    """The dtype of each leaf of b, after checking that it is real floating and that x0 and a
    LinearOperator have the same (:class:`DTypeError` otherwise)."""
    dtypes = [a.dtype for a in b_leaves]
    for i, dtype in enumerate(dtypes):
        if not xp.isdtype(dtype, "real floating"):
            leaf = "" if len(dtypes) == 1 else f" (leaf {i})"
            raise DTypeError(
                f"cg needs a real floating right-hand side, got b{leaf} of dtype {dtype}; "
                "convert it with astype(float64) or astype(float32)"
            )
    for i, (a, dtype) in enumerate(zip(x0_leaves or (), dtypes)):
        if a.dtype != dtype:
            raise DTypeError(f"the initial guess x0 (leaf {i}) has dtype {a.dtype} but b has "
                             f"{dtype}; convert one of them with astype")
    if isinstance(op, LinearOperator) and op.dtype is not None and op.dtype != dtypes[0]:
        raise DTypeError(f"the operator holds {op.dtype} arrays but b is {dtypes[0]}; build "
                         "them in one dtype (astype) before calling cg")
    return dtypes


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
    maxiter = 10 * b_struct.size if maxiter is None else _count(maxiter, "cg's maxiter")
    if tol is not None:
        _check_tolerance(tol, "cg's tol")
    _check_tolerance(atol, "cg's atol")
    save_at = tuple(_count(s, "each of cg's save_at") for s in save_at)
    dtypes = _check_dtypes(xp, b_leaves, x0_leaves, op)
    matvec = _on_leaves(_as_function(op, b_leaves, "right-hand side b"), treedef, dtypes,
                        "operator")
    precond = _on_leaves(_as_function(M, b_leaves, "right-hand side b"), treedef, dtypes,
                         "preconditioner M")
    project = _on_leaves(_as_function(projector, b_leaves, "right-hand side b"), treedef, dtypes,
                         "projector")
    where = backend.where
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

    # the scale s: the power of two at or below max |b_i| (1 when b is 0 or not finite), so that
    # b / s and s y are exact and the iteration's numbers are the unscaled ones, times powers of 2
    sized = [a for a in b_leaves if math.prod(a.shape) > 0]
    scale = None
    if sized:
        big = reduce(xp.maximum, [xp.max(xp.abs(a)) for a in sized])
        usable = xp.isfinite(big) & (big > 0)
        scale = 2.0 ** xp.floor(xp.log2(where(usable, big, 1.0)))
    leaf_scales = [scale if scale is None or scale.dtype == d else xp.astype(scale, d)
                   for d in dtypes]

    def scaled(leaves: Leaves, up: bool) -> Leaves:
        if scale is None:
            return leaves
        return [a * s if up else a / s for a, s in zip(leaves, leaf_scales)]

    b_leaves = scaled(b_leaves, False)
    if x0_leaves is None:
        x, r = [xp.zeros_like(a) for a in b_leaves], b_leaves
    else:
        x = scaled(x0_leaves, False)
        r = [bi - ai for bi, ai in zip(b_leaves, matvec(x))]
    z, rz, res = preconditioned(r)
    pb = b_leaves if project is None else project(b_leaves)
    b_norm = xp.sqrt(_dot(xp, pb, pb))
    if scale is not None and not (isinstance(atol, int | float) and atol == 0):
        atol = atol / xp.astype(scale, res.dtype)
    threshold = atol if tol is None else xp.maximum(tol * b_norm, atol)
    eps = xp.finfo(res.dtype).eps
    device = backend.device(res)
    k0 = xp.asarray(0, device=device)
    codes = [xp.asarray(c, dtype=k0.dtype, device=device) for c in range(len(REASONS))]

    status0 = where(xp.isfinite(b_norm + res + rz),
                    where(res <= threshold, codes[CONVERGED], codes[MAXITER]), codes[NON_FINITE])
    hist0 = None
    if history:
        steps = xp.arange(maxiter + 1, device=device)
        hist0 = where(steps == 0, res, xp.full((maxiter + 1,), float("nan"), dtype=res.dtype,
                                               device=device))

    def body(state: tuple, x_update: str) -> tuple:
        # Only x, res, k, status, hist and saved are returned, and an iteration that takes no
        # step ends the run (status leaves MAXITER for good), so r, z, p, <r, z> and rho need no
        # selection: after such an iteration they are never used for anything returned. x:
        #   "defer"  the loop ends after the first iteration without a step, so x_new is
        #            carried with the x before it and chosen once after the loop;
        #   "select" a fixed loop runs on: x is kept by a select per leaf (fused when traced);
        #   "mask"   x += where(step, alpha, 0) p, exact while p is finite; when a guard has
        #            fired (p may not be), cg re-runs the solve with "defer" (one check at the end).
        k, x, x_prev, r, z, p, rz, pp, rho, res, status, hist, saved, last_step = state
        active = status == codes[MAXITER]
        ap = matvec(p)
        pap = _dot(xp, p, ap)
        if not track_pp:
            pp = _dot(xp, p, p)
        # rho: the largest earlier Rayleigh quotient, so the guard is relative to the scale of A
        curved = pap > eps * (pp * rho)
        alpha = where(curved, rz / where(curved, pap, 1.0), 0.0)
        if x_update != "mask":
            x_new = _axpy(alpha, p, x)
        r_new = [b - alpha * a for a, b in zip(ap, r)]  # the bits of axpy(-alpha, ap, r)
        z_new, rz_new, res_new = preconditioned(r_new)
        # <p, A p> is NaN or inf when A p is not finite; <r', z'> when alpha, r' or z' is not
        finite = xp.isfinite(pap + rz_new)
        ok = rz_new >= 0
        positive = rz > 0
        beta = where(positive, rz_new / where(positive, rz, 1.0), 0.0)
        p_new = _axpy(beta, p, z_new)
        # MAXITER = 0, CONVERGED = 1: the comparison as an integer is the code of a good step
        new_status = where(finite, where(curved, where(ok, xp.astype(res_new <= threshold,
                                                                      k.dtype),
                                                       codes[BREAKDOWN]),
                                         codes[NONPOSITIVE_CURVATURE]), codes[NON_FINITE])
        step = active & curved & ok & finite
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
        rho_new = xp.maximum(rho, pap / pp)
        return (k_next, x_new, x, r_new, z_new, p_new, rz_new, pp_new, rho_new,
                where(step, res_new, res), where(active, new_status, status), hist, saved, step)

    def running(state: tuple) -> Any:
        k, status = state[0], state[10]
        return (k < maxiter) & (status == codes[MAXITER])

    def solve(x_update: str) -> tuple:
        pp0 = _dot(xp, z, z) if track_pp else None
        state = (k0, x, x if x_update == "defer" else None, r, z, z, rz, pp0, xp.zeros_like(res),
                 res, status0, hist0, tuple(x for _ in save_at), xp.asarray(True, device=device))
        if x_update == "defer":
            state = backend.while_loop(running, lambda s: body(s, x_update), state)
            last, prev, step = state[1], state[2], state[13]
            return (*state[:1], [where(step, a, c) for a, c in zip(last, prev)], *state[2:])
        return backend.fori_loop(0, maxiter, lambda i, s: body(s, x_update), state)

    def solve_on_host() -> tuple | None:
        """The iteration of ``body`` with its scalar bookkeeping on host scalars (see
        :meth:`Backend.host_scalar`): the same array operations on the leaves, the same
        decisions from the same numbers rounded in the same dtype, a Python loop that leaves at
        the first iteration without a step. None (nothing read) where a value is not on the host."""
        read = backend.host_scalar

        def quiet() -> Any:  # NumPy scalars: inf and NaN without warnings, as arrays have them
            return np.errstate(all="ignore")

        rz_h, res_h, bn_h = read(rz), read(res), read(b_norm)
        pp_h = read(_dot(xp, z, z)) if track_pp else None
        if rz_h is None or res_h is None or bn_h is None or (track_pp and pp_h is None):
            return None
        cast = type(res_h)
        # a comparison with a Python number casts it to the array's dtype; arrays compare exactly
        thr_h = cast(threshold) if type(threshold) in (int, float) else read(threshold)
        if thr_h is None:
            return None
        eps_h, rho_h, zero = cast(eps), cast(0), xp.zeros_like(rz)
        with quiet():
            finite = np.isfinite(bn_h + res_h + rz_h)
        status_h = NON_FINITE if not finite else CONVERGED if res_h <= thr_h else MAXITER
        k, x_h, r_h, p_h, rz_t, res_t, res_list = 0, x, r, z, rz, res, [res_h]
        saved_h = [x for _ in save_at]
        while status_h == MAXITER and k < maxiter:
            ap = matvec(p_h)
            pap_t = _dot(xp, p_h, ap)
            pap_h = read(pap_t)
            if not track_pp:
                pp_h = read(_dot(xp, p_h, p_h))
            if pap_h is None or pp_h is None:
                return None
            with quiet():
                curved = pap_h > eps_h * (pp_h * rho_h)
            alpha = rz_t / pap_t if curved else zero
            r_new = [b - alpha * a for a, b in zip(ap, r_h)]
            # the square root stays an array operation: torch's is not correctly rounded
            z_new, rz_new_t, res_new_t = preconditioned(r_new)
            rz_new_h, res_new_h = read(rz_new_t), read(res_new_t)
            if rz_new_h is None or res_new_h is None:
                return None
            with quiet():
                finite = np.isfinite(pap_h + rz_new_h)
            if not finite:
                status_h = NON_FINITE
            elif not curved:
                status_h = NONPOSITIVE_CURVATURE
            elif not rz_new_h >= 0:
                status_h = BREAKDOWN
            else:  # a step
                status_h = CONVERGED if res_new_h <= thr_h else MAXITER
                positive = rz_h > 0
                with quiet():
                    beta_h = rz_new_h / rz_h if positive else cast(0)
                    rho_h = np.maximum(rho_h, pap_h / pp_h)
                    if track_pp:
                        pp_h = rz_new_h + beta_h * beta_h * pp_h
                beta = rz_new_t / rz_t if positive else zero
                x_h = _axpy(alpha, p_h, x_h)
                k += 1
                saved_h = [x_h if k == s else old for s, old in zip(save_at, saved_h)]
                res_list.append(res_new_h)
                r_h, p_h = r_new, _axpy(beta, p_h, z_new)
                rz_t, rz_h, res_t = rz_new_t, rz_new_h, res_new_t
        hist_h = None
        if history:
            values = [float(v) for v in res_list] + [math.nan] * (maxiter + 1 - len(res_list))
            hist_h = xp.asarray(values, dtype=res.dtype, device=device)
        return (xp.asarray(k, dtype=k0.dtype, device=device), x_h, res_t, codes[status_h],
                hist_h, tuple(saved_h))

    # eager backends with host arrays branch on host scalars; elsewhere (traced, on a device,
    # inside a transform) the array loop, which never reads a value per iteration
    host = None if x_update == "select" else solve_on_host()
    if host is not None:
        k, x, res, status, hist, saved = host
    else:
        state = solve(x_update)
        if x_update == "mask" and bool(state[10] >= NONPOSITIVE_CURVATURE):
            state = solve("defer")  # a guard fired: the exact iterate where it did
        k, x, res, status, hist, saved = (state[0], state[1], state[9], state[10], state[11],
                                          state[12])
    # counts never reached (CG stopped or maxiter is smaller) hold the final iterate
    saved = tuple(unflatten(treedef, scaled([where(k < s, a, c) for a, c in zip(x, old)], True))
                  for s, old in zip(save_at, saved))
    if scale is not None:
        x = scaled(x, True)
        s = xp.astype(scale, res.dtype)
        res = res * s
        hist = None if hist is None else hist * s
        x_finite = reduce(lambda u, v: u & v, [xp.all(xp.isfinite(a)) for a in x])
        status = where(x_finite, status, codes[NON_FINITE])
    return unflatten(treedef, x), CGInfo(k, res, status, hist, saved)
