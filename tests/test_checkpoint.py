"""secondorder.checkpoint: the file format, exact round trips, conversion between backends, and
the named errors for missing, damaged and foreign files. (Every registered method's state is
also saved, loaded and continued in tests/test_contract.py.)"""

from __future__ import annotations

import json
import sys
import zipfile
from collections import OrderedDict
from typing import Any, NamedTuple

import numpy as np
import pytest

from secondorder import backends, checkpoint, random, tree
from secondorder.errors import (
    BackendNotFoundError,
    CheckpointError,
    CheckpointNotFoundError,
    DeviceMismatchError,
    StateError,
)
from secondorder.losses import SoftmaxCrossEntropy
from secondorder.models import MLP
from secondorder.optim import SGD, Adam, HessianFree
from secondorder.optim.transforms import ChainState, EmptyState, TraceState

pytest.importorskip("autograd")


class Outer(NamedTuple):
    count: Any
    inner: Any


def _tricky(backend) -> Any:
    """A tree with everything a state can hold: float32 and float64, an int32 count, a random
    key, empty NamedTuples, nested NamedTuples, a dict in a user's (unsorted) key order, an
    OrderedDict, None, a list, a Python float and int."""
    xp = backend.xp
    rng = np.random.default_rng(3)
    return Outer(
        xp.asarray(7, dtype=xp.int32),
        ChainState((
            TraceState({"z": backend.asarray(rng.standard_normal((2, 3))),
                        "a": backend.asarray(rng.standard_normal(4).astype(np.float32))}),
            EmptyState(),
            OrderedDict([("b", backend.asarray(np.array([-0.0, np.inf, np.nan]))),
                         ("a", None)]),
            [random.key(42, backend), 0.25, 3],
        )),
    )


def _leaf_bits(backend, t: Any) -> list[Any]:
    out = []
    for leaf in tree.leaves(t):
        if hasattr(leaf, "shape"):
            host = np.ascontiguousarray(backend.to_numpy(leaf))
            out.append((type(leaf), host.dtype.str, host.shape, host.reshape(-1).view(np.uint8)
                        .tobytes()))
        else:
            out.append((type(leaf), leaf))
    return out


def _assert_same(backend, a: Any, b: Any) -> None:
    assert repr(tree.structure(a)) == repr(tree.structure(b))
    assert tree.structure(a) == tree.structure(b)
    assert _leaf_bits(backend, a) == _leaf_bits(backend, b)


def _dict_orders(t: Any) -> list[Any]:
    """The key order and class of every dict in t, depth first."""
    if isinstance(t, dict):
        return [(type(t), list(t))] + [o for v in t.values() for o in _dict_orders(v)]
    if isinstance(t, tuple | list):
        return [o for v in t for o in _dict_orders(v)]
    return []


def test_round_trip_is_bit_identical(ad_backend, tmp_path):
    state = _tricky(ad_backend)
    params = {"w2": ad_backend.asarray(np.ones((2, 2))), "w1": ad_backend.asarray(np.zeros(3))}
    path = tmp_path / "s.ckpt"
    checkpoint.save(path, state, params, epoch=3, note="x", lrs=[0.1, 0.01])
    loaded = checkpoint.load(path)
    _assert_same(ad_backend, loaded.state, state)
    _assert_same(ad_backend, loaded.params, params)
    assert _dict_orders(loaded.state) == _dict_orders(state)
    assert list(loaded.params) == ["w2", "w1"]
    assert loaded.metadata == {"epoch": 3, "note": "x", "lrs": [0.1, 0.01]}
    head = checkpoint.describe(path)
    assert head["backend"] == ad_backend.name and head["state_type"].endswith(":Outer")


def test_numpy_scalars_stay_numpy_scalars(tmp_path):
    state = {"damping": np.float64(0.1) * 3, "count": np.int32(4), "m": np.zeros(2)}
    checkpoint.save(tmp_path / "s", state)
    loaded = checkpoint.load(tmp_path / "s").state
    assert type(loaded["damping"]) is np.float64 and loaded["damping"] == state["damping"]
    assert type(loaded["count"]) is np.int32 and type(loaded["m"]) is np.ndarray


def test_the_file_is_a_zip_of_json_and_npy(tmp_path):
    path = tmp_path / "s.ckpt"
    checkpoint.save(path, {"a": np.arange(3.0)}, step=1)
    with zipfile.ZipFile(path) as z:
        assert sorted(z.namelist()) == ["arrays/0.npy", "checkpoint.json"]
        header = json.loads(z.read("checkpoint.json"))
        with z.open("arrays/0.npy") as f:
            np.testing.assert_array_equal(np.lib.format.read_array(f, allow_pickle=False),
                                          np.arange(3.0))
    assert header["format"] == "secondorder.checkpoint" and header["metadata"] == {"step": 1}
    assert header["leaves"] == [{"kind": "array", "dtype": "<f8", "shape": [3]}]


def _model_and_batches():
    rng = np.random.default_rng(0)
    model = MLP([3, 4, 3], "tanh")
    batches = [(rng.standard_normal((8, 3)), rng.integers(0, 3, 8)) for _ in range(4)]
    return model, batches


def test_a_method_state_continues_exactly_and_keeps_its_key(tmp_path):
    """Hessian-free with the Fisher: the state holds a random key that is split every step."""
    model, batches = _model_and_batches()
    opt = HessianFree(model, SoftmaxCrossEntropy(), curvature="fisher", cg_iters=3)
    params = model.init(0, "numpy")
    state = opt.init(params)
    for batch in batches[:2]:
        params, state, _ = opt.step(params, state, batch)
    checkpoint.save(tmp_path / "hf", state, params)
    restored = checkpoint.load(tmp_path / "hf", like=opt)
    np.testing.assert_array_equal(restored.state.key, state.key)
    runs = []
    for p, s in ((params, state), (restored.params, restored.state)):
        for batch in batches[2:]:
            p, s, _ = opt.step(p, s, batch)
        runs.append(tree.ravel(p)[0])
    np.testing.assert_array_equal(runs[0], runs[1])


def test_convert_is_an_exact_copy_between_backends():
    pytest.importorskip("torch")
    jax = pytest.importorskip("jax")
    del jax
    numpy_backend = backends.get("numpy")
    state = _tricky(numpy_backend)
    on_torch = checkpoint.convert(state, "torch")
    on_jax = checkpoint.convert(on_torch, backends.get("jax"))
    back_home = checkpoint.convert(on_jax, "numpy")
    assert all(backends.get("torch").is_array(a) for a in tree.leaves(on_torch)
               if hasattr(a, "shape"))
    assert all(backends.get("jax").is_array(a) for a in tree.leaves(on_jax)
               if hasattr(a, "shape"))
    assert _leaf_bits(numpy_backend, back_home) == _leaf_bits(numpy_backend, state)
    assert _dict_orders(back_home) == _dict_orders(state)
    # a copy, not a view: changing the copy leaves the original alone
    copy = checkpoint.convert(state, "numpy")
    copy.inner.states[0].trace["z"][0, 0] = 123.0
    assert state.inner.states[0].trace["z"][0, 0] != 123.0


def test_load_onto_another_backend_and_like_arrays(tmp_path):
    torch = pytest.importorskip("torch")
    state = _tricky(backends.get("numpy"))
    checkpoint.save(tmp_path / "s", state)
    for how in ({"backend": "torch"}, {"like": "torch"}, {"like": torch.zeros(1)}):
        loaded = checkpoint.load(tmp_path / "s", **how).state
        assert isinstance(loaded.count, torch.Tensor) and loaded.count.dtype == torch.int32
        assert _leaf_bits(backends.get("numpy"), checkpoint.convert(loaded, "numpy")) == \
            _leaf_bits(backends.get("numpy"), state)


def test_another_methods_checkpoint_is_refused_naming_both(tmp_path):
    model, batches = _model_and_batches()
    params = model.init(0, "numpy")
    adam = Adam(model, SoftmaxCrossEntropy())
    checkpoint.save(tmp_path / "adam", adam.init(params), params)
    with pytest.raises(StateError, match=r"Adam state .*SGD"):
        checkpoint.load(tmp_path / "adam", like=SGD(model, SoftmaxCrossEntropy()))
    # the same method with other settings makes states of another structure
    with pytest.raises(StateError, match="settings"):
        checkpoint.load(tmp_path / "adam", like=Adam(model, SoftmaxCrossEntropy(),
                                                     weight_decay=0.1))
    checkpoint.save(tmp_path / "tree", {"m": np.zeros(2)})
    with pytest.raises(StateError, match="dict.*Adam"):
        checkpoint.load(tmp_path / "tree", like=adam)


def test_missing_and_damaged_files_raise_named_errors(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint"):
        checkpoint.load(tmp_path / "nothing.ckpt")
    with pytest.raises(FileNotFoundError):  # also the built-in error
        checkpoint.load(tmp_path / "nothing.ckpt")
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        checkpoint.save(tmp_path / "no" / "dir" / "s.ckpt", {"a": np.zeros(1)})
    with pytest.raises(CheckpointError, match="directory"):
        checkpoint.load(tmp_path)

    path = tmp_path / "s.ckpt"
    checkpoint.save(path, {"a": np.arange(1000.0)})
    data = path.read_bytes()
    (tmp_path / "truncated").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a ZIP"):
        checkpoint.load(tmp_path / "truncated")
    flipped = bytearray(data)
    start = data.index(b"\x93NUMPY") + 200  # inside the array's bytes
    flipped[start] ^= 0xFF
    (tmp_path / "flipped").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="cannot be read"):
        checkpoint.load(tmp_path / "flipped")
    np.savez(tmp_path / "plain.npz", a=np.zeros(2))
    with pytest.raises(CheckpointError, match="no checkpoint.json"):
        checkpoint.load(tmp_path / "plain.npz")
    (tmp_path / "text").write_text("hello")
    with pytest.raises(CheckpointError):
        checkpoint.load(tmp_path / "text")


def _rewrite_header(src, dst, change) -> None:
    with zipfile.ZipFile(src) as z:
        members = {n: z.read(n) for n in z.namelist()}
    header = json.loads(members["checkpoint.json"])
    change(header)
    members["checkpoint.json"] = json.dumps(header).encode()
    with zipfile.ZipFile(dst, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)


def test_headers_that_do_not_fit_are_refused(tmp_path):
    path = tmp_path / "s.ckpt"
    checkpoint.save(path, TraceState(np.zeros(3)))

    def other_version(h):
        h["version"] = 99

    def wrong_shape(h):
        h["leaves"][0]["shape"] = [4]

    def foreign_class(h):
        h["state"]["class"] = "not_imported_module_xyz:Evil"

    def unknown_backend(h):
        h["backend"] = "tensorflow"

    cases = [(other_version, CheckpointError, "version 99"),
             (wrong_shape, CheckpointError, "description says"),
             (foreign_class, CheckpointError, "not imported")]
    for change, error, message in cases:
        _rewrite_header(path, tmp_path / "bad", change)
        with pytest.raises(error, match=message):
            checkpoint.load(tmp_path / "bad")
    assert "not_imported_module_xyz" not in sys.modules  # nothing was imported
    _rewrite_header(path, tmp_path / "bad", unknown_backend)
    with pytest.raises(BackendNotFoundError, match="tensorflow"):
        checkpoint.load(tmp_path / "bad")
    with pytest.raises(BackendNotFoundError, match="unknown backend"):
        checkpoint.load(path, backend="tensorflow")
    with pytest.raises(BackendNotFoundError):
        checkpoint.convert({"a": np.zeros(1)}, "mxnet")


def test_what_cannot_be_stored_is_refused_with_a_reason(tmp_path):
    with pytest.raises(CheckpointError, match="metadata must be JSON"):
        checkpoint.save(tmp_path / "s", {"a": np.zeros(1)}, loss=np.zeros(3))
    with pytest.raises(CheckpointError, match="neither an array"):
        checkpoint.save(tmp_path / "s", {"a": object()})
    with pytest.raises(CheckpointError, match="without pickling"):
        checkpoint.save(tmp_path / "s", {"a": np.array([object()])})
    with pytest.raises(DeviceMismatchError, match="host memory"):
        checkpoint.convert({"a": np.zeros(1)}, "numpy", device="cuda:0")
    assert not any(p.name.startswith(".checkpoint-") for p in tmp_path.iterdir())


def test_the_readme_checkpointing_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    import contextlib
    import io
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Checkpointing", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "README.md", "exec"), {})
    assert out.getvalue().split() == ["1", "CurveBallState"]
    assert (tmp_path / "run.ckpt").is_file()
