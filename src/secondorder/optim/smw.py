"""SMW-GN and SMW-NG: sub-sampled Gauss-Newton and natural-gradient steps inverted exactly by the
Sherman-Morrison-Woodbury formula (Y. Ren and D. Goldfarb, "Efficient subsampled Gauss-Newton
and natural gradient methods for training neural networks", 2019; Ch. 5 and Algorithm 23 of
Y. Ren's thesis, the seed ``002_cc6040582a98cbc3``).

Notation. A batch of N1 samples; its first N2 samples form the curvature batch S2 (Algorithm 23
draws S2 inside S1 at random; the batches are already random, so the first N2 samples are such
a subset, and the choice is the same on every backend and under ``jax.jit``). The network has
m_L outputs per sample, p parameters; J is the Jacobian of the S2 outputs, H = blockdiag(H_i)
the per-sample Hessians of the loss with respect to the outputs, K = J J^T the output-space Gram
matrix. Outputs (N1, T..., k), a sequence's logits, have m_L = T... k outputs per sample in
row-major order (H_i block diagonal over the positions for a cross-entropy per position). The
curvature and its damped form are

    B = (1/N2) J^T H J,      G = B + lambda I                       (5.2), (5.4)

with, for SMW-NG, J replaced by the matrix whose rows are the per-example gradients
grad l_i (i in S2) and H = I (the empirical Fisher (5.3)). The Sherman-Morrison-Woodbury
identity gives G^{-1} from an n x n system, n = N2 m_L for GN and n = N2 for NG:

    (5.6)  G^{-1} = (1/lambda) (I - (1/N2) J^T D^{-1} J),      D = lambda H^{-1} + (1/N2) K,
    (5.7)  G^{-1} = (1/lambda) (I - (1/N2) J^T H D^{-1} J),    D = lambda I + (1/N2) K H,

(5.7) for singular H (softmax cross-entropy: H_i = diag(s) - s s^T has the null vector 1).
The thesis states D as m_L x m_L for NG; it is N2 x N2 (one row per example; the sheet's
[Note]).

Gram matrices without per-example gradients (thesis sec. 5.3.3, Algorithms 21 and 22). A dense
layer's per-example gradient is the outer product delta a~^T of its output gradient delta and
its homogeneous input a~ = (a, 1), so

    NG:  <grad l_i, grad l_j> = sum_l (delta_i^T delta_j) (a~_i^T a~_j),
    GN:  (J_i J_j^T)_{c e} = sum_l (delta_{i,c}^T delta_{j,e}) (a~_i^T a~_j),

where delta_{i,c} = J_{h,i}^T e_c is the layer's output gradient of output c of sample i (the
thesis's partial VJPs). Layer taps give every layer's a~ and delta in one tapped forward pass and
one VJP per cotangent (NG: one, the loss gradients; GN: m_L, the unit vectors e_c), so memory is
O(N2^2 m_L^2 + p). Convolutions sum over output positions t:
<grad_i, grad_j> = sum_{t,s} (delta_it^T delta_js)(a~_it^T a~_js). A model without taps, or with
parameters outside its tapped layers, uses the Jacobian instead: the columns K e_c = J (J^T e_c)
by one VJP and one JVP each (n of them).

Every other product is output-space algebra on top of one JVP and one VJP: with v = J g,
w = D^{-1} v (5.6) or H D^{-1} v (5.7),

    p = -G^{-1} g = -(1/lambda) (g - (1/N2) J^T w),
    J p = -(1/lambda) (v - (1/N2) K w),   g^T p = -(1/lambda) (|g|^2 - (1/N2) v^T w),

so the quadratic model m(p) - m(0) = g^T p + 1/2 (1/N2) (J p)^T H (J p) costs no further pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

from .._pytree import flatten, tree_map
from ..backends import Backend, backend_of
from ..curvature.base import check_outputs
from ..errors import HyperparameterError, ShapeError, StructureError, UnsupportedModelError
from ..linalg.operator import has_native_vmap, map_columns
from ..losses import MSE, Loss, Scaled
from ..losses.base import sum_outputs
from ..models.base import Model, find_model
from ..tree import axpy, scale, vdot
from .base import Array, Batch, Optimizer, StepInfo, Tree, all_finite, is_number
from .schedules import Schedule, resolve
from .state import initial_count, method_state
from .step_rules import apply_transform, check_transform, init_transform

__all__ = ["SMWGN", "SMWNG", "SMWGNState", "SMWNGState", "gram_from_taps", "lm_damping",
           "smw_coefficients", "tap_gram"]

GRAMS = ("auto", "taps", "jacobian")
INVERSES = ("auto", "5.6", "5.7")


# ------------------------------------------------------------------------------ pieces
def block_diagonal(backend: Backend, blocks: Array) -> Array:
    """The (n k, n k) block-diagonal matrix of n blocks (n, k, k)."""
    xp = backend.xp
    n, k = int(blocks.shape[0]), int(blocks.shape[1])
    eye = xp.eye(n, dtype=blocks.dtype, device=backend.device(blocks))
    return xp.reshape(backend.einsum("ij,iab->iajb", eye, blocks), (n * k, n * k))


def smw_coefficients(gram: Array, v: Array, damping: Any, n2: int, hessian: Array | None = None,
                     *, formula: str = "5.6") -> Array:
    """The output-space vector w with G^{-1} g = (1/lambda) (g - (1/N2) J^T w), v = J g.

    ``gram`` is K = J J^T (n, n), ``v`` = J g (n,), ``damping`` lambda, ``n2`` = N2 and
    ``hessian`` the (n, n) block-diagonal H (None: H = I, SMW-NG). ``formula="5.6"``:
    w = D^{-1} v with D = lambda H^{-1} + K / N2 (H must be invertible);
    ``"5.7"``: w = H D^{-1} v with D = lambda I + K H / N2 (any H >= 0).
    """
    backend = backend_of(gram)
    xp = backend.xp
    n = int(gram.shape[0])
    eye = xp.eye(n, dtype=gram.dtype, device=backend.device(gram))
    if hessian is None:
        return xp.linalg.solve(damping * eye + gram / n2, v)
    if formula == "5.6":
        d = damping * xp.linalg.inv(hessian) + gram / n2
        return xp.linalg.solve(d, v)
    if formula == "5.7":
        d = damping * eye + (gram @ hessian) / n2
        return hessian @ xp.linalg.solve(d, v)
    raise HyperparameterError(f"unknown SMW formula {formula!r}: use '5.6' or '5.7'")


def tap_gram(backend: Backend, inputs: Array, deltas: Array) -> Array:
    """The Gram matrix of one tapped layer's per-example gradients, without forming them when
    that is cheaper.

    ``inputs`` are the layer's homogeneous inputs a~ (n, d_in) or, for a convolution, (n, T,
    d_in); ``deltas`` its output gradients for r cotangents per example, (n, r, d_out) or
    (n, r, T, d_out). Returns the (n r, n r) matrix with entries
    <G_{i,c}, G_{j,e}>_F, G_{i,c} = sum_t delta_{i,c,t} a~_{i,t}^T, i.e.
    (a~_i^T a~_j)(delta_{i,c}^T delta_{j,e}) for a dense layer.
    """
    xp = backend.xp
    n, r = int(deltas.shape[0]), int(deltas.shape[1])
    if inputs.ndim == 2:
        ka = inputs @ xp.matrix_transpose(inputs)
        d2 = xp.reshape(deltas, (n * r, deltas.shape[-1]))
        kd = xp.reshape(d2 @ xp.matrix_transpose(d2), (n, r, n, r))
        return xp.reshape(kd * ka[:, None, :, None], (n * r, n * r))
    if inputs.ndim != 3 or deltas.ndim != 4:
        raise ShapeError(f"tap_gram takes inputs (n, d) or (n, T, d) and deltas (n, r, d') or "
                         f"(n, r, T, d'), got {tuple(inputs.shape)} and {tuple(deltas.shape)}")
    t, d_in, d_out = int(inputs.shape[1]), int(inputs.shape[2]), int(deltas.shape[-1])
    if n * r * t * t <= d_in * d_out:  # pairs of positions: (n r T)^2 numbers
        a2 = xp.reshape(inputs, (n * t, d_in))
        ka = xp.reshape(a2 @ xp.matrix_transpose(a2), (n, 1, t, n, 1, t))
        d2 = xp.reshape(deltas, (n * r * t, d_out))
        kd = xp.reshape(d2 @ xp.matrix_transpose(d2), (n, r, t, n, r, t))
        return xp.reshape(xp.sum(kd * ka, axis=(2, 5)), (n * r, n * r))
    # the layer's per-example gradients (n r d_out d_in numbers) are smaller here
    g = xp.reshape(backend.einsum("icto,itd->icod", deltas, inputs), (n * r, d_out * d_in))
    return g @ xp.matrix_transpose(g)


def gram_from_taps(model: Model, params: Tree, x: Array, cotangent: Array | None = None,
                   rows: int | None = None) -> Array:
    """K = J J^T on the batch ``x`` from ``model``'s layer taps (one tapped forward pass).

    ``cotangent=None``: the Gauss-Newton Gram matrix, (m k, m k) with rows ordered sample by
    sample, from k VJPs with the unit cotangents e_c (outputs (m, ...) count
    k = prod(shape[1:]) in row-major order); a ``cotangent`` u of the outputs' shape: the
    (m, m) Gram matrix of the per-example gradients J_i^T u_i (NG with u the loss gradients),
    from one VJP.
    Sums :func:`tap_gram` over the tapped layers, so it is J J^T exactly when the tapped layers
    hold every parameter.

    ``rows``: the Gram matrix of the first ``rows`` samples only (``cotangent`` then has
    ``rows`` rows). The tapped pass runs on those samples of ``x``; for a network on a sharded
    batch (:class:`secondorder.distributed.DataParallel`, whose first samples may sit on other
    ranks) it runs on the whole batch and keeps those samples' layer inputs and gradients.
    """
    backend = backend_of(params)
    xp = backend.xp
    sharded = rows is not None and hasattr(model, "global_rows")
    if rows is not None and not sharded:
        x = tree_map(lambda leaf: leaf[:rows], x)
    if sharded and cotangent is not None:  # zero cotangents for the samples left out
        m = model.global_rows(x)
        cotangent = xp.concat([cotangent, xp.zeros(
            (m - rows, *cotangent.shape[1:]), dtype=cotangent.dtype,
            device=backend.device(cotangent))], axis=0)
    taps = model.zero_taps(x, params)
    (f, inputs), pullback = backend.vjp(lambda t: model.apply(params, x, t), taps)
    zeros = [xp.zeros_like(a) for a in inputs]
    if cotangent is not None:
        cotangents = [cotangent]
    else:  # the unit cotangents of the row-major flattened outputs of a sample
        k = math.prod(int(d) for d in f.shape[1:])
        eye = xp.eye(k, dtype=f.dtype, device=backend.device(f))
        cotangents = [xp.broadcast_to(xp.reshape(eye[c], (1, *f.shape[1:])), f.shape)
                      for c in range(k)]
    per_layer: list[list[Array]] = [[] for _ in taps]
    for u in cotangents:
        for i, d in enumerate(pullback((u, zeros))):
            per_layer[i].append(d if not sharded else d[:rows])
    if sharded:
        inputs = [a[:rows] for a in inputs]
    total = None
    for a, ds in zip(inputs, per_layer):
        term = tap_gram(backend, a, xp.stack(ds, axis=1))
        total = term if total is None else total + term
    return total


def lm_damping(rho: Array, damping: Array, boost: Any, drop: Any, eps: Any) -> Array:
    """The rule of sec. 5.2.3: lambda_LM * ``boost`` if rho < eps, lambda_LM * ``drop`` if
    rho > 1 - eps, else unchanged (also for a NaN rho)."""
    xp = backend_of(damping).xp
    return xp.where(rho < eps, damping * boost,
                    xp.where(rho > 1 - eps, damping * drop, damping))


def _is_mse(loss: Loss) -> bool:
    return isinstance(loss, MSE) or (isinstance(loss, Scaled) and isinstance(loss.loss, MSE))


# ------------------------------------------------------------------------------ states
@method_state("SMWGN")
class SMWGNState(NamedTuple):
    """SMW-GN's state: the step count, lambda_LM (``damping``; the damping in force is
    lambda = lambda_LM + tau) and the state of the user's transform (``()`` without one)."""

    count: Array
    damping: Array
    transform: Any = ()


@method_state("SMWNG")
class SMWNGState(NamedTuple):
    """SMW-NG's state: the step count, lambda_LM (``damping``; the damping in force is
    lambda = lambda_LM + tau) and the state of the user's transform (``()`` without one)."""

    count: Array
    damping: Array
    transform: Any = ()


# ------------------------------------------------------------------------------ the method
class _SMW(Optimizer):
    """The shared body of :class:`SMWGN` and :class:`SMWNG` (``curvature`` "gn" or "ng")."""

    curvature = "gn"
    param_dtypes = ("float32", "float64")
    hyperparameters = {  # noqa: RUF012 - never mutated
        "lr": "> 0", "damping": ">= 0", "tau": "> 0", "boost": ">= 1", "drop": "(0, 1]",
        "eps": "(0, 0.5)", "curvature_batch": "integer >= 1",
    }
    info_extras = ("rho", "predicted")

    def __init__(self, apply: Callable, loss: Loss, *, lr: float | Schedule = 1.0,
                 damping: float = 1.0, tau: float = 1e-3, boost: float = 1.01,
                 drop: float = 0.99, eps: float = 0.25, curvature_batch: int = 30,
                 gram: str = "auto", inverse: str = "auto", transform: Any = None):
        super().__init__(apply, loss)
        name = type(self).__name__
        check_transform(transform, name)
        self.transform = transform
        if gram not in GRAMS:
            raise HyperparameterError(
                f"{name}: gram={gram!r} is not one of {', '.join(map(repr, GRAMS))}")
        if inverse not in INVERSES:
            raise HyperparameterError(
                f"{name}: inverse={inverse!r} is not one of {', '.join(map(repr, INVERSES))}")
        if is_number(boost, drop) and not drop <= 1 <= boost:
            raise HyperparameterError(f"{name} needs drop <= 1 <= boost, got drop={drop}, "
                                      f"boost={boost}")
        if not isinstance(curvature_batch, int | float) or int(curvature_batch) != \
                curvature_batch:
            raise HyperparameterError(
                f"{name}: curvature_batch must be a Python integer >= 1 (it fixes the size of "
                f"the SMW system), got {curvature_batch!r}")
        self.model = find_model(apply)
        if gram == "taps" and self.model is None:
            raise StructureError(
                f"{name}(gram='taps') needs a model with layer taps: pass a secondorder.models "
                "model (MLP, ConvNet, Autoencoder) or the model from from_torch / from_flax / "
                "from_nnx / from_equinox, or use gram='auto' or 'jacobian' for a plain function")
        if inverse == "auto":
            inverse = "5.6" if self.curvature == "ng" or _is_mse(self.loss) else "5.7"
        self.lr, self.damping, self.tau = lr, damping, tau
        self.boost, self.drop, self.eps = boost, drop, eps
        self.curvature_batch = int(curvature_batch)
        self.gram, self.inverse = gram, inverse

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(lr={self.lr!r}, damping={self.damping!r}, "
                f"tau={self.tau!r}, curvature_batch={self.curvature_batch}, "
                f"inverse={self.inverse!r})")

    def init(self, params: Tree) -> Any:
        lam = self.scalar(params, self.damping)
        backend = backend_of(lam)
        return self.State(initial_count(backend, backend.device(lam)), lam,
                          init_transform(self.transform, params))

    # ------------------------------------------------------------------ Gram matrices
    def _tapped(self, leaves: list[Array]) -> bool:
        """Whether the taps cover every parameter (else the Jacobian gives the Gram matrix;
        also for a model whose layers cannot be tapped, one called twice, with gram='auto')."""
        try:
            layers = None if self.gram == "jacobian" or self.model is None else self.model.layers
        except UnsupportedModelError:
            if self.gram == "taps":
                raise
            layers = None
        if not layers:
            if self.gram == "taps":
                raise StructureError(
                    f"{type(self).__name__}(gram='taps'): {self.model!r} has no tapped layer; "
                    "use gram='auto' or 'jacobian'")
            return False
        covered = set()
        for info in layers:
            covered.add(info.weight)
            if info.bias is not None:
                covered.add(info.bias)
        # a tied leaf (another module uses it too) gets only its tapped layer's share of J
        shared = covered & getattr(self.model, "shared", frozenset())
        if covered != set(range(len(leaves))) or shared:
            if self.gram == "taps":
                outside = sorted(set(range(len(leaves))) - covered)
                where = (f"parameter leaves {outside} lie outside the tapped dense and "
                         "convolution layers" if outside else
                         f"parameter leaves {sorted(shared)} are tied to another module, whose "
                         "use of them no tap sees")
                raise StructureError(
                    f"{type(self).__name__}(gram='taps'): {where}, so the per-layer "
                    "Gram identities miss them; use gram='auto' (the Jacobian) instead")
            return False
        return True

    #: columns of K computed together by the Jacobian fallback (bounds its memory to
    #: this many parameter-sized vectors)
    chunk = 32

    def _gram_jacobian(self, op: Callable[[Array], Array], opt: Callable[[Array], Tree],
                       n: int, like: Array) -> Array:
        """K = J J^T column by column: K e_c = J (J^T e_c), one VJP and one JVP each, in blocks
        of :attr:`chunk` columns through the backend's ``vmap`` where it has a native one (the
        column loop otherwise, or where the products do not vectorise)."""
        backend = backend_of(like)
        xp = backend.xp
        dtype, device = like.dtype, backend.device(like)

        def column(e: Array) -> Array:
            return op(opt(e))

        if has_native_vmap(backend):
            def eye_block(start: int, stop: int) -> Array:
                return xp.eye(n, stop - start, k=-start, dtype=dtype, device=device)

            try:
                return map_columns(backend, column, eye_block, n, self.chunk)
            except Exception:  # noqa: BLE001 - products that do not vectorise: the loop below
                pass
        eye = xp.eye(n, dtype=dtype, device=device)
        return xp.stack([column(eye[c]) for c in range(n)], axis=1)

    # ------------------------------------------------------------------ step
    def step(self, params: Tree, state: Any, batch: Batch) -> tuple[Tree, Any, StepInfo]:
        backend = self.check_batch(params, state, batch)
        xp = backend.xp
        x, y = batch
        f, jvp, vjp = backend.linearize_vjp(lambda p: self.apply(p, x), params)
        check_outputs(f, type(self).__name__)
        # outputs (N1, ...): k = prod(shape[1:]) per sample (a sequence's P positions times
        # its classes), in row-major order, as the loss's per-sample Hessian lays them out
        n1, out = int(f.shape[0]), tuple(int(d) for d in f.shape[1:])
        k = math.prod(out)
        samples = (slice(None),) + (None,) * len(out)  # (N2,) -> (N2, 1, ...)
        n2 = min(self.curvature_batch, n1)
        loss = self.loss.value(f, y)
        u = self.loss.grad(f, y)  # per-sample gradients (with the loss's constant c)
        grad = vjp(u / n1)
        nan = self.scalar(params, float("nan"))
        whole = n2 == n1  # no slicing or padding (fewer operations for eager JAX)
        u2 = u if whole else u[:n2]

        def head(a: Any) -> Any:  # the curvature batch's rows (of every leaf of a structure)
            return a if whole else tree_map(lambda leaf: leaf[:n2], a)

        def pad(a: Array) -> Array:  # (N2, ...) cotangent -> (N1, ...)
            if whole:
                return a
            return xp.concat([a, xp.zeros((n1 - n2, *out), dtype=a.dtype,
                                          device=backend.device(a))], axis=0)

        if self.curvature == "ng":
            n = n2

            def jop(v: Tree) -> Array:  # rows: per-example gradients
                return sum_outputs(u2 * head(jvp(v)))

            def jtop(a: Array) -> Tree:
                return vjp(pad(a[samples] * u2))

            hessian = None
        else:
            n = n2 * k

            def jop(v: Tree) -> Array:
                return xp.reshape(head(jvp(v)), (n,))

            def jtop(a: Array) -> Tree:
                return vjp(pad(xp.reshape(a, (n2, *out))))

            hessian = block_diagonal(backend, head(self.loss.hessian(f, y)))

        leaves = flatten(params)[0]
        if self._tapped(leaves):
            cotangent = u2 if self.curvature == "ng" else None
            gram = gram_from_taps(self.model, params, x, cotangent, None if whole else n2)
        else:
            gram = self._gram_jacobian(jop, jtop, n, f)
        v = jop(grad)
        checks = (gram, v) if hessian is None else (gram, v, hessian)
        if backend.is_concrete(loss) and not bool(all_finite(grad, *checks)):
            return self._reject(params, state, loss, nan)

        lam_lm = state.damping
        lam = lam_lm + self.tau
        w = smw_coefficients(gram, v, lam, n2, hessian, formula=self.inverse)
        p = scale(-1.0 / lam, axpy(-1.0 / n2, jtop(w), grad))
        jp = -(v - gram @ w / n2) / lam
        gp = -(vdot(grad, grad) - xp.sum(v * w) / n2) / lam
        hjp = jp if hessian is None else hessian @ jp
        predicted = gp + 0.5 * xp.sum(jp * hjp) / n2  # m(p) - m(0)

        trial = axpy(1.0, p, params)
        new_value = self.objective(trial, batch)
        finite_trial = xp.isfinite(new_value)
        decrease = predicted < 0
        ok = xp.logical_and(decrease, finite_trial)
        rho = xp.where(ok, (loss - new_value) / xp.where(decrease, -predicted,
                                                          xp.ones_like(predicted)),
                       xp.full_like(predicted, -float("inf")))
        lam_new = lm_damping(rho, lam_lm, self.boost, self.drop, self.eps)
        alpha = resolve(self.lr, state.count, params)
        if isinstance(alpha, int | float) and alpha == 1:
            update = p
        else:
            update = scale(alpha, p)
        # a trial point with a non-finite loss is not taken (lambda_LM is boosted: rho = -inf)
        if not (backend.is_concrete(finite_trial) and bool(finite_trial)):
            update = scale(xp.astype(finite_trial, predicted.dtype), update)
        inner = state.transform
        if self.transform is None:
            new = axpy(1.0, update, params)
        else:
            new, update, inner = apply_transform(self.transform, update, inner, params)
        new_state = self.State(state.count + 1, lam_new, inner)
        params, state, okay, step_norm = self.guard(
            params, state, new, new_state, loss, grad, gram, damping_key="damping",
            update=update)
        return params, state, self.info(params, loss, step_norm, state.damping + self.tau, okay,
                                        extras={"rho": rho, "predicted": predicted})

    def _reject(self, params: Tree, state: Any, loss: Array, nan: Array
                ) -> tuple[Tree, Any, StepInfo]:
        """The eager rejection of a step that met a non-finite value before its solve."""
        params, state, ok, step_norm = self.guard(params, state, params, state, loss, nan,
                                                  damping_key="damping")
        return params, state, self.info(params, loss, step_norm, state.damping + self.tau, ok,
                                        extras=dict.fromkeys(self.info_extras, nan))


_DOC_COMMON = """
    Algorithm 23, one step on the batch (x, y) of N1 samples:

        g = (1/N1) sum_{i in S1} grad l_i                                  (line 4)
        lambda = lambda_LM + tau
        p = -G^{-1} g by (5.6) or (5.7) on the first N2 samples            (line 5)
        rho = (f(w) - f(w + p)) / (m(0) - m(p)),                           (5.5)
            m(p) - m(0) = g^T p + 1/2 p^T B p, f the mean loss on the N1 samples
        lambda_LM <- boost lambda_LM if rho < eps; drop lambda_LM if rho > 1 - eps (line 6)
        w <- w + alpha p                                                   (line 7)

    As in Algorithm 23 every step is taken whatever rho is, except that a trial point
    w + p with a non-finite loss is not (rho = -inf: the parameters stay, lambda_LM is
    boosted). rho is evaluated at p, as (5.5) defines it; with alpha = 1 (the default) that is
    the step taken. Cost per step: the loss at w + p (one forward pass on N1 samples), one
    linearisation (forward, one JVP, two VJPs), the Gram matrix (module docstring: one tapped
    forward pass on N2 samples and m_L VJPs for GN, one for NG) and an n x n solve, O(n^3).

    Parameters
    ----------
    apply, loss:
        The network and the :class:`~secondorder.losses.Loss` (mean over the batch). A model
        with layer taps (:mod:`secondorder.models` MLP, ConvNet, Autoencoder; ``from_torch``
        with ``nn.Linear`` / ``nn.Conv2d``; ``from_flax``; ``from_nnx``; ``from_equinox`` with
        ``eqx.nn.Linear``) gets its Gram matrix from the taps;
        any other ``apply(params, x) -> (m, k)`` from the Jacobian.
    lr: float or schedule, default 1.0
        alpha > 0, the step length on p (a schedule of the step count is accepted). The
        thesis's experiments use 0.1 (MNIST) and 0.01 (CIFAR) with the defaults below.
    damping: float, default 1.0
        lambda_LM at the first step (>= 0), adapted by the rule above.
    tau: float, default 1e-3
        tau > 0, the floor of lambda = lambda_LM + tau.
    boost, drop: float, default 1.01 and 0.99
        The factors of the rule (drop <= 1 <= boost).
    eps: float, default 0.25
        The threshold of the rule, 0 < eps < 1/2.
    curvature_batch: int, default 30
        N2 >= 1: the curvature uses the first min(N2, N1) samples of each batch (the thesis's
        N2 = 30 with N1 = 60 on MNIST). Shuffle the data so that they are a random subset.
    gram: {"auto", "taps", "jacobian"}, default "auto"
        How K = J J^T is built: ``"taps"`` from the per-layer identities (needs a tapped model
        whose layers hold every parameter; StructureError otherwise), ``"jacobian"`` from n
        JVP/VJP pairs, ``"auto"`` the taps where they apply.
    transform: transform or None, default None
        An update transform (:mod:`secondorder.optim.transforms`, e.g.
        ``clip_by_global_norm(1.0)``) applied to the step alpha p before it is added to the
        parameters (as for the other methods that take a step of their own length); the ratio
        rho and lambda_LM follow p itself.
"""

_DOC_STATE = """
    State and info. The state (``count``, ``damping`` = lambda_LM, the transform's state)
    names the method.
    ``info.damping`` is lambda = lambda_LM + tau after the update; ``info.extras`` holds ``rho``
    and ``predicted`` (m(p) - m(0)). A non-finite loss, gradient or curvature keeps the old
    parameters and state and multiplies lambda_LM by :attr:`Optimizer.damping_boost_on_failure`.
    Every hyperparameter but ``curvature_batch``, ``gram`` and ``inverse`` may be a traced array
    (``jax.vmap`` over the initial damping, for instance).
"""


class SMWGN(_SMW):
    __doc__ = """SMW-GN: sub-sampled Gauss-Newton with Levenberg-Marquardt damping, the damped
    system inverted exactly by Sherman-Morrison-Woodbury (Algorithm 23 of Y. Ren's thesis; see
    the module docstring of :mod:`secondorder.optim.smw` for the formulas).

    B = (1/N2) J^T H J with J the Jacobian of the N2 x m_L outputs of the curvature batch and H
    the per-sample loss Hessians; D is (N2 m_L) x (N2 m_L).
""" + _DOC_COMMON + """    inverse: {"auto", "5.6", "5.7"}, default "auto"
        ``"5.6"``: D = lambda H^{-1} + K / N2 (H must be invertible: squared loss);
        ``"5.7"``: D = lambda I + K H / N2 (any H >= 0: softmax cross-entropy, sigmoid BCE);
        ``"auto"``: (5.6) for the squared loss (MSE, scaled or not), (5.7) otherwise.
""" + _DOC_STATE

    curvature = "gn"
    State = SMWGNState


class SMWNG(_SMW):
    __doc__ = """SMW-NG: sub-sampled natural gradient (the empirical Fisher of the curvature
    batch) with Levenberg-Marquardt damping, inverted exactly by Sherman-Morrison-Woodbury
    (Algorithm 23 of Y. Ren's thesis; see :mod:`secondorder.optim.smw` for the formulas).

    B = (1/N2) sum_{i in S2} grad l_i grad l_i^T, the per-example gradients of the loss at the
    batch's labels (for a scaled loss c l_i, those of c l_i: c^2 times the unscaled Fisher, the
    library's empirical-Fisher convention); D = lambda I + K / N2 is N2 x N2 (not m_L x m_L as
    the thesis says), and (5.6) and (5.7) coincide since H = I.
""" + _DOC_COMMON + """    inverse: {"auto", "5.6", "5.7"}, default "auto"
        Accepted for symmetry with :class:`SMWGN`; with H = I all three are (5.6).
""" + _DOC_STATE

    curvature = "ng"
    State = SMWNGState
