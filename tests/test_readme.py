"""The README's Python example runs as written and its two solves agree."""

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


def test_readme_example_runs():
    reason, iterations, gap = run_example(0)
    assert reason == "converged" and 1 <= int(iterations) <= 120
    assert float(gap) < 1e-8


def test_readme_curvature_example_runs():
    pytest.importorskip("torch")
    assert run_example(1) == ["True", "True"]  # GGN and K-FAC are PSD


def test_readme_training_example_runs():
    pytest.importorskip("autograd")
    assert run_example(2) == ["True", "True"]


def test_readme_commands_are_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    commands = re.findall(r"```\n(python3 .*?)\n```", README.read_text())
    assert len(commands) == 2
    assert commands[1] in ci
