"""Data-parallel training over torch.distributed ranks (gloo, local processes) against one
process on the whole batch: every registered method, the torch.optim integration on a plain and
a DistributedDataParallel module, and a NaN on one rank's shard.

The 4-rank runs take a minute on two cores and run in ``nox -s distributed``
(``SECONDORDER_FULL_DISTRIBUTED=1``); on 2 ranks, ``secondorder check --ranks 2``
(tests/test_cli.py: every method, with a NaN in one rank's shard) and the integration test here
run everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

import distributed_workers as workers  # noqa: E402
from secondorder.distributed.equivalence import _worker, batches, compare  # noqa: E402
from secondorder.distributed.launch import free_address, spawn  # noqa: E402
from secondorder.optim.registry import METHODS  # noqa: E402

FULL = os.environ.get("SECONDORDER_FULL_DISTRIBUTED") == "1"


@pytest.mark.skipif(not FULL, reason="runs in nox -s distributed; on 2 ranks, "
                    "test_cli.py's check --ranks 2 makes the same run")
def test_a_nan_on_one_rank_is_skipped_by_every_rank_and_the_run_stays_one_process():
    """Batch 3 has a NaN in its last sample, which only the last rank holds: every rank rejects
    that step, as one process does, and after 10 steps every rank's parameters are those of one
    process to 1e-12."""
    rows = compare(sorted(METHODS), 4, steps=10, nan_at=3)
    for row in rows:
        assert row.finite == [t != 3 for t in range(10)], row.method
        assert row.agree, row.method
        assert row.deviation <= 1e-12, (row.method, row.deviation)


@pytest.mark.skipif(not FULL, reason="runs in nox -s distributed; check --ranks 2 runs here")
def test_every_method_on_four_ranks_is_one_process():
    for row in compare(sorted(METHODS), 4, steps=10):
        assert row.agree and all(row.finite), row.method
        assert row.deviation <= 1e-12, (row.method, row.deviation)


def test_torch_optimizer_on_plain_and_ddp_modules(tmp_path):
    """secondorder.integrations.torch.Optimizer under torchrun-style ranks: rank 0's weights
    are broadcast, each rank steps on its shard, and the module of every rank ends as the one
    process's module trained on the whole batches."""
    spawn(workers.integration, 2, str(tmp_path), timeout=300)
    for rank in range(2):  # Backend.mean_reduce: the mean over the ranks of (rank, 1)
        assert np.array_equal(np.load(Path(tmp_path) / f"mean.{rank}.npy"), [0.5, 1.0])
    # BatchNorm in train mode normalises each shard by its own statistics (as DDP without
    # SyncBatchNorm): not the one-process step, but every rank's module, running statistics
    # included, is the same, and training moved it from rank 0's initial weights
    bn = [np.load(Path(tmp_path) / f"batchnorm.{rank}.npy") for rank in range(2)]
    assert np.array_equal(bn[0], bn[1])
    for rank in range(2):  # shards of 8 and 6 samples: a ShapeError on both ranks
        assert "[8, 6] samples" in (Path(tmp_path) / f"uneven.{rank}.txt").read_text()
    data = batches(5)
    for method, ddp, conv in workers.CONFIGS:
        reference = workers.train(workers.module(seed=0, conv=conv), data, method)
        for rank in range(2):
            flat = np.load(Path(tmp_path) / f"{method}.{ddp}.{conv}.{rank}.npy")
            assert np.max(np.abs(flat - reference)) <= 1e-12, (method, ddp, conv, rank)


def test_launch_reports_a_rank_that_fails(tmp_path):
    with pytest.raises(Exception, match="unknown-method|KeyError"):
        spawn(_worker, 2, ["unknown-method"], 1, None, str(tmp_path), timeout=120)


@pytest.mark.skipif(not FULL, reason="runs in nox -s distributed (torchrun twice)")
def test_readme_torchrun_example_on_two_ranks_prints_the_one_process_loss(tmp_path):
    """The README's train.py under ``torchrun --nproc_per_node 2`` prints the loss and flag of
    the same script on one rank (every rank takes the one-process step)."""
    import re
    import subprocess
    import sys

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Data-parallel training", 1)[1]
    script = tmp_path / "train.py"
    script.write_text(re.search(r"```python\n(.*?)```", section, flags=re.S).group(1))
    torchrun = Path(sys.executable).with_name("torchrun")
    printed = []
    for n in (1, 2):
        done = subprocess.run([str(torchrun), "--nproc_per_node", str(n), "--master_port",
                               free_address().rsplit(":", 1)[1], str(script)],
                              capture_output=True, text=True, timeout=300, check=True)
        printed.append(done.stdout.split())
    assert printed[0] == printed[1] and printed[0][1] == "True", printed
