"""The backend protocol: detection, explicit choice, errors, autodiff and linear-algebra helpers.

Derivatives are checked against closed forms for y = tanh(W x + b) (each backend's result is held
to the NumPy float64 formula at 1e-12, so backends agree with one another to the same tolerance).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

import secondorder
from helpers import assert_close, back, spd, to
from secondorder import backends, tree
from secondorder.errors import (
    AutodiffUnavailableError,
    BackendNotFoundError,
    DeviceMismatchError,
    DTypeError,
    MixedBackendError,
    NotPositiveDefiniteError,
)


def test_backend_found_from_array_type(backend):
    x = backend.asarray(np.ones(3))
    assert backends.backend_of(x) is backend
    assert backends.backend_of({"a": x, "b": (x, 2.0)}) is backend
    assert secondorder.namespace(x) is backend.xp


def test_detection_imports_no_framework():
    code = (
        "import sys, numpy, secondorder; "
        "b = secondorder.backend_of(numpy.ones(3)); "
        "print(b.name, any(m in sys.modules for m in ('torch', 'jax', 'cupy')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["numpy", "False"]


@pytest.mark.parametrize("other", ["torch", "jax", "array_api_strict"])
def test_mixed_frameworks_raise(other):
    if importlib.util.find_spec(other) is None:
        pytest.skip(f"{other} is not installed")
    y = backends.get(other).asarray(np.ones(3))
    with pytest.raises(MixedBackendError, match="different frameworks"):
        backends.backend_of(np.ones(3), y)
    with pytest.raises(MixedBackendError):
        tree.vdot({"a": np.ones(3)}, {"a": y})


def test_mixed_devices_raise():
    xps = pytest.importorskip("array_api_strict")
    a = xps.asarray([1.0, 2.0])
    b = xps.asarray([1.0, 2.0], device=xps.Device("device1"))
    with pytest.raises(DeviceMismatchError, match="different devices"):
        backends.backend_of(a, b)


def test_use_and_context_manager():
    before = backends.current().name
    with secondorder.use("array_api_strict" if "array_api_strict" in _installed() else "numpy"):
        inside = backends.current().name
    assert backends.current().name == before
    assert inside in ("array_api_strict", "numpy")
    secondorder.use("numpy")
    assert backends.current().name == "numpy"
    with pytest.raises(BackendNotFoundError, match="choose one of"):
        secondorder.use("tensorflow")


def _installed() -> set[str]:
    return {info.name for info in backends.available(probe=False) if info.installed}


def test_available_lists_every_backend():
    infos = {info.name: info for info in backends.available()}
    assert set(infos) == set(backends.names())
    assert infos["numpy"].installed and infos["numpy"].float64
    assert infos["numpy"].autodiff == (importlib.util.find_spec("autograd") is not None)
    for name, info in infos.items():
        if info.installed and info.usable:
            assert info.autodiff == backends.get(name).has_autodiff
        if not info.installed:
            assert "pip install" in info.note


def test_unsupported_dtype_raises(backend):
    with pytest.raises(DTypeError, match="float32 or float64"):
        backend.dtype("float16")


# ----------------------------------------------------------------- autodiff vs closed forms
def _problem(rng):
    x = rng.standard_normal(4)
    params = {"W": rng.standard_normal((3, 4)), "b": rng.standard_normal(3)}
    tangent = {"W": rng.standard_normal((3, 4)), "b": rng.standard_normal(3)}
    u = rng.standard_normal(3)
    return x, params, tangent, u


def _net(x):
    def f(p):
        xp = secondorder.namespace(p["W"])
        # a constant made inside the function goes where its argument is (a GPU, say)
        const = xp.asarray(x, dtype=p["W"].dtype, device=backends.backend_of(p["W"]).device(p["W"]))
        return xp.tanh(p["W"] @ const + p["b"])

    return f


def _oracle(x, p, v, u):
    y = np.tanh(p["W"] @ x + p["b"])
    d = 1.0 - y**2
    s = v["W"] @ x + v["b"]
    jv = d * s
    jtu = {"W": np.outer(d * u, x), "b": d * u}
    grad = {"W": np.outer(d * y, x), "b": d * y}  # of 0.5 ||y||^2
    c = s * (d**2 - 2.0 * y**2 * d)
    hv = {"W": np.outer(c, x), "b": c}
    return y, jv, jtu, grad, hv


def test_jvp_vjp_linearize(ad_backend, rng):
    x, p, v, u = _problem(rng)
    y_ref, jv_ref, jtu_ref, _, _ = _oracle(x, p, v, u)
    f = _net(x)
    y, jv = ad_backend.jvp(f, to(ad_backend, p), to(ad_backend, v))
    assert_close(y, y_ref, backend=ad_backend)
    assert_close(jv, jv_ref, backend=ad_backend)
    y, pullback = ad_backend.vjp(f, to(ad_backend, p))
    assert_close(pullback(to(ad_backend, u)), jtu_ref, backend=ad_backend)
    y, lin = ad_backend.linearize(f, to(ad_backend, p))
    assert_close(lin(to(ad_backend, v)), jv_ref, backend=ad_backend)


def test_grad_and_hvp(ad_backend, rng):
    x, p, v, u = _problem(rng)
    y_ref, _, _, grad_ref, hv_ref = _oracle(x, p, v, u)
    f = _net(x)

    def loss(q):
        y = f(q)
        return 0.5 * secondorder.namespace(y).sum(y * y)

    value, g = ad_backend.value_and_grad(loss, to(ad_backend, p))
    assert abs(float(back(ad_backend, value)) - 0.5 * np.sum(y_ref**2)) <= 1e-12
    assert_close(g, grad_ref, backend=ad_backend)
    assert_close(ad_backend.grad(loss, to(ad_backend, p)), grad_ref, backend=ad_backend)
    assert_close(ad_backend.hvp(loss, to(ad_backend, p), to(ad_backend, v)), hv_ref,
                 backend=ad_backend)


def test_strict_backend_has_no_autodiff():
    pytest.importorskip("array_api_strict")
    b = backends.get("array_api_strict")
    x = b.asarray(np.ones(3))
    with pytest.raises(AutodiffUnavailableError, match="no automatic differentiation"):
        b.vjp(lambda z: z, x)
    with pytest.raises(AutodiffUnavailableError):
        b.hvp(lambda z: z, x, x)


# ----------------------------------------------------------------- control flow
def test_control_flow(backend):
    xp = backend.xp
    one = backend.asarray(np.ones(()))
    total = backend.fori_loop(0, 5, lambda i, s: s + i, 0.0 * one)
    assert float(back(backend, total)) == 10.0
    halved = backend.while_loop(lambda s: s > 1.0, lambda s: s / 2.0, 100.0 * one)
    assert float(back(backend, halved)) == 100.0 / 128.0
    picked = backend.cond(xp.all(one > 0), lambda a: a + 1.0, lambda a: a - 1.0, one)
    assert float(back(backend, picked)) == 2.0


# ----------------------------------------------------------------- linear algebra helpers
def test_einsum_and_solves(backend, rng):
    a = rng.standard_normal((3, 4))
    b = rng.standard_normal((4, 5))
    assert_close(backend.einsum("ij,jk->ik", *to(backend, (a, b))), a @ b, backend=backend)
    s = spd(rng, 5)
    rhs = rng.standard_normal((5, 2))
    lower = np.linalg.cholesky(s)
    factor = backend.cholesky(to(backend, s))
    assert_close(factor, lower, backend=backend)
    assert_close(backend.cholesky_solve(factor, to(backend, rhs)), np.linalg.solve(s, rhs),
                 backend=backend)
    assert_close(backend.solve_triangular(to(backend, lower), to(backend, rhs), lower=True),
                 np.linalg.solve(lower, rhs), backend=backend)
    assert_close(backend.solve_triangular(to(backend, lower.T), to(backend, rhs[:, 0]),
                                          lower=False),
                 np.linalg.solve(lower.T, rhs[:, 0]), backend=backend)


def test_cholesky_of_indefinite_matrix_raises(backend):
    with pytest.raises(NotPositiveDefiniteError, match="not positive definite"):
        backend.cholesky(to(backend, np.diag([1.0, -1.0])))


def test_eigh_float32_matches_float64(backend, rng):
    s = spd(rng, 6, cond=100.0)
    w, q = backend.eigh(backend.asarray(s.astype(np.float32), dtype="float32"))
    assert backend.dtype_name(w.dtype) == "float32"
    w_ref = np.linalg.eigvalsh(s)
    assert np.max(np.abs(back(backend, w) - w_ref)) <= 1e-4 * np.max(w_ref)
    q = back(backend, q)
    assert np.max(np.abs(q.T @ q - np.eye(6))) <= 1e-5


def test_to_numpy_round_trip(backend, rng):
    a = rng.standard_normal((2, 3))
    out = backend.to_numpy(backend.asarray(a))
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    np.testing.assert_array_equal(out, a)


def test_torch_namespace_direct_calls_are_array_api_compat_results():
    """The torch namespace sends where/maximum/minimum/logical_and/logical_or/all/any straight
    to torch for plain tensors of one dtype; each result (values, dtype) must be
    array_api_compat's, the fall-back cases (Python scalars, mixed dtypes, 0-d against n-d)
    included."""
    torch = pytest.importorskip("torch")
    compat = pytest.importorskip("array_api_compat.torch")
    xp = backends.get("torch").xp
    x = torch.tensor([1.0, -2.0, float("nan"), 4.0])
    y = torch.tensor([0.5, 3.0, 1.0, float("inf")])
    c = x > 0
    zero_d = torch.tensor(2.0, dtype=torch.float64)
    cases = [("where", (c, x, y)), ("where", (c, x, 1.5)), ("where", (c, zero_d, x)),
             ("maximum", (x, y)), ("maximum", (x, zero_d)), ("minimum", (x, y)),
             ("minimum", (x.to(torch.float64), y)), ("logical_and", (c, y > 1)),
             ("logical_or", (c, y > 1)), ("logical_and", (c, True))]
    for name, args in cases:
        ours, theirs = getattr(xp, name)(*args), getattr(compat, name)(*args)
        assert ours.dtype == theirs.dtype, (name, args)
        assert torch.equal(torch.nan_to_num(ours), torch.nan_to_num(theirs)), (name, args)
    for name in ("all", "any"):
        for a, kwargs in ((c, {}), (c, {"keepdims": True}), (c.reshape(2, 2), {"axis": 0}),
                          (x, {})):
            assert torch.equal(getattr(xp, name)(a, **kwargs), getattr(compat, name)(a, **kwargs))


def test_fused_logsumexp_and_labels_match_the_formulas(backend, rng):
    """Each backend's logsumexp, label pick and per-sample cross-entropy (a framework's
    fused kernel where it has one) against the float64 formulas, on logits from -800 to 800
    (where exp without the shift overflows) and a row of equal logits."""
    f = rng.standard_normal((6, 5)) * 3.0
    f[0] = [800.0, -800.0, 0.0, 799.0, 1.0]
    f[1] = 7.0
    labels = np.array([0, 1, 4, 3, 2, 1])
    shift = f.max(axis=1, keepdims=True)
    lse = np.log(np.exp(f - shift).sum(axis=1, keepdims=True)) + shift
    picked = f[np.arange(6), labels]
    fb = to(backend, f)
    yb = backend.asarray(labels)
    assert_close(back(backend, backend.logsumexp(fb, axis=1)), lse)
    assert_close(back(backend, backend.take_labels(fb, yb)), picked)
    assert_close(back(backend, backend.label_cross_entropy(fb, yb)), lse[:, 0] - picked)
