"""``Scaled``: a library loss times a constant, with the batch reduced by a sum or a mean.

Frameworks scale the same loss differently: PyTorch's ``nn.MSELoss()`` is
(1/(m k)) sum_ij (f_ij - y_ij)^2, which is (2/k) times the library's MSE (1/m) sum_i
1/2 |f_i - y_i|^2; ``reduction="sum"`` multiplies by m. A :class:`Scaled` loss carries that
constant, so the curvature and the steps computed with it are those of the framework's loss.

How the constant enters. The per-sample loss of ``Scaled(loss, ...)`` is c l_i, with

    c = scale * (m if reduction == "sum" else 1) / (k if outputs == "mean" else 1)

for outputs f of shape (m, k), k the wrapped loss's ``outputs_per_sample`` (the entries of a sample
for MSE and BCE, its positions for softmax cross-entropy), and its batch loss is, as for every
library loss, the mean (1/m) sum_i c l_i. So ``reduction="sum"`` gives sum_i l_i, and the curvature
layer's (1/m) sum_i J_i^T H_i J_i becomes the framework's sum_i J_i^T H_i J_i. The per-sample
quantities of :mod:`.base` follow from c l_i alone:

* ``per_sample``, ``grad``, ``hvp``, ``hessian``: c times those of ``loss``;
* ``hessian_sqrt``: sqrt(c) times (so that S S^T = c H);
* ``pinv_hvp``: 1/c times (the pseudo-inverse of c H is H^+ / c); ``projector``: unchanged
  (c H and H have the same range);
* ``conjugate``: (c l)*(a) = c l*(a / c);
* ``targets``, ``noise``, ``key_noise``, ``check``: those of ``loss``.

Sampling (the Monte-Carlo Fisher). The Fisher of c l is *defined* as c times the Fisher of l,
F_c = c E_{t ~ p(t | f)}[grad l(f, t) grad l(f, t)^T] with p the predictive distribution of
the unscaled loss, so that, like the GGN c H, it is scaled once and still equals the GGN in
expectation. (The gradients of c l at sampled targets would give c^2 times the Fisher of l;
this is the convention of BackPACK and curvlinops, where the reduction factor enters once.)
The curvature layer forms the Monte-Carlo Fisher and K-FAC's sampled factors from
``grad(f, t')`` at targets t' returned by ``sample``, so ``sample`` returns targets whose
scaled gradient is sqrt(c) grad l(f, t): with mu(f) the mean of the predictive distribution,

    t' = mu + (t - mu) / sqrt(c),     c grad l(f, t') = sqrt(c) grad l(f, t),

which holds because the gradients of the library's losses are mu(f) minus the target row
(canonical links: mu = f for MSE, softmax(f) for cross-entropy, sigmoid(f) for BCE). For MSE,
t' = f + e / sqrt(c) with standard normal e: the Gaussian with precision c, the predictive
distribution of the likelihood exp(-c l) (for torch's ``nn.MSELoss()``, c = 2/k). For
cross-entropy and BCE with c != 1, t' are rows in the output space with the mean and
covariance of the sampled labels divided by sqrt(c), not labels: they are meant for
``grad`` (the Monte-Carlo Fisher, K-FAC), not for ``value`` or ``check``. With c = 1 ``sample``
returns the unscaled loss's own samples (integer labels for cross-entropy).

The empirical Fisher (``Fisher(kind="empirical")``, K-FAC's ``mode="empirical"``) uses the
gradients of the scaled loss at the batch targets, c grad l(f, y), so it is c^2 times that of l
(for ``reduction="sum"``: m sum_i g_i g_i^T). curvlinops and BackPACK apply the reduction
factor once there too (sum_i g_i g_i^T for a sum); divide by c to compare with them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ..backends import Backend, backend_of
from ..errors import HyperparameterError, UnsupportedLossError
from .base import Array, Loss

REDUCTIONS = ("mean", "sum")
OUTPUTS = ("sum", "mean")


def _check_options(scale: float, reduction: str, outputs: str) -> float:
    if reduction not in REDUCTIONS:
        raise HyperparameterError(
            f"reduction must be 'mean' (the batch loss is the mean over samples) or 'sum', got "
            f"{reduction!r}; for per-sample values call loss.per_sample(f, y)"
        )
    if outputs not in OUTPUTS:
        raise HyperparameterError(
            f"outputs must be 'sum' (the library's per-sample loss) or 'mean' (divided by the "
            f"number of outputs, as torch's MSELoss), got {outputs!r}"
        )
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise HyperparameterError(f"scale must be a positive number, got {scale!r}")
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise HyperparameterError(f"scale must be a positive finite number, got {scale}")
    return scale


class Scaled(Loss):
    """A library loss times a constant c (see the module docstring for every formula).

    Parameters
    ----------
    loss : Loss
        The unscaled loss: :class:`~secondorder.losses.MSE`,
        :class:`~secondorder.losses.SoftmaxCrossEntropy`, :class:`~secondorder.losses.SigmoidBCE`
        or a subclass of :class:`~secondorder.losses.Loss`. A ``Scaled`` loss is unwrapped: the
        constants multiply (at most one of the two may sum over the batch or average over the
        outputs).
    scale : float, default 1.0
        A positive constant multiplying the per-sample loss.
    reduction : {"mean", "sum"}, default "mean"
        How the batch is reduced: "mean" gives (1/m) sum_i scale l_i, "sum" gives
        sum_i scale l_i (implemented as the factor m on every per-sample quantity, since the
        curvature layer always divides by m).
    outputs : {"sum", "mean"}, default "sum"
        "sum" keeps the library's per-sample loss (a sum over the k outputs for MSE and BCE,
        over the positions for cross-entropy); "mean" divides it by k, as PyTorch's
        ``MSELoss`` and ``BCEWithLogitsLoss`` do with ``reduction="mean"`` (a mean over all
        m k entries); for cross-entropy k counts the positions (torch's token mean).

    The constant at outputs f of shape (m, k) is :meth:`factor`,
    c = scale * (m if reduction == "sum") / (k if outputs == "mean"). It depends only on
    shapes, so it is a Python float under ``jax.jit`` and ``torch.func``.

    ``Scaled(MSE(), 2.0, reduction="sum")`` is ``MSE(reduction="sum", scale=2.0)``: the library
    losses' constructors return a ``Scaled`` for any non-default ``reduction``, ``scale`` or
    ``outputs``. A ``Scaled`` loss is not an instance of the loss it wraps, on purpose: code
    written for the unscaled formulas (``ProxLinear(scaled=True)``, the exact logistic dual)
    refuses it with a named error instead of using the wrong curvature.
    """

    def __init__(self, loss: Loss, scale: float = 1.0, *, reduction: str = "mean",
                 outputs: str = "sum"):
        if not isinstance(loss, Loss):
            raise UnsupportedLossError(
                f"Scaled wraps a secondorder.losses.Loss, got {type(loss).__name__}; convert "
                "framework losses with secondorder.losses.as_loss"
            )
        scale = _check_options(scale, reduction, outputs)
        if isinstance(loss, Scaled):
            if reduction == "sum" and loss.reduction == "sum":
                raise HyperparameterError("Scaled: both losses sum over the batch (factor m^2)")
            if outputs == "mean" and loss.outputs == "mean":
                raise HyperparameterError("Scaled: both losses average over the outputs")
            scale *= loss.scale
            reduction = "sum" if "sum" in (reduction, loss.reduction) else "mean"
            outputs = "mean" if "mean" in (outputs, loss.outputs) else "sum"
            loss = loss.loss
        self.loss = loss
        self.scale = scale
        self.reduction = reduction
        self.outputs = outputs
        self.name = loss.name

    def __new__(cls, *args: object, **kwargs: object) -> Scaled:
        return object.__new__(cls)

    # ------------------------------------------------------------------ the constant
    def outputs_per_sample(self, f: Array) -> int:
        return self.loss.outputs_per_sample(f)

    def factor(self, f: Array) -> float:
        """c = scale * (m if reduction == "sum") / (k if outputs == "mean") for outputs f of
        shape (m, k), k the wrapped loss's :meth:`~Loss.outputs_per_sample`."""
        m, k = int(f.shape[0]), self.loss.outputs_per_sample(f)
        c = self.scale
        if self.reduction == "sum":
            c = c * m
        if self.outputs == "mean":
            c = c / k
        return c

    # ------------------------------------------------------------------ values
    def per_sample(self, f: Array, y: Array) -> Array:
        return self.factor(f) * self.loss.per_sample(f, y)

    def value(self, f: Array, y: Array) -> Array:
        """scale * (sum_i or (1/m) sum_i) l_i, divided by k if outputs == "mean"."""
        xp = backend_of(f).xp
        l = self.loss.per_sample(f, y)  # noqa: E741
        total = xp.sum(l) if self.reduction == "sum" else xp.mean(l)
        c = self.scale / (self.loss.outputs_per_sample(f) if self.outputs == "mean" else 1)
        return c * total

    def grad(self, f: Array, y: Array) -> Array:
        return self.factor(f) * self.loss.grad(f, y)

    def hvp(self, f: Array, y: Array, v: Array) -> Array:
        return self.factor(f) * self.loss.hvp(f, y, v)

    def hvp_at(self, f: Array, y: Array) -> Callable[[Array], Array]:
        c = self.factor(f)
        base = self.loss.hvp_at(f, y)
        return lambda v: c * base(v)

    def grad_hvp_at(self, f: Array, y: Array) -> tuple[Array, Callable[[Array], Array]]:
        c = self.factor(f)
        grad, base = self.loss.grad_hvp_at(f, y)
        return c * grad, lambda v: c * base(v)

    def targets(self, f: Array, y: Array) -> Array:
        return self.loss.targets(f, y)

    def hessian(self, f: Array, y: Array) -> Array:
        return self.factor(f) * self.loss.hessian(f, y)

    def hessian_sqrt(self, f: Array, y: Array) -> Array:
        return math.sqrt(self.factor(f)) * self.loss.hessian_sqrt(f, y)

    def pinv_hvp(self, f: Array, y: Array, v: Array) -> Array:
        return self.loss.pinv_hvp(f, y, v) / self.factor(f)

    def projector(self, f: Array, y: Array, v: Array) -> Array:
        return self.loss.projector(f, y, v)

    def conjugate(self, a: Array, y: Array) -> Array:
        c = self.factor(a)
        return c * self.loss.conjugate(a / c, y)

    # ------------------------------------------------------------------ sampling
    def noise(self, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        return self.loss.noise(shape, rng)

    def key_noise(self, key: Array, f: Array) -> Array:
        return self.loss.key_noise(key, f)

    def _sample(self, f: Array, noise: Array) -> Array:
        """Targets t' = mu + (t - mu) / sqrt(c) for t drawn by the unscaled loss (the module
        docstring says why); t itself when c = 1."""
        t = self.loss._sample(f, noise)
        c = self.factor(f)
        if c == 1.0:
            return t
        if not getattr(self.loss, "canonical", False):
            raise UnsupportedLossError(
                f"Scaled({type(self.loss).__name__}): sampling with a scale needs a loss whose "
                "gradient is the predictive mean minus the target row (the library's MSE, "
                "SoftmaxCrossEntropy and SigmoidBCE); set canonical = True on the loss class "
                "if that holds, or use the exact GGN or the empirical Fisher"
            )
        rows = self.loss.targets(f, t)
        # grad l(f, t) = mu - rows, so rows + (1 - 1/sqrt(c)) grad = mu + (rows - mu)/sqrt(c)
        return rows + (1.0 - 1.0 / math.sqrt(c)) * self.loss.grad(f, t)

    # ------------------------------------------------------------------ checks
    def check(self, f: Array, y: Array) -> None:
        self.loss.check(f, y)

    def _check_targets(self, backend: Backend, f: Array, y: Array) -> None:
        self.loss._check_targets(backend, f, y)

    def __repr__(self) -> str:
        options = [repr(self.loss)]
        if self.scale != 1.0:
            options.append(f"scale={self.scale!r}")
        if self.reduction != "mean":
            options.append(f"reduction={self.reduction!r}")
        if self.outputs != "sum":
            options.append(f"outputs={self.outputs!r}")
        return f"Scaled({', '.join(options)})"
