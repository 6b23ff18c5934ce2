"""Prox-linear directions through the primal and the dual (dual Gauss-Newton), and the
``ProxLinear`` optimiser.

Notation (``../shared/specs/prox_linear_dual.md``): a batch of m samples, network outputs
F = f_S(w) of shape (m, k), per-sample loss gradients G = grad l_i(F_i) (rows) and Hessians
H = blockdiag(H_i); J the Jacobian of w -> F, so J u is one batched JVP and J^T v one VJP.

Scaling. The objective of every optimiser here is the **mean** loss h = (1/m) sum_i l_i(f_i)
(as everywhere in ``secondorder``). The prox-linear subproblem is

    d = argmin_d (1/m) sum_i q_i(f_i - J_i d) + 1/(2 gamma) |d|^2,

with q_i the quadratic (Gauss-Newton) model of l_i at f_i. Multiplied by m this is the sheet's
sum form sum_i q_i(...) + m/(2 gamma) |d|^2, so every formula of the sheet holds verbatim with
gt = gamma / m:

* primal: (J^T H J + (m/gamma) I) d = J^T G, i.e. (GGN + I/gamma) d = grad h;
* dual: Q beta = c, Q = P (H^+ + gt J J^T) P, c = gt P J J^T G, beta from 0 by CG;
  alpha = G - beta and d = gt J^T alpha. With zero CG steps d = gt J^T G = gamma grad h.

gamma is therefore a step size on the mean loss (d -> gamma grad h as gamma -> 0).

Cost per direction with tau inner steps: primal tau (JVP + VJP + O(p)) + one VJP (for J^T G);
dual tau (JVP + VJP + O(m k)) + one VJP: the final VJP J^T beta is folded into CG (each CG
product computes J^T p for the search direction p anyway, and J^T x is accumulated with the same
step lengths), so the dual needs no extra VJP after CG. One linearisation (forward pass, JVP and
VJP closures) is shared by every product.

Options: ``scaled=True`` solves the dual in the variables z = D^{-1/2} beta (the sheet's D^{1/2}
change of variables; D = diag(softmax) for softmax cross-entropy, diag(s (1 - s)) for sigmoid
BCE, I for the squared loss), where the H^+ term becomes the identity and the constraint
1^T beta = 0 becomes sqrt(s)^T z = 0. The l1-regularised variant (Algorithm 3) takes
w <- soft_threshold(w - d, gamma lambda).

Not implemented: the exact (non-quadratic) dual of the logistic prox-linear problem solved by
projected gradient on the simplex.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, NamedTuple

from .._pytree import tree_map
from ..backends import backend_of
from ..curvature import Linearization
from ..errors import NonFiniteError
from ..linalg import cg
from ..losses import MSE, Loss, SigmoidBCE, SoftmaxCrossEntropy
from ..tree import axpy, vdot
from .base import Array, Batch, Optimizer, StepInfo, Tree, is_number

SOLVERS = ("dual", "primal")
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


def _targets(loss: Loss, f: Array, y: Array) -> Array:
    return loss.targets(f, y) if isinstance(loss, SoftmaxCrossEntropy) else y


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
    raise ValueError(f"scaled=True needs MSE, SoftmaxCrossEntropy or SigmoidBCE, got {loss!r}")


def _linearize(apply: Callable, params: Tree, x: Array) -> Linearization:
    return Linearization(apply, params, x)


def dual_direction(lin: Linearization, loss: Loss, y: Array, *, gamma: Any, inner_steps: int,
                   scaled: bool = False, tol: float = 1e-10) -> Direction:
    """The prox-linear direction through the dual: CG from beta = 0 on Q beta = c (see the
    module docstring), ``inner_steps`` iterations at most; CG stops early (the iterate is kept)
    once the projected residual falls to ``tol`` |c| or a search direction has non-positive
    curvature (running CG past dim range(P) in rounding error is what the sheet warns about).
    Returns alpha = G - beta, beta and d = (gamma/m) J^T alpha."""
    f = lin.outputs
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
    f = lin.outputs
    xp = lin.backend.xp
    m = f.shape[0]
    g = loss.grad(f, y)
    jtg = lin.vjp(g)
    damping = m / gamma

    def matvec(v: Tree) -> Tree:
        return axpy(damping, v, lin.vjp(loss.hvp(f, y, lin.jvp(v))))

    atol = tol * xp.sqrt(vdot(jtg, jtg))
    d, info = cg(matvec, jtg, tol=None, maxiter=int(inner_steps), atol=atol)
    return Direction(d, jtg, None, None, info.iterations, info.residual_norm)


def prox_linear_direction(apply: Callable, loss: Loss, params: Tree, batch: Batch, *,
                          gamma: Any = 1.0, inner_steps: int = 2, solver: str = "dual",
                          scaled: bool = False, tol: float = 1e-10,
                          lin: Linearization | None = None) -> Direction:
    """The prox-linear direction of the quadratic model on ``batch`` (see the module docstring
    for the scaling): ``solver="dual"`` or ``"primal"``. ``lin`` reuses a linearisation."""
    x, y = batch
    if lin is None:
        lin = _linearize(apply, params, x)
    if solver == "dual":
        return dual_direction(lin, loss, y, gamma=gamma, inner_steps=inner_steps, scaled=scaled,
                              tol=tol)
    if solver == "primal":
        return primal_direction(lin, loss, y, gamma=gamma, inner_steps=inner_steps, tol=tol)
    raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")


# ------------------------------------------------------------------------------ optimiser


class ProxLinear(Optimizer):
    """Stochastic prox-linear (SPL) steps from the dual or primal Gauss-Newton direction.

    Each step computes one linearisation of the network on the batch and the direction d of
    :func:`prox_linear_direction` (``solver``, ``inner_steps`` CG iterations, ``gamma``,
    ``scaled``), then updates by one of:

    * ``update="spl"`` (default): w <- w - d; gamma acts as the step size. With ``l1 = lambda >
      0`` this is Algorithm 3 for h + lambda |w|_1: w <- soft_threshold(w - d, gamma lambda).
    * ``update="armijo"``: gamma defaults to 1 (the paper's choice) and w <- w - eta d with
      backtracking: eta starts at ``eta0`` (1.0) and is multiplied by ``shrink`` (0.5) until
      h(w - eta d) <= h(w) - c1 eta <d, grad h> with c1 = 1e-4, at most ``max_trials`` (30)
      evaluations of the batch loss (a backend while_loop). If no trial passes, or
      <d, grad h> is not positive, the step is rejected and the parameters kept.
    * ``optimizer=SGD(...)`` or ``Adam(...)`` (with ``update="spl"``): the direction divided by
      gamma (which tends to the gradient as gamma -> 0) is handed to that optimiser in place of
      the gradient; its state lives under ``state["inner"]``. Works for any optimiser whose step
      obtains its gradient from ``self.value_and_grad`` (SGD, Adam, AdamW).

    State: ``{"eta": last accepted Armijo step (0-d)}`` or ``{"inner": ...}``. ``info.damping``
    is the Levenberg-Marquardt damping 1/gamma of the mean-loss model, ``info.inner_iterations``
    the CG iterations and ``info.inner_residual`` the final CG residual. A non-finite loss,
    direction or update keeps the old parameters (on eager backends a batch with NaN or inf is
    rejected the same way).
    """

    def __init__(self, apply: Callable, loss: Loss, *, solver: str = "dual",
                 inner_steps: int = 2, gamma: float | None = None, update: str = "spl",
                 scaled: bool = False, l1: float = 0.0, optimizer: Optimizer | None = None,
                 c1: float = 1e-4, eta0: float = 1.0, shrink: float = 0.5,
                 max_trials: int = 30, tol: float = 1e-10):
        super().__init__(apply, loss)
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if update not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES}, got {update!r}")
        if int(inner_steps) != inner_steps or inner_steps < 0:
            raise ValueError(f"inner_steps must be an integer >= 0, got {inner_steps}")
        if gamma is None:
            gamma = 1.0
        if is_number(gamma) and not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        if not (0 < c1 < 1 and eta0 > 0 and 0 < shrink < 1 and int(max_trials) >= 1):
            raise ValueError("Armijo needs 0 < c1 < 1, eta0 > 0, 0 < shrink < 1, max_trials >= 1")
        if is_number(l1) and l1 < 0:
            raise ValueError(f"l1 must be >= 0, got {l1}")
        if (l1 or optimizer is not None) and update != "spl":
            raise ValueError("l1 and optimizer= work with update='spl' only")
        if l1 and optimizer is not None:
            raise ValueError("l1 and optimizer= cannot be combined")
        if scaled and solver != "dual":
            raise ValueError("scaled=True is a change of variables of the dual solver")
        self.solver, self.inner_steps, self.gamma, self.update = solver, int(inner_steps), \
            gamma, update
        self.scaled, self.l1, self.optimizer, self.tol = bool(scaled), l1, optimizer, tol
        self.c1, self.eta0, self.shrink, self.max_trials = c1, eta0, shrink, int(max_trials)

    def __repr__(self) -> str:
        return (f"ProxLinear(solver={self.solver!r}, inner_steps={self.inner_steps}, "
                f"gamma={self.gamma}, update={self.update!r})")

    def init(self, params: Tree) -> dict[str, Array]:
        if self.optimizer is not None:
            return {"inner": self.optimizer.init(params)}
        return {"eta": self.scalar(params, self.eta0 if self.update == "armijo" else 1.0)}

    def _reject(self, params: Tree, state: dict, loss: Array) -> tuple:
        nan = self.scalar(params, float("nan"))
        params, state, ok, step_norm = self.guard(params, state, params, state, nan)
        return params, state, self.info(params, loss, step_norm, 1.0 / self.gamma, ok, 0,
                                        float("nan"))

    def step(self, params: Tree, state: dict[str, Array], batch: Batch
             ) -> tuple[Tree, dict[str, Array], StepInfo]:
        x, y = batch
        try:
            lin = _linearize(self.apply, params, x)
        except NonFiniteError:
            return self._reject(params, state, self.scalar(params, float("nan")))
        xp = lin.backend.xp
        loss = self.loss.value(lin.outputs, y)
        m = lin.outputs.shape[0]
        res = prox_linear_direction(self.apply, self.loss, params, batch, gamma=self.gamma,
                                    inner_steps=self.inner_steps, solver=self.solver,
                                    scaled=self.scaled, tol=self.tol, lin=lin)
        d = res.direction
        checks = (d,)
        if self.optimizer is not None:
            shim = copy.copy(self.optimizer)
            scaled_d = tree_map(lambda a: a / self.gamma, d)
            shim.value_and_grad = lambda p, b: (loss, scaled_d)
            new, inner, _ = shim.step(params, state["inner"], batch)
            new_state = {"inner": inner}
        elif self.update == "spl":
            new = tree_map(lambda w, a: w - a, params, d)
            if self.l1:
                new = soft_threshold(new, self.gamma * self.l1)
            new_state = state
        else:
            slope = vdot(d, res.grad) / m  # <d, grad h> with h the mean loss
            inf = self.scalar(params, float("inf"))

            def trial(eta: Array) -> Array:
                value = self.objective(tree_map(lambda w, a: w - eta * a, params, d), batch)
                return xp.where(xp.isfinite(value), value, inf)

            def failing(eta: Array, value: Array) -> Array:
                return value > loss - self.c1 * eta * slope

            eta0 = self.scalar(params, self.eta0)
            one = xp.asarray(1, device=lin.backend.device(lin.outputs))

            def cond(s: tuple) -> Array:
                eta, value, n = s
                return xp.logical_and(failing(eta, value), n < self.max_trials)

            def body(s: tuple) -> tuple:
                eta, _, n = s
                eta = eta * self.shrink
                return eta, trial(eta), n + 1

            eta, value, _ = lin.backend.while_loop(cond, body, (eta0, trial(eta0), one))
            accept = xp.logical_and(xp.logical_not(failing(eta, value)), slope > 0)
            eta = xp.where(accept, eta, xp.zeros_like(eta))
            new = tree_map(lambda w, a: w - eta * a, params, d)
            new_state = {"eta": eta}
        params, state, ok, step_norm = self.guard(params, state, new, new_state, loss, *checks)
        return params, state, self.info(params, loss, step_norm, 1.0 / self.gamma, ok,
                                        res.iterations, res.residual)
