"""Prox-linear directions through the primal and the dual (dual Gauss-Newton), and the
``ProxLinear`` optimiser.

Notation (the dual Gauss-Newton paper's): a batch of m samples, network outputs
F = f_S(w) of shape (m, k), per-sample loss gradients G = grad l_i(F_i) (rows) and Hessians
H = blockdiag(H_i); J the Jacobian of w -> F, so J u is one batched JVP and J^T v one VJP.

Scaling. The objective of every optimiser here is the **mean** loss h = (1/m) sum_i l_i(f_i)
(as everywhere in ``secondorder``). The prox-linear subproblem is

    d = argmin_d (1/m) sum_i q_i(f_i - J_i d) + 1/(2 gamma) |d|^2,

with q_i the quadratic (Gauss-Newton) model of l_i at f_i. Multiplied by m this is the paper's
sum form sum_i q_i(...) + m/(2 gamma) |d|^2 (its eq. 4), so every formula of the paper holds
verbatim with gt = gamma / m:

* primal (Algorithm 1): (J^T H J + (m/gamma) I) d = J^T G, i.e. (GGN + I/gamma) d = grad h;
* dual (Prop. 6 and Prop. 10): Q beta = c, Q = P (H^+ + gt J J^T) P, c = gt P J J^T G, P the
  projector H H^+ onto the range of H, beta from 0 by CG;
  alpha = G - beta and d = gt J^T alpha. With zero CG steps d = gt J^T G = gamma grad h.

gamma is therefore a step size on the mean loss (d -> gamma grad h as gamma -> 0).

Cost per direction with tau inner steps: primal tau (JVP + VJP + O(p)) + one VJP (for J^T G);
dual tau (JVP + VJP + O(m k)) + one VJP: the final VJP J^T beta is folded into CG (each CG
product computes J^T p for the search direction p anyway, and J^T x is accumulated with the same
step lengths), so the dual needs no extra VJP after CG. One linearisation (forward pass, JVP and
VJP closures) is shared by every product.

Options: ``scaled=True`` solves the dual in the variables z = D^{-1/2} beta (the paper's
D^{1/2} preconditioning as a change of variables; D = diag(softmax) for softmax cross-entropy,
diag(s (1 - s)) for sigmoid BCE, I for the squared loss), where the H^+ term becomes the
identity and the constraint 1^T beta = 0 becomes sqrt(s)^T z = 0. The l1-regularised variant
(Algorithm 3) takes w <- soft_threshold(w - d, gamma lambda).

Exact logistic dual (``solver="exact-dual"``, softmax cross-entropy only): instead of the
quadratic model, the exact prox-linear problem (the paper's eq. 3, evaluated at w - d)

    d = argmin_d sum_i l_i(f_i - J_i d) + m/(2 gamma) |d|^2

is solved through its dual over mu_i = y_i + alpha_i in the probability simplex (per sample),

    min_mu  Phi(mu) = sum_i <mu_i, log mu_i> - <mu - Y, F> + (gt/2) |J^T (mu - Y)|^2,

with d = gt J^T (mu - Y) and primal optimum = - Phi(mu*); see
:func:`exact_logistic_dual_direction` (projected gradient with backtracking, Euclidean
projection on the simplex by bisection on the threshold).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from .._pytree import tree_map
from ..backends import backend_of
from ..curvature import Linearization
from ..errors import HyperparameterError
from ..linalg import cg
from ..losses import MSE, Loss, SigmoidBCE, SoftmaxCrossEntropy
from ..tree import add, axpy, norm, scale, sub, vdot
from .base import Array, Batch, Optimizer, StepInfo, Tree, is_number, select
from .gradient_descent import GradientDescent
from .line_search import backtracking, check_line_search
from .schedules import Schedule, resolve
from .state import initial_count, method_state
from .transforms import GradientTransformation

SOLVERS = ("dual", "primal", "exact-dual")
UPDATES = ("spl", "armijo")


# ------------------------------------------------------------------------------ helpers


def soft_threshold(z: Tree, t: Any) -> Tree:
    """ST_t(z) = sign(z) max(|z| - t, 0), leaf by leaf (the prox of t |.|_1)."""
    def st(a: Array) -> Array:
        xp = backend_of(a).xp
        return xp.sign(a) * xp.maximum(xp.abs(a) - t, xp.zeros_like(a))

    return tree_map(st, z)


class Direction(NamedTuple):
    """A prox-linear direction and how it was computed.

    ``direction`` is d (a tree like the parameters; the step is w - d); ``grad`` is J^T G
    (= m grad h, the sum-form gradient); ``alpha`` and ``beta`` are the dual variables
    (None for the primal solver); ``iterations`` and ``residual`` report CG.
    """

    direction: Tree
    grad: Tree
    alpha: Array | None
    beta: Array | None
    iterations: Array
    residual: Array


def dual_scaling(loss: Loss, f: Array, y: Array) -> tuple[Array, Callable[[Array], Array]]:
    """(D^{1/2}, projector) of the scaled dual: beta = D^{1/2} z, z constrained to the range of
    the returned projector (softmax CE: z orthogonal to sqrt(s); sigmoid BCE: zero where the
    curvature is zero; squared loss: no constraint)."""
    xp = backend_of(f).xp
    if isinstance(loss, MSE):
        return xp.ones_like(f), lambda v: v
    if isinstance(loss, SoftmaxCrossEntropy):
        s, w = loss._support(f)
        r = xp.sqrt(s) * w
        rr = xp.sum(r * r, axis=1, keepdims=True)

        def project(v: Array) -> Array:
            return w * (v - r * xp.sum(r * v, axis=1, keepdims=True) / rr)

        return r, project
    if isinstance(loss, SigmoidBCE):
        h, ok = loss._nonzero(f)
        root = xp.where(ok, xp.sqrt(xp.where(ok, h, xp.ones_like(h))), xp.zeros_like(h))

        def project_mask(v: Array) -> Array:
            return xp.where(ok, v, xp.zeros_like(v))

        return root, project_mask
    raise HyperparameterError(
        f"scaled=True needs MSE, SoftmaxCrossEntropy or SigmoidBCE, got {loss!r}")


def dual_direction(lin: Linearization, loss: Loss, y: Array, *, gamma: Any, inner_steps: int,
                   scaled: bool = False, tol: float = 1e-10) -> Direction:
    """The prox-linear direction through the dual: CG from beta = 0 on Q beta = c (see the
    module docstring), ``inner_steps`` iterations at most; CG stops early (the iterate is kept)
    once the projected residual falls to ``tol`` |c| or a search direction has non-positive
    curvature (running CG past dim range(P) only accumulates rounding error).
    Returns alpha = G - beta, beta and d = (gamma/m) J^T alpha."""
    f = lin.two_dimensional("prox-linear")
    backend = lin.backend
    xp = backend.xp
    m = f.shape[0]
    gt = gamma / m
    g = loss.grad(f, y)
    jtg = lin.vjp(g)  # J^T G = m grad h: kept for the direction and the line search
    kg = lin.jvp(jtg)  # J J^T G
    if scaled:
        root, project = dual_scaling(loss, f, y)

        def lift(z: Array) -> Array:  # beta = D^{1/2} z
            return root * z

        def parts(v: Array) -> tuple[Array, Tree]:
            w = lin.vjp(root * v)
            return project(v + gt * root * lin.jvp(w)), w

        c = project(gt * root * kg)
    else:
        def project(v: Array) -> Array:
            return loss.projector(f, y, v)

        def lift(z: Array) -> Array:
            return z

        def parts(v: Array) -> tuple[Array, Tree]:
            pv = project(v)
            w = lin.vjp(pv)
            return project(loss.pinv_hvp(f, y, pv) + gt * lin.jvp(w)), w

        c = project(gt * kg)

    eps = xp.finfo(f.dtype).eps
    atol = tol * xp.sqrt(xp.sum(c * c))
    zero = xp.zeros_like(c)
    r0 = c
    z0 = project(r0)
    rz0 = xp.sum(r0 * z0)
    k0 = xp.asarray(0, device=backend.device(f))
    done0 = xp.sqrt(xp.where(rz0 > 0, rz0, 0.0)) <= atol
    state = (k0, zero, tree_map(xp.zeros_like, jtg), r0, z0, rz0, done0)

    def body(i: Any, state: tuple) -> tuple:
        k, x, xj, r, p, rz, done = state
        qp, wp = parts(p)
        pap = xp.sum(p * qp)
        curved = pap > eps * xp.sum(p * p)
        active = xp.logical_and(xp.logical_not(done), curved)
        a = xp.where(active, rz / xp.where(curved, pap, 1.0), 0.0)
        x = x + a * p
        xj = axpy(a, wp, xj)
        r = r - a * qp
        z = project(r)
        rz_new = xp.sum(r * z)
        ok = xp.logical_and(xp.isfinite(rz_new), rz_new > 0)
        b = xp.where(rz > 0, rz_new / xp.where(rz > 0, rz, 1.0), 0.0)
        p = xp.where(active, z + b * p, p)
        res = xp.sqrt(xp.where(ok, rz_new, 0.0))
        stop = xp.logical_or(xp.logical_not(ok), res <= atol)
        done = xp.logical_or(done, xp.logical_or(xp.logical_not(curved), stop))
        return (k + xp.astype(active, k.dtype), x, xj, r, p, xp.where(active, rz_new, rz), done)

    k, zsol, xj, r, _, _, _ = backend.fori_loop(0, int(inner_steps), body, state)
    beta = lift(zsol)
    alpha = g - beta
    direction = tree_map(lambda a, b: gt * (a - b), jtg, xj)
    pr = project(r)
    return Direction(direction, jtg, alpha, beta, k, xp.sqrt(xp.sum(pr * pr)))


def primal_direction(lin: Linearization, loss: Loss, y: Array, *, gamma: Any, inner_steps: int,
                     tol: float = 1e-10) -> Direction:
    """The prox-linear direction through the primal (Algorithm 1): CG from 0 on
    (J^T H J + (m/gamma) I) d = J^T G, ``inner_steps`` iterations at most."""
    f = lin.two_dimensional("prox-linear")
    m = f.shape[0]
    g = loss.grad(f, y)
    jtg = lin.vjp(g)
    damping = m / gamma

    def matvec(v: Tree) -> Tree:
        return axpy(damping, v, lin.vjp(loss.hvp(f, y, lin.jvp(v))))

    atol = tol * norm(jtg)
    d, info = cg(matvec, jtg, tol=None, maxiter=int(inner_steps), atol=atol)
    return Direction(d, jtg, None, None, info.iterations, info.residual_norm)


def project_simplex_rows(v: Array, bisection_steps: int = 60) -> Array:
    """Euclidean projection of every row of ``v`` onto the probability simplex, jit-friendly.

    The projection is max(v - tau, 0) with tau the root of phi(tau) = sum_j max(v_j - tau, 0) - 1,
    which is non-increasing and lies in [max(v) - 1, max(v)). ``bisection_steps`` halvings of that
    bracket (60: width 2^-60 |bracket| in float64) locate the support {v_j > lo}; tau is then
    recomputed exactly on it, tau = (sum_support v_j - 1) / |support|, so the rows sum to 1 to
    rounding (no sort, no data-dependent shapes)."""
    backend = backend_of(v)
    xp = backend.xp
    zero = xp.zeros_like(v)
    hi = xp.max(v, axis=1, keepdims=True)
    lo = hi - 1.0

    def body(i: Any, s: tuple) -> tuple:
        lo, hi = s
        mid = 0.5 * (lo + hi)
        big = xp.sum(xp.maximum(v - mid, zero), axis=1, keepdims=True) >= 1.0
        return xp.where(big, mid, lo), xp.where(big, hi, mid)

    lo, _ = backend.fori_loop(0, int(bisection_steps), body, (lo, hi))
    support = xp.astype(v > lo, v.dtype)
    tau = (xp.sum(support * v, axis=1, keepdims=True) - 1.0) / xp.sum(support, axis=1,
                                                                       keepdims=True)
    return xp.maximum(v - tau, zero)


def exact_logistic_dual_direction(apply: Callable, loss: Loss, params: Tree, batch: Batch, *,
                                  gamma: Any, steps: int = 100, step_size: Any = None,
                                  lin: Linearization | None = None, shrink: float = 0.5,
                                  max_trials: int = 40, bisection_steps: int = 60) -> Direction:
    """The exact (non-quadratic) prox-linear direction of softmax cross-entropy via its dual.

    Solves (module docstring, sum form with gt = gamma / m)

        min over mu_i in the simplex:  Phi(mu) = sum_i <mu_i, log mu_i> - <mu - Y, F>
                                                 + (gt/2) |J^T (mu - Y)|^2

    (l*(alpha) = <mu, log mu> on the simplex, mu = Y + alpha) by ``steps`` iterations of
    projected gradient mu <- Proj_simplex(mu - t grad Phi(mu)), with
    grad Phi = log mu + 1 - F + gt J J^T (mu - Y) (the constant 1 does not change the projection
    and is dropped). The start is mu = softmax(F), i.e. alpha = G (then J^T alpha = J^T G is the
    gradient VJP, reused). Each iteration costs one JVP (J w for the accepted w = J^T (mu - Y))
    and one VJP per trial step, all on the one linearisation. log is taken of max(mu, floor),
    floor = sqrt(tiny) of the dtype, so iterates on the boundary stay finite and are pushed back
    inside (the optimum mu_i* = softmax(f_i - J_i d*) is interior).

    Step size. The log term has curvature 1/mu, unbounded near the boundary, so no global
    Lipschitz step exists. ``step_size=None`` (default) uses backtracking: each iteration first
    tries twice the last accepted step (the first try is min(mu^0), the inverse curvature of the
    entropy at the start) and multiplies it by ``shrink`` (0.5) until the sufficient-decrease
    test Phi(mu+) <= Phi(mu) + <grad, mu+ - mu> + |mu+ - mu|^2 / (2 t) holds, at most
    ``max_trials`` (40) trials, the test allowing a rounding slack of 16 eps (1 + |Phi|); if
    none passes, the iterate and the step are kept. Phi is thus non-increasing up to rounding.
    A number ``step_size`` gives plain fixed-step projected gradient (one VJP and one JVP per
    iteration, no test; the caller must pick t <= 1 / L near the iterates).

    Returns d = gt J^T (mu - Y) in a :class:`Direction` with alpha = mu - Y, beta = G - alpha,
    ``iterations`` the number of accepted steps and ``residual`` the norm of the unit-step
    gradient mapping |mu - Proj(mu - grad Phi(mu))| at the end (zero exactly at the optimum).
    The primal optimum of eq. 3 is - Phi(mu*). Since the step test compares objective values,
    mu (and d) are resolved to about sqrt(eps) relative (1e-8 in float64), Phi to eps.
    """
    if not isinstance(loss, SoftmaxCrossEntropy):
        raise HyperparameterError(
            "the exact logistic dual needs SoftmaxCrossEntropy (its conjugate is the entropy on "
            f"the simplex), got {loss!r}")
    if int(steps) != steps or steps < 0:
        raise HyperparameterError(f"steps must be an integer >= 0, got {steps}")
    x, y = batch
    if lin is None:
        lin = Linearization(apply, params, x)
    f = lin.two_dimensional("prox-linear")
    backend = lin.backend
    xp = backend.xp
    m = f.shape[0]
    gt = gamma / m
    yt = loss.targets(f, y)
    g = loss.grad(f, y)
    floor = float(xp.finfo(f.dtype).smallest_normal) ** 0.5
    floor_arr = xp.full_like(f, floor)

    def logs(mu: Array) -> Array:
        return xp.log(xp.maximum(mu, floor_arr))

    def objective(mu: Array, w: Tree) -> Array:
        return xp.sum(mu * logs(mu)) - xp.sum((mu - yt) * f) + 0.5 * gt * vdot(w, w)

    def gradient(mu: Array, kw: Array) -> Array:
        return logs(mu) - f + gt * kw

    mu0 = g + yt  # softmax(F)
    jtg = lin.vjp(g)  # J^T (mu0 - Y) = J^T G = m grad h
    w0 = jtg
    phi0 = objective(mu0, w0)
    fixed = step_size is not None
    if fixed:
        t0 = xp.asarray(step_size, dtype=f.dtype, device=backend.device(f))
    else:
        t0 = xp.min(mu0) / 2.0  # doubled before the first trial
    trials = 1 if fixed else int(max_trials)
    grow = 1.0 if fixed else 2.0
    k0 = xp.asarray(0, device=backend.device(f))
    slack = 16.0 * float(xp.finfo(f.dtype).eps)

    def body(i: Any, state: tuple) -> tuple:
        mu, w, kw, phi, t, k = state
        gr = gradient(mu, kw)

        def attempt(t: Array) -> tuple:
            mu_n = project_simplex_rows(mu - t * gr, bisection_steps)
            w_n = lin.vjp(mu_n - yt)
            phi_n = objective(mu_n, w_n)
            step = mu_n - mu
            bound = (phi + xp.sum(gr * step) + xp.sum(step * step) / (2.0 * t)
                     + slack * (1.0 + xp.abs(phi)))
            finite = xp.isfinite(phi_n)
            return mu_n, w_n, phi_n, finite if fixed else xp.logical_and(finite, phi_n <= bound)

        t1 = grow * t
        one = xp.asarray(1, device=backend.device(f))

        def cond(s: tuple) -> Array:
            return xp.logical_and(xp.logical_not(s[4]), s[5] < trials)

        def retry(s: tuple) -> tuple:
            tn = s[0] * shrink
            return (tn, *attempt(tn), s[5] + 1)

        tn, mu_n, w_n, phi_n, ok, _ = backend.while_loop(cond, retry, (t1, *attempt(t1), one))
        mu = xp.where(ok, mu_n, mu)
        w = select(ok, w_n, w)
        phi = xp.where(ok, phi_n, phi)
        return mu, w, lin.jvp(w), phi, xp.where(ok, tn, t), k + xp.astype(ok, k.dtype)

    state = (mu0, w0, lin.jvp(w0), phi0, t0, k0)
    mu, w, kw, _, t, k = backend.fori_loop(0, int(steps), body, state)
    mapped = mu - project_simplex_rows(mu - gradient(mu, kw), bisection_steps)
    alpha = mu - yt
    return Direction(scale(gt, w), jtg, alpha, g - alpha, k,
                     xp.sqrt(xp.sum(mapped * mapped)))


def prox_linear_direction(apply: Callable, loss: Loss, params: Tree, batch: Batch, *,
                          gamma: Any = 1.0, inner_steps: int = 2, solver: str = "dual",
                          scaled: bool = False, tol: float = 1e-10,
                          lin: Linearization | None = None) -> Direction:
    """The prox-linear direction of the quadratic model on ``batch`` (see the module docstring
    for the scaling): ``solver="dual"`` or ``"primal"``; ``solver="exact-dual"`` solves the
    exact (non-quadratic) softmax cross-entropy problem instead, with ``inner_steps`` projected
    gradient steps (:func:`exact_logistic_dual_direction`). ``lin`` reuses a linearisation."""
    x, y = batch
    if lin is None:
        lin = Linearization(apply, params, x)
    if solver == "dual":
        return dual_direction(lin, loss, y, gamma=gamma, inner_steps=inner_steps, scaled=scaled,
                              tol=tol)
    if solver == "primal":
        return primal_direction(lin, loss, y, gamma=gamma, inner_steps=inner_steps, tol=tol)
    if solver == "exact-dual":
        return exact_logistic_dual_direction(apply, loss, params, batch, gamma=gamma,
                                             steps=inner_steps, lin=lin)
    raise HyperparameterError(f"solver must be one of {SOLVERS}, got {solver!r}")


# ------------------------------------------------------------------------------ optimiser


@method_state("ProxLinear")
class ProxLinearState(NamedTuple):
    """Step count, the last accepted Armijo step eta, and the update transform's state."""

    count: Array
    eta: Array
    inner: Any


class ProxLinear(Optimizer):
    """Stochastic prox-linear (SPL) steps from the dual or primal Gauss-Newton direction
    ("Dual Gauss-Newton Directions for Deep Learning").

    Each step linearises the network once on the batch and computes the prox-linear direction

        d = argmin_d (1/m) sum_i q_i(f_i - J_i d) + 1/(2 gamma) |d|^2
          = (GGN + I / gamma)^{-1} grad h                                  (eq. 4, mean form)

    with q_i the quadratic model of the loss of sample i and h the mean loss, by
    ``inner_steps`` CG iterations on the primal (Algorithm 1) or on the dual (alpha = G - beta,
    d = (gamma / m) J^T alpha; Prop. 6 and 10). As gamma -> 0, d -> gamma grad h: gamma is a
    step size on the mean loss. ``solver="exact-dual"`` (softmax cross-entropy only) solves the
    exact, non-quadratic problem (eq. 3) through its dual over the probability simplex by
    ``inner_steps`` projected gradient steps (:func:`exact_logistic_dual_direction`). Then

    * ``update="spl"`` (default): w <- w - d. With ``l1 = lambda > 0`` this is Algorithm 3 for
      h + lambda |w|_1: w <- soft_threshold(w - d, gamma lambda).
    * ``update="armijo"``: w <- w - eta d with backtracking: eta starts at ``eta0`` and is
      multiplied by ``shrink`` until h(w - eta d) <= h(w) - c1 eta <d, grad h>, at most
      ``max_trials`` loss evaluations (a backend while_loop). If no trial passes, or
      <d, grad h> is not positive, the step is rejected and the parameters kept.
    * ``transform=chain(...)`` or ``optimizer=SGD(...)`` (with ``update="spl"``): the direction
      divided by gamma (which tends to the gradient as gamma -> 0) goes through an update
      transform (:mod:`secondorder.optim.transforms`: momentum, Adam scaling, clipping,
      schedules) in place of the gradient (the paper's drop-in use of the direction).

    Parameters
    ----------
    apply, loss:
        The network ``apply(params, x)`` and the :class:`~secondorder.losses.Loss` (the scaled
        and exact duals need :class:`~secondorder.losses.MSE`,
        :class:`~secondorder.losses.SoftmaxCrossEntropy` or
        :class:`~secondorder.losses.SigmoidBCE`, respectively softmax cross-entropy).
    solver: {"dual", "primal", "exact-dual"}, default "dual"
        How the direction is computed.
    inner_steps: int, default 2
        CG iterations (projected gradient steps for ``"exact-dual"``), >= 0; with 0 the dual
        direction is gamma grad h.
    gamma: float, schedule or None, default None (= 1.0)
        The proximal step size, > 0 (``info.damping`` is 1/gamma, the Levenberg-Marquardt
        damping of the mean-loss model). A schedule (a callable ``t -> gamma_t`` of the step
        count t = 0, 1, ...) sets it at every step.
    update: {"spl", "armijo"}, default "spl"
        The update rule above.
    scaled: bool, default False
        Solve the dual in z = D^{-1/2} beta (the paper's D^{1/2} preconditioning; dual only).
    l1: float, default 0.0
        The l1 coefficient lambda of Algorithm 3 (``update="spl"`` without a transform).
    optimizer: optional
        A :class:`~secondorder.optim.GradientDescent` method (SGD, Adam, AdamW) whose transform
        chain takes the direction; exclusive with ``transform``.
    c1: float, default 1e-4
        The Armijo constant, in (0, 1).
    eta0: float or schedule, default 1.0
        The first Armijo trial step; a schedule of the step count sets it at every step.
    shrink: float, default 0.5
        The backtracking factor, in (0, 1).
    max_trials: int, default 30
        The most loss evaluations of one Armijo search.
    tol: float, default 1e-10
        Relative residual at which CG stops early.
    transform: optional
        An update transform applied to d / gamma (see above).

    Schedules are evaluated at the state's step count inside ``step`` (eagerly, under
    ``jax.jit`` and under ``jax.vmap``); a rejected step keeps the count.

    State and info. The state is a :class:`ProxLinearState` with the step count, ``eta`` (the
    last accepted Armijo step, 0-d) and ``inner`` (the transform's state, or an empty tuple).
    ``info.damping`` is 1/gamma, ``info.inner_iterations`` the CG iterations and
    ``info.inner_residual`` the final CG residual. A non-finite loss, direction or update keeps
    the old parameters (on eager backends a batch with NaN or inf is rejected the same way).
    """

    def __init__(self, apply: Callable, loss: Loss, *, solver: str = "dual",
                 inner_steps: int = 2, gamma: float | Schedule | None = None,
                 update: str = "spl", scaled: bool = False, l1: float = 0.0,
                 optimizer: Optimizer | None = None, c1: float = 1e-4,
                 eta0: float | Schedule = 1.0, shrink: float = 0.5,
                 max_trials: int = 30, tol: float = 1e-10,
                 transform: GradientTransformation | None = None):
        super().__init__(apply, loss)
        if solver not in SOLVERS:
            raise HyperparameterError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if update not in UPDATES:
            raise HyperparameterError(f"update must be one of {UPDATES}, got {update!r}")
        if int(inner_steps) != inner_steps or inner_steps < 0:
            raise HyperparameterError(f"inner_steps must be an integer >= 0, got {inner_steps}")
        if gamma is None:
            gamma = 1.0
        if is_number(gamma) and not gamma > 0:
            raise HyperparameterError(f"gamma must be > 0, got {gamma}")
        check_line_search("halve", c1, shrink, max_trials, eta0 if is_number(eta0) else 1.0)
        if is_number(l1) and l1 < 0:
            raise HyperparameterError(f"l1 must be >= 0, got {l1}")
        if optimizer is not None:
            if transform is not None:
                raise HyperparameterError("give optimizer= or transform=, not both")
            # a GradientDescent's transform is its whole update rule; other methods' transform=
            # (a clip on K-FAC's gradient, on CurveBall's step) is an add-on, not the method
            transform = (optimizer.transform if isinstance(optimizer, GradientDescent)
                         else None)
            if transform is None:
                raise HyperparameterError(
                    f"optimizer={optimizer!r} is not a GradientDescent method, whose update "
                    "rule (a transform chain) the prox-linear direction can take: pass SGD, "
                    "Adam or AdamW, or transform=chain(...)")
        if (l1 or transform is not None) and update != "spl":
            raise HyperparameterError("l1 and optimizer= / transform= work with update='spl' only")
        if l1 and transform is not None:
            raise HyperparameterError("l1 and optimizer= / transform= cannot be combined")
        if scaled and solver != "dual":
            raise HyperparameterError("scaled=True is a change of variables of the dual solver")
        if solver == "exact-dual" and not isinstance(loss, SoftmaxCrossEntropy):
            raise HyperparameterError("solver='exact-dual' (the exact logistic dual) needs "
                             f"SoftmaxCrossEntropy, got {loss!r}")
        self.solver, self.inner_steps, self.gamma, self.update = solver, int(inner_steps), \
            gamma, update
        self.scaled, self.l1, self.transform, self.tol = bool(scaled), l1, transform, tol
        self.c1, self.eta0, self.shrink, self.max_trials = c1, eta0, shrink, int(max_trials)

    State = ProxLinearState
    hyperparameters = {"inner_steps": "integer >= 0", "gamma": "> 0", "l1": ">= 0", "c1": "(0, 1)",
                       "eta0": "> 0", "shrink": "(0, 1)", "max_trials": "integer >= 1",
                       "tol": ">= 0"}  # noqa: RUF012

    def __repr__(self) -> str:
        return (f"ProxLinear(solver={self.solver!r}, inner_steps={self.inner_steps}, "
                f"gamma={self.gamma}, update={self.update!r})")

    def init(self, params: Tree) -> ProxLinearState:
        inner = () if self.transform is None else self.transform.init(params)
        eta = self.scalar(params, 1.0)
        count = initial_count(self.backend(params), self.backend(params).device(eta))
        if self.update == "armijo":
            eta = self.scalar(params, resolve(self.eta0, count, params))
        return ProxLinearState(count, eta, inner)

    def step(self, params: Tree, state: ProxLinearState, batch: Batch
             ) -> tuple[Tree, ProxLinearState, StepInfo]:
        self.check_batch(params, state, batch)
        x, y = batch
        lin = Linearization(self.apply, params, x, validate=False)  # the guard rejects NaN
        loss = self.loss.value(lin.two_dimensional("prox-linear"), y)
        m = lin.outputs.shape[0]
        gamma = resolve(self.gamma, state.count, params)
        res = prox_linear_direction(self.apply, self.loss, params, batch, gamma=gamma,
                                    inner_steps=self.inner_steps, solver=self.solver,
                                    scaled=self.scaled, tol=self.tol, lin=lin)
        d = res.direction
        # a NaN curvature product stops the inner CG at its start (the plain gradient step, a
        # finite d) but leaves NaN in the residual: checked so that such a step is rejected
        checks = (d, res.residual)
        eta = state.eta
        if self.transform is not None:
            scaled_d = tree_map(lambda a: a / gamma, d)
            updates, inner = self.transform.update(scaled_d, state.inner, params)
            new = add(params, updates)
            new_state = ProxLinearState(state.count + 1, eta, inner)
        else:
            if self.update == "spl":
                new = sub(params, d)
                if self.l1:
                    new = soft_threshold(new, gamma * self.l1)
            else:
                slope = vdot(d, res.grad) / m  # <d, grad h> with h the mean loss
                eta = backtracking(
                    lin.backend,
                    lambda e: self.objective(tree_map(lambda w, a: w - e * a, params, d), batch),
                    loss, -slope, self.scalar(params, resolve(self.eta0, state.count, params)),
                    c1=self.c1,
                    max_trials=self.max_trials, shrink=self.shrink).step
                new = tree_map(lambda w, a: w - eta * a, params, d)
            new_state = ProxLinearState(state.count + 1, eta, state.inner)
        params, state, ok, step_norm = self.guard(params, state, new, new_state, loss, *checks)
        return params, state, self.info(params, loss, step_norm, 1.0 / gamma, ok,
                                        res.iterations, res.residual)
