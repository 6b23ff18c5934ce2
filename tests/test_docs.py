"""The examples of docs/architecture.md run as written and print what the text says."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def test_architecture_examples_run():
    pytest.importorskip("autograd")
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 3
    scope: dict = {}
    printed = []
    for block in blocks:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, str(DOC), "exec"), scope)
        printed.append(out.getvalue().split())
    # AdamW assembled by hand from the chain equals the class, to the last bit
    assert printed[0] == ["AdamWState", "5", "0.0"]
    # the prox-linear direction through clipping, momentum and a schedule trains
    assert printed[1] == ["True", "True"]
    # Newton = dense Hessian system + |eigenvalue| direction + cubic Armijo, to the last bit
    assert printed[2] == ["0.0"]
