"""K-FAC as an optimiser (Martens and Grosse 2015; Algorithm 12 of Yi Ren's thesis): per-layer
Kronecker-factored curvature from layer taps, kept as moving averages in curvature blocks, with
damped inverses refreshed periodically. The algorithm, its parameters and its state are
described in the docstring of :class:`KFAC` (``help(KFAC)``).

The optimiser is ``secondorder.optim.KFAC``; ``secondorder.curvature.KFAC`` is the K-FAC
*operator* of one batch (a linear operator, no state). Neither is exported at the top level.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from .. import random
from .._pytree import flatten, unflatten
from ..backends import backend_of
from ..curvature.blocks import (
    BlockState,
    ConvBlock,
    DenseBlock,
    KroneckerBlock,
    factor_diagonals,
)
from ..curvature.kfac import _cotangents, layer_statistics
from ..errors import HyperparameterError, NotPositiveDefiniteError, StructureError
from ..losses import Loss
from ..models.base import LayerInfo, find_model
from ..models.layers import (
    channels_last_to_reference,
    reference_axes,
    reference_to_channels_last,
)
from ..tree import add, axpy, scale, vdot
from .base import (
    Array,
    Batch,
    Optimizer,
    StepInfo,
    Tree,
    adapt_damping,
    all_finite,
    choose,
    is_number,
)
from .directions import curveball_2x2
from .schedules import Schedule, is_schedule, resolve, resolve_adaptation
from .state import every, every_any, initial_count, method_state
from .step_rules import check_transform
from .transforms import add_decayed_weights, chain, scale_by_adam, trace

__all__ = ["KFAC", "KFACState"]

MODES = ("mc", "exact", "empirical")
CACHES = ("inverse", "eigh")
FALLBACKS = ("sgd", "adam")
CONV_CONVENTIONS = ("kfc", "curvlinops")


@method_state("KFAC")
class KFACState(NamedTuple):
    """K-FAC's state: the step count; one :class:`~secondorder.curvature.blocks.BlockState`
    per tapped layer (the factors (G, A), their update count and the cached damped inverses or
    eigendecompositions); the damping lambda in force; the random key of the Monte-Carlo
    samples; the state of the gradient transforms (weight decay, momentum); the state of the
    Adam-style fallback on parameters outside tapped layers (``()`` with the SGD fallback or
    when every parameter is in a tapped layer); and the previous update (a tree like the
    parameters, used by the quadratic-model step; ``()`` otherwise)."""

    count: Array
    blocks: tuple[BlockState, ...]
    damping: Array
    key: Array
    transform: Any
    fallback: Any = ()
    velocity: Any = ()


class _Layer(NamedTuple):
    """A tapped layer as the optimiser sees it: where its leaves are, its block, and whether
    its kernel is stored transposed (flax)."""

    info: LayerInfo
    block: KroneckerBlock
    flax: bool


def _to_reference(w: Array, flax: bool) -> Array:
    """A kernel in the reference layout (d_out, d_in) or (C_out, C_in, k_1, ..., k_n); flax
    stores (d_in, d_out) and (k_1, ..., k_n, C_in, C_out)."""
    return channels_last_to_reference(w) if flax else w


def _from_reference(w: Array, flax: bool) -> Array:
    return reference_to_channels_last(w) if flax else w


def fallback_indices(layers: Sequence[Any], n: int) -> list[int]:
    """Indices (among the ``n`` parameter leaves) of the leaves outside every tapped layer:
    the parameters a Kronecker-factored method steps with its fallback instead."""
    covered = set()
    for layer in layers:
        covered.add(layer.info.weight)
        if layer.info.bias is not None:
            covered.add(layer.info.bias)
    return [i for i in range(n) if i not in covered]


class KFAC(Optimizer):
    r"""K-FAC: Kronecker-factored approximate curvature (J. Martens and R. Grosse, "Optimizing
    neural networks with Kronecker-factored approximate curvature", ICML 2015; R. Grosse and
    J. Martens, "A Kronecker-factored approximate Fisher matrix for convolution layers" (KFC),
    ICML 2016), as in Algorithm 12 of Y. Ren's thesis (the seed
    ``002_cc6040582a98cbc3``).

    For every tapped dense or convolution layer l with parameters W~_l = [W_l b_l] (bias column
    last; a convolution kernel flattened row-major to (C_out, C_in kh kw), the im2col layout)
    the curvature block is approximated by Omega_l (x) Gamma_l (column-major vec; paper
    eqs. 1-3, the "A" and "G" of the library's curvature blocks). At step k = 0, 1, ... on the
    batch (x, y), with g the gradient of the mean loss::

        every T1 steps (k mod T1 = 0):  one forward pass with taps and one backward pass per
            sampled target (Algorithm 12 lines 11-16) give the batch statistics
              Omega^ = (1/m) sum_i sum_t a~_it a~_it^T,
              Gamma^ = (1/(m T)) sum_i sum_t Dh_it Dh_it^T
            and  Omega <- beta Omega + (1 - beta) Omega^,  Gamma <- beta Gamma + (1 - beta) Gamma^
            (the first update takes the batch value: a warm start from the first batch);
        every T2 steps (k mod T2 = 0):  (lines 17-21, K-FAC paper sec. 6.3)
            H_Omega = (Omega + pi sqrt(lambda) I)^{-1},  H_Gamma = (Gamma + sqrt(lambda)/pi I)^{-1},
            pi = sqrt((tr(Omega) / dim Omega) / (tr(Gamma) / dim Gamma));
        every step:
            m <- mu m + (g + wd w)                                          (line 7)
            p_l = H_Gamma m_l H_Omega    (per layer; the fallback below elsewhere)  (line 8)
            w <- w - alpha_k p                                              (line 9)

    Here a step computes its statistics and inverses *before* its update (kfac-jax's order),
    so the first step has curvature from its own batch; Algorithm 12 updates them after the
    step and starts from a pass over the data (line 2). The momentum mu and the weight decay
    wd go through the core's transforms (:func:`~secondorder.optim.transforms.trace` and
    :func:`~secondorder.optim.transforms.add_decayed_weights`, in that order on the gradient,
    as Algorithm 12 applies its beta to the gradient before preconditioning).

    Curvature (``mode``): ``"mc"`` (default) samples the targets from the model's predictive
    distribution (the true Fisher; Algorithm 12 line 12), with a fresh sample at every
    statistics step drawn from the random key in the state (which advances on those steps
    only), so a jitted step draws new noise each time; ``"exact"`` uses the columns of the
    loss-Hessian factors (the exact expectation over targets, i.e. the GGN's "type-2" K-FAC:
    for a single linear layer under squared loss Omega (x) Gamma is then the GGN block
    exactly); ``"empirical"`` uses the batch labels (the empirical Fisher).

    Convolutions (KFC). The library's convention is that **Omega sums over the T output
    positions and Gamma averages** (Grosse and Martens 2016, as
    :func:`secondorder.curvature.kronecker_factors`). curvlinops does the opposite (factors
    Omega / T and T Gamma); the Kronecker product is the same. ``conv_convention="curvlinops"``
    rescales the batch statistics of every convolution, and of every dense layer shared over T
    positions (a Linear on a sequence, which follows the convolutions' convention), to
    (Omega^ / T, T Gamma^) before the moving average, which reproduces curvlinops' factors for
    convolutions; dense layers on (m, d) inputs (T = 1) are unaffected.
    The pi-split damped inverse is the same in both conventions (pi becomes pi / T, so the
    damped factors become (Omega + pi sqrt(lambda) I) / T and T (Gamma + sqrt(lambda)/pi I),
    whose inverses' Kronecker product is unchanged), as is the exact damping; the conventions
    give different steps with ``damping_split="equal"`` (tests/test_kfac_optimizer.py checks
    both facts).

    Parameters outside tapped layers (normalisation scales, embeddings, anything the model
    does not tap): ``fallback="sgd"`` (default) sends their momentum-averaged gradient through
    unpreconditioned with the same learning rate, as the thesis does for batch-norm parameters
    (sec. 3.7: "updated with the gradient direction, along with the same learning rate");
    ``fallback="adam"`` divides it elementwise by sqrt(v^) + eps, v the moving average of
    squared gradients with decay ``fallback_b2`` and Adam's bias correction (Adam's diagonal
    preconditioner; the momentum stays the shared one).

    Quadratic-model step (``lr=None, momentum=None``; K-FAC paper sec. 7): the update is
    delta = rho delta_prev - beta p, p = F^{-1} (g + wd w) the preconditioned gradient, with
    (rho, beta) minimising the damped quadratic model
    M(delta) = (g + wd w)^T delta + 1/2 delta^T (C + (lambda + wd) I) delta, C the exact GGN of
    the batch (two JVPs per step): the 2x2 system of CurveBall
    (:func:`~secondorder.optim.directions.curveball_2x2`, the same subproblem).

    Adaptive damping (``adapt_damping=True``; K-FAC paper sec. 6.5, kfac-jax's rule): every
    ``damping_interval`` steps the reduction ratio
    rho = (h(w + delta) - h(w)) / (M(delta) - M(0)) of the regularised batch objective
    h = f + wd/2 |w|^2 against the quadratic model above (one more forward pass and, with a
    fixed learning rate, one JVP) sets lambda <- lambda / decay if rho < 1/4,
    lambda <- decay lambda if rho > 3/4, clipped to [min_damping, max_damping]. With
    ``cache="eigh"`` a new damping acts at once; with ``"inverse"`` at the next inverse
    update.

    Parameters
    ----------
    apply, loss:
        The network and the :class:`~secondorder.losses.Loss`. ``apply`` must be a model with
        layer taps: a reference model of :mod:`secondorder.models` (MLP, Autoencoder, ConvNet)
        or its ``apply``, or an adapter's model (``from_torch``: ``nn.Linear`` and
        ``nn.Conv2d``; ``from_flax``: ``nn.Dense`` and ``nn.Conv``, kernels in flax's layout;
        pass ``example=x`` to ``from_flax`` or run one forward pass first so that it knows its
        layers; ``from_nnx``: ``nnx.Linear`` and ``nnx.Conv``, the same; ``from_equinox``:
        ``eqx.nn.Linear`` and ``eqx.nn.Conv``). Anything else raises
        :class:`~secondorder.errors.StructureError`.
    lr: float, schedule or None, default 0.01
        The learning rate alpha_k (> 0), or a schedule of the step count; None (with
        ``momentum=None``): from the quadratic model.
    damping: float or schedule, default 3e-2
        lambda (> 0), the initial value when adapted; a schedule sets it at every step (and
        excludes ``adapt_damping``). lr / lambda is the gain of the step on directions of
        little curvature: near 1/3 trained best on MNIST-1D (``secondorder reproduce
        kronecker-mnist1d``); 1e-3 with the default lr (a gain of 10) diverged within ten
        steps on a torch MLP with BatchNorm and on the MNIST-1D MLP.
    momentum: float or None, default 0.9
        mu in [0, 1), Algorithm 12's beta on the gradient; None with ``lr=None``.
    weight_decay: float, default 0.0
        wd >= 0: wd w is added to the gradient (L2, preconditioned with it).
    statistics_decay: float, default 0.9
        beta of the moving averages of Omega and Gamma, in [0, 1).
    statistics_interval: int, default 10
        T1 >= 1: statistics every T1 steps.
    inverse_interval: int, default 100
        T2 >= 1: damped inverses (or eigendecompositions) every T2 steps.
    mode: {"mc", "exact", "empirical"}, default "mc"
        The curvature (above).
    samples: int, default 1
        Monte-Carlo targets per statistics step (``mode="mc"``).
    seed: int, default 0
        The seed of the state's random key (:func:`secondorder.random.key`).
    cache: {"inverse", "eigh"}, default "inverse"
        ``"inverse"``: the damped factors' inverses by Cholesky every T2 steps;
        ``"eigh"``: the factors' eigendecompositions every T2 steps, damped at every step with
        the current lambda.
    damping_split: {"pi", "equal", "exact"}, default "pi"
        How lambda is shared by the factors (:func:`~secondorder.curvature.blocks.
        split_damping`): ``"pi"`` as above, ``"equal"`` sqrt(lambda) each; ``"exact"`` (only
        with ``cache="eigh"``): (Omega (x) Gamma + lambda I)^{-1} exactly.
    conv_convention: {"kfc", "curvlinops"}, default "kfc"
        The scaling of convolution factors (above).
    fallback: {"sgd", "adam"}, default "sgd"
        The preconditioning of parameters outside tapped layers (above).
    fallback_b2, fallback_eps: float, default 0.999, 1e-8
        The decay (in [0, 1)) and epsilon (> 0) of the Adam fallback.
    adapt_damping: bool, default False
        The Levenberg-Marquardt rule above.
    damping_interval: int, default 5
        Adapt every this many steps (>= 1).
    damping_decay: float, default (19/20)^5
        The factor of the rule, in (0, 1) (the K-FAC paper's omega_1 = (19/20)^T1 with T1 = 5).
    min_damping, max_damping: float, default 1e-8, 1e4
        Bounds on the adapted lambda.
    transform: transform or None, default None
        An update transform (``init``/``update``, e.g.
        :func:`~secondorder.optim.transforms.clip_by_global_norm`) applied to the gradient g
        first, before the weight decay, the momentum and the preconditioning: torch's
        ``clip_grad_norm_`` before ``optimizer.step()``. The statistics, the quadratic model
        and the damping's adaptation use the untransformed gradient. With ``lr=None`` the
        quadratic model sets the step's length along the preconditioned direction, so a
        transform that only rescales the gradient (clipping) leaves the step unchanged.

    State and info. The state is a :class:`KFACState`. ``info.damping`` is the lambda in force
    after the step; ``info.extras`` holds ``lr`` and ``momentum`` (those used: from the
    quadratic model, or the given ones), ``predicted`` (M(delta) - M(0), NaN when not
    computed) and ``rho`` (the reduction ratio on adaptation steps, else NaN). A non-finite
    loss, statistic or update, or a damped factor that is singular to working precision,
    keeps the old parameters and state and multiplies lambda by
    :attr:`Optimizer.damping_boost_on_failure` (not with a damping schedule); the next step
    repeats the periodic work with the larger damping.

    Assembled from :class:`~secondorder.curvature.blocks.DenseBlock` and
    :class:`~secondorder.curvature.blocks.ConvBlock` (statistics, moving averages, pi-split
    caches), the core's transforms, :func:`~secondorder.optim.state.every` and
    :mod:`secondorder.random`.
    """

    State = KFACState
    param_dtypes = ("float32", "float64")
    hyperparameters = {  # noqa: RUF012 - never mutated
        "lr": "> 0", "damping": "> 0", "momentum": "[0, 1)", "weight_decay": ">= 0",
        "statistics_decay": "[0, 1)", "statistics_interval": "integer >= 1",
        "inverse_interval": "integer >= 1", "samples": "integer >= 1", "seed": "integer >= 0",
        "fallback_b2": "[0, 1)", "fallback_eps": "> 0", "damping_interval": "integer >= 1",
        "damping_decay": "(0, 1)", "min_damping": ">= 0", "max_damping": "> 0",
    }
    info_extras = ("lr", "momentum", "predicted", "rho")

    def __init__(self, apply: Callable, loss: Loss, *, lr: float | Schedule | None = 0.01,
                 damping: float | Schedule = 3e-2, momentum: float | None = 0.9,
                 weight_decay: float = 0.0, statistics_decay: float = 0.9,
                 statistics_interval: int = 10, inverse_interval: int = 100,
                 mode: str = "mc", samples: int = 1, seed: int = 0, cache: str = "inverse",
                 damping_split: str = "pi", conv_convention: str = "kfc",
                 fallback: str = "sgd", fallback_b2: float = 0.999, fallback_eps: float = 1e-8,
                 adapt_damping: bool = False, damping_interval: int = 5,
                 damping_decay: float = 0.95**5, min_damping: float = 1e-8,
                 max_damping: float = 1e4, transform: Any = None):
        super().__init__(apply, loss)
        check_transform(transform, "KFAC")
        model = find_model(apply)
        if model is None:
            raise StructureError(
                "KFAC needs a model with layer taps to collect its statistics: pass a "
                "secondorder.models model (MLP, ConvNet, Autoencoder) or the model returned "
                "by from_torch, from_flax, from_nnx or from_equinox, not a plain function; for a "
                "network without tapped layers use Shampoo, Adam or SGD")
        self.model = model
        choices = {"mode": (mode, MODES), "cache": (cache, CACHES),
                   "fallback": (fallback, FALLBACKS),
                   "conv_convention": (conv_convention, CONV_CONVENTIONS)}
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise HyperparameterError(
                    f"KFAC: {name}={value!r} is not one of {', '.join(map(repr, allowed))}")
        splits = ("pi", "equal", "exact") if cache == "eigh" else ("pi", "equal")
        if damping_split not in splits:
            raise HyperparameterError(
                f"KFAC: damping_split={damping_split!r} with cache={cache!r} must be one of "
                f"{', '.join(map(repr, splits))} (the exact damping needs cache='eigh')")
        if (lr is None) != (momentum is None):
            raise HyperparameterError(
                "KFAC: the quadratic model chooses the learning rate and the momentum together: "
                "pass lr=None and momentum=None, or numbers for both")
        for name, value in (("statistics_interval", statistics_interval),
                            ("inverse_interval", inverse_interval), ("samples", samples),
                            ("damping_interval", damping_interval)):
            if not isinstance(value, int | float) or int(value) != value:
                raise HyperparameterError(
                    f"KFAC: {name} must be a Python integer >= 1 (it fixes the step's "
                    f"structure), got {value!r}")
        if is_number(min_damping, max_damping) and min_damping > max_damping:
            raise HyperparameterError(
                f"KFAC: min_damping={min_damping} must not exceed max_damping={max_damping}")
        self.adapt_damping = resolve_adaptation(adapt_damping, damping, "KFAC")
        self.lr, self.damping, self.momentum = lr, damping, momentum
        self.weight_decay, self.statistics_decay = weight_decay, statistics_decay
        self.statistics_interval = int(statistics_interval)
        self.inverse_interval = int(inverse_interval)
        self.mode, self.samples, self.seed = mode, int(samples), int(seed)
        self.cache, self.damping_split = cache, damping_split
        self.conv_convention, self.fallback = conv_convention, fallback
        self.fallback_b2, self.fallback_eps = fallback_b2, fallback_eps
        self.damping_interval, self.damping_decay = int(damping_interval), damping_decay
        self.min_damping, self.max_damping = min_damping, max_damping
        self.transform = transform
        parts = [] if transform is None else [transform]
        if not _is_zero(weight_decay):
            parts.append(add_decayed_weights(weight_decay))
        if momentum is not None and not _is_zero(momentum):
            parts.append(trace(momentum))
        #: the transforms of the gradient before preconditioning (the user's, weight decay,
        #: momentum)
        self.gradient_transform = chain(*parts)

    def __repr__(self) -> str:
        return (f"KFAC(lr={self.lr!r}, damping={self.damping!r}, momentum={self.momentum!r}, "
                f"mode={self.mode!r}, T1={self.statistics_interval}, "
                f"T2={self.inverse_interval})")

    # ------------------------------------------------------------------ layout
    def _layers(self, leaves: list[Array]) -> list[_Layer]:
        """The tapped layers with their blocks (static: from the leaves' shapes)."""
        flax = self.model.channels_last
        layers = []
        for info in self.model.layers:
            shape = tuple(leaves[info.weight].shape)
            if flax:
                shape = tuple(shape[i] for i in reference_axes(len(shape)))
            cls = ConvBlock if info.kind == "conv" else DenseBlock
            bias = None if info.bias is None else tuple(leaves[info.bias].shape)
            layers.append(_Layer(info, cls(shape, bias=bias is not None, bias_shape=bias),
                                 flax))
        if not layers:
            raise StructureError(
                f"KFAC found no tapped dense or convolution layer in {self.model!r}; use "
                "Shampoo, Adam or SGD for this network")
        return layers


    # ------------------------------------------------------------------ state
    def init(self, params: Tree) -> KFACState:
        leaves, _ = flatten(params)
        layers = self._layers(leaves)
        lam = self.scalar(params, 0.0 if is_schedule(self.damping) else self.damping)
        backend = backend_of(lam)
        count = initial_count(backend, backend.device(lam))
        if is_schedule(self.damping):
            lam = resolve(self.damping, count, params)
        blocks = tuple(layer.block.init(leaves[layer.info.weight], kind=self.cache)
                       for layer in layers)
        key = random.key(self.seed, backend, backend.device(lam))
        rest = fallback_indices(layers, len(leaves))
        fallback: Any = ()
        if self.fallback == "adam" and rest:
            fallback = self._adam().init([leaves[i] for i in rest])
        velocity: Any = ()
        if self.lr is None:
            velocity = scale(0.0, params)
        return KFACState(count, blocks, lam, key, self.gradient_transform.init(params),
                         fallback, velocity)

    def _adam(self) -> Any:
        return scale_by_adam(0.0, self.fallback_b2, self.fallback_eps)

    # ------------------------------------------------------------------ pieces
    def _statistics(self, layers: list[_Layer], params: Tree, batch: Batch, key: Array
                    ) -> list[tuple[Array, Array]]:
        """Every tapped layer's batch statistics (Gamma^, Omega^) (the blocks' factor order)
        from one tapped forward pass and one backward pass per cotangent."""
        x, y = batch

        def cotangents(f: Array) -> list[Array]:
            return _cotangents(self.loss, f, y, self.mode, self.samples, self.seed, None,
                               key if self.mode == "mc" else None)

        def statistic(i: int, a: Array, ds: list[Array]) -> tuple[Array, Array]:
            layer = layers[i]
            g, a_stat = layer.block.batch_statistics(a, ds)
            if self.conv_convention == "curvlinops" and a.ndim == 3:  # T output positions
                positions = a.shape[1]
                g, a_stat = g * positions, a_stat / positions
            return g, a_stat

        return layer_statistics(self.model, params, x, cotangents, statistic)[1]

    def _precondition(self, layers: list[_Layer], blocks: tuple[BlockState, ...],
                      leaves: list[Array], lam: Array, fallback: Any
                      ) -> tuple[list[Array], Any]:
        """p: every tapped layer's (b, W) times its cached damped inverse; the fallback on the
        other leaves. Returns the leaves of p and the fallback's new state."""
        out = list(leaves)
        eigh = self.cache == "eigh"
        for layer, bstate in zip(layers, blocks):
            info = layer.info
            w = _to_reference(leaves[info.weight], layer.flax)
            v = w if info.bias is None else (leaves[info.bias], w)
            if eigh:
                r = layer.block.multiply(bstate, v, -1.0, damping=lam, split=self.damping_split)
            else:
                r = layer.block.multiply(bstate, v)
            if info.bias is None:
                out[info.weight] = _from_reference(r, layer.flax)
            else:
                out[info.bias] = r[0]
                out[info.weight] = _from_reference(r[1], layer.flax)
        rest = fallback_indices(layers, len(leaves))
        if self.fallback == "adam" and rest:
            scaled, fallback = self._adam().update([leaves[i] for i in rest], fallback)
            for i, s in zip(rest, scaled):
                out[i] = s
        return out, fallback

    # ------------------------------------------------------------------ step
    def step(self, params: Tree, state: KFACState, batch: Batch
             ) -> tuple[Tree, KFACState, StepInfo]:
        backend = self.check_batch(params, state, batch)
        xp = backend.xp
        scheduled = is_schedule(self.damping)
        damping_key = None if scheduled else "damping"
        lam = resolve(self.damping, state.count, params) if scheduled else state.damping
        x, y = batch
        f, jvp, vjp = backend.linearize_vjp(lambda p: self.apply(p, x), params)
        m = f.shape[0]
        loss = self.loss.value(f, y)
        jl = self.loss.grad(f, y) / m
        grad = vjp(jl)
        nan = self.scalar(params, float("nan"))
        if backend.is_concrete(loss) and not bool(xp.isfinite(loss)):
            return self._reject(params, state, loss, damping_key, nan)

        leaves, treedef = flatten(params)
        layers = self._layers(leaves)

        def refresh(blocks: tuple[BlockState, ...], key: Array
                    ) -> tuple[tuple[BlockState, ...], Array]:
            sample_key = key
            if self.mode == "mc":  # a fresh sample at every statistics step (the key advances)
                keys = random.split(key, 2)
                key, sample_key = keys[0, :], keys[1, :]
            stats = self._statistics(layers, params, batch, sample_key)
            return tuple(layer.block.update_statistics(b, s, self.statistics_decay)
                         for layer, b, s in zip(layers, blocks, stats)), key

        def invert(blocks: tuple[BlockState, ...], lam: Array) -> tuple[BlockState, ...]:
            if self.cache == "eigh":
                return tuple(layer.block.update_cache(b, kind="eigh")
                             for layer, b in zip(layers, blocks))
            return tuple(layer.block.update_cache(b, lam, kind="inverse",
                                                  split=self.damping_split)
                         for layer, b in zip(layers, blocks))

        def periodic(blocks: tuple[BlockState, ...]
                     ) -> tuple[tuple[BlockState, ...], Array] | None:
            """The statistics (every T1) and the factorisations (every T2), and the key after
            them; None when eager statistics are not finite (the step is then rejected before
            factorising)."""
            blocks, key = every(backend, state.count, self.statistics_interval, refresh,
                                lambda blocks, key: (blocks, key), blocks, state.key)
            if backend.is_concrete(loss) and not bool(all_finite(factor_diagonals(blocks))):
                return None
            try:
                return every(backend, state.count, self.inverse_interval, invert,
                             lambda blocks, lam: blocks, blocks, lam), key
            except NotPositiveDefiniteError:
                # eager: a damped factor singular to working precision (traced, its inverse
                # holds inf or NaN and the verdict rejects the step the same way)
                if not backend.is_concrete(loss):
                    raise
                return None

        def finish(blocks: tuple[BlockState, ...], *checks: Any) -> tuple[Any, ...]:
            """The rest of the step with these blocks: the preconditioned direction, the
            learning rate and momentum, the trial parameters, the damping's adaptation and
            the verdict on them (and on ``checks``)."""
            direction, inner = self.gradient_transform.update(grad, state.transform, params)
            p_leaves, fallback = self._precondition(layers, blocks, flatten(direction)[0], lam,
                                                    state.fallback)
            p = unflatten(treedef, p_leaves)
            wd = 0.0 if _is_zero(self.weight_decay) else self.weight_decay
            # g + wd w, the gradient of the regularised objective (not the direction, which
            # holds the momentum and the user's transform)
            g_model = grad if _is_zero(self.weight_decay) else axpy(wd, params, grad)

            def h_out(t: Array) -> Array:
                return self.loss.hvp(f, y, t) / m

            def curvature(jv: Array, jw: Array, v: Tree, w: Tree) -> Array:
                return xp.sum(jv * h_out(jw)) + (lam + wd) * vdot(v, w)

            velocity: Any = ()
            if self.lr is None:
                v = state.velocity
                jp, jv = jvp(p), jvp(v)
                a = curvature(jp, jp, p, p)
                b = curvature(jv, jp, v, p)
                c = curvature(jv, jv, v, v)
                d, e = vdot(g_model, p), vdot(g_model, v)
                mu, alpha = curveball_2x2(a, b, c, d, e)
                update = axpy(-alpha, p, scale(mu, v))
                predicted = 0.5 * (mu * e - alpha * d)
                velocity = update
            else:
                alpha = self.scalar(params, resolve(self.lr, state.count, params))
                mu = self.scalar(params, self.momentum)
                update = scale(-alpha, p)
                predicted = nan
            trial = add(params, update)
            lam_new, ratio = lam, nan
            if self.adapt_damping:
                def adapted(_: Any) -> tuple[Array, Array, Array]:
                    if self.lr is None:
                        change = predicted
                    else:
                        ju = jvp(update)
                        change = vdot(g_model, update) + 0.5 * curvature(ju, ju, update, update)
                    actual = self.objective(trial, batch) - loss
                    if wd:
                        actual = actual + 0.5 * wd * (vdot(trial, trial) - vdot(params, params))
                    rho = actual / change
                    new = adapt_damping(rho, lam, 1.0 / self.damping_decay, self.damping_decay)
                    low = self.scalar(params, self.min_damping)
                    high = self.scalar(params, self.max_damping)
                    return xp.minimum(xp.maximum(new, low), high), rho, change

                lam_new, ratio, predicted = every(backend, state.count + 1,
                                                  self.damping_interval, adapted,
                                                  lambda _: (lam, nan, predicted), None)
            verdict = self.verdict(loss, *checks, update=update)
            return (trial, update, inner, fallback, velocity, lam_new, ratio, predicted, alpha,
                    mu, verdict)

        # One conditional (traced) holds the periodic work and the rest of the step, so the
        # factors and their inverses are the output of a conditional once per step (a copy) and
        # the guard's choice between old and new blocks is made inside the branch that changes
        # them, not by a select over them at every step.
        def changed(blocks: tuple[BlockState, ...]) -> Any:
            new = periodic(blocks)
            if new is None:
                return None
            new, key = new
            # the new statistics are checked too (traced, where the eager test above is not
            # made): a statistics step between inverses would keep an inf or NaN in them
            # behind a finite update, and every inverse after it would fail
            out = finish(new, factor_diagonals(new))
            return choose(out[-1][0], new, blocks), key, out

        def unchanged(blocks: tuple[BlockState, ...]) -> Any:
            return blocks, state.key, finish(blocks)

        result = every_any(backend, state.count,
                           (self.statistics_interval, self.inverse_interval),
                           changed, unchanged, state.blocks)
        if result is None:
            # a factorisation of non-finite statistics would raise on an eager backend
            return self._reject(params, state, loss, damping_key, nan)
        blocks, new_key, out = result
        (trial, update, inner, fallback, velocity, lam_new, ratio, predicted, alpha, mu,
         verdict) = out
        new_state = KFACState(state.count + 1, blocks, lam_new, new_key, inner, fallback,
                              velocity)
        # both states hold the chosen blocks: the guard's select on them folds away
        params, state, ok, step_norm = self.guard(
            params, state._replace(blocks=blocks), trial, new_state, loss,
            damping_key=damping_key, update=update, verdict=verdict)
        extras = {"lr": alpha, "momentum": mu, "predicted": predicted, "rho": ratio}
        return params, state, self.info(params, loss, step_norm, state.damping, ok,
                                        extras=extras)

    def _reject(self, params: Tree, state: KFACState, loss: Array, damping_key: str | None,
                nan: Array) -> tuple[Tree, KFACState, StepInfo]:
        """The eager rejection of a step that met a non-finite value before its update (the
        guard's result, without running the factorisations)."""
        params, state, ok, step_norm = self.guard(params, state, params, state, loss, nan,
                                                  damping_key=damping_key)
        extras = dict.fromkeys(self.info_extras, nan)
        return params, state, self.info(params, loss, step_norm, state.damping, ok,
                                        extras=extras)


def _is_zero(value: Any) -> bool:
    return isinstance(value, int | float) and value == 0

