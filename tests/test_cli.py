"""The command line: ``secondorder list`` and ``secondorder check`` end to end."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np

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
