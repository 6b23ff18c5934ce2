"""The Kronecker-family step-time benchmarks run end to end (one short round, as a subprocess:
the benchmarks set BLAS threads process-wide) and write the JSON schema their docstrings give.
``benchmarks/kbfgs_smw.py`` shares ``kronecker.step_ms`` and once broke, unnoticed, when that
function began to read an option only ``kronecker.py`` defined."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--backends", "torch,jax", "--problems", "mlp", "--repeats", "1", "--warmup", "0",
         "--block", "2"]


def _run(script: str, tmp_path: Path, *extra: str) -> dict:
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    out = tmp_path / "out.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *QUICK, *extra,
                    "--json", str(out)], check=True, cwd=ROOT, capture_output=True, timeout=300)
    return json.loads(out.read_text())


def _assert_rows(rows: dict, methods: set[str], ratios: set[str]) -> None:
    assert set(rows) == methods
    for row in rows.values():
        assert math.isfinite(row["step_ms"]) and row["step_ms"] > 0
        assert ratios <= set(row)
        assert row["ratio_to_sgd"] == pytest.approx(row["step_ms"] / rows["sgd"]["step_ms"])


def test_kronecker_benchmark_writes_its_schema_with_the_handwritten_references(tmp_path):
    data = _run("kronecker.py", tmp_path)
    for backend in ("torch", "jax"):
        rows = data[backend]["mlp"]
        _assert_rows(rows, {"sgd", "adam", "kfac", "shampoo", "tnt", "handwritten_sgd",
                            "handwritten_kfac", "handwritten_shampoo", "handwritten_tnt"},
                     {"ratio_to_sgd", "ratio_to_adam", "ratio_to_handwritten_sgd"})
        for method in ("kfac", "shampoo", "tnt"):
            assert rows[method][f"ratio_to_handwritten_{method}"] == pytest.approx(
                rows[method]["step_ms"] / rows[f"handwritten_{method}"]["step_ms"])


def test_kbfgs_benchmark_writes_its_schema(tmp_path):
    data = _run("kbfgs_smw.py", tmp_path, "--training", "")
    for backend in ("torch", "jax"):
        _assert_rows(data[backend]["mlp"], {"sgd", "kbfgs", "kbfgs_l", "handwritten_sgd"},
                     {"ratio_to_sgd", "ratio_to_handwritten_sgd"})
    assert data["training"] == {}
