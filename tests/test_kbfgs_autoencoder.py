"""``secondorder reproduce kbfgs-autoencoder`` (the K-BFGS thesis's Table 3.3 shape): a tiny run
whose SGD curve is replayed by hand with the step schedule computed here, the table's ranks
against the sorted losses, and the command line's usage errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from secondorder import backends, tree
from secondorder.errors import HyperparameterError

pytest.importorskip("sklearn")


def test_tiny_run_is_sgd_with_the_step_schedule_replayed_by_hand(tmp_path, capsys):
    """256 images in 2 batches of 128, 3 epochs (T = 6 steps): the rate is 3e-3 0.1^floor(3t/6)
    at step t, so 3e-3, 3e-3, 3e-4, 3e-4, 3e-5, 3e-5; the reported training loss after each
    epoch is the mean BCE of the hand-trained weights on the 256 images."""
    from secondorder.cli import main
    from secondorder.problems import DigitsAutoencoder

    out = tmp_path / "table33.json"
    argv = ["reproduce", "kbfgs-autoencoder", "--epochs", "3", "--seeds", "1", "--grid-size",
            "1", "--subset", "256", "--backend", "numpy", "--dtype", "float64", "--methods",
            "sgd,kbfgs", "--json", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "K-BFGS" in printed and "thesis MNIST" in printed
    result = json.loads(out.read_text())
    assert result["experiment"] == "kbfgs-autoencoder"
    assert result["protocol"]["schedule"] == "step" and result["protocol"]["samples"] == 256
    assert result["thesis_mnist"] == {"sgd": 54.75, "kbfgs": 51.60}
    run = result["results"]["sgd"]["runs"][0]
    assert set(run) >= {"seed", "train_loss", "seconds", "batch_loss", "non_finite_steps"}
    assert "train_accuracy" not in run and len(run["train_loss"]) == 3
    kbfgs = result["results"]["kbfgs"]
    assert kbfgs["fixed"] == {"momentum": 0.9, "curvature_interval": 1}
    assert math.isfinite(kbfgs["final_train_loss"]["mean"])

    problem = DigitsAutoencoder(sizes=(64, 128, 64, 32, 8, 32, 64, 128, 64), activation="relu")
    x = problem.x[:256]
    numpy = backends.get("numpy")
    params = problem.model.init(0, "numpy")
    treedef = tree.structure(params)
    w = [np.asarray(a) for a in tree.leaves(params)]
    velocity = [np.zeros_like(a) for a in w]
    rng = np.random.default_rng(0)
    losses, t = [], 0
    for _ in range(3):
        order = rng.permutation(256)
        for idx in np.split(order, 2):
            g = tree.leaves(numpy.grad(
                lambda p, i=idx: problem.loss.value(problem.model.apply(p, x[i]), x[i]),
                tree.unflatten(treedef, w)))
            lr = 3e-3 * 0.1 ** (3 * t // 6)
            velocity = [0.9 * v + np.asarray(gi) for v, gi in zip(velocity, g)]
            w = [a - lr * v for a, v in zip(w, velocity)]
            t += 1
        f = np.asarray(problem.model.apply(tree.unflatten(treedef, w), x))
        losses.append(float(problem.loss.value(f, x)))
    np.testing.assert_allclose(run["train_loss"], losses, rtol=1e-12)


def test_table_ranks_follow_the_losses():
    from secondorder.bench.kbfgs_autoencoder import THESIS_MNIST, table

    def entry(name: str, loss: float) -> dict:
        return {"name": name, "hyperparameters": {"lr": 0.1},
                "final_train_loss": {"mean": loss, "std": 0.0}, "seconds_per_epoch": {"mean": 1}}

    result = {"results": {"sgd": entry("SGD-momentum", 3.0), "kfac": entry("K-FAC", 1.0),
                          "adam": entry("Adam", 2.0), "kbfgs": {"name": "K-BFGS",
                                                                "error": "ValueError: x"}},
              "thesis_mnist": dict(THESIS_MNIST), "not_available": ["kbfgs-l"]}
    headers, rows = table(result)
    by_name = {row[0]: dict(zip(headers, row)) for row in rows}
    assert [by_name[n]["rank"] for n in ("K-FAC", "Adam", "SGD-momentum")] == ["1", "2", "3"]
    # the thesis's order among the same three: K-FAC 51.24 < Adam 52.76 < SGD-m 54.75
    assert [by_name[n]["thesis rank"] for n in ("K-FAC", "Adam", "SGD-momentum")] == ["1", "2",
                                                                                      "3"]
    assert by_name["K-BFGS"]["final training loss"].startswith("failed: ValueError")
    assert by_name["K-BFGS(L)"]["hyperparameters"] == "not available"


def test_grids_start_at_the_thesis_pairs_and_cover_its_ranges():
    from secondorder.bench.kbfgs_autoencoder import GRIDS

    assert GRIDS["kbfgs"][0] == {"lr": 0.03, "damping": 0.3}  # Table 3.5, MNIST
    assert GRIDS["kfac"][0] == {"lr": 0.03, "damping": 1.0}
    assert GRIDS["adam"][0] == {"lr": 1e-4, "eps": 1e-4}
    for name, grid in GRIDS.items():
        assert len({tuple(sorted(p.items())) for p in grid}) == len(grid), name
        assert all(3e-5 <= p["lr"] <= 1 for p in grid)
        assert all(0.03 <= p.get("damping", 1) <= 30 for p in grid)


def test_autoencoder_sizes_are_checked():
    from secondorder.problems import DigitsAutoencoder

    with pytest.raises(HyperparameterError, match="64 first and last"):
        DigitsAutoencoder(sizes=(64, 8, 32))


@pytest.mark.parametrize("argv", [
    ["--methods", "shampoo"], ["--schedule", "linear"], ["--epochs", "0"],
    ["--backend", "tensorflow"],
])
def test_usage_errors(argv, capsys):
    from secondorder.cli import main

    assert main(["reproduce", "kbfgs-autoencoder", *argv]) == 2
    err = capsys.readouterr().err
    assert "error: argument" in err and "Traceback" not in err
