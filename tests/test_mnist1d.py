"""MNIST-1D: the data and its splits, the 1-D CNN against brute-force float64 convolutions and
across backends, its taps against torch autograd (the K-FAC statistics), the problems, and a
tiny run of ``secondorder reproduce kronecker-mnist1d``."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from helpers import assert_close, back, to
from secondorder import backends
from secondorder.errors import HyperparameterError, ShapeError
from secondorder.models import Conv1DNet

pytest.importorskip("mnist1d")

HAS_TORCH = importlib.util.find_spec("torch") is not None


# -- data ------------------------------------------------------------------------------------

def test_data_shapes_classes_and_a_disjoint_validation_split():
    import random

    from secondorder.problems import datasets, load_mnist1d

    # generating the data (make_dataset seeds NumPy's and Python's global generators) leaves
    # the caller's global random streams where they were
    datasets._mnist1d_generated.cache_clear()
    np.random.seed(123)
    random.seed(123)
    expected = (np.random.random(), random.random())
    np.random.seed(123)
    random.seed(123)
    data = load_mnist1d(validation=500, seed=0)
    assert (np.random.random(), random.random()) == expected
    assert data.x_train.shape == (3500, 40) and data.y_train.shape == (3500,)
    assert data.x_val.shape == (500, 40) and data.y_val.shape == (500,)
    assert data.x_test.shape == (1000, 40) and data.y_test.shape == (1000,)
    for y in (data.y_train, data.y_val, data.y_test):
        assert y.dtype == np.int64 and set(np.unique(y)) == set(range(10))
    # train + validation is a partition of the generator's 4000 training signals: no signal is
    # in both, none is lost, and the test signals are in neither
    train = {row.tobytes() for row in data.x_train}
    val = {row.tobytes() for row in data.x_val}
    test = {row.tobytes() for row in data.x_test}
    assert len(train) == 3500 and len(val) == 500 and not train & val
    assert not (train | val) & test
    whole = load_mnist1d(validation=0)
    assert whole.x_train.shape == (4000, 40) and whole.x_val.shape == (0, 40)
    assert {row.tobytes() for row in whole.x_train} == train | val
    np.testing.assert_array_equal(whole.x_test, data.x_test)
    # the generator standardises the whole set (train and test) to mean 0 and std 1
    everything = np.concatenate([whole.x_train, whole.x_test])
    assert abs(everything.mean()) < 1e-12 and abs(everything.std() - 1) < 1e-12
    # another seed draws another validation set; a bad size is a named error
    other = load_mnist1d(validation=500, seed=1)
    assert {row.tobytes() for row in other.x_val} != val
    for bad in (-1, 4000, 2.5, True):
        with pytest.raises(HyperparameterError, match="validation"):
            load_mnist1d(validation=bad)


# -- the 1-D CNN -----------------------------------------------------------------------------

def conv1d_loops(x, w, b, stride, padding):
    """Cross-correlation of x (m, C, L) with w (C_out, C, 1, k), by explicit float64 loops."""
    m, c, length = x.shape
    c_out, _, _, k = w.shape
    xp = np.zeros((m, c, length + 2 * padding))
    xp[:, :, padding:padding + length] = x
    lo = (length + 2 * padding - k) // stride + 1
    out = np.zeros((m, c_out, lo))
    for i in range(m):
        for o in range(c_out):
            for t in range(lo):
                total = b[o]
                for ci in range(c):
                    for j in range(k):
                        total += w[o, ci, 0, j] * xp[i, ci, t * stride + j]
                out[i, o, t] = total
    return out


def cnn_loops(model, params, x):
    """The forward pass with the loop convolution: outputs, each conv's pre-activation, and
    each tapped layer's homogeneous input (patches built by loops for the conv layers)."""
    a = x.reshape(x.shape[0], model.in_channels, model.length)
    pre, inputs = [], []
    for p, k, s, pad in zip(params, model.kernels, model.strides, model.padding):
        m, c, length = a.shape
        padded = np.pad(a, ((0, 0), (0, 0), (pad, pad)))
        lo = (length + 2 * pad - k) // s + 1
        patches = np.ones((m, lo, c * k + 1))
        for t in range(lo):
            patches[:, t, :-1] = padded[:, :, t * s:t * s + k].reshape(m, c * k)
        inputs.append(patches)
        z = conv1d_loops(a, p["w"], p["b"], s, pad)
        pre.append(z)
        a = np.maximum(z, 0.0)
    a = a.reshape(a.shape[0], -1)
    dense = params[len(model.channels):]
    for j, p in enumerate(dense):
        inputs.append(np.concatenate([a, np.ones((a.shape[0], 1))], axis=1))
        a = a @ p["w"].T + p["b"]
        if j < len(dense) - 1:
            a = np.maximum(a, 0.0)
    return a, pre, inputs


SMALL = Conv1DNet(length=11, channels=(3, 2), kernels=(3, 2), strides=(2, 1), padding=(1, 0),
                  dense=(4, 3), in_channels=2)


def random_sample(model, m=3, seed=5):
    rng = np.random.default_rng(seed)
    params = model.init(1, "numpy")
    for p in params:
        p["b"] = rng.standard_normal(p["b"].shape)
    shape = (m, model.length) if model.in_channels == 1 else (m, model.in_channels,
                                                               model.length)
    return params, rng.standard_normal(shape)


def test_the_authors_cnn_shapes():
    model = Conv1DNet()
    assert model.conv_lengths == (19, 10, 5) and model.features == 125
    params = model.init(0, "numpy")
    assert [p["w"].shape for p in params] == [(25, 1, 1, 5), (25, 25, 1, 3), (25, 25, 1, 3),
                                              (10, 125)]
    count = (25 * 5 + 25) + 2 * (25 * 25 * 3 + 25) + (125 * 10 + 10)
    assert sum(p["w"].size + p["b"].size for p in params) == count == 5210
    x = np.zeros((2, 40))
    assert model.tap_shapes(x) == [(2, 19, 25), (2, 10, 25), (2, 5, 25), (2, 10)]
    with pytest.raises(ShapeError, match=r"\(m, 40\)"):
        model.apply(params, np.zeros((2, 39)))


@pytest.mark.parametrize("model", [Conv1DNet(), SMALL], ids=["authors", "small"])
def test_cnn_equals_brute_force_convolutions(model):
    params, x = random_sample(model)
    expected, _, _ = cnn_loops(model, params, x)
    assert_close(model.apply(params, x), expected, rtol=1e-13)


def test_cnn_params_and_outputs_agree_across_backends(ad_backend):
    model = Conv1DNet()
    reference = model.init(7, "numpy")
    x = np.random.default_rng(0).standard_normal((4, 40))
    params = model.init(7, ad_backend)
    assert_close(params, reference, rtol=0, backend=ad_backend)  # the same draw, bit for bit
    out = ad_backend.jit(model.apply)(params, ad_backend.asarray(x))
    assert_close(out, model.apply(reference, x), rtol=1e-12, backend=ad_backend)


def test_taps_give_patches_and_gradient_factors():
    """The tapped inputs are the loop patches; one VJP through the taps reproduces the kernel
    gradient (sum over positions of delta a~^T); the K-FAC factors are the KFC formulas on
    these patches and deltas. On NumPy (autograd): that the taps' VJP is the same on every
    backend is the backend protocol's test, and the model's outputs are compared across
    backends below."""
    from secondorder.curvature.kfac import kronecker_factors
    from secondorder.losses import SoftmaxCrossEntropy

    model, loss = SMALL, SoftmaxCrossEntropy()
    params_np, x_np = random_sample(model, m=4)
    y_np = np.array([0, 2, 1, 2])
    _, _, patches = cnn_loops(model, params_np, x_np)
    b = backends.get("numpy")
    params, x, y = to(b, params_np), b.asarray(x_np), b.asarray(y_np)

    def statistics(params, x, y):
        taps = model.zero_taps(x)
        (f, inputs), pullback = b.vjp(lambda t: model.apply(params, x, t), taps)
        deltas = pullback((loss.grad(f, y), [b.xp.zeros_like(a) for a in inputs]))
        grads = b.grad(lambda p: b.xp.sum(loss.per_sample(model.apply(p, x), y)), params)
        factors = kronecker_factors(model, loss, params, (x, y), mode="empirical")
        return inputs, deltas, grads, [(lf.A, lf.G) for lf in factors]

    inputs, deltas, grads, factors = back(b, statistics(params, x, y))
    for got, want in zip(inputs, patches):
        assert_close(got, want, rtol=1e-14)
    for i in range(len(model.layers)):
        d, a = deltas[i], patches[i]
        summed = (np.einsum("mto,mtc->oc", d, a) if d.ndim == 3 else d.T @ a)
        w, bias = grads[i]["w"], grads[i]["b"]
        assert_close(summed[:, :-1], w.reshape(w.shape[0], -1), rtol=1e-12)
        assert_close(summed[:, -1], bias, rtol=1e-12)
    # empirical K-FAC factors: A sums over positions, G averages (KFC)
    m = x_np.shape[0]
    for (fa, fg), d, a in zip(factors, deltas, patches):
        d3 = d if d.ndim == 3 else d[:, None, :]
        a3 = a if a.ndim == 3 else a[:, None, :]
        t = d3.shape[1]
        assert_close(fa, np.einsum("mti,mtj->ij", a3, a3) / m, rtol=1e-12)
        assert_close(fg, np.einsum("mti,mtj->ij", d3, d3) / (m * t), rtol=1e-12)


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_cnn_matches_torch_conv1d():
    """The same weights in torch.nn.functional.conv1d (weights w[:, :, 0, :]) give the same
    outputs: the kernel layout and the flattening order are torch's."""
    import torch

    model = Conv1DNet()
    params, x = random_sample(model, m=3)
    a = torch.as_tensor(x).reshape(3, 1, 40)
    for p, s, pad in zip(params[:3], model.strides, model.padding):
        a = torch.relu(torch.nn.functional.conv1d(a, torch.as_tensor(p["w"][:, :, 0, :]),
                                                  torch.as_tensor(p["b"]), stride=s,
                                                  padding=pad))
    out = torch.nn.functional.linear(torch.flatten(a, 1), torch.as_tensor(params[3]["w"]),
                                     torch.as_tensor(params[3]["b"]))
    assert_close(model.apply(params, x), out.numpy(), rtol=1e-13)


def test_conv1d_kernel_layout_is_checked():
    from secondorder.models.layers import conv1d

    with pytest.raises(ShapeError, match=r"\(C_out, C_in, 1, k\)"):
        conv1d({"w": np.zeros((2, 1, 2, 3)), "b": np.zeros(2)}, np.zeros((1, 1, 5)))


# -- problems --------------------------------------------------------------------------------

def test_problems_are_registered_and_train_on_the_training_split():
    from secondorder.problems import MNIST1DCNN, MNIST1DMLP, PROBLEMS

    cnn, mlp = PROBLEMS["mnist1d-cnn"](), PROBLEMS["mnist1d-mlp"]()
    assert isinstance(cnn, MNIST1DCNN) and isinstance(mlp, MNIST1DMLP)
    assert cnn.x.shape == (3500, 40) and cnn.x_val.shape == (500, 40)
    assert cnn.batch_size == 100 and mlp.model.sizes == (40, 100, 100, 10)
    x, y = cnn.batch(np.random.default_rng(0), "numpy")
    assert x.shape == (100, 40) and y.dtype == np.int64
    assert backends.backend_of(x).name == "numpy"


# -- the reproduction ------------------------------------------------------------------------

def test_time_to_target_counts_epochs_and_seconds():
    from secondorder.bench.kronecker_mnist1d import time_to_target

    runs = [{"test_accuracy": [0.5, 0.8, 0.9], "seconds": [1.0, 2.0, 3.0]},
            {"test_accuracy": [0.85, 0.7, 0.95], "seconds": [1.5, 3.0, 4.5]},
            {"test_accuracy": [0.1, 0.2, 0.3], "seconds": [1.0, 2.0, 3.0]}]
    out = time_to_target(runs, 0.8)
    assert (out["reached"], out["runs"]) == (2, 3)
    assert out["epochs"]["min"] == 1 and out["epochs"]["max"] == 2
    assert out["epochs"]["median"] == 1.5 and out["seconds"]["median"] == 1.75
    assert out["seconds"]["std"] == pytest.approx(0.25)


def test_tiny_reproduction_writes_the_documented_json(tmp_path, monkeypatch, capsys):
    """One epoch, one seed, one grid point, 200 signals: the JSON has the documented keys, an
    unregistered method is reported as not available, and the SGD run is the one the pure API
    gives with the same seed, batch order and data (replayed by hand on NumPy)."""
    import json

    from secondorder.cli import main
    from secondorder.optim import SGD, registry
    from secondorder.problems import MNIST1DMLP

    monkeypatch.delitem(registry.METHODS, "tnt", raising=False)
    out = tmp_path / "study.json"
    argv = ["reproduce", "kronecker-mnist1d", "--epochs", "1", "--seeds", "1", "--grid-size",
            "1", "--subset", "200", "--backend", "numpy", "--dtype", "float64", "--models",
            "mlp", "--methods", "sgd,tnt", "--json", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "TNT (tnt): not available" in printed.err and "not available" in printed.out
    result = json.loads(out.read_text())
    assert set(result) == {"experiment", "protocol", "not_available", "target", "results"}
    assert result["experiment"] == "kronecker-mnist1d" and result["not_available"] == ["tnt"]
    proto = result["protocol"]
    assert proto["epochs"] == 1 and proto["seeds"] == [0] and proto["grid_size"] == 1
    assert proto["grids"]["sgd"] == [{"lr": 0.1, "momentum": 0.9}]
    entry = result["results"]["mlp"]["sgd"]
    assert set(entry) >= {"name", "hyperparameters", "fixed", "dropped", "tuning", "runs",
                          "final_test_accuracy", "seconds_per_epoch", "to_target"}
    run = entry["runs"][0]
    assert set(run) >= {"seed", "train_loss", "test_accuracy", "test_loss", "seconds",
                        "batch_loss", "non_finite_steps"}
    assert all(len(run[k]) == 1 for k in ("train_loss", "test_accuracy", "seconds"))
    assert result["target"]["mlp"] == run["test_accuracy"][-1]
    assert entry["to_target"]["reached"] == 1 and entry["to_target"]["epochs"]["median"] == 1

    # the same run by hand: training split + validation split (refit), first 200 of each
    problem = MNIST1DMLP()
    x = np.concatenate([problem.x[:200], problem.x_val[:200]])
    y = np.concatenate([problem.y[:200], problem.y_val[:200]])
    params = problem.model.init(0, "numpy")
    opt = SGD(problem.model, problem.loss, lr=0.1, momentum=0.9)
    state = opt.init(params)
    order = np.random.default_rng(0).permutation(len(y))
    for idx in np.split(order, 4):
        params, state, _ = opt.step(params, state, (x[idx], y[idx]))
    f = np.asarray(problem.model.apply(params, problem.x_test[:200]))
    assert run["test_accuracy"][0] == pytest.approx(np.mean(f.argmax(1) == problem.y_test[:200]),
                                                    abs=1e-12)


def test_cosine_schedule_decays_every_methods_rate_over_the_run():
    """--schedule cosine: the SGD run is SGD whose rate at step t of the run's T = 4 steps is
    0.1 (1 + cos(pi t / T)) / 2, replayed by hand with that rate computed here."""
    import math

    from secondorder.bench.kronecker_mnist1d import reproduce
    from secondorder.problems import MNIST1DMLP

    result = reproduce(models=["mlp"], methods=["sgd"], epochs=1, seeds=1, grid_size=1,
                       backend="numpy", dtype="float64", subset=200, schedule="cosine")
    assert result["protocol"]["schedule"] == "cosine"
    run = result["results"]["mlp"]["sgd"]["runs"][0]
    problem = MNIST1DMLP()
    x = np.concatenate([problem.x[:200], problem.x_val[:200]])
    y = np.concatenate([problem.y[:200], problem.y_val[:200]])
    from secondorder import tree

    params = problem.model.init(0, "numpy")
    treedef = tree.structure(params)
    w = [np.asarray(a) for a in tree.leaves(params)]
    velocity = [np.zeros_like(a) for a in w]
    order = np.random.default_rng(0).permutation(len(y))
    numpy = backends.get("numpy")
    for t, idx in enumerate(np.split(order, 4)):
        g = tree.leaves(numpy.grad(
            lambda p, i=idx: problem.loss.value(problem.model.apply(p, x[i]), y[i]),
            tree.unflatten(treedef, w)))
        lr = 0.1 * (1 + math.cos(math.pi * t / 4)) / 2
        velocity = [0.9 * v + np.asarray(gi) for v, gi in zip(velocity, g)]
        w = [a - lr * v for a, v in zip(w, velocity)]
    f = np.asarray(problem.model.apply(tree.unflatten(treedef, w), problem.x_test[:200]))
    assert run["test_loss"][0] == pytest.approx(
        float(problem.loss.value(f, problem.y_test[:200])), rel=1e-12)


@pytest.mark.parametrize("argv", [
    ["--schedule", "linear"], ["--epochs", "0"], ["--seeds", "-1"], ["--grid-size", "zero"],
    ["--validation", "4000"],
    ["--subset", "0"], ["--backend", "tensorflow"], ["--methods", "lbfgs"], ["--models", "rnn"],
    ["--dtype", "float16"], ["--plot", "/no/such/folder/a.png"],
])
def test_reproduction_usage_errors(argv, capsys):
    from secondorder.cli import main

    assert main(["reproduce", "kronecker-mnist1d", *argv]) == 2
    err = capsys.readouterr().err
    assert "error: argument" in err and "Traceback" not in err
