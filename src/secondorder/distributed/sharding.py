"""Data-parallel JAX: a batch sharded over a :class:`jax.sharding.Mesh` through the unchanged step.

No method in :mod:`secondorder.optim` has communication code, and none needs any under JAX.
Every method reduces its batch means at one place in the core (the loss's mean over samples,
the per-sample statistics that K-FAC, K-BFGS, TNT and the SMW methods average), so when the
inputs ``x`` and targets ``y`` of a batch are split along their leading axis over the devices of
a mesh and the parameters and optimiser state are replicated, ``jax.jit(opt.step)`` compiles as
it always does and XLA's GSPMD partitioner does the rest: each device computes the per-sample
work of its own rows, and every mean over the batch axis becomes a cross-device reduction
(an all-reduce) that the partitioner inserts. Everything after the means (the small linear
systems, the eigendecompositions, the line searches, the finiteness guard) runs replicated, the
same on every device, so the parameters stay replicated step after step::

    import jax
    from secondorder.distributed.sharding import mesh, replicate, shard_batch

    m = mesh()                                   # a 1-D mesh over jax.devices(), axis "batch"
    params, state = replicate((params, opt.init(params)), m)
    step = jax.jit(opt.step)
    for x, y in data:
        params, state, info = step(params, state, shard_batch((x, y), m))

The batch size must be a multiple of the number of devices (:class:`~secondorder.errors.
ShapeError` otherwise). The sharded run computes the same numbers as one device up to the order
of the summations: an all-reduce adds the devices' partial sums in its own order, so results can
differ in the last bits (see ``docs/jax_sharding.md`` for the deviations measured on every
method). To try several devices on one CPU, set
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` before JAX is imported.

Several processes (one per host, or one per GPU) run the same program. Each process calls,
before anything else touches JAX::

    jax.distributed.initialize(coordinator_address="10.0.0.1:1234",
                               num_processes=2, process_id=0)   # 1 on the other process

(on Cloud TPU, SLURM and Open MPI launches the three arguments are found automatically:
``jax.distributed.initialize()``). ``jax.devices()`` then lists the devices of every process,
``jax.local_devices()`` this process's own, and ``mesh()`` builds the global mesh over
``jax.devices()`` (the same call on every process). Each process holds only its own rows of a
batch; a global array is assembled from them without copying data between hosts::

    from jax.sharding import NamedSharding, PartitionSpec as P
    rows = NamedSharding(m, P("batch"))
    x = jax.make_array_from_process_local_data(rows, x_local)   # x_local: this process's rows
    y = jax.make_array_from_process_local_data(rows, y_local)
    params, state, info = step(params, state, (x, y))

(:func:`shard_batch` with ``local=True`` makes these two calls.) Every process must start from
the same parameters (draw them from the same seed, e.g. ``model.init(0, "jax")``) and call the
step the same number of times. Parameters are read back on any process with
``jax.device_get`` or ``np.asarray``, since they are fully replicated.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

from ..errors import ShapeError
from .equivalence import OVERRIDES

__all__ = ["Run", "compare", "mesh", "replicate", "run_sharded", "shard_batch"]

AXIS = "batch"


def mesh(devices: Sequence[Any] | int | None = None, axis: str = AXIS) -> Any:
    """A 1-D :class:`jax.sharding.Mesh` named ``axis`` over ``devices``: a list of
    :class:`jax.Device`, an int (the first that many of ``jax.devices()``), or None (all of
    ``jax.devices()``, every process's devices under ``jax.distributed``)."""
    import jax
    import numpy as np

    available = jax.devices()
    if devices is None:
        devices = available
    elif isinstance(devices, int):
        if not 1 <= devices <= len(available):
            raise ShapeError(
                f"mesh({devices}): there are {len(available)} devices ({available[0].platform}); "
                f"ask for 1 to {len(available)}, or set XLA_FLAGS="
                f"--xla_force_host_platform_device_count={devices} before importing jax to "
                "have that many CPU devices")
        devices = available[:devices]
    return jax.sharding.Mesh(np.asarray(list(devices), dtype=object), (axis,))


def shard_batch(batch: tuple[Any, Any], mesh: Any, axis: str = AXIS, local: bool = False
                ) -> tuple[Any, Any]:
    """The batch ``(x, y)`` with both arrays split along their leading axis over ``mesh``'s axis
    ``axis`` (``NamedSharding(mesh, P(axis))``); the other axes stay whole.

    ``local=True`` is for several processes (``jax.distributed``): ``x`` and ``y`` are then this
    process's rows only, and the global arrays are assembled with
    :func:`jax.make_array_from_process_local_data`. Raises
    :class:`~secondorder.errors.ShapeError` when the (global) batch size is not a multiple of the
    number of devices on the axis, or when x and y differ in length."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    if not isinstance(batch, tuple | list) or len(batch) != 2:
        raise ShapeError(f"shard_batch takes the batch as a pair (x, y), got "
                         f"{type(batch).__name__}")
    x, y = batch
    size = mesh.shape[axis]
    rows = [int(a.shape[0]) if getattr(a, "ndim", 0) else None for a in (x, y)]
    if None in rows:
        raise ShapeError("shard_batch: x and y need a leading batch axis to split; got shapes "
                         f"{getattr(x, 'shape', None)} and {getattr(y, 'shape', None)}")
    if rows[0] != rows[1]:
        raise ShapeError(f"shard_batch: x has {rows[0]} samples but y has {rows[1]}; the "
                         "batch's inputs and targets must have the same length")
    where = "this process's" if local else "the"
    share = (size // jax.process_count()) if local else size
    if share == 0 or rows[0] % share:
        raise ShapeError(
            f"shard_batch: {where} batch of {rows[0]} samples cannot be split evenly over "
            f"{share} device{'s' * (share != 1)} (mesh axis {axis!r}); use a batch size that is "
            f"a multiple of {share} (drop or pad the last samples), or a mesh over fewer "
            "devices")
    sharding = NamedSharding(mesh, P(axis))
    if local:
        return (jax.make_array_from_process_local_data(sharding, x),
                jax.make_array_from_process_local_data(sharding, y))
    return jax.device_put(x, sharding), jax.device_put(y, sharding)


def replicate(tree: Any, mesh: Any) -> Any:
    """``tree`` (parameters, optimiser state, anything with array leaves) with every leaf placed
    whole on each device of ``mesh`` (``NamedSharding(mesh, P())``). Python numbers and other
    leaves that are not arrays pass through."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    sharding = NamedSharding(mesh, P())
    return jax.tree_util.tree_map(
        lambda a: jax.device_put(a, sharding) if isinstance(a, jax.Array) else a, tree)


class Run(NamedTuple):
    """One sharded run of :func:`run_sharded`."""

    params: Any  #: the flat parameters after the last step (a NumPy float64 vector)
    finite: list[bool]  #: ``info.finite`` of every step
    replicated: bool  #: every parameter leaf came out of the last step fully replicated


@functools.cache
def _problem(method: str) -> tuple[Any, Any, Any]:
    """(model, optimiser, jitted step) of ``method`` on the equivalence problem; one jitted
    step per method, so runs on other meshes only lower and compile again and a run on other
    data of the same shapes (the NaN batch) reuses the compiled step."""
    import jax

    from .. import losses
    from ..models import MLP
    from ..optim.registry import METHODS
    from .equivalence import SIZES

    model, loss = MLP(list(SIZES), "tanh"), losses.SoftmaxCrossEntropy()
    opt = METHODS[method](model, loss, **OVERRIDES.get(method, {}))
    return model, opt, jax.jit(opt.step)


def run_sharded(method: str, devices: int, steps: int = 10, nan_at: int | None = None) -> Run:
    """``steps`` steps of ``jax.jit(opt.step)`` for ``method`` with every batch sharded over the
    first ``devices`` JAX devices and the parameters and state replicated: the flat parameters
    after the last step, ``info.finite`` of each step and whether the parameters came out
    replicated. The problem is that of :mod:`secondorder.distributed.equivalence` (the MLP
    3-5-3 with tanh, softmax cross-entropy, its batches of 16 and initial weights, with
    ``nan_at`` as there), on JAX in float64, with the settings of
    :data:`~.equivalence.OVERRIDES` (one problem for both checks); needs ``jax_enable_x64``."""
    import jax
    import numpy as np

    from .._pytree import flatten
    from ..backends import get
    from ..errors import DTypeError
    from .equivalence import batches

    if not jax.config.jax_enable_x64:
        raise DTypeError("run_sharded runs in float64: set JAX_ENABLE_X64=1 or call "
                         "jax.config.update('jax_enable_x64', True) before creating arrays")
    backend = get("jax")
    model, opt, step = _problem(method)
    params = model.init(0, "jax", dtype="float64")
    state = opt.init(params)  # on one device, then replicated like the parameters
    m = mesh(devices)
    params, state = replicate((params, state), m)
    finite = []
    for x, y in batches(steps, nan_at=nan_at):
        batch = shard_batch((backend.asarray(x), backend.asarray(y)), m)
        params, state, info = step(params, state, batch)
        finite.append(bool(info.finite))
    leaves = flatten(params)[0]
    flat = np.concatenate([np.ravel(np.asarray(a)) for a in leaves])
    return Run(flat, finite, all(a.sharding.is_fully_replicated for a in leaves))


def compare(methods: Sequence[str] | None = None, devices: Sequence[int] = (2, 4),
            steps: int = 10, nan_at: Sequence[int | None] = (None,)) -> list[dict[str, Any]]:
    """One row per method, device count and ``nan_at``: the largest deviation of the sharded
    run's parameters from the run on one device (``deviation``), whether both accepted and
    rejected the same steps (``agree``), the sharded run's ``finite`` flags and whether its
    parameters stayed replicated. ``methods`` defaults to every registered method."""
    import numpy as np

    from ..optim.registry import METHODS

    rows = []
    for method in METHODS if methods is None else methods:
        for nan in nan_at:
            reference = run_sharded(method, 1, steps, nan)
            for n in devices:
                run = run_sharded(method, n, steps, nan)
                rows.append({"method": method, "devices": n, "nan_at": nan,
                             "deviation": float(np.max(np.abs(run.params - reference.params))),
                             "agree": run.finite == reference.finite, "finite": run.finite,
                             "replicated": run.replicated})
    return rows
