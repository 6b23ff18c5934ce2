"""Value checks inside ``jax.jit``: :func:`checked`.

Every optimiser checks its batch where it enters (:meth:`Optimizer.check_batch
<secondorder.optim.Optimizer.check_batch>`: framework, device, dtype, batch sizes) and the loss
checks target values where the outputs meet them (:meth:`Loss.check_values
<secondorder.losses.Loss.check_values>`: class labels in range, probability rows). Shapes,
dtypes and devices are static, so those checks hold inside ``jax.jit`` as well. Values are not:
inside a trace nothing can be read on the host, so a jitted step with a label out of range runs
(it computes a finite, wrong loss on NumPy-like indexing, or NaN) and raises nothing.

``checked(step)`` is the checked mode for JAX: it compiles ``step`` with ``jax.jit`` under
:func:`jax.experimental.checkify.checkify`, with the loss's value checks written as
``checkify.check`` calls into the compiled program, and raises the same
:class:`~secondorder.errors.LabelError` as the eager step::

    step = secondorder.optim.checked(opt.step)
    params, state, info = step(params, state, (x, y))   # LabelError on a bad label

The checks add one reduction over the targets to the compiled step. Outside ``checked`` (a
plain ``jax.jit(opt.step)``) the compiled program carries no checks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from .errors import LabelError

#: how many ``checked`` traces are in progress (the loss emits checkify checks while > 0)
_depth = 0


def active() -> bool:
    """True while :func:`checked` is tracing a step."""
    return _depth > 0


def check_labels(y: Any, k: int) -> None:
    """In a :func:`checked` trace: integer class labels ``y`` lie in [0, k). Else nothing."""
    if not active():
        return
    import jax.numpy as jnp
    from jax.experimental import checkify

    checkify.check(jnp.all((y >= 0) & (y < k)),
                   f"softmax cross-entropy: class labels must lie in [0, {k - 1}] for {k} "
                   "outputs; got values from {lo} to {hi}. Check the labels (0-based) and the "
                   "width of the network's last layer", lo=jnp.min(y), hi=jnp.max(y))


def check_rows(y: Any) -> None:
    """In a :func:`checked` trace: the rows of ``y`` are probability vectors. Else nothing."""
    if not active():
        return
    import jax.numpy as jnp
    from jax.experimental import checkify

    tol = max(1e-6, 64 * y.shape[-1] * float(jnp.finfo(y.dtype).eps))
    sums = jnp.sum(y, axis=-1)
    ok = jnp.all(jnp.where(jnp.isfinite(y), y >= 0, True)) & jnp.all(
        jnp.where(jnp.isfinite(sums), jnp.abs(sums - 1) <= tol, True))
    checkify.check(ok, "softmax cross-entropy: target rows must be probability vectors "
                       "(entries >= 0, each row summing to 1); pass integer labels or "
                       "normalised rows")


def checked(step: Callable[..., Any]) -> Callable[..., Any]:
    """``step`` compiled with ``jax.jit`` and the loss's value checks kept in the program:
    calling the result raises :class:`~secondorder.errors.LabelError` where the eager step
    would. For JAX arrays; the arguments are those of ``step``."""
    import jax
    from jax.experimental import checkify

    def tracing(*args: Any, **kwargs: Any) -> Any:
        global _depth
        _depth += 1
        try:
            return step(*args, **kwargs)
        finally:
            _depth -= 1

    compiled = jax.jit(checkify.checkify(tracing, errors=checkify.user_checks))

    @functools.wraps(step)
    def run(*args: Any, **kwargs: Any) -> Any:
        err, out = compiled(*args, **kwargs)
        message = err.get()
        if message is not None:
            raise LabelError(message.split(" (check failed at")[0])
        return out

    return run
