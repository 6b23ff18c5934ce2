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


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """||a - e|| / ||e||, with NaN entries required in the same places (and then ignored)."""
    nan = np.isnan(expected)
    if not np.array_equal(np.isnan(actual), nan):
        return float("inf")
    a, e = np.where(nan, 0.0, actual), np.where(nan, 0.0, expected)
    return float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-300))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_first_twenty_steps_match_the_recording(name):
    out = run(name)
    keys = ["loss", "step_norm", "damping", *(f"params_{t}" for t in SAVED)]
    errors = {key: _relative_error(out[key], FIXTURES[f"{name}/{key}"]) for key in keys}
    assert max(errors.values()) <= RTOL, errors
