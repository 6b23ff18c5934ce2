"""The README's Python examples run as written and print what its text says."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def run_example(index):
    """The words the README's ``index``-th Python example prints."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) > index, "README lacks the python example"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(blocks[index], "README.md", "exec"), {})
    return out.getvalue().split()


def test_readme_torch_journey_runs():
    """Your nn.Module in your torch loop: a CNN with BatchNorm and Dropout on the digits trains
    with CurveBall through the torch.optim adapter to over 90% training accuracy."""
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    assert run_example(0) == ["True", "True"]


@pytest.mark.slow
def test_readme_flax_journey_runs():
    """Your flax model in a jitted optax step: the same CNN in flax.linen with CurveBall in an
    optax chain trains under jax.jit to over 85% training accuracy."""
    for name in ("jax", "flax", "optax", "sklearn"):
        pytest.importorskip(name)
    assert run_example(1) == ["True", "True"]


def test_readme_nnx_journey_runs():
    """Your flax.nnx model: the same CNN as an nnx module with BatchNorm and Dropout, K-FAC in the
    model's jitted step, to over 85% training accuracy in eval mode after nnx.update."""
    for name in ("jax", "flax", "sklearn"):
        pytest.importorskip(name)
    assert run_example(2) == ["True", "True"]


def test_readme_example_runs():
    reason, iterations, gap = run_example(3)
    assert reason == "converged" and 1 <= int(iterations) <= 120
    assert float(gap) < 1e-8


def test_readme_curvature_example_runs():
    pytest.importorskip("torch")
    assert run_example(4) == ["True", "True"]  # GGN and K-FAC are PSD


def test_readme_training_example_runs():
    pytest.importorskip("autograd")
    assert run_example(5) == ["True", "True"]


def test_readme_commands_are_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    commands = re.findall(r"```\n(python3 .*?)\n```", README.read_text())
    assert len(commands) == 2
    assert commands[1] in ci
