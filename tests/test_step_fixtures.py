"""Every optimiser reproduces its first 20 steps as recorded before the optimiser core was
rebuilt from pieces (``tests/fixtures/steps.npz``, see ``tests/step_fixtures.py``): losses,
step norms, damping and parameters to 1e-12, relative."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from step_fixtures import CONFIGS, SAVED, run

pytest.importorskip("autograd")
pytest.importorskip("sklearn")

FIXTURES = np.load(Path(__file__).parent / "fixtures" / "steps.npz")
RTOL = 1e-12


def _close(actual: np.ndarray, expected: np.ndarray) -> None:
    both_nan = np.isnan(actual) & np.isnan(expected)
    assert np.array_equal(np.isnan(actual), np.isnan(expected))
    a, e = np.where(both_nan, 0.0, actual), np.where(both_nan, 0.0, expected)
    assert np.linalg.norm(a - e) <= RTOL * max(np.linalg.norm(e), 1e-300), (a, e)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_first_twenty_steps_match_the_recording(name):
    out = run(name)
    for key in ("loss", "step_norm", "damping"):
        _close(out[key], FIXTURES[f"{name}/{key}"])
    for t in SAVED:
        _close(out[f"params_{t}"], FIXTURES[f"{name}/params_{t}"])
