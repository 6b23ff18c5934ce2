"""K-BFGS and K-BFGS(L) (Y. Ren's thesis, the seed ``002_cc6040582a98cbc3``, Ch. 3,
Algorithm 9; Goldfarb, Ren and Bahamou, "Practical quasi-Newton methods for training deep
neural networks", NeurIPS 2020, for Ch. 2): per-layer Kronecker-factored quasi-Newton
preconditioners H_A (x) H_G whose factors are kept by BFGS updates instead of being inverted.
The algorithm, its parameters and its state are described in the docstring of :class:`KBFGS`
(``help(KBFGS)``); :class:`KBFGSL` keeps H_G as L-BFGS pairs.

The BFGS update, the dampings and the L-BFGS two-loop recursion are the reusable pieces of
:mod:`secondorder.linalg.quasi_newton`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

from .._pytree import flatten, unflatten
from ..backends import Backend, backend_of
from ..errors import HyperparameterError, StructureError
from ..linalg import quasi_newton as qn
from ..linalg.matrix_function import damped_inverse
from ..losses import Loss
from ..models.base import LayerInfo, find_model
from ..models.layers import reference_axes
from ..tree import add, axpy, scale
from .base import Array, Batch, Optimizer, StepInfo, Tree, all_finite, choose, is_number
from .kfac import _from_reference, _to_reference, fallback_indices
from .schedules import Schedule, resolve
from .state import due_now, every, initial_count, method_state
from .step_rules import check_transform
from .transforms import chain, scale_by_adam, trace

__all__ = ["KBFGS", "KBFGSL", "KBFGSLState", "KBFGSLayerState", "KBFGSState"]

PAIR_DAMPINGS = ("dp-dlm", "dd")
SPLITS = ("positions", "equal")
FALLBACKS = ("sgd", "adam")
#: Dh_bar's components with |sum_{n,t} dl_n/dh_nt| <= ZERO_LEVEL eps sum_{n,t} |dl_n/dh_nt| (eps
#: of the dtype) are set to 0: below the rounding level of the backward pass and of the sum.
#: For a layer followed by batch normalisation (whose backward removes the per-channel mean)
#: Dh_bar is 0 in exact arithmetic and the computed ratio |sum| / sum |.| is noise; measured
#: (torch, Conv2d -> BatchNorm2d, 8 to 8192 samples, float64 and float32, CPU and an H200):
#: 0.2 to 16 eps for up to 10^6 terms per channel, <= 32 x 32 positions per image and
#: pre-activations of mean/std O(1). It grows with the positions per image (CUDA: 10 to 60 eps
#: at 128 x 128 to 256 x 256, ~200 eps at 1024 x 1024; CPU: up to 270 eps at 256 x 256) and
#: with mean/std (CPU float64 at mean/std ~ 20: 24 to 1900 eps), past any fixed multiple.
#: Without the normalisation the ratio was >= 8e-4 (1e-2 typically; about 1 / sqrt(m |T|) for
#: per-example gradients of random signs), >= 6e3 eps in float32. 128 eps (2.8e-14 in float64,
#: 1.5e-5 in float32) is about 8x above the first and 7x below 1e-4 in float32; float64 has
#: orders of magnitude to spare on both sides.
ZERO_LEVEL = 128


class KBFGSLayerState(NamedTuple):
    """One tapped layer's K-BFGS state: ``h_a`` ~ (A + lambda_A I)^{-1}, (d_in, d_in) with the
    bias row and column last; ``h_g`` ~ G^{-1}, a dense (d_out, d_out) matrix (K-BFGS) or an
    :class:`~secondorder.linalg.quasi_newton.LBFGSMemory` of (s, y) pairs (K-BFGS(L)); and the
    moving averages ``s_g``, ``y_g`` (d_out,) of the changes of the mean pre-activation and of
    its gradient."""

    h_a: Array
    h_g: Any
    s_g: Array
    y_g: Array


@method_state("KBFGS")
class KBFGSState(NamedTuple):
    """K-BFGS's state: the step count; one :class:`KBFGSLayerState` per tapped layer; the
    damping lambda in force (multiplied by ``damping_boost_on_failure`` when a step is
    rejected); the state of the momentum; and the state of the Adam fallback on parameters
    outside tapped layers (``()`` otherwise)."""

    count: Array
    layers: tuple[KBFGSLayerState, ...]
    damping: Array
    transform: Any
    fallback: Any = ()


@method_state("KBFGSL")
class KBFGSLState(NamedTuple):
    """K-BFGS(L)'s state: as :class:`KBFGSState`, with every layer's ``h_g`` an
    :class:`~secondorder.linalg.quasi_newton.LBFGSMemory`."""

    count: Array
    layers: tuple[KBFGSLayerState, ...]
    damping: Array
    transform: Any
    fallback: Any = ()


class _Layer(NamedTuple):
    info: LayerInfo
    weight_shape: tuple[int, ...]  # the reference layout (d_out, d_in) or (C_out, C_in, kh, kw)
    d_out: int
    d_in: int  # with the bias column
    flax: bool
    bias_shape: tuple[int, ...] | None = None  # the bias leaf's, (d_out,) or (C_out, 1, 1)


class _Pass(NamedTuple):
    """What one tapped forward-backward pass gives a layer: the homogeneous inputs flattened
    to (m T, d_in), the batch size m, the positions T, the mean input a_bar (d_in,), the mean
    pre-activation h_bar = W~ a_bar and the mean pre-activation gradient Dh_bar (d_out,), its
    components below their rounding level set to 0 (:data:`ZERO_LEVEL`)."""

    a: Array
    m: int
    positions: int
    a_bar: Array
    h_bar: Array
    dh_bar: Array


class KBFGS(Optimizer):
    r"""K-BFGS (Algorithm 9 of Y. Ren's thesis, Ch. 3, for MLPs and CNNs; seed
    ``002_cc6040582a98cbc3``).

    For every tapped dense or convolution layer l with parameters W~ = [W b] (d_out x d_in,
    bias column last; a convolution kernel flattened row-major to (C_out, C_in kh kw), the
    im2col layout) the curvature block is approximated by A (x) G (eqs. 3.8-3.9: A sums over
    the |T| output positions, G averages), and its inverse by H_A (x) H_G. At step k = 0, 1, ...
    on the batch (x, y), with g the gradient of the mean loss::

        every step (lines 5-11):
            m <- beta_m m + g                              (momentum, Ch. 3's convention)
            p_l = H_G m_l H_A                              (eq. 3.10; the fallback elsewhere)
            w <- w - alpha_k (p + wd w)                    (sec. 3.6's decoupled weight decay)
        every T steps (k mod T = 0; lines 12-23), after the update:
            a second tapped forward-backward pass on the SAME batch at the new weights gives
            h_bar+ = W~+ a_bar+ and Dh_bar+ (means over the batch and the positions), and
              s_A = H_A a_bar,  y_A = A s_A + lambda_A s_A,
                A s_A = (1/m) sum_n sum_t a_t(n) (a_t(n)^T s_A)   (eq. 3.15, matrix-free,
                        from the current batch: the "minibatched Hessian action", eq. 3.14)
              H_A <- BFGS(H_A; s_A, y_A)                             (eq. 3.11)
              s_G <- beta s_G + (1 - beta)(h_bar+ - h_bar)           (eqs. 3.12-3.13)
              y_G <- beta y_G + (1 - beta)(Dh_bar+ - Dh_bar)
              (s~, y~) = D_P D_LM(s_G, y_G; H_G, mu1, lambda_G)      (Algorithm 8)
              H_G <- BFGS(H_G; s~, y~)

    with BFGS(H; s, y) = (I - rho s y^T) H (I - rho y s^T) + rho s s^T, rho = 1/(s^T y)
    (:func:`~secondorder.linalg.quasi_newton.bfgs_inverse_update`). The damping split (line 2,
    sec. 3.4.3): lambda_A = sqrt(|T|) sqrt(lambda), lambda_G = sqrt(lambda) / sqrt(|T|) for a
    convolution with |T| output positions, lambda_A = lambda_G = sqrt(lambda) for a dense layer.
    Initialisation (line 3): H_A = (A + lambda_A I)^{-1} and H_G = I / lambda_G; the thesis
    computes this A in a pass over the whole data set before the first iteration, here it is
    computed from the first step's batch (the state from ``init`` holds identities until then).
    a_bar and A of the H_A update are those of the first pass (at the weights before the
    update; the thesis's line 16 reads them from the pass of line 6). Theorem 1 (thesis
    sec. 2.4): with H = A^{-1}, s = H a, y = (A + c a a^T) s, any Broyden-family update gives
    (A + c a a^T)^{-1} exactly, which is why the Hessian action keeps H_A close to the inverse
    of a moving A without forming it.

    Why these pairs: y_G ~ G s_G is the secant condition of the layer's output Hessian G
    (from the change of the pre-activations and of their gradients between the two passes);
    G is not positive definite for non-convex losses, so the pair is damped first: Powell's
    damping on H gives s~^T y >= mu1 y^T H_G y and the Levenberg-Marquardt shift
    y~ = y + lambda_G s~ gives s~^T y~ >= lambda_G s~^T s~ > 0, which keeps H_G positive
    definite (:func:`~secondorder.linalg.quasi_newton.powell_lm_damping`). ``pair_damping="dd"``
    uses Ch. 2's double damping instead (Algorithm 3,
    :func:`~secondorder.linalg.quasi_newton.double_damping`, mu2 = lambda_G, which the thesis
    restricts to (0, 1]).

    Rounding: a component of Dh_bar with |sum_{n,t} dl_n/dh_nt| <= 128 eps sum_{n,t}
    |dl_n/dh_nt| (eps of the dtype, :data:`ZERO_LEVEL`) is taken as exactly 0. A layer followed
    by batch normalisation has Dh_bar = 0 in exact arithmetic (its backward removes the
    per-channel mean), hence y_G = 0, (s~, y~) = (s_G, lambda_G s_G) and H_G = I / lambda_G
    unchanged; the computed Dh_bar is rounding noise whose sign would otherwise decide the
    Powell damping and give H_G an O(1) update along a noise direction.

    Parameters outside tapped layers (normalisation scales, anything the model does not tap):
    ``fallback="sgd"`` (default) moves them by their momentum-averaged gradient with the same
    learning rate (sec. 3.4.3 uses alpha / lambda for batch-norm parameters; pass
    ``fallback="adam"`` or scale those parameters yourself if you need a different step);
    ``fallback="adam"`` divides it elementwise by sqrt(v^) + eps as in :class:`KFAC`.

    Parameters
    ----------
    apply: a :mod:`secondorder.models` model or one from ``from_torch`` / ``from_flax`` /
        ``from_nnx`` / ``from_equinox`` (it needs layer taps), or its ``apply``.
    loss: the loss (a :class:`~secondorder.losses.Loss` or its name).
    lr: float or schedule, default 0.3
        alpha_k (> 0).
    damping: float, default 30.0
        lambda (> 0), split between A and G as above. The defaults (0.3, 30) are Table 3.5's
        best K-BFGS values with T = 20 on the MNIST autoencoder; with T = 1 it lists
        (0.03, 0.3); on the CIFAR CNNs (Table 3.7) the best dampings were 10 to 1e4.
    momentum: float, default 0.9
        beta_m in [0, 1): m <- beta_m m + g (line 8; 0 uses the gradient itself).
    weight_decay: float, default 0.0
        wd >= 0, added to the preconditioned direction (sec. 3.6's modification of line 10).
    statistics_decay: float, default 0.9
        beta in [0, 1), the decay of the moving averages s_G and y_G (line 19).
    mu1: float, default 0.2
        Powell's damping parameter in (0, 1) (Algorithms 3 and 8).
    curvature_interval: int, default 20
        T >= 1: the second pass and the updates of H_A and H_G every T steps (sec. 3.4.3; Ch. 3
        uses T = 20 for CNNs, Ch. 2 updates at every step, T = 1).
    pair_damping: {"dp-dlm", "dd"}, default "dp-dlm"
        Algorithm 8 (Ch. 3) or Algorithm 3 (Ch. 2) for the pairs of H_G.
    damping_split: {"positions", "equal"}, default "positions"
        ``"positions"``: the split above (Ch. 3); ``"equal"``: sqrt(lambda) for both factors of
        every layer (Ch. 2's split, also for convolutions).
    fallback: {"sgd", "adam"}, default "sgd"
        The step of parameters outside tapped layers (above).
    fallback_b2, fallback_eps: float, default 0.999, 1e-8
        The decay (in [0, 1)) and epsilon (> 0) of the Adam fallback.
    transform: transform or None, default None
        An update transform (``init``/``update``, e.g.
        :func:`~secondorder.optim.transforms.clip_by_global_norm`) applied to the gradient g
        first, before the momentum and the preconditioning: torch's ``clip_grad_norm_``
        before ``optimizer.step()``. The curvature pairs come from the passes, not from g.

    State and info. The state is a :class:`KBFGSState`; ``info.damping`` is lambda and
    ``info.extras["lr"]`` the learning rate used. A non-finite loss, gradient, update or
    curvature keeps the old parameters and state and multiplies lambda by
    :attr:`Optimizer.damping_boost_on_failure`. Every loop and branch goes through the backend
    (``cond``, ``fori_loop``), so ``jax.jit(opt.step)`` compiles and a hyperparameter may be a
    traced array.

    Cost per step: one tapped forward-backward pass and the products H_G M H_A; every T steps
    a second pass, O(m |T| d_in + d_in^2 + m |T| d_out + d_out^2) for the curvature (Table 3.2).
    """

    State: type = KBFGSState
    param_dtypes = ("float32", "float64")
    hyperparameters = {  # noqa: RUF012 - never mutated
        "lr": "> 0", "damping": "> 0", "momentum": "[0, 1)", "weight_decay": ">= 0",
        "statistics_decay": "[0, 1)", "mu1": "(0, 1)", "curvature_interval": "integer >= 1",
        "fallback_b2": "[0, 1)", "fallback_eps": "> 0", "memory": "integer >= 1",
    }
    info_extras = ("lr",)
    #: the number of L-BFGS pairs of H_G; None keeps H_G as a dense matrix
    memory: int | None = None
    #: how K-BFGS(L) applies its pairs: "compact" or "two-loop"
    product: str = "compact"

    def __init__(self, apply: Callable, loss: Loss, *, lr: float | Schedule = 0.3,
                 damping: float = 30.0, momentum: float = 0.9, weight_decay: float = 0.0,
                 statistics_decay: float = 0.9, mu1: float = 0.2, curvature_interval: int = 20,
                 pair_damping: str = "dp-dlm", damping_split: str = "positions",
                 fallback: str = "sgd", fallback_b2: float = 0.999,
                 fallback_eps: float = 1e-8, transform: Any = None):
        super().__init__(apply, loss)
        name = type(self).__name__
        check_transform(transform, name)
        model = find_model(apply)
        if model is None:
            raise StructureError(
                f"{name} needs a model with layer taps for its per-layer statistics: pass a "
                "secondorder.models model (MLP, ConvNet, Autoencoder) or the model returned "
                "by from_torch, from_flax, from_nnx or from_equinox, not a plain function; for a "
                "network without tapped layers use BFGS (small problems), Adam or SGD")
        self.model = model
        choices = {"pair_damping": (pair_damping, PAIR_DAMPINGS),
                   "damping_split": (damping_split, SPLITS), "fallback": (fallback, FALLBACKS)}
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise HyperparameterError(
                    f"{name}: {key}={value!r} is not one of {', '.join(map(repr, allowed))}")
        if not isinstance(curvature_interval, int | float) or (
                int(curvature_interval) != curvature_interval):
            raise HyperparameterError(
                f"{name}: curvature_interval must be a Python integer >= 1 (it fixes the "
                f"step's structure), got {curvature_interval!r}")
        if pair_damping == "dd" and is_number(damping) and damping > 1:
            raise HyperparameterError(
                f"{name}: pair_damping='dd' uses mu2 = lambda_G = sqrt(damping) (divided by "
                f"sqrt(|T|) for convolutions) as a convex weight, which needs damping <= 1, got "
                f"{damping}; use pair_damping='dp-dlm' (Algorithm 8) for larger dampings")
        self.lr, self.damping, self.momentum = lr, damping, momentum
        self.weight_decay, self.statistics_decay, self.mu1 = weight_decay, statistics_decay, mu1
        self.curvature_interval = int(curvature_interval)
        self.pair_damping, self.damping_split, self.fallback = pair_damping, damping_split, fallback
        self.fallback_b2, self.fallback_eps = fallback_b2, fallback_eps
        zero = isinstance(momentum, int | float) and momentum == 0
        #: the user's transform and the momentum of the gradient before preconditioning
        #: (line 8)
        self.transform = transform
        first = [] if transform is None else [transform]
        self.gradient_transform = chain(*first) if zero else chain(*first, trace(momentum))

    def __repr__(self) -> str:
        extra = "" if self.memory is None else f", memory={self.memory}"
        return (f"{type(self).__name__}(lr={self.lr!r}, damping={self.damping!r}, "
                f"momentum={self.momentum!r}, T={self.curvature_interval}{extra})")

    # ------------------------------------------------------------------ layout
    def _layers(self, leaves: list[Array]) -> list[_Layer]:
        flax = self.model.channels_last
        layers = []
        for info in self.model.layers:
            shape = tuple(int(s) for s in leaves[info.weight].shape)
            if flax:
                shape = tuple(shape[i] for i in reference_axes(len(shape)))
            d_in = math.prod(shape[1:]) + (0 if info.bias is None else 1)
            bias = None if info.bias is None else tuple(leaves[info.bias].shape)
            layers.append(_Layer(info, shape, shape[0], d_in, flax, bias))
        if not layers:
            raise StructureError(
                f"{type(self).__name__} found no tapped dense or convolution layer in "
                f"{self.model!r}; use BFGS (small problems), Adam or SGD for this network")
        return layers


    @staticmethod
    def _matrix(layer: _Layer, leaves: list[Array]) -> Array:
        """The layer's W~ = [W b] (d_out, d_in) from the leaves of a tree like the params."""
        w = _to_reference(leaves[layer.info.weight], layer.flax)
        xp = backend_of(w).xp
        w = xp.reshape(w, (layer.d_out, -1))
        if layer.info.bias is None:
            return w
        return xp.concat([w, xp.reshape(leaves[layer.info.bias], (layer.d_out, 1))], axis=1)

    @staticmethod
    def _unmatrix(layer: _Layer, t: Array, out: list[Array]) -> None:
        """Write W~ (d_out, d_in) back into the leaves ``out``."""
        xp = backend_of(t).xp
        if layer.info.bias is None:
            out[layer.info.weight] = _from_reference(xp.reshape(t, layer.weight_shape),
                                                     layer.flax)
            return
        out[layer.info.bias] = xp.reshape(t[:, -1], layer.bias_shape)
        out[layer.info.weight] = _from_reference(
            xp.reshape(t[:, :-1], layer.weight_shape), layer.flax)

    # ------------------------------------------------------------------ state
    def _empty_h_g(self, layer: _Layer, like: Array) -> Any:
        xp = backend_of(like).xp
        if self.memory is None:
            return xp.eye(layer.d_out, dtype=like.dtype, device=backend_of(like).device(like))
        return qn.lbfgs_init(layer.d_out, self.memory, like)

    def init(self, params: Tree) -> KBFGSState:
        leaves, _ = flatten(params)
        layers = self._layers(leaves)
        lam = self.scalar(params, self.damping)
        backend = backend_of(lam)
        xp, dev = backend.xp, backend.device(lam)
        count = initial_count(backend, dev)
        states = []
        for layer in layers:
            like = leaves[layer.info.weight]
            s_g, y_g = (xp.zeros((layer.d_out,), dtype=like.dtype, device=dev) for _ in "sy")
            states.append(KBFGSLayerState(
                xp.eye(layer.d_in, dtype=like.dtype, device=dev), self._empty_h_g(layer, like),
                s_g, y_g))
        rest = fallback_indices(layers, len(leaves))
        fallback: Any = ()
        if self.fallback == "adam" and rest:
            fallback = self._adam().init([leaves[i] for i in rest])
        return self.State(count, tuple(states), lam, self.gradient_transform.init(params),
                          fallback)

    def _adam(self) -> Any:
        return scale_by_adam(0.0, self.fallback_b2, self.fallback_eps)

    # ------------------------------------------------------------------ pieces
    def _pass(self, params: Tree, layers: list[_Layer], batch: Batch, *, with_grad: bool
              ) -> tuple[Array, Tree | None, list[_Pass]]:
        """One tapped forward pass and one backward pass of the mean loss: the loss, its
        gradient (``with_grad``) and every tapped layer's :class:`_Pass`."""
        x, y = batch
        backend = backend_of(params)
        xp = backend.xp
        taps = self.model.zero_taps(x, params)
        # the tapped inputs come back as aux: no (zero) cotangent flows back through them
        if with_grad:
            f, pullback, inputs = backend.vjp(
                lambda pt: self.model.apply(pt[0], x, pt[1]), (params, taps), has_aux=True)
        else:
            f, pullback, inputs = backend.vjp(
                lambda t: self.model.apply(params, x, t), taps, has_aux=True)
        m = f.shape[0]
        loss = self.loss.value(f, y)
        u = self.loss.grad(f, y) / m  # the cotangent of the mean loss
        pulled = pullback(u)
        grad, deltas = pulled if with_grad else (None, pulled)
        leaves = flatten(params)[0]
        out = []
        for layer, a, d in zip(layers, inputs, deltas):
            a2 = xp.reshape(a, (-1, layer.d_in))
            d2 = xp.reshape(d, (-1, layer.d_out))
            positions = a2.shape[0] // m
            a_bar = xp.mean(a2, axis=0)
            # d holds dL/dh = (1/m) dl_n/dh_nt: the mean over n and t of dl_n/dh_nt is sum / T
            total = xp.sum(d2, axis=0)
            # a sum below its rounding level is 0 in exact arithmetic (ZERO_LEVEL)
            level = ZERO_LEVEL * xp.finfo(d2.dtype).eps * xp.sum(xp.abs(d2), axis=0)
            dh_bar = xp.where(xp.abs(total) <= level, xp.zeros_like(total), total) / positions
            h_bar = self._matrix(layer, leaves) @ a_bar
            out.append(_Pass(a2, m, positions, a_bar, h_bar, dh_bar))
        return loss, grad, out

    def _split(self, lam: Array, positions: int) -> tuple[Array, Array]:
        """(lambda_A, lambda_G) of a layer with ``positions`` output positions (line 2)."""
        xp = backend_of(lam).xp
        root = xp.sqrt(lam)
        if self.damping_split == "equal" or positions == 1:
            return root, root
        t = math.sqrt(positions)
        return t * root, root / t

    def _apply_h_g(self, h_g: Any, v: Array, lam_g: Array) -> Array:
        """H_G v (v a vector or a matrix)."""
        if self.memory is None:
            return h_g @ v
        product = qn.lbfgs_apply if self.product == "two-loop" else qn.lbfgs_apply_compact
        return product(h_g, v, 1.0 / lam_g)

    def _warm_start(self, states: tuple[KBFGSLayerState, ...], passes: list[_Pass],
                    lam: Array) -> tuple[KBFGSLayerState, ...]:
        """Line 3: H_A = (A + lambda_A I)^{-1} from the batch, H_G = I / lambda_G (K-BFGS;
        K-BFGS(L) starts its two-loop recursion from that H_0 at every product)."""
        out = []
        for st, ps in zip(states, passes):
            lam_a, lam_g = self._split(lam, ps.positions)
            a_matrix = (ps.a.T @ ps.a) / ps.m
            h_a = damped_inverse(a_matrix, lam_a)
            h_g = _eye_like(st.h_g) / lam_g if self.memory is None else st.h_g
            out.append(st._replace(h_a=h_a, h_g=h_g))
        return tuple(out)

    def _curvature(self, states: tuple[KBFGSLayerState, ...], passes: list[_Pass],
                   trial: Tree, layers: list[_Layer], batch: Batch, lam: Array
                   ) -> tuple[KBFGSLayerState, ...]:
        """Lines 13-22: the second pass at the new weights and the updates of H_A and H_G."""
        _, _, after = self._pass(trial, layers, batch, with_grad=False)
        beta = self.statistics_decay
        out = []
        for st, ps, new in zip(states, passes, after):
            lam_a, lam_g = self._split(lam, ps.positions)
            s_a = st.h_a @ ps.a_bar
            y_a = (ps.a.T @ (ps.a @ s_a)) / ps.m + lam_a * s_a
            h_a = qn.bfgs_inverse_update(st.h_a, s_a, y_a)
            s_g = beta * st.s_g + (1 - beta) * (new.h_bar - ps.h_bar)
            y_g = beta * st.y_g + (1 - beta) * (new.dh_bar - ps.dh_bar)
            hy = self._apply_h_g(st.h_g, y_g, lam_g)
            if self.pair_damping == "dd":
                s_t, y_t = qn.double_damping(s_g, y_g, hy, self.mu1, lam_g)
            else:
                s_t, y_t = qn.powell_lm_damping(s_g, y_g, hy, self.mu1, lam_g)
            if self.memory is None:
                h_g = qn.bfgs_inverse_update(st.h_g, s_t, y_t)
            else:
                h_g = qn.lbfgs_push(st.h_g, s_t, y_t)
            out.append(KBFGSLayerState(h_a, h_g, s_g, y_g))
        return tuple(out)

    # ------------------------------------------------------------------ step
    def step(self, params: Tree, state: KBFGSState, batch: Batch
             ) -> tuple[Tree, KBFGSState, StepInfo]:
        backend = self.check_batch(params, state, batch)
        xp = backend.xp
        lam = state.damping
        leaves, treedef = flatten(params)
        layers = self._layers(leaves)
        # The tapped pass (inputs a, mean pre-activations and their gradients) serves only the
        # curvature steps (every T, the first included). Eager: a curvature step takes its
        # gradient from that pass and the other steps run an untapped one. Traced: the step's
        # gradient is untapped and the curvature branch repeats the pass at the same weights,
        # so the T - 1 other steps carry no taps (one more pass per T steps).
        curvature_now = due_now(backend, state.count, self.curvature_interval)
        if curvature_now:
            loss, grad, passes = self._pass(params, layers, batch, with_grad=True)

            def first_pass() -> list[_Pass]:
                return passes
        else:
            loss, grad = self.value_and_grad(params, batch)
            passes = []

            def first_pass() -> list[_Pass]:
                return self._pass(params, layers, batch, with_grad=False)[2]
        nan = self.scalar(params, float("nan"))
        if backend.is_concrete(loss) and not bool(
                xp.isfinite(loss) and (not passes or all_finite(*(p.a for p in passes)))):
            return self._reject(params, state, loss, nan)

        # the passes hold Python ints (sizes): captured, not operands of the conditionals
        def warm(layer_states: tuple[KBFGSLayerState, ...]) -> tuple[KBFGSLayerState, ...]:
            return _on_first(backend, state.count,
                             lambda s, lam: self._warm_start(s, first_pass(), lam),
                             layer_states, lam)

        traced = curvature_now is None
        # Eager, the warm start (step 0) is a Python branch. Traced, the large H_A and H_G are
        # never the output of a conditional on the steps that leave them alone (an output is a
        # copy): the first step's direction comes from a conditional on the direction only,
        # and the curvature branch warm-starts its own copy of the states.
        states = state.layers if traced else warm(state.layers)
        direction, inner = self.gradient_transform.update(grad, state.transform, params)
        d_leaves = flatten(direction)[0]
        # output positions per layer, from the tap shapes (m, |T|..., d_out): 1 for dense
        positions = [math.prod(shape[1:-1]) for shape in self.model.tap_shapes(batch[0])]

        def precondition(layer_states: tuple[KBFGSLayerState, ...], d: list[Array]
                         ) -> list[Array]:
            """p_l = H_G m_l H_A for every tapped layer, the other leaves of ``d`` as given."""
            out = list(d)
            for layer, st, t in zip(layers, layer_states, positions):
                _, lam_g = self._split(lam, t)
                m_l = self._matrix(layer, d)
                self._unmatrix(layer, self._apply_h_g(st.h_g, m_l @ st.h_a, lam_g), out)
            return out

        if traced:
            p_leaves = backend.cond(state.count == 0,
                                    lambda s, d: precondition(warm(s), d), precondition,
                                    states, d_leaves)
        else:
            p_leaves = precondition(states, d_leaves)
        rest = fallback_indices(layers, len(leaves))
        fallback = state.fallback
        if self.fallback == "adam" and rest:
            scaled, fallback = self._adam().update([d_leaves[i] for i in rest], fallback)
            for i, s in zip(rest, scaled):
                p_leaves[i] = s
        p = unflatten(treedef, p_leaves)
        if not (isinstance(self.weight_decay, int | float) and self.weight_decay == 0):
            p = axpy(self.weight_decay, params, p)
        alpha = self.scalar(params, resolve(self.lr, state.count, params))
        update = scale(-alpha, p)
        trial = add(params, update)
        ok, step_norm = self.verdict(loss, update=update)

        def curvature(layer_states: tuple[KBFGSLayerState, ...], ok: Array
                      ) -> tuple[tuple[KBFGSLayerState, ...], Array]:
            """The curvature update, kept only when it and the step are finite (the guard of
            the states happens here, so the steps without it leave them untouched)."""
            prepared = warm(layer_states) if traced else layer_states
            new = self._curvature(prepared, first_pass(), trial, layers, batch, lam)
            ok = xp.logical_and(ok, all_finite(new))
            return choose(ok, new, layer_states), ok

        states, ok = every(backend, state.count, self.curvature_interval, curvature,
                           lambda s, ok: (s, ok), states, ok)
        # both states hold the selected layers: the guard's select on them folds away
        new_state = self.State(state.count + 1, states, lam, inner, fallback)
        params, state, ok, step_norm = self.guard(
            params, state._replace(layers=states), trial, new_state, loss,
            damping_key="damping", update=update, verdict=(ok, step_norm))
        return params, state, self.info(params, loss, step_norm, state.damping, ok,
                                        extras={"lr": alpha})

    def _reject(self, params: Tree, state: KBFGSState, loss: Array, nan: Array
                ) -> tuple[Tree, KBFGSState, StepInfo]:
        """The eager rejection of a step that met a non-finite value before its update."""
        params, state, ok, step_norm = self.guard(params, state, params, state, loss, nan,
                                                  damping_key="damping")
        return params, state, self.info(params, loss, step_norm, state.damping, ok,
                                        extras={"lr": nan})


class KBFGSL(KBFGS):
    """K-BFGS(L) (Algorithm 9 with L-BFGS for H_G): :class:`KBFGS` with every layer's H_G kept
    as the last ``memory`` damped pairs (s~, y~) of the pair damping (Algorithm 8 or 3) in a
    fixed-size buffer, oldest first, and applied from H_0 = I / lambda_G (Algorithm 9, line 9),
    both in the step p = H_G (m H_A) and in the H_G y of the pair damping. O(p d_out) memory for
    H_G instead of O(d_out^2) (Table 3.1). The buffers have a fixed size (empty slots are
    skipped), so the step compiles under ``jax.jit``.

    Parameters: those of :class:`KBFGS`, and

    memory: int, default 100
        p >= 1, the number of pairs kept per layer (the thesis's value).
    product: {"compact", "two-loop"}, default "compact"
        How the pairs are applied; both give the L-BFGS matrix (the tests check them against
        the dense BFGS matrix of the same pairs). ``"compact"``: the compact representation
        (Byrd, Nocedal and Schnabel 1994,
        :func:`~secondorder.linalg.quasi_newton.lbfgs_apply_compact`), the thesis's "non-loop"
        implementation (sec. 3.4.3): two p x p triangular solves and a few large products.
        ``"two-loop"``: the two-loop recursion
        (:func:`~secondorder.linalg.quasi_newton.lbfgs_apply`), 2p small steps (the backend's
        ``fori_loop`` when traced); as fast under ``jax.jit``, about 2.3x slower per step on
        eager torch at p = 100 (MLP 784-256-10, batch 128).

    The state is a :class:`KBFGSLState`.
    """

    State: type = KBFGSLState

    def __init__(self, apply: Callable, loss: Loss, *, memory: int = 100,
                 product: str = "compact", lr: float | Schedule = 0.3, damping: float = 30.0,
                 momentum: float = 0.9,
                 weight_decay: float = 0.0, statistics_decay: float = 0.9, mu1: float = 0.2,
                 curvature_interval: int = 20, pair_damping: str = "dp-dlm",
                 damping_split: str = "positions", fallback: str = "sgd",
                 fallback_b2: float = 0.999, fallback_eps: float = 1e-8,
                 transform: Any = None):
        if not isinstance(memory, int | float) or int(memory) != memory or memory < 1:
            raise HyperparameterError(
                f"KBFGSL: memory must be a Python integer >= 1 (the number of L-BFGS pairs "
                f"kept per layer; it fixes the state's shapes), got {memory!r}")
        if product not in ("compact", "two-loop"):
            raise HyperparameterError(
                f"KBFGSL: product={product!r} is not one of 'compact', 'two-loop'")
        self.memory, self.product = int(memory), product
        super().__init__(
            apply, loss, lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay,
            statistics_decay=statistics_decay, mu1=mu1, curvature_interval=curvature_interval,
            pair_damping=pair_damping, damping_split=damping_split, fallback=fallback,
            fallback_b2=fallback_b2, fallback_eps=fallback_eps, transform=transform)


def _eye_like(a: Array) -> Array:
    backend = backend_of(a)
    return backend.xp.eye(a.shape[0], dtype=a.dtype, device=backend.device(a))


def _on_first(backend: Backend, count: Array, fn: Callable[..., Any], states: Any,
              *operands: Any) -> Any:
    """``fn(states, *operands)`` on the first step (count 0), else ``states``, through
    ``backend.cond`` under tracing (a Python branch on eager backends)."""
    first = count == 0
    if backend.is_concrete(first):
        return fn(states, *operands) if bool(first) else states
    return backend.cond(first, fn, lambda s, *_: s, states, *operands)
