"""Matrix functions of symmetric PSD matrices against NumPy eigendecomposition oracles."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_close, back, spd, to
from secondorder import backends
from secondorder.errors import NotPositiveDefiniteError, ShapeError
from secondorder.linalg import damped_inverse, eigh, inverse_root, matrix_power


def eig_fn(a, fn):
    """Q fn(w) Q^T from NumPy's eigendecomposition of a symmetric a."""
    w, q = np.linalg.eigh(a)
    return (q * fn(w)) @ q.T


@pytest.mark.parametrize("damping", [0.0, 0.1])
@pytest.mark.parametrize("s", [-1.0, -0.5, 0.5, 2.0, 1.0 / 3.0])
def test_matrix_power(s, damping, backend, rng):
    a = spd(rng, 5, cond=10.0)
    expected = eig_fn(a, lambda w: (w + damping) ** s)
    assert_close(matrix_power(to(backend, a), s, damping=damping), expected, backend=backend)


def test_matrix_power_clips_negative_eigenvalues(backend, rng):
    q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    w = np.array([-0.5, 1.0, 2.0, 3.0])
    a = (q * w) @ q.T
    expected = (q * (np.maximum(w, 0.0) + 0.25) ** -0.5) @ q.T
    assert_close(matrix_power(to(backend, a), -0.5, damping=0.25), expected, backend=backend)


@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_damped_inverse(damping, backend, rng):
    a = spd(rng, 6, cond=10.0)
    expected = np.linalg.inv(a + damping * np.eye(6))
    assert_close(damped_inverse(to(backend, a), damping), expected, backend=backend)


def test_damped_inverse_of_psd_needs_damping(backend, rng):
    """A singular PSD matrix becomes invertible with damping."""
    g = rng.standard_normal((5, 2))
    a = g @ g.T
    expected = np.linalg.inv(a + 0.5 * np.eye(5))
    assert_close(damped_inverse(to(backend, a), 0.5), expected, backend=backend)


@pytest.mark.parametrize("damping", [0.0, 0.5])
def test_damped_inverse_not_positive_definite(damping, backend, rng):
    if backend.name == "cupy":
        pytest.skip("only numpy, torch, array_api_strict and jax are specified to raise")
    q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    a = (q * np.array([-2.0, 1.0, 2.0, 3.0])) @ q.T  # A + damping I stays indefinite
    assert np.linalg.eigvalsh(a + damping * np.eye(4)).min() < 0
    with pytest.raises(NotPositiveDefiniteError):
        damped_inverse(to(backend, a), damping)


@pytest.mark.parametrize("damping", [0.0, 0.05])
@pytest.mark.parametrize("p", [1, 2, 4])
def test_inverse_root_eigh(p, damping, backend, rng):
    a = spd(rng, 5, cond=10.0)
    expected = eig_fn(a, lambda w: (w + damping) ** (-1.0 / p))
    out = inverse_root(to(backend, a), p, damping=damping, method="eigh")
    assert_close(out, expected, backend=backend)
    assert_close(inverse_root(to(backend, a), p, damping=damping), expected, backend=backend)


@pytest.mark.parametrize("damping", [0.0, 0.05])
@pytest.mark.parametrize("p", [1, 2, 4])
def test_inverse_root_newton(p, damping, backend, rng):
    a = spd(rng, 5, cond=10.0)
    ab = to(backend, a)
    ref = back(backend, inverse_root(ab, p, damping=damping, method="eigh"))
    np.testing.assert_allclose(ref, eig_fn(a, lambda w: (w + damping) ** (-1.0 / p)), atol=1e-12)
    x = back(backend, inverse_root(ab, p, damping=damping, method="newton"))
    assert_close(x, ref, rtol=1e-5)
    residual = np.linalg.matrix_power(x, p) @ (a + damping * np.eye(5)) - np.eye(5)
    assert np.abs(residual).max() < 1e-5


def test_inverse_root_bad_arguments(backend, rng):
    a = to(backend, spd(rng, 3))
    with pytest.raises(ValueError):
        inverse_root(a, 2, method="bogus")
    with pytest.raises(ValueError):
        inverse_root(a, 1.5, method="newton")
    with pytest.raises(ValueError):
        inverse_root(a, 0, method="newton")


def test_eigh_float64(backend, rng):
    a = spd(rng, 6, cond=10.0)
    w, q = eigh(to(backend, a))
    w, q = back(backend, w), back(backend, q)
    assert_close(w, np.linalg.eigvalsh(a))
    assert_close(q.T @ q, np.eye(6))
    assert_close((q * w) @ q.T, a)


def _float32_backend(name):
    pytest.importorskip({"numpy": "autograd"}.get(name, name))
    return backends.get(name)


@pytest.mark.parametrize("name", ["numpy", "torch"])
def test_eigh_float32(name, rng):
    backend = _float32_backend(name)
    a = spd(rng, 6, cond=10.0)
    a32 = backend.asarray(a, dtype="float32")
    a_rounded = backend.to_numpy(a32).astype(np.float64)  # the matrix actually factorised
    w, q = eigh(a32)
    assert w.dtype == a32.dtype and q.dtype == a32.dtype
    w, q = back(backend, w), back(backend, q)
    assert_close(w, np.linalg.eigvalsh(a_rounded), rtol=1e-5)
    assert_close((q * w) @ q.T, a_rounded, rtol=1e-5)


@pytest.mark.parametrize("failure", ["raise", "nan"])
@pytest.mark.parametrize("name", ["numpy", "torch"])
def test_eigh_float32_retries_in_float64(name, failure, rng, monkeypatch):
    """A float32 eigh that fails is redone in float64 and cast back to float32."""
    backend = _float32_backend(name)
    xp = backend.xp
    original = backend._eigh
    seen = []

    def flaky(x):
        seen.append(backend.dtype_name(x.dtype))
        if x.dtype == xp.float32:
            if failure == "raise":
                raise RuntimeError("simulated float32 eigh failure")
            w, q = original(x)
            return w * float("nan"), q
        return original(x)

    monkeypatch.setattr(backend, "_eigh", flaky)
    a = spd(rng, 5, cond=10.0)
    a32 = backend.asarray(a, dtype="float32")
    a_rounded = backend.to_numpy(a32).astype(np.float64)
    w, q = backend.eigh(a32)
    assert seen == ["float32", "float64"]
    assert w.dtype == a32.dtype and q.dtype == a32.dtype
    w, q = back(backend, w), back(backend, q)
    assert_close(w, np.linalg.eigvalsh(a_rounded), rtol=1e-5)
    assert_close((q * w) @ q.T, a_rounded, rtol=1e-5)


@pytest.mark.parametrize("shape", [(3, 4), (4,), (2, 2, 2)])
@pytest.mark.parametrize("fn", ["matrix_power", "damped_inverse", "inverse_root", "eigh"])
def test_non_square_raises(fn, shape, backend, rng):
    x = to(backend, rng.standard_normal(shape))
    call = {
        "matrix_power": lambda: matrix_power(x, 0.5),
        "damped_inverse": lambda: damped_inverse(x, 0.1),
        "inverse_root": lambda: inverse_root(x, 2, method="newton"),
        "eigh": lambda: eigh(x),
    }[fn]
    with pytest.raises(ShapeError):
        call()


@pytest.mark.parametrize("traced", [False, True])
@pytest.mark.parametrize("name", ["torch", "jax"])
def test_eigh_of_half_precision_is_the_float32_eigh_cast(name, traced, rng):
    """Neither framework's eigh takes bfloat16 (XLA: 'Unsupported dtype', so Shampoo, Newton
    and GroupedNewton crashed on a bfloat16 JAX model without x64): the matrix is factorised
    in float32 and the result cast back, on both backends, eagerly and inside jax.jit."""
    backend = _float32_backend(name)
    if traced and name != "jax":
        pytest.skip("jit is JAX's")
    a = spd(rng, 6, cond=10.0)
    if name == "torch":
        import torch

        half = torch.tensor(a).to(torch.bfloat16)
        as32 = half.float()
    else:
        import jax.numpy as jnp

        half = jnp.asarray(a).astype(jnp.bfloat16)
        as32 = half.astype(jnp.float32)
    if traced:
        import jax

        w, q = jax.jit(eigh)(half)
    else:
        w, q = eigh(half)
    w32, q32 = eigh(as32)
    assert str(w.dtype).endswith("bfloat16") and str(q.dtype).endswith("bfloat16")
    for ours, ref in ((w, w32), (q, q32)):  # the float32 result rounded to bfloat16
        xp = backend.xp
        expected = backend.to_numpy(xp.astype(xp.astype(ref, half.dtype), xp.float32))
        np.testing.assert_array_equal(backend.to_numpy(xp.astype(ours, xp.float32)), expected)
