"""Shampoo (V. Gupta, T. Koren and Y. Singer, "Shampoo: preconditioned stochastic tensor
optimization", ICML 2018) in the form of Algorithm 16 of Y. Ren's thesis (moving-average
statistics, momentum, weight decay), with the blocking and grafting of Distributed Shampoo
(R. Anil et al., "Scalable second order optimization for deep learning", 2020; H.-J. M. Shi et
al., "A distributed data-parallel PyTorch implementation of the distributed Shampoo optimizer",
2023). The algorithm, its parameters and its state are in the docstring of :class:`Shampoo`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from .._pytree import flatten, unflatten
from ..backends import Backend
from ..curvature.blocks import BlockState, TensorBlock, factor_diagonals
from ..errors import HyperparameterError
from ..losses import Loss
from . import _tensor_blocks as tb
from .base import Array, Batch, Optimizer, StepInfo, Tree
from .schedules import Schedule, resolve
from .state import every, initial_count, method_state
from .step_rules import check_transform, init_transform, transform_gradient
from .transforms import scale_by_adam

__all__ = ["Shampoo", "ShampooState"]

GRAFTS = (None, "sgd", "adam")
ROOT_METHODS = ("eigh", "newton")


@method_state("Shampoo")
class ShampooState(NamedTuple):
    """Step count t; per leaf, the :class:`~secondorder.curvature.blocks.BlockState` of each of
    its blocks (the statistics G^(i) and the cached roots (G^(i) + eps I)^{-1/(2k)}); the
    momentum m (a tree like the parameters); the grafting method's state (Adam's moments for
    ``graft="adam"``, else ``()``); the state of the user's gradient transform (``()``
    without one)."""

    count: Array
    blocks: tuple
    momentum: Tree
    graft: Any = ()
    transform: Any = ()


class Shampoo(Optimizer):
    """Shampoo, Algorithm 16 of Ren's thesis, for any tree of parameter tensors.

    For every parameter tensor W (a leaf of the tree, viewed as a k-way tensor of its own
    shape without the axes of length 1: a (1, n) or (n, 1, 1) kernel is a vector, k = 1, and a
    scalar has shape (1,)), with g the gradient of the mean batch loss at step
    t = 0, 1, ... (``state.count``)::

        g <- g + gamma W                                   (coupled weight decay only)
        m <- mu m + g                                      (Alg. 16 line 7)
        if t % T1 == 0:  G^(i) <- beta G^(i) + (1 - beta) mat_i(g) mat_i(g)^T,  i = 1..k
                                                           (line 9; the first update takes the
                                                            batch value)
        if t % T2 == 0:  R_i = (G^(i) + eps I)^{-1/(2k)}  (line 12)
        p = m x_1 R_1 x_2 ... x_k R_k                      (line 14)
        p <- p ||q|| / ||p||                               (grafting, per tensor; see below)
        p <- p + gamma W                                   (decoupled weight decay, line 15)
        W <- W - alpha_t p                                 (line 16)

    mat_i(g) is the mode-i unfolding (d_i x prod_{j != i} d_j) and x_i the mode-i product, so
    p is ((x)_i R_i) vec~(m) in the row-major Kronecker convention (eq. 4.9 of the thesis).
    The thesis warm-starts G^(i) with a pass over the data; here the first step (t = 0)
    collects the statistics of its batch and computes the roots from them, before the update.

    Roots (``root_method``): ``"eigh"`` through the eigendecomposition (eigenvalues clipped at
    0, then shifted by eps; float32 input retries the decomposition in float64 when it fails),
    or ``"newton"``, the coupled Newton iteration of Guo and Higham as in Anil et al. (at most
    100 iterations, tolerance 1e-6: :func:`secondorder.linalg.inverse_root`), which discards an
    iteration that increases the error by more than 20% and stops. A block whose new roots fail
    (the iteration ends with max |M - I| > 1/2, a non-finite result, or non-finite statistics)
    keeps its previous roots; ``info.extras["roots_kept"]`` counts those blocks at each step.

    Blocking (Distributed Shampoo): every tensor axis longer than ``block_size`` is cut into
    chunks of ``block_size`` (the last one holds the rest), and each block (one chunk per axis)
    gets its own factors, one per axis of the block longer than 1 (a 1 x 3 block at the end
    of an axis is a vector of 3). This keeps every factor at most ``block_size`` wide, with the
    statistics of a block only from the gradient entries inside it (a block-diagonal
    approximation within the mode). The alternative of Distributed Shampoo, a diagonal factor
    for a long axis, is not used: blocks keep full-matrix information at bounded cost.

    Grafting (Agarwal et al., "Disentangling adaptive gradient methods from learning rates",
    2020, as in Distributed Shampoo): Shampoo gives the direction of each tensor's step and
    another method its length. ``graft="sgd"``: q = m, the step of SGD with the same momentum;
    ``graft="adam"``: q = (a / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps_a), the step of Adam
    with its own moments a <- b1 a + (1 - b1) g, v <- b2 v + (1 - b2) g^2 of the (coupled)
    gradient. Then p <- p ||q|| / ||p|| for every tensor (p = 0 when ||p|| = 0), so the learning
    rate is the grafted method's. ``None``: no grafting (Algorithm 16).

    Parameters
    ----------
    apply, loss:
        The network ``apply(params, x)`` and the :class:`~secondorder.losses.Loss`; the
        objective is the mean loss of ``apply(params, x)`` against ``y``.
    lr: float or schedule, default 1e-3
        alpha_t, > 0, or a schedule t -> alpha_t of the step count.
    momentum: float, default 0.9
        mu in [0, 1) (heavy ball, m <- mu m + g).
    beta: float, default 0.9
        Decay of the statistics' moving average, in [0, 1).
    eps: float, default 1e-4
        epsilon > 0, added to every factor before its root (the thesis searches 1e-4 .. 1e-2).
    weight_decay: float, default 0.0
        gamma >= 0.
    decoupled_weight_decay: bool, default True
        True: gamma W is added to the preconditioned step (Algorithm 16, line 15); False: to
        the gradient (L2 regularisation: it enters the statistics, the momentum and the graft).
    statistics_interval: int, default 1
        T1 >= 1: statistics every T1 steps.
    root_interval: int, default 1
        T2 >= 1: roots every T2 steps (the thesis's benchmarks use 100 for speed).
    root_method: {"eigh", "newton"}, default "eigh"
        How the inverse 2k-th roots are computed (above).
    block_size: int or None, default 1024
        The longest factor; None never blocks.
    graft: {None, "sgd", "adam"}, default None
        The grafting method (above).
    graft_b1, graft_b2, graft_eps: float, default 0.9, 0.999, 1e-8
        Adam's decay rates (in [0, 1)) and epsilon (> 0) for ``graft="adam"``.
    transform: transform or None, default None
        An update transform (``init``/``update``, e.g.
        :func:`~secondorder.optim.transforms.clip_by_global_norm`) applied to the gradient g
        first, before the weight decay, the statistics, the momentum and the graft: torch's
        ``clip_grad_norm_`` before ``optimizer.step()``.

    State and info. The state is a :class:`ShampooState`. ``info.damping`` is eps and
    ``info.extras["roots_kept"]`` the number of blocks that kept their previous roots at this
    step. A non-finite loss or step keeps the old parameters and state.
    """

    State = ShampooState
    hyperparameters = {  # noqa: RUF012
        "lr": "> 0", "momentum": "[0, 1)", "beta": "[0, 1)", "eps": "> 0",
        "weight_decay": ">= 0", "statistics_interval": "integer >= 1",
        "root_interval": "integer >= 1", "block_size": "integer >= 1",
        "graft_b1": "[0, 1)", "graft_b2": "[0, 1)", "graft_eps": "> 0"}
    info_extras = ("roots_kept",)

    def __init__(self, apply: Callable, loss: Loss, *, lr: float | Schedule = 1e-3,
                 momentum: Any = 0.9, beta: Any = 0.9, eps: Any = 1e-4,
                 weight_decay: Any = 0.0, decoupled_weight_decay: bool = True,
                 statistics_interval: int = 1, root_interval: int = 1,
                 root_method: str = "eigh", block_size: int | None = 1024,
                 graft: str | None = None, graft_b1: Any = 0.9, graft_b2: Any = 0.999,
                 graft_eps: Any = 1e-8, transform: Any = None):
        super().__init__(apply, loss)
        check_transform(transform, "Shampoo")
        self.transform = transform
        if root_method not in ROOT_METHODS:
            raise HyperparameterError(
                f"Shampoo: root_method={root_method!r} is not valid; use 'eigh' (eigen"
                "decomposition) or 'newton' (the coupled Newton iteration)")
        if graft not in GRAFTS:
            raise HyperparameterError(
                f"Shampoo: graft={graft!r} is not valid; use None, 'sgd' or 'adam'")
        self.lr, self.momentum, self.beta, self.eps = lr, momentum, beta, eps
        self.weight_decay, self.decoupled = weight_decay, bool(decoupled_weight_decay)
        self.statistics_interval, self.root_interval = int(statistics_interval), \
            int(root_interval)
        self.root_method = root_method
        self.block_size = None if block_size is None else int(block_size)
        self.graft = graft
        self._adam = (scale_by_adam(graft_b1, graft_b2, graft_eps) if graft == "adam"
                      else None)

    def __repr__(self) -> str:
        return (f"Shampoo(lr={self.lr}, eps={self.eps}, T1={self.statistics_interval}, "
                f"T2={self.root_interval}, root_method={self.root_method!r}, "
                f"block_size={self.block_size}, graft={self.graft!r})")

    # ------------------------------------------------------------------ layout
    def plans(self, params: Tree) -> list[tb.LeafPlan]:
        """The block layout of every leaf (:mod:`._tensor_blocks`)."""
        return [tb.plan_leaf(leaf.shape, leaf.shape, self.block_size, squeeze=True)
                for leaf in flatten(params)[0]]

    def init(self, params: Tree) -> ShampooState:
        leaves = flatten(params)[0]
        backend = self.backend(params)
        blocks = tb.init_blocks(self.plans(params), leaves, "root")
        graft = self._adam.init(params) if self._adam is not None else ()
        return ShampooState(initial_count(backend, backend.device(leaves[0])), blocks,
                            unflatten(flatten(params)[1], [leaf * 0.0 for leaf in leaves]),
                            graft, init_transform(self.transform, params))

    # ------------------------------------------------------------------ pieces
    def _roots(self, backend: Backend, blocks: tuple) -> tuple[tuple, Array]:
        """Every block's inverse 2k-th roots, guarded (:func:`._tensor_blocks.guarded_cache`),
        and the number of blocks that kept their previous roots."""
        out, kept = [], None
        for states in blocks:
            row = []
            for st in states:
                block = TensorBlock(tuple(st.factors[i].shape[0]
                                          for i in range(len(st.factors))))

                def compute(block: TensorBlock = block, st: BlockState = st) -> BlockState:
                    return block.update_cache(st, self.eps, kind="root", split="each",
                                              method=self.root_method)

                new, failed = tb.guarded_cache(backend, st, compute)
                row.append(new)
                kept = failed if kept is None else kept + failed
            out.append(tuple(row))
        return tuple(out), kept

    def _kept_zero(self, blocks: tuple) -> Array:
        return blocks[0][0].factors[0][0, 0] * 0

    def step(self, params: Tree, state: ShampooState, batch: Batch
             ) -> tuple[Tree, ShampooState, StepInfo]:
        backend = self.check_batch(params, state, batch)
        xp = backend.xp
        loss, grad = self.value_and_grad(params, batch)
        grad, inner = transform_gradient(self.transform, grad, state.transform, params)
        w, treedef = flatten(params)
        g = flatten(grad)[0]
        if not self.decoupled and not _is_zero(self.weight_decay):
            g = [gi + self.weight_decay * wi for gi, wi in zip(g, w)]
        plans = self.plans(params)
        count = state.count

        def stats(blocks: tuple, grads: list) -> tuple:
            return tb.update_statistics(plans, blocks, grads, self.beta, xp)

        blocks = every(backend, count, self.statistics_interval, stats,
                       lambda blocks, grads: blocks, state.blocks, g)

        def roots(blocks: tuple) -> tuple[tuple, Array]:
            new, kept = self._roots(backend, blocks)
            return tb.caches(new), kept

        # the conditional returns the caches alone: passed through it, the statistics came out
        # in another memory layout under jax.jit, a transposing copy of every factor per step
        caches, kept = every(backend, count, self.root_interval, roots,
                             lambda blocks: (tb.caches(blocks), self._kept_zero(blocks)),
                             blocks)
        blocks = tb.with_caches(blocks, caches)
        m = [self.momentum * mi + gi for mi, gi in zip(flatten(state.momentum)[0], g)]
        p = [tb.precondition(plan, st, mi, xp) for plan, st, mi in zip(plans, blocks, m)]
        graft_state = state.graft
        if self.graft is not None:
            if self.graft == "adam":
                q, graft_state = self._adam.update(unflatten(treedef, g), state.graft)
                q = flatten(q)[0]
            else:
                q = m
            p = [_graft(pi, qi, xp) for pi, qi in zip(p, q)]
        if self.decoupled and not _is_zero(self.weight_decay):
            p = [pi + self.weight_decay * wi for pi, wi in zip(p, w)]
        lr = resolve(self.lr, count, params)
        update = [-lr * pi for pi in p]
        new_params = unflatten(treedef, [wi + ui for wi, ui in zip(w, update)])
        new_state = ShampooState(count + 1, blocks, unflatten(treedef, m), graft_state, inner)
        # the new statistics are checked too: a NaN in them (a non-finite sampled gradient)
        # must reject the step, not stay in the state behind roots or inverses that were kept
        diagonals = factor_diagonals(st for row in blocks for st in row)
        params, state, ok, step_norm = self.guard(params, state, new_params, new_state, loss,
                                                  diagonals, update=unflatten(treedef, update))
        return params, state, self.info(params, loss, step_norm, self.eps, ok,
                                        extras={"roots_kept": kept})


def _norm(x: Array, xp: Any) -> Array:
    return xp.sqrt(xp.sum(x * x))


def _graft(p: Array, q: Array, xp: Any) -> Array:
    """p ||q|| / ||p|| (0 where ||p|| = 0)."""
    pn = _norm(p, xp)
    positive = pn > 0
    ratio = _norm(q, xp) / xp.where(positive, pn, xp.ones_like(pn))
    return p * xp.where(positive, ratio, xp.zeros_like(pn))


def _is_zero(value: Any) -> bool:
    return isinstance(value, int | float) and value == 0

