"""The command line: ``secondorder list`` and ``secondorder check`` end to end."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from secondorder import backends
from secondorder.cli import build_parser, main

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


@pytest.mark.slow
def test_check_ranks_2_gives_every_method_the_one_process_step(tmp_path, capsys):
    """Issue 16's command: every registered method on 2 gloo ranks, 10 steps, against one
    process on the whole batches (float64), to 1e-12 here (the command's own bound is 1e-10);
    a NaN in one rank's shard makes every rank skip that step, as one process does."""
    pytest.importorskip("torch")
    from secondorder.optim.registry import METHODS

    path = tmp_path / "ranks.json"
    assert main(["check", "--ranks", "2", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert sorted(r["method"] for r in report["results"]) == sorted(METHODS)
    for r in report["results"]:  # batch 4's NaN, on rank 1 only, rejected by every rank
        assert r["agree"] and r["finite"] == [t != 3 for t in range(10)], r
        assert r["deviation"] <= 1e-12, r
        assert r["calls"]["all_reduce"] >= 1 and r["bytes"]["all_reduce"] >= 38 * 8, r
    assert "all-reduce" in capsys.readouterr().out


def test_check_ranks_fails_on_a_deviation(monkeypatch, capsys):
    pytest.importorskip("torch")
    from secondorder.distributed import equivalence

    bad = equivalence.Row("sgd", 2, 3e-9, [True], True, {"all_reduce": 1.0}, {})
    monkeypatch.setattr(equivalence, "compare", lambda *a, **k: [bad])
    assert main(["check", "--ranks", "2", "--methods", "sgd"]) == 1
    assert "deviate from one process" in capsys.readouterr().err
    assert main(["check", "--ranks", "3"]) == 2  # 3 does not divide the batch of 16
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real(name, *a))
    assert main(["check", "--ranks", "2"]) == 2
    assert "pip install -r backends/torch.txt" in capsys.readouterr().err


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


# -- help text -------------------------------------------------------------------------------

def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_every_option_of_every_command_has_help_and_its_default():
    parser = build_parser()
    commands = _subparsers(parser)
    assert set(commands) >= {"list", "compare", "check", "reproduce"}
    for name, command in [("", parser), *commands.items()]:
        formatter = command._get_formatter()
        for action in command._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            text = formatter._expand_help(action)  # the help as --help renders it
            assert text.strip(), (name, action.dest)
            if action.option_strings and not isinstance(action, argparse._VersionAction):
                assert "default" in text, (name, action.option_strings, text)
                if action.default not in (None, False):
                    assert str(action.default) in text, (name, action.option_strings, text)


def test_help_renders_plain_text(capsys):
    for argv in (["--help"], *([c, "--help"] for c in _subparsers(build_parser()))):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "usage: secondorder" in out
        for markup in ("``", ":mod:", ":class:", ":func:", "%(", "None)"):
            assert markup not in out, (argv, markup)
    assert main(["compare", "--help"]) == 0
    out = capsys.readouterr().out
    for option, default in (("--problem", "digits-mlp"), ("--steps", "100"), ("--seed", "0"),
                            ("--dtype", "float64"), ("--batch-size", "64")):
        assert option in out and default in out


@pytest.mark.parametrize("argv", [
    ["compare", "--steps", "0"],
    ["compare", "--steps", "-5"],
    ["compare", "--steps", "ten"],
    ["compare", "--batch-size", "0"],
    ["compare", "--device", "quantum"],
    ["compare", "--problem", "mnist"],
    ["compare", "--method", "lbfgs"],
    ["compare", "--backends", "numpy,tensorflow"],
    ["compare", "--json", "/no/such/folder/runs.json"],
    ["compare", "--plot", "/no/such/folder/plot.png"],
    ["check", "--repeats", "0"],
    ["check", "--n-a", "-1"],
    ["reproduce", "curveball-table1", "--runs", "0"],
    ["reproduce", "curveball-table1", "--tune-runs", "-2"],
    ["reproduce", "curveball-table1", "--methods", "Nesterov"],
])
def test_bad_input_is_a_usage_error(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"secondorder {argv[0]}: error: argument")


def test_output_path_that_is_a_folder_is_a_usage_error(tmp_path, capsys):
    assert main(["check", "--json", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["check", "--json", str(tmp_path / "fine.json"), "--repeats", "0"]) == 2
    assert not (tmp_path / "fine.json").exists()  # the writability probe leaves nothing behind


def test_bad_input_exits_without_a_traceback():
    out = subprocess.run([sys.executable, "-m", "secondorder", "compare", "--steps", "-1"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "must be at least 1" in out.stderr and "Traceback" not in out.stderr


# -- compare: what it reports ----------------------------------------------------------------

def _replay(problem_name: str, method: str, steps: int, seed: int = 0):
    """The run compare makes, written out with the pure init/step API on NumPy: the problem's
    initial weights from ``seed`` and ``steps`` batches drawn from default_rng(seed)."""
    from secondorder.optim.registry import METHODS
    from secondorder.problems import PROBLEMS

    problem = PROBLEMS[problem_name]()
    rng = np.random.default_rng(seed)
    batches = [problem._numpy_batch(rng) for _ in range(steps)]
    numpy_backend = backends.get("numpy")
    params = problem.init(seed, numpy_backend)
    opt = METHODS[method](problem.apply, problem.loss)
    state = opt.init(params)
    for x, y in batches:
        params, state, _ = opt.step(params, state, (np.asarray(x, dtype=np.float64), y))
    return problem, params, batches[-1]


def _by_hand(problem_name: str, f: np.ndarray, y: np.ndarray) -> tuple[float, float | None]:
    """The mean loss over the samples, and the accuracy for labels, in plain NumPy."""
    f = np.asarray(f, dtype=np.float64)
    if problem_name == "digits-mlp":  # softmax cross-entropy on integer labels
        top = f.max(axis=1, keepdims=True)
        logsumexp = top[:, 0] + np.log(np.exp(f - top).sum(axis=1))
        per_sample = logsumexp - f[np.arange(len(y)), y]
        return float(per_sample.mean()), float((f.argmax(axis=1) == y).mean())
    return float((0.5 * ((f - y) ** 2).sum(axis=1)).mean()), None  # teacher-student: MSE


@pytest.mark.parametrize("problem_name", ["digits-mlp", "teacher-student"])
def test_compare_reports_the_loss_on_the_whole_training_set(problem_name, tmp_path):
    if problem_name == "digits-mlp":
        pytest.importorskip("sklearn")
    out = tmp_path / "runs.json"
    assert main(["compare", "--problem", problem_name, "--steps", "3", "--backends", "numpy",
                 "--method", "sgd", "--quiet", "--no-plot", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    (run,) = data["runs"]
    problem, params, (x_last, y_last) = _replay(problem_name, "sgd", 3)
    assert data["train_size"] == problem.x.shape[0]
    loss, accuracy = _by_hand(problem_name, problem.apply(params, problem.x), problem.y)
    assert run["final_loss_on"] == "training set"
    assert abs(run["final_loss"] - loss) <= 1e-12 * loss
    if accuracy is None:
        assert run["final_accuracy"] is None
    else:
        assert run["final_accuracy"] == accuracy and 0.0 < accuracy < 1.0
    # ... which is not the loss of the last mini-batch, still reported under its own name (the
    # step reports the loss at the parameters it started from: those after two steps)
    last = _by_hand(problem_name, problem.apply(_replay(problem_name, "sgd", 2)[1], x_last),
                    y_last)[0]
    assert abs(run["final_batch_loss"] - last) <= 1e-12 * last
    assert abs(run["final_loss"] - run["final_batch_loss"]) > 1e-6


def test_evaluation_in_chunks_equals_one_pass():
    from secondorder.bench.compare import evaluate

    problem, params, _ = _replay("teacher-student", "sgd", 2)
    numpy_backend = backends.get("numpy")
    whole = evaluate(problem, numpy_backend, params, chunk=10**6)
    chunked = evaluate(problem, numpy_backend, params, chunk=100)  # 1024 = 10 x 100 + 24
    assert abs(whole[0] - chunked[0]) <= 1e-13 * whole[0]
    assert whole[1] is chunked[1] is None and whole[2] == "training set"


def test_compare_reports_the_objective_where_there_is_no_data_set(tmp_path):
    out = tmp_path / "runs.json"
    assert main(["compare", "--problem", "rosenbrock", "--steps", "2", "--backends", "numpy",
                 "--method", "sgd", "--quiet", "--no-plot", "--json", str(out)]) == 0
    (run,) = json.loads(out.read_text())["runs"]
    _, (u, v), _ = _replay("rosenbrock", "sgd", 2)
    exact = float((1 - u) ** 2 + 100 * (v - u * u) ** 2)
    assert run["final_loss_on"] == "objective" and run["final_accuracy"] is None
    assert abs(run["final_loss"] - exact) <= 1e-12 * exact


def test_compile_time_is_reported_for_jax_only(tmp_path, capsys):
    pytest.importorskip("jax")
    names = ["numpy", "jax"] + (["torch"] if importlib.util.find_spec("torch") else [])
    out = tmp_path / "runs.json"
    assert main(["compare", "--problem", "teacher-student", "--steps", "3", "--backends",
                 ",".join(names), "--method", "sgd", "--quiet", "--no-plot",
                 "--json", str(out)]) == 0
    runs = {r["backend"]: r for r in json.loads(out.read_text())["runs"]}
    assert set(runs) == set(names)
    assert runs["jax"]["compile_ms"] > 0 and runs["jax"]["step_ms"] > 0
    for eager in set(names) - {"jax"}:
        assert "compile_ms" in runs[eager] and runs[eager]["compile_ms"] is None
    assert "compile ms" in capsys.readouterr().out


def test_plot_is_one_line_per_method_and_marks_a_deviating_backend(tmp_path):
    pytest.importorskip("matplotlib")
    from secondorder.bench.compare import Run, plot

    curve = [1.0, 0.5, 0.25]
    runs = [Run("sgd", b, "float64", final_loss=0.3, step_ms=ms, losses=list(curve),
                wall=[0.0, 1.0, 2.0], compile_ms=500.0 if b == "jax" else None)
            for b, ms in (("numpy", 1.0), ("torch", 2.0), ("jax", 0.1))]
    runs += [Run("adam", "numpy", "float64", final_loss=0.2, step_ms=1.5, losses=[1.0, 0.4, 0.2]),
             Run("adam", "torch", "float64", final_loss=0.2, step_ms=2.5,
                 losses=[1.0, 0.4, 0.2 * (1 + 1e-12)]),
             Run("adam", "jax", "float64", final_loss=0.2, step_ms=0.2,
                 losses=[1.0, 0.4, 0.21])]  # off by 5 %
    path = tmp_path / "plot.png"
    texts = plot(runs, str(path), "test")
    title, labels = texts["title"], texts["legend"]
    assert path.stat().st_size > 10_000
    lines = [t for t in labels if "final loss" not in t]
    assert lines[:2] == ["sgd", "adam"] and len(lines) == 3
    assert lines[2].startswith("adam / jax: DEVIATES")
    assert "coincide" in title and "jax" not in title.split("coincide")[0]


def test_compare_without_matplotlib_skips_the_plot(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises
    png = tmp_path / "p.png"
    assert main(["compare", "--problem", "teacher-student", "--steps", "2", "--backends",
                 "numpy", "--method", "sgd", "--quiet", "--plot", str(png)]) == 0
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not png.exists()
