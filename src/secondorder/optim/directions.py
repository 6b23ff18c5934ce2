"""Directions: what a method proposes to add to the parameters, before a step rule
(:mod:`secondorder.optim.step_rules`) chooses how far to go and an update transform
(:mod:`secondorder.optim.transforms`) shapes the step.

Every function here is backend-generic (trees of numpy, torch, jax or cupy arrays; the loops go
through the backend's control flow, so each compiles under ``jax.jit``) and pure. ``apply`` is
the network ``apply(params, x)``, ``loss`` a :class:`~secondorder.losses.Loss`, ``batch`` the
pair ``(x, y)``; the objective is the mean loss f(w) = loss(apply(w, x), y).

=====================================  =========================================================
:func:`gradient`                       (f(w), g = grad f(w)): one reverse pass
:func:`dense_system`                   f, g and the dense curvature C (Hessian or GGN, p x p;
                                       small problems only) with its finite symmetric part
:func:`newton_direction`               d = -(C + lambda D)^{-1} g: by ``eigh`` (``"plain"``,
                                       or ``"abs"``: |eigenvalues| floored, Nocedal & Wright
                                       Sec. 3.4 / the CurveBall paper's Table 1 baseline) or by
                                       an LU solve with a diagonal scale D (Levenberg-Marquardt,
                                       Moré 1978)
:func:`curvature_operator`             the GGN, Hessian or one-sample Monte-Carlo Fisher as an
                                       operator, with the Fisher's key split (Martens 2010)
:func:`damped_cg_direction`            CG on (C + lambda I) d = -g warm-started from a decayed
                                       previous solution, iterates saved for backtracking
                                       (Hessian-free, Martens 2010, Secs. 4.2-4.6)
:func:`curveball_quantities`,          CurveBall's Delta = J^T (H_L J z + J_L) + lambda z and
:func:`curveball_2x2`,                 the 2x2 subproblem for (rho, beta), eqs. 16-18 of
:func:`curveball_direction`            Henriques et al. (2019), and the predicted change
:func:`block_preconditioned_direction` d = -(B + lambda)^{power} g block by block for curvature
                                       blocks (K-FAC, Shampoo, TNT; Martens & Grosse 2015)
:func:`prox_linear_direction`          the dual / primal Gauss-Newton (prox-linear) direction
                                       (re-exported from :mod:`.prox_linear`)
=====================================  =========================================================
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from .. import random
from .._pytree import check_same_structure, flatten, tree_map, unflatten
from ..backends import backend_of
from ..backends.bridge import runs_on_torch
from ..curvature import GGN, Fisher, Hessian
from ..curvature.blocks import BlockState, CurvatureBlock
from ..errors import HyperparameterError
from ..linalg import CGInfo, cg, eigh
from ..losses import Loss
from ..tree import (
    _axpy_leaves,
    _dot_leaves,
    add,
    axpy,
    combine,
    leaves,
    neg,
    norm,
    partition,
    ravel,
    scale,
    vdot,
)
from .prox_linear import Direction, prox_linear_direction

Tree = Any
Array = Any
Batch = tuple[Any, Any]
Apply = Callable[[Tree, Any], Array]

#: the curvature operators a CG direction can use, by name
CURVATURES = {"ggn": GGN, "hessian": Hessian, "fisher": Fisher}
#: the variants of :func:`newton_direction`
NEWTON_VARIANTS = ("plain", "abs")

__all__ = [
    "CURVATURES",
    "NEWTON_VARIANTS",
    "CurveBallDirection",
    "CurveBallQuantities",
    "DenseSystem",
    "Direction",
    "block_preconditioned_direction",
    "curvature_operator",
    "curveball_2x2",
    "curveball_direction",
    "curveball_predicted_change",
    "curveball_quantities",
    "damped_cg_direction",
    "dense_system",
    "finite_or_zero",
    "gradient",
    "newton_direction",
    "prox_linear_direction",
]


def _objective(apply: Apply, loss: Loss, batch: Batch) -> Callable[[Tree], Array]:
    x, y = batch
    return lambda p: loss.value(apply(p, x), y)


# ---------------------------------------------------------------------------- the gradient
@runs_on_torch
def gradient(apply: Apply, loss: Loss, params: Tree, batch: Batch) -> tuple[Array, Tree]:
    """(f(w), grad f(w)) of the mean batch loss: the direction of gradient descent (up to the
    sign and the learning rate, which the transform chain applies)."""
    return backend_of(params).value_and_grad(_objective(apply, loss, batch), params)


# ---------------------------------------------------------------------------- Newton systems
class DenseSystem(NamedTuple):
    """The dense small-problem system of :func:`dense_system`."""

    loss: Array  #: f(w)
    grad: Tree  #: grad f(w) as a tree like the parameters
    g: Array  #: the flat gradient (p,)
    unravel: Callable[[Array], Tree]  #: flat (p,) -> tree like the parameters
    raw: Array  #: the dense curvature (p, p) as built (may hold non-finite entries)
    sym: Array  #: (raw + raw^T) / 2 with non-finite entries zeroed: safe to decompose


def finite_or_zero(a: Array) -> Array:
    """``a`` with its non-finite entries replaced by 0, so that a decomposition or solve never
    raises; the raw array is checked by the guard, which then rejects the step."""
    xp = backend_of(a).xp
    return xp.where(xp.isfinite(a), a, xp.zeros_like(a))


@runs_on_torch
def dense_system(apply: Apply, loss: Loss, operator: Callable, params: Tree, batch: Batch
                 ) -> DenseSystem:
    """f, g and the dense curvature ``operator(apply, loss, params, batch).to_dense()``
    (:class:`~secondorder.curvature.Hessian` or :class:`~secondorder.curvature.GGN`), built
    without validation: a non-finite batch gives non-finite entries, which the caller passes to
    its guard. O(p^2) memory, p Hessian- or GGN-vector products."""
    value, grad = gradient(apply, loss, params, batch)
    xp = backend_of(value).xp
    g, unravel = ravel(grad)
    raw = operator(apply, loss, params, batch, validate=False).to_dense()
    sym = finite_or_zero(0.5 * (raw + xp.linalg.matrix_transpose(raw)))
    return DenseSystem(value, grad, g, unravel, raw, sym)


def newton_direction(g: Array, matrix: Array, damping: Any = 0.0, *, variant: str = "plain",
                     min_eigenvalue: Any = 1e-8, method: str = "eigh",
                     diag: Array | None = None) -> Array:
    """The flat direction d = -(C + lambda D)^{-1} g for a dense symmetric C (p, p).

    ``method="eigh"`` (Newton), with C = Q diag(w) Q^T:

    * ``variant="plain"``: d = -Q diag(1 / (w + lambda)) Q^T g = -(C + lambda I)^{-1} g (not a
      descent direction where C + lambda I is indefinite);
    * ``variant="abs"``: d = -Q diag(1 / (max(|w|, min_eigenvalue) + lambda)) Q^T g, the
      "absolute eigenvalue" modification (Nocedal & Wright 2006, Sec. 3.4; the exact-Hessian
      baseline of the CurveBall paper, Table 1): always a descent direction.

    ``method="solve"`` (Levenberg-Marquardt): an LU solve of (C + lambda Diag(diag)) d = -g, D = I
    when ``diag`` is None (Moré's scaled damping passes diag = max_k diag(C_k)).
    """
    xp = backend_of(g).xp
    if method == "solve":
        if variant != "plain":
            raise HyperparameterError(
                f"variant={variant!r} needs method='eigh' (the eigenvalues); use "
                "variant='plain' with method='solve'")
        d_vec = xp.ones_like(g) if diag is None else diag
        eye = xp.eye(g.shape[0], dtype=g.dtype, device=backend_of(g).device(g))
        system = matrix + damping * (eye * d_vec[None, :])
        return -xp.linalg.solve(system, g[:, None])[:, 0]
    if method != "eigh":
        raise HyperparameterError(f"method must be 'eigh' or 'solve', got {method!r}")
    if diag is not None:
        raise HyperparameterError("a diagonal damping scale needs method='solve'")
    if variant not in NEWTON_VARIANTS:
        raise HyperparameterError(
            f"unknown Newton variant {variant!r}: use one of {NEWTON_VARIANTS}")
    w, q = eigh(matrix)
    if variant == "abs":
        floor = min_eigenvalue if hasattr(min_eigenvalue, "shape") else xp.asarray(
            min_eigenvalue, dtype=w.dtype, device=backend_of(w).device(w))
        w = xp.maximum(xp.abs(w), floor)
    return -(q @ ((xp.linalg.matrix_transpose(q) @ g) / (w + damping)))


# ---------------------------------------------------------------------------- CG directions
def curvature_operator(kind: str, apply: Apply, loss: Loss, params: Tree, batch: Batch,
                       key: Array | None = None) -> tuple[Any, Array | None]:
    """``(C, next_key)``: the curvature operator of ``kind`` ("ggn", "hessian" or "fisher") at
    ``params`` on ``batch``, built without validation. The Fisher is the one-sample Monte-Carlo
    estimate J^T g g^T J / m with targets drawn from the model (an unbiased estimate of the GGN
    for the losses here); its sample key is split from ``key``, and ``next_key`` is the key to
    keep for the next step (``key`` itself for the other kinds)."""
    if kind not in CURVATURES:
        raise HyperparameterError(f"curvature must be one of {sorted(CURVATURES)}, got {kind!r}")
    sampling: dict[str, Any] = {}
    if kind == "fisher":
        if key is None:
            raise HyperparameterError("curvature='fisher' draws its targets from a random key: "
                                      "pass key=secondorder.random.key(seed, backend)")
        keys = random.split(key)
        key, sample_key = keys[0, :], keys[1, :]
        sampling = {"kind": "mc", "samples": 1, "key": sample_key}
    return CURVATURES[kind](apply, loss, params, batch, validate=False, **sampling), key


def damped_cg_direction(curvature: Callable[[Tree], Tree], grad: Tree, damping: Any,
                        previous: Tree, *, warm_start_decay: float = 0.95, maxiter: int = 50,
                        tol: float = 5e-4, save_at: tuple[int, ...] = ()
                        ) -> tuple[Tree, CGInfo]:
    """CG on (C + lambda I) d = -g from d_0 = ``warm_start_decay`` times the ``previous``
    solution (Martens 2010, Secs. 4.5-4.6), ``curvature`` the product v -> C v.

    Fixed-iteration mode (``tol=None`` in :func:`~secondorder.linalg.cg`, ``maxiter``
    iterations) with the absolute floor atol = ``tol`` ||g||, so the jitted loop has a static
    trip count and the iterates freeze once the relative residual falls under ``tol``. The
    iterates after the counts in ``save_at`` are returned in ``info.saved`` (Hessian-free's
    backtracking candidates). Returns ``(d, info)``.
    """
    def damped(v: Tree) -> Tree:
        return axpy(damping, v, curvature(v))

    return cg(damped, neg(grad), scale(warm_start_decay, previous), tol=None, maxiter=maxiter,
              atol=tol * norm(grad), save_at=save_at)


# ---------------------------------------------------------------------------- CurveBall
class CurveBallQuantities(NamedTuple):
    """Delta and the coefficients of CurveBall's 2x2 system (eqs. 16-18), with the loss and the
    gradient (None on the GGN route, where one pullback gives C z + g without it); a..e are None
    when only Delta was asked for."""

    loss: Array
    grad: Tree
    delta: Tree
    a: Array | None = None
    b: Array | None = None
    c: Array | None = None
    d: Array | None = None
    e: Array | None = None


@runs_on_torch
def curveball_quantities(apply: Apply, loss: Loss, params: Tree, z: Tree, damping: Any,
                         batch: Batch, *, curvature: str = "ggn", coefficients: bool = True
                         ) -> CurveBallQuantities:
    """CurveBall's products at w for the carried direction z (eqs. 16-18), with C the GGN
    (``curvature="ggn"``: f = apply(w, x), J its Jacobian, H_L and J_L the Hessian and gradient
    of the mean loss in f) or the Hessian (``"hessian"``, through Hessian-vector products):

        u = J z,  Delta = J^T (H_L u + J_L) + lambda z = C z + g + lambda z,  v = J Delta,
        a = v^T H_L v + lambda |Delta|^2,  b = u^T H_L v + lambda z^T Delta,
        c = u^T H_L u + lambda |z|^2,      d = J_L^T v = g^T Delta,  e = J_L^T u = g^T z.

    Cost with the GGN: the forward pass, two JVPs and one VJP (one JVP and the VJP without
    ``coefficients``)."""
    backend = backend_of(params)
    xp = backend.xp
    lam = damping
    if curvature == "ggn":
        x, y = batch
        f, jvp, vjp = backend.linearize_vjp(lambda p: apply(p, x), params)
        m = f.shape[0]
        value = loss.value(f, y)
        grad_out, hvp_out = loss.grad_hvp_at(f, y)
        jl = grad_out / m

        def h_out(t: Array) -> Array:
            return hvp_out(t) / m

        # z and Delta as leaf lists: the tree is flattened once here, not in every vdot
        z_leaves, treedef = flatten(z)
        u = jvp(z)
        hu = h_out(u)
        # one pullback of H_L u + J_L gives C z + g (eq. 16); the gradient alone is not needed
        cz_g, cz_g_def = flatten(vjp(hu + jl))
        treedef = check_same_structure(treedef, cz_g_def)
        delta_leaves = _axpy_leaves(lam, z_leaves, cz_g)
        delta = unflatten(treedef, delta_leaves)
        grad = None
        if not coefficients:
            return CurveBallQuantities(value, grad, delta)
        v = jvp(delta)
        hv = h_out(v)
        return CurveBallQuantities(
            value, grad, delta, xp.sum(v * hv) + lam * _dot_leaves(xp, delta_leaves, delta_leaves),
            xp.sum(u * hv) + lam * _dot_leaves(xp, z_leaves, delta_leaves),
            xp.sum(u * hu) + lam * _dot_leaves(xp, z_leaves, z_leaves),
            xp.sum(jl * v), xp.sum(jl * u))
    if curvature != "hessian":
        raise HyperparameterError(f"curvature must be 'ggn' or 'hessian', got {curvature!r}")
    objective = _objective(apply, loss, batch)
    value, grad = backend.value_and_grad(objective, params)
    hz = backend.hvp(objective, params, z)
    delta = axpy(lam, z, add(hz, grad))
    if not coefficients:
        return CurveBallQuantities(value, grad, delta)
    hd = backend.hvp(objective, params, delta)
    return CurveBallQuantities(
        value, grad, delta, vdot(delta, hd) + lam * vdot(delta, delta),
        vdot(z, hd) + lam * vdot(z, delta), vdot(z, hz) + lam * vdot(z, z), vdot(grad, delta),
        vdot(grad, z))


def curveball_2x2(a: Array, b: Array, c: Array, d: Array, e: Array) -> tuple[Array, Array]:
    """(rho, beta) minimising CurveBall's quadratic model of the step rho z - beta Delta
    (eq. 18): [beta; -rho] = [[a, b], [b, c]]^{-1} [d; e], i.e.

        beta = (c d - b e) / (a c - b^2),   rho = (b d - a e) / (a c - b^2).

    When the system is singular (a c - b^2 <= eps |a c|, e.g. z = 0 at the first step) its
    pseudo-inverse gives beta = d / a, rho = 0 (beta = 0 when a <= 0), and (0, 0) when nothing
    finite comes out.

    Where the five numbers can be read from host memory without a synchronisation (eager
    NumPy, CPU torch: :meth:`Backend.host_scalar`), the branches are chosen on those host
    values, rounded in the arrays' dtype, and only the chosen one is computed with array
    operations: the same numbers as the select-both form below, in a third of the operations."""
    backend = backend_of(a)
    chosen = _curveball_2x2_on_host(backend, a, b, c, d, e)
    if chosen is not None:
        return chosen
    xp = backend.xp
    det = a * c - b * b
    eps = xp.finfo(a.dtype).eps
    regular = det > eps * xp.abs(a * c)
    safe_det = xp.where(regular, det, xp.ones_like(det))
    beta_full = (c * d - b * e) / safe_det
    rho_full = (b * d - a * e) / safe_det
    positive = a > 0
    beta_pinv = xp.where(positive, d / xp.where(positive, a, xp.ones_like(a)), xp.zeros_like(a))
    beta = xp.where(regular, beta_full, beta_pinv)
    rho = xp.where(regular, rho_full, xp.zeros_like(a))
    ok = xp.logical_and(xp.isfinite(beta), xp.isfinite(rho))
    return xp.where(ok, rho, xp.zeros_like(rho)), xp.where(ok, beta, xp.zeros_like(beta))


def _curveball_2x2_on_host(backend: Any, a: Array, b: Array, c: Array, d: Array, e: Array
                           ) -> tuple[Array, Array] | None:
    """:func:`curveball_2x2` with its decisions made on host scalars (None where a value is not
    on the host): the array operations of the chosen branch only, so the results are those of
    the array form to the bit and stay differentiable where the arrays are."""
    values = [backend.host_scalar(v) for v in (a, b, c, d, e)]
    if any(v is None for v in values):
        return None
    a_h, b_h, c_h, d_h, e_h = values
    cast = type(a_h)
    xp = backend.xp
    with np.errstate(all="ignore"):
        det_h = a_h * c_h - b_h * b_h
        if det_h > cast(xp.finfo(a.dtype).eps) * abs(a_h * c_h):
            beta_h = (c_h * d_h - b_h * e_h) / det_h
            rho_h = (b_h * d_h - a_h * e_h) / det_h
            if np.isfinite(beta_h) and np.isfinite(rho_h):
                det = a * c - b * b
                return (b * d - a * e) / det, (c * d - b * e) / det
        elif a_h > 0 and np.isfinite(d_h / a_h):
            return xp.zeros_like(a), d / a
    zero = xp.zeros_like(a)
    return zero, zero


def curveball_predicted_change(rho: Array, beta: Array, d: Array, e: Array) -> Array:
    """The quadratic model's change at the optimum of eq. 18, m(rho z - beta Delta) - m(0) =
    1/2 (rho e - beta d) (with lambda-damped curvature; <= 0 at the optimum)."""
    return 0.5 * (rho * e - beta * d)


class CurveBallDirection(NamedTuple):
    """CurveBall's new direction z' = rho z - beta Delta, with what produced it."""

    loss: Array  #: f(w)
    grad: Tree  #: grad f(w)
    z: Tree  #: the new direction z' (the step added to w)
    rho: Array
    beta: Array
    predicted: Array  #: 1/2 (rho e - beta d); NaN with fixed rho and beta


@runs_on_torch
def curveball_direction(apply: Apply, loss: Loss, params: Tree, z: Tree, damping: Any,
                        batch: Batch, *, curvature: str = "ggn", rho: Any = None,
                        beta: Any = None) -> CurveBallDirection:
    """z' = rho z - beta Delta (Henriques et al. 2019, eqs. 16-18) with (rho, beta) from
    :func:`curveball_2x2`, or fixed (both given, as 0-d arrays of the parameters' dtype: the
    paper's fixed-hyperparameter variant, one JVP fewer)."""
    if (rho is None) != (beta is None):
        raise HyperparameterError("give both rho and beta (fixed variant) or neither (automatic)")
    fixed = rho is not None
    q = curveball_quantities(apply, loss, params, z, damping, batch, curvature=curvature,
                             coefficients=not fixed)
    if fixed:
        predicted = backend_of(q.loss).xp.full_like(q.loss, float("nan"))
    else:
        rho, beta = curveball_2x2(q.a, q.b, q.c, q.d, q.e)
        predicted = curveball_predicted_change(rho, beta, q.d, q.e)
    z_new = tree_map(lambda zi, di: rho * zi - beta * di, z, q.delta)
    return CurveBallDirection(q.loss, q.grad, z_new, rho, beta, predicted)


# ---------------------------------------------------------------------------- block preconditioners
def block_preconditioned_direction(grad: Tree, blocks: Sequence[CurvatureBlock],
                                   states: Sequence[BlockState],
                                   groups: Sequence[Sequence[int]], *, power: float | None = None,
                                   damping: Any = None, split: str | None = None,
                                   outside: Any = 1.0) -> Tree:
    """d = -P g with P block-diagonal: on the leaves ``groups[i]`` (indices in the canonical leaf
    order of :func:`secondorder.tree.leaves`; a layer's ``[bias, weight]`` or ``[weight]``),
    P_i = (B_i + lambda)^{power} by ``blocks[i].multiply(states[i], ., power, damping=...,
    split=...)`` through the block's cache (K-FAC's (A + pi sqrt(lambda) I)^{-1} (x)
    (G + sqrt(lambda)/pi I)^{-1} with a damped-inverse cache; Shampoo's and TNT's inverse roots;
    the exact (A (x) G + lambda I)^{power} with an ``eigh`` cache and ``split="exact"``); on the
    leaves in no group P = ``outside`` I (K-FAC: 1 / lambda, the damped zero block).

    ``power``, ``damping`` and ``split`` go to :meth:`CurvatureBlock.multiply` as given (leave
    them None with an inverse or root cache, whose damping and exponent were fixed by
    ``update_cache``)."""
    if not (len(blocks) == len(states) == len(groups)):
        raise HyperparameterError(
            f"give one state and one leaf group per block: got {len(blocks)} blocks, "
            f"{len(states)} states and {len(groups)} groups")
    covered = {i for group in groups for i in group}
    n = len(leaves(grad))
    rest = [[i] for i in range(n) if i not in covered]
    all_groups = [list(g) for g in groups] + rest
    parts = partition(grad, all_groups)
    out = []
    for block, state, part in zip(blocks, states, parts):
        v = part if len(part) > 1 else part[0]
        kwargs = {k: val for k, val in (("damping", damping), ("split", split))
                  if val is not None}
        pv = block.multiply(state, v, power, **kwargs)
        out.append(tuple(-a for a in pv) if len(part) > 1 else (-pv,))
    out += [(-outside * part[0],) for part in parts[len(blocks):]]
    return combine(out, all_groups, grad)
