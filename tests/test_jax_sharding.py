"""A batch sharded over a ``jax.sharding.Mesh`` runs through the unchanged ``jax.jit(opt.step)``
and gives the parameters of one device (:mod:`secondorder.distributed.sharding`).

The device count of JAX's CPU platform is fixed when JAX starts, so the runs on 1, 2 and 4
devices happen in a subprocess started with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``;
it prints one JSON row per method, device count and batch with or without a NaN
(:func:`~secondorder.distributed.sharding.compare`), and the assertions here name the method and
its deviation. The problem is the torch check's (:mod:`secondorder.distributed.equivalence`):
an MLP 3-5-3, softmax cross-entropy, 10 batches of 16 samples, float64.

Each method costs three XLA compilations (one per mesh), about 2-8 s apiece on one CPU core, so
the default run takes four methods of different structure on 4 devices: SGD (the gradient's
batch mean), CurveBall (forward- and reverse-mode curvature products), K-FAC (per-layer
statistics from taps) and SMW-NG (the S x S Gram matrix of per-sample gradients, which pairs
samples from different devices). Every registered method on 2 and 4 devices runs in
``nox -s distributed`` (``SECONDORDER_FULL_DISTRIBUTED=1``), about two minutes on two cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("jax")

from secondorder.optim.registry import METHODS  # noqa: E402

FULL = os.environ.get("SECONDORDER_FULL_DISTRIBUTED") == "1"
TOLERANCE = 1e-12
NAN_AT = 3
DEFAULT_METHODS = ("sgd", "curveball", "kfac", "smw-ng")

_CHILD = f"""
import json, sys
import numpy as np
from secondorder.distributed.sharding import compare, mesh, shard_batch
from secondorder.errors import ShapeError

methods, devices = json.loads(sys.argv[1]), json.loads(sys.argv[2])
rows = compare(methods, devices, steps=10, nan_at=(None, {NAN_AT}))
errors = []
for call in (lambda: shard_batch((np.zeros((15, 3)), np.zeros(15)), mesh(4)),
             lambda: mesh(5)):
    try:
        call()
        errors.append(None)
    except ShapeError as e:
        errors.append(str(e))
print(json.dumps({{"rows": rows, "errors": errors}}))
"""


def sharded_runs(methods: list[str], devices: list[int]) -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_ENABLE_X64": "1", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(methods),
                           json.dumps(devices)], capture_output=True, text=True, env=env,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def check(out: dict, methods: list[str], devices: list[int]) -> float:
    """Assert every sharded run is its 1-device run (see the asserts); the largest deviation."""
    rows = out["rows"]
    assert {(r["method"], r["devices"]) for r in rows} == {
        (m, n) for m in methods for n in devices}
    table = "\n".join(
        f"{r['method']:20s} {r['devices']} devices  NaN at {r['nan_at']}: deviation "
        f"{r['deviation']:.1e}, finite {r['finite']}, agree {r['agree']}, "
        f"replicated {r['replicated']}" for r in rows)
    bad = [r for r in rows
           if not (r["deviation"] <= TOLERANCE and r["agree"] and r["replicated"])]
    assert not bad, f"sharded runs that are not the 1-device run to {TOLERANCE:g}:\n{table}"
    for r in rows:  # every clean step accepted; the NaN batch rejected by the whole mesh
        expected = [True] * 10 if r["nan_at"] is None else [t != NAN_AT for t in range(10)]
        assert r["finite"] == expected, (r["method"], r["devices"], r["nan_at"], r["finite"])
    uneven, too_many = out["errors"]
    assert uneven is not None and "15 samples" in uneven and "multiple of 4" in uneven
    assert too_many is not None and "xla_force_host_platform_device_count=5" in too_many
    return max(r["deviation"] for r in rows)


@pytest.mark.slow
def test_four_methods_sharded_over_four_devices_are_one_device():
    methods = list(DEFAULT_METHODS)
    assert check(sharded_runs(methods, [4]), methods, [4]) <= TOLERANCE


@pytest.mark.skipif(not FULL, reason="every method on 2 and 4 devices runs in nox -s "
                    "distributed (SECONDORDER_FULL_DISTRIBUTED=1); four methods run here")
def test_every_method_sharded_over_two_and_four_devices_is_one_device():
    methods = sorted(METHODS)
    assert check(sharded_runs(methods, [2, 4]), methods, [2, 4]) <= TOLERANCE


def test_one_device_mesh_in_process():
    """In the test process (one CPU device): the helpers place the arrays as promised and the
    jitted step takes the sharded batch."""
    import jax
    import numpy as np

    from secondorder import losses
    from secondorder.backends import get
    from secondorder.distributed.equivalence import SIZES, batches
    from secondorder.distributed.sharding import mesh, replicate, shard_batch
    from secondorder.models import MLP

    m = mesh()
    assert m.axis_names == ("batch",) and m.size == len(jax.devices())
    model = MLP(list(SIZES), "tanh")
    opt = METHODS["sgd"](model, losses.SoftmaxCrossEntropy())
    params = model.init(0, "jax", dtype="float64")
    params, state = replicate((params, opt.init(params)), m)
    assert all(a.sharding.is_fully_replicated for a in jax.tree_util.tree_leaves(params))
    backend = get("jax")
    x, y = batches(1)[0]
    xs, ys = shard_batch((backend.asarray(x), backend.asarray(y)), m)
    assert xs.sharding.spec == jax.sharding.PartitionSpec("batch")
    xl, yl = shard_batch((x, y), m, local=True)  # one process: its rows are the whole batch
    assert xl.sharding == xs.sharding and np.array_equal(np.asarray(xl), x)
    _, _, info = jax.jit(opt.step)(params, state, (xs, ys))
    assert bool(info.finite)
    eager = opt.step(params, state, (backend.asarray(x), backend.asarray(y)))[2]
    np.testing.assert_allclose(float(info.loss), float(eager.loss), rtol=1e-14)
