"""Tensor Normal Training (Y. Ren and D. Goldfarb, "Tensor normal training for deep learning
models", NeurIPS 2021), Algorithm 15 of Y. Ren's thesis. The algorithm, its parameters and its
state are in the docstring of :class:`TNT`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from .. import random
from .._pytree import flatten, unflatten
from ..backends import Backend
from ..curvature.blocks import BlockState, TensorBlock, factor_diagonals
from ..errors import HyperparameterError
from ..losses import Loss
from ..models.base import find_model
from ..tree import add
from . import _tensor_blocks as tb
from .base import Array, Batch, Optimizer, StepInfo, Tree, choose
from .schedules import Schedule, resolve
from .state import every, every_any, initial_count, method_state
from .step_rules import check_transform, init_transform, transform_gradient

__all__ = ["TNT", "TNTState", "normalise"]

KERNEL_LAYOUTS = ("auto", "oihw", "hwio", None)
FISHER_ESTIMATES = ("batch_mean", "per_example")


@method_state("TNT")
class TNTState(NamedTuple):
    """Step count t; the random key the sampled labels are drawn from (split at every
    statistics step); per leaf, the :class:`~secondorder.curvature.blocks.BlockState` of each
    of its blocks (the moving averages G^(i) of E[G^(i)] and the cached (U~_i + eps I)^{-1});
    the momentum m; the state of the user's gradient transform (``()`` without one)."""

    count: Array
    key: Array
    blocks: tuple
    momentum: Tree
    transform: Any = ()


def normalise(factors: Sequence[Array], xp: Any) -> list[Array]:
    """The normalisation (4.10) of the thesis: U~_i = E_i / (c0^{k-1} prod_{j != i} d_j) with
    c0 = (tr(E_i) / prod_j d_j)^{1/k}, for estimates E_i of E[G^(i)] of sizes d_i.

    tr(E_i) = E||G||_F^2 is the same for every mode; the estimates' traces agree up to rounding,
    and their mean is used. Then tr(U~_i)/d_i = c0 for every i, and when G is tensor-normal,
    E_i = U_i prod_{j != i} tr(U_j) gives U~_1 (x) ... (x) U~_k = U_1 (x) ... (x) U_k exactly.
    All-zero statistics (a tensor whose sampled gradient is always 0) give U~_i = 0.
    """
    k = len(factors)
    dims = [f.shape[0] for f in factors]
    total = math.prod(dims)
    trace = sum(xp.sum(xp.linalg.diagonal(f)) for f in factors) / k
    c0 = (trace / total) ** (1.0 / k)
    safe = xp.where(c0 > 0, c0, xp.ones_like(c0))
    return [f / (safe ** (k - 1) * (total // d)) for f, d in zip(factors, dims)]


class TNT(Optimizer):
    """Tensor Normal Training, Algorithm 15 of Ren's thesis, for any tree of parameter tensors.

    Every parameter tensor W (a leaf; a convolution kernel as the 3-way tensor (filter size,
    in, out), a scalar as shape (1,), any other leaf as a k-way tensor of its own shape) has a
    block F_W ~ U~_1 (x) ... (x) U~_k of the Fisher. With g the gradient of the mean batch loss
    at step t = 0, 1, ... (``state.count``)::

        if t % T1 == 0:  draw y~_n ~ p(y | f(x_n)) for every example (line 7),
                         G = s (1/m) sum_n grad_W l(f(x_n), y~_n)       (the sampled gradient)
                         G^(i) <- beta G^(i) + (1 - beta) mat_i(G) mat_i(G)^T   (line 12; the
                                                    first update takes the batch value)
        if t % T2 == 0:  U~_i from G^(1..k) by (4.10)  (line 15; :func:`normalise`)
                         C_i = (U~_i + eps I)^{-1}   (line 16, Cholesky)
        m <- mu m + g                               (line 10)
        p = m x_1 C_1 x_2 ... x_k C_k + gamma W    (lines 18-19)
        W <- W - alpha_t p                          (line 20)

    Mini-batch scaling s (``fisher_estimate``). The thesis contracts the mini-batch average
    of the sampled gradients (s = 1, ``"batch_mean"``): since the sampled per-example gradients
    have mean zero given x, E[G G^T] = F / m, so (x) U~_i estimates the Fisher of the
    *averaged* gradient, F / m, and the thesis's learning rates and eps (tuned at m = 1000)
    belong to that scale. ``"per_example"`` (the default) takes s = sqrt(m): then (x) U~_i
    estimates F itself, and eps no longer depends on the batch size. (U~_i scales as s^{2/k},
    so the two are not related by a single change of eps.) The default is the one whose eps
    means the same at every batch size: with ``"batch_mean"`` and the default eps and lr, at
    batch 100-128 the factors are so small that the step is about 1/eps^2 times the gradient,
    and a torch MLP and the MNIST-1D MLP diverged within a few steps.

    The thesis warm-starts G^(i) with a pass over the data; here the first step (t = 0)
    collects the statistics of its batch and computes the inverses before the update. The
    labels are drawn with :mod:`secondorder.random` from the key in the state, split at every
    statistics step, so a jitted step draws new labels each time and every backend draws the
    same ones.

    Layout. Biases are 1-way tensors: k = 1, U~_1 = G^(1), the full d x d block of the Fisher
    of the bias (4.10 is the identity for k = 1). A 4-way leaf is taken as a convolution
    kernel and viewed as a 3-way tensor by merging its two spatial axes (``kernel_layout``:
    ``"oihw"``, the library's and PyTorch's (out, in, kh, kw) -> (out, in, kh kw); ``"hwio"``,
    flax's (kh, kw, in, out) -> (kh kw, in, out); ``"auto"``, flax's for a model from
    :func:`~secondorder.models.from_flax` or :func:`~secondorder.models.from_nnx` and
    PyTorch's otherwise; None keeps four modes). The
    order of the modes does not change the preconditioner. ``block_size`` cuts long axes into
    blocks with their own factors, as in :class:`~secondorder.optim.Shampoo` (default None:
    never; the normalisation is then applied per block).

    A block whose new inverses fail (non-finite statistics or a failed Cholesky) keeps its
    previous inverses; ``info.extras["inverses_kept"]`` counts those blocks.

    Parameters
    ----------
    apply, loss:
        The network ``apply(params, x)`` (it must return (batch, outputs)) and the
        :class:`~secondorder.losses.Loss`, which draws the labels (``loss.sample``).
    lr: float or schedule, default 1e-3
        alpha_t > 0, or a schedule t -> alpha_t.
    momentum: float, default 0.9
        mu in [0, 1) (m <- mu m + g).
    beta: float, default 0.9
        Decay of the statistics' moving average, in [0, 1).
    eps: float, default 0.01
        epsilon > 0 added to every normalised factor (the thesis searches 1e-3 .. 1).
    weight_decay: float, default 0.0
        gamma >= 0, added after preconditioning (Algorithm 15, line 19).
    statistics_interval: int, default 1
        T1 >= 1.
    inverse_interval: int, default 1
        T2 >= 1.
    fisher_estimate: {"batch_mean", "per_example"}, default "per_example"
        The mini-batch scaling s above.
    kernel_layout: {"auto", "oihw", "hwio", None}, default "auto"
        How 4-way leaves are read (above).
    block_size: int or None, default None
        The longest factor (None: no blocking).
    seed: int, default 0
        Seed of the key in the initial state.
    transform: transform or None, default None
        An update transform (``init``/``update``, e.g.
        :func:`~secondorder.optim.transforms.clip_by_global_norm`) applied to the gradient g
        first, before the momentum and the preconditioning (the statistics come from sampled
        gradients, not from g): torch's ``clip_grad_norm_`` before
        ``optimizer.step()``.

    State and info. The state is a :class:`TNTState`. ``info.damping`` is eps. A non-finite
    loss or step keeps the old parameters and state (the key included).
    """

    State = TNTState
    param_dtypes = ("float32", "float64")
    hyperparameters = {  # noqa: RUF012
        "lr": "> 0", "momentum": "[0, 1)", "beta": "[0, 1)", "eps": "> 0",
        "weight_decay": ">= 0", "statistics_interval": "integer >= 1",
        "inverse_interval": "integer >= 1", "block_size": "integer >= 1", "seed": "integer >= 0"}
    info_extras = ("inverses_kept",)

    def __init__(self, apply: Callable, loss: Loss, *, lr: float | Schedule = 1e-3,
                 momentum: Any = 0.9, beta: Any = 0.9, eps: Any = 0.01,
                 weight_decay: Any = 0.0, statistics_interval: int = 1,
                 inverse_interval: int = 1, fisher_estimate: str = "per_example",
                 kernel_layout: str | None = "auto", block_size: int | None = None,
                 seed: int = 0, transform: Any = None):
        super().__init__(apply, loss)
        check_transform(transform, "TNT")
        self.transform = transform
        if fisher_estimate not in FISHER_ESTIMATES:
            raise HyperparameterError(
                f"TNT: fisher_estimate={fisher_estimate!r} is not valid; use 'batch_mean' (the "
                "thesis: statistics of the mini-batch mean) or 'per_example' (estimates F)")
        if kernel_layout not in KERNEL_LAYOUTS:
            raise HyperparameterError(
                f"TNT: kernel_layout={kernel_layout!r} is not valid; use 'auto' (from the "
                "model), 'oihw' (PyTorch and the library's models), 'hwio' (flax) or None "
                "(keep 4-way leaves)")
        if kernel_layout == "auto":
            model = find_model(apply)
            kernel_layout = "hwio" if model is not None and model.channels_last else "oihw"
        self.lr, self.momentum, self.beta, self.eps = lr, momentum, beta, eps
        self.weight_decay = weight_decay
        self.statistics_interval = int(statistics_interval)
        self.inverse_interval = int(inverse_interval)
        self.fisher_estimate, self.kernel_layout = fisher_estimate, kernel_layout
        self.block_size = None if block_size is None else int(block_size)
        self.seed = int(seed)

    def __repr__(self) -> str:
        return (f"TNT(lr={self.lr}, eps={self.eps}, T1={self.statistics_interval}, "
                f"T2={self.inverse_interval}, fisher_estimate={self.fisher_estimate!r})")

    # ------------------------------------------------------------------ layout
    def tensor_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The tensor shape a leaf of ``shape`` is preconditioned as (see the class notes)."""
        shape = tuple(int(s) for s in shape)
        if not shape:
            return (1,)
        if len(shape) == 4 and self.kernel_layout == "oihw":
            return (shape[0], shape[1], shape[2] * shape[3])
        if len(shape) == 4 and self.kernel_layout == "hwio":
            return (shape[0] * shape[1], shape[2], shape[3])
        return shape

    def plans(self, params: Tree) -> list[tb.LeafPlan]:
        return [tb.plan_leaf(leaf.shape, self.tensor_shape(leaf.shape), self.block_size)
                for leaf in flatten(params)[0]]

    def init(self, params: Tree) -> TNTState:
        leaves, treedef = flatten(params)
        backend = self.backend(params)
        dev = backend.device(leaves[0])
        return TNTState(initial_count(backend, dev), random.key(self.seed, backend, dev),
                        tb.init_blocks(self.plans(params), leaves, "inverse"),
                        unflatten(treedef, [leaf * 0.0 for leaf in leaves]),
                        init_transform(self.transform, params))

    # ------------------------------------------------------------------ pieces
    def _inverses(self, backend: Backend, blocks: tuple) -> tuple[tuple, Array]:
        xp = backend.xp
        out, kept = [], None
        for states in blocks:
            row = []
            for st in states:
                block = TensorBlock(tuple(f.shape[0] for f in st.factors))

                def compute(block: TensorBlock = block, st: BlockState = st) -> BlockState:
                    tilde = st._replace(factors=tuple(normalise(st.factors, xp)))
                    new = block.update_cache(tilde, self.eps, kind="inverse", split="each")
                    return new._replace(factors=st.factors)

                new, failed = tb.guarded_cache(backend, st, compute)
                row.append(new)
                kept = failed if kept is None else kept + failed
            out.append(tuple(row))
        return tuple(out), kept

    def sampled_gradient(self, pullback: Callable, f: Array, key: Array) -> Tree:
        """s times the gradient of the mean loss at labels drawn from the model's predictive
        distribution at the outputs ``f`` with ``key`` (``pullback`` is the VJP of the network
        at the parameters)."""
        m = f.shape[0]
        scale = 1.0 / m if self.fisher_estimate == "batch_mean" else 1.0 / math.sqrt(m)
        targets = self.loss.sample(f, key=key)
        return pullback(self.loss.grad(f, targets) * scale)

    def step(self, params: Tree, state: TNTState, batch: Batch
             ) -> tuple[Tree, TNTState, StepInfo]:
        backend = self.check_batch(params, state, batch)
        xp = backend.xp
        x, y = batch
        f, pullback = backend.vjp(lambda p: self.apply(p, x), params)
        loss = self.loss.value(f, y)
        grad = pullback(self.loss.grad(f, y) * (1.0 / f.shape[0]))
        grad, inner = transform_gradient(self.transform, grad, state.transform, params)
        w, treedef = flatten(params)
        g = flatten(grad)[0]
        plans = self.plans(params)
        count = state.count

        def stats(blocks: tuple, key: Array) -> tuple[tuple, Array]:
            """The statistics' update and the key after it (it advances only here)."""
            keys = random.split(key)
            # traced, the pass is repeated inside the branch: reusing the step's pullback
            # would keep the forward pass's residuals alive (and copied into other layouts)
            # at every step for the one step in T1 that needs them
            out, back = (f, pullback) if backend.is_concrete(loss) else backend.vjp(
                lambda p: self.apply(p, x), params)
            sampled = flatten(self.sampled_gradient(back, out, keys[1, :]))[0]
            return tb.update_statistics(plans, blocks, sampled, self.beta, xp), keys[0, :]

        def periodic(blocks: tuple) -> tuple[tuple, Array, Array]:
            """The statistics (every T1) and the inverses (every T2), and the key after them."""
            blocks, key = every(backend, count, self.statistics_interval, stats,
                                lambda b, k: (b, k), blocks, state.key)
            return *every(backend, count, self.inverse_interval,
                          lambda b: self._inverses(backend, b), keep, blocks), key

        def keep(blocks: tuple) -> tuple[tuple, Array]:
            return blocks, blocks[0][0].factors[0][0, 0] * 0

        def finish(blocks: tuple, *checks: Any) -> tuple[Any, ...]:
            """The momentum, the preconditioned step and the verdict on it (and on ``checks``)."""
            m = [self.momentum * mi + gi for mi, gi in zip(flatten(state.momentum)[0], g)]
            p = [tb.precondition(plan, st, mi, xp) for plan, st, mi in zip(plans, blocks, m)]
            if not (isinstance(self.weight_decay, int | float) and self.weight_decay == 0):
                p = [pi + self.weight_decay * wi for pi, wi in zip(p, w)]
            lr = resolve(self.lr, count, params)
            update = unflatten(treedef, [-lr * pi for pi in p])
            return m, update, self.verdict(loss, *checks, update=update)

        def changed(blocks: tuple) -> tuple[tuple, Array, Array, tuple[Any, ...]]:
            # the new statistics are checked too: a NaN in them (a non-finite sampled gradient)
            # must reject the step, not stay in the state behind roots or inverses that were
            # kept
            new, kept, key = periodic(blocks)
            out = finish(new, factor_diagonals(st for row in new for st in row))
            return choose(out[-1][0], new, blocks), kept, key, out

        def unchanged(blocks: tuple) -> tuple[tuple, Array, Array, tuple[Any, ...]]:
            return blocks, keep(blocks)[1], state.key, finish(blocks)

        # traced, one conditional: the factors and inverses leave a conditional once per step
        # and are chosen (old or new) only in the branch that changes them (as K-FAC)
        blocks, kept, next_key, out = every_any(
            backend, count, (self.statistics_interval, self.inverse_interval), changed,
            unchanged, state.blocks)
        m, update, verdict = out
        new_params = add(params, update)
        new_state = TNTState(count + 1, next_key, blocks, unflatten(treedef, m), inner)
        # both states hold the chosen blocks: the guard's select on them folds away
        params, state, ok, step_norm = self.guard(params, state._replace(blocks=blocks),
                                                  new_params, new_state, loss, update=update,
                                                  verdict=verdict)
        return params, state, self.info(params, loss, step_norm, self.eps, ok,
                                        extras={"inverses_kept": kept})
