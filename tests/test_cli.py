"""The command line: ``secondorder list`` and ``secondorder check`` end to end."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from secondorder import backends
from secondorder.cli import main

SMALL = ["--repeats", "1", "--n-a", "4", "--n-g", "5"]


def test_list_names_every_backend(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in backends.names():
        assert name in out


def test_check_agrees_across_backends(tmp_path, capsys):
    path = tmp_path / "check.json"
    assert main(["check", "--json", str(path), *SMALL]) == 0
    data = json.loads(path.read_text())
    installed = {i.name for i in backends.available() if i.installed and i.usable}
    assert {r["backend"] for r in data["results"]} == installed
    for r in data["results"]:
        assert r["ok"] and r["deviation"] <= data["tolerance"]
        assert set(r) >= {"backend", "device", "task", "deviation", "time_ms", "iterations"}
    assert "deviation" in capsys.readouterr().out


def test_check_catches_a_wrong_backend_result(monkeypatch, tmp_path):
    numpy_backend = backends.get("numpy")
    real = numpy_backend.to_numpy
    monkeypatch.setattr(numpy_backend, "to_numpy", lambda x: real(x) * (1 + 1e-6))
    path = tmp_path / "check.json"
    assert main(["check", "--backends", "numpy", "--json", str(path), *SMALL]) == 1
    results = json.loads(path.read_text())["results"]
    assert all(not r["ok"] and abs(r["deviation"] - 1e-6) < 1e-9 for r in results)


def test_check_reports_a_missing_backend(tmp_path):
    missing = [n for n in backends.names() if importlib.util.find_spec(
        "autograd" if n == "numpy" else n) is None]
    if not missing:
        missing = ["cupy"]  # present but maybe without a GPU: still must not crash
    path = tmp_path / "check.json"
    rc = main(["check", "--backends", missing[0], "--json", str(path), *SMALL])
    results = json.loads(path.read_text())["results"]
    assert rc in (0, 1)
    if rc == 1:
        assert results[0]["error"] and not results[0]["ok"]


def test_unknown_backend_is_a_usage_error():
    assert main(["check", "--backends", "tensorflow"]) == 2


def test_python_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "secondorder", "check", "--backends", "numpy",
                          *SMALL], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "numpy" in out.stdout and "agree" in out.stdout
    assert np.isfinite(float(out.stdout.split("kron-solve")[1].split()[0]))


COMPARE = ["compare", "--problem", "teacher-student", "--steps", "4", "--quiet"]


def test_compare_runs_end_to_end(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "runs.json", tmp_path / "loss.png"
    assert main([*COMPARE, "--json", str(out), "--plot", str(png)]) == 0
    runs = json.loads(out.read_text())["runs"]
    installed = {i.name for i in backends.available() if i.installed and i.autodiff}
    assert {r["backend"] for r in runs} == installed
    from secondorder.optim.registry import DEFAULT_METHODS

    assert {r["method"] for r in runs} == set(DEFAULT_METHODS) >= {"sgd", "adam", "curveball"}
    for r in runs:
        assert set(r) >= {"method", "backend", "dtype", "final_loss", "step_ms", "step_vs_sgd",
                          "max_rel_deviation"}
        assert r["ok"] and r["max_rel_deviation"] <= 1e-8 and np.isfinite(r["final_loss"])
    assert png.stat().st_size > 10_000


def test_compare_reports_a_missing_backend(tmp_path, capsys):
    missing = [n for n in backends.names() if importlib.util.find_spec(n) is None]
    if not missing:
        pytest.skip("every backend is installed here")
    out = tmp_path / "runs.json"
    rc = main([*COMPARE, "--backends", f"numpy,{missing[0]}", "--method", "sgd",
               "--json", str(out), "--plot", str(tmp_path / "p.png")])
    runs = {r["backend"]: r for r in json.loads(out.read_text())["runs"]}
    assert rc == 0 and runs[missing[0]]["status"].startswith("skipped")
    assert missing[0] in capsys.readouterr().out


def test_compare_catches_a_deviating_backend(monkeypatch, tmp_path):
    pytest.importorskip("torch")
    torch_backend = backends.get("torch")
    real = torch_backend.to_numpy
    monkeypatch.setattr(torch_backend, "to_numpy", lambda x: real(x) * (1 + 1e-6))
    out = tmp_path / "runs.json"
    rc = main([*COMPARE, "--backends", "numpy,torch", "--method", "sgd", "--json", str(out),
               "--plot", str(tmp_path / "p.png")])
    runs = {r["backend"]: r for r in json.loads(out.read_text())["runs"]}
    assert rc == 1
    assert runs["numpy"]["ok"] and not runs["torch"]["ok"]
    assert abs(runs["torch"]["max_rel_deviation"] - 1e-6) < 1e-8


def test_list_shows_methods_and_problems(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "curveball" in out and "digits-mlp" in out and "rosenbrock" in out
