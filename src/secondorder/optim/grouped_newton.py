"""GroupedNewton: Newton's method through a summary of higher-order derivatives.

The parameters are split into S groups by a :class:`~secondorder.optim.partitions.Partition`; for a
direction u (the momentum of the gradient), V = Diag(u) I_{P:S} = [u_1 ... u_S] (P x S) and the
loss is summarised on the S-dimensional slice

    phi(eta) = L(theta + V eta):   g_bar = grad phi(0) = V^T g,   H_bar = hess phi(0) = V^T H V,
                                   D3_sss = phi'''(0)[e_s, e_s, e_s] = D^3 L[u_s, u_s, u_s].

**Two routes, chosen per backend.** ``route="phi"`` differentiates phi, a function of S
numbers, with the backend's ``grad`` / ``hvp`` / ``jvp``: one reverse pass gives g_bar, and for
each group s one forward-over-forward-over-reverse pass ``jvp(eta -> hvp(phi, eta, e_s), 0, e_s)``
gives at once the column H_bar e_s and the row D3[e_s, e_s, :] (whose entry s is D3_sss).
``route="theta"`` works in parameter space: one gradient gives g_bar = V^T g, and for each group
one ``jvp(theta -> hvp(L, theta, u_s), theta, u_s)`` gives H u_s (so H_bar e_s = V^T H u_s) and
D^3 L[u_s, u_s, .] (so D3_sss = <u_s, D^3 L[u_s, u_s, .]>). Both are exact and form no P x P
object; they do the same passes through the network, and which one is faster depends on how the
framework nests its transforms. Measured on an MLP 256-128x7-10, batch 256, float32, S = 4
(one thread): torch phi 344 ms vs theta 233 ms; jax (jit) 50.6 vs 50.5 ms; numpy (autograd) 655
vs 681 ms. ``route="auto"`` (the default) therefore takes theta on torch (and CuPy, which runs
torch.func) and phi elsewhere.

**Steps.** Plain: eta = H_bar^{-1} g_bar (:func:`plain_step`). Anisotropic Nesterov cubic
regularisation (:func:`cubic_step`): D = Diag(|D3_sss|^{1/3}), minimise
T(eta) = -eta^T g_bar + 1/2 eta^T H_bar eta + (lambda_int / 6) |D eta|^3. Its global minimiser
solves the stationarity equation M(r) eta = g_bar, M(r) = H_bar + (lambda_int / 2) r D^2, with
r = |D eta| and M(r) PSD. The step solves that equation as it stands: r is the root of the
monotone predicate "M(r) is not PD, or |D M(r)^{-1} g_bar| > r", bracketed by doubling and
found by bisection inside ``backend.while_loop`` (so ``jax.jit`` compiles it), each test one
S x S ``eigh`` of M(r); then eta = M(r)^{-1} g_bar, polished by one Newton step on
grad T(eta) = 0 (near the hard case eta(r) magnifies the last bits of r). Nothing is divided
by D, so a group whose third-derivative summary is 0 (the loss quadratic in it: MSE and a whole
last layer) costs no accuracy. (The reduction to one secular equation through
K = (2 / lambda_int) D^{-1} H_bar D^{-1}, used before, divides by D: with D3_sss = 0 floored at
1e-5 max D, K spans ten orders of magnitude and its ``eigh`` loses the small eigenvalues that
carry the root -- steps off by up to 1e-4 from a 50-digit solution on teacher-student, against
2e-12 now.) The S x S algebra and the root finder run in
float64 whenever the backend has it; on JAX without x64 mode (``jax_enable_x64`` off) float64
does not exist and they run in float32 (less accurate roots; enable x64 for float64).

**Guards.** d_s -> 0: every d_s is floored at ``d_floor * max_s d_s`` (relative; with no
rescaling this only keeps T bounded below when a group with D3_sss = 0 has negative curvature,
and changes the step by O(d_floor^2) elsewhere); when all d_s are 0 (a quadratic) the cubic term
vanishes and the plain step with the PD requirement is taken. Singular H_bar (plain step), or
M(r) at the root (the hard case of the cubic problem, where the root sits at the PSD boundary):
|eigenvalue| <= ``rcond`` * max |eigenvalue|. lambda_int = 0 with H_bar not PD, the hard case, a
root not bracketed within ``max_iter`` tests and non-finite summaries: the step is *skipped*:
the parameters and the state are kept and ``info.finite`` is False (inside ``jax.jit``); the
stand-alone functions return an ``ok`` flag, and :func:`check_step` turns it into a named error
(:class:`~secondorder.errors.NotPositiveDefiniteError`) outside a trace.

**The practical optimiser** (conference version, Alg. 1 / Table 2): see :class:`GroupedNewton`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from .._pytree import flatten, tree_map
from ..backends import Backend, backend_of
from ..backends.bridge import runs_on_torch
from ..errors import HyperparameterError, NotPositiveDefiniteError
from ..losses import Loss
from ..tree import add, vdot
from .base import Array, Batch, Optimizer, StepInfo, Tree, is_number
from .newton import finite_or_zero
from .partitions import Partition, make_partition
from .schedules import Schedule, resolve
from .state import every, initial_count, method_state

__all__ = ["GroupedNewton", "check_step", "cubic_step", "plain_step", "summaries"]


# ---------------------------------------------------------------------------- summaries
@runs_on_torch
def summaries(f: Callable[[Tree], Array], params: Tree, u: Tree, partition: Partition, *,
              third: bool = True, backend: Backend | None = None, route: str = "auto"
              ) -> tuple[Array, Array, Array | None]:
    """``(g_bar, H_bar, d3)`` of the scalar function ``f`` at ``params`` for the direction ``u``.

    g_bar (S,) = V^T grad f, H_bar (S, S) = V^T H V and d3 (S,) the diagonal D^3 f[u_s, u_s, u_s]
    (``None`` when ``third`` is False: then S Hessian-vector products of phi replace the
    third-order passes). All in the dtype of ``params``; see the module docstring for the route.
    """
    backend = backend or backend_of(params)
    if route == "auto":
        route = backend.subspace_route
    if route == "theta":
        return _summaries_theta(f, params, u, partition, third, backend)
    if route != "phi":
        raise HyperparameterError(f"unknown route {route!r}: use 'auto', 'phi' or 'theta'")
    xp = backend.xp
    leaf = flatten(params)[0][0]
    size = partition.size
    dtype, device = leaf.dtype, backend.device(leaf)

    def phi(eta: Array) -> Array:
        return f(add(params, partition.expand(eta, u)))

    eta0 = xp.zeros((size,), dtype=dtype, device=device)
    eye = xp.eye(size, dtype=dtype, device=device)
    g_bar = backend.grad(phi, eta0)
    cols, diag = [], []
    for s in range(size):
        e_s = eye[s, :]
        if third:
            col, row = backend.jvp(lambda eta, e_s=e_s: backend.hvp(phi, eta, e_s), eta0, e_s)
            diag.append(row[s])
        else:
            col = backend.hvp(phi, eta0, e_s)
        cols.append(col)
    h_bar = xp.stack(cols, axis=1)
    return g_bar, h_bar, (xp.stack(diag) if third else None)


def _summaries_theta(f: Callable[[Tree], Array], params: Tree, u: Tree, partition: Partition,
                     third: bool, backend: Backend) -> tuple[Array, Array, Array | None]:
    """The parameter-space route of :func:`summaries` (see the module docstring)."""
    xp = backend.xp
    leaf = flatten(params)[0][0]
    size = partition.size
    eye = xp.eye(size, dtype=leaf.dtype, device=backend.device(leaf))
    blocks = [partition.expand(eye[s, :], u) for s in range(size)]  # u_s: u masked to group s
    g = backend.grad(f, params)
    g_bar = xp.stack([vdot(g, b) for b in blocks])
    cols, diag = [], []
    for u_s in blocks:
        if third:
            hu, d3u = backend.jvp(lambda th, u_s=u_s: backend.hvp(f, th, u_s), params, u_s)
            diag.append(vdot(u_s, d3u))
        else:
            hu = backend.hvp(f, params, u_s)
        cols.append(xp.stack([vdot(b, hu) for b in blocks]))
    h_bar = xp.stack(cols, axis=1)
    return g_bar, h_bar, (xp.stack(diag) if third else None)


# ---------------------------------------------------------------------------- steps
def _work_dtype(backend: Backend, a: Array) -> Any:
    xp = backend.xp
    if backend.supports_float64():
        return xp.float64
    return xp.float32 if xp.finfo(a.dtype).bits < 32 else a.dtype  # no half-precision eigh


def _sym_eigh(backend: Backend, h: Array) -> tuple[Array, Array]:
    xp = backend.xp
    h = finite_or_zero(h)  # so that eigh never raises; callers flag non-finite input as failed
    return xp.linalg.eigh(0.5 * (h + xp.linalg.matrix_transpose(h)))


def plain_step(g_bar: Array, h_bar: Array, *, require_pd: bool = False, rcond: float = 1e-12
               ) -> tuple[Array, Array]:
    """``(eta, ok)`` with eta = H_bar^{-1} g_bar, solved in float64 by ``eigh``.

    ``ok`` is False (and eta NaN) when H_bar is singular (|eigenvalue| <= rcond * max |eigenvalue|)
    or, with ``require_pd``, not positive definite (eigenvalue <= rcond * max |eigenvalue|).
    """
    backend = backend_of(g_bar)
    xp = backend.xp
    work = _work_dtype(backend, g_bar)
    g, h = xp.astype(g_bar, work), xp.astype(h_bar, work)
    w, q = _sym_eigh(backend, h)
    big = xp.max(xp.abs(w))
    small = w if require_pd else xp.abs(w)
    ok = xp.logical_and(xp.all(small > rcond * big), big > 0)
    ok = xp.logical_and(ok, xp.logical_and(xp.all(xp.isfinite(g)), xp.all(xp.isfinite(h))))
    safe = xp.where(ok, w, xp.ones_like(w))
    eta = xp.matmul(q, xp.matmul(xp.linalg.matrix_transpose(q), g) / safe)
    eta = xp.where(ok, eta, xp.full_like(eta, float("nan")))
    return xp.astype(eta, g_bar.dtype), ok


def cubic_step(g_bar: Array, h_bar: Array, d3: Array, lambda_int: Any, *, d_floor: float = 1e-5,
               max_iter: int = 200, rcond: float = 1e-12
               ) -> tuple[Array, Array, Array, Array]:
    """The anisotropic Nesterov cubic step: ``(eta, ok, iterations, residual)``.

    eta minimises T(eta) = -eta^T g_bar + 1/2 eta^T H_bar eta + (lambda_int/6) |D eta|^3,
    D = Diag(|d3|^{1/3}) floored at ``d_floor * max(D)`` (the stationary point with the largest
    |D eta|, i.e. on the branch where H_bar + (lambda_int/2) |D eta| D^2 is PSD: the global
    minimiser). It solves the stationarity equation (H_bar + (lambda_int/2) r D^2) eta = g_bar,
    r = |D eta|, as it stands: bisection on r of the monotone predicate "M(r) = H_bar +
    (lambda_int/2) r D^2 is not PD, or |D M(r)^{-1} g_bar| > r", each test one S x S ``eigh`` of
    M(r) (no division by D, so groups with D3 = 0 cost no accuracy), then one Newton step on
    grad T(eta) = 0. ``iterations`` counts the
    tests (bracket doubling and bisection) and ``residual`` is ||grad T(eta)|| / ||g_bar||
    (computed in float64). ``lambda_int`` must be > 0 (use :func:`plain_step` for 0).
    """
    backend = backend_of(g_bar)
    xp = backend.xp
    work = _work_dtype(backend, g_bar)
    g, h = xp.astype(g_bar, work), xp.astype(h_bar, work)
    h = 0.5 * (h + xp.linalg.matrix_transpose(h))
    lam = lambda_int if is_number(lambda_int) else xp.astype(lambda_int, work)
    half = 0.5 * lam
    d = xp.abs(xp.astype(d3, work)) ** (1.0 / 3.0)
    dmax = xp.max(d)
    has_d = dmax > 0
    d = xp.where(has_d, xp.maximum(d, d_floor * dmax), xp.ones_like(d))
    d2 = d * d
    eye = xp.eye(g.shape[0], dtype=work, device=backend.device(g))
    d2_mat = d2[:, None] * eye
    finite_in = xp.logical_and(xp.all(xp.isfinite(g)), xp.all(xp.isfinite(h)))
    finite_in = xp.logical_and(finite_in, xp.all(xp.isfinite(d)))
    h = finite_or_zero(h)
    g = finite_or_zero(g)
    gnorm = xp.sqrt(xp.sum(g * g))
    eps = 4.0 * (2.220446049250313e-16 if backend.dtype_name(work) == "float64" else 1.1920929e-07)

    def solve(r: Array) -> tuple[Array, Array]:
        """eta(r) = M(r)^{-1} g_bar and whether M(r) is (numerically) PD."""
        w, q = _sym_eigh(backend, h + (half * r) * d2_mat)
        pd = w[0] > rcond * xp.max(xp.abs(w))
        safe = xp.where(w > 0, w, xp.ones_like(w))
        return xp.matmul(q, xp.matmul(xp.linalg.matrix_transpose(q), g) / safe), pd

    def below(r: Array) -> Array:
        """True when the root r* = |D eta(r*)| lies above r (a monotone predicate in r)."""
        eta, pd = solve(r)
        return xp.logical_or(xp.logical_not(pd), xp.sqrt(xp.sum(d2 * eta * eta)) > r)

    # first guess: the root when H_bar = 0 and D = max(D) I
    hi0 = xp.sqrt(gnorm / (half * xp.where(has_d, dmax, xp.ones_like(dmax))))
    hi0 = xp.where(hi0 > 0, hi0, xp.ones_like(hi0))

    def cond_fn(carry: tuple) -> Array:
        lo, hi, growing, it = carry
        go = xp.logical_or(growing, hi - lo > eps * hi)
        return xp.logical_and(xp.logical_and(it < max_iter, go), xp.logical_and(has_d, gnorm > 0))

    def body(carry: tuple) -> tuple:
        lo, hi, growing, it = carry
        mid = xp.where(growing, hi, 0.5 * (lo + hi))
        up = below(mid)
        # growing: the root lies above hi -> [hi, 2 hi]; else the bracket [lo, hi] is found
        new_lo = xp.where(up, mid, lo)
        new_hi = xp.where(growing, xp.where(up, 2.0 * hi, hi), xp.where(up, hi, mid))
        return new_lo, new_hi, xp.logical_and(growing, up), it + 1

    it0 = xp.asarray(0, device=backend.device(g))
    lo, hi, growing, iters = backend.while_loop(
        cond_fn, body, (xp.zeros_like(hi0), hi0, xp.asarray(True, device=backend.device(g)), it0))
    eta_c, pd = solve(hi)
    ok = xp.logical_and(pd, xp.logical_not(growing))
    # one Newton step on grad T(eta) = 0 from there: r = hi is exact to a few ulps, but near the
    # hard case eta(r) amplifies that error (by 1 / lambda_min(M(r))) while the Hessian of T,
    # M(r) + (lambda_int / 2) (D^2 eta)(D^2 eta)^T / r, stays well conditioned
    d2eta = d2 * eta_c
    r_c = xp.sqrt(xp.sum(d2eta * eta_c))
    r_safe = xp.where(r_c > 0, r_c, xp.ones_like(r_c))
    grad_c = xp.matmul(h, eta_c) + (half * r_c) * d2eta - g
    hess = h + (half * r_c) * d2_mat + (half / r_safe) * (d2eta[:, None] * d2eta[None, :])
    w, q = _sym_eigh(backend, hess)
    newton_ok = xp.logical_and(w[0] > rcond * xp.max(xp.abs(w)), r_c > 0)
    w_safe = xp.where(newton_ok, w, xp.ones_like(w))
    polished = eta_c - xp.matmul(q, xp.matmul(xp.linalg.matrix_transpose(q), grad_c) / w_safe)
    eta_c = xp.where(newton_ok, polished, eta_c)
    eta_c = xp.where(gnorm > 0, eta_c, xp.zeros_like(eta_c))
    ok = xp.logical_or(ok, gnorm == 0)
    eta_p, ok_p = plain_step(g, h, require_pd=True, rcond=rcond)
    eta = xp.where(has_d, eta_c, eta_p)
    ok = xp.where(has_d, ok, ok_p)
    ok = xp.logical_and(xp.logical_and(ok, finite_in), xp.all(xp.isfinite(eta)))
    dd = xp.where(has_d, d, xp.zeros_like(d))
    grad_t = -g + xp.matmul(h, eta) + half * xp.sqrt(xp.sum((dd * eta) ** 2)) * dd**2 * eta
    residual = xp.sqrt(xp.sum(grad_t**2)) / xp.where(gnorm > 0, gnorm, xp.ones_like(gnorm))
    eta = xp.where(ok, eta, xp.full_like(eta, float("nan")))
    return xp.astype(eta, g_bar.dtype), ok, iters, xp.astype(residual, g_bar.dtype)


def check_step(eta: Array, ok: Array) -> Array:
    """``eta``, or :class:`NotPositiveDefiniteError` when the solve failed (concrete ``ok`` only:
    inside a trace the flag cannot be read and ``eta`` is returned, NaN where it failed)."""
    backend = backend_of(eta)
    if backend.is_concrete(ok) and not bool(ok):
        raise NotPositiveDefiniteError(
            "the GroupedNewton step failed: H_bar is singular, or not positive definite with "
            "lambda_int = 0 (or the cubic secular equation has no root above its pole). Use "
            "lambda_int > 0, a coarser partition, or a different direction u.")
    return eta


# ---------------------------------------------------------------------------- optimiser
@method_state("GroupedNewton")
class GroupedNewtonState(NamedTuple):
    """Step count, the gradient momentum g, the averaged step eta~, and the plateau
    scheduler's learning-rate scale, best metric and count of epochs without improvement."""

    count: Array
    g: Tree
    eta: Array
    lr_scale: Array
    best: Array
    bad_epochs: Array


class GroupedNewton(Optimizer):
    """The practical GroupedNewton (Alg. 1 of the conference version, Table 2 defaults).

    Every step, with g_t the mini-batch gradient::

        g~ = g_t (first step) else mu_g g~ + (1 - mu_g) g_t;     u = g~
        every tau steps (t = 0, tau, 2 tau, ...), on the summary batch:
            g_bar, H_bar, D from u;  eta_t = cubic-regularised step (plain if lambda_int == 0)
            eta~ = (eta_t)_+ (first time) else mu_eta eta~ + (1 - mu_eta) (eta_t)_+
        theta <- theta - lr_factor * lr_scale * Diag(g~) I_{P:S} eta~

    ``batch`` is ``(x, y)`` (the summaries then reuse it) or a pair of batches
    ``((x, y), (x_s, y_s))``: gradient batch (B_g = 100 in the paper) and independent summary
    batch (B = 1000); the summary batch may also be passed as ``step(..., summary_batch=...)``.

    ``partition``: a name (``canonical`` default, ``trivial``, ``weights_biases``, ``layers``,
    ``blocks-k``, ``alternate-k``, ``discrete``), lists of leaf indices, or a
    :class:`~secondorder.optim.partitions.Partition`; resolved against the parameters at
    :meth:`init` (``model`` gives ``layers`` its layer table).

    A failed solve (non-finite summaries, singular or non-PD H_bar with lambda_int = 0, no root)
    skips the step: parameters and state are kept, ``info.finite`` is False. ``info.inner_
    iterations`` is the bisection count and ``info.inner_residual`` the stationarity residual of
    the cubic step (0 iterations / NaN on steps that reuse eta~). The plateau scheduler
    (ReduceLROnPlateau, patience 5, factor 0.5) is the pure :meth:`plateau` to call once per epoch
    with a validation or training loss; it halves ``state["lr_scale"]``.

    The cubic step (Sec. 4.2 of the conference version) minimises
    T(eta) = -eta^T g_bar + 1/2 eta^T H_bar eta + (lambda_int / 6) |D eta|^3 with
    D = Diag(|D3_sss|^{1/3}), g_bar = V^T g, H_bar = V^T H V and D3_sss = D^3 L[u_s, u_s, u_s]
    the summaries of the loss on the subspace spanned by the groups of u (V = Diag(u) I_{P:S});
    see :func:`cubic_step` and :func:`summaries`.

    Parameters
    ----------
    apply, loss:
        The network ``apply(params, x)`` and the :class:`~secondorder.losses.Loss`; the
        objective is the mean loss on the batch.
    partition: str, list or Partition, default "canonical"
        The grouping of the parameters into S groups (one per tensor by default).
    lr_factor: float or schedule, default 0.1
        lambda_1, the learning-rate factor, > 0. A schedule (a callable ``t -> lr_t`` of the
        step count t = 0, 1, ...) sets it at every step; the plateau scheduler's ``lr_scale``
        multiplies it either way.
    lambda_int: float or schedule, default 10.0
        The cubic regularisation, >= 0; 0 takes the plain step eta = H_bar^{-1} g_bar. A
        schedule sets it at every step and must stay > 0 (it always takes the cubic step).
    mu_g: float, default 0.9
        Momentum of the gradient, in [0, 1).
    mu_eta: float, default 0.5
        Momentum of the step eta~, in [0, 1).
    tau: int, default 10
        The summaries and eta_t are recomputed every tau steps, >= 1.
    model: optional
        The model whose layer table the ``"layers"`` partition uses.
    d_floor: float, default 1e-5
        Relative floor on the entries of D (keeps T bounded below when a group with D3_sss = 0
        has negative curvature; D is never divided by).
    rcond: float, default 1e-12
        Relative threshold under which an eigenvalue of H_bar counts as zero.
    max_iter: int, default 200
        The most tests of the root r = |D eta| (bracket doubling and bisection).
    patience, plateau_factor, plateau_threshold: int, float, float, default 5, 0.5, 1e-4
        The plateau scheduler of :meth:`plateau`.

    Schedules are evaluated at the state's step count inside ``step`` (eagerly, under
    ``jax.jit`` and under ``jax.vmap``); a rejected step keeps the count.
    """

    State = GroupedNewtonState

    hyperparameters = {  # noqa: RUF012 - never mutated
        "lr_factor": "> 0", "lambda_int": ">= 0", "mu_g": "[0, 1)", "mu_eta": "[0, 1)",
        "tau": "integer >= 1", "d_floor": ">= 0", "rcond": ">= 0", "max_iter": "integer >= 1",
        "patience": "integer >= 0", "plateau_factor": "(0, 1]", "plateau_threshold": ">= 0"}

    def __init__(self, apply: Callable, loss: Loss, *, partition: Any = "canonical",
                 lr_factor: float | Schedule = 0.1, lambda_int: float | Schedule = 10.0,
                 mu_g: float = 0.9,
                 mu_eta: float = 0.5, tau: int = 10, model: Any = None, d_floor: float = 1e-5,
                 rcond: float = 1e-12, max_iter: int = 200, patience: int = 5,
                 plateau_factor: float = 0.5, plateau_threshold: float = 1e-4):
        super().__init__(apply, loss)
        self.partition_spec, self.model = partition, model
        self.lr_factor, self.lambda_int, self.mu_g, self.mu_eta = lr_factor, lambda_int, mu_g, \
            mu_eta
        self.tau, self.d_floor, self.rcond, self.max_iter = int(tau), d_floor, rcond, max_iter
        self.patience, self.plateau_factor = patience, plateau_factor
        self.plateau_threshold = plateau_threshold
        self._partitions: dict[Any, Partition] = {}

    def __repr__(self) -> str:
        return (f"GroupedNewton(partition={self.partition_spec!r}, lr_factor={self.lr_factor}, "
                f"lambda_int={self.lambda_int}, tau={self.tau})")

    def partition(self, params: Tree) -> Partition:
        """The :class:`Partition` for trees shaped like ``params`` (cached by leaf shapes)."""
        key = tuple(tuple(leaf.shape) for leaf in flatten(params)[0])
        if key not in self._partitions:
            self._partitions[key] = make_partition(self.partition_spec, params, self.model)
        return self._partitions[key]

    @property
    def _plain(self) -> bool:
        return is_number(self.lambda_int) and self.lambda_int == 0

    def init(self, params: Tree) -> GroupedNewtonState:
        part = self.partition(params)
        leaf = flatten(params)[0][0]
        backend = backend_of(leaf)
        xp, dev = backend.xp, backend.device(leaf)
        return GroupedNewtonState(
            count=initial_count(backend, dev),
            g=tree_map(lambda a: a * 0.0, params),
            eta=xp.zeros((part.size,), dtype=leaf.dtype, device=dev),
            lr_scale=self.scalar(params, 1.0),
            best=self.scalar(params, float("inf")),
            bad_epochs=initial_count(backend, dev),
        )

    @staticmethod
    def _split(batch: Any, summary_batch: Any) -> tuple[Batch, Batch]:
        if summary_batch is not None:
            return batch, summary_batch
        if (isinstance(batch, tuple | list) and len(batch) == 2
                and all(isinstance(b, tuple | list) and len(b) == 2 for b in batch)):
            return tuple(batch[0]), tuple(batch[1])
        return batch, batch

    def direction_step(self, g_bar: Array, h_bar: Array, d3: Array | None,
                       lambda_int: Any = None) -> tuple[Array, Array, Array, Array]:
        """``(eta, ok, iterations, residual)``: the plain or cubic step from the summaries
        (``lambda_int``: the value in force, default the constructor's number)."""
        if lambda_int is None:
            lambda_int = self.lambda_int
        if self._plain:
            eta, ok = plain_step(g_bar, h_bar, require_pd=True, rcond=self.rcond)
            xp = backend_of(eta).xp
            return eta, ok, xp.asarray(0, device=backend_of(eta).device(eta)), \
                xp.full_like(eta[0], float("nan"))
        return cubic_step(g_bar, h_bar, d3, lambda_int, d_floor=self.d_floor,
                          max_iter=self.max_iter, rcond=self.rcond)

    def step(self, params: Tree, state: GroupedNewtonState, batch: Any,
             summary_batch: Batch | None = None) -> tuple[Tree, GroupedNewtonState, StepInfo]:
        backend = self.check_batch(params, state, batch)
        grad_batch, sum_batch = self._split(batch, summary_batch)
        xp = backend.xp
        part = self.partition(params)
        loss, g = self.value_and_grad(params, grad_batch)
        first = state.count == 0
        mu_g, mu_eta = self.mu_g, self.mu_eta
        lambda_int = resolve(self.lambda_int, state.count, params)
        g_mom = tree_map(lambda m, gi: xp.where(first, gi, mu_g * m + (1.0 - mu_g) * gi),
                         state.g, g)

        def compute(u: Tree) -> tuple[Array, Array, Array]:
            g_bar, h_bar, d3 = summaries(lambda p: self.objective(p, sum_batch), params, u,
                                         part, third=not self._plain, backend=backend)
            eta, ok, iters, residual = self.direction_step(g_bar, h_bar, d3, lambda_int)
            pos = xp.maximum(eta, xp.zeros_like(eta))  # NaN (failed solve) propagates
            # eta~ exists from the first step on: t = 0 always refreshes (0 % tau == 0), and the
            # guard keeps or rejects t together with eta
            new = xp.where(state.count > 0, mu_eta * state.eta + (1.0 - mu_eta) * pos, pos)
            return new, xp.astype(iters, state.count.dtype), xp.astype(residual, loss.dtype)

        def keep(u: Tree) -> tuple[Array, Array, Array]:
            return state.eta, xp.zeros_like(state.count), xp.full_like(loss, float("nan"))

        eta_t, iters, residual = every(backend, state.count, self.tau, compute, keep, g_mom)
        lr = resolve(self.lr_factor, state.count, params) * state.lr_scale
        delta = part.expand(eta_t, g_mom)
        new = tree_map(lambda w, dw: w - lr * dw, params, delta)
        new_state = state._replace(count=state.count + 1, g=g_mom, eta=eta_t)
        params, state, ok, step_norm = self.guard(params, state, new, new_state, loss, g_mom,
                                                  eta_t)
        return params, state, self.info(params, loss, step_norm, finite=ok,
                                        inner_iterations=iters, inner_residual=residual)

    def plateau(self, state: GroupedNewtonState, metric: Array) -> GroupedNewtonState:
        """ReduceLROnPlateau (mode min, relative threshold): call once per epoch. After more than
        ``patience`` epochs without a relative improvement of ``plateau_threshold``,
        ``lr_scale`` is multiplied by ``plateau_factor`` and the count restarts."""
        xp = backend_of(state.lr_scale).xp
        better = metric < state.best * (1.0 - self.plateau_threshold)
        best = xp.where(better, metric, state.best)
        bad = xp.where(better, xp.zeros_like(state.bad_epochs), state.bad_epochs + 1)
        reduce = bad > self.patience
        return state._replace(
            best=xp.astype(best, state.best.dtype),
            lr_scale=xp.where(reduce, state.lr_scale * self.plateau_factor, state.lr_scale),
            bad_epochs=xp.where(reduce, xp.zeros_like(bad), bad))
